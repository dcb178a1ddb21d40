"""Kernels of the weight table: table[i, t] = base[i, t] + scale[i] · softplus(raw_i[t])
for the learnable rows i (``ROTWeights``: a softplus of a free parameter, rescaled and
floored), base[i, t] for the fixed ones, and the gradient of the raw parameters.

One program does the whole (6, T) table (T is the number of unrolled modules, a handful): the
point is one launch instead of ~3 host ops per learnable weight (PERF.md, "Host front end").
A row whose parameter is shared by the T modules (``per_iter_params=False``, raw of shape (1,))
reads raw[0] for every t and its gradient is the sum over t.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _softplus(r):
    # log1p(e^r) to a few ulps without log1p (not in every triton's core language):
    # log(w) · u / (w - 1) with w = 1 + u rounded cancels the rounding of w (Goldberg's
    # trick); u where w rounds to 1. Above 20, softplus(r) = r: torch's default threshold.
    u = tl.exp(tl.minimum(r, 20.0))
    w = 1.0 + u
    d = w - 1.0
    lp = tl.where(d == 0.0, u, tl.log(w) * (u / tl.where(d == 0.0, 1.0, d)))
    return tl.where(r > 20.0, r, lp)


@triton.jit
def _table_row(out_ptr, base_ptr, scale_ptr, raw_ptr, i: tl.constexpr, LEARN: tl.constexpr,
               SHARED: tl.constexpr, T, BLOCK_T: tl.constexpr):
    t = tl.arange(0, BLOCK_T)                                              # [BT]
    m = t < T
    v = tl.load(base_ptr + i * T + t, mask=m, other=0.0)
    if LEARN:
        if SHARED:
            r = tl.load(raw_ptr + t * 0, mask=m, other=0.0)                # raw[0] for every t
        else:
            r = tl.load(raw_ptr + t, mask=m, other=0.0)
        v = v + tl.load(scale_ptr + i) * _softplus(r.to(tl.float32))
    tl.store(out_ptr + i * T + t, v, mask=m)


@triton.jit
def table_fwd_kernel(out_ptr, base_ptr, scale_ptr, r0, r1, r2, r3, r4, r5, T,
                     L0: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr,
                     L4: tl.constexpr, L5: tl.constexpr, SHARED: tl.constexpr,
                     BLOCK_T: tl.constexpr):
    """out (6, T) fp32 contiguous; base (6, T), scale (6,) fp32; r_i the raw parameter of row
    i where L_i (any pointer otherwise, never read)."""
    _table_row(out_ptr, base_ptr, scale_ptr, r0, 0, L0, SHARED, T, BLOCK_T)
    _table_row(out_ptr, base_ptr, scale_ptr, r1, 1, L1, SHARED, T, BLOCK_T)
    _table_row(out_ptr, base_ptr, scale_ptr, r2, 2, L2, SHARED, T, BLOCK_T)
    _table_row(out_ptr, base_ptr, scale_ptr, r3, 3, L3, SHARED, T, BLOCK_T)
    _table_row(out_ptr, base_ptr, scale_ptr, r4, 4, L4, SHARED, T, BLOCK_T)
    _table_row(out_ptr, base_ptr, scale_ptr, r5, 5, L5, SHARED, T, BLOCK_T)


@triton.jit
def _grad_row(gout_ptr, g_ptr, sg0, sg1, scale_ptr, raw_ptr, i: tl.constexpr, k,
              LEARN: tl.constexpr, SHARED: tl.constexpr, T, BLOCK_T: tl.constexpr):
    if LEARN:
        t = tl.arange(0, BLOCK_T)                                          # [BT]
        m = t < T
        g = tl.load(g_ptr + i * sg0 + t * sg1, mask=m, other=0.0).to(tl.float32)
        if SHARED:
            r = tl.load(raw_ptr + t * 0, mask=m, other=0.0).to(tl.float32)
        else:
            r = tl.load(raw_ptr + t, mask=m, other=0.0).to(tl.float32)
        # d softplus(r) / dr = sigmoid(r) (= 1 above the threshold, as torch's backward)
        sig = tl.where(r > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-r)))
        d = tl.where(m, g * tl.load(scale_ptr + i) * sig, 0.0)
        if SHARED:
            tl.store(gout_ptr + k * T, tl.sum(d, axis=0))
        else:
            tl.store(gout_ptr + k * T + t, d, mask=m)


@triton.jit
def table_bwd_kernel(gout_ptr, g_ptr, sg0, sg1, scale_ptr, r0, r1, r2, r3, r4, r5, T,
                     K0, K1, K2, K3, K4, K5,
                     L0: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr,
                     L4: tl.constexpr, L5: tl.constexpr, SHARED: tl.constexpr,
                     BLOCK_T: tl.constexpr):
    """gout (n_learned, T) fp32: row K_i holds d/d raw_i (in column 0 for a SHARED raw);
    g (6, T) the table's gradient with strides (sg0, sg1)."""
    _grad_row(gout_ptr, g_ptr, sg0, sg1, scale_ptr, r0, 0, K0, L0, SHARED, T, BLOCK_T)
    _grad_row(gout_ptr, g_ptr, sg0, sg1, scale_ptr, r1, 1, K1, L1, SHARED, T, BLOCK_T)
    _grad_row(gout_ptr, g_ptr, sg0, sg1, scale_ptr, r2, 2, K2, L2, SHARED, T, BLOCK_T)
    _grad_row(gout_ptr, g_ptr, sg0, sg1, scale_ptr, r3, 3, K3, L3, SHARED, T, BLOCK_T)
    _grad_row(gout_ptr, g_ptr, sg0, sg1, scale_ptr, r4, 4, K4, L4, SHARED, T, BLOCK_T)
    _grad_row(gout_ptr, g_ptr, sg0, sg1, scale_ptr, r5, 5, K5, L5, SHARED, T, BLOCK_T)
