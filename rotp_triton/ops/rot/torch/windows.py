"""The torch path of image pooling: every window of an image batch as one set of a padded
batch, solved by ``sets.py`` (DESIGN §1: a window's valid pixels are the samples, the C
channels the features). The CPU path, the fallback of the window kernels, and their reference
in the tests. Window geometry: ``../window_geometry.py``; routing: ``../route.py``.
Design: ../../../../../shared/DESIGN.md §1, §9.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...._batching import compute_dtype
from ..params import wants_structure, weight_rows
from ..window_geometry import adaptive_bounds, pool_output_size
from .sets import pool_from_log_plan, rot_log_plan

IntPair = Tuple[int, int]


def table_weights(table: Tensor, structure: bool) -> dict:
    """The torch window path's weights from the (6, T) table: (T,) rows, α0 the number 0 when
    the α0 = 0 algorithm runs (static for torch.compile, as a layer's fixed α0)."""
    w = weight_rows(table)
    if not structure:
        w["a0"] = 0.0
    return w


def _solve_sets(sets: Tensor, mask: Tensor, *, method, variant, num_iters, inner_iters,
                weights) -> Tensor:
    """Pool a padded batch of window sets: sets (M, N, C) (invalid samples 0), mask (M, N)
    -> (M, C) in the compute dtype. Uniform priors over the C features and each window's
    valid samples."""
    M, N, C = sets.shape
    cdt = sets.dtype
    # (1,) weights (per_iter_params=False) are shared by the T modules
    structure = wants_structure(weights["a0"])
    w = {k: torch.as_tensor(v, device=sets.device, dtype=cdt).reshape(-1).expand(num_iters)
         for k, v in weights.items()}
    log_p0 = sets.new_full((M, C), -math.log(C))
    count = mask.sum(1, keepdim=True).clamp_min(1).to(cdt)
    log_q0 = torch.where(mask, -torch.log(count), torch.zeros((), dtype=cdt, device=sets.device))
    log_p = rot_log_plan(sets, mask, log_p0, log_q0, method=method, variant=variant,
                         structure=structure, num_iters=num_iters,
                         inner_iters=inner_iters, **w)
    return pool_from_log_plan(log_p, sets, mask)


def rot_pool2d_torch(x: Tensor, kernel_size: IntPair, stride: IntPair, padding: IntPair,
                     ceil_mode: bool, *, method: str, variant: str, num_iters: int,
                     inner_iters: int, weights: dict) -> Tensor:
    """Local ROT pooling on the torch path (the CPU fallback and the kernels' reference).

    Args:
        x: (B, C, H, W), any strides.
        kernel_size, stride, padding: (kh, kw), (sh, sw), (ph, pw).
        weights: dict of (T,) tensors a0, a1, a2, a3, rho, tau.
    Returns:
        (B, C, Ho, Wo) in x's dtype (Ho, Wo as nn.MaxPool2d); channels_last strides if x is.
    """
    B, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    Ho = pool_output_size(H, kh, sh, ph, ceil_mode)
    Wo = pool_output_size(W, kw, sw, pw, ceil_mode)
    # right/bottom padding: enough for every window (ceil_mode may reach past the padding)
    pad_b = max(ph, (Ho - 1) * sh + kh - H - ph)
    pad_r = max(pw, (Wo - 1) * sw + kw - W - pw)
    cdt = compute_dtype(x.dtype)
    xp = F.pad(x.to(cdt), (pw, pad_r, ph, pad_b))                          # zeros: not samples
    valid = F.pad(x.new_ones(1, 1, H, W, dtype=cdt), (pw, pad_r, ph, pad_b))
    win = xp.unfold(2, kh, sh).unfold(3, kw, sw)[:, :, :Ho, :Wo]         # [B, C, Ho, Wo, kh, kw]
    sets = win.permute(0, 2, 3, 4, 5, 1).reshape(B * Ho * Wo, kh * kw, C)
    vm = valid.unfold(2, kh, sh).unfold(3, kw, sw)[0, 0, :Ho, :Wo].reshape(Ho * Wo, kh * kw) > 0
    mask = vm.unsqueeze(0).expand(B, -1, -1).reshape(B * Ho * Wo, kh * kw)
    y = _solve_sets(sets, mask, method=method, variant=variant, num_iters=num_iters,
                    inner_iters=inner_iters, weights=weights)
    return y.reshape(B, Ho, Wo, C).permute(0, 3, 1, 2).to(x.dtype)        # channels_last strides


def adaptive_rot_pool2d_torch(x: Tensor, output_size: Tuple[int, int], *, method: str,
                              variant: str, num_iters: int, inner_iters: int,
                              weights: dict) -> Tensor:
    """Adaptive-window ROT pooling on the torch path: (B, C, H, W) -> (B, C, oh, ow), windows
    exactly those of nn.AdaptiveAvgPool2d (they may overlap and differ in size)."""
    B, C, H, W = x.shape
    oh, ow = output_size
    rows, cols = adaptive_bounds(H, oh), adaptive_bounds(W, ow)
    nh = max(e - s for s, e in rows)
    nw = max(e - s for s, e in cols)
    idx = torch.zeros(oh * ow, nh * nw, dtype=torch.long)
    mask = torch.zeros(oh * ow, nh * nw, dtype=torch.bool)
    for i, (hs, he) in enumerate(rows):
        for j, (ws, we) in enumerate(cols):
            pos = [h * W + w for h in range(hs, he) for w in range(ws, we)]
            idx[i * ow + j, :len(pos)] = torch.tensor(pos)
            mask[i * ow + j, :len(pos)] = True
    idx, mask = idx.to(x.device), mask.to(x.device)
    cdt = compute_dtype(x.dtype)
    flat = x.to(cdt).flatten(2)                                           # [B, C, H*W]
    sets = flat[:, :, idx.reshape(-1)].reshape(B, C, oh * ow, nh * nw)
    sets = sets.permute(0, 2, 3, 1) * mask[None, :, :, None]             # [B, oh*ow, n, C]
    sets = sets.reshape(B * oh * ow, nh * nw, C)
    m = mask.unsqueeze(0).expand(B, -1, -1).reshape(B * oh * ow, nh * nw)
    y = _solve_sets(sets, m, method=method, variant=variant, num_iters=num_iters,
                    inner_iters=inner_iters, weights=weights)
    return y.reshape(B, oh, ow, C).permute(0, 3, 1, 2).to(x.dtype)
