"""Window geometry of image pooling, shared by the layers (``nn/image.py``), the torch window
path (``torch/windows.py``) and the window kernels: one formula for every path.

Local k×k windows follow ``nn.MaxPool2d`` (dilation 1: output size, padding, ``ceil_mode``);
adaptive windows follow ``nn.AdaptiveAvgPool2d`` (rows ``floor(i·H/oh)`` to
``ceil((i+1)·H/oh)``, they may overlap and differ in size). ../../../../shared/DESIGN.md §1
(images as sets), §9.
"""
from __future__ import annotations


def pool_output_size(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    """Output length of nn.MaxPool2d (dilation 1) along one axis."""
    num = size + 2 * p - k + (s - 1 if ceil_mode else 0)
    out = num // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def adaptive_bounds(size: int, out: int) -> list:
    """Window [start, end) of each output index, exactly nn.AdaptiveAvgPool2d's."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def largest_adaptive_window(size: int, out: int) -> int:
    """The longest of the adaptive windows along one axis (the window kernels' tile side)."""
    return max(e - s for s, e in adaptive_bounds(size, out))


def adaptive_windows_overlap(size: int, out: int) -> bool:
    """Whether two adaptive windows along one axis share a row (or column)."""
    bounds = adaptive_bounds(size, out)
    return any(s < e for (_, e), (s, _) in zip(bounds, bounds[1:]))
