"""Local k×k ROT pooling of images (α0 = 0): ``window_pool``. Kernels in ``kernels.py``, host
launchers in ``launch.py``, autograd / custom op in ``op.py``."""
from .op import window_pool

__all__ = ["window_pool"]
