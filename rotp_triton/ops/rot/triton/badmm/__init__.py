"""B-ADMM (B-E, B-Q) set kernels, α0 = 0: entry point :func:`badmm_pool` (interface: docs/kernels.md)."""
from .cost import badmm_cost_model
from .op import badmm_pool

__all__ = ["badmm_pool", "badmm_cost_model"]
