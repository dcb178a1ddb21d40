"""``@triton.jit`` code of the feature-scale normalisation (``ops/rot/spread.py``: s = the root mean
square over features of each feature's standard deviation over the samples, 1 where that is
0; the layer pools x / s).

x is read in place as (B, F, S) through its strides - features F (an image's channels, a set's
feature dimension), samples S (an image's pixels, a set's rows) - in [BS, BF] tiles, or
(RAGGED) as the rows (rows, F) of sets grouped by ``ptr`` (set b: rows ptr[b] … ptr[b+1] - 1,
its own S; an empty set has mean 0, variance 0, hence s = 1); program (b, j) owns batch entry
b's features [j·BF, (j + 1)·BF) and loops over all its samples, so the per-feature statistics
need no cross-program combine. The spread needs the sum over all F
features: each program writes its block's part, and the next launch adds the NFB parts
(NFB = F / BF floats, read by every program of the entry) - two launches each way, no program
waits for another (the interpreter rule).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..common import feature_block_stats


@triton.jit
def _entry(ptr_ptr, b, sb, ss, S, RAGGED: tl.constexpr):
    """(offset of batch entry b's first sample in a tensor of batch stride sb and sample
    stride ss, its number of samples): dense b · sb and S; ragged ptr[b] · ss and its rows."""
    if RAGGED:
        row0 = tl.load(ptr_ptr + b).to(tl.int64)                  # (an int32 ptr too)
        base = row0 * ss
        n_b = (tl.load(ptr_ptr + b + 1) - row0).to(tl.int32)
    else:
        base = b.to(tl.int64) * sb
        n_b = S
    return base, n_b


@triton.jit
def _ptrs(ptr, base, sf, ss, offs_s, offs_f):
    return ptr + base + offs_s[:, None].to(tl.int64) * ss + offs_f[None, :].to(tl.int64) * sf


@triton.jit
def _tile(ptr, base, sf, ss, offs_s, offs_f, mask):
    """The [BS, BF] tile at samples offs_s, features offs_f of the entry at ``base``, as fp32."""
    return tl.load(_ptrs(ptr, base, sf, ss, offs_s, offs_f), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _spread(part_ptr, pc_ptr, b, F, NFB, BP: tl.constexpr):
    """(s, root) of batch entry b from its NFB per-block sums of the features' variances, each
    kept as (scale c_j, Σ_{f in block j} var_f / c_j²) (no fp32 overflow for |x| up to the
    format's range: var_f alone overflows from |x - mean| ≈ 1.8e19):
    root = C·sqrt(Σ_j part_j (c_j / C)² / F), C = max_j c_j; s = root where root > 0, else 1
    (ops/rot/spread.py)."""
    offs = tl.arange(0, BP)
    o = b.to(tl.int64) * NFB + offs
    parts = tl.load(part_ptr + o, mask=offs < NFB, other=0.0)
    cs = tl.load(pc_ptr + o, mask=offs < NFB, other=0.0)
    C = tl.max(cs, axis=0)
    r = cs / tl.where(C > 0, C, 1.0)
    root = C * tl.sqrt(tl.sum(parts * r * r, axis=0) / F)
    return tl.where(root > 0, root, 1.0), root


@triton.jit
def spread_stats_kernel(x_ptr, sb, sf, ss, ptr_ptr, mean_ptr, part_ptr, pc_ptr, F, S, NFB,
                        RAGGED: tl.constexpr, BS: tl.constexpr, BF: tl.constexpr):
    """Per feature of block (b, j): mean_f and var_f over the S samples
    (:func:`..common.feature_block_stats`: one read of x, no overflow); writes mean (B, F), and
    Σ_{f in the block} var_f as a scale c_j (pc) and the sum divided by c_j² (part), both
    (B, NFB)."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    base, n_b = _entry(ptr_ptr, b, sb, ss, S, RAGGED)
    offs_f = j * BF + tl.arange(0, BF)
    fm = offs_f < F
    mean, C, part = feature_block_stats(x_ptr + base, sf, ss, n_b, offs_f, fm, BS, BF)
    tl.store(mean_ptr + b.to(tl.int64) * F + offs_f, mean, mask=fm)
    tl.store(part_ptr + b.to(tl.int64) * NFB + j, part)
    tl.store(pc_ptr + b.to(tl.int64) * NFB + j, C)


@triton.jit
def spread_normalize_kernel(x_ptr, sb, sf, ss, out_ptr, ob, of, os, ptr_ptr, part_ptr, pc_ptr,
                            s_ptr, root_ptr, F, S, NFB, RAGGED: tl.constexpr, BS: tl.constexpr,
                            BF: tl.constexpr, BP: tl.constexpr, NORMALIZE: tl.constexpr):
    """x / s for block (b, j), written in out's dtype through out's strides; program (b, 0)
    also writes s_b and root_b. Without NORMALIZE (grid (B, 1)) only s and root: a pooling
    kernel that folds 1 / s into its loads reads x itself."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    s, root = _spread(part_ptr, pc_ptr, b, F, NFB, BP)
    if j == 0:
        tl.store(s_ptr + b, s)
        tl.store(root_ptr + b, root)
    if NORMALIZE:
        base, n_b = _entry(ptr_ptr, b, sb, ss, S, RAGGED)
        obase, _n = _entry(ptr_ptr, b, ob, os, S, RAGGED)
        offs_f = j * BF + tl.arange(0, BF)
        fm = offs_f < F
        for s0 in range(0, n_b, BS):
            offs_s = s0 + tl.arange(0, BS)
            mask = (offs_s < n_b)[:, None] & fm[None, :]
            X = _tile(x_ptr, base, sf, ss, offs_s, offs_f, mask)
            tl.store(_ptrs(out_ptr, obase, of, os, offs_s, offs_f),
                     (X / s).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def spread_grad_dot_kernel(g_ptr, gb, gf, gs, x_ptr, sb, sf, ss, ptr_ptr, part_ptr, F, S, NFB,
                           RAGGED: tl.constexpr, BS: tl.constexpr, BF: tl.constexpr):
    """Σ_{f in block (b, j), all samples} ḡ·x into part (B, NFB): the gradient through x / s
    reaches s as -Σ ḡ·x / s²."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    base, n_b = _entry(ptr_ptr, b, sb, ss, S, RAGGED)
    gbase, _n = _entry(ptr_ptr, b, gb, gs, S, RAGGED)
    offs_f = j * BF + tl.arange(0, BF)
    fm = offs_f < F
    acc = tl.zeros([BF], dtype=tl.float32)
    for s0 in range(0, n_b, BS):
        offs_s = s0 + tl.arange(0, BS)
        mask = (offs_s < n_b)[:, None] & fm[None, :]
        G = _tile(g_ptr, gbase, gf, gs, offs_s, offs_f, mask)
        X = _tile(x_ptr, base, sf, ss, offs_s, offs_f, mask)
        acc += tl.sum(G * X, axis=0)
    tl.store(part_ptr + b.to(tl.int64) * NFB + j, tl.sum(acc, axis=0))


@triton.jit
def spread_grad_kernel(g_ptr, gb, gf, gs, x_ptr, sb, sf, ss, gx_ptr, xb, xf, xs, ptr_ptr,
                       mean_ptr, s_ptr, root_ptr, gsc_ptr, part_ptr, F, S, NFB,
                       RAGGED: tl.constexpr, BS: tl.constexpr, BF: tl.constexpr,
                       BP: tl.constexpr, DOT: tl.constexpr, G_OVER_S: tl.constexpr = True):
    """x̄ = (ḡ + ds·[root > 0]·(x - mean_f) / (F·S_b)) / s for block (b, j), with
    ds = s̄ - Σ ḡ·x / s² (the direct gradient of s plus the one through x / s, DOT: its sum
    from spread_grad_dot_kernel's parts; without DOT s̄ is already the total, from a pooling
    kernel that folded 1 / s in; s is the constant 1 where root = 0), written in x̄'s dtype
    through its strides. Without G_OVER_S ḡ is already ∂/∂x at fixed s (a set kernel that
    folded 1 / s into its x-scales): x̄ = ḡ + ds·[root > 0]·(x - mean_f) / (F·S_b·s)."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    s = tl.load(s_ptr + b)
    root = tl.load(root_ptr + b)
    ds = tl.load(gsc_ptr + b)
    if DOT:
        offs = tl.arange(0, BP)
        dot = tl.sum(tl.load(part_ptr + b.to(tl.int64) * NFB + offs, mask=offs < NFB,
                             other=0.0), axis=0)
        ds = ds - dot / (s * s)
    base, n_b = _entry(ptr_ptr, b, sb, ss, S, RAGGED)
    gbase, _n = _entry(ptr_ptr, b, gb, gs, S, RAGGED)
    xbase, _n = _entry(ptr_ptr, b, xb, xs, S, RAGGED)
    k = tl.where(root > 0, ds, 0.0) / F / tl.maximum(n_b, 1)
    offs_f = j * BF + tl.arange(0, BF)
    fm = offs_f < F
    mean = tl.load(mean_ptr + b.to(tl.int64) * F + offs_f, mask=fm, other=0.0)
    for s0 in range(0, n_b, BS):
        offs_s = s0 + tl.arange(0, BS)
        mask = (offs_s < n_b)[:, None] & fm[None, :]
        G = _tile(g_ptr, gbase, gf, gs, offs_s, offs_f, mask)
        X = _tile(x_ptr, base, sf, ss, offs_s, offs_f, mask)
        if G_OVER_S:
            v = (G + k * (X - mean[None, :])) / s
        else:
            v = G + (k / s) * (X - mean[None, :])
        tl.store(_ptrs(gx_ptr, xbase, xf, xs, offs_s, offs_f),
                 v.to(gx_ptr.dtype.element_ty), mask=mask)
