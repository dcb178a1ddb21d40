"""``@triton.jit`` code of the SPLIT B-ADMM backward: one set spread over NS × DS programs.

The reverse steps of :func:`.kernels.badmm_bwd_kernel` with its tile passes run by B × NS × DS
programs and its vector steps by one program per set, in separate launches (no program waits
for another). Program (b, i, j) owns rows [i·SN, (i+1)·SN) and columns [j·SD, (j+1)·SD) of set
b: pass 2 writes its partial τ (sum over its rows) [B, NS, D], pass 3 its partial σ (sum over
its columns) [B, DS, N], both their (∂α1, ∂ρ) partials [B, T, 2, NS·DS, 2]; the vector steps
combine the partials and run the lognorm / paper adjoints. Reverse step tb:

  rows step (b):        restore iteration tb's vectors; σ = Σ_j partials (written by pass 3 of
                        step tb + 1), paper vector adjoints, C̄ (or log η̄)
  pass 2    (b, i, j):  :func:`.kernels._adjoint_s_step_pass` (or the plan adjoint at T - 1)
  columns step (b):     τ = Σ_i partials, R̄ (or log μ̄)
  pass 3    (b, i, j):  :func:`.kernels._adjoint_p_step_pass`
then :func:`.kernels._init_adjoint_pass` per set. The adjoints L̄, Z̄ live in a (B, N, D) fp32
scratch - the same size as the one-program-per-set kernel's when B ≤ #SMs, where the launcher
uses this schedule - and the per-set vector slots in (B, 7, D) / (9, rows).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .kernels import (_adjoint_p_step_pass, _adjoint_plan_pass, _adjoint_s_step_pass,
                      _init_adjoint_pass, _iter_weights, _restore, _rho_prev, _vec_fill,
                      _vec_lognorm_mix_bwd, _vec_paper_absorb, _vec_paper_update_bwd, _vzero)


@triton.jit
def _sum_partials(part_ptr, dst_ptr, parts, length, BV: tl.constexpr):
    """dst[i] = Σ_s part[s, i] (s < parts)."""
    for i0 in range(0, length, BV):
        offs = i0 + tl.arange(0, BV)
        msk = offs < length
        acc = tl.zeros([BV], dtype=tl.float32)
        for s in range(0, parts):
            acc += tl.load(part_ptr + s * length + offs, mask=msk, other=0.0)
        tl.store(dst_ptr + offs, acc, mask=msk)


@triton.jit
def badmm_split_bwd_rows_step_kernel(
    lq0_ptr, lp0_ptr, w_ptr, hd_ptr, hn_ptr, vd_ptr, vn_ptr, sig_ptr, gwv_ptr,
    N, D, NR, T, tb, DS, u_p0, u_q0,
    HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, QUAD: tl.constexpr, PAPER: tl.constexpr,
    KV: tl.constexpr, BV: tl.constexpr,
):
    """Per set, before pass 2 of reverse step tb: iteration tb's vectors into the set's slots,
    then (tb < T - 1) σ from the [DS, N] partials, the paper vector adjoints, C̄ (σ slot) and
    log q̄0 / log η̄. Writes gwv[b, tb] = (∂κ2, ∂κ3, 0, ∂ρ) of the vector steps so far."""
    b64 = tl.program_id(0).to(tl.int64)
    vd = vd_ptr + b64 * 7 * D
    vn = vn_ptr + b64 * N
    ns = NR
    lp0_b = lp0_ptr + b64 * D
    lq0_b = lq0_ptr + b64 * N
    if tb == T - 1:           # first reverse step: zero the adjoint accumulators
        for j in range(4, 7):
            _vec_fill(vd + j * D, 0.0, D, BV)
            _vec_fill(vn + j * ns, 0.0, N, BV)
    _restore(vd, vn, ns, hd_ptr + (b64 * T + tb) * KV * D, hn_ptr + tb * KV * NR + b64 * N,
             N, D, NR, tb < T - 1, PAPER, BV)
    tl.debug_barrier()
    a1, rho, k2, k3 = _iter_weights(w_ptr, T, tb, QUAD, PAPER)
    gk2 = _vzero(BV)
    gk3 = _vzero(BV)
    grho = _vzero(BV)
    if tb < T - 1:
        _sum_partials(sig_ptr + b64 * DS * N, vn + 3 * ns, DS, N, BV)
        if PAPER:
            dk, dr = _vec_paper_update_bwd(lp0_b, HAS_P0, u_p0, vd + D, vd + 2 * D, vd + 4 * D,
                                           vd + 5 * D, vd + 6 * D, k2, rho, D, BV)
            gk2 += dk
            grho += dr
            dk, dr = _vec_paper_update_bwd(lq0_b, HAS_Q0, u_q0, vn + ns, vn + 2 * ns,
                                           vn + 4 * ns, vn + 5 * ns, vn + 6 * ns, k3, rho, N,
                                           BV)
            gk3 += dk
            grho += dr
        tl.debug_barrier()
        if PAPER:
            _vec_paper_absorb(vn + 3 * ns, vn + 4 * ns, N, BV)
        else:
            gk3 += _vec_lognorm_mix_bwd(lq0_b, HAS_Q0, u_q0, vn, vn + ns, vn + 3 * ns,
                                        vn + 6 * ns, k3, N, BV)
    gwb = gwv_ptr + (b64 * T + tb) * 4
    tl.store(gwb + 0, gk2)
    tl.store(gwb + 1, gk3)
    tl.store(gwb + 2, 0.0)
    tl.store(gwb + 3, grho)


@triton.jit
def badmm_split_bwd_cols_step_kernel(
    lp0_ptr, w_ptr, vd_ptr, tau_ptr, gwv_ptr, D, T, tb, NS, u_p0, HAS_TAU,
    HAS_P0: tl.constexpr, QUAD: tl.constexpr, PAPER: tl.constexpr, BV: tl.constexpr,
):
    """Per set, before pass 3 of reverse step tb: τ from the [NS, D] partials (0 when no pass
    produced one: the last iteration without a plan gradient), then R̄ (τ slot) and log p̄0 /
    log μ̄; adds ∂κ2 to gwv[b, tb, 0]."""
    b64 = tl.program_id(0).to(tl.int64)
    vd = vd_ptr + b64 * 7 * D
    if HAS_TAU:
        _sum_partials(tau_ptr + b64 * NS * D, vd + 3 * D, NS, D, BV)
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


@triton.jit
def _tile_of(N, D, SN, SD):
    """(b, slice ids, rows [n_lo, n_hi), columns [d_lo, d_hi)) of this program."""
    b64 = tl.program_id(0).to(tl.int64)
    si = tl.program_id(1)
    sj = tl.program_id(2)
    n_lo = si * SN
    d_lo = sj * SD
    return b64, si, sj, n_lo, tl.minimum(n_lo + SN, N), d_lo, tl.minimum(d_lo + SD, D)


@triton.jit
def badmm_split_bwd_pass2_kernel(
    x_ptr, sxb, sxn, sxd, lp0_ptr, lq0_ptr, w_ptr, hd_ptr, hn_ptr, vd_ptr, vn_ptr, slb_ptr,
    szb_ptr, gplan_ptr, tau_ptr, gwt_ptr, N, D, NR, T, tb, SN, SD, NS, DS, u_p0, u_q0,
    HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, QUAD: tl.constexpr, PAPER: tl.constexpr,
    KV: tl.constexpr, PLAN: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    """Pass 2 of reverse step tb (PLAN: the plan adjoint of the last iteration instead) over
    this program's tiles; partial τ into tau[b, i, :], (∂α1, ∂ρ) into gwt[b, tb, 0, i·DS + j]."""
    b64, si, sj, n_lo, n_hi, d_lo, d_hi = _tile_of(N, D, SN, SD)
    a1, rho, k2, k3 = _iter_weights(w_ptr, T, tb, QUAD, PAPER)
    xb = x_ptr + b64 * sxb
    lp0_b = lp0_ptr + b64 * D
    lq0_b = lq0_ptr + b64 * N
    hd_b = hd_ptr + b64 * T * KV * D
    hn_b = hn_ptr + b64 * N
    vd = vd_ptr + b64 * 7 * D
    vn = vn_ptr + b64 * N
    slb = slb_ptr + b64 * N * D
    tau = tau_ptr + (b64 * NS + si) * D
    gwt = gwt_ptr + ((b64 * T + tb) * 2 * NS * DS + si * DS + sj) * 2
    if PLAN:
        _adjoint_plan_pass(xb, sxn, sxd, lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b, NR, w_ptr, T, tb,
                           slb, vd, vn, NR, gplan_ptr + b64 * N * D, N, D, a1, rho,
                           n_lo, n_hi, d_lo, d_hi, tau, HAS_P0, HAS_Q0, KV, QUAD, BN, BD)
        tl.store(gwt + 0, 0.0)
        tl.store(gwt + 1, 0.0)
    else:
        da1, dr = _adjoint_s_step_pass(xb, sxn, sxd, lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b, NR,
                                       w_ptr, T, tb, slb, szb_ptr + b64 * N * D, vd, vn, NR, N,
                                       D, a1, rho, n_lo, n_hi, d_lo, d_hi, tau,
                                       HAS_P0, HAS_Q0, KV, QUAD, BN, BD)
        tl.store(gwt + 0, da1)
        tl.store(gwt + 1, dr)


@triton.jit
def badmm_split_bwd_pass3_kernel(
    x_ptr, sxb, sxn, sxd, lp0_ptr, lq0_ptr, w_ptr, hd_ptr, hn_ptr, vd_ptr, vn_ptr, slb_ptr,
    szb_ptr, gx_ptr, gy_ptr, out_ptr, sig_ptr, gwt_ptr, N, D, NR, T, tb, SN, SD, DS, NSD,
    u_p0, u_q0,
    HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, QUAD: tl.constexpr, PAPER: tl.constexpr,
    KV: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    """Pass 3 of reverse step tb over this program's tiles (X̄, L̄, Z̄ in place); partial σ of
    step tb - 1 into sig[b, j, :], (∂α1, ∂ρ) into gwt[b, tb, 1, i·DS + j]."""
    b64, si, sj, n_lo, n_hi, d_lo, d_hi = _tile_of(N, D, SN, SD)
    a1, rho, k2, k3 = _iter_weights(w_ptr, T, tb, QUAD, PAPER)
    gwt = gwt_ptr + ((b64 * T + tb) * 2 * NSD + NSD + si * DS + sj) * 2
    da1, dr = _adjoint_p_step_pass(
        x_ptr + b64 * sxb, sxn, sxd, lp0_ptr + b64 * D, lq0_ptr + b64 * N, u_p0, u_q0,
        hd_ptr + b64 * T * KV * D, hn_ptr + b64 * N, NR, w_ptr, T, tb,
        slb_ptr + b64 * N * D, szb_ptr + b64 * N * D, gx_ptr + b64 * N * D,
        vd_ptr + b64 * 7 * D, vn_ptr + b64 * N, NR, gy_ptr + b64 * D, out_ptr + b64 * D, N, D,
        a1, rho, tl.where(tb == T - 1, 1.0, 0.0), _rho_prev(w_ptr + 4 * T, tb),
        n_lo, n_hi, d_lo, d_hi, sig_ptr + (b64 * DS + sj) * N,
        HAS_P0, HAS_Q0, KV, QUAD, BN, BD)
    tl.store(gwt + 0, da1)
    tl.store(gwt + 1, dr)


@triton.jit
def badmm_split_bwd_init_kernel(
    slb_ptr, vd_ptr, vn_ptr, gp0_ptr, gq0_ptr, N, D, NR,
    HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, PAPER: tl.constexpr,
    BN: tl.constexpr, BD: tl.constexpr,
):
    """Per set: the adjoint of the initial state into log p̄0, log q̄0
    (:func:`.kernels._init_adjoint_pass`)."""
    b64 = tl.program_id(0).to(tl.int64)
    _init_adjoint_pass(slb_ptr + b64 * N * D, vd_ptr + b64 * 7 * D, vn_ptr + b64 * N, NR,
                       gp0_ptr + b64 * D, gq0_ptr + b64 * N, N, D, HAS_P0, HAS_Q0, PAPER, BN, BD)
