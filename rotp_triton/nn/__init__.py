"""nn.Module pooling layers."""
from .gsp import GSPool
from .hierarchical import MixedROTPool, SetFusionROTPool
from .image import AdaptiveROTPool2d, ROTPool2d
from .select_pool import ROTSelectAdaptivePool2d
from .surgery import replace_avgpool
from .surgery_local import replace_local_pools
from .otk import OTKPool
from .rot_pool import ROTPool
from .weights import ROTWeights

__all__ = ["ROTPool", "ROTWeights", "AdaptiveROTPool2d", "ROTPool2d", "replace_avgpool",
           "replace_local_pools", "ROTSelectAdaptivePool2d",
           "MixedROTPool", "SetFusionROTPool", "GSPool", "OTKPool"]
