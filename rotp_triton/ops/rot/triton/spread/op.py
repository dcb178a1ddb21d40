"""Autograd of the feature-scale kernels and the family's entry point
:func:`spread_normalize`."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ...higher_order import recomputed_vjp, recorded_backward
from ...spread_math import ragged_spread_ops, spread_ops
from ..common import as_f32
from .launch import bfs_strides, spread_backward, spread_forward

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class SpreadNormalizeFunction(torch.autograd.Function):
    """(x / s, s): ``spread._SpreadNormalize``'s (ragged: ``_RaggedSpreadNormalize``'s)
    values, in two launches each way."""

    @staticmethod
    def forward(ctx, x, sample_dims, out_dtype, ptr):
        out, saved = spread_forward(x, sample_dims, out_dtype, ptr)
        ctx.save_for_backward(x, saved, ptr)
        ctx.sample_dims, ctx.out_dtype = sample_dims, out_dtype
        if ptr is not None:
            return out, saved[:ptr.shape[0] - 1]
        B = x.shape[0]
        return out, saved[:B].view((B,) + (1,) * (x.dim() - 1))

    @staticmethod
    def backward(ctx, g_xn, g_s):
        x, saved, ptr = ctx.saved_tensors
        if recorded_backward():  # the kernels' backward is first order: the torch ops'
            def forward(x):
                x = x.float()                        # (the kernels' statistics are fp32)
                if ptr is None:
                    feature_dim = 1 if 1 not in ctx.sample_dims else 2
                    return spread_ops(x, ctx.sample_dims, feature_dim, ctx.out_dtype)[:2]
                lengths = ptr.diff()
                index = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device),
                                                lengths, output_size=x.shape[0])
                return ragged_spread_ops(x, index, lengths, lengths.numel(), ctx.out_dtype)[:2]
            return (*recomputed_vjp(forward, (x,), ctx.needs_input_grad[:1], (g_xn, g_s)),
                    None, None, None)
        B = x.shape[0] if ptr is None else ptr.shape[0] - 1
        g_s = as_f32(g_s.reshape(B)) if g_s is not None else saved.new_zeros(B)
        if g_xn is None:
            g_xn = torch.zeros_like(x)
        return spread_backward(x, ctx.sample_dims, saved, g_xn, g_s, ptr), None, None, None


def spread_normalize(x: Tensor, sample_dims: Tuple[int, ...],
                     out_dtype: torch.dtype) -> Optional[Tuple[Tensor, Tensor]]:
    """``(x / s in out_dtype, s (B, 1, ...) fp32)`` by the kernels, or None when they do not
    apply (the caller then runs the torch ops of ``ops/rot/spread.py``): x must be fp32, fp16 or
    bf16 (it is read in its own dtype and the statistics taken in fp32), non-empty, with the
    sample dims collapsing into one stride (any image layout; any set strides).

    Args:
        x: (B, C, H, W) with ``sample_dims`` (2, 3) (an image's pixels are its samples), or
            (B, N, D) with (1,) (a set's rows).
        out_dtype: dtype of x / s (the layer's input dtype).
    """
    if x.dtype not in KERNEL_DTYPES or x.numel() == 0 or bfs_strides(x, sample_dims) is None:
        return None
    return SpreadNormalizeFunction.apply(x, tuple(sample_dims), out_dtype, None)


def spread_normalize_ragged(x: Tensor, ptr: Tensor,
                            out_dtype: torch.dtype) -> Optional[Tuple[Tensor, Tensor]]:
    """``(x / s[set of each row] in out_dtype, s (B,) fp32)`` for the rows of a ragged batch by
    the kernels, or None where they do not apply (fp64, no rows or features, no sets).

    Args:
        x: (rows, D), rows grouped by set (any strides).
        ptr: (B + 1,) int64 CSR offsets of the sets (empty sets allowed: s = 1).
        out_dtype: dtype of x / s.
    """
    if x.dtype not in KERNEL_DTYPES or x.numel() == 0 or ptr.shape[0] < 2:
        return None
    return SpreadNormalizeFunction.apply(x, (0,), out_dtype, ptr)
