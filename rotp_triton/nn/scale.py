"""Feature-scale normalisation of the ROT layers (``scale="auto"``, the modules' default).

The ROT plan is invariant to scaling the features and every weight together,
P(s·X; s·α) = P(X; α) (α0's Σ1, Σ2 are normalised per set, DESIGN §2), and the pooled output is
linear in X for a fixed plan. A layer with ``scale="auto"`` therefore pools ``x / s`` and
returns ``s · y``: exactly ROT pooling of ``x`` with every weight multiplied by ``s``, where
``s`` is the spread of the set - the root mean square over features of each feature's standard
deviation over the set's samples (over an image's pixels for the image layers). The weights are
thus relative to the features' spread, and the near-mean start (α1 = ρ = 100) holds whatever
the scale (tests/test_feature_scale.py). A set whose spread is 0 (one sample, constant
features) uses s = 1. ``s`` keeps its autograd graph: the gradient is that of the function
computed.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

Scale = Union[None, str, float]


def check_scale(scale) -> Scale:
    if scale is None or scale == "auto":
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 \
            or scale == float("inf"):
        raise ValueError(f"scale must be 'auto', None or a positive float, got {scale!r}")
    return float(scale)


def _safe_sqrt(v: Tensor) -> Tensor:
    # spread 0 -> 1 (and a finite gradient: sqrt is never evaluated at 0)
    pos = v > 0
    return torch.sqrt(torch.where(pos, v, torch.ones_like(v)))


def dense_spread(x: Tensor) -> Tensor:
    """``x (B, N, D)`` -> ``(B,)`` spread of each set."""
    if x.shape[1] == 0:
        return x.new_ones(x.shape[0])
    return _safe_sqrt(x.var(dim=1, unbiased=False).mean(-1))


def image_spread(x: Tensor) -> Tensor:
    """``x (B, C, H, W)`` -> ``(B,)`` spread of each image (pixels as samples)."""
    return _safe_sqrt(x.flatten(2).var(dim=2, unbiased=False).mean(-1))


def ragged_spread(x: Tensor, index: Tensor, num_sets: int) -> Tensor:
    """``x (N_total, D)`` rows of set ``index`` -> ``(num_sets,)`` spread (two passes: no
    cancellation for features far from 0)."""
    ones = x.new_ones(x.shape[0])
    count = x.new_zeros(num_sets).index_add_(0, index, ones).clamp_min(1)[:, None]
    mean = x.new_zeros(num_sets, x.shape[1]).index_add_(0, index, x) / count
    dev = x - mean[index]
    var = x.new_zeros(num_sets, x.shape[1]).index_add_(0, index, dev * dev) / count
    return _safe_sqrt(var.mean(-1))
