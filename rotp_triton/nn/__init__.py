"""nn.Module pooling layers."""
from .rot_pool import ROTPool
from .weights import ROTWeights

__all__ = ["ROTPool", "ROTWeights"]
