"""The (6, T) weight table of a ROT layer from its raw parameters in one launch
(``softplus_table``), and its gradient in one launch. Kernels in ``kernels.py``, host
launchers in ``launch.py``, autograd in ``op.py``."""
from .op import softplus_table

__all__ = ["softplus_table"]
