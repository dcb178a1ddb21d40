"""rotp_triton: regularized optimal-transport pooling layers for PyTorch, with Triton kernels."""
from .functional import rot_pool
from .nn import ROTPool, ROTWeights

__version__ = "0.1.0"

__all__ = ["rot_pool", "ROTPool", "ROTWeights"]
