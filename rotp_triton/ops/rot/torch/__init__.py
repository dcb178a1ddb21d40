"""The batched PyTorch path of ROT pooling (CPU, float64, fallback): ``sets.py`` (the solvers on a
padded batch of sets), ``structure.py`` (the factorized Σ1 M Σ2 term), ``windows.py`` (image
windows as sets)."""
