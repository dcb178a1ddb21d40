"""ROT pooling operators: options and the weight table (``params.py``), the one router
(``route.py``), the torch path (``torch/``) and the Triton kernels (``triton/``)."""
import sys as _sys

from .torch import sets as _sets

# The legacy kernel modules (triton_sinkhorn.py, triton_badmm.py, triton_window.py, triton_set.py;
# replaced by the packages triton/<family>/) still import ``.solvers``, now ``torch/sets.py``.
# Remove this alias when they are deleted.
_sys.modules.setdefault(__name__ + ".solvers", _sets)
