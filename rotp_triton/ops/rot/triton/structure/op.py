"""Triton kernels for ROT pooling with the structure term (α0 > 0): B-E, B-Q and proximal S.

Every iteration needs Σ1 M Σ2 (paper layout; ``Σ2 m Σ1`` here, rows = samples) for M = S or P.
Per set the larger of Σ1 (D×D) / Σ2 (N×N) is never formed (DESIGN §2):

    D <= N:  out = xt · ((xtᵀ m) · Σ1)            Σ1 = xcᵀ xc  (D×D) is materialized
    N <  D:  out = (Σ2 · (m xcᵀ)) · xc            Σ2 = xt xtᵀ  (N×N) is materialized

Each product is one launch of :func:`set_matmul_kernel`, a batched ``tl.dot`` GEMM whose sample
dimension has a per-set length (tiles past a set's end do no work). The branch is chosen once per
batch from ``N_max`` and ``D``.

Internal layout: every per-row state is a zero-padded fp32 ``(B, N_max, D)`` tensor plus the set
lengths; the input (dense with any strides, or ragged rows grouped by ``ptr``) is read once by
:func:`structure_factors_kernel`, which also writes the fp32 padded copy, the centred and
normalized factors ``xc`` / ``xt`` (per set, DESIGN §2) in the same launch. The LogSumExp
passes and the dual updates of one iteration run in one program per set that owns all D
features, so the normalizations over d (log μ) and over n (log η) need no second launch:

    B-E / B-Q, per iteration:  3 launches Σ(S) · 1 P-step · 3 launches Σ(P) · 1 S-step + duals
    S, per outer iteration:    3 launches Σ(P) · 1 launch with the cost and all K inner
                               Gauss-Seidel (exact) or Jacobi (paper) iterations
    then 1 launch for the pooling (column softmax of log P) and the normalized plan.

An empty set is solved on one zero dummy sample (all finite) and its output is zeroed, like the
torch path.

Backward (:class:`StructureROTFunction`): the exact gradient of the T unrolled iterations for
x (including through Σ1, Σ2 and their centring/normalization), α0..α3, ρ, τ (per-iteration
vectors) and the prior logits.

Memory. The forward keeps its inputs, the structure factors (xc, xt and the smaller Gram
matrix: what the structure matrices need) and the final log P - no per-iteration N×D state.
The backward walks the iterations in reverse; for iteration t it recomputes the state entering
t by re-running the Triton forward from the nearest checkpoint. By default the only checkpoint
is the initial state (known from the inputs), so the memory of forward+backward does not grow
with T; the price is T(T-1)/2 extra forward iterations in the backward (T = 4: 6, T = 16: 120,
i.e. the backward re-runs the forward about T/2 times). ``CHECKPOINT_EVERY = c`` stores every
c-th state in the forward (T/c states of 2·N×D floats for B-ADMM, N×D for S) and cuts the
recompute to about T(c-1)/2 iterations - the knob for trading memory for time.

Kernels of the backward, per reverse iteration t (after the recompute):
  exact B-E / B-Q: the forward step t re-run with ``SAVE`` (R, log μ, C, log η kept, O(N + D)
      per set), :func:`badmm_s_step_bwd_kernel` (adjoint of the S-step, its row LSE, the
      normalization over n and the dual update), the adjoint of Σ(P) (:func:`sigma_apply_bwd`:
      ~10 set_matmul launches, the gradients of the factors included), then
      :func:`badmm_p_step_bwd_kernel` (adjoint of the P-step, its column LSE and the
      normalization over d) and the adjoint of Σ(S).
  S (exact and paper): the outer step re-run with ``SAVE`` (Y0 and the inner history R_k, a_k,
      C_k, b_k, O(K·(N + D)) per set), :func:`sinkhorn_prox_step_bwd_kernel` (all K
      Gauss-Seidel / Jacobi iterations in reverse, one program per set) and the adjoint of Σ(P).
  Weight gradients: per-set partial sums written by the adjoint kernels, reduced by torch
  (a (B, 8) sum per iteration) together with the κ derivatives.
  paper B-E / B-Q: the same two adjoint kernels (``PAPER``: log μ, log η are states); the
      eq. (26)-(28) updates of log μ, log η, z1, z2 are O(N + D) vectors, differentiated with
      torch ops in :func:`badmm_reverse_step`.
  ``TRITON_BACKWARD = False``: a second, slower implementation kept to cross-check the adjoint
      kernels: iteration t is replayed in differentiable torch ops on the padded layout
      (:func:`_replay_step`, the math of solvers.py) and differentiated by torch autograd, with
      only the structure products (:class:`SigmaProduct`) in Triton. Same recompute scheme.
  Once per call, in torch (not Triton): the final pooling / plan normalization and the chain
  from the factors' gradients to x through the centring and normalization (cheap O(N·D)).

torch.compile: by default the forward and the Triton backward are the custom operators
``rotp_triton::structure_fwd`` / ``structure_bwd`` (``torch.library.triton_op``, launches through
``wrap_triton``, explicit fake kernels), so ``torch.compile(fullgraph=True)`` traces a dense
``rot_pool(..., a0 > 0)`` without a graph break. Their registered backward runs the pooling /
plan adjoint (:func:`pool_plan_bwd`) and the factors -> x chain (:func:`structure_factors_bwd`)
as explicit torch formulas around ``structure_bwd`` (no torch autograd inside). It keeps only
the inputs and log P_T and rebuilds the initial state. ``StructureROTFunction`` (torch autograd
for those two pieces) is used when torch has no ``triton_op``, with ``TRITON_BACKWARD = False``
or a ``CHECKPOINT_EVERY``, and for a dense batch with N = 0. A ragged batch still graph-breaks
(the host reads ``max(ptr diff)`` to size the padding).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

import triton
import triton.language as tl

from ...torch.sets import normalized_plan, pool_from_log_plan, structure_factors

# States stored every CHECKPOINT_EVERY iterations in the forward for the backward's recompute;
# None: store none (memory independent of T, O(T^2) recompute).
CHECKPOINT_EVERY: Optional[int] = None
# adjoint kernels in Triton (False: torch-autograd replay of each iteration, for cross-checks)
TRITON_BACKWARD = True
# fp32 tl.dot precision: "ieee" (exact fp32) or "tf32" (tensor cores, ~1e-3 relative error).
DOT_PRECISION = os.environ.get("ROTP_STRUCTURE_DOT", "ieee")

_TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(float32).tiny, as structure.py
_NEG_BIG = tl.constexpr(-1.0e30)  # finite "-inf" for running maxima: no (-inf) - (-inf)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# How kernels are launched: directly, or through torch.library.wrap_triton while the body of
# one of the custom operators below runs (so torch.compile can trace the launches).
_LAUNCH_WRAP = [None]


def _wrap(kernel):
    wrap = _LAUNCH_WRAP[0]
    return kernel if wrap is None else wrap(kernel)


# ============================================================================================
# kernels
# ============================================================================================
@triton.jit
def _kappa(alpha, w):
    """κ(α, w) = α / (α + w), 1 at α = +inf."""
    return tl.where(alpha == float("inf"), 1.0, alpha / (alpha + w))


@triton.jit
def structure_factors_kernel(x_ptr, row_start_ptr, len_ptr, x32_ptr, xc_ptr, xt_ptr,
                             s_xb, s_xn, s_xd, N_pad, D,
                             BN: tl.constexpr, BD: tl.constexpr):
    """One program per set: the fp32 padded copy of x and the normalized factors.

    x: caller's tensor, element (b, n, d) at b*s_xb + (row_start[b] + n)*s_xn + d*s_xd.
    x32, xc, xt: (B, N_pad, D) fp32, written for n < len[b] (padding stays 0).
    xc = (x - μ1) / sqrt(n_b · max diag Σ1), xt = (x - μ2) / sqrt(D · max diag Σ2).
    """
    b = tl.program_id(0)
    n_b = tl.load(len_ptr + b).to(tl.int32)
    row0 = tl.load(row_start_ptr + b)
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    nf = tl.maximum(n_b, 1).to(tl.float32)
    # pass 1: μ1 (mean over samples, per feature)
    col = tl.zeros([BD], dtype=tl.float32)
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        msk = (rows < n_b)[:, None] & d_ok[None, :]
        xv = tl.load(x_ptr + b * s_xb + (row0 + rows)[:, None] * s_xn + offs_d[None, :] * s_xd,
                     mask=msk, other=0.0).to(tl.float32)                      # [BN, BD]
        col += tl.sum(xv, 0)
    mu1 = col / nf
    # pass 2: diagonals of Σ1 (per feature) and Σ2 (per sample); write the fp32 copy
    var1 = tl.zeros([BD], dtype=tl.float32)
    max2 = tl.zeros([BN], dtype=tl.float32)
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        r_ok = rows < n_b
        msk = r_ok[:, None] & d_ok[None, :]
        xv = tl.load(x_ptr + b * s_xb + (row0 + rows)[:, None] * s_xn + offs_d[None, :] * s_xd,
                     mask=msk, other=0.0).to(tl.float32)
        tl.store(x32_ptr + (b * N_pad + rows)[:, None] * D + offs_d[None, :], xv, mask=msk)
        xc = tl.where(msk, xv - mu1[None, :], 0.0)
        var1 += tl.sum(xc * xc, 0)
        mu2 = tl.sum(xv, 1) / D                                                # [BN]
        xt = tl.where(msk, xv - mu2[:, None], 0.0)
        max2 = tl.maximum(max2, tl.where(r_ok, tl.sum(xt * xt, 1) / D, 0.0))
    s1 = tl.maximum(tl.max(tl.where(d_ok, var1 / nf, 0.0), 0), _TINY)
    s2 = tl.maximum(tl.max(max2, 0), _TINY)
    c1 = 1.0 / tl.sqrt(nf * s1)
    c2 = 1.0 / tl.sqrt(D * s2)
    # pass 3: the factors
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        msk = (rows < n_b)[:, None] & d_ok[None, :]
        xv = tl.load(x_ptr + b * s_xb + (row0 + rows)[:, None] * s_xn + offs_d[None, :] * s_xd,
                     mask=msk, other=0.0).to(tl.float32)
        mu2 = tl.sum(xv, 1) / D
        off = (b * N_pad + rows)[:, None] * D + offs_d[None, :]
        tl.store(xc_ptr + off, (xv - mu1[None, :]) * c1, mask=msk)
        tl.store(xt_ptr + off, (xv - mu2[:, None]) * c2, mask=msk)


@triton.jit
def set_matmul_kernel(a_ptr, b_ptr, c_ptr, len_ptr, D, M_alloc, N_alloc,
                      s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_cb, s_cm, s_cn,
                      M_IS_SET: tl.constexpr, K_IS_SET: tl.constexpr, N_IS_SET: tl.constexpr,
                      EXP_B: tl.constexpr, ACCUMULATE: tl.constexpr, ALPHA: tl.constexpr,
                      PRECISION: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """C[b] (+)= ALPHA · A[b] @ op(B[b]) per set, op = exp if EXP_B (B holds a log plan).

    Each of the dims M, K, N is either the set's samples (length len[b], ``*_IS_SET``) or the
    features (length D); operands are addressed by strides (transposes are free). Entries past
    the logical size are loaded as 0 (exp: as exp(-inf) = 0), so rows/columns of C past a set's
    end come out 0 and are written over the whole allocation (M_alloc, N_alloc).
    """
    b = tl.program_id(0)
    pid = tl.program_id(1)
    n_b = tl.load(len_ptr + b).to(tl.int32)
    if M_IS_SET:
        m_size = n_b
    else:
        m_size = D
    if K_IS_SET:
        k_size = n_b
    else:
        k_size = D
    if N_IS_SET:
        n_size = n_b
    else:
        n_size = D
    n_tiles = tl.cdiv(N_alloc, BN)
    pm = pid // n_tiles
    pn = pid % n_tiles
    offs_m = pm * BM + tl.arange(0, BM)
    offs_n = pn * BN + tl.arange(0, BN)
    m_ok = offs_m < m_size
    n_ok = offs_n < n_size
    # a tile wholly past the set's end only writes zeros: skip its K loop
    k_end = tl.where((pm * BM < m_size) & (pn * BN < n_size), k_size, 0)
    a_base = a_ptr + b * s_ab + offs_m[:, None] * s_am
    b_base = b_ptr + b * s_bb + offs_n[None, :] * s_bn
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, k_end, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < k_size
        a = tl.load(a_base + offs_k[None, :] * s_ak, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)                                                  # [BM, BK]
        if EXP_B:
            bv = tl.exp(tl.load(b_base + offs_k[:, None] * s_bk,
                                mask=k_ok[:, None] & n_ok[None, :], other=float("-inf")))
        else:
            bv = tl.load(b_base + offs_k[:, None] * s_bk, mask=k_ok[:, None] & n_ok[None, :],
                         other=0.0)                                             # [BK, BN]
        acc += tl.dot(a, bv, input_precision=PRECISION)
    acc = acc * ALPHA
    c_ptrs = c_ptr + b * s_cb + offs_m[:, None] * s_cm + offs_n[None, :] * s_cn
    c_msk = (offs_m < M_alloc)[:, None] & (offs_n < N_alloc)[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_msk, other=0.0)
    tl.store(c_ptrs, acc, mask=c_msk)


@triton.jit
def badmm_p_step_kernel(x_ptr, log_s_ptr, z_ptr, sig_ptr, log_p_ptr, log_p0_ptr, log_mu_ptr,
                        r_out_ptr, mu_out_ptr, len_ptr, a0_ptr, a1_ptr, a2_ptr, rho_ptr, t,
                        N_pad, D, QUADRATIC: tl.constexpr, PAPER: tl.constexpr,
                        SAVE: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """P-step of B-E/B-Q, one program per set (all D features).

    G = x + α0 Σ(S) - Z [- α1 S];  Y = log S + G/ρ;  R = LSE_n Y;
    exact: log μ = lognorm(κ2 log p0 + (1-κ2) R);  paper: log μ is the state;
    log P = Y + (log μ - R).   sig = Σ(S) (B, N_pad, D); log_mu (B, D) (paper only).
    SAVE: also write R and log μ to r_out, mu_out (B, D) for the backward.
    """
    b = tl.program_id(0)
    n_b = tl.load(len_ptr + b).to(tl.int32)
    a0 = tl.load(a0_ptr + t)
    a1 = tl.load(a1_ptr + t)
    rho = tl.load(rho_ptr + t)
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    m = tl.full([BD], _NEG_BIG, dtype=tl.float32)
    l = tl.zeros([BD], dtype=tl.float32)
    # pass 1: R = LSE over samples of Y (online, per feature)
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        msk = (rows < n_b)[:, None] & d_ok[None, :]
        off = (b * N_pad + rows)[:, None] * D + offs_d[None, :]
        ls = tl.load(log_s_ptr + off, mask=msk, other=0.0)
        g = tl.load(x_ptr + off, mask=msk, other=0.0) - tl.load(z_ptr + off, mask=msk, other=0.0)
        g += a0 * tl.load(sig_ptr + off, mask=msk, other=0.0)
        if QUADRATIC:
            g -= a1 * tl.exp(ls)
        y = tl.where(msk, ls + g / rho, float("-inf"))                          # [BN, BD]
        m_new = tl.maximum(m, tl.max(y, 0))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(y - m_new[None, :]), 0)
        m = m_new
    r = m + tl.log(l)                                                          # [BD]
    if PAPER:
        log_mu = tl.load(log_mu_ptr + b * D + offs_d, mask=d_ok, other=0.0)
    else:
        k2 = _kappa(tl.load(a2_ptr + t), rho)
        v = k2 * tl.load(log_p0_ptr + b * D + offs_d, mask=d_ok, other=0.0) + (1 - k2) * r
        v = tl.where(d_ok, v, float("-inf"))
        vm = tl.max(v, 0)
        log_mu = v - (vm + tl.log(tl.sum(tl.exp(v - vm), 0)))
    shift = log_mu - r
    if SAVE:
        tl.store(r_out_ptr + b * D + offs_d, r, mask=d_ok)
        tl.store(mu_out_ptr + b * D + offs_d, log_mu, mask=d_ok)
    # pass 2: log P = Y + log μ - R
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        msk = (rows < n_b)[:, None] & d_ok[None, :]
        off = (b * N_pad + rows)[:, None] * D + offs_d[None, :]
        ls = tl.load(log_s_ptr + off, mask=msk, other=0.0)
        g = tl.load(x_ptr + off, mask=msk, other=0.0) - tl.load(z_ptr + off, mask=msk, other=0.0)
        g += a0 * tl.load(sig_ptr + off, mask=msk, other=0.0)
        if QUADRATIC:
            g -= a1 * tl.exp(ls)
        tl.store(log_p_ptr + off, ls + g / rho + shift[None, :], mask=msk)


@triton.jit
def badmm_s_step_kernel(log_p_ptr, z_ptr, sig_ptr, log_s_ptr, c_ptr, log_q0_ptr, log_eta_ptr,
                        z2_ptr, log_p0_ptr, log_mu_ptr, z1_ptr, eta_out_ptr, len_ptr,
                        a0_ptr, a1_ptr, a2_ptr, a3_ptr, rho_ptr, t, N_pad, D,
                        QUADRATIC: tl.constexpr, PAPER: tl.constexpr, SAVE: tl.constexpr,
                        BN: tl.constexpr, BD: tl.constexpr):
    """S-step and dual update of B-E/B-Q, one program per set.

    H = Z + α0 Σ(P);  B-E: Y = (H + ρ log P)/(α1+ρ);  B-Q: Y = log P + (H - α1 P)/ρ;
    C = LSE_d Y;  exact: log η = lognorm_n(κ3 log q0 + (1-κ3) C);  paper: log η is the state;
    log S = Y + log η - C;  Z += ρ (P - S).
    Paper only, eqs. (26)-(28): log μ, log η, z1 (B, D), z2 (B, N_pad) updated in place.
    c: (B, N_pad) scratch for C.  Y is parked in log_s between the two passes.
    SAVE: also write log η to eta_out (B, N_pad) for the backward (C stays in c).
    """
    b = tl.program_id(0)
    n_b = tl.load(len_ptr + b).to(tl.int32)
    a0 = tl.load(a0_ptr + t)
    a1 = tl.load(a1_ptr + t)
    rho = tl.load(rho_ptr + t)
    if QUADRATIC:
        w = rho
    else:
        w = a1 + rho
    if PAPER:
        k3 = _kappa(tl.load(a3_ptr + t), rho)
    else:
        k3 = _kappa(tl.load(a3_ptr + t), w)
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    # pass 1: Y, C_n; the LSE over n of the η logits (running scalar max/sum)
    vm = tl.max(tl.full([BN], _NEG_BIG, dtype=tl.float32), 0)
    vl = tl.sum(tl.zeros([BN], dtype=tl.float32), 0)
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        r_ok = rows < n_b
        msk = r_ok[:, None] & d_ok[None, :]
        off = (b * N_pad + rows)[:, None] * D + offs_d[None, :]
        lp = tl.load(log_p_ptr + off, mask=msk, other=0.0)
        h = tl.load(z_ptr + off, mask=msk, other=0.0) + a0 * tl.load(sig_ptr + off, mask=msk,
                                                                     other=0.0)
        if QUADRATIC:
            y = lp + (h - a1 * tl.exp(lp)) / rho
        else:
            y = (h + rho * lp) / w
        y = tl.where(msk, y, float("-inf"))                                     # [BN, BD]
        ym = tl.max(y, 1)
        c = ym + tl.log(tl.sum(tl.exp(y - ym[:, None]), 1))                     # [BN]
        tl.store(log_s_ptr + off, y, mask=msk)
        tl.store(c_ptr + b * N_pad + rows, c, mask=r_ok)
        lq0 = tl.load(log_q0_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
        if PAPER:   # logits of the new log η, eq. (27), from the state before this update
            le = tl.load(log_eta_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
            z2 = tl.load(z2_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
            v = (1 - k3) * (le - z2 / rho) + k3 * lq0
        else:
            v = k3 * lq0 + (1 - k3) * c
        v = tl.where(r_ok, v, float("-inf"))
        vm_new = tl.maximum(vm, tl.max(v, 0))
        vl = vl * tl.exp(vm - vm_new) + tl.sum(tl.exp(v - vm_new), 0)
        vm = vm_new
    v_lse = vm + tl.log(vl)
    tl.debug_barrier()   # pass 2 reads what other threads of this program wrote in pass 1
    colsum_p = tl.zeros([BD], dtype=tl.float32)
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        r_ok = rows < n_b
        msk = r_ok[:, None] & d_ok[None, :]
        off = (b * N_pad + rows)[:, None] * D + offs_d[None, :]
        y = tl.load(log_s_ptr + off, mask=msk, other=0.0)
        c = tl.load(c_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
        lq0 = tl.load(log_q0_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
        if PAPER:
            le = tl.load(log_eta_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
        else:
            le = k3 * lq0 + (1 - k3) * c - v_lse
        ls = y + (le - c)[:, None]
        p = tl.where(msk, tl.exp(tl.load(log_p_ptr + off, mask=msk, other=0.0)), 0.0)
        s = tl.where(msk, tl.exp(ls), 0.0)
        zz = tl.load(z_ptr + off, mask=msk, other=0.0) + rho * (p - s)
        tl.store(log_s_ptr + off, ls, mask=msk)
        if SAVE:
            tl.store(eta_out_ptr + b * N_pad + rows, le, mask=r_ok)
        tl.store(z_ptr + off, zz, mask=msk)
        if PAPER:
            z2 = tl.load(z2_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
            le_new = (1 - k3) * (le - z2 / rho) + k3 * lq0 - v_lse
            z2 = z2 + rho * (tl.exp(le_new) - tl.sum(s, 1))
            tl.debug_barrier()   # every warp has read this chunk's old log η, z2
            tl.store(log_eta_ptr + b * N_pad + rows, le_new, mask=r_ok)
            tl.store(z2_ptr + b * N_pad + rows, z2, mask=r_ok)
            colsum_p += tl.sum(p, 0)
    if PAPER:   # eq. (26) and the z1 update
        k2 = _kappa(tl.load(a2_ptr + t), rho)
        lmu = tl.load(log_mu_ptr + b * D + offs_d, mask=d_ok, other=0.0)
        z1 = tl.load(z1_ptr + b * D + offs_d, mask=d_ok, other=0.0)
        u = (1 - k2) * (lmu - z1 / rho) + k2 * tl.load(log_p0_ptr + b * D + offs_d, mask=d_ok,
                                                         other=0.0)
        u = tl.where(d_ok, u, float("-inf"))
        um = tl.max(u, 0)
        lmu = u - (um + tl.log(tl.sum(tl.exp(u - um), 0)))
        z1 = z1 + rho * (tl.exp(lmu) - colsum_p)
        tl.store(log_mu_ptr + b * D + offs_d, lmu, mask=d_ok)
        tl.store(z1_ptr + b * D + offs_d, z1, mask=d_ok)


@triton.jit
def sinkhorn_prox_step_kernel(x_ptr, log_p_ptr, sig_ptr, y0_ptr, bvec_ptr, c_ptr, log_p0_ptr,
                              log_q0_ptr, hist_r_ptr, hist_a_ptr, hist_c_ptr, hist_b_ptr,
                              len_ptr, a0_ptr, a1_ptr, a2_ptr, a3_ptr, tau_ptr, t,
                              K, N_pad, D, PAPER: tl.constexpr, SAVE: tl.constexpr,
                              BN: tl.constexpr, BD: tl.constexpr):
    """One proximal (Alg. 1) outer step of S, all K inner iterations, one program per set.

    Y0 = (x + α0 Σ(P) + τ log P)/ε, ε = α1 + τ (= -C_t/ε). Exact: K Gauss-Seidel iterations
    a = lognorm(κ2 log p0 + (1-κ2) LSE_n(Y0 + b)) - LSE_n(..), b likewise over d; paper: K
    Jacobi iterations of eq. (18) with the a/ε factor. log P ← Y0 + a + b (in place).
    y0: (B, N_pad, D) scratch; bvec, c: (B, N_pad) scratch.
    SAVE: the inner history for the adjoint, R_k, a_k (B, K, D) and C_k, b_k (B, K, N_pad):
    exact, a_k and b_k after iteration k; paper, a and b entering iteration k.
    """
    b = tl.program_id(0)
    n_b = tl.load(len_ptr + b).to(tl.int32)
    a0 = tl.load(a0_ptr + t)
    tau = tl.load(tau_ptr + t)
    eps = tl.load(a1_ptr + t) + tau
    k2 = _kappa(tl.load(a2_ptr + t), eps)
    k3 = _kappa(tl.load(a3_ptr + t), eps)
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    lp0 = tl.load(log_p0_ptr + b * D + offs_d, mask=d_ok, other=0.0)
    # Y0 and b = 0
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        r_ok = rows < n_b
        msk = r_ok[:, None] & d_ok[None, :]
        off = (b * N_pad + rows)[:, None] * D + offs_d[None, :]
        y0 = (tl.load(x_ptr + off, mask=msk, other=0.0)
              + a0 * tl.load(sig_ptr + off, mask=msk, other=0.0)
              + tau * tl.load(log_p_ptr + off, mask=msk, other=0.0)) / eps
        tl.store(y0_ptr + off, y0, mask=msk)
        tl.store(bvec_ptr + b * N_pad + rows, tl.zeros([BN], dtype=tl.float32), mask=r_ok)
    a = tl.zeros([BD], dtype=tl.float32)
    tl.debug_barrier()
    for _k in range(0, K):
        if PAPER:
            # Jacobi: R and C from the same Y = Y0 + a + b; b updated row by row
            m = tl.full([BD], _NEG_BIG, dtype=tl.float32)
            l = tl.zeros([BD], dtype=tl.float32)
            for n0 in range(0, n_b, BN):
                rows = n0 + tl.arange(0, BN)
                r_ok = rows < n_b
                msk = r_ok[:, None] & d_ok[None, :]
                off = (b * N_pad + rows)[:, None] * D + offs_d[None, :]
                bv = tl.load(bvec_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
                y = tl.load(y0_ptr + off, mask=msk, other=0.0) + a[None, :] + bv[:, None]
                y = tl.where(msk, y, float("-inf"))
                m_new = tl.maximum(m, tl.max(y, 0))
                l = l * tl.exp(m - m_new) + tl.sum(tl.exp(y - m_new[None, :]), 0)
                m = m_new
                ym = tl.max(y, 1)
                c = ym + tl.log(tl.sum(tl.exp(y - ym[:, None]), 1))
                lq0 = tl.load(log_q0_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
                # bv is replicated across warps: all must have read it before it is replaced
                tl.debug_barrier()
                tl.store(bvec_ptr + b * N_pad + rows, k3 * (bv / eps + lq0 - c), mask=r_ok)
                if SAVE:   # the state entering iteration k and its C
                    tl.store(hist_b_ptr + (b * K + _k) * N_pad + rows, bv, mask=r_ok)
                    tl.store(hist_c_ptr + (b * K + _k) * N_pad + rows, c, mask=r_ok)
            r = m + tl.log(l)
            if SAVE:
                tl.store(hist_r_ptr + (b * K + _k) * D + offs_d, r, mask=d_ok)
                tl.store(hist_a_ptr + (b * K + _k) * D + offs_d, a, mask=d_ok)
            a = tl.where(d_ok, k2 * (a / eps + lp0 - r), 0.0)
        else:
            # a from R = LSE_n(Y0 + b)
            m = tl.full([BD], _NEG_BIG, dtype=tl.float32)
            l = tl.zeros([BD], dtype=tl.float32)
            for n0 in range(0, n_b, BN):
                rows = n0 + tl.arange(0, BN)
                r_ok = rows < n_b
                msk = r_ok[:, None] & d_ok[None, :]
                off = (b * N_pad + rows)[:, None] * D + offs_d[None, :]
                bv = tl.load(bvec_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
                y = tl.load(y0_ptr + off, mask=msk, other=0.0) + bv[:, None]
                y = tl.where(msk, y, float("-inf"))
                m_new = tl.maximum(m, tl.max(y, 0))
                l = l * tl.exp(m - m_new) + tl.sum(tl.exp(y - m_new[None, :]), 0)
                m = m_new
            r = m + tl.log(l)
            v = tl.where(d_ok, k2 * lp0 + (1 - k2) * r, float("-inf"))
            vmax = tl.max(v, 0)
            a = tl.where(d_ok, v - (vmax + tl.log(tl.sum(tl.exp(v - vmax), 0))) - r, 0.0)
            if SAVE:
                tl.store(hist_r_ptr + (b * K + _k) * D + offs_d, r, mask=d_ok)
                tl.store(hist_a_ptr + (b * K + _k) * D + offs_d, a, mask=d_ok)
            # b from C = LSE_d(Y0 + a)
            vm = tl.max(tl.full([BN], _NEG_BIG, dtype=tl.float32), 0)
            vl = tl.sum(tl.zeros([BN], dtype=tl.float32), 0)
            for n0 in range(0, n_b, BN):
                rows = n0 + tl.arange(0, BN)
                r_ok = rows < n_b
                msk = r_ok[:, None] & d_ok[None, :]
                off = (b * N_pad + rows)[:, None] * D + offs_d[None, :]
                y = tl.load(y0_ptr + off, mask=msk, other=0.0) + a[None, :]
                y = tl.where(msk, y, float("-inf"))
                ym = tl.max(y, 1)
                c = ym + tl.log(tl.sum(tl.exp(y - ym[:, None]), 1))
                tl.store(c_ptr + b * N_pad + rows, c, mask=r_ok)
                lq0 = tl.load(log_q0_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
                vn = tl.where(r_ok, k3 * lq0 + (1 - k3) * c, float("-inf"))
                vm_new = tl.maximum(vm, tl.max(vn, 0))
                vl = vl * tl.exp(vm - vm_new) + tl.sum(tl.exp(vn - vm_new), 0)
                vm = vm_new
            v_lse = vm + tl.log(vl)
            tl.debug_barrier()
            for n0 in range(0, n_b, BN):
                rows = n0 + tl.arange(0, BN)
                r_ok = rows < n_b
                c = tl.load(c_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
                lq0 = tl.load(log_q0_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
                bn = k3 * lq0 + (1 - k3) * c - v_lse - c
                tl.store(bvec_ptr + b * N_pad + rows, bn, mask=r_ok)
                if SAVE:
                    tl.store(hist_c_ptr + (b * K + _k) * N_pad + rows, c, mask=r_ok)
                    tl.store(hist_b_ptr + (b * K + _k) * N_pad + rows, bn, mask=r_ok)
        tl.debug_barrier()
    # log P = Y0 + a + b
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        r_ok = rows < n_b
        msk = r_ok[:, None] & d_ok[None, :]
        off = (b * N_pad + rows)[:, None] * D + offs_d[None, :]
        bv = tl.load(bvec_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
        y = tl.load(y0_ptr + off, mask=msk, other=0.0) + a[None, :] + bv[:, None]
        tl.store(log_p_ptr + off, y, mask=msk)


@triton.jit
def badmm_s_step_bwd_kernel(g_ls_ptr, g_z_ptr, log_p_ptr, z_ptr, sig_p_ptr, log_s_new_ptr, c_ptr,
                            eta_ptr, log_q0_ptr, g_z_out_ptr, g_sig_ptr, g_lp_ptr, g_p_ptr,
                            g_lq0_ptr, gvec_ptr, row_x_ptr, col_x_ptr, wpart_ptr, len_ptr,
                            a0_ptr, a1_ptr, a3_ptr, rho_ptr, t, N_pad, D,
                            QUADRATIC: tl.constexpr, PAPER: tl.constexpr,
                            BN: tl.constexpr, BD: tl.constexpr):
    """Adjoint of the exact S-step and dual update (badmm_s_step_kernel), one program per set.

    In: g_ls, g_z = ∂L/∂log S', ∂L/∂Z' (B, N_pad, D); the forward's log P, Z, Σ(P), log S',
    C (c) and log η (eta). Out: g_z_out = ∂L/∂Z through this step, g_sig = α0 ∂L/∂H (to be
    pushed through Σ), g_lp = ∂L/∂log P and g_p = ∂L/∂P except the Σ(P) path, g_lq0
    (B, N_pad), and per-set partial sums wpart[b] = (∂/∂α0, ∂/∂α1, ∂/∂ρ direct, ∂/∂κ3, ∂/∂w).
    gvec: (B, N_pad) scratch.
    PAPER: log η is a state (no κ3 path): gvec returns ∂L/∂log η through log S'; the eq. (27)-(28)
    updates enter as row_x (B, N_pad) (∂L/∂S'_nd += row_x_n, from z2) and col_x (B, D)
    (∂L/∂P_nd += col_x_d, from z1).
    """
    b = tl.program_id(0)
    n_b = tl.load(len_ptr + b).to(tl.int32)
    a0 = tl.load(a0_ptr + t)
    a1 = tl.load(a1_ptr + t)
    rho = tl.load(rho_ptr + t)
    if QUADRATIC:
        w = rho
    else:
        w = a1 + rho
    k3 = _kappa(tl.load(a3_ptr + t), w)
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    zero_n = tl.zeros([BN], dtype=tl.float32)
    # pass 1: ∂L/∂log η_n = Σ_d ∂L/∂log S'_nd (total, through S' = exp(log S') in the dual too)
    g_rho = tl.sum(zero_n, 0)
    g_eta_sum = tl.sum(zero_n, 0)
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        r_ok = rows < n_b
        msk = r_ok[:, None] & d_ok[None, :]
        off = (b * N_pad + rows)[:, None] * D + offs_d[None, :]
        gz = tl.load(g_z_ptr + off, mask=msk, other=0.0)
        p = tl.where(msk, tl.exp(tl.load(log_p_ptr + off, mask=msk, other=0.0)), 0.0)
        s = tl.where(msk, tl.exp(tl.load(log_s_new_ptr + off, mask=msk, other=0.0)), 0.0)
        glt = tl.load(g_ls_ptr + off, mask=msk, other=0.0) - rho * gz * s      # [BN, BD]
        if PAPER:
            glt += tl.load(row_x_ptr + b * N_pad + rows, mask=r_ok, other=0.0)[:, None] * s
        g_rho += tl.sum(tl.sum(gz * (p - s), 1), 0)
        g_eta = tl.sum(glt, 1)                                                  # [BN]
        tl.store(gvec_ptr + b * N_pad + rows, g_eta, mask=r_ok)
        g_eta_sum += tl.sum(g_eta, 0)
    tl.debug_barrier()
    g_a0 = tl.sum(zero_n, 0)
    g_a1 = tl.sum(zero_n, 0)
    g_w = tl.sum(zero_n, 0)
    g_k3 = tl.sum(zero_n, 0)
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        r_ok = rows < n_b
        msk = r_ok[:, None] & d_ok[None, :]
        off = (b * N_pad + rows)[:, None] * D + offs_d[None, :]
        # log η = lognorm_n(v), v = κ3 log q0 + (1-κ3) C: softmax(v) = η
        g_eta = tl.load(gvec_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
        le = tl.load(eta_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
        c = tl.load(c_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
        lq0 = tl.load(log_q0_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
        if PAPER:
            g_c = -g_eta
        else:
            g_v = tl.where(r_ok, g_eta - tl.exp(le) * g_eta_sum, 0.0)
            g_c = -g_eta + (1 - k3) * g_v
            tl.store(g_lq0_ptr + b * N_pad + rows, k3 * g_v, mask=r_ok)
            g_k3 += tl.sum(g_v * (lq0 - c), 0)
        gz = tl.load(g_z_ptr + off, mask=msk, other=0.0)
        lp = tl.load(log_p_ptr + off, mask=msk, other=0.0)
        p = tl.where(msk, tl.exp(lp), 0.0)
        s = tl.where(msk, tl.exp(tl.load(log_s_new_ptr + off, mask=msk, other=0.0)), 0.0)
        sig = tl.load(sig_p_ptr + off, mask=msk, other=0.0)
        h = tl.load(z_ptr + off, mask=msk, other=0.0) + a0 * sig
        if QUADRATIC:
            y = lp + (h - a1 * p) / rho
        else:
            y = (h + rho * lp) / w
        # C = LSE_d Y: ∂C/∂Y = exp(Y - C)
        g_y = tl.load(g_ls_ptr + off, mask=msk, other=0.0) - rho * gz * s \
            + tl.where(msk, tl.exp(y - c[:, None]), 0.0) * g_c[:, None]          # [BN, BD]
        if PAPER:
            g_y += tl.load(row_x_ptr + b * N_pad + rows, mask=r_ok, other=0.0)[:, None] * s
        if QUADRATIC:
            g_h = g_y / rho
            g_lp = g_y
            g_p = rho * gz - a1 * g_h
            g_a1 += tl.sum(tl.sum(-g_h * p, 1), 0)
            g_rho += tl.sum(tl.sum(-g_h * (h - a1 * p), 1), 0) / rho
        else:
            g_h = g_y / w
            g_lp = rho * g_h
            g_p = rho * gz
            g_w += tl.sum(tl.sum(-g_h * y, 1), 0)
            g_rho += tl.sum(tl.sum(g_h * lp, 1), 0)
        if PAPER:
            g_p += tl.load(col_x_ptr + b * D + offs_d, mask=d_ok, other=0.0)[None, :]
        g_a0 += tl.sum(tl.sum(g_h * sig, 1), 0)
        tl.store(g_z_out_ptr + off, gz + g_h, mask=msk)
        tl.store(g_sig_ptr + off, a0 * g_h, mask=msk)
        tl.store(g_lp_ptr + off, g_lp, mask=msk)
        tl.store(g_p_ptr + off, g_p, mask=msk)
    tl.store(wpart_ptr + b * 8 + 0, g_a0)
    tl.store(wpart_ptr + b * 8 + 1, g_a1)
    tl.store(wpart_ptr + b * 8 + 2, g_rho)
    tl.store(wpart_ptr + b * 8 + 3, g_k3)
    tl.store(wpart_ptr + b * 8 + 4, g_w)


@triton.jit
def badmm_p_step_bwd_kernel(g_lp_ptr, g_p_ptr, log_p_ptr, log_s_ptr, z_ptr, x_ptr, sig_s_ptr,
                            r_ptr, mu_ptr, log_p0_ptr, g_l_ptr, g_x_ptr, g_z_ptr, g_sig_ptr,
                            g_lp0_ptr, wpart_ptr, len_ptr, a0_ptr, a1_ptr, a2_ptr, rho_ptr, t,
                            N_pad, D, QUADRATIC: tl.constexpr, PAPER: tl.constexpr,
                            BN: tl.constexpr, BD: tl.constexpr):
    """Adjoint of the exact P-step (badmm_p_step_kernel), one program per set.

    In: ∂L/∂log P = g_lp + P ⊙ g_p (all paths); the forward's log P, log S, Z, x, Σ(S), R and
    log μ (r, mu (B, D)). Out: g_l = ∂L/∂log S except the Σ(S) path (written), g_x += and
    g_z -= ∂L/∂G (in place), g_sig = α0 ∂L/∂G (to be pushed through Σ), g_lp0 (B, D), and
    per-set partials wpart[b] = (∂/∂α0, ∂/∂α1, ∂/∂ρ direct, ∂/∂κ2).
    PAPER: log μ is a state: g_lp0 returns ∂L/∂log μ (no κ2 path).
    """
    b = tl.program_id(0)
    n_b = tl.load(len_ptr + b).to(tl.int32)
    a0 = tl.load(a0_ptr + t)
    a1 = tl.load(a1_ptr + t)
    rho = tl.load(rho_ptr + t)
    k2 = _kappa(tl.load(a2_ptr + t), rho)
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    # pass 1: ∂L/∂log μ_d = Σ_n ∂L/∂log P_nd
    g_mu = tl.zeros([BD], dtype=tl.float32)
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        msk = (rows < n_b)[:, None] & d_ok[None, :]
        off = (b * N_pad + rows)[:, None] * D + offs_d[None, :]
        p = tl.where(msk, tl.exp(tl.load(log_p_ptr + off, mask=msk, other=0.0)), 0.0)
        g_mu += tl.sum(tl.load(g_lp_ptr + off, mask=msk, other=0.0)
                       + p * tl.load(g_p_ptr + off, mask=msk, other=0.0), 0)
    r = tl.load(r_ptr + b * D + offs_d, mask=d_ok, other=0.0)
    lmu = tl.load(mu_ptr + b * D + offs_d, mask=d_ok, other=0.0)
    lp0 = tl.load(log_p0_ptr + b * D + offs_d, mask=d_ok, other=0.0)
    if PAPER:
        g_r = -g_mu
        tl.store(g_lp0_ptr + b * D + offs_d, g_mu, mask=d_ok)
        g_k2 = tl.sum(tl.zeros([BD], dtype=tl.float32), 0)
    else:
        g_v = tl.where(d_ok, g_mu - tl.exp(lmu) * tl.sum(g_mu, 0), 0.0)  # log μ = lognorm(v)
        g_r = -g_mu + (1 - k2) * g_v
        tl.store(g_lp0_ptr + b * D + offs_d, k2 * g_v, mask=d_ok)
        g_k2 = tl.sum(tl.where(d_ok, g_v * (lp0 - r), 0.0), 0)
    zero_n = tl.zeros([BN], dtype=tl.float32)
    g_a0 = tl.sum(zero_n, 0)
    g_a1 = tl.sum(zero_n, 0)
    g_rho = tl.sum(zero_n, 0)
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        msk = (rows < n_b)[:, None] & d_ok[None, :]
        off = (b * N_pad + rows)[:, None] * D + offs_d[None, :]
        p = tl.where(msk, tl.exp(tl.load(log_p_ptr + off, mask=msk, other=0.0)), 0.0)
        glp = tl.load(g_lp_ptr + off, mask=msk, other=0.0) \
            + p * tl.load(g_p_ptr + off, mask=msk, other=0.0)
        ls = tl.load(log_s_ptr + off, mask=msk, other=0.0)
        sig = tl.load(sig_s_ptr + off, mask=msk, other=0.0)
        g = tl.load(x_ptr + off, mask=msk, other=0.0) - tl.load(z_ptr + off, mask=msk, other=0.0)
        g += a0 * sig
        s = tl.where(msk, tl.exp(ls), 0.0)
        if QUADRATIC:
            g -= a1 * s
        y = ls + g / rho
        # R = LSE_n Y: ∂R/∂Y = exp(Y - R)
        g_y = glp + tl.where(msk, tl.exp(y - r[None, :]), 0.0) * g_r[None, :]   # [BN, BD]
        g_g = g_y / rho
        g_rho += tl.sum(tl.sum(-g_g * g, 1), 0) / rho
        g_a0 += tl.sum(tl.sum(g_g * sig, 1), 0)
        g_l = g_y
        if QUADRATIC:
            g_a1 += tl.sum(tl.sum(-g_g * s, 1), 0)
            g_l -= a1 * g_g * s
        tl.store(g_l_ptr + off, g_l, mask=msk)
        tl.store(g_x_ptr + off, tl.load(g_x_ptr + off, mask=msk, other=0.0) + g_g, mask=msk)
        tl.store(g_z_ptr + off, tl.load(g_z_ptr + off, mask=msk, other=0.0) - g_g, mask=msk)
        tl.store(g_sig_ptr + off, a0 * g_g, mask=msk)
    tl.store(wpart_ptr + b * 8 + 0, g_a0)
    tl.store(wpart_ptr + b * 8 + 1, g_a1)
    tl.store(wpart_ptr + b * 8 + 2, g_rho)
    tl.store(wpart_ptr + b * 8 + 3, g_k2)


@triton.jit
def sinkhorn_prox_step_bwd_kernel(g_out_ptr, x_ptr, log_p_ptr, sig_ptr, y0_ptr, gy0_ptr,
                                  hist_r_ptr, hist_a_ptr, hist_c_ptr, hist_b_ptr, gb_ptr, gc_ptr,
                                  log_p0_ptr, log_q0_ptr, g_lp_ptr, g_x_ptr, g_sig_ptr,
                                  g_lp0_ptr, g_lq0_ptr, wpart_ptr, len_ptr, a0_ptr, a1_ptr,
                                  a2_ptr, a3_ptr, tau_ptr, t, K, N_pad, D,
                                  PAPER: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """Adjoint of one proximal S step (sinkhorn_prox_step_kernel, SAVE), one program per
    set: the K Gauss-Seidel (exact) or Jacobi (paper, eq. 18) iterations in reverse from their
    saved (R_k, a_k, C_k, b_k) and Y0.

    In: g_out = ∂L/∂log P_{t+1} (B, N_pad, D); log P_t, Σ(P_t), Y0 and the history. Out: g_lp =
    ∂L/∂log P_t except the Σ(P_t) path, g_x += ∂L/∂x, g_sig = α0 ∂L/∂Y0/ε (to be pushed
    through Σ), g_lp0 (B, D), g_lq0 (B, N_pad), wpart[b] = (∂/∂α0, ∂/∂τ direct, ∂/∂ε direct,
    ∂/∂κ2, ∂/∂κ3). Scratch: gy0 (B, N_pad, D), gb, gc (B, N_pad).
    """
    b = tl.program_id(0)
    n_b = tl.load(len_ptr + b).to(tl.int32)
    a0 = tl.load(a0_ptr + t)
    tau = tl.load(tau_ptr + t)
    eps = tl.load(a1_ptr + t) + tau
    k2 = _kappa(tl.load(a2_ptr + t), eps)
    k3 = _kappa(tl.load(a3_ptr + t), eps)
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    lp0 = tl.load(log_p0_ptr + b * D + offs_d, mask=d_ok, other=0.0)
    zero_n = tl.zeros([BN], dtype=tl.float32)
    # log P_{t+1} = Y0 + a_K + b_K
    g_a_out = tl.zeros([BD], dtype=tl.float32)
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        r_ok = rows < n_b
        msk = r_ok[:, None] & d_ok[None, :]
        off = (b * N_pad + rows)[:, None] * D + offs_d[None, :]
        g = tl.load(g_out_ptr + off, mask=msk, other=0.0)
        tl.store(gy0_ptr + off, g, mask=msk)
        g_a_out += tl.sum(g, 0)
        tl.store(gb_ptr + b * N_pad + rows, tl.sum(g, 1), mask=r_ok)
        tl.store(g_lq0_ptr + b * N_pad + rows, zero_n, mask=r_ok)
    g_lp0 = tl.zeros([BD], dtype=tl.float32)
    g_k2 = tl.sum(zero_n, 0)
    g_k3 = tl.sum(zero_n, 0)
    g_eps_j = tl.sum(zero_n, 0)
    tl.debug_barrier()
    if PAPER:
        # a' = κ2 (a/ε + log p0 - R), b' = κ3 (b/ε + log q0 - C), R, C from Y = Y0 + a + b
        g_a = g_a_out
        for kk in range(0, K):
            k = K - 1 - kk
            a_old = tl.load(hist_a_ptr + (b * K + k) * D + offs_d, mask=d_ok, other=0.0)
            rk = tl.load(hist_r_ptr + (b * K + k) * D + offs_d, mask=d_ok, other=0.0)
            g_r = -k2 * g_a
            g_lp0 += k2 * g_a
            g_k2 += tl.sum(tl.where(d_ok, g_a * (a_old / eps + lp0 - rk), 0.0), 0)
            g_eps_j += tl.sum(tl.where(d_ok, -g_a * k2 * a_old, 0.0), 0) / (eps * eps)
            g_a_new = k2 / eps * g_a
            for n0 in range(0, n_b, BN):
                rows = n0 + tl.arange(0, BN)
                r_ok = rows < n_b
                msk = r_ok[:, None] & d_ok[None, :]
                off = (b * N_pad + rows)[:, None] * D + offs_d[None, :]
                gbv = tl.load(gb_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
                b_old = tl.load(hist_b_ptr + (b * K + k) * N_pad + rows, mask=r_ok, other=0.0)
                c = tl.load(hist_c_ptr + (b * K + k) * N_pad + rows, mask=r_ok, other=0.0)
                lq0 = tl.load(log_q0_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
                g_c = -k3 * gbv
                g_k3 += tl.sum(gbv * (b_old / eps + lq0 - c), 0)
                g_eps_j += tl.sum(-gbv * k3 * b_old, 0) / (eps * eps)
                y = tl.load(y0_ptr + off, mask=msk, other=0.0) + a_old[None, :] + b_old[:, None]
                gy = tl.where(msk, tl.exp(y - rk[None, :]) * g_r[None, :]
                              + tl.exp(y - c[:, None]) * g_c[:, None], 0.0)     # [BN, BD]
                tl.store(gy0_ptr + off, tl.load(gy0_ptr + off, mask=msk, other=0.0) + gy,
                         mask=msk)
                g_a_new += tl.sum(gy, 0)
                old_q = tl.load(g_lq0_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
                tl.debug_barrier()   # every warp read gb, g_lq0 of these rows before the update
                tl.store(gb_ptr + b * N_pad + rows, k3 / eps * gbv + tl.sum(gy, 1), mask=r_ok)
                tl.store(g_lq0_ptr + b * N_pad + rows, old_q + k3 * gbv, mask=r_ok)
            g_a = g_a_new
            tl.debug_barrier()
    else:
        for kk in range(0, K):
            k = K - 1 - kk
            # b_k = lognorm_n(v) - C_k, v = κ3 log q0 + (1-κ3) C_k, softmax(v) = exp(b_k + C_k)
            gb_sum = tl.sum(zero_n, 0)
            for n0 in range(0, n_b, BN):
                rows = n0 + tl.arange(0, BN)
                gb_sum += tl.sum(tl.load(gb_ptr + b * N_pad + rows, mask=rows < n_b,
                                         other=0.0), 0)
            for n0 in range(0, n_b, BN):
                rows = n0 + tl.arange(0, BN)
                r_ok = rows < n_b
                gbv = tl.load(gb_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
                c = tl.load(hist_c_ptr + (b * K + k) * N_pad + rows, mask=r_ok, other=0.0)
                bk = tl.load(hist_b_ptr + (b * K + k) * N_pad + rows, mask=r_ok, other=0.0)
                lq0 = tl.load(log_q0_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
                g_v = tl.where(r_ok, gbv - tl.exp(bk + c) * gb_sum, 0.0)
                tl.store(gc_ptr + b * N_pad + rows, -gbv + (1 - k3) * g_v, mask=r_ok)
                g_k3 += tl.sum(g_v * (lq0 - c), 0)
                old = tl.load(g_lq0_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
                tl.debug_barrier()   # every warp read the old value before it is replaced
                tl.store(g_lq0_ptr + b * N_pad + rows, old + k3 * g_v, mask=r_ok)
            tl.debug_barrier()
            # C_k = LSE_d(Y0 + a_k)
            ak = tl.load(hist_a_ptr + (b * K + k) * D + offs_d, mask=d_ok, other=0.0)
            g_a = tl.where(k == K - 1, g_a_out, 0.0)   # a_k feeds C_k and, last, the output
            for n0 in range(0, n_b, BN):
                rows = n0 + tl.arange(0, BN)
                r_ok = rows < n_b
                msk = r_ok[:, None] & d_ok[None, :]
                off = (b * N_pad + rows)[:, None] * D + offs_d[None, :]
                c = tl.load(hist_c_ptr + (b * K + k) * N_pad + rows, mask=r_ok, other=0.0)
                gc = tl.load(gc_ptr + b * N_pad + rows, mask=r_ok, other=0.0)
                e = tl.where(msk, tl.exp(tl.load(y0_ptr + off, mask=msk, other=0.0)
                                         + ak[None, :] - c[:, None]), 0.0) * gc[:, None]
                tl.store(gy0_ptr + off, tl.load(gy0_ptr + off, mask=msk, other=0.0) + e,
                         mask=msk)
                g_a += tl.sum(e, 0)
            # a_k = lognorm_d(u) - R_k, u = κ2 log p0 + (1-κ2) R_k, softmax(u) = exp(a_k + R_k)
            rk = tl.load(hist_r_ptr + (b * K + k) * D + offs_d, mask=d_ok, other=0.0)
            g_u = tl.where(d_ok, g_a - tl.exp(ak + rk) * tl.sum(g_a, 0), 0.0)
            g_r = -g_a + (1 - k2) * g_u
            g_lp0 += k2 * g_u
            g_k2 += tl.sum(tl.where(d_ok, g_u * (lp0 - rk), 0.0), 0)
            # R_k = LSE_n(Y0 + b_{k-1}), b_{-1} = 0
            for n0 in range(0, n_b, BN):
                rows = n0 + tl.arange(0, BN)
                r_ok = rows < n_b
                msk = r_ok[:, None] & d_ok[None, :]
                off = (b * N_pad + rows)[:, None] * D + offs_d[None, :]
                bprev = tl.load(hist_b_ptr + (b * K + tl.maximum(k - 1, 0)) * N_pad + rows,
                                mask=r_ok, other=0.0)
                bprev = tl.where(k > 0, bprev, 0.0)
                e = tl.where(msk, tl.exp(tl.load(y0_ptr + off, mask=msk, other=0.0)
                                         + bprev[:, None] - rk[None, :]), 0.0) * g_r[None, :]
                tl.store(gy0_ptr + off, tl.load(gy0_ptr + off, mask=msk, other=0.0) + e,
                         mask=msk)
                tl.store(gb_ptr + b * N_pad + rows, tl.sum(e, 1), mask=r_ok)
            tl.debug_barrier()
    # Y0 = (x + α0 Σ(P) + τ log P) / ε
    g_a0 = tl.sum(zero_n, 0)
    g_tau = tl.sum(zero_n, 0)
    g_eps = tl.sum(zero_n, 0)
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        r_ok = rows < n_b
        msk = r_ok[:, None] & d_ok[None, :]
        off = (b * N_pad + rows)[:, None] * D + offs_d[None, :]
        gy = tl.load(gy0_ptr + off, mask=msk, other=0.0) / eps
        sig = tl.load(sig_ptr + off, mask=msk, other=0.0)
        lp = tl.load(log_p_ptr + off, mask=msk, other=0.0)
        g_a0 += tl.sum(tl.sum(gy * sig, 1), 0)
        g_tau += tl.sum(tl.sum(gy * lp, 1), 0)
        g_eps += tl.sum(tl.sum(-gy * tl.load(y0_ptr + off, mask=msk, other=0.0), 1), 0)
        tl.store(g_x_ptr + off, tl.load(g_x_ptr + off, mask=msk, other=0.0) + gy, mask=msk)
        tl.store(g_sig_ptr + off, a0 * gy, mask=msk)
        tl.store(g_lp_ptr + off, tau * gy, mask=msk)
    tl.store(g_lp0_ptr + b * D + offs_d, g_lp0, mask=d_ok)
    tl.store(wpart_ptr + b * 8 + 0, g_a0)
    tl.store(wpart_ptr + b * 8 + 1, g_tau)
    tl.store(wpart_ptr + b * 8 + 2, g_eps + g_eps_j)
    tl.store(wpart_ptr + b * 8 + 3, g_k2)
    tl.store(wpart_ptr + b * 8 + 4, g_k3)


@triton.jit
def pool_from_log_plan_kernel(log_p_ptr, x_ptr, y_ptr, plan_ptr, len_ptr, real_len_ptr,
                              row_start_ptr, N_pad, D, s_pn, s_pb,
                              WRITE_PLAN: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """y_d = Σ_n softmax_n(log P[:, d]) x_nd (one online pass), 0 for empty sets; optionally
    the plan exp(log P - LSE_{n,d} log P) in the caller's row layout (row b*s_pb +
    (row_start[b] + n)*s_pn, contiguous features) and dtype.
    """
    b = tl.program_id(0)
    n_b = tl.load(len_ptr + b).to(tl.int32)
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    m = tl.full([BD], _NEG_BIG, dtype=tl.float32)
    l = tl.zeros([BD], dtype=tl.float32)
    acc = tl.zeros([BD], dtype=tl.float32)
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        msk = (rows < n_b)[:, None] & d_ok[None, :]
        off = (b * N_pad + rows)[:, None] * D + offs_d[None, :]
        lp = tl.where(msk, tl.load(log_p_ptr + off, mask=msk, other=0.0), float("-inf"))
        xv = tl.load(x_ptr + off, mask=msk, other=0.0)
        m_new = tl.maximum(m, tl.max(lp, 0))
        scale = tl.exp(m - m_new)
        e = tl.exp(lp - m_new[None, :])                                        # [BN, BD]
        l = l * scale + tl.sum(e, 0)
        acc = acc * scale + tl.sum(e * xv, 0)
        m = m_new
    real = tl.load(real_len_ptr + b)
    y = tl.where(real > 0, acc / tl.maximum(l, 1e-30), 0.0)
    tl.store(y_ptr + b * D + offs_d, y.to(y_ptr.dtype.element_ty), mask=d_ok)
    if WRITE_PLAN:
        col = tl.where(d_ok, m + tl.log(l), float("-inf"))
        cm = tl.max(col, 0)
        total = cm + tl.log(tl.sum(tl.exp(col - cm), 0))
        row0 = tl.load(row_start_ptr + b)
        n_real = real.to(tl.int32)
        for n0 in range(0, n_real, BN):
            rows = n0 + tl.arange(0, BN)
            msk = (rows < n_real)[:, None] & d_ok[None, :]
            off = (b * N_pad + rows)[:, None] * D + offs_d[None, :]
            lp = tl.load(log_p_ptr + off, mask=msk, other=0.0)
            tl.store(plan_ptr + b * s_pb + (row0 + rows)[:, None] * s_pn + offs_d[None, :],
                     tl.exp(lp - total).to(plan_ptr.dtype.element_ty), mask=msk)


# ============================================================================================
# host launchers
# ============================================================================================
# one program per set streams [BN, BD] tiles with several live fp32 tensors: 8 warps keep it
# under 255 registers per thread at BN·BD = 4096 (ptxas, W1 sizes; see test_aot_sm90)
_PER_SET_WARPS = 8


def _row_block(BD: int) -> int:
    """Rows per chunk of the per-set kernels: about 4096 fp32 values per [BN, BD] tile."""
    return max(1, min(64, 4096 // BD))


def _mm_blocks(M: int, N: int, K: int):
    cap = 32 if _interpreting() else 64
    def blk(v):
        return max(16, min(cap, triton.next_power_of_2(max(v, 1))))
    return blk(M), blk(N), blk(K)


def set_matmul(a: Tensor, b: Tensor, out: Tensor, lens: Tensor, D: int, *, m_set: bool,
               k_set: bool, n_set: bool, exp_b: bool = False, accumulate: bool = False,
               alpha: float = 1.0) -> Tensor:
    """out[i] (+)= alpha · a[i] @ (exp(b[i]) if exp_b else b[i]) for every set i.

    a: (B, M_alloc, K_alloc), b: (B, K_alloc, N_alloc), out: (B, M_alloc, N_alloc), any
    strides (pass transposed views); a dim flagged ``*_set`` has the set's length lens[i],
    the others D. Entries past the logical sizes are treated as 0.
    """
    B, M_alloc, N_alloc = out.shape
    K_alloc = a.shape[2]
    if B == 0 or M_alloc == 0 or N_alloc == 0:
        return out
    BM, BN, BK = _mm_blocks(M_alloc, N_alloc, K_alloc)
    grid = (B, triton.cdiv(M_alloc, BM) * triton.cdiv(N_alloc, BN))
    _wrap(set_matmul_kernel)[grid](
        a, b, out, lens, D, M_alloc, N_alloc,
        a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        M_IS_SET=m_set, K_IS_SET=k_set, N_IS_SET=n_set, EXP_B=exp_b, ACCUMULATE=accumulate,
        ALPHA=float(alpha), PRECISION=DOT_PRECISION, BM=BM, BN=BN, BK=BK, num_warps=4)
    return out


class Factors:
    """The per-set structure factors of a padded batch and the smaller Gram matrix.

    xc, xt: (B, N_pad, D) fp32 (DESIGN §2, scaled so Σ1 = xcᵀxc, Σ2 = xt xtᵀ);
    gram: Σ1 (B, D, D) when ``d_small`` (D <= N_pad) else Σ2 (B, N_pad, N_pad).
    """

    def __init__(self, xc: Tensor, xt: Tensor, lens: Tensor):
        self.xc, self.xt, self.lens = xc, xt, lens
        B, N, D = xc.shape
        self.D = D
        self.d_small = D <= N
        if self.d_small:
            self.gram = xc.new_empty(B, D, D)
            set_matmul(xc.transpose(1, 2), xc, self.gram, lens, D, m_set=False, k_set=True,
                       n_set=False)
        else:
            self.gram = xc.new_empty(B, N, N)
            set_matmul(xt, xt.transpose(1, 2), self.gram, lens, D, m_set=True, k_set=False,
                       n_set=True)

    def apply(self, m: Tensor, *, exp: bool = False, out: Optional[Tensor] = None) -> Tensor:
        """Σ2 m Σ1 (paper Σ1 M Σ2) for m (B, N_pad, D); with ``exp`` m holds log M."""
        return sigma_apply(m, self.xc, self.xt, self.gram, self.lens, exp=exp, out=out)


def sigma_apply(m: Tensor, xc: Tensor, xt: Tensor, gram: Tensor, lens: Tensor, *,
                exp: bool = False, out: Optional[Tensor] = None) -> Tensor:
    """Σ2 m Σ1 through the factors, 3 launches; see the module docstring for the two orders."""
    B, N, D = m.shape
    out = torch.empty_like(m) if out is None else out
    if D <= N:
        w = m.new_empty(B, D, D)
        set_matmul(xt.transpose(1, 2), m, w, lens, D, m_set=False, k_set=True, n_set=False,
                   exp_b=exp)                                                  # xtᵀ m
        v = m.new_empty(B, D, D)
        set_matmul(w, gram, v, lens, D, m_set=False, k_set=False, n_set=False)  # (xtᵀ m) Σ1
        set_matmul(xt, v, out, lens, D, m_set=True, k_set=False, n_set=False)   # xt V
    else:
        u = m.new_empty(B, N, N)
        mt = m.transpose(1, 2)
        # u = m xcᵀ computed as (xc mᵀ)ᵀ so that m (possibly exp'd) is the B operand
        set_matmul(xc, mt, u.transpose(1, 2), lens, D, m_set=True, k_set=False, n_set=True,
                   exp_b=exp)
        q = m.new_empty(B, N, N)
        set_matmul(gram, u, q, lens, D, m_set=True, k_set=True, n_set=True)     # Σ2 u
        set_matmul(q, xc, out, lens, D, m_set=True, k_set=True, n_set=False)    # q xc
    return out


def _launch_factors(x: Tensor, row_start: Tensor, lens: Tensor, B: int, N_pad: int, D: int,
                    dense: bool):
    x32 = x.new_zeros(B, N_pad, D, dtype=torch.float32)
    xc = torch.zeros_like(x32)
    xt = torch.zeros_like(x32)
    BD = triton.next_power_of_2(D)
    if dense:
        s_xb, s_xn, s_xd = x.stride()
    else:
        s_xb, (s_xn, s_xd) = 0, x.stride()
    _wrap(structure_factors_kernel)[(B,)](x, row_start, lens, x32, xc, xt, s_xb, s_xn, s_xd, N_pad, D,
                                   BN=_row_block(BD), BD=BD,
                                   num_warps=_PER_SET_WARPS)
    return x32, xc, xt


class _Problem:
    """Everything a forward needs, on the padded fp32 layout."""

    def __init__(self, x32, lens, real_lens, log_p0, log_q0, w, method, variant, T, K):
        self.x32, self.lens, self.real_lens = x32, lens, real_lens
        self.log_p0, self.log_q0 = log_p0, log_q0
        self.w = w                                  # dict of contiguous fp32 (T,) tensors
        self.method, self.variant, self.T, self.K = method, variant, T, K
        B, N, D = x32.shape
        self.B, self.N, self.D = B, N, D
        self.BD = triton.next_power_of_2(D)
        self.BN = _row_block(self.BD)


def init_state(pb: _Problem) -> dict:
    """State before iteration 0: log S = log P = log(p0 q0ᵀ) (padding 0), Z = 0 (+ paper duals)."""
    mask = torch.arange(pb.N, device=pb.x32.device)[None, :] < pb.lens[:, None]
    log_s = ((pb.log_p0[:, None, :] + pb.log_q0[:, :, None]) * mask[..., None]).contiguous()
    st = {"log_s": log_s}
    if pb.method != "sinkhorn":
        st["z"] = torch.zeros_like(log_s)
        if pb.variant == "paper":
            st["log_mu"] = pb.log_p0.clone()
            st["log_eta"] = pb.log_q0.clone()
            st["z1"] = torch.zeros_like(pb.log_p0)
            st["z2"] = torch.zeros_like(pb.log_q0)
    return st


def run_iterations(pb: _Problem, fac: Factors, st: dict, t0: int, t1: int) -> dict:
    """Iterations t0..t1-1 with the Triton kernels, in place on (a copy of) ``st``.

    For B-E/B-Q the key ``log_p`` holds the P of the last iteration run; for S ``log_s``
    holds log P (the proximal state).
    """
    st = {k: v.clone() for k, v in st.items()}
    w = pb.w
    B, N, D = pb.B, pb.N, pb.D
    sig = torch.empty_like(pb.x32)
    paper = pb.variant == "paper"
    if pb.method == "sinkhorn":
        y0 = torch.empty_like(pb.x32)
        bvec = torch.empty_like(pb.log_q0)
        cbuf = torch.empty_like(pb.log_q0)
        for t in range(t0, t1):
            fac.apply(st["log_s"], exp=True, out=sig)
            _wrap(sinkhorn_prox_step_kernel)[(B,)](
                pb.x32, st["log_s"], sig, y0, bvec, cbuf, pb.log_p0, pb.log_q0, bvec, bvec,
                bvec, bvec, pb.lens, w["a0"], w["a1"], w["a2"], w["a3"], w["tau"], t, pb.K, N,
                D, PAPER=paper, SAVE=False, BN=pb.BN, BD=pb.BD, num_warps=_PER_SET_WARPS)
        return st
    quad = pb.method == "badmm-q"
    log_p = st.get("log_p")
    if log_p is None:
        log_p = torch.zeros_like(pb.x32)
    cbuf = torch.empty_like(pb.log_q0)
    dummy = pb.log_p0
    for t in range(t0, t1):
        fac.apply(st["log_s"], exp=True, out=sig)
        _wrap(badmm_p_step_kernel)[(B,)](
            pb.x32, st["log_s"], st["z"], sig, log_p, pb.log_p0, st.get("log_mu", dummy),
            dummy, dummy, pb.lens, w["a0"], w["a1"], w["a2"], w["rho"], t, N, D,
            QUADRATIC=quad, PAPER=paper, SAVE=False, BN=pb.BN, BD=pb.BD,
            num_warps=_PER_SET_WARPS)
        fac.apply(log_p, exp=True, out=sig)
        _wrap(badmm_s_step_kernel)[(B,)](
            log_p, st["z"], sig, st["log_s"], cbuf, pb.log_q0, st.get("log_eta", dummy),
            st.get("z2", dummy), pb.log_p0, st.get("log_mu", dummy), st.get("z1", dummy),
            dummy, pb.lens, w["a0"], w["a1"], w["a2"], w["a3"], w["rho"], t, N, D,
            QUADRATIC=quad, PAPER=paper, SAVE=False, BN=pb.BN, BD=pb.BD,
            num_warps=_PER_SET_WARPS)
    st["log_p"] = log_p
    return st


def final_log_p(pb: _Problem, st: dict) -> Tensor:
    return st["log_s"] if pb.method == "sinkhorn" else st["log_p"]


def pool_launch(pb: _Problem, log_p: Tensor, out_dtype, plan: Optional[Tensor],
                row_start: Tensor, dense: bool) -> Tensor:
    y = torch.empty(pb.B, pb.D, device=log_p.device, dtype=out_dtype)
    if pb.B == 0:
        return y
    if plan is not None:
        if dense:
            s_pb, s_pn = plan.stride(0), plan.stride(1)
        else:
            s_pb, s_pn = 0, plan.stride(0)
    else:
        s_pb = s_pn = 0
    _wrap(pool_from_log_plan_kernel)[(pb.B,)](
        log_p, pb.x32, y, plan if plan is not None else y, pb.lens, pb.real_lens, row_start,
        pb.N, pb.D, s_pn, s_pb, WRITE_PLAN=plan is not None, BN=pb.BN, BD=pb.BD,
        num_warps=_PER_SET_WARPS)
    return y


# ============================================================================================
# backward: Triton structure product with its exact adjoint, torch replay of one iteration
# ============================================================================================
def sigma_apply_bwd(m: Tensor, g: Tensor, xc: Tensor, xt: Tensor, gram: Tensor, lens: Tensor,
                    dxc: Tensor, dxt: Tensor) -> Tensor:
    """Adjoint of out = Σ2 m Σ1 for the upstream gradient g (B, N_pad, D): returns ∂/∂m and
    adds ∂/∂xc, ∂/∂xt into dxc, dxt (about 9 set_matmul launches, all tl.dot)."""
    g = g.contiguous()
    B, N, D = m.shape
    dm = sigma_apply(g, xc, xt, gram, lens)             # Σ1, Σ2 symmetric: the adjoint is Σ
    if D <= N:
        # out = xt V, V = W Σ1, W = xtᵀ m
        w = m.new_empty(B, D, D)
        set_matmul(xt.transpose(1, 2), m, w, lens, D, m_set=False, k_set=True, n_set=False)
        v = m.new_empty(B, D, D)
        set_matmul(w, gram, v, lens, D, m_set=False, k_set=False, n_set=False)
        set_matmul(g, v.transpose(1, 2), dxt, lens, D, m_set=True, k_set=False,
                   n_set=False, accumulate=True)                             # += g Vᵀ
        dv = m.new_empty(B, D, D)
        set_matmul(xt.transpose(1, 2), g, dv, lens, D, m_set=False, k_set=True,
                   n_set=False)                                              # dV = xtᵀ g
        dw = m.new_empty(B, D, D)
        set_matmul(dv, gram, dw, lens, D, m_set=False, k_set=False, n_set=False)  # dV Σ1
        ds1 = m.new_empty(B, D, D)
        set_matmul(w.transpose(1, 2), dv, ds1, lens, D, m_set=False, k_set=False,
                   n_set=False)                                              # Wᵀ dV
        set_matmul(m, dw.transpose(1, 2), dxt, lens, D, m_set=True, k_set=False,
                   n_set=False, accumulate=True)                             # += m dWᵀ
        ds1 = ds1 + ds1.transpose(1, 2)
        set_matmul(xc, ds1, dxc, lens, D, m_set=True, k_set=False, n_set=False,
                   accumulate=True)                                          # += xc (dΣ1 + dΣ1ᵀ)
    else:
        # out = Q xc, Q = Σ2 U, U = m xcᵀ
        u = m.new_empty(B, N, N)
        set_matmul(m, xc.transpose(1, 2), u, lens, D, m_set=True, k_set=False, n_set=True)
        q = m.new_empty(B, N, N)
        set_matmul(gram, u, q, lens, D, m_set=True, k_set=True, n_set=True)
        set_matmul(q.transpose(1, 2), g, dxc, lens, D, m_set=True, k_set=True,
                   n_set=False, accumulate=True)                             # += Qᵀ g
        dq = m.new_empty(B, N, N)
        set_matmul(g, xc.transpose(1, 2), dq, lens, D, m_set=True, k_set=False,
                   n_set=True)                                               # dQ = g xcᵀ
        du = m.new_empty(B, N, N)
        set_matmul(gram, dq, du, lens, D, m_set=True, k_set=True, n_set=True)  # Σ2 dQ
        ds2 = m.new_empty(B, N, N)
        set_matmul(dq, u.transpose(1, 2), ds2, lens, D, m_set=True, k_set=True,
                   n_set=True)                                               # dQ Uᵀ
        set_matmul(du.transpose(1, 2), m, dxc, lens, D, m_set=True, k_set=True,
                   n_set=False, accumulate=True)                             # += dUᵀ m
        ds2 = ds2 + ds2.transpose(1, 2)
        set_matmul(ds2, xt, dxt, lens, D, m_set=True, k_set=True, n_set=False,
                   accumulate=True)                                          # += (dΣ2 + dΣ2ᵀ) xt
    return dm


class SigmaProduct(torch.autograd.Function):
    """out = Σ2 m Σ1 with Σ1 = xcᵀxc, Σ2 = xt xtᵀ (per set), forward and backward in Triton.

    ``gram`` is the precomputed smaller Gram matrix (not differentiated directly: its gradient
    reaches xc / xt through the factor formulas of :func:`sigma_apply_bwd`).
    """

    @staticmethod
    def forward(ctx, m, xc, xt, gram, lens):
        ctx.save_for_backward(m, xc, xt, gram, lens)
        return sigma_apply(m.contiguous(), xc, xt, gram, lens)

    @staticmethod
    def backward(ctx, g):
        m, xc, xt, gram, lens = ctx.saved_tensors
        dxc = torch.zeros_like(xc)
        dxt = torch.zeros_like(xt)
        dm = sigma_apply_bwd(m.contiguous(), g, xc, xt, gram, lens, dxc, dxt)
        return dm, dxc, dxt, None, None


def _masked_exp(log_m: Tensor, mask: Tensor) -> Tensor:
    return torch.exp(log_m.masked_fill(~mask[..., None], float("-inf")))


def _dkappa(alpha: Tensor, w: Tensor):
    """(∂κ/∂α, ∂κ/∂w) of κ(α, w) = α/(α + w); both 0 at α = +inf."""
    inf = torch.isinf(alpha)
    a = torch.where(inf, torch.zeros_like(alpha), alpha)
    den = (a + w) ** 2
    return (torch.where(inf, torch.zeros_like(alpha), w / den),
            torch.where(inf, torch.zeros_like(alpha), -a / den))


def badmm_reverse_step(pb: _Problem, fac: Factors, st: dict, t: int, mask: Tensor, g: dict,
                       g_lp_ext: Optional[Tensor], acc: dict) -> dict:
    """Pull the gradient of the state after B-E/B-Q iteration t (``g``: log_s, z and, paper,
    log_mu, log_eta, z1, z2) and ∂L/∂log P_{t+1} (``g_lp_ext``, last iteration only) back to the
    state entering t, in Triton: re-run iteration t saving R, log μ, C, log η, Σ(S), Σ(P), then
    the two adjoint kernels and the two structure-product adjoints. The paper variant's
    eq. (26)-(28) updates are O(N + D) vectors, differentiated here with torch.
    Accumulates into acc["x"], acc["xc"], acc["xt"], acc["lp0"], acc["lq0"], acc[weight][t].
    """
    B, N, D = pb.B, pb.N, pb.D
    w = pb.w
    quad = pb.method == "badmm-q"
    paper = pb.variant == "paper"
    kw = dict(QUADRATIC=quad, PAPER=paper, BN=pb.BN, BD=pb.BD, num_warps=_PER_SET_WARPS)
    dummy = pb.log_p0
    # re-run iteration t, keeping what the adjoint needs
    sig_s = fac.apply(st["log_s"], exp=True)
    log_p = torch.zeros_like(pb.x32)
    r = torch.empty_like(pb.log_p0)
    mu = torch.empty_like(pb.log_p0)
    _wrap(badmm_p_step_kernel)[(B,)](pb.x32, st["log_s"], st["z"], sig_s, log_p, pb.log_p0,
                              st.get("log_mu", dummy), r, mu, pb.lens, w["a0"], w["a1"],
                              w["a2"], w["rho"], t, N, D, SAVE=True, **kw)
    sig_p = fac.apply(log_p, exp=True)
    ls_new = torch.zeros_like(pb.x32)
    z_new = st["z"].clone()
    new = {k: st[k].clone() for k in ("log_mu", "log_eta", "z1", "z2")} if paper else {}
    cbuf = torch.empty_like(pb.log_q0)
    eta = torch.empty_like(pb.log_q0)
    _wrap(badmm_s_step_kernel)[(B,)](log_p, z_new, sig_p, ls_new, cbuf, pb.log_q0,
                              new.get("log_eta", dummy), new.get("z2", dummy), pb.log_p0,
                              new.get("log_mu", dummy), new.get("z1", dummy), eta, pb.lens,
                              w["a0"], w["a1"], w["a2"], w["a3"], w["rho"], t, N, D, SAVE=True,
                              **kw)
    rho, a1 = w["rho"][t], w["a1"][t]
    wgt = rho if quad else a1 + rho
    k2_a, k2_w = _dkappa(w["a2"][t], rho)
    row_x = col_x = dummy
    if paper:
        # eqs. (26)-(28): log μ' = lognorm((1-κ2)(log μ - z1/ρ) + κ2 log p0),
        # z1' = z1 + ρ(μ' - Σ_n P), and the same over n for log η', z2' with S'
        k2 = _kappa_t(w["a2"][t], rho)
        k3 = _kappa_t(w["a3"][t], rho)
        k3_a, k3_w = _dkappa(w["a3"][t], rho)
        m2 = mask.to(torch.float32)
        mu_n, eta_n = torch.exp(new["log_mu"]), torch.exp(new["log_eta"]) * m2
        g_mu_tot = g["log_mu"] + rho * g["z1"] * mu_n
        g_u = g_mu_tot - mu_n * g_mu_tot.sum(1, keepdim=True)
        g_eta_tot = (g["log_eta"] + rho * g["z2"] * eta_n) * m2
        g_v = (g_eta_tot - eta_n * g_eta_tot.sum(1, keepdim=True)) * m2
        g_rho = ((g["z1"] * (new["z1"] - st["z1"])).sum() + (g["z2"] * (new["z2"] - st["z2"])
                                                              * m2).sum()) / rho
        g_rho = g_rho + ((1 - k2) * g_u * st["z1"]).sum() / rho ** 2 \
            + ((1 - k3) * g_v * st["z2"]).sum() / rho ** 2
        g_k2 = (g_u * (pb.log_p0 - (st["log_mu"] - st["z1"] / rho))).sum()
        g_k3 = (g_v * (pb.log_q0 - (st["log_eta"] - st["z2"] / rho))).sum()
        acc["lp0"] += k2 * g_u
        acc["lq0"] += k3 * g_v
        g_out = {"log_mu": (1 - k2) * g_u, "log_eta": (1 - k3) * g_v,
                 "z1": g["z1"] - (1 - k2) * g_u / rho, "z2": (g["z2"] - (1 - k3) * g_v / rho) * m2}
        acc["rho"][t] += g_rho + g_k2 * k2_w + g_k3 * k3_w
        acc["a2"][t] += g_k2 * k2_a
        acc["a3"][t] += g_k3 * k3_a
        row_x = (-rho * g["z2"] * m2).contiguous()     # ∂/∂S'_nd of z2' = ... - ρ Σ_d S'_nd
        col_x = (-rho * g["z1"]).contiguous()          # ∂/∂P_nd of z1' = ... - ρ Σ_n P_nd
    # adjoint of the S-step and the dual update
    g_z_out = torch.zeros_like(pb.x32)
    g_sig = torch.zeros_like(pb.x32)
    g_lp = torch.zeros_like(pb.x32)
    g_p = torch.zeros_like(pb.x32)
    g_lq0 = torch.zeros_like(pb.log_q0)
    gvec = torch.zeros_like(pb.log_q0)
    wp_s = torch.zeros(B, 8, device=pb.x32.device, dtype=torch.float32)
    _wrap(badmm_s_step_bwd_kernel)[(B,)](g["log_s"].contiguous(), g["z"].contiguous(), log_p, st["z"],
                                  sig_p, ls_new, cbuf, eta, pb.log_q0, g_z_out, g_sig, g_lp, g_p,
                                  g_lq0, gvec, row_x, col_x, wp_s, pb.lens, w["a0"], w["a1"],
                                  w["a3"], w["rho"], t, N, D, **kw)
    g_p += sigma_apply_bwd(_masked_exp(log_p, mask), g_sig, fac.xc, fac.xt, fac.gram, pb.lens,
                           acc["xc"], acc["xt"])
    if g_lp_ext is not None:
        g_lp += g_lp_ext
    # adjoint of the P-step
    g_l = torch.zeros_like(pb.x32)
    g_sig_s = torch.zeros_like(pb.x32)
    g_lp0 = torch.zeros_like(pb.log_p0)
    wp_p = torch.zeros(B, 8, device=pb.x32.device, dtype=torch.float32)
    _wrap(badmm_p_step_bwd_kernel)[(B,)](g_lp, g_p, log_p, st["log_s"], st["z"], pb.x32, sig_s, r, mu,
                                  pb.log_p0, g_l, acc["x"], g_z_out, g_sig_s, g_lp0, wp_p,
                                  pb.lens, w["a0"], w["a1"], w["a2"], w["rho"], t, N, D, **kw)
    s = _masked_exp(st["log_s"], mask)
    g_l += s * sigma_apply_bwd(s, g_sig_s, fac.xc, fac.xt, fac.gram, pb.lens, acc["xc"],
                               acc["xt"])
    # the scalar weights of iteration t from the per-set partial sums
    ps, pp = wp_s.sum(0), wp_p.sum(0)
    if paper:
        g_w = ps[4]
        g_out["log_mu"] = g_out["log_mu"] + g_lp0        # P-step: log P = Y + log μ - R
        g_out["log_eta"] = g_out["log_eta"] + gvec       # S-step: log S' = Y' + log η - C
    else:
        k3_a, k3_w = _dkappa(w["a3"][t], wgt)
        g_w = ps[4] + ps[3] * k3_w
        acc["lp0"] += g_lp0
        acc["lq0"] += g_lq0
        acc["a3"][t] += ps[3] * k3_a
        acc["a2"][t] += pp[3] * k2_a
        acc["rho"][t] += pp[3] * k2_w
        g_out = {}
    acc["a0"][t] += ps[0] + pp[0]
    acc["a1"][t] += ps[1] + pp[1] + (0 if quad else g_w)
    acc["rho"][t] += ps[2] + pp[2] + g_w
    g_out["log_s"] = g_l
    g_out["z"] = g_z_out
    return g_out


def _kappa_t(alpha: Tensor, w: Tensor) -> Tensor:
    inf = torch.isinf(alpha)
    a = torch.where(inf, torch.ones_like(alpha), alpha)
    return torch.where(inf, torch.ones_like(alpha), a / (a + w))


def _replay_step(pb: _Problem, st: dict, x: Tensor, xc: Tensor, xt: Tensor, gram: Tensor,
                 mask: Tensor, lp0: Tensor, lq0: Tensor, w: dict, t: int) -> dict:
    """One iteration t in differentiable torch ops (the math of solvers.py) on the padded
    layout, the structure products through :class:`SigmaProduct`."""
    neg = float("-inf")
    m3 = mask[..., None]
    lp0 = lp0[:, None, :]
    lq0 = lq0[:, :, None]

    def sig(log_m):
        return SigmaProduct.apply(torch.exp(log_m.masked_fill(~m3, neg)), xc, xt, gram, pb.lens)

    def lse_n(y):
        return torch.logsumexp(y.masked_fill(~m3, neg), dim=1, keepdim=True)

    def lognorm_d(v):
        return v - torch.logsumexp(v, dim=2, keepdim=True)

    def lognorm_n(v):
        return (v - torch.logsumexp(v.masked_fill(~m3, neg), dim=1, keepdim=True)).masked_fill(
            ~m3, 0.0)

    def zp(v):
        return v.masked_fill(~m3, 0.0)

    a0, a1, a2, a3 = w["a0"][t], w["a1"][t], w["a2"][t], w["a3"][t]
    if pb.method == "sinkhorn":
        log_p = st["log_s"]
        tau = w["tau"][t]
        eps = a1 + tau
        k2, k3 = _kappa_t(a2, eps), _kappa_t(a3, eps)
        y0 = zp((x + a0 * sig(log_p) + tau * log_p) / eps)
        a = torch.zeros_like(lp0)
        b = torch.zeros_like(lq0)
        if pb.variant == "exact":
            for _ in range(pb.K):
                r = lse_n(y0 + b)
                a = lognorm_d(k2 * lp0 + (1 - k2) * r) - r
                c = zp(torch.logsumexp(y0 + a, dim=2, keepdim=True))
                b = zp(lognorm_n(k3 * lq0 + (1 - k3) * c) - c)
            return {"log_s": zp(y0 + a + b)}
        y = y0
        for _ in range(pb.K):
            r = lse_n(y)
            c = zp(torch.logsumexp(y, dim=2, keepdim=True))
            a = k2 * (a / eps + lp0 - r)
            b = zp(k3 * (b / eps + lq0 - c))
            y = y0 + a + b
        return {"log_s": zp(y)}
    rho = w["rho"][t]
    quad = pb.method == "badmm-q"
    log_s, z = st["log_s"], st["z"]
    s = torch.exp(log_s.masked_fill(~m3, neg))
    g = x - z + a0 * sig(log_s)
    if quad:
        g = g - a1 * s
    y = log_s + g / rho
    r = lse_n(y)
    if pb.variant == "exact":
        k2 = _kappa_t(a2, rho)
        log_mu = lognorm_d(k2 * lp0 + (1 - k2) * r)
    else:
        log_mu = st["log_mu"][:, None, :]
    log_p = zp(y + (log_mu - r))
    p = torch.exp(log_p.masked_fill(~m3, neg))
    h = z + a0 * sig(log_p)
    if quad:
        y = log_p + (h - a1 * p) / rho
        wgt = rho
    else:
        wgt = a1 + rho
        y = (h + rho * log_p) / wgt
    c = zp(torch.logsumexp(y, dim=2, keepdim=True))
    if pb.variant == "exact":
        k3 = _kappa_t(a3, wgt)
        log_eta = lognorm_n(k3 * lq0 + (1 - k3) * c)
    else:
        log_eta = st["log_eta"][:, :, None]
    log_s = zp(y + (log_eta - c))
    s = torch.exp(log_s.masked_fill(~m3, neg))
    out = {"log_s": log_s, "z": zp(z + rho * (p - s)), "log_p": log_p}
    if pb.variant == "paper":
        k2 = _kappa_t(a2, rho)
        k3 = _kappa_t(a3, rho)
        lmu = lognorm_d((1 - k2) * (log_mu - st["z1"][:, None, :] / rho) + k2 * lp0)
        leta = lognorm_n((1 - k3) * (log_eta - st["z2"][:, :, None] / rho) + k3 * lq0)
        out["z1"] = (st["z1"][:, None, :] + rho * (torch.exp(lmu) - p.sum(1, keepdim=True)))[:, 0]
        out["z2"] = zp(st["z2"][:, :, None] + rho * (torch.exp(leta) - s.sum(2, keepdim=True)))[
            ..., 0]
        out["log_mu"] = lmu[:, 0]
        out["log_eta"] = leta[..., 0]
    return out


def sinkhorn_reverse_step(pb: _Problem, fac: Factors, st: dict, t: int, mask: Tensor,
                                g_out: Tensor, acc: dict) -> Tensor:
    """Pull ∂L/∂log P_{t+1} back through the proximal S step t (K inner iterations), in
    Triton: re-run step t saving Y0 and the inner history, then the adjoint kernel and the
    structure-product adjoint. Returns ∂L/∂log P_t; accumulates like badmm_exact_reverse_step.
    """
    B, N, D, K = pb.B, pb.N, pb.D, pb.K
    w = pb.w
    kw = dict(BN=pb.BN, BD=pb.BD, num_warps=_PER_SET_WARPS)
    log_p = st["log_s"]
    sig = fac.apply(log_p, exp=True)
    y0 = torch.zeros_like(pb.x32)
    bvec = torch.empty_like(pb.log_q0)
    cbuf = torch.empty_like(pb.log_q0)
    h_r = torch.zeros(B, K, D, device=pb.x32.device, dtype=torch.float32)
    h_a = torch.zeros_like(h_r)
    h_c = torch.zeros(B, K, N, device=pb.x32.device, dtype=torch.float32)
    h_b = torch.zeros_like(h_c)
    out = log_p.clone()
    _wrap(sinkhorn_prox_step_kernel)[(B,)](pb.x32, out, sig, y0, bvec, cbuf, pb.log_p0, pb.log_q0, h_r,
                                    h_a, h_c, h_b, pb.lens, w["a0"], w["a1"], w["a2"], w["a3"],
                                    w["tau"], t, K, N, D, PAPER=pb.variant == "paper",
                                    SAVE=True, **kw)
    gy0 = torch.zeros_like(pb.x32)
    gb = torch.zeros_like(pb.log_q0)
    gc = torch.zeros_like(pb.log_q0)
    g_lp = torch.zeros_like(pb.x32)
    g_sig = torch.zeros_like(pb.x32)
    g_lp0 = torch.zeros_like(pb.log_p0)
    g_lq0 = torch.zeros_like(pb.log_q0)
    wp = torch.zeros(B, 8, device=pb.x32.device, dtype=torch.float32)
    _wrap(sinkhorn_prox_step_bwd_kernel)[(B,)](g_out.contiguous(), pb.x32, log_p, sig, y0, gy0, h_r, h_a,
                                        h_c, h_b, gb, gc, pb.log_p0, pb.log_q0, g_lp, acc["x"],
                                        g_sig, g_lp0, g_lq0, wp, pb.lens, w["a0"], w["a1"],
                                        w["a2"], w["a3"], w["tau"], t, K, N, D,
                                        PAPER=pb.variant == "paper", **kw)
    p = _masked_exp(log_p, mask)
    g_lp += p * sigma_apply_bwd(p, g_sig, fac.xc, fac.xt, fac.gram, pb.lens, acc["xc"],
                                acc["xt"])
    acc["lp0"] += g_lp0
    acc["lq0"] += g_lq0
    ps = wp.sum(0)
    eps = w["a1"][t] + w["tau"][t]
    k2_a, k2_w = _dkappa(w["a2"][t], eps)
    k3_a, k3_w = _dkappa(w["a3"][t], eps)
    g_eps = ps[2] + ps[3] * k2_w + ps[4] * k3_w
    acc["a0"][t] += ps[0]
    acc["tau"][t] += ps[1] + g_eps
    acc["a1"][t] += g_eps
    acc["a2"][t] += ps[3] * k2_a
    acc["a3"][t] += ps[4] * k3_a
    return g_lp


_WEIGHTS = ("a0", "a1", "a2", "a3", "rho", "tau")


def _initial_state_grads(g_state: dict, mask: Tensor, grads: list) -> None:
    """Pull the gradient of the initial state to the priors: log S⁰ = log p0 + log q0
    (padding 0); paper B-ADMM also starts from log μ⁰ = log p0, log η⁰ = log q0."""
    g0 = g_state["log_s"].masked_fill(~mask[..., None], 0.0)
    grads[3] += g0.sum(1)
    grads[4] += g0.sum(2)
    if "log_mu" in g_state:
        grads[3] += g_state["log_mu"]
        grads[4] += g_state["log_eta"].masked_fill(~mask, 0.0)


def reverse_iterations(pb: _Problem, fac: Factors, ckpts: dict, mask: Tensor, g_lp_T: Tensor,
                       grads: list) -> None:
    """The T iterations in reverse with the adjoint kernels (no torch autograd).

    g_lp_T: ∂L/∂log P_T (B, N_pad, D). Accumulates into ``grads`` = [x (B, N_pad, D),
    xc, xt (B, N_pad, D), log p0 (B, D), log q0 (B, N_pad), a0, a1, a2, a3, rho, tau (T,)]
    (x: the direct dependence only; xc, xt: the factors, chained to x by the caller).
    """
    acc = {"x": grads[0], "xc": grads[1], "xt": grads[2], "lp0": grads[3], "lq0": grads[4]}
    acc.update({k: grads[5 + i] for i, k in enumerate(_WEIGHTS)})

    def state_entering(t):
        t_ck = max(k for k in ckpts if k <= t)
        return run_iterations(pb, fac, ckpts[t_ck], t_ck, t) if t > t_ck else ckpts[t_ck]

    if pb.method == "sinkhorn":
        g_lp = g_lp_T
        for t in reversed(range(pb.T)):
            g_lp = sinkhorn_reverse_step(pb, fac, state_entering(t), t, mask, g_lp, acc)
        g_state = {"log_s": g_lp}
    else:
        g_state = {k: torch.zeros_like(v) for k, v in ckpts[0].items()}
        for t in reversed(range(pb.T)):
            g_state = badmm_reverse_step(pb, fac, state_entering(t), t, mask, g_state,
                                         g_lp_T if t == pb.T - 1 else None, acc)
    _initial_state_grads(g_state, mask, grads)



class StructureROTFunction(torch.autograd.Function):
    """(y, plan) of the α0 > 0 solvers; see the module docstring for the backward's design."""

    @staticmethod
    def forward(ctx, x, log_p0, log_q0, a0, a1, a2, a3, rho, tau, meta):
        pb, fac, row_start, dense, return_plan = _forward_setup(x, log_p0, log_q0,
                                                                dict(a0=a0, a1=a1, a2=a2, a3=a3,
                                                                     rho=rho, tau=tau), meta)
        st0 = init_state(pb)
        every = CHECKPOINT_EVERY if CHECKPOINT_EVERY else pb.T
        ckpts = {0: st0}
        st = st0
        for t0 in range(0, pb.T, every):
            t1 = min(pb.T, t0 + every)
            st = run_iterations(pb, fac, st, t0, t1)
            if t1 < pb.T:
                ckpts[t1] = st
        log_p = final_log_p(pb, st)
        plan = None
        if return_plan:
            plan = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        y = pool_launch(pb, log_p, x.dtype, plan, row_start, dense)
        ctx.meta = meta
        ctx.pb, ctx.fac, ctx.ckpts, ctx.dense = pb, fac, ckpts, dense
        ctx.has_p0, ctx.has_q0 = log_p0 is not None, log_q0 is not None
        ctx.save_for_backward(x, log_p)
        return y, plan

    @staticmethod
    def backward(ctx, gy, gplan):
        x, log_p_T = ctx.saved_tensors
        pb, fac, ckpts = ctx.pb, ctx.fac, ctx.ckpts
        dev = x.device
        mask = torch.arange(pb.N, device=dev)[None, :] < pb.lens[:, None]
        with torch.enable_grad():
            xl = pb.x32.detach().requires_grad_()
            sf = structure_factors(xl, mask)
            xc = sf.xc.detach().requires_grad_()
            xt = sf.xt.detach().requires_grad_()
            lp0 = pb.log_p0.detach().requires_grad_()
            lq0 = pb.log_q0.detach().requires_grad_()
            w = {k: pb.w[k].detach().requires_grad_() for k in _WEIGHTS}
            leaves = [xl, xc, xt, lp0, lq0] + [w[k] for k in _WEIGHTS]
            grads = [torch.zeros_like(v) for v in leaves]

            def pull(outputs: dict, gouts: dict, inputs: list):
                keys = [k for k in outputs if gouts.get(k) is not None]
                gs = torch.autograd.grad([outputs[k] for k in keys], inputs,
                                         [gouts[k] for k in keys], allow_unused=True)
                return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, gs)]

            # pooling and plan
            lpT = log_p_T.detach().requires_grad_()
            empty = (pb.real_lens == 0)[:, None]
            y = pool_from_log_plan(lpT, xl, mask).masked_fill(empty, 0.0)
            outs, gos = {"y": y}, {"y": gy.to(torch.float32)}
            if gplan is not None:
                outs["plan"] = normalized_plan(lpT, mask)
                gos["plan"] = _pad_rows(gplan.to(torch.float32), pb.B, pb.N, ctx.meta,
                                       ctx.dense)
            gs = pull(outs, gos, [lpT, xl])
            grads[0] += gs[1]
            key = "log_s" if pb.method == "sinkhorn" else "log_p"
            g_state = {key: gs[0]}
            gram = fac.gram
            if TRITON_BACKWARD:
                with torch.no_grad():
                    reverse_iterations(pb, fac, ckpts, mask, g_state[key], grads)
            else:
                for t in reversed(range(pb.T)):
                    t_ck = max(k for k in ckpts if k <= t)
                    st = (run_iterations(pb, fac, ckpts[t_ck], t_ck, t) if t > t_ck
                          else ckpts[t_ck])
                    st_in = {k: v.detach().requires_grad_() for k, v in st.items()
                             if k != "log_p"}
                    out = _replay_step(pb, st_in, xl, xc, xt, gram, mask, lp0, lq0, w, t)
                    ins = list(st_in.values()) + leaves
                    gs = pull(out, g_state, ins)
                    g_state = dict(zip(st_in.keys(), gs[:len(st_in)]))
                    for i, g in enumerate(gs[len(st_in):]):
                        grads[i] += g
                _initial_state_grads(g_state, mask, grads)
            # through the centring and normalization of the factors to x
            gx = torch.autograd.grad([sf.xc, sf.xt], [xl], [grads[1], grads[2]])[0] + grads[0]
        gx_user = _unpad_rows(gx, pb, ctx.meta, ctx.dense).to(x.dtype)
        g_lp0 = grads[3] if ctx.has_p0 else None
        g_lq0 = _unpad_q(grads[4], pb, ctx.meta, ctx.dense) if ctx.has_q0 else None
        gw = [grads[5 + i] for i in range(len(_WEIGHTS))]
        return (gx_user, g_lp0, g_lq0, *gw, None)


# ============================================================================================
# explicit adjoints of the torch pieces (the custom-op backward may not call torch autograd)
# ============================================================================================
def pool_plan_bwd(log_p: Tensor, x32: Tensor, mask: Tensor, empty: Tensor, gy: Tensor,
                  gplan: Optional[Tensor]):
    """Adjoint of y = pool_from_log_plan(log P, x) (zeroed for empty sets) and of
    plan = normalized_plan(log P).

    log_p, x32: (B, N_pad, D); mask: (B, N_pad); empty: (B, 1); gy: (B, D);
    gplan: (B, N_pad, D) or None. Returns (∂L/∂log P, ∂L/∂x), both (B, N_pad, D).
    """
    m3 = mask[..., None]
    lp = log_p.masked_fill(~m3, float("-inf"))
    w = torch.softmax(lp, dim=1)                                   # [B, N, D] column softmax
    gyw = w * gy.to(torch.float32).masked_fill(empty, 0.0)[:, None, :]
    y = (w * x32).sum(1, keepdim=True)
    g_lp = gyw * (x32 - y)                                         # softmax adjoint
    if gplan is not None:
        plan = torch.exp(lp - torch.logsumexp(lp.flatten(1), dim=1)[:, None, None])
        g_lp = g_lp + plan * (gplan - (plan * gplan).sum((1, 2), keepdim=True))
    return g_lp, gyw


def _amax_onehot(v: Tensor, dim: int) -> Tensor:
    """∂ amax(v, dim) / ∂v as torch defines it: the gradient split evenly between ties."""
    hit = (v == v.amax(dim, keepdim=True)).to(v.dtype)
    return hit / hit.sum(dim, keepdim=True)


def structure_factors_bwd(x32: Tensor, mask: Tensor, g_xc: Tensor, g_xt: Tensor) -> Tensor:
    """Adjoint of structure.structure_factors (centring + normalization) for a padded batch.

    x32, g_xc, g_xt: (B, N_pad, D); mask: (B, N_pad). Returns ∂L/∂x (B, N_pad, D).
    """
    m = mask.unsqueeze(-1).to(x32.dtype)                          # [B, N, 1]
    n = mask.sum(1).clamp_min(1).to(x32.dtype)[:, None, None]     # [B, 1, 1]
    D = x32.shape[-1]
    tiny = torch.finfo(x32.dtype).tiny
    # xc = xc0 / sqrt(n s1), xc0 = (x - μ1) m, s1 = max_d Σ_n xc0² / n
    xc0 = (x32 - (x32 * m).sum(1, keepdim=True) / n) * m
    diag1 = (xc0 * xc0).sum(1) / n[:, 0]                           # [B, D]
    s1r = diag1.amax(-1)
    s1 = s1r.clamp_min(tiny)[:, None, None]
    c1 = 1.0 / torch.sqrt(n * s1)
    g_c1 = (g_xc * xc0).sum((1, 2), keepdim=True)
    g_s1 = (g_c1 * (-0.5) * c1 / s1) * (s1r >= tiny)[:, None, None]
    g_d1 = g_s1[:, 0] * _amax_onehot(diag1, -1)                     # [B, D]
    g0 = g_xc * c1 + g_d1[:, None, :] * 2.0 * xc0 / n
    g0 = g0 * m
    gx = g0 - m * g0.sum(1, keepdim=True) / n
    # xt = xt0 / sqrt(D s2), xt0 = (x - μ2) m, s2 = max_n Σ_d xt0² / D
    xt0 = (x32 - x32.mean(-1, keepdim=True)) * m
    diag2 = (xt0 * xt0).sum(-1) / D                                # [B, N]
    s2r = diag2.amax(-1)
    s2 = s2r.clamp_min(tiny)[:, None, None]
    c2 = 1.0 / torch.sqrt(D * s2)
    g_c2 = (g_xt * xt0).sum((1, 2), keepdim=True)
    g_s2 = (g_c2 * (-0.5) * c2 / s2) * (s2r >= tiny)[:, None, None]
    g_d2 = g_s2[:, 0] * _amax_onehot(diag2, -1)                     # [B, N]
    g0 = g_xt * c2 + g_d2[..., None] * 2.0 * xt0 / D
    g0 = g0 * m
    return gx + g0 - g0.sum(-1, keepdim=True) / D


def _pad_rows(v: Tensor, B: int, N_pad: int, meta: dict, dense: bool) -> Tensor:
    """Caller-layout per-row tensor -> padded (B, N_pad, ...)."""
    if dense:
        return v
    index, pos = meta["index"], meta["pos"]
    out = v.new_zeros((B, N_pad) + tuple(v.shape[1:]))
    return out.index_put((index, pos), v)


def _unpad_rows(v: Tensor, pb: _Problem, meta: dict, dense: bool) -> Tensor:
    if dense:
        return v
    return v[meta["index"], meta["pos"]]


def _unpad_q(v: Tensor, pb: _Problem, meta: dict, dense: bool) -> Tensor:
    return _unpad_rows(v, pb, meta, dense)


def _forward_setup(x, log_p0, log_q0, weights, meta):
    dense = x.dim() == 3
    dev = x.device
    D = x.shape[-1]
    if dense:
        B, N = x.shape[0], x.shape[1]
        real_lens = torch.full((B,), N, dtype=torch.int64, device=dev)
        row_start = torch.zeros(B, dtype=torch.int64, device=dev)
    else:
        ptr = meta["ptr"]
        B = ptr.numel() - 1
        real_lens = ptr[1:] - ptr[:-1]
        row_start = ptr[:-1].contiguous()
    N_pad = max(meta["n_max"], 1)
    lens = real_lens.clamp_min(1)          # empty set: one zero dummy sample
    x32, xc, xt = _launch_factors(x, row_start, real_lens, B, N_pad, D, dense)
    mask = torch.arange(N_pad, device=dev)[None, :] < lens[:, None]
    if log_p0 is None:
        lp0 = torch.full((B, D), -math.log(max(D, 1)), device=dev, dtype=torch.float32)
    else:
        lp0 = log_p0.detach().to(torch.float32).contiguous()
    if log_q0 is None:
        lq0 = (-torch.log(lens.to(torch.float32)))[:, None] * mask
    else:
        lq0 = _pad_rows(log_q0.detach().to(torch.float32), B, N_pad, meta, dense) * mask
    w = {k: v.detach().to(device=dev, dtype=torch.float32).contiguous()
         for k, v in weights.items()}
    pb = _Problem(x32, lens, real_lens, lp0, lq0.contiguous(), w, meta["method"],
                  meta["variant"], meta["T"], meta["K"])
    fac = Factors(xc, xt, lens)
    return pb, fac, row_start, dense, meta["return_plan"]


# ============================================================================================
# custom operators: torch.compile(fullgraph=True) sees one opaque node for the forward and one
# for the backward (as triton_set / triton_badmm); the torch pieces of the backward (pooling /
# plan adjoint, factors -> x chain) are explicit formulas around the backward operator.
# Used when torch has triton_op, TRITON_BACKWARD is set and CHECKPOINT_EVERY is None (only the
# initial state is needed, rebuilt from the inputs); otherwise StructureROTFunction.
# ============================================================================================
USE_CUSTOM_OP = True
_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
structure_fwd_op = None
structure_bwd_op = None


def _op_meta(ptr, index, pos, method, variant, T, K, n_max, return_plan) -> dict:
    meta = dict(method=method, variant=variant, T=T, K=K, n_max=n_max,
                return_plan=return_plan)
    if ptr is not None:
        meta.update(ptr=ptr, index=index, pos=pos)
    return meta


def _op_weights(a0, a1, a2, a3, rho, tau) -> dict:
    return dict(a0=a0, a1=a1, a2=a2, a3=a3, rho=rho, tau=tau)


def structure_forward(x, ptr, index, pos, log_p0, log_q0, a0, a1, a2, a3, rho, tau, method,
                      variant, K, n_max, return_plan):
    """(y (B, D) in x's dtype, plan in x's layout or an empty tensor, log P_T (B, N_pad, D))."""
    meta = _op_meta(ptr, index, pos, method, variant, int(a1.shape[0]), K, n_max, return_plan)
    pb, fac, row_start, dense, _ = _forward_setup(x, log_p0, log_q0,
                                                  _op_weights(a0, a1, a2, a3, rho, tau), meta)
    log_p = final_log_p(pb, run_iterations(pb, fac, init_state(pb), 0, pb.T))
    plan = torch.empty(x.shape, device=x.device, dtype=x.dtype) if return_plan else None
    y = pool_launch(pb, log_p, x.dtype, plan, row_start, dense)
    return y, (plan if plan is not None else x.new_empty(0)), log_p


def structure_backward(x, ptr, index, pos, log_p0, log_q0, a0, a1, a2, a3, rho, tau, g_lp_T,
                       method, variant, K, n_max):
    """Gradients of the T iterations given ∂L/∂log P_T (B, N_pad, D): (x direct, xc, xt
    (B, N_pad, D), log p0 (B, D), log q0 (B, N_pad), weights (6, T) in _WEIGHTS order)."""
    meta = _op_meta(ptr, index, pos, method, variant, int(a1.shape[0]), K, n_max, False)
    pb, fac, _, _, _ = _forward_setup(x, log_p0, log_q0, _op_weights(a0, a1, a2, a3, rho, tau),
                                      meta)
    mask = torch.arange(pb.N, device=x.device)[None, :] < pb.lens[:, None]
    grads = [torch.zeros_like(pb.x32) for _ in range(3)]
    grads += [torch.zeros_like(pb.log_p0), torch.zeros_like(pb.log_q0)]
    grads += [torch.zeros_like(pb.w[k]) for k in _WEIGHTS]
    reverse_iterations(pb, fac, {0: init_state(pb)}, mask, g_lp_T.contiguous(), grads)
    return (*grads[:5], torch.stack(grads[5:]))


def _op_shapes(x, ptr, n_max):
    B = x.shape[0] if ptr is None else ptr.shape[0] - 1
    return B, max(n_max, 1), x.shape[-1]


if _HAS_TRITON_OP:
    try:
        from torch.library import triton_op, wrap_triton

        def _wrapped(fn, *args):
            _LAUNCH_WRAP[0] = wrap_triton
            try:
                return fn(*args)
            finally:
                _LAUNCH_WRAP[0] = None

        @triton_op("rotp_triton::structure_fwd", mutates_args=())
        def structure_fwd_op(x: Tensor, ptr: Optional[Tensor], index: Optional[Tensor],
                             pos: Optional[Tensor], log_p0: Optional[Tensor],
                             log_q0: Optional[Tensor], a0: Tensor, a1: Tensor, a2: Tensor,
                             a3: Tensor, rho: Tensor, tau: Tensor, method: str, variant: str,
                             K: int, n_max: int, return_plan: bool
                             ) -> Tuple[Tensor, Tensor, Tensor]:
            """See :func:`structure_forward`."""
            return _wrapped(structure_forward, x, ptr, index, pos, log_p0, log_q0, a0, a1, a2,
                            a3, rho, tau, method, variant, K, n_max, return_plan)

        @triton_op("rotp_triton::structure_bwd", mutates_args=())
        def structure_bwd_op(x: Tensor, ptr: Optional[Tensor], index: Optional[Tensor],
                             pos: Optional[Tensor], log_p0: Optional[Tensor],
                             log_q0: Optional[Tensor], a0: Tensor, a1: Tensor, a2: Tensor,
                             a3: Tensor, rho: Tensor, tau: Tensor, g_lp_T: Tensor, method: str,
                             variant: str, K: int, n_max: int
                             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
            """See :func:`structure_backward`."""
            return _wrapped(structure_backward, x, ptr, index, pos, log_p0, log_q0, a0, a1, a2,
                            a3, rho, tau, g_lp_T, method, variant, K, n_max)

        def _setup_context(ctx, inputs, output):
            (x, ptr, index, pos, log_p0, log_q0, a0, a1, a2, a3, rho, tau, method, variant, K,
             n_max, return_plan) = inputs
            ctx.save_for_backward(x, ptr, index, pos, log_p0, log_q0, a0, a1, a2, a3, rho, tau,
                                  output[2])
            ctx.args = (method, variant, K, n_max, return_plan)

        def _backward(ctx, gy, gplan, g_lp_out):
            x, ptr, index, pos, log_p0, log_q0, *ws, log_p_T = ctx.saved_tensors
            method, variant, K, n_max, return_plan = ctx.args
            B, N_pad, D = _op_shapes(x, ptr, n_max)
            dense = ptr is None
            rows = dict(index=index, pos=pos)
            x32 = _pad_rows(x.to(torch.float32), B, N_pad, rows, dense)
            if dense:
                real_lens = torch.full((B,), N_pad, dtype=torch.int64, device=x.device)
            else:
                real_lens = ptr[1:] - ptr[:-1]
            mask = torch.arange(N_pad, device=x.device)[None, :] < real_lens.clamp_min(1)[:, None]
            gp = None
            if return_plan and gplan is not None:
                gp = _pad_rows(gplan.to(torch.float32), B, N_pad, rows, dense)
            if gy is None:
                gy = x.new_zeros(B, D, dtype=torch.float32)
            g_lp, gx_pool = pool_plan_bwd(log_p_T, x32, mask, (real_lens == 0)[:, None], gy, gp)
            if g_lp_out is not None:
                g_lp = g_lp + g_lp_out
            g_x, g_xc, g_xt, g_lp0, g_lq0, g_w = structure_bwd_op(
                x, ptr, index, pos, log_p0, log_q0, *ws, g_lp, method, variant, K, n_max)
            gx = structure_factors_bwd(x32, mask, g_xc, g_xt) + g_x + gx_pool
            gx = (gx if dense else gx[index, pos]).to(x.dtype)
            g_lp0 = g_lp0.to(log_p0.dtype) if log_p0 is not None else None
            if log_q0 is not None:
                g_lq0 = (g_lq0 if dense else g_lq0[index, pos]).to(log_q0.dtype)
            else:
                g_lq0 = None
            gws = [g_w[i].to(w.dtype) for i, w in enumerate(ws)]
            return (gx, None, None, None, g_lp0, g_lq0, *gws, None, None, None, None, None)

        structure_fwd_op.register_autograd(_backward, setup_context=_setup_context)

        # Explicit fake kernels: under TRITON_INTERPRET=1 wrap_triton hands back the raw
        # interpreted kernel, which cannot run on fake tensors, so tracing needs these.
        @structure_fwd_op.register_fake
        def _structure_fwd_fake(x, ptr, index, pos, log_p0, log_q0, a0, a1, a2, a3, rho, tau,
                                method, variant, K, n_max, return_plan):
            B, N_pad, D = _op_shapes(x, ptr, n_max)
            plan = torch.empty(x.shape, device=x.device, dtype=x.dtype) if return_plan \
                else x.new_empty(0)
            return (x.new_empty(B, D), plan, x.new_empty(B, N_pad, D, dtype=torch.float32))

        @structure_bwd_op.register_fake
        def _structure_bwd_fake(x, ptr, index, pos, log_p0, log_q0, a0, a1, a2, a3, rho, tau,
                                g_lp_T, method, variant, K, n_max):
            B, N_pad, D = _op_shapes(x, ptr, n_max)
            f = dict(dtype=torch.float32)
            return (x.new_empty(B, N_pad, D, **f), x.new_empty(B, N_pad, D, **f),
                    x.new_empty(B, N_pad, D, **f), x.new_empty(B, D, **f),
                    x.new_empty(B, N_pad, **f), x.new_empty(6, a1.shape[0], **f))
    except Exception:  # pragma: no cover - a torch whose triton_op rejects these ops
        _HAS_TRITON_OP = False
        structure_fwd_op = structure_bwd_op = None


# ============================================================================================
# entry points (structure_pool: called by route.pool_sets)
# ============================================================================================
def rot_pool_structure_triton(x: Tensor, ptr: Optional[Tensor], *, method: str, variant: str,
                              a0: Tensor, a1: Tensor, a2: Tensor, a3: Tensor, rho: Tensor,
                              tau: Tensor, inner_iters: int, log_p0: Optional[Tensor],
                              log_q0: Optional[Tensor], return_plan: bool):
    """ROT pooling with α0 > 0 on the Triton kernels.

    Args:
        x: (B, N, D) dense batch (any strides) or (N_total, D) ragged batch, rows grouped by set.
        ptr: (B + 1,) int64 CSR offsets for a ragged x, None for a dense one.
        method: "sinkhorn" | "badmm-e" | "badmm-q"; variant: "exact" | "paper".
        a0, a1, a2, a3, rho, tau: (T,) weights (a2, a3 may be +inf); differentiable.
        inner_iters: K, inner Sinkhorn iterations per proximal step (S only).
        log_p0: (B, D) normalized log prior over features, or None (uniform).
        log_q0: like x[..., 0] ((B, N) or (N_total,)), normalized log prior, or None (uniform).
        return_plan: also return P in x's layout, each set's P summing to 1.

    Returns:
        (y (B, D) in x's dtype, plan or None).
    """
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the structure kernels take fp32/fp16/bf16 inputs, got {x.dtype}")
    dense = x.dim() == 3
    meta = dict(method=method, variant=variant, T=int(a1.shape[0]), K=int(inner_iters),
                return_plan=bool(return_plan))
    if dense:
        meta["n_max"] = x.shape[1]
    else:
        if ptr is None:
            raise ValueError("a ragged x needs ptr")
        ptr = ptr.to(device=x.device, dtype=torch.int64)
        lens = ptr[1:] - ptr[:-1]
        meta["ptr"] = ptr
        meta["n_max"] = int(lens.max()) if lens.numel() else 0
        index = torch.repeat_interleave(torch.arange(lens.numel(), device=x.device), lens)
        meta["index"] = index
        meta["pos"] = torch.arange(x.shape[0], device=x.device) - ptr[index]
    if (USE_CUSTOM_OP and structure_fwd_op is not None and TRITON_BACKWARD
            and not CHECKPOINT_EVERY and (x.shape[1] > 0 if dense else True)):
        y, plan, _ = structure_fwd_op(x, meta.get("ptr"), meta.get("index"), meta.get("pos"),
                                      log_p0, log_q0, a0, a1, a2, a3, rho, tau, method, variant,
                                      int(inner_iters), meta["n_max"], bool(return_plan))
        return y, (plan if return_plan else None)
    y, plan = StructureROTFunction.apply(x, log_p0, log_q0, a0, a1, a2, a3, rho, tau, meta)
    return y, plan


def structure_pool(x: Tensor, ptr: Optional[Tensor], w: Tensor, log_p0: Optional[Tensor],
                   log_q0: Optional[Tensor], *, method: str, variant: str, inner_iters: int,
                   return_plan: bool):
    """The family's entry point (CONTRACT): the (6, T) weight table ``w`` instead of six
    vectors; otherwise as :func:`rot_pool_structure_triton`."""
    a0, a1, a2, a3, rho, tau = w.unbind(0)
    return rot_pool_structure_triton(x, ptr, method=method, variant=variant, a0=a0, a1=a1,
                                     a2=a2, a3=a3, rho=rho, tau=tau, inner_iters=inner_iters,
                                     log_p0=log_p0, log_q0=log_q0, return_plan=return_plan)
