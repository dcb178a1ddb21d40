"""rotp_triton: regularized optimal-transport pooling layers for PyTorch, with Triton kernels."""
from .functional import rot_pool
from .nn import (AdaptiveROTPool2d, GSPool, MixedROTPool, OTKPool, ROTPool, ROTPool2d,
                 ROTWeights, SetFusionROTPool, replace_avgpool, replace_local_pools)
from .ops.gsp import gsp_pool
from .ops.otk import otk_pool
from .ops.rot.params import set_value_checks

__version__ = "0.1.0"

__all__ = ["rot_pool", "gsp_pool", "otk_pool", "ROTPool", "ROTWeights", "AdaptiveROTPool2d",
           "ROTPool2d", "replace_avgpool", "replace_local_pools", "MixedROTPool",
           "SetFusionROTPool", "GSPool", "OTKPool", "set_value_checks"]
