"""The layers' ``scale`` option: ``"auto"`` (the weights are relative to each set's or image's
feature spread), ``None`` or a positive float. The scale itself - s, x / s, by the spread
kernels or torch ops - is :mod:`rotp_triton.ops.rot.spread`."""
from __future__ import annotations

from typing import Union

Scale = Union[None, str, float]


def check_scale(scale) -> Scale:
    if scale is None or scale == "auto":
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 \
            or scale == float("inf"):
        raise ValueError(f"scale must be 'auto', None or a positive float, got {scale!r}")
    return float(scale)

