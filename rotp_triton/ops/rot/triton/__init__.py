"""Triton kernels of ROT pooling, one package per family (sinkhorn, badmm, window, structure).

Each family has ``kernels.py`` (``@triton.jit`` code), ``launch.py`` (grids, configs, host
launchers) and ``op.py`` (autograd.Function / custom op and the family's entry point); shared
helpers are in ``common.py``. Routing between families and the torch path: ``../route.py``.
"""
