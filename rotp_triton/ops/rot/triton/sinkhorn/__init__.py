"""Fused Sinkhorn (α0 = 0) kernels for sets: ``sinkhorn_pool`` (op.py), launchers (launch.py),
``@triton.jit`` code (kernels.py). DESIGN §3.1-3.2, §7; PERF.md for where they stand."""
from .op import SinkhornFunction, sinkhorn_pool

__all__ = ["sinkhorn_pool", "SinkhornFunction"]
