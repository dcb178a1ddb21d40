"""TEMPORARY shim package (branch layout): replaced by the badmm kernel package."""
