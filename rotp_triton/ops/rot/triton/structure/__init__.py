"""Triton kernels for α0 > 0 (the structure term): ``kernels.py``, ``launch.py``, ``op.py``."""
