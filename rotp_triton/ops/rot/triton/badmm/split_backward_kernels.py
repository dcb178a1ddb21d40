"""``@triton.jit`` code of the SPLIT B-ADMM backward: one set spread over NS × DS programs.

The reverse steps of :func:`.kernels.badmm_bwd_kernel` with its tile passes run by B × NS × DS
programs and its vector steps by one program per set, in separate launches (no program waits
for another). Program (b, i, j) owns rows [i·SN, (i+1)·SN) and columns [j·SD, (j+1)·SD) of set
b: pass 2 writes its partial τ (sum over its rows) [B, NS, D], pass 3 its partial σ (sum over
its columns) [DS, rows], both their (∂α1, ∂ρ) partials [B, T, 2, NS·DS, 2]; the vector steps
combine the partials and run the lognorm / paper adjoints. Reverse step tb:

  rows step (b):        restore iteration tb's vectors; σ = Σ_j partials (written by pass 3 of
                        step tb + 1), paper vector adjoints, C̄ (or log η̄)
  pass 2    (b, i, j):  :func:`.kernels._adjoint_s_step_pass` (or the plan adjoint at T - 1;
                        FUSE: only the part of C̄, added to what pass 3 of step tb + 1 wrote)
  columns step (b):     τ = Σ_i partials, R̄ (or log μ̄)
  pass 3    (b, i, j):  :func:`.kernels._adjoint_p_step_pass` (FUSE: with the L̄', Z̄' part of
                        pass 2 of step tb - 1: :func:`.launch.split_backward_fuses`)
then :func:`.kernels._init_adjoint_pass` per set. Dense or ragged (row slices sized per set
from N_b on the device, as :func:`.split_kernels._tile_program`; empty sets skipped). The
adjoints L̄, Z̄ live in a (rows, D) fp32 scratch (not zeroed: pass 3 of the first step writes
them, :data:`.kernels.ADJ_FIRST`) - the same size as the one-program-per-set
kernel's when B < #SMs, where the launcher uses this schedule - and the per-set vector slots in
(B, 7, D) / (7, rows). Only L̄ is kept: pass 3 (and pass 2 unfused) rebuilds Z̄' from the
state and the R̄ (and, B-Q, C̄) of the later steps, which the columns step records in
(B, T, D) (the rows step in (T, rows)) (:func:`.kernels._rebuilt_zbar`,
:func:`.launch.backward_rebuilds_zbar`).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..common import set_inv_scale
from .kernels import (_adjoint_p_step_pass, _adjoint_plan_pass, _adjoint_s_step_pass,
                      _adjoint_s_step_tiles, _init_adjoint_pass, _iter_weights, _log, _restore,
                      _rho_prev, _set_bounds, _vec_copy, _vec_dot, _vec_fill,
                      _vec_lognorm_mix_bwd, _vec_paper_absorb, _vec_paper_update_bwd, _vzero)
from .split_kernels import _tile_program


@triton.jit
def _sum_partials(part_ptr, stride, dst_ptr, parts, length, BV: tl.constexpr):
    """dst[i] = Σ_s part[s · stride + i] (s < parts)."""
    for i0 in range(0, length, BV):
        offs = i0 + tl.arange(0, BV)
        msk = offs < length
        acc = tl.zeros([BV], dtype=tl.float32)
        for s in range(0, parts):
            acc += tl.load(part_ptr + s * stride + offs, mask=msk, other=0.0)
        tl.store(dst_ptr + offs, acc, mask=msk)


@triton.jit
def _zbar_source(szb_ptr, b64, rs, T, D, ZREBUILD: tl.constexpr):
    """Where passes 2 and 3 take Z̄' from: set b's (T, D) R̄ history (ZREBUILD: rebuilt), else
    its rows of the (rows, D) scratch."""
    if ZREBUILD:
        base = szb_ptr + b64 * T * D
    else:
        base = szb_ptr + rs * D
    return base


@triton.jit(do_not_specialize=["tb"])
def badmm_split_bwd_rows_step_kernel(
    ptr_ptr, lq0_ptr, lp0_ptr, w_ptr, hd_ptr, hn_ptr, vd_ptr, vn_ptr, sig_ptr, gwv_ptr, zc_ptr,
    N, D, NR, T, tb, DS, u_p0,
    RAGGED: tl.constexpr, HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, QUAD: tl.constexpr,
    PAPER: tl.constexpr, KV: tl.constexpr, ZREBUILD: tl.constexpr, BV: tl.constexpr,
):
    """Per set, before pass 2 of reverse step tb: iteration tb's vectors into the set's slots,
    then (tb < T - 1) σ from the [DS, rows] partials, the paper vector adjoints, C̄ (σ slot)
    and log q̄0 / log η̄. Writes gwv[b, tb] = (∂κ2, ∂κ3, 0, ∂ρ) of the vector steps so far
    (zeros for an empty set). ZREBUILD with B-Q: C̄ also into zc[tb, rows of b] (T, rows), the
    history the later steps' passes rebuild Z̄' from (:func:`.kernels._rebuilt_zbar`)."""
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    rs, n_b, _xoff = _set_bounds(b, ptr_ptr, N, 0, 0, RAGGED)
    u_q0 = -_log(tl.maximum(n_b, 1).to(tl.float32))
    vd = vd_ptr + b64 * 7 * D
    vn = vn_ptr + rs
    ns = NR
    lp0_b = lp0_ptr + b64 * D
    lq0_b = lq0_ptr + rs
    a1, rho, k2, k3 = _iter_weights(w_ptr, T, tb, QUAD, PAPER)
    gk2 = _vzero(BV)
    gk3 = _vzero(BV)
    grho = _vzero(BV)
    if n_b > 0:
        if tb == T - 1:           # first reverse step: zero the adjoint accumulators
            for j in range(4, 7):
                _vec_fill(vd + j * D, 0.0, D, BV)
                _vec_fill(vn + j * ns, 0.0, n_b, BV)
        _restore(vd, vn, ns, hd_ptr + (b64 * T + tb) * KV * D, hn_ptr + tb * KV * NR + rs * KV,
                 n_b, D, NR, tb < T - 1, PAPER, KV, BV)
        tl.debug_barrier()
    if tl.where(tb < T - 1, n_b, 0) > 0:          # a non-empty set, not the last iteration
        _sum_partials(sig_ptr + rs, NR, vn + 3 * ns, DS, n_b, BV)
        if PAPER:
            dk, dr = _vec_paper_update_bwd(lp0_b, HAS_P0, u_p0, vd + D, vd + 2 * D, vd + 4 * D,
                                           vd + 5 * D, vd + 6 * D, k2, rho, D, BV)
            gk2 += dk
            grho += dr
            dk, dr = _vec_paper_update_bwd(lq0_b, HAS_Q0, u_q0, vn + ns, vn + 2 * ns,
                                           vn + 4 * ns, vn + 5 * ns, vn + 6 * ns, k3, rho, n_b,
                                           BV)
            gk3 += dk
            grho += dr
        tl.debug_barrier()
        if PAPER:
            _vec_paper_absorb(vn + 3 * ns, vn + 4 * ns, n_b, BV)
        else:
            gk3 += _vec_lognorm_mix_bwd(lq0_b, HAS_Q0, u_q0, vn, vn + ns, vn + 3 * ns,
                                        vn + 6 * ns, k3, n_b, BV)
        if ZREBUILD and QUAD:
            tl.debug_barrier()
            _vec_copy(vn + 3 * ns, zc_ptr + tb * NR + rs, n_b, BV)
    gwb = gwv_ptr + (b64 * T + tb) * 4
    tl.store(gwb + 0, gk2)
    tl.store(gwb + 1, gk3)
    tl.store(gwb + 2, 0.0)
    tl.store(gwb + 3, grho)


@triton.jit(do_not_specialize=["tb", "HAS_TAU"])
def badmm_split_bwd_cols_step_kernel(
    ptr_ptr, lp0_ptr, w_ptr, vd_ptr, tau_ptr, gwv_ptr, zr_ptr, N, D, T, tb, NS, u_p0, HAS_TAU,
    RAGGED: tl.constexpr, HAS_P0: tl.constexpr, QUAD: tl.constexpr, PAPER: tl.constexpr,
    ZREBUILD: tl.constexpr, BV: tl.constexpr,
):
    """Per set, before pass 3 of reverse step tb: τ from the [NS, D] partials (0 when no pass
    produced one: the last iteration without a plan gradient), then R̄ (τ slot) and log p̄0 /
    log μ̄; adds ∂κ2 to gwv[b, tb, 0]. ZREBUILD: R̄ also into zr[b, tb] (B, T, D), the history
    the later steps' passes rebuild Z̄' from (:func:`.kernels._rebuilt_zbar`)."""
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    rs, n_b, _xoff = _set_bounds(b, ptr_ptr, N, 0, 0, RAGGED)
    vd = vd_ptr + b64 * 7 * D
    if n_b > 0:
        if HAS_TAU:
            _sum_partials(tau_ptr + b64 * NS * D, D, vd + 3 * D, NS, D, BV)
        else:
            _vec_fill(vd + 3 * D, 0.0, D, BV)
        tl.debug_barrier()
        if PAPER:
            _vec_paper_absorb(vd + 3 * D, vd + 4 * D, D, BV)
        else:
            a1, rho, k2, k3 = _iter_weights(w_ptr, T, tb, QUAD, PAPER)
            gk2 = _vec_lognorm_mix_bwd(lp0_ptr + b64 * D, HAS_P0, u_p0, vd, vd + D, vd + 3 * D,
                                       vd + 6 * D, k2, D, BV)
            gwb = gwv_ptr + (b64 * T + tb) * 4
            tl.store(gwb, tl.load(gwb) + gk2)
        if ZREBUILD:
            tl.debug_barrier()
            _vec_copy(vd + 3 * D, zr_ptr + (b64 * T + tb) * D, D, BV)


@triton.jit(do_not_specialize=["tb"])
def badmm_split_bwd_pass2_kernel(
    x_ptr, sxb, sxn, sxd, ptr_ptr, lp0_ptr, lq0_ptr, w_ptr, hd_ptr, hn_ptr, vd_ptr, vn_ptr,
    slb_ptr, szb_ptr, zc_ptr, sc_ptr, gplan_ptr, gy_ptr, out_ptr, tau_ptr, gwt_ptr, N, D, NR, T,
    tb, NS, SD, DS, u_p0,
    RAGGED: tl.constexpr, HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, QUAD: tl.constexpr,
    PAPER: tl.constexpr, KV: tl.constexpr, PLAN: tl.constexpr, SCALED: tl.constexpr,
    GPLAN: tl.constexpr, FUSE: tl.constexpr, ZREBUILD: tl.constexpr, BN: tl.constexpr,
    BD: tl.constexpr,
):
    """Pass 2 of reverse step tb (PLAN: the plan adjoint of the last iteration instead) over
    this program's tiles; partial τ into tau[b, i, :], (∂α1, ∂ρ) into gwt[b, tb, 0, i·DS + j].
    ZREBUILD: ``szb_ptr`` is the (B, T, D) R̄ history and ``zc_ptr`` (B-Q) the (T, rows) C̄
    history (Z̄' rebuilt; GPLAN: with a plan gradient, ``gplan_ptr``). FUSE: pass 3 of step
    tb + 1 wrote the L̄', Z̄' part of both, so this pass adds the part of C̄ alone, a sweep over
    x that neither reads nor rebuilds Z̄' (:func:`.kernels._adjoint_s_step_tiles` CB_ONLY)."""
    b64, si, sj, rs, n_b, xb, lp0_b, lq0_b, hd_b, hn_b, n_lo, n_hi, d_lo, d_hi, u_q0 = \
        _tile_program(x_ptr, sxb, sxn, ptr_ptr, lp0_ptr, lq0_ptr, hd_ptr, hn_ptr, N, D, T, NS,
                      SD, KV, RAGGED, BN)
    a1, rho, k2, k3 = _iter_weights(w_ptr, T, tb, QUAD, PAPER)
    isig = set_inv_scale(sc_ptr, b64, SCALED)
    vd = vd_ptr + b64 * 7 * D
    vn = vn_ptr + rs
    slb = slb_ptr + rs * D
    tau = tau_ptr + (b64 * NS + si) * D
    gwt = gwt_ptr + ((b64 * T + tb) * 2 * NS * DS + si * DS + sj) * 2
    if PLAN:
        _adjoint_plan_pass(xb, sxn, sxd, isig, lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b, NR, w_ptr, T,
                           tb, slb, vd, vn, NR, gplan_ptr + rs * D, n_b, D, a1, rho, n_lo, n_hi,
                           d_lo, d_hi, tau, HAS_P0, HAS_Q0, KV, QUAD, False, BN, BD)
        tl.store(gwt + 0, 0.0)
        tl.store(gwt + 1, 0.0)
    elif FUSE:     # (CB_ONLY: L̄', Z̄' are not read - slb stands in for their pointers)
        da1, dr = _adjoint_s_step_tiles(xb, sxn, sxd, isig, lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b,
                                        NR, w_ptr, T, tb, slb, slb, slb, vd, vn, NR, n_b, D, a1,
                                        rho, n_lo, n_hi, d_lo, d_hi, tau, tau, gy_ptr, out_ptr,
                                        gplan_ptr, HAS_P0, HAS_Q0, KV, QUAD, True, False, False,
                                        False, False, BN, BD)
        tl.store(gwt + 0, tl.load(gwt + 0) + da1)
        tl.store(gwt + 1, tl.load(gwt + 1) + dr)
    else:
        szb = _zbar_source(szb_ptr, b64, rs, T, D, ZREBUILD)
        da1, dr = _adjoint_s_step_pass(xb, sxn, sxd, isig, lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b, NR,
                                       w_ptr, T, tb, slb, szb, zc_ptr + rs, vd, vn, NR, n_b,
                                       D, a1, rho, n_lo, n_hi, d_lo, d_hi, tau, gy_ptr + b64 * D,
                                       out_ptr + b64 * D, gplan_ptr + rs * D, HAS_P0, HAS_Q0,
                                       KV, QUAD, ZREBUILD, GPLAN, BN, BD)
        tl.store(gwt + 0, da1)
        tl.store(gwt + 1, dr)


@triton.jit(do_not_specialize=["tb"])
def badmm_split_bwd_pass3_kernel(
    x_ptr, sxb, sxn, sxd, ptr_ptr, lp0_ptr, lq0_ptr, w_ptr, hd_ptr, hn_ptr, vd_ptr, vn_ptr,
    slb_ptr, szb_ptr, zc_ptr, gx_ptr, gy_ptr, out_ptr, sig_ptr, gwt_ptr, sc_ptr, dsp_ptr,
    gplan_ptr, tau_ptr, N, D, NR, T, tb, NS, SD, DS, u_p0,
    RAGGED: tl.constexpr, HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, QUAD: tl.constexpr,
    PAPER: tl.constexpr, KV: tl.constexpr, ADJ: tl.constexpr, PLAN: tl.constexpr,
    FUSE: tl.constexpr, SCALED: tl.constexpr, ZREBUILD: tl.constexpr, BN: tl.constexpr,
    BD: tl.constexpr,
):
    """Pass 3 of reverse step tb over this program's tiles (X̄, L̄, Z̄ in place; ``ADJ``,
    ``PLAN``, ``SCALED``: :func:`.kernels._adjoint_p_step_pass`); partial σ of step tb - 1 into
    sig[j, rows of b], (∂α1, ∂ρ) into gwt[b, tb, 1, i·DS + j]; SCALED, last step (tb = 0):
    the partial Σ X̄ · x / σ_b into dsp[b, i·DS + j]. ZREBUILD: as pass 2 (no Z̄ stored).
    FUSE (tb > 0): also the L̄', Z̄' part of pass 2 of step tb - 1, its partial τ into
    tau[b, i, :] and (∂α1, ∂ρ) into gwt[b, tb - 1, 0, i·DS + j], which that pass 2 adds to."""
    b64, si, sj, rs, n_b, xb, lp0_b, lq0_b, hd_b, hn_b, n_lo, n_hi, d_lo, d_hi, u_q0 = \
        _tile_program(x_ptr, sxb, sxn, ptr_ptr, lp0_ptr, lq0_ptr, hd_ptr, hn_ptr, N, D, T, NS,
                      SD, KV, RAGGED, BN)
    a1, rho, k2, k3 = _iter_weights(w_ptr, T, tb, QUAD, PAPER)
    isig = set_inv_scale(sc_ptr, b64, SCALED)
    NSD = NS * DS
    szb = _zbar_source(szb_ptr, b64, rs, T, D, ZREBUILD)
    gwt = gwt_ptr + ((b64 * T + tb) * 2 * NSD + NSD + si * DS + sj) * 2
    da1, dr, da1u, dru, gxx = _adjoint_p_step_pass(
        xb, sxn, sxd, isig, lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b, NR, w_ptr, T, tb,
        slb_ptr + rs * D, szb, zc_ptr + rs, gx_ptr + rs * D,
        vd_ptr + b64 * 7 * D, vn_ptr + rs, NR, vn_ptr + 3 * NR + rs, gy_ptr + b64 * D,
        out_ptr + b64 * D, n_b, D, a1, rho, tl.where(tb == T - 1, 1.0, 0.0),
        _rho_prev(w_ptr + 4 * T, tb), n_lo, n_hi, d_lo, d_hi, sig_ptr + sj * NR + rs,
        tau_ptr + (b64 * NS + si) * D, gplan_ptr + rs * D, HAS_P0, HAS_Q0, KV, QUAD, ADJ,
        PLAN, FUSE, SCALED, ZREBUILD, BN, BD)
    tl.store(gwt + 0, da1)
    tl.store(gwt + 1, dr)
    if FUSE:
        if tb > 0:     # pass 2 of step tb - 1 adds its C̄ part to these
            gwu = gwt_ptr + (((b64 * T + tb - 1) * 2 * NSD) + si * DS + sj) * 2
            tl.store(gwu + 0, da1u)
            tl.store(gwu + 1, dru)
    if SCALED:
        if tb == 0:
            tl.store(dsp_ptr + b64 * NSD + si * DS + sj, gxx)


@triton.jit
def badmm_split_bwd_init_kernel(
    ptr_ptr, slb_ptr, vd_ptr, vn_ptr, gp0_ptr, gq0_ptr, sc_ptr, dsp_ptr, gy_ptr, out_ptr,
    ds_ptr, N, D, NR, NSD,
    RAGGED: tl.constexpr, HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, PAPER: tl.constexpr,
    SCALED: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
):
    """Per set: the adjoint of the initial state into log p̄0, log q̄0
    (:func:`.kernels._init_adjoint_pass`); SCALED: ds_b = (Σ_d ȳ_d y_d - Σ X̄ · x / σ_b) / σ_b
    from pass 3's NSD partials (:func:`.kernels.badmm_bwd_kernel`)."""
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    rs, n_b, _xoff = _set_bounds(b, ptr_ptr, N, 0, 0, RAGGED)
    if n_b > 0:                     # an empty set keeps its zero gradients
        _init_adjoint_pass(slb_ptr + rs * D, vd_ptr + b64 * 7 * D, vn_ptr + rs, NR,
                           gp0_ptr + b64 * D, gq0_ptr + rs, n_b, D, HAS_P0, HAS_Q0, PAPER,
                           False, BN, BD)
        if SCALED:
            acc = tl.zeros([BV], dtype=tl.float32)
            for j0 in range(0, NSD, BV):
                offs = j0 + tl.arange(0, BV)
                acc += tl.load(dsp_ptr + b64 * NSD + offs, mask=offs < NSD, other=0.0)
            gxx = tl.sum(acc, axis=0)
            gyy = _vec_dot(gy_ptr + b64 * D, out_ptr + b64 * D, D, BV)
            tl.store(ds_ptr + b, (gyy - gxx) * set_inv_scale(sc_ptr, b64, SCALED))
