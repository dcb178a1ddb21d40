"""The feature-scale normalisation of the image and set layers (``ops/rot/spread.py``) in two
launches forward and two backward: x / s with s each batch entry's spread, and its gradient
(instead of ~5 torch ops forward and ~8 backward, most of them full-size). Kernels in
``kernels.py``, host launchers in ``launch.py``, autograd in ``op.py``."""
from .op import spread_normalize, spread_normalize_ragged

__all__ = ["spread_normalize", "spread_normalize_ragged"]
