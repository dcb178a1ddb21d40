"""TEMPORARY shim package (branch layout): replaced by the sinkhorn kernel package."""
