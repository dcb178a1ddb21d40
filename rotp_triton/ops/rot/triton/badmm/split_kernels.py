"""``@triton.jit`` code of the SPLIT B-ADMM forward: one set spread over NS × DS programs.

Same iterations, same vector history (hd, hn) as :func:`.kernels.badmm_fwd_kernel` (so the
backward is unchanged), for batches whose sets are too few to fill the GPU with one program
per set (W1: 50 sets of 500 × 100; W5: 128 ragged sets of 20-500 rows, where the largest set
sets the time). Program (b, i, j) owns rows [i·SN_b, (i+1)·SN_b) (SN_b from N_b on the device:
ragged sets need no host sync) and columns [j·SD, (j+1)·SD) of set b and either rebuilds the
state of its tiles from x and the history (``REPLAY``: :func:`.kernels._replay_state`, no
N × D scratch) or streams it through a (rows, D) fp32 pair (log S, Z) in the deferred form of
:func:`.kernels._load_state`, whose row and column shifts are the history's C, log η of t - 1.

No program waits for another (issue 17: the interpreter runs programs one at a time). A
reduction that crosses programs is split in two launches: the tile programs write partial
online-LSE pairs (max, scaled sum) of their slice, and the NEXT launch's programs each combine
the partials of their set and run the O(N + D) vector step themselves before their tiles
(:func:`_vector_step`): each needs the normaliser of the whole vector but writes the history
only for its own rows or columns, each slot once, from partials and slots of t - 1 (no in-place
update), so programs that share rows write identical values. One iteration t < T - 1 is two
launches:

  column LSE (b, i, j): (t > 0) row step of t - 1: C, log η -> hn[t - 1];
                        partial R over rows i·SN.. of Y_t               -> pm, pl [B, NS, D]
                        (streaming: launched after a tile init of log p0 q0ᵀ, Z = 0)
  row LSE    (b, i, j): column step of t: R_t, log μ_t (exact: lognorm mix; paper: eqs. 26-28
                        of t - 1) -> hd[b, t];
                        partial C over columns j·SD.. of Y2_t            -> qm, ql [DS, rows]
                        (streaming: and the state Y2, Z + ρ P in place)
and the last iteration is its column LSE with pooling, the column step of T - 1 as a launch of
its own (one program per set, writing y) and, with ``return_plan``, the plan launch: W1 at
T = 4 takes 9 launches with the weight table's, 15 when the vector steps had launches of their
own. The redundant vector step costs each program O(NS·D + DS·N_b) loads of L2-resident
partials. A CUDA graph (or torch.compile's) hides the launch count.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..common import set_inv_scale
from .kernels import (_exp, _finite, _iter_weights, _load_prior, _load_x, _log, _lse_add,
                      _lse_total, _p_step_y, _replay_state, _rho_prev, _row_lse_add, _s_step_y,
                      _hist_shift, _set_bounds, _tile_ptrs)


@triton.jit
def _tile_program(x_ptr, sxb, sxn, ptr_ptr, lp0_ptr, lq0_ptr, hd_ptr, hn_ptr, N, D, T, NS, SD,
                  KV: tl.constexpr, RAGGED: tl.constexpr, BN: tl.constexpr):
    """(b, slice ids, first row rs in the (rows, ·) layouts, N_b, set pointers, row and column
    ranges, uniform log q0) of this program. Row slices are NS per set of a multiple of BN rows
    each (computed here from N_b: a ragged set's size is only known on the device); slices
    past N_b are empty (their partials are neutral: max -inf, sum 0)."""
    b = tl.program_id(0)
    si = tl.program_id(1)
    sj = tl.program_id(2)
    b64 = b.to(tl.int64)
    rs, n_b, xoff = _set_bounds(b, ptr_ptr, N, sxb, sxn, RAGGED)
    SN = tl.cdiv(tl.cdiv(n_b, NS), BN) * BN
    n_lo = si * SN
    d_lo = sj * SD
    return (b64, si, sj, rs, n_b, x_ptr + xoff, lp0_ptr + b64 * D, lq0_ptr + rs,
            hd_ptr + b64 * T * KV * D, hn_ptr + rs * KV,
            n_lo, tl.minimum(n_lo + SN, n_b), d_lo, tl.minimum(d_lo + SD, D),
            -_log(tl.maximum(n_b, 1).to(tl.float32)))


@triton.jit
def _tile_state(X, offs_n, offs_d, mask, t, lp0_b, lq0_b, n_b, D, u_p0, u_q0, hd_b, hn_b, NR,
                w_ptr, T, sl, sz, o, HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr,
                QUAD: tl.constexpr, KV: tl.constexpr, REPLAY: tl.constexpr):
    """(log S_t, Z_t) of a [BN, BD] tile: replayed from x and the history, or read from the
    streamed scratch (Y2, Z + ρ P of iteration t - 1; log S = Y2 + (log η - C)_{t-1},
    Z = (Z + ρ P) - ρ_{t-1} S; the initial state as is at t = 0)."""
    if REPLAY:
        L, Zt = _replay_state(X, offs_n, offs_d, mask, t, lp0_b, lq0_b, n_b, D, u_p0, u_q0,
                              hd_b, hn_b, NR, w_ptr, T, HAS_P0, HAS_Q0, QUAD, KV)
    else:
        nm = offs_n < n_b
        hn_p = hn_b + (t - 1 + (t == 0)) * KV * NR                      # iteration t - 1
        shift = _hist_shift(hn_p, offs_n, nm, KV)                        # log η - C
        shift = tl.where(t > 0, shift, 0.0)      # (hn[0] is not written yet at t = 0)
        L = tl.where(mask, tl.load(sl + o, mask=mask, other=0.0) + shift[:, None], 0.0)
        Zt = tl.load(sz + o, mask=mask, other=0.0) - _rho_prev(w_ptr + 4 * T, t) * _exp(L)
    return L, Zt


@triton.jit
def badmm_split_init_state_kernel(
    ptr_ptr, lp0_ptr, lq0_ptr, sl_ptr, sz_ptr, N, D, NS, SD, u_p0,
    RAGGED: tl.constexpr, HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, BN: tl.constexpr,
    BD: tl.constexpr,
):
    """Streaming: log S_0 = log p0 + log q0, Z_0 = 0 on this program's tiles."""
    b64, si, sj, rs, n_b, xb, lp0_b, lq0_b, hd_b, hn_b, n_lo, n_hi, d_lo, d_hi, u_q0 = \
        _tile_program(sl_ptr, 0, 0, ptr_ptr, lp0_ptr, lq0_ptr, sl_ptr, sl_ptr, N, D, 1, NS,
                      SD, 1, RAGGED, BN)
    sl = sl_ptr + rs * D
    sz = sz_ptr + rs * D
    for n0 in range(n_lo, n_hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        lq = _load_prior(lq0_b, offs_n, n_b, u_q0, HAS_Q0)                           # [BN]
        for d0 in range(d_lo, d_hi, BD):
            offs_d = d0 + tl.arange(0, BD)
            mask = (offs_n < n_hi)[:, None] & (offs_d < D)[None, :]
            lp = _load_prior(lp0_b, offs_d, D, u_p0, HAS_P0)                         # [BD]
            o = _tile_ptrs(offs_n, offs_d, D, 1)
            tl.store(sl + o, lq[:, None] + lp[None, :], mask=mask)
            tl.store(sz + o, tl.zeros([BN, BD], dtype=tl.float32), mask=mask)


@triton.jit(do_not_specialize=["t"])
def badmm_split_column_lse_kernel(
    x_ptr, sxb, sxn, sxd, ptr_ptr, lp0_ptr, lq0_ptr, w_ptr, hd_ptr, hn_ptr, sl_ptr, sz_ptr,
    sc_ptr, qm_ptr, ql_ptr, pm_ptr, pl_ptr, pa_ptr, N, D, NR, T, t, NS, SD, DS, u_p0,
    RAGGED: tl.constexpr, HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, QUAD: tl.constexpr,
    PAPER: tl.constexpr, KV: tl.constexpr, REPLAY: tl.constexpr, POOL: tl.constexpr,
    SCALED: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    """Partial R of iteration t over this program's rows: for each of its columns the online
    LSE pair (m, l) of Y_t = log S_t + G_t/ρ_t, and with POOL Σ_n exp(Y - m) X. Writes
    [B, NS, D] partials (SN, SD multiples of BN, BD: a tile never crosses a slice). For t > 0
    it first runs the row step of t - 1 (:func:`_row_step`, from the [DS, rows] partials).
    SCALED: x read as x / σ_b (:func:`.kernels.badmm_fwd_kernel`), as in every tile kernel
    here; the pooled partials are those of x / σ_b."""
    b64, si, sj, rs, n_b, xb, lp0_b, lq0_b, hd_b, hn_b, n_lo, n_hi, d_lo, d_hi, u_q0 = \
        _tile_program(x_ptr, sxb, sxn, ptr_ptr, lp0_ptr, lq0_ptr, hd_ptr, hn_ptr, N, D, T, NS,
                      SD, KV, RAGGED, BN)
    isig = set_inv_scale(sc_ptr, b64, SCALED)
    if t > 0:
        if n_lo < n_hi:                     # (an empty slice or set has no rows to write)
            _row_step(rs, n_b, lq0_ptr, w_ptr, hn_ptr, qm_ptr, ql_ptr, NR, T, t - 1, DS,
                      n_lo, n_hi, HAS_Q0, QUAD, PAPER, KV, BD)
    a1, rho, _k2, _k3 = _iter_weights(w_ptr, T, t, QUAD, False)
    sl = sl_ptr + rs * D
    sz = sz_ptr + rs * D
    part = (b64 * NS + si) * D
    for d0 in range(d_lo, d_hi, BD):
        offs_d = d0 + tl.arange(0, BD)
        dm = offs_d < D
        m = tl.full([BD], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BD], dtype=tl.float32)
        acc = tl.zeros([BD], dtype=tl.float32)
        for n0 in range(n_lo, n_hi, BN):
            offs_n = n0 + tl.arange(0, BN)
            mask = (offs_n < n_hi)[:, None] & dm[None, :]
            X = _load_x(xb, offs_n, offs_d, sxn, sxd, mask, isig)                    # [BN, BD]
            o = _tile_ptrs(offs_n, offs_d, D, 1)
            L, Zt = _tile_state(X, offs_n, offs_d, mask, t, lp0_b, lq0_b, n_b, D, u_p0, u_q0,
                                hd_b, hn_b, NR, w_ptr, T, sl, sz, o, HAS_P0, HAS_Q0, QUAD, KV,
                                REPLAY)
            y, g, s = _p_step_y(X, L, Zt, a1, rho, QUAD)
            y = tl.where(mask, y, float("-inf"))
            m_new = tl.maximum(m, tl.max(y, axis=0))
            ms = _finite(m_new)
            alpha = _exp(m - ms)
            e = _exp(y - ms[None, :])
            l = l * alpha + tl.sum(e, axis=0)
            if POOL:
                acc = acc * alpha + tl.sum(e * X, axis=0)
            m = m_new
        tl.store(pm_ptr + part + offs_d, m, mask=dm)
        tl.store(pl_ptr + part + offs_d, l, mask=dm)
        if POOL:
            tl.store(pa_ptr + part + offs_d, acc, mask=dm)


@triton.jit
def _combine(pm_b, pl_b, pa_b, pstride, P, offs, msk, POOL: tl.constexpr, BV: tl.constexpr):
    """LSE of P partial online-LSE pairs (m, l) at pm_b/pl_b + s·pstride + offs, in one pass
    (and with POOL the pooled value Σ_s acc_s e^(m_s - M) / L)."""
    m = tl.full([BV], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BV], dtype=tl.float32)
    acc = tl.zeros([BV], dtype=tl.float32)
    for s in range(0, P):
        mv = tl.load(pm_b + s * pstride + offs, mask=msk, other=float("-inf"))
        m_new = tl.maximum(m, mv)
        ms = _finite(m_new)
        a = _exp(m - ms)
        c = _exp(mv - ms)
        l = l * a + tl.load(pl_b + s * pstride + offs, mask=msk, other=0.0) * c
        if POOL:
            acc = acc * a + tl.load(pa_b + s * pstride + offs, mask=msk, other=0.0) * c
        m = m_new
    l = tl.where(msk, l, 1.0)
    return m + _log(l), acc / l


@triton.jit
def _vector_step(pm_b, pl_b, pa_b, pstride, P, h_t, S, length, lo, hi, prior_ptr,
                 HAS: tl.constexpr, uval, k, k_p, rho_p, t, y_b, ysig, PAPER: tl.constexpr,
                 KV: tl.constexpr, POOL: tl.constexpr, BV: tl.constexpr):
    """One side's vector step of iteration t, for the entries [lo, hi) of a vector of
    ``length``: slot 0 of the history block h_t (S entries of KV slots each, entry i's at
    h_t + i·KV) gets the LSE combined from the P partials (R_t or C_t; with POOL y gets the
    pooled output times ``ysig``), slot 1 the iteration's marginal - exact: lognorm(κ log
    prior + (1 - κ) LSE); paper: the vector state of eqs. 26-28 advanced from iteration t - 1
    (κ_p, ρ_p; the prior and z = 0 at t = 0) - and (paper) slot 2 its z. The normaliser
    needs the whole vector (a first pass over ``length``), the writes only [lo, hi): the tile
    programs of a set each
    run this for their own rows or columns, concurrently, so every slot is written once, from
    partials and slots of t - 1 only (no in-place update), and the values of [lo, hi) are
    identical whichever program writes them."""
    lse = 0.0
    if PAPER:
        h_p = h_t - KV * S
        if t > 0:
            mv = tl.full([BV], float("-inf"), dtype=tl.float32)
            lv = tl.zeros([BV], dtype=tl.float32)
            for i0 in range(0, length, BV):
                offs = i0 + tl.arange(0, BV)
                msk = offs < length
                u = (1 - k_p) * (tl.load(h_p + offs * KV + 1, mask=msk, other=0.0)
                                 - tl.load(h_p + offs * KV + 2, mask=msk, other=0.0) / rho_p) \
                    + k_p * _load_prior(prior_ptr, offs, length, uval, HAS)
                mv, lv = _lse_add(mv, lv, tl.where(msk, u, float("-inf")))
            lse = _lse_total(mv, lv)
        for i0 in range(lo, hi, BV):
            offs = i0 + tl.arange(0, BV)
            msk = offs < hi
            r, pooled = _combine(pm_b, pl_b, pa_b, pstride, P, offs, msk, POOL, BV)
            prior = _load_prior(prior_ptr, offs, length, uval, HAS)
            if t > 0:
                lmu = tl.load(h_p + offs * KV + 1, mask=msk, other=0.0)
                z1 = tl.load(h_p + offs * KV + 2, mask=msk, other=0.0)
                lmu_new = (1 - k_p) * (lmu - z1 / rho_p) + k_p * prior - lse
                z1_new = z1 + rho_p * (_exp(lmu_new) - _exp(lmu))
            else:
                lmu_new = prior
                z1_new = tl.zeros([BV], dtype=tl.float32)
            tl.store(h_t + offs * KV, r, mask=msk)
            tl.store(h_t + offs * KV + 1, lmu_new, mask=msk)
            tl.store(h_t + offs * KV + 2, z1_new, mask=msk)
            if POOL:
                tl.store(y_b + offs, pooled * ysig, mask=msk)
    else:
        mv = tl.full([BV], float("-inf"), dtype=tl.float32)
        lv = tl.zeros([BV], dtype=tl.float32)
        for i0 in range(0, length, BV):
            offs = i0 + tl.arange(0, BV)
            msk = offs < length
            r, pooled = _combine(pm_b, pl_b, pa_b, pstride, P, offs, msk, POOL, BV)
            own = msk & (offs >= lo) & (offs < hi)
            tl.store(h_t + offs * KV, r, mask=own)  # read back below, by the same thread
            if POOL:
                tl.store(y_b + offs, pooled * ysig, mask=own)
            u = k * _load_prior(prior_ptr, offs, length, uval, HAS) + (1 - k) * r
            mv, lv = _lse_add(mv, lv, tl.where(msk, u, float("-inf")))
        lse = _lse_total(mv, lv)
        tl.debug_barrier()
        for i0 in range(lo, hi, BV):
            offs = i0 + tl.arange(0, BV)
            msk = offs < hi
            r = tl.load(h_t + offs * KV, mask=msk, other=0.0)
            lmu = k * _load_prior(prior_ptr, offs, length, uval, HAS) + (1 - k) * r - lse
            tl.store(h_t + offs * KV + 1, lmu, mask=msk)
    tl.debug_barrier()


@triton.jit
def _column_step(b64, lp0_ptr, w_ptr, hd_ptr, pm_ptr, pl_ptr, pa_ptr, y_ptr, ysig, D, T, t,
                 NS, d_lo, d_hi, u_p0, HAS_P0: tl.constexpr, QUAD: tl.constexpr,
                 PAPER: tl.constexpr, KV: tl.constexpr, POOL: tl.constexpr, BV: tl.constexpr):
    """Set b, iteration t, columns [d_lo, d_hi): R_t from the NS column partials [B, NS, D]
    (and y times ``ysig`` with POOL) into hd[b, t, 0], log μ_t into hd[b, t, 1]
    (:func:`_vector_step`; exact: lognorm(κ2 log p0 + (1 - κ2) R_t), paper: eqs. 26-28 advanced
    from hd[b, t - 1])."""
    _a1, _rho, k2, _k3 = _iter_weights(w_ptr, T, t, QUAD, PAPER)
    _a1, rho_p, k2_p, _k3 = _iter_weights(w_ptr, T, tl.maximum(t - 1, 0), QUAD, PAPER)
    part = b64 * NS * D
    _vector_step(pm_ptr + part, pl_ptr + part, pa_ptr + part, D, NS,
                 hd_ptr + (b64 * T + t) * KV * D, D, D, d_lo, d_hi, lp0_ptr + b64 * D, HAS_P0,
                 u_p0, k2, k2_p, rho_p, t, y_ptr + b64 * D, ysig, PAPER, KV, POOL, BV)


@triton.jit
def _row_step(rs, n_b, lq0_ptr, w_ptr, hn_ptr, qm_ptr, ql_ptr, NR, T, t, DS, n_lo, n_hi,
              HAS_Q0: tl.constexpr, QUAD: tl.constexpr, PAPER: tl.constexpr, KV: tl.constexpr,
              BV: tl.constexpr):
    """Set b (rows rs.. of the (·, rows) layouts), iteration t, its rows [n_lo, n_hi): C_t from
    the DS row partials [DS, rows] into hn[t, 0], log η_t into hn[t, 1]
    (:func:`_vector_step`; exact: lognorm(κ3 log q0 + (1 - κ3) C_t), paper: advanced from
    hn[t - 1])."""
    _a1, _rho, _k2, k3 = _iter_weights(w_ptr, T, t, QUAD, PAPER)
    _a1, rho_p, _k2, k3_p = _iter_weights(w_ptr, T, tl.maximum(t - 1, 0), QUAD, PAPER)
    _vector_step(qm_ptr + rs, ql_ptr + rs, ql_ptr + rs, NR, DS, hn_ptr + (t * NR + rs) * KV, NR,
                 n_b, n_lo, n_hi, lq0_ptr + rs, HAS_Q0, -_log(tl.maximum(n_b, 1).to(tl.float32)),
                 k3, k3_p, rho_p, t, ql_ptr, 1.0, PAPER, KV, False, BV)


@triton.jit(do_not_specialize=["t"])
def badmm_split_column_step_kernel(
    ptr_ptr, lp0_ptr, w_ptr, hd_ptr, pm_ptr, pl_ptr, pa_ptr, sc_ptr, y_ptr, N, D, T, t, NS,
    u_p0,
    RAGGED: tl.constexpr, HAS_P0: tl.constexpr, QUAD: tl.constexpr, PAPER: tl.constexpr,
    KV: tl.constexpr, POOL: tl.constexpr, SCALED: tl.constexpr, BV: tl.constexpr,
):
    """Per set b: :func:`_column_step` of the last iteration (with POOL: y; SCALED: σ_b times
    the pool of x / σ_b) - the one vector step that no later tile launch absorbs."""
    b64 = tl.program_id(0).to(tl.int64)
    rs, n_b, _xoff = _set_bounds(tl.program_id(0), ptr_ptr, N, 0, 0, RAGGED)
    if n_b > 0:                             # an empty set keeps y = 0 and no history
        _column_step(b64, lp0_ptr, w_ptr, hd_ptr, pm_ptr, pl_ptr, pa_ptr, y_ptr,
                     1.0 / set_inv_scale(sc_ptr, b64, SCALED), D, T, t, NS, 0, D, u_p0, HAS_P0,
                     QUAD, PAPER, KV, POOL, BV)


@triton.jit(do_not_specialize=["t"])
def badmm_split_row_lse_kernel(
    x_ptr, sxb, sxn, sxd, ptr_ptr, lp0_ptr, lq0_ptr, w_ptr, hd_ptr, hn_ptr, sl_ptr, sz_ptr,
    sc_ptr, pm_ptr, pl_ptr, qm_ptr, ql_ptr, N, D, NR, T, t, NS, SD, u_p0,
    RAGGED: tl.constexpr, HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, QUAD: tl.constexpr,
    PAPER: tl.constexpr, KV: tl.constexpr, REPLAY: tl.constexpr, SCALED: tl.constexpr,
    BN: tl.constexpr, BD: tl.constexpr,
):
    """Partial C of iteration t over this program's columns: first the column step of t
    (:func:`_column_step`, from the [B, NS, D] partials), then log P = Y + (log μ - R)_d, the
    S-step input Y2, and for each of its rows the online LSE pair over its columns. Writes
    [DS, rows] partials."""
    b64, si, sj, rs, n_b, xb, lp0_b, lq0_b, hd_b, hn_b, n_lo, n_hi, d_lo, d_hi, u_q0 = \
        _tile_program(x_ptr, sxb, sxn, ptr_ptr, lp0_ptr, lq0_ptr, hd_ptr, hn_ptr, N, D, T, NS,
                      SD, KV, RAGGED, BN)
    isig = set_inv_scale(sc_ptr, b64, SCALED)
    if n_lo < n_hi:
        _column_step(b64, lp0_ptr, w_ptr, hd_ptr, pm_ptr, pl_ptr, pl_ptr, pl_ptr, 1.0, D, T, t,
                     NS, d_lo, d_hi, u_p0, HAS_P0, QUAD, PAPER, KV, False, BD)
    a1, rho, _k2, _k3 = _iter_weights(w_ptr, T, t, QUAD, False)
    hd_t = hd_b + t * KV * D
    sl = sl_ptr + rs * D
    sz = sz_ptr + rs * D
    part = sj * NR + rs                                          # [DS, rows] partials
    for n0 in range(n_lo, n_hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        nm = offs_n < n_hi
        m = tl.full([BN], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BN], dtype=tl.float32)
        for d0 in range(d_lo, d_hi, BD):
            offs_d = d0 + tl.arange(0, BD)
            dm = offs_d < D
            mask = nm[:, None] & dm[None, :]
            X = _load_x(xb, offs_n, offs_d, sxn, sxd, mask, isig)                    # [BN, BD]
            o = _tile_ptrs(offs_n, offs_d, D, 1)
            L, Zt = _tile_state(X, offs_n, offs_d, mask, t, lp0_b, lq0_b, n_b, D, u_p0, u_q0,
                                hd_b, hn_b, NR, w_ptr, T, sl, sz, o, HAS_P0, HAS_Q0, QUAD, KV,
                                REPLAY)
            r = tl.load(hd_t + offs_d * KV, mask=dm, other=0.0)
            lmu = tl.load(hd_t + offs_d * KV + 1, mask=dm, other=0.0)
            y, g, s = _p_step_y(X, L, Zt, a1, rho, QUAD)
            lp = y + (lmu - r)[None, :]                                              # log P
            p = _exp(lp)
            y2 = _s_step_y(lp, p, Zt, a1, rho, QUAD)
            m, l = _row_lse_add(m, l, tl.where(mask, y2, float("-inf")))
            if not REPLAY:      # the deferred state of iteration t + 1
                tl.store(sl + o, y2, mask=mask)
                tl.store(sz + o, Zt + rho * p, mask=mask)
        tl.store(qm_ptr + part + offs_n, m, mask=nm)
        tl.store(ql_ptr + part + offs_n, l, mask=nm)


@triton.jit
def badmm_split_plan_kernel(
    x_ptr, sxb, sxn, sxd, ptr_ptr, lp0_ptr, lq0_ptr, w_ptr, hd_ptr, hn_ptr, sl_ptr, sz_ptr,
    sc_ptr, plan_ptr, N, D, NR, T, NS, SD, u_p0,
    RAGGED: tl.constexpr, HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, QUAD: tl.constexpr,
    KV: tl.constexpr, REPLAY: tl.constexpr, SCALED: tl.constexpr, BN: tl.constexpr,
    BD: tl.constexpr,
):
    """P = exp(Y + log μ - R) of the last iteration for this program's tiles, in the plan's
    contiguous (rows, D) layout."""
    b64, si, sj, rs, n_b, xb, lp0_b, lq0_b, hd_b, hn_b, n_lo, n_hi, d_lo, d_hi, u_q0 = \
        _tile_program(x_ptr, sxb, sxn, ptr_ptr, lp0_ptr, lq0_ptr, hd_ptr, hn_ptr, N, D, T, NS,
                      SD, KV, RAGGED, BN)
    isig = set_inv_scale(sc_ptr, b64, SCALED)
    t = T - 1
    a1, rho, _k2, _k3 = _iter_weights(w_ptr, T, t, QUAD, False)
    hd_t = hd_b + t * KV * D
    plan_b = plan_ptr + rs * D
    sl = sl_ptr + rs * D
    sz = sz_ptr + rs * D
    for n0 in range(n_lo, n_hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        nm = offs_n < n_hi
        for d0 in range(d_lo, d_hi, BD):
            offs_d = d0 + tl.arange(0, BD)
            dm = offs_d < D
            mask = nm[:, None] & dm[None, :]
            X = _load_x(xb, offs_n, offs_d, sxn, sxd, mask, isig)                    # [BN, BD]
            o = _tile_ptrs(offs_n, offs_d, D, 1)
            L, Zt = _tile_state(X, offs_n, offs_d, mask, t, lp0_b, lq0_b, n_b, D, u_p0, u_q0,
                                hd_b, hn_b, NR, w_ptr, T, sl, sz, o, HAS_P0, HAS_Q0, QUAD, KV,
                                REPLAY)
            r = tl.load(hd_t + offs_d * KV, mask=dm, other=0.0)
            lmu = tl.load(hd_t + offs_d * KV + 1, mask=dm, other=0.0)
            y, g, s = _p_step_y(X, L, Zt, a1, rho, QUAD)
            p = _exp(y + (lmu - r)[None, :])
            tl.store(plan_b + o, p.to(plan_ptr.dtype.element_ty), mask=mask)
