"""TEMPORARY shim package (branch layout): replaced by the window kernel package."""
