"""The feature spread s of ``scale="auto"`` and x / s as plain torch ops (``spread.py``): the
forwards of its Functions, and what a recorded backward (``higher_order.py``) of theirs or of
the spread kernels recomputes."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def pow2_scale(amax: Tensor) -> Tensor:
    """2^floor(log2(amax)) (1 where amax is 0): dividing by it is exact, and brings the largest
    |value| into [1, 2), so squares cannot overflow (fp32 squares overflow from 1.8e19); the
    statistics of x / c times c (c² for the variance, c after the root) are those of x bit for
    bit wherever nothing overflowed before."""
    return torch.exp2(torch.floor(torch.log2(F.threshold(amax, 0.0, 1.0))))


def spread_ops(x: Tensor, sample_dims, feature_dim: int, out_dtype):
    """(x / s in out_dtype, s, x / s, the samples' mean, the root before the floor): the
    forward of ``spread._SpreadNormalize``, as plain ops."""
    dims = tuple(range(1, x.dim()))
    # (max |x| as the inf-norm: one reduction, no x-sized |x| temporary)
    c = pow2_scale(torch.linalg.vector_norm(x, math.inf, dims, keepdim=True))  # [B, 1, ...]
    var, mean = torch.var_mean(x / c, dim=sample_dims, correction=0, keepdim=True)
    root = torch.sqrt(var.mean(feature_dim, keepdim=True)) * c             # [B, 1, ...]
    s = F.threshold(root, 0.0, 1.0)                                        # spread 0 -> 1
    xn = x / s
    return xn.to(out_dtype), s, xn, mean * c, root


def ragged_spread_ops(x: Tensor, index: Tensor, lengths: Tensor, num_sets: int, out_dtype):
    """(x / s[index] in out_dtype, s, x / s[index], count, dev, root, s[index]): the forward
    of ``spread._RaggedSpreadNormalize``, as plain ops."""
    count = lengths.clamp_min(1)[:, None]                                 # [B, 1] int
    mean = x.new_zeros(num_sets, x.shape[1]).index_add_(0, index, x) / count
    dev = x - mean[index]                                                  # [N, D]
    # squares of dev / c, c a power of 2 per set (pow2_scale): no overflow
    c = pow2_scale(x.new_zeros(num_sets).scatter_reduce_(
        0, index, torch.linalg.vector_norm(dev, math.inf, -1), "amax",
        include_self=True))                                                    # [B]
    devc = dev / c[index][:, None]
    var = x.new_zeros(num_sets, x.shape[1]).index_add_(0, index, devc * devc) / count
    root = torch.sqrt(var.mean(-1)) * c                                    # [B]
    s = F.threshold(root, 0.0, 1.0)                                        # spread 0 -> 1
    s_rows = s[index][:, None]                                             # [N, 1]
    xn = x / s_rows
    return xn.to(out_dtype), s, xn, count, dev, root, s_rows
