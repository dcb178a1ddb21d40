"""The feature scale of the ROT layers (``scale="auto"``, the modules' default): s and x / s.

The ROT plan is invariant to scaling the features and every weight together,
P(s·X; s·α) = P(X; α) (α0's Σ1, Σ2 are normalised per set, DESIGN §2), and the pooled output is
linear in X for a fixed plan. A layer with ``scale="auto"`` therefore pools ``x / s`` and
returns ``s · y``: exactly ROT pooling of ``x`` with every weight multiplied by ``s``, where
``s`` is the spread of the set - the root mean square over features of each feature's standard
deviation over the set's samples (over an image's pixels for the image layers). The weights are
thus relative to the features' spread, and the near-mean start (α1 = ρ = 100) holds whatever
the scale (tests/test_feature_scale.py). A set whose spread is 0 (one sample, constant
features) uses s = 1. ``s`` keeps its autograd graph: the gradient is that of the function
computed. Where the window or Sinkhorn kernels run, ``route`` folds 1/s into them instead
(``docs/kernels.md``); the functions here are the separate path.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from ..._batching import compute_dtype
from ..._transforms import transforms_active
from .higher_order import recomputed_vjp, recorded_backward
from .spread_math import ragged_spread_ops, spread_ops


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


class _SpreadNormalize(torch.autograd.Function):
    """(x / s, s) with s the spread of each batch entry (``normalize_by_spread``), its
    backward written out: 8 ops (9 when x / s is returned in a narrower dtype) instead of the
    ~20 of autograd through var, mean, where, sqrt and the division (each a ~5 µs launch on a
    GPU, PERF.md "Host front end").

    The forward takes the root before the floor, s = threshold(sqrt(v), 0, 1) (the same values
    as sqrt(where(v > 0, v, 1)): sqrt(v) > 0 exactly when v > 0), so that the backward gets
    the mask of the sets with v > 0 as sqrt(v) / s (exactly 1 or 0) without an op of its own;
    and it reuses the output x / s (saved, no copy) for the gradient through the division."""

    @staticmethod
    def forward(ctx, x, sample_dims, feature_dim, out_dtype):
        out, s, xn, mean, root = spread_ops(x, sample_dims, feature_dim, out_dtype)
        # x / s itself when it is the output (no copy); else the output is rounded: use x
        ctx.save_for_backward(x, mean, root, s, out if out is xn else None)
        ctx.args = (sample_dims, feature_dim, out_dtype)
        return out, s

    @staticmethod
    def backward(ctx, g_xn, g_s):
        if recorded_backward():  # create_graph: the forward's ops, differentiable again
            (gx,) = recomputed_vjp(lambda x: spread_ops(x, *ctx.args)[:2],
                                   ctx.saved_tensors[:1], ctx.needs_input_grad[:1],
                                   (g_xn, g_s))
            return gx, None, None, None
        x, mean, root, s, xn = ctx.saved_tensors
        dims = tuple(range(1, x.dim()))
        n = max(math.prod(x.shape[1:]), 1)  # v = Σ (x - mean)² / n over one batch entry
        # total ds: the direct gradient and the one through x / s (= -Σ g·x / s²)
        if xn is not None:
            ds = torch.addcdiv(g_s, (g_xn * xn).sum(dims, keepdim=True), s, value=-1.0)
        else:
            ds = torch.addcdiv(g_s, (g_xn * x).sum(dims, keepdim=True), s * s, value=-1.0)
        # ds/dx = (x - mean) / (n s) where v > 0; 0 where s is the constant 1 (root / s: the
        # mask, exactly 1 or 0); gx = (g + ds·mask·(x - mean) / n) / s
        dsm = ds * (root / s)
        return (torch.addcmul(g_xn, dsm, x - mean, value=1.0 / n) / s), None, None, None


def normalize_by_spread(x: Tensor, sample_dims: Tuple[int, ...], out_dtype: torch.dtype,
                        kernels: bool = False) -> Tuple[Tensor, Tensor]:
    """``(x / s in out_dtype, s)`` for x (B, ...): s (B, 1, ...) (x's rank, for broadcasting,
    in x's compute dtype) is the spread of each batch entry, its samples along ``sample_dims``
    and features along dim 1 (images (B, C, H, W): dims (2, 3)) or 2 (sets (B, N, D): dim 1).
    Same values as ``image_spread`` / ``dense_spread``. ``kernels``: the caller runs the Triton
    kernels (CUDA, or the interpreter; ``route._spread_kernels``), so two launches each way
    do it where they apply (``ops/rot/triton/spread``: x read in its own dtype, ~3 x-sized
    passes forward and 5 backward instead of ~4 and ~12); otherwise (CPU, float64,
    torch.compile tracing: inductor fuses them) the torch ops of ``_SpreadNormalize``."""
    if kernels and not torch.compiler.is_compiling():
        from .triton.spread import spread_normalize
        out = spread_normalize(x, tuple(sample_dims), out_dtype)
        if out is not None:
            return out
    feature_dim = 1 if 1 not in sample_dims else 2
    if transforms_active():  # no autograd.Function under torch.func: the plain ops
        return spread_ops(x.to(compute_dtype(x.dtype)), tuple(sample_dims), feature_dim,
                          out_dtype)[:2]
    return _SpreadNormalize.apply(x.to(compute_dtype(x.dtype)), tuple(sample_dims),
                                  feature_dim, out_dtype)


class _RaggedSpreadNormalize(torch.autograd.Function):
    """(x / s[index], s) for the rows of a ragged batch, with s the spread of each set
    (``ragged_spread``'s values, two passes), and the backward written out (~11 ops instead
    of autograd's ~26; the root before the floor and the saved output as in
    ``_SpreadNormalize``)."""

    @staticmethod
    def forward(ctx, x, index, lengths, num_sets, out_dtype):
        out, s, xn, count, dev, root, s_rows = ragged_spread_ops(x, index, lengths, num_sets,
                                                                 out_dtype)
        ctx.save_for_backward(x, index, count, dev, root, s, s_rows,
                              out if out is xn else None, lengths)
        ctx.num_sets, ctx.out_dtype = num_sets, out_dtype
        return out, s

    @staticmethod
    def backward(ctx, g_xn, g_s):
        if recorded_backward():  # create_graph: the forward's ops, differentiable again
            x, index, lengths = (ctx.saved_tensors[i] for i in (0, 1, 8))
            (gx,) = recomputed_vjp(
                lambda x: ragged_spread_ops(x, index, lengths, ctx.num_sets, ctx.out_dtype)[:2],
                (x,), ctx.needs_input_grad[:1], (g_xn, g_s))
            return gx, None, None, None, None
        x, index, count, dev, root, s, s_rows, xn, _lengths = ctx.saved_tensors
        # total ds: the direct gradient and the one through x / s (= -Σ g·x / s² per set)
        if xn is not None:
            t = x.new_zeros(ctx.num_sets).index_add_(0, index, (g_xn * xn).sum(-1))
            ds = torch.addcdiv(g_s, t, s, value=-1.0)
        else:
            t = x.new_zeros(ctx.num_sets).index_add_(0, index, (g_xn * x).sum(-1))
            ds = torch.addcdiv(g_s, t, s * s, value=-1.0)
        # ds/dx = dev / (D · count · s) where v > 0 (root / s: the mask, exactly 1 or 0); 0
        # where s is the constant 1; gx = (g + ds·mask·dev / (D · count)) / s
        coef = ds * (root / s) / count[:, 0]                               # [B]
        gx = torch.addcmul(g_xn, coef[index][:, None], dev, value=1.0 / x.shape[1]) / s_rows
        return gx, None, None, None, None


def normalize_ragged_by_spread(x: Tensor, index: Tensor, lengths: Tensor, num_sets: int,
                               out_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """``(x / s[index] in out_dtype, s (num_sets,))`` for the rows ``x (N_total, D)`` (compute
    dtype) of sets ``index`` with ``lengths`` rows each: ``ragged_spread``'s values."""
    if transforms_active():  # no autograd.Function under torch.func: the plain ops
        return ragged_spread_ops(x, index, lengths, num_sets, out_dtype)[:2]
    return _RaggedSpreadNormalize.apply(x, index, lengths, num_sets, out_dtype)


def normalize_set_rows_by_spread(x: Tensor, batch, out_dtype: torch.dtype,
                                 kernels: bool = False) -> Tuple[Tensor, Tensor]:
    """:func:`normalize_ragged_by_spread` for the rows ``x (N_total, D)`` (any float dtype) of a
    ragged ``SetBatch``: with ``kernels`` and rows grouped by set (``batch.ptr``) two launches
    each way (``ops/rot/triton/spread``; the set ids and lengths are then never built), else
    the torch ops."""
    if kernels and batch.ptr is not None and not torch.compiler.is_compiling():
        from .triton.spread import spread_normalize_ragged
        out = spread_normalize_ragged(x, batch.ptr, out_dtype)
        if out is not None:
            return out
    return normalize_ragged_by_spread(x.to(compute_dtype(x.dtype)), batch.index, batch.lengths,
                                      batch.num_sets, out_dtype)


def normalize_sets_by_spread(x: Tensor, batch, kernels: bool = False) -> Tuple[Tensor, Tensor]:
    """``(x / s in x's dtype, s (B, 1))`` for a batch of sets: dense ``x (B, N, D)`` (sets with
    no rows: s = 1) or the rows ``x (N_total, D)`` of the ragged ``SetBatch`` ``batch``."""
    if x.dim() == 3 and x.shape[1] > 0:
        xs, s = normalize_by_spread(x, (1,), x.dtype, kernels=kernels)             # s [B, 1, 1]
        return xs, s.view(-1, 1)  # (a view: its backward is one too, unlike s[:, 0])
    if x.dim() == 3:
        return x, x.new_ones(x.shape[0], 1, dtype=compute_dtype(x.dtype))
    xs, s = normalize_set_rows_by_spread(x, batch, x.dtype, kernels=kernels)
    return xs, s[:, None]
