"""Reference of image pooling (DESIGN §1): every window of an image is one set, pooled by the
per-set oracle ``rot.rot_pool_sets``. Literal and slow; never imports rotp_triton.

A local k×k window (stride s, padding p, as nn.MaxPool2d with dilation 1) covers rows
i·sh − ph … i·sh − ph + kh − 1 (likewise columns); its samples are the positions inside the
image. An adaptive window (as nn.AdaptiveAvgPool2d) covers rows floor(i·H/oh) … ceil((i+1)·H/oh) − 1.
"""
from __future__ import annotations

import math

import torch

from .rot import rot_pool_sets


def output_size(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    """nn.MaxPool2d's output length: floor (or ceil) of (size + 2p − k)/s + 1, without a last
    window that would start in the bottom/right padding."""
    frac = (size + 2 * p - k) / s
    out = (math.ceil(frac) if ceil_mode else math.floor(frac)) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def window_positions(H, W, k, s, p, ceil_mode):
    """``(Ho, Wo, wins)``: the valid (h, w) positions of every window, row-major over the
    output; k, s, p are (h, w) pairs."""
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    Ho = output_size(H, kh, sh, ph, ceil_mode)
    Wo = output_size(W, kw, sw, pw, ceil_mode)
    wins = []
    for i in range(Ho):
        for j in range(Wo):
            wins.append([(h, w) for h in range(i * sh - ph, i * sh - ph + kh)
                         for w in range(j * sw - pw, j * sw - pw + kw)
                         if 0 <= h < H and 0 <= w < W])
    return Ho, Wo, wins


def adaptive_positions(H, W, oh, ow):
    """The (h, w) positions of nn.AdaptiveAvgPool2d's windows, row-major over the output."""
    rows = [(i * H // oh, math.ceil((i + 1) * H / oh)) for i in range(oh)]
    cols = [(j * W // ow, math.ceil((j + 1) * W / ow)) for j in range(ow)]
    return [[(h, w) for h in range(hs, he) for w in range(ws, we)]
            for hs, he in rows for ws, we in cols]


def pool_windows(x, wins, out_hw, **kw):
    """(B, C, H, W) -> (B, C, Ho, Wo): ROT pooling of each window (a list of (h, w) positions)
    as one set; ``kw``: the arguments of ``rot_pool_sets`` (method, weights, ...)."""
    B, C = x.shape[:2]
    sets = []
    for b in range(B):
        for pos in wins:
            hs = torch.tensor([h for h, _ in pos])
            ws = torch.tensor([w for _, w in pos])
            sets.append(x[b][:, hs, ws].T)                               # (N, C) code layout
    y, _ = rot_pool_sets(sets, **kw)
    return y.reshape(B, out_hw[0], out_hw[1], C).permute(0, 3, 1, 2)
