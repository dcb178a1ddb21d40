"""``@triton.jit`` kernels of local k×k ROT pooling with α0 = 0 (DESIGN §7; host side in
``launch.py``, autograd in ``op.py``; sm_90 analysis in bench/results/window_sass_*.md).

Every window of ``x (B, C, H, W)`` is one set: its valid pixel positions are the N ≤ kh·kw
samples, the C channels the features. One program owns a ``[BW, BN, BC]`` register tile (BW
windows × next_pow2(N) × next_pow2(C)), read from NCHW or channels_last by strides. The channel
axis is the last: the lanes run over channels and a window's samples of a channel sit in one
thread, so the LSE over samples is in-thread and the LSE over channels a warp (or CTA)
reduction. The per-iteration scalars (1/ε, κ2, κ3 for Sinkhorn; ρ, 1/ω, κ2, κ3, c1, c2 for
B-ADMM) are derived on chip from the (6, T) weight table (``params.py`` rows); the backward maps
their cotangents back onto that table.

Forward (``window_fwd_kernel``): all T iterations in registers, fp32 state, logs in base 2 so
that every element costs FMA/add + one exp2 per LSE; logs (lg2.approx) and reciprocals
(rcp.approx) only on the reduced vectors; masks only in launches where windows lose samples
(padding, border, ceil_mode, k² not a power of 2) or C < BC (``MASKED``), otherwise only the
last tile's loads/stores (``TAIL``). B-ADMM peels the last iteration's S-step (the output reads
the last P-step's logits only); B-Q carries S instead of recomputing exp(log S).

Backward (``window_bwd_kernel``): the exact gradient of the T unrolled iterations, in natural
logs, in segments of L iterations (``launch.bwd_config``), the last segment first: the program
replays the segment once from its starting state, keeping each iteration's state in registers
(a tuple ``tape``, unrolled at compile time), then back-propagates through it in reverse. With
T ≤ L (W3: Sinkhorn L = 16, B-ADMM 4) that is O(T); the starting state of every further
segment is recomputed from iteration 0. Nothing per iteration reaches global memory, so memory
does not grow with T. Same masking and MUFU rules as the forward.

Per-window updates (LSE_n: over the window's valid samples, LSE_d: over the C channels; the
pooled output is y_d = Σ_n softmax_n(L)_nd x_nd, and every per-channel shift of L cancels):
  Sinkhorn exact:  R = LSE_n(x/ε + b); a = lognorm_d(κ2 log p0 + (1-κ2) R) - R
                   C = LSE_d(x/ε + a); b = lognorm_n(κ3 log q0 + (1-κ3) C) - C;  L = x/ε_T + b
  Sinkhorn paper:  R, C from Y = x/ε' + a + b;  a = κ2(a/ε + log p0 - R), b = κ3(b/ε + log q0 - C)
  B-ADMM:          DESIGN §3.1 (exact) / §3.2 (paper), state log S, Z (N×C per window)
                   [+ log μ, z1 (C), log η, z2 (N) for paper]; L = Y of the last P-step.

Limits (sm_90 AOT, tests/ops/rot/test_window.py): no register spills up to 8,192 tile elements
forward and 2,048 backward (2×2 windows: C ≤ 2048 / C ≤ 512; 3×3, padded to 16 samples:
C ≤ 512 / C ≤ 128); larger tiles run with spills (3×3 B-ADMM backward at C = 256: 8-160 B).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .. import common
from ..common import lg2_approx_ftz, rcp_approx
from ... import params

LOG2E = tl.constexpr(common.LOG2E)
LN2 = tl.constexpr(common.LN2)
# rows of the (6, T) weight table (params.py)
_A1 = tl.constexpr(params.A1)
_A2 = tl.constexpr(params.A2)
_A3 = tl.constexpr(params.A3)
_RHO = tl.constexpr(params.RHO)


# axes of the [BW, BN, BC] tile. The channels are the last axis: with no contiguity known along
# the samples (the kernels do not specialise on sxh, sxw == 1) the compiler spreads the lanes over
# the channels and keeps a window's samples of a channel in one thread.
AX_N = tl.constexpr(1)
AX_C = tl.constexpr(2)
# --------------------------------------------------------------------------------------------
# per-iteration scalars from the weight table, and their cotangents back onto it
# --------------------------------------------------------------------------------------------
@triton.jit
def _weight(w_ptr, row: tl.constexpr, t, T: tl.constexpr):
    return tl.load(w_ptr + row * T + t)


@triton.jit
def _kappa_grads(alpha, w):
    """(∂κ/∂α, ∂κ/∂w) of κ(α, w) = α/(α + w): w/(α+w)², -α/(α+w)²; both 0 at α = +inf."""
    inf = alpha == float("inf")
    a = tl.where(inf, 0.0, alpha)
    d = 1.0 / ((a + w) * (a + w))
    return tl.where(inf, 0.0, w * d), tl.where(inf, 0.0, -a * d)


@triton.jit
def _kappa(alpha, w, RCP: tl.constexpr):
    """``common.kappa``, its division as one MUFU.RCP with RCP."""
    return tl.where(alpha == float("inf"), 1.0, alpha * _rcp(alpha + w, RCP))


# The per-iteration weights below are formed by every thread. RCP: their divisions as MUFU.RCP
# (within an ulp): the forward kernels under FAST_MATH, where precise divisions were 8 % of the
# W3 B-E loop. The backward keeps precise ones (B-Q at C = 64, stride 1 spilled 16 B with
# RCP), so the states it rebuilds may differ from the forward's in the last bits.
@triton.jit
def sinkhorn_params(w_ptr, t, T: tl.constexpr, RCP: tl.constexpr):
    """(1/ε, κ(α2, ε), κ(α3, ε)) of iteration t, ε = α1."""
    a1 = _weight(w_ptr, _A1, t, T)
    return (_rcp(a1, RCP), _kappa(_weight(w_ptr, _A2, t, T), a1, RCP),
            _kappa(_weight(w_ptr, _A3, t, T), a1, RCP))


@triton.jit
def sinkhorn_params_bwd(w_ptr, t, T: tl.constexpr, g_u, g_k2, g_k3):
    """(∂/∂α1, ∂/∂α2, ∂/∂α3) of iteration t from the cotangents of (1/ε, κ2, κ3)."""
    a1 = _weight(w_ptr, _A1, t, T)
    dk2_da2, dk2_da1 = _kappa_grads(_weight(w_ptr, _A2, t, T), a1)
    dk3_da3, dk3_da1 = _kappa_grads(_weight(w_ptr, _A3, t, T), a1)
    return -g_u / (a1 * a1) + g_k2 * dk2_da1 + g_k3 * dk3_da1, g_k2 * dk2_da2, g_k3 * dk3_da3


@triton.jit
def admm_params(w_ptr, t, T: tl.constexpr, QUAD: tl.constexpr, PAPER: tl.constexpr,
                RCP: tl.constexpr):
    """(ρ, 1/ω, κ2, κ3, c1, c2) of iteration t. ω is the step weight of the P-step and the B-Q
    S-step: ρ + α1 for B-Q exact (reference/rot.py ``_exact_badmm``: a majorised linearisation,
    non-expansive for every α1/ρ), ρ otherwise; the dual step Z += ρ (P - S) keeps ρ.
    κ2 = κ(α2, ω); κ3 = κ(α3, α1 + ρ) (B-E exact) or κ(α3, ω); c1 = 1/(α1 + ρ),
    c2 = ρ/(α1 + ρ) (B-E) or c1 = α1/ω, c2 = 0 (B-Q)."""
    a1 = _weight(w_ptr, _A1, t, T)
    a3 = _weight(w_ptr, _A3, t, T)
    rho = _weight(w_ptr, _RHO, t, T)
    om = rho
    if QUAD and not PAPER:
        om = rho + a1
    iom = _rcp(om, RCP)
    k2 = _kappa(_weight(w_ptr, _A2, t, T), om, RCP)
    if QUAD:
        k3 = _kappa(a3, om, RCP)
        c1 = a1 * iom
        c2 = a1 * 0.0
    else:
        wq = a1 + rho
        if PAPER:
            k3 = _kappa(a3, rho, RCP)
        else:
            k3 = _kappa(a3, wq, RCP)
        c1 = _rcp(wq, RCP)
        c2 = rho * c1
    return rho, iom, k2, k3, c1, c2


@triton.jit
def admm_params_bwd(w_ptr, t, T: tl.constexpr, g_rho, g_iom, g_k2, g_k3, g_c1, g_c2,
                    QUAD: tl.constexpr, PAPER: tl.constexpr):
    """(∂/∂α1, ∂/∂α2, ∂/∂α3, ∂/∂ρ) of iteration t from the cotangents of admm_params. For B-Q
    exact the cotangent of ω = ρ + α1 goes to both α1 and ρ (∂ω/∂α1 = ∂ω/∂ρ = 1)."""
    a1 = _weight(w_ptr, _A1, t, T)
    a3 = _weight(w_ptr, _A3, t, T)
    rho = _weight(w_ptr, _RHO, t, T)
    om = rho
    if QUAD and not PAPER:
        om = rho + a1
    dk2_da2, dk2_dom = _kappa_grads(_weight(w_ptr, _A2, t, T), om)
    # cotangent of ω from 1/ω and κ2 (both variants of both methods read them through ω)
    g_om = -g_iom / (om * om) + g_k2 * dk2_dom
    g_a1 = g_c1 * 0.0
    g_r = g_rho
    if QUAD:
        dk3_da3, dk3_dom = _kappa_grads(a3, om)
        # c1 = α1/ω
        g_om += g_k3 * dk3_dom - g_c1 * a1 / (om * om)
        g_a1 += g_c1 / om
    else:
        wq = a1 + rho
        iw2 = 1.0 / (wq * wq)
        if PAPER:
            dk3_da3, dk3_dw = _kappa_grads(a3, rho)
            g_r += g_k3 * dk3_dw
        else:
            dk3_da3, dk3_dw = _kappa_grads(a3, wq)
            g_r += g_k3 * dk3_dw
            g_a1 += g_k3 * dk3_dw
        # c1 = 1/w, c2 = ρ/w with w = α1 + ρ
        g_a1 += -g_c1 * iw2 - g_c2 * rho * iw2
        g_r += -g_c1 * iw2 + g_c2 * a1 * iw2
    g_r += g_om
    if QUAD and not PAPER:
        g_a1 += g_om
    return g_a1, g_k2 * dk2_da2, g_k3 * dk3_da3, g_r


# --------------------------------------------------------------------------------------------
# backward (natural logs): reductions over the valid entries (every reduced row holds at least
# one), masks only in MASKED launches, exp2 of one FFMA per element, lg2/rcp only on the reduced
# vectors (MUFU with FAST)
# --------------------------------------------------------------------------------------------
@triton.jit
def _exp(v):
    return tl.exp2(v * LOG2E)


@triton.jit
def _exp_parts(y, valid, AXIS: tl.constexpr, MASKED: tl.constexpr):
    """(max m, e^(y - m), Σ e^(y - m)) along AXIS over the valid entries (kept dims)."""
    if MASKED:
        y = tl.where(valid, y, float("-inf"))
    m = tl.max(y, axis=AXIS, keep_dims=True)
    e = tl.exp2(y * LOG2E - m * LOG2E)
    return m, e, tl.sum(e, axis=AXIS, keep_dims=True)


@triton.jit
def _lse(y, valid, AXIS: tl.constexpr, MASKED: tl.constexpr, FAST: tl.constexpr):
    """LogSumExp of y along AXIS over the valid entries, keeping the reduced axis (size 1)."""
    m, e, s = _exp_parts(y, valid, AXIS, MASKED)
    return m + _log2(s, FAST) * LN2


@triton.jit
def _softmax(y, valid, AXIS: tl.constexpr, MASKED: tl.constexpr, FAST: tl.constexpr):
    """softmax of y along AXIS over the valid entries (0 elsewhere)."""
    m, e, s = _exp_parts(y, valid, AXIS, MASKED)
    return e * _rcp(s, FAST)


@triton.jit
def _lse_softmax(y, valid, AXIS: tl.constexpr, MASKED: tl.constexpr, FAST: tl.constexpr):
    """(LogSumExp, softmax) of y along AXIS over the valid entries from one pass of exps: the
    B-ADMM plans are softmax · marginal (P = softmax_n(Y) μ, S = softmax_d(Y2) η), which saves
    two exps per element and iteration over exp(log P), exp(log S)."""
    m, e, s = _exp_parts(y, valid, AXIS, MASKED)
    return m + _log2(s, FAST) * LN2, e * _rcp(s, FAST)


@triton.jit
def _softmax_of(y, lse):
    """softmax from its LogSumExp: e^(y - lse), one exp per element and no reduction (entries
    outside the valid ones are left for the caller's mask). The exponent, ≤ 0 in exact
    arithmetic, is clamped there (|x|/ε ≳ 1e9 rounds it up to values that would overflow)."""
    return tl.exp2(tl.minimum(y - lse, 0.0) * LOG2E)


@triton.jit
def _softmax_taped(y, lse, valid, AXIS: tl.constexpr, MASKED: tl.constexpr,
                   FAST: tl.constexpr, TAPED: tl.constexpr):
    """softmax of y along AXIS: from its LogSumExp ``lse`` when TAPED, else from y alone."""
    if TAPED:
        sm = _softmax_of(y, lse)
    else:
        sm = _softmax(y, valid, AXIS, MASKED, FAST)
    return sm


@triton.jit
def _sum(v, AXIS: tl.constexpr):
    return tl.sum(v, axis=AXIS, keep_dims=True)


@triton.jit
def _lognorm_bwd(g, sm, valid, AXIS: tl.constexpr, MASKED: tl.constexpr):
    """VJP of v -> v - LSE(v) along AXIS: g - softmax(v) Σ g (sm = softmax(v))."""
    g = _keep(g, valid, MASKED)
    return _keep(g - sm * _sum(g, AXIS), valid, MASKED)


# --------------------------------------------------------------------------------------------
# backward: Sinkhorn, state a [BW, 1, BC], b [BW, BN, 1]
# --------------------------------------------------------------------------------------------
@triton.jit
def _sinkhorn_step(x, a, b, u_prev, u, k2, k3, lp0, lq0, sv, cv, PAPER: tl.constexpr,
                   MASKED: tl.constexpr, FAST: tl.constexpr):
    """One iteration: (a, b) -> (a', b'), and the LogSumExps over the channels it formed
    (exact: C [BW, BN, 1] and LSE_d(v) [BW, 1, 1]; paper: C and a zero). ``u`` = 1/ε_t;
    ``u_prev`` = 1/ε of the Y the paper's Jacobi step reads (ε_{t-1}, ε_0 at t = 0)."""
    if PAPER:
        y = x * u_prev + a + b                                         # [BW, BN, BC]
        r = _lse(y, sv, AX_N, MASKED, FAST)  # [BW, 1, BC]
        c = _keep(_lse(y, cv, AX_C, MASKED, FAST), sv, MASKED)  # [BW, BN, 1]
        a_new = _keep(k2 * (a * u + lp0 - r), cv, MASKED)
        b_new = _keep(k3 * (b * u + lq0 - c), sv, MASKED)
        lse_v = _sum(c, AX_N) * 0.0                                   # (unused)
    else:
        xu = x * u
        r = _lse(xu + b, sv, AX_N, MASKED, FAST)  # [BW, 1, BC] R_d
        v = k2 * lp0 + (1 - k2) * r
        lse_v = _lse(v, cv, AX_C, MASKED, FAST)                        # [BW, 1, 1]
        a_new = _keep(v - lse_v - r, cv, MASKED)
        c = _keep(_lse(xu + a_new, cv, AX_C, MASKED, FAST), sv, MASKED)  # [BW, BN, 1] C_n
        q = k3 * lq0 + (1 - k3) * c
        b_new = _keep(q - _lse(q, sv, AX_N, MASKED, FAST) - c, sv, MASKED)
    return a_new, b_new, c, lse_v


@triton.jit
def _sinkhorn_step_bwd(x, a, b, u_prev, u, k2, k3, lp0, lq0, sv, cv, ga_new, gb_new, c_t,
                       lse_v_t, PAPER: tl.constexpr, MASKED: tl.constexpr, FAST: tl.constexpr,
                       TAPED: tl.constexpr):
    """VJP of _sinkhorn_step: returns (gx, ga, gb, gu_prev, gu, gk2, gk3); the scalar grads are
    summed over the tile. TAPED: the step's LogSumExps over the channels (c_t, lse_v_t, as the
    replay formed them) come from the tape instead of two more reductions across the lanes
    each, and the softmaxes over the channels are e^(y - LSE) (``_softmax_of``)."""
    if PAPER:
        y = x * u_prev + a + b
        r = _lse(y, sv, AX_N, MASKED, FAST)
        if TAPED:
            c = c_t
        else:
            c = _keep(_lse(y, cv, AX_C, MASKED, FAST), sv, MASKED)
        ga_new = _keep(ga_new, cv, MASKED)
        gb_new = _keep(gb_new, sv, MASKED)
        gk2 = _tsum(ga_new * (a * u + lp0 - r))
        gk3 = _tsum(gb_new * (b * u + lq0 - c))
        gu = _tsum(k2 * ga_new * a) + _tsum(k3 * gb_new * b)
        # y feeds R (softmax over n) and C (softmax over d)
        gy = (_softmax(y, sv, AX_N, MASKED, FAST) * (-k2 * ga_new)
              + _softmax_taped(y, c, cv, AX_C, MASKED, FAST, TAPED) * (-k3 * gb_new))
        gy = _keep(gy, sv & cv, MASKED)
        gx = u_prev * gy
        gu_prev = _tsum(x * gy)
        ga = k2 * u * ga_new + _sum(gy, AX_N)
        gb = k3 * u * gb_new + _sum(gy, AX_C)
    else:
        xu = x * u
        y1 = xu + b
        r = _lse(y1, sv, AX_N, MASKED, FAST)  # [BW, 1, BC]
        v = k2 * lp0 + (1 - k2) * r
        if TAPED:
            lse_v = lse_v_t
        else:
            lse_v = _lse(v, cv, AX_C, MASKED, FAST)
        a_new = _keep(v - lse_v - r, cv, MASKED)
        y2 = xu + a_new
        if TAPED:
            c = c_t
        else:
            c = _keep(_lse(y2, cv, AX_C, MASKED, FAST), sv, MASKED)  # [BW, BN, 1]
        q = k3 * lq0 + (1 - k3) * c
        # b' = lognorm_n(q) - C
        gq = _lognorm_bwd(gb_new, _softmax(q, sv, AX_N, MASKED, FAST), sv, AX_N,
                          MASKED)  # [BW, BN, 1]
        gc = _keep(-gb_new + (1 - k3) * gq, sv, MASKED)
        gk3 = _tsum(gq * (lq0 - c))
        gy2 = _keep(_softmax_taped(y2, c, cv, AX_C, MASKED, FAST, TAPED) * gc, sv & cv,
                    MASKED)                                            # [BW, BN, BC]
        ga = _keep(ga_new + _sum(gy2, AX_N), cv, MASKED)                  # [BW, 1, BC]
        # a' = lognorm_d(v) - R
        gv = _lognorm_bwd(ga, _softmax_taped(v, lse_v, cv, AX_C, MASKED, FAST, TAPED), cv,
                          AX_C, MASKED)
        gr = _keep(-ga + (1 - k2) * gv, cv, MASKED)
        gk2 = _tsum(gv * (lp0 - r))
        gy1 = _keep(_softmax(y1, sv, AX_N, MASKED, FAST) * gr, sv & cv, MASKED)
        gx = u * (gy1 + gy2)
        gu = _tsum(x * (gy1 + gy2))
        gu_prev = gu * 0.0
        gb = _sum(gy1, AX_C)
        ga = ga * 0.0                                                  # a does not feed a'
    return gx, ga, gb, gu_prev, gu, gk2, gk3


# --------------------------------------------------------------------------------------------
# backward: Bregman ADMM, state log S, Z [BW, BN, BC]; log μ, z1 [BW, 1, BC]; log η, z2 [BW, BN, 1]
# (the last four are the paper variant's marginal variables and stay put in the exact variant)
# params: ρ, 1/ω, κ2, κ3, c1, c2 (admm_params; ω = ρ + α1 for B-Q exact, else ρ) with
# c1 = 1/(α1+ρ), c2 = ρ/(α1+ρ) (B-E) or c1 = α1/ω (B-Q); "irho" below holds 1/ω
# --------------------------------------------------------------------------------------------
@triton.jit
def _admm_p_logits(x, log_s, z, irho, c1, m, QUAD: tl.constexpr, MASKED: tl.constexpr):
    """Y of the P-step: log S + (X - Z)/ω [- α1 S/ω] (masked to 0)."""
    y = log_s + (x - z) * irho
    if QUAD:
        y = y - c1 * _keep(_exp(log_s), m, MASKED)
    return _keep(y, m, MASKED)


@triton.jit
def _admm_step(x, log_s, z, lmu, leta, z1, z2, rho, irho, k2, k3, c1, c2, lp0, lq0, sv, cv,
               QUAD: tl.constexpr, PAPER: tl.constexpr, MASKED: tl.constexpr,
               FAST: tl.constexpr):
    """One B-ADMM iteration; returns the new state and Y (the P-step logits of this iteration)."""
    m = sv & cv
    y = _admm_p_logits(x, log_s, z, irho, c1, m, QUAD, MASKED)                 # [BW, BN, BC]
    r, sm1 = _lse_softmax(y, sv, AX_N, MASKED, FAST)  # [BW, 1, BC] R
    if PAPER:
        log_mu = lmu
    else:
        v = k2 * lp0 + (1 - k2) * r
        log_mu = v - _lse(v, cv, AX_C, MASKED, FAST)
    log_p = _keep(y + log_mu - r, m, MASKED)
    p = _keep(sm1 * _exp(log_mu), m, MASKED)                           # exp(log P)
    if QUAD:
        y2 = log_p + z * irho - c1 * p
    else:
        y2 = z * c1 + log_p * c2
    c, sm2 = _lse_softmax(y2, cv, AX_C, MASKED, FAST)  # [BW, BN, 1] C
    c = _keep(c, sv, MASKED)
    if PAPER:
        log_eta = leta
    else:
        q = k3 * lq0 + (1 - k3) * c
        log_eta = q - _lse(q, sv, AX_N, MASKED, FAST)
    log_s_new = _keep(y2 + log_eta - c, m, MASKED)
    s_new = _keep(sm2 * _exp(log_eta), m, MASKED)                      # exp(log S')
    z_new = z + rho * (p - s_new)
    if PAPER:
        t1 = (1 - k2) * (lmu - z1 * irho) + k2 * lp0
        lmu_new = _keep(t1 - _lse(t1, cv, AX_C, MASKED, FAST), cv, MASKED)
        t2 = (1 - k3) * (leta - z2 * irho) + k3 * lq0
        leta_new = _keep(t2 - _lse(t2, sv, AX_N, MASKED, FAST), sv, MASKED)
        z1_new = _keep(z1 + rho * (_exp(lmu_new) - _sum(p, AX_N)), cv, MASKED)
        z2_new = _keep(z2 + rho * (_exp(leta_new) - _sum(s_new, AX_C)), sv, MASKED)
    else:
        lmu_new, leta_new, z1_new, z2_new = lmu, leta, z1, z2
    return log_s_new, z_new, lmu_new, leta_new, z1_new, z2_new, y


@triton.jit
def _tsum(v):
    """[BW, BN, BC] -> scalar in one reduction (axis None: each thread sums its own elements,
    then one exchange across lanes and warps; reducing the channels first sent every sample's
    partial through the shuffle tree and shared memory, BN times the exchanges)."""
    return tl.sum(v)


@triton.jit
def _admm_step_bwd(x, log_s, z, lmu, leta, z1, z2, rho, irho, k2, k3, c1, c2, lp0, lq0, sv, cv,
                   g_log_s_new, g_z_new, g_lmu_new, g_leta_new, g_z1_new, g_z2_new, g_y,
                   QUAD: tl.constexpr, PAPER: tl.constexpr, MASKED: tl.constexpr,
                   FAST: tl.constexpr):
    """VJP of _admm_step (g_y: cotangent of the returned Y). Returns gx, the state cotangents
    and the (tile-summed) cotangents of ρ, 1/ω, κ2, κ3, c1, c2."""
    m = sv & cv
    # ---- recompute the forward of this iteration
    s = _keep(_exp(log_s), m, MASKED)
    y = _admm_p_logits(x, log_s, z, irho, c1, m, QUAD, MASKED)
    r, sm1 = _lse_softmax(y, sv, AX_N, MASKED, FAST)
    if PAPER:
        log_mu = lmu
    else:
        v = k2 * lp0 + (1 - k2) * r
        log_mu = v - _lse(v, cv, AX_C, MASKED, FAST)
    log_p = _keep(y + log_mu - r, m, MASKED)
    p = _keep(sm1 * _exp(log_mu), m, MASKED)
    if QUAD:
        y2 = log_p + z * irho - c1 * p
    else:
        y2 = z * c1 + log_p * c2
    c, sm2 = _lse_softmax(y2, cv, AX_C, MASKED, FAST)
    c = _keep(c, sv, MASKED)
    if PAPER:
        log_eta = leta
    else:
        q = k3 * lq0 + (1 - k3) * c
        log_eta = q - _lse(q, sv, AX_N, MASKED, FAST)
    s_new = _keep(sm2 * _exp(log_eta), m, MASKED)

    # ---- backward
    # the weights' tile sums, fewest a step: exact B-E has c2 = ρ c1 and 1/ω = 1/ρ
    # (admm_params), so c2's and 1/ω's terms join c1's and ρ's before summing (FOLD: 2 sums
    # instead of 4); B-Q sums 1/ω's and c1's two terms each once (3 instead of 5)
    FOLD: tl.constexpr = not (QUAD or PAPER)
    g_z = _keep(g_z_new, m, MASKED)
    if FOLD:
        g_rho_el = g_z * (p - s_new)                # ρ's terms, summed once at the end
        g_rho = 0.0
    else:
        g_rho = _tsum(g_z * (p - s_new))
    g_p = rho * g_z
    g_s_new = -rho * g_z
    g_irho = g_rho * 0.0
    g_k2 = g_rho * 0.0
    g_k3 = g_rho * 0.0
    g_lmu = g_lmu_new * 0.0
    g_leta = g_leta_new * 0.0
    g_z1 = g_z1_new * 0.0
    g_z2 = g_z2_new * 0.0
    if PAPER:
        lmu_t1 = lmu - z1 * irho
        t1 = (1 - k2) * lmu_t1 + k2 * lp0
        lmu_new = _keep(t1 - _lse(t1, cv, AX_C, MASKED, FAST), cv, MASKED)
        leta_t2 = leta - z2 * irho
        t2 = (1 - k3) * leta_t2 + k3 * lq0
        leta_new = _keep(t2 - _lse(t2, sv, AX_N, MASKED, FAST), sv, MASKED)
        g_z1n = _keep(g_z1_new, cv, MASKED)
        g_z2n = _keep(g_z2_new, sv, MASKED)
        g_rho += _tsum(g_z1n * (_exp(lmu_new) - _sum(p, AX_N)))
        g_rho += _tsum(g_z2n * (_exp(leta_new) - _sum(s_new, AX_C)))
        g_z1 = g_z1n
        g_z2 = g_z2n
        g_p += -rho * g_z1n
        g_s_new += -rho * g_z2n
        g_lmu_n = g_lmu_new + rho * _exp(lmu_new) * g_z1n
        g_leta_n = g_leta_new + rho * _exp(leta_new) * g_z2n
        g_t1 = _lognorm_bwd(g_lmu_n, _softmax(t1, cv, AX_C, MASKED, FAST), cv, AX_C, MASKED)
        g_k2 = _tsum(g_t1 * (lp0 - lmu_t1))
        g_lmu = (1 - k2) * g_t1
        g_z1 += -(1 - k2) * irho * g_t1
        g_irho += -_tsum((1 - k2) * z1 * g_t1)
        g_t2 = _lognorm_bwd(g_leta_n, _softmax(t2, sv, AX_N, MASKED, FAST), sv, AX_N, MASKED)
        g_k3 = _tsum(g_t2 * (lq0 - leta_t2))
        g_leta = (1 - k3) * g_t2
        g_z2 += -(1 - k3) * irho * g_t2
        g_irho += -_tsum((1 - k3) * z2 * g_t2)
    # log S' = Y2 + log η - LSE_d(Y2)
    g_ls = _keep(g_log_s_new + s_new * g_s_new, m, MASKED)
    g_c = -_sum(g_ls, AX_C)                                               # [BW, BN, 1]
    if PAPER:
        g_leta += _sum(g_ls, AX_C)
    else:
        g_q = _lognorm_bwd(_sum(g_ls, AX_C), _softmax(q, sv, AX_N, MASKED, FAST), sv, AX_N, MASKED)
        g_c += (1 - k3) * g_q
        g_k3 = _tsum(g_q * (lq0 - c))
    g_c = _keep(g_c, sv, MASKED)
    g_y2 = _keep(g_ls + sm2 * g_c, m, MASKED)
    if QUAD:
        g_logp = g_y2
        g_z += irho * g_y2
        g_p += -c1 * g_y2
        g_iom_el = z * g_y2                         # 1/ω's and c1's terms, each summed once
        g_c1_el = p * g_y2                          # at the end (with Y's terms)
        g_c2 = g_rho * 0.0
    else:
        g_logp = c2 * g_y2
        g_z += c1 * g_y2
        if FOLD:
            g_c1 = _tsum((z + rho * log_p) * g_y2)
            g_c2 = g_c1 * 0.0
            g_rho_el += c1 * (log_p * g_y2)
        else:
            g_c1 = _tsum(z * g_y2)
            g_c2 = _tsum(log_p * g_y2)
    g_logp = _keep(g_logp + p * g_p, m, MASKED)
    # log P = Y + log μ - LSE_n(Y)
    g_lmu_sum = _sum(g_logp, AX_N)                                        # [BW, 1, BC]
    g_r = -g_lmu_sum
    if PAPER:
        g_lmu += g_lmu_sum
    else:
        g_v = _lognorm_bwd(g_lmu_sum, _softmax(v, cv, AX_C, MASKED, FAST), cv, AX_C, MASKED)
        g_r += (1 - k2) * g_v
        g_k2 = _tsum(g_v * (lp0 - r))
    g_r = _keep(g_r, cv, MASKED)
    g_yy = _keep(g_logp + g_y + sm1 * g_r, m, MASKED)
    # Y = log S + (X - Z)/ω [- c1 S]
    g_x = irho * g_yy
    g_z += -irho * g_yy
    if FOLD:
        g_rho = _tsum(g_rho_el - (irho * irho) * ((x - z) * g_yy))
    elif QUAD:
        g_irho += _tsum(g_iom_el + (x - z) * g_yy)
    else:
        g_irho += _tsum((x - z) * g_yy)
    g_log_s = g_yy
    if QUAD:
        g_c1 = -_tsum(g_c1_el + s * g_yy)
        g_log_s += -c1 * s * g_yy
    g_log_s = _keep(g_log_s, m, MASKED)
    return (g_x, g_log_s, g_z, g_lmu, g_leta, g_z1, g_z2,
            g_rho, g_irho, g_k2, g_k3, g_c1, g_c2)


# --------------------------------------------------------------------------------------------
# tile setup shared by the forward and backward kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _sinkhorn_run(x, w_ptr, n_steps, T: tl.constexpr, lp0, lq0, sv, cv, PAPER: tl.constexpr,
                  MASKED: tl.constexpr, FAST: tl.constexpr, BW: tl.constexpr,
                  BN: tl.constexpr, BC: tl.constexpr):
    """(a, b, 1/ε of the last step) after the first ``n_steps`` Sinkhorn iterations from
    a = b = 0: the backward's state at the start of a segment."""
    a = tl.zeros([BW, 1, BC], dtype=tl.float32)
    b = tl.zeros([BW, BN, 1], dtype=tl.float32)
    u_prev, _k2, _k3 = sinkhorn_params(w_ptr, 0, T, False)
    for t in range(n_steps):
        u, k2, k3 = sinkhorn_params(w_ptr, t, T, False)
        a, b, _c, _lv = _sinkhorn_step(x, a, b, u_prev, u, k2, k3, lp0, lq0, sv, cv, PAPER,
                                       MASKED, FAST)
        u_prev = u
    return a, b, u_prev


@triton.jit
def _admm_run(x, w_ptr, n_steps, T: tl.constexpr, lp0, lq0, sv, cv, QUAD: tl.constexpr,
              PAPER: tl.constexpr, MASKED: tl.constexpr, FAST: tl.constexpr,
              BW: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr):
    """The B-ADMM state (log S, Z, log μ, log η, z1, z2) after the first ``n_steps`` iterations
    from log S = log(p0 q0ᵀ), Z = 0: the backward's state at the start of a segment."""
    m = sv & cv
    log_s = _keep(lp0 + lq0 + tl.zeros([BW, BN, BC], dtype=tl.float32), m, MASKED)
    z = tl.zeros([BW, BN, BC], dtype=tl.float32)
    lmu = _keep(lp0 + tl.zeros([BW, 1, BC], dtype=tl.float32), cv, MASKED)
    leta = lq0 + tl.zeros([BW, BN, 1], dtype=tl.float32)
    z1 = tl.zeros([BW, 1, BC], dtype=tl.float32)
    z2 = tl.zeros([BW, BN, 1], dtype=tl.float32)
    for t in range(n_steps):
        rho, irho, k2, k3, c1, c2 = admm_params(w_ptr, t, T, QUAD, PAPER, False)
        log_s, z, lmu, leta, z1, z2, _y = _admm_step(
            x, log_s, z, lmu, leta, z1, z2, rho, irho, k2, k3, c1, c2, lp0, lq0, sv, cv, QUAD,
            PAPER, MASKED, FAST)
    return log_s, z, lmu, leta, z1, z2


@triton.jit
def _window_tile(pid, C, H, W, Ho, Wo, n_windows, KH: tl.constexpr, KW: tl.constexpr,
                 SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                 BW: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, ADAPTIVE: tl.constexpr):
    """Indices and masks of the program's tile of BW windows: [BW] window and [BW, BN] sample
    positions, [BC] channels (the kernels expand them to [BW, BN, BC]). ADAPTIVE:
    nn.AdaptiveAvgPool2d's windows, rows floor(oh·H/Ho) to ceil((oh+1)·H/Ho) (likewise
    columns; sizes differ by one at most, KH × KW the largest), instead of stride and padding."""
    offs_w = pid * BW + tl.arange(0, BW)                               # [BW]
    w_ok = offs_w < n_windows
    ow = offs_w % Wo
    oh = (offs_w // Wo) % Ho
    bi = (offs_w // Wo) // Ho
    offs_n = tl.arange(0, BN)
    ki = offs_n // KW
    kj = offs_n % KW
    if ADAPTIVE:
        h1 = ((oh + 1) * H + Ho - 1) // Ho                             # [BW] rows h0 .. h1 - 1
        w1 = ((ow + 1) * W + Wo - 1) // Wo
        hh = ((oh * H) // Ho)[:, None] + ki[None, :]                   # [BW, BN]
        ww = ((ow * W) // Wo)[:, None] + kj[None, :]
        inside = ((offs_n[None, :] < KH * KW) & (hh < h1[:, None]) & (ww < w1[:, None])
                  & w_ok[:, None])
    else:
        hh = oh[:, None] * SH - PH + ki[None, :]                       # [BW, BN]
        ww = ow[:, None] * SW - PW + kj[None, :]
        inside = ((offs_n[None, :] < KH * KW) & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
                  & w_ok[:, None])
    # windows past the end get one dummy sample so that every reduction stays finite
    sv2 = inside | ((offs_n[None, :] == 0) & (offs_w[:, None] >= n_windows))
    offs_c = tl.arange(0, BC)
    c_ok = offs_c < C
    return offs_w, w_ok, ow, oh, bi, hh, ww, inside, sv2, offs_c, c_ok


# --------------------------------------------------------------------------------------------
# forward: base-2 logs, exp2 with pre-scaled arguments, logs and divisions only on reduced
# vectors, masks only where the launch has partial windows or padded channels (MASKED)
# --------------------------------------------------------------------------------------------
@triton.jit
def _log2(v, FAST: tl.constexpr):
    """log2 of a reduced sum Σ 2^(y - max y) >= 1: one MUFU.LG2 on the GPU, in its
    flush-to-zero form (such a sum is never subnormal; tl.log2 is a ~20-instruction polynomial
    there); the interpreter has no inline PTX. FAST is the launchers' ``common.FAST_MATH``; one
    line, so that bench/sass.py finds the GPU's instruction at the line the interpreter counts
    (as ``common.log2_reduced``)."""
    return lg2_approx_ftz(v) if FAST else tl.log2(v)


@triton.jit
def _rcp(v, FAST: tl.constexpr):
    """1/v of a reduced vector or of a weight (MUFU.RCP on the GPU instead of a precise
    division; one line as ``_log2``)."""
    return rcp_approx(v) if FAST else 1.0 / v


@triton.jit
def _keep(v, valid, MASKED: tl.constexpr):
    """v where valid, 0 elsewhere (only in masked launches)."""
    if MASKED:
        return tl.where(valid, v, 0.0)
    else:
        return v


@triton.jit
def _exp2_parts(y, valid, AXIS: tl.constexpr, MASKED: tl.constexpr):
    """(max m, 2^(y - m), Σ 2^(y - m)) along AXIS over the valid entries (kept dims)."""
    if MASKED:
        y = tl.where(valid, y, float("-inf"))
    m = tl.max(y, axis=AXIS, keep_dims=True)
    e = tl.exp2(y - m)
    return m, e, tl.sum(e, axis=AXIS, keep_dims=True)


@triton.jit
def _lse2(y, valid, AXIS: tl.constexpr, MASKED: tl.constexpr, FAST: tl.constexpr):
    """log2 Σ 2^y along AXIS over the valid entries (kept dims)."""
    m, e, s = _exp2_parts(y, valid, AXIS, MASKED)
    return m + _log2(s, FAST)


@triton.jit
def _sinkhorn_fwd(x, w_ptr, lp0, lq0, sv, cv, T: tl.constexpr, PAPER: tl.constexpr,
                  MASKED: tl.constexpr, FAST: tl.constexpr, BW: tl.constexpr,
                  BN: tl.constexpr, BC: tl.constexpr):
    """Base-2 logits L·log2(e) of the output softmax after T Sinkhorn iterations
    (a, b, lp0, lq0 in base 2)."""
    a = tl.zeros([BW, 1, BC], dtype=tl.float32)
    b = tl.zeros([BW, BN, 1], dtype=tl.float32)
    u_prev, _k2, _k3 = sinkhorn_params(w_ptr, 0, T, FAST)
    for t in range(T):
        u, k2, k3 = sinkhorn_params(w_ptr, t, T, FAST)
        if PAPER:
            y = x * (u_prev * LOG2E) + a + b                           # [BW, BN, BC]
            r = _lse2(y, sv, AX_N, MASKED, FAST)                      # [BW, 1, BC]
            c = _keep(_lse2(y, cv, AX_C, MASKED, FAST), sv, MASKED)  # [BW, BN, 1]
            a = _keep(k2 * (a * u + lp0 - r), cv, MASKED)
            b = _keep(k3 * (b * u + lq0 - c), sv, MASKED)
        else:
            xu = x * (u * LOG2E)
            r = _lse2(xu + b, sv, AX_N, MASKED, FAST)                 # [BW, 1, BC] R_d
            v = k2 * lp0 + (1 - k2) * r
            a = _keep(v - _lse2(v, cv, AX_C, MASKED, FAST) - r, cv, MASKED)
            c = _keep(_lse2(xu + a, cv, AX_C, MASKED, FAST), sv, MASKED)  # [BW, BN, 1] C_n
            q = k3 * lq0 + (1 - k3) * c
            b = _keep(q - _lse2(q, sv, AX_N, MASKED, FAST) - c, sv, MASKED)
        u_prev = u
    return x * (u_prev * LOG2E) + b


@triton.jit
def _admm_fwd(x, w_ptr, lp0, lq0, sv, cv, T: tl.constexpr, QUAD: tl.constexpr,
              PAPER: tl.constexpr, MASKED: tl.constexpr, FAST: tl.constexpr,
              BW: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr):
    """Base-2 logits Y·log2(e) of the last P-step after T B-ADMM iterations: T - 1 full
    iterations, then the P-step logits only (the output reads nothing else). State in base 2:
    log2 S, Z (natural), [B-Q: S], [paper: log2 μ, z1, log2 η, z2]."""
    # exact B-Q on an unmasked tile: the S-step logits without Z (below)
    EXACT_Q: tl.constexpr = QUAD and not (PAPER or MASKED)
    m = sv & cv
    ls = _keep(lp0 + lq0 + tl.zeros([BW, BN, BC], dtype=tl.float32), m, MASKED)
    z = tl.zeros([BW, BN, BC], dtype=tl.float32)
    s = _keep(tl.exp2(ls), m, MASKED)                                  # S (B-Q only)
    lmu = _keep(lp0 + tl.zeros([BW, 1, BC], dtype=tl.float32), cv, MASKED)
    leta = lq0 + tl.zeros([BW, BN, 1], dtype=tl.float32)
    z1 = tl.zeros([BW, 1, BC], dtype=tl.float32)
    z2 = tl.zeros([BW, BN, 1], dtype=tl.float32)
    for t in range(T - 1):
        rho, irho, k2, k3, c1, c2 = admm_params(w_ptr, t, T, QUAD, PAPER, FAST)
        irho2 = irho * LOG2E
        c1l = c1 * LOG2E
        # P-step: Y = log S + (X - Z)/ω [- α1 S/ω];  log P = Y + log μ - LSE_n(Y)
        if EXACT_Q:
            yz = ls + x * irho2 - c1l * s                              # Y + Z/ω
            y = yz - z * irho2
        else:
            y = ls + (x - z) * irho2
            if QUAD:
                y = y - c1l * s
        m1, e1, s1 = _exp2_parts(y, sv, AX_N, MASKED)                 # [BW, 1, BC]
        r = m1 + _log2(s1, FAST)
        if PAPER:
            lmu_t = lmu
        else:
            v = k2 * lp0 + (1 - k2) * r
            lmu_t = v - _lse2(v, cv, AX_C, MASKED, FAST)
        # P = softmax_n(Y) μ = 2^(Y - m1) · 2^(log μ - log2 s1): one exp2 per channel, no rcp
        pf = tl.exp2(lmu_t - (r - m1))                                 # [BW, 1, BC]
        # S-step: log S = Y2 + log η - LSE_d(Y2)
        if EXACT_Q:
            # exact B-Q: Y2 = log P + (Z - α1 P)/ω = (Y + Z/ω) + log μ - R - α1 P/ω: Z cancels
            # again, and P = e1 pf is folded into the FMAs that read it (no log P, no P)
            y2 = (yz + (lmu_t - r)) - e1 * (c1l * pf)
        elif QUAD or PAPER or MASKED:
            lp = _keep(y + (lmu_t - r), m, MASKED)                     # log2 P
            p = _keep(e1 * pf, m, MASKED)
            if QUAD:
                y2 = lp + z * irho2 - c1l * p
            else:
                y2 = z * c1l + lp * c2
        else:
            # exact B-E: Y2 = (Z + ρ log P)/(α1 + ρ) with log P = log S + (X - Z)/ρ + log μ - R:
            # Z cancels (c2/ρ = c1), so neither log P nor P is formed
            y2 = ls * c2 + (x * c1l + c2 * (lmu_t - r))
        m2, e2, s2 = _exp2_parts(y2, cv, AX_C, MASKED)                # [BW, BN, 1]
        cc = _keep(m2 + _log2(s2, FAST), sv, MASKED)
        if PAPER:
            leta_t = leta
        else:
            q = k3 * lq0 + (1 - k3) * cc
            leta_t = q - _lse2(q, sv, AX_N, MASKED, FAST)
        ls = _keep(y2 + (leta_t - cc), m, MASKED)
        sf = tl.exp2(leta_t - (cc - m2))                               # [BW, BN, 1]
        if EXACT_Q:
            s_new = e2 * sf                                            # S = softmax_d(Y2) η
            z = z + e1 * (rho * pf) - rho * s_new
        elif QUAD or PAPER or MASKED:
            s_new = _keep(e2 * sf, m, MASKED)                          # S = softmax_d(Y2) η
            z = z + rho * (p - s_new)
        else:
            # Z += ρ (P - S) as two FMAs, ρ folded into P's and S's factors
            z = z + e1 * (rho * pf) - e2 * (rho * sf)
        if QUAD:
            s = s_new
        if PAPER:
            t1 = (1 - k2) * (lmu - z1 * irho2) + k2 * lp0
            lmu = _keep(t1 - _lse2(t1, cv, AX_C, MASKED, FAST), cv, MASKED)
            t2 = (1 - k3) * (leta - z2 * irho2) + k3 * lq0
            leta = _keep(t2 - _lse2(t2, sv, AX_N, MASKED, FAST), sv, MASKED)
            z1 = _keep(z1 + rho * (tl.exp2(lmu) - tl.sum(p, axis=AX_N, keep_dims=True)), cv,
                       MASKED)
            z2 = _keep(z2 + rho * (tl.exp2(leta) - tl.sum(s_new, axis=AX_C, keep_dims=True)),
                       sv, MASKED)
    rho, irho, k2, k3, c1, c2 = admm_params(w_ptr, T - 1, T, QUAD, PAPER, FAST)
    y = ls + (x - z) * (irho * LOG2E)
    if QUAD:
        y = y - (c1 * LOG2E) * s
    return y


@triton.jit(do_not_specialize=["sxh", "sxw"])
def window_fwd_kernel(
    x_ptr, y_ptr, w_ptr, s_ptr,
    C, H, W, Ho, Wo, n_windows, lp0,
    sxb, sxc, sxh, sxw, syb, syc, syh, syw,
    T: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, BW: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
    METHOD: tl.constexpr, PAPER: tl.constexpr, MASKED: tl.constexpr, TAIL: tl.constexpr,
    SCALED: tl.constexpr, FAST: tl.constexpr, ADAPTIVE: tl.constexpr = False,
):
    """y[b, :, oh, ow] = ROT pooling of window (oh, ow) of image b, all T iterations fused, for
    a [BW, BN, BC] tile: a window's samples of a channel in one thread (or a few lanes), the
    channel reductions across lanes. MASKED: some windows lose samples to padding / the border
    or C < BC; TAIL: the last tile has fewer than BW windows (masks its loads/stores only).
    SCALED: the layer's feature scale folded in, y = s_b · pool(x / s_b) with s (B,) fp32 (the
    image's spread, ``spread`` family): no x / s pass and no output multiply on the host.
    ADAPTIVE: nn.AdaptiveAvgPool2d's windows (``_window_tile``)."""
    pid = tl.program_id(0)
    offs_w, w_ok, ow, oh, bi, hh, ww, inside, sv2, offs_c, c_ok = _window_tile(
        pid, C, H, W, Ho, Wo, n_windows, KH, KW, SH, SW, PH, PW, BW, BN, BC, ADAPTIVE)
    sv = sv2[:, :, None]                                               # [BW, BN, 1]
    cv = c_ok[None, None, :]                                           # [1, BC, 1]
    ptrs = (x_ptr + bi.to(tl.int64)[:, None, None] * sxb + offs_c[None, None, :] * sxc
            + hh[:, :, None] * sxh + ww[:, :, None] * sxw)
    yptrs = (y_ptr + bi.to(tl.int64)[:, None] * syb + offs_c[None, :] * syc
             + oh[:, None] * syh + ow[:, None] * syw)                  # [BW, BC]
    if MASKED:
        x = tl.load(ptrs, mask=inside[:, :, None] & cv, other=0.0).to(tl.float32)
        count = tl.sum(sv2.to(tl.float32), axis=1)                     # [BW] valid samples
        lq0 = -tl.log2(count)[:, None, None]                           # [BW, 1, 1] log2 q0
    elif TAIL:
        x = tl.load(ptrs, mask=w_ok[:, None, None], other=0.0).to(tl.float32)
        lq0 = -tl.log2(KH * KW * 1.0)
    else:
        x = tl.load(ptrs).to(tl.float32)                               # [BW, BN, BC]
        lq0 = -tl.log2(KH * KW * 1.0)
    if SCALED:
        sc = tl.load(s_ptr + bi, mask=w_ok, other=1.0)                 # [BW]
        x = x * (1.0 / sc)[:, None, None]
    lp02 = lp0 * LOG2E
    if METHOD == 0:
        logits = _sinkhorn_fwd(x, w_ptr, lp02, lq0, sv, cv, T, PAPER, MASKED, FAST, BW, BN, BC)
    else:
        logits = _admm_fwd(x, w_ptr, lp02, lq0, sv, cv, T, METHOD == 2, PAPER, MASKED, FAST,
                           BW, BN, BC)
    # eq. (5): y_d = Σ_n softmax_n(L)_nd x_nd
    mo, e, so = _exp2_parts(logits, sv, AX_N, MASKED)
    y = tl.sum(e * x, axis=AX_N) * _rcp(tl.sum(e, axis=AX_N), FAST)   # [BW, BC]
    if SCALED:
        y = y * sc[:, None]
    if MASKED:
        tl.store(yptrs, y.to(y_ptr.dtype.element_ty), mask=w_ok[:, None] & c_ok[None, :])
    elif TAIL:
        tl.store(yptrs, y.to(y_ptr.dtype.element_ty), mask=w_ok[:, None])
    else:
        tl.store(yptrs, y.to(y_ptr.dtype.element_ty))


@triton.jit
def _acc(acc, offs_p, k, v):
    """acc[k] += v for a scalar v (acc: the program's [TP] weight-cotangent accumulator)."""
    return tl.where(offs_p == k, acc + v, acc)


@triton.jit
def _window_sum(v):
    """[BW, BN, BC] -> [BW]: the sum over each window, its samples (in-thread) first."""
    return tl.sum(tl.sum(v, axis=AX_N), axis=1)


@triton.jit
def _output_bwd(x, logits, gy, m, sv, MASKED: tl.constexpr, FAST: tl.constexpr):
    """VJP of y_d = Σ_n softmax_n(L)_nd x_nd: (∂/∂x through the weights' x, ∂/∂L, x - y, y)."""
    w = _softmax(logits, sv, AX_N, MASKED, FAST)
    yv = _sum(w * x, AX_N)                                             # [BW, 1, BC]
    dev = x - yv                                                       # [BW, BN, BC]
    return _keep(w * gy, m, MASKED), _keep(w * dev * gy, m, MASKED), dev, yv


@triton.jit
def _sinkhorn_bwd(x, gy, w_ptr, acc, offs_p, lp0, lq0, sv, cv, n_seg, T: tl.constexpr,
                  L: tl.constexpr, PAPER: tl.constexpr, MASKED: tl.constexpr,
                  FAST: tl.constexpr, BW: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
                  TAPED: tl.constexpr = False):
    """(gx, acc + ∂y/∂w ᵀ gy, Σ gy·y per window [BW]) of a Sinkhorn tile. The T iterations
    in segments of L (last segment first): the segment's states are replayed once and kept in
    registers (``tape``), then back-propagated in reverse; the state at a segment's start is
    recomputed from iteration 0 (only when T > L). ``n_seg`` = ⌈T / L⌉ arrives as a runtime value on purpose:
    the compiler then cannot fold the segment loop and merge the replay with the backward's
    own recomputation of each step, which would keep every step's [BW, BN, BC] intermediates
    alive (sm_90: 660 B of spills for B-E at T = L = 4, 200 fewer instructions / tile without)."""
    m = sv & cv
    gx = tl.zeros([BW, BN, BC], dtype=tl.float32)
    ga = tl.zeros([BW, 1, BC], dtype=tl.float32)
    gb = tl.zeros([BW, BN, 1], dtype=tl.float32)
    g_u_carry = tl.sum(gb, axis=None) * 0.0  # cotangent of 1/ε_t from iteration t + 1 / output
    gyy = tl.zeros([BW], dtype=tl.float32)
    for seg in range(n_seg):
        t0 = (n_seg - 1 - seg) * L
        a, b, u_prev = _sinkhorn_run(x, w_ptr, t0, T, lp0, lq0, sv, cv, PAPER, MASKED, FAST,
                                     BW, BN, BC)
        tape = ()
        for i in tl.static_range(L):  # forward: states at the start of t0 … t0 + L - 1
            a0, b0, u0 = a, b, u_prev
            if TAPED:   # the step's channel LSEs (defined only when kept: triton 3.6 would
                c_i = tl.zeros([BW, BN, 1], dtype=tl.float32)    # keep unused ones alive)
                lv_i = tl.zeros([BW, 1, 1], dtype=tl.float32)
            if t0 + i < T:
                u, k2, k3 = sinkhorn_params(w_ptr, t0 + i, T, False)
                a, b, c_s, lv_s = _sinkhorn_step(x, a, b, u_prev, u, k2, k3, lp0, lq0, sv, cv,
                                                 PAPER, MASKED, FAST)
                if TAPED:
                    c_i = c_s
                    lv_i = lv_s
                u_prev = u
            if TAPED:
                tape = tape + ((a0, b0, u0, c_i, lv_i),)
            else:
                tape = tape + ((a0, b0, u0, 0.0, 0.0),)
        if seg == 0:  # (a, b) = (a_T, b_T): the output's logits are x/ε_T + b_T
            gx_o, g_l, dev, _y = _output_bwd(x, x * u_prev + b, gy, m, sv, MASKED, FAST)
            gyy = _window_sum(gx_o * x)        # gx_o = softmax · gy: Σ_c gy_c y_c
            gx = gx_o + u_prev * g_l
            # ∂/∂(1/ε_T) = Σ x·g_l = Σ (x - y)·g_l (g_l sums to 0 over each channel's samples):
            # near one-hot softmaxes (small α1, the max-pool limit) Σ x·g_l cancels terms ~100×
            # its value, the centred sum does not (∂/∂α1 within 1e-4 of float64 only so)
            g_u_carry = tl.sum(dev * g_l, axis=None)
            gb = _sum(g_l, AX_C)
        for j in tl.static_range(L):  # backward: t0 + L - 1 … t0
            t = t0 + L - 1 - j
            if t < T:
                ta, tb, tu_prev, tc, tlv = tape[L - 1 - j]
                u, k2, k3 = sinkhorn_params(w_ptr, t, T, False)
                gx_t, ga, gb, g_up, g_u, g_k2, g_k3 = _sinkhorn_step_bwd(
                    x, ta, tb, tu_prev, u, k2, k3, lp0, lq0, sv, cv, ga, gb, tc, tlv, PAPER,
                    MASKED, FAST, TAPED)
                gx += gx_t
                # 1/ε_t: its use in step t, in step t+1's Y (paper) or the output (carry), and
                # the paper's initial Y = x/ε_0 (g_up of step 0)
                ga1, ga2, ga3 = sinkhorn_params_bwd(
                    w_ptr, t, T, g_u + g_u_carry + tl.where(t == 0, g_up, 0.0), g_k2, g_k3)
                acc = _acc(acc, offs_p, _A1 * T + t, ga1)
                acc = _acc(acc, offs_p, _A2 * T + t, ga2)
                acc = _acc(acc, offs_p, _A3 * T + t, ga3)
                g_u_carry = g_up
    return gx, acc, gyy


@triton.jit
def _admm_bwd(x, gy, w_ptr, acc, offs_p, lp0, lq0, sv, cv, n_seg, T: tl.constexpr,
              L: tl.constexpr,
              QUAD: tl.constexpr, PAPER: tl.constexpr, MASKED: tl.constexpr,
              FAST: tl.constexpr, BW: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr):
    """(gx, acc + ∂y/∂w ᵀ gy, Σ gy·y per window) of a B-ADMM tile, in segments of L
    iterations as _sinkhorn_bwd (the tape holds the states log S, Z [+ paper: log μ, log η, z1,
    z2])."""
    m = sv & cv
    g_ls = tl.zeros([BW, BN, BC], dtype=tl.float32)
    g_z = tl.zeros([BW, BN, BC], dtype=tl.float32)
    g_lmu = tl.zeros([BW, 1, BC], dtype=tl.float32)
    g_leta = tl.zeros([BW, BN, 1], dtype=tl.float32)
    g_z1 = tl.zeros([BW, 1, BC], dtype=tl.float32)
    g_z2 = tl.zeros([BW, BN, 1], dtype=tl.float32)
    gx = tl.zeros([BW, BN, BC], dtype=tl.float32)
    gyy = tl.zeros([BW], dtype=tl.float32)
    for seg in range(n_seg):
        t0 = (n_seg - 1 - seg) * L
        log_s, z, lmu, leta, z1, z2 = _admm_run(x, w_ptr, t0, T, lp0, lq0, sv, cv, QUAD, PAPER,
                                                MASKED, FAST, BW, BN, BC)
        tape = ()
        for i in tl.static_range(L):  # forward: states at the start of t0 … t0 + L - 1
            tape = tape + ((log_s, z, lmu, leta, z1, z2),)
            if i < L - 1:
                if t0 + i < T:
                    rho, irho, k2, k3, c1, c2 = admm_params(w_ptr, t0 + i, T, QUAD, PAPER, False)
                    log_s, z, lmu, leta, z1, z2, _y = _admm_step(
                        x, log_s, z, lmu, leta, z1, z2, rho, irho, k2, k3, c1, c2, lp0, lq0,
                        sv, cv, QUAD, PAPER, MASKED, FAST)
        for j in tl.static_range(L):  # backward: t0 + L - 1 … t0
            t = t0 + L - 1 - j
            if t < T:
                ls_t, z_t, lmu_t, leta_t, z1_t, z2_t = tape[L - 1 - j]
                rho, irho, k2, k3, c1, c2 = admm_params(w_ptr, t, T, QUAD, PAPER, False)
                g_y = tl.zeros([BW, BN, BC], dtype=tl.float32)
                y_sum = rho * 0.0                 # (a scalar zero without a tile reduction)
                if t == T - 1:  # the output reads Y of the last P-step only
                    gx_o, g_y, _dev, yv = _output_bwd(
                        x, _admm_p_logits(x, ls_t, z_t, irho, c1, m, QUAD, MASKED), gy, m, sv,
                        MASKED, FAST)
                    gyy = _window_sum(gx_o * x)
                    gx += gx_o
                    # g_y sums to 0 over each channel's samples, so its part of 1/ω's
                    # Σ (x - z)·ḡ_Y is Σ (x - y - z)·g_y: y·g_y, rounding only, is taken back
                    # out (as the Sinkhorn output's centred sum; at small ρ it cancelled)
                    y_sum = tl.sum(yv * g_y, axis=None)
                (gx_t, g_ls, g_z, g_lmu, g_leta, g_z1, g_z2,
                 g_rho, g_irho, g_k2, g_k3, g_c1, g_c2) = _admm_step_bwd(
                    x, ls_t, z_t, lmu_t, leta_t, z1_t, z2_t, rho, irho, k2, k3, c1, c2, lp0,
                    lq0, sv, cv, g_ls, g_z, g_lmu, g_leta, g_z1, g_z2, g_y, QUAD, PAPER,
                    MASKED, FAST)
                gx += gx_t
                if QUAD or PAPER:
                    g_irho -= y_sum
                else:  # exact B-E sums 1/ω's terms into ρ's (FOLD): 1/ω = 1/ρ
                    g_rho += irho * irho * y_sum
                ga1, ga2, ga3, grho = admm_params_bwd(w_ptr, t, T, g_rho, g_irho, g_k2, g_k3,
                                                      g_c1, g_c2, QUAD, PAPER)
                acc = _acc(acc, offs_p, _A1 * T + t, ga1)
                acc = _acc(acc, offs_p, _A2 * T + t, ga2)
                acc = _acc(acc, offs_p, _A3 * T + t, ga3)
                acc = _acc(acc, offs_p, _RHO * T + t, grho)
    return gx, acc, gyy


@triton.jit
def _window_bwd_tile(
    tile, acc, offs_p, x_ptr, gy_ptr, w_ptr, gx_ptr, s_ptr, ds_ptr,
    C, H, W, Ho, Wo, n_windows, n_seg, lp0,
    sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw, sdb, sdc, sdh, sdw,
    T: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, BW: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
    L: tl.constexpr, METHOD: tl.constexpr, PAPER: tl.constexpr, OVERLAP: tl.constexpr,
    MASKED: tl.constexpr, SCALED: tl.constexpr, FAST: tl.constexpr, TAPED: tl.constexpr,
    SHARES: tl.constexpr, ADAPTIVE: tl.constexpr,
):
    """Backward of one tile of BW windows: gx += ∂y/∂x ᵀ gy (atomically into fp32 when windows
    overlap, else stored in x's dtype; SHARES: each window's share stored in fp32 at
    (b, c, sample, window), which ``launch.sum_window_shares`` sums per pixel in a fixed order);
    returns acc plus the tile's ∂y/∂w ᵀ gy ((6, T) flattened). MASKED as in the forward; loads
    and stores are always masked. SCALED (y = s · f(x / s)): gx is the cotangent of x / s,
    ∂f ᵀ (s·gy), and each window's share of ∂y/∂s ᵀ gy = Σ gy·f - Σ gx·(x / s) / s goes to ds
    (n_windows,)."""
    offs_w, w_ok, ow, oh, bi, hh, ww, inside, sv2, offs_c, c_ok = _window_tile(
        tile, C, H, W, Ho, Wo, n_windows, KH, KW, SH, SW, PH, PW, BW, BN, BC, ADAPTIVE)
    sv = sv2[:, :, None]                                               # [BW, BN, 1]
    cv = c_ok[None, None, :]                                           # [1, 1, BC]
    b64 = bi.to(tl.int64)[:, None, None]
    lmask = inside[:, :, None] & cv
    x = tl.load(x_ptr + b64 * sxb + offs_c[None, None, :] * sxc + hh[:, :, None] * sxh
                + ww[:, :, None] * sxw, mask=lmask, other=0.0).to(tl.float32)
    gyp = (gy_ptr + bi.to(tl.int64)[:, None] * sgb + offs_c[None, :] * sgc
           + oh[:, None] * sgh + ow[:, None] * sgw)
    gy = tl.load(gyp, mask=w_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    if SCALED:
        sc = tl.load(s_ptr + bi, mask=w_ok, other=1.0)                 # [BW]
        x = x * (1.0 / sc)[:, None, None]
        gy = gy * sc[:, None]
    gy = gy[:, None, :]                                                # [BW, 1, BC]
    if MASKED:
        count = tl.sum(sv2.to(tl.float32), axis=1)
        lq0 = tl.where(sv, -tl.log2(count)[:, None, None] * LN2, 0.0)  # [BW, BN, 1] log q0
    else:
        lq0 = -tl.log2(KH * KW * 1.0) * LN2
    if METHOD == 0:
        gx, acc, gyy = _sinkhorn_bwd(x, gy, w_ptr, acc, offs_p, lp0, lq0, sv, cv, n_seg, T, L,
                                     PAPER, MASKED, FAST, BW, BN, BC, TAPED)
    else:
        gx, acc, gyy = _admm_bwd(x, gy, w_ptr, acc, offs_p, lp0, lq0, sv, cv, n_seg, T, L,
                                 METHOD == 2, PAPER, MASKED, FAST, BW, BN, BC)
    if SCALED:  # gy and gyy carry the factor s
        tl.store(ds_ptr + offs_w, (gyy - _window_sum(gx * x)) / sc, mask=w_ok)
    if SHARES:  # (B, C, KH·KW, Ho·Wo) fp32: sdh steps over the samples, sdw over the windows
        # (an image's shares may pass 2^31 elements where the image does not: int64 channels)
        gptrs = (gx_ptr + b64 * sdb + offs_c.to(tl.int64)[None, None, :] * sdc
                 + tl.arange(0, BN)[None, :, None] * sdh
                 + (offs_w % (Ho * Wo))[:, None, None] * sdw)
        tl.store(gptrs, gx, mask=lmask)
    else:
        gptrs = (gx_ptr + b64 * sdb + offs_c[None, None, :] * sdc + hh[:, :, None] * sdh
                 + ww[:, :, None] * sdw)
        if OVERLAP:  # fp32 accumulation across windows
            tl.atomic_add(gptrs, gx, mask=lmask)
        else:  # each pixel belongs to one window: written once, in x's dtype
            tl.store(gptrs, gx.to(gx_ptr.dtype.element_ty), mask=lmask)
    return acc


@triton.jit(do_not_specialize=["n_seg", "sxh", "sxw", "sdh", "sdw"])
def window_bwd_kernel(
    x_ptr, gy_ptr, w_ptr, gx_ptr, gw_ptr, s_ptr, ds_ptr,
    C, H, W, Ho, Wo, n_windows, n_tiles, n_seg, lp0,
    sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw, sdb, sdc, sdh, sdw,
    T: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, BW: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
    L: tl.constexpr, TP: tl.constexpr, METHOD: tl.constexpr, PAPER: tl.constexpr,
    OVERLAP: tl.constexpr, MASKED: tl.constexpr, SCALED: tl.constexpr, FAST: tl.constexpr,
    TAPED: tl.constexpr = False, SHARES: tl.constexpr = False, ADAPTIVE: tl.constexpr = False,
):
    """Backward of local ROT pooling. A grid of a few programs per SM strides over the tiles of
    windows, so the per-program weight cotangents gw (grid × TP, TP = next_pow2(6T), the (6, T)
    table flattened) stay small and their sum on the host is deterministic. SCALED: see
    ``_window_bwd_tile``; TAPED (Sinkhorn, one segment): see ``_sinkhorn_step_bwd``; SHARES
    (overlapping windows under ``torch.use_deterministic_algorithms``): no atomics, see
    ``_window_bwd_tile``; ADAPTIVE: as in ``window_fwd_kernel``."""
    pid = tl.program_id(0)
    offs_p = tl.arange(0, TP)
    acc = tl.zeros([TP], dtype=tl.float32)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        acc = _window_bwd_tile(
            tile, acc, offs_p, x_ptr, gy_ptr, w_ptr, gx_ptr, s_ptr, ds_ptr, C, H, W, Ho, Wo,
            n_windows, n_seg, lp0,
            sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw, sdb, sdc, sdh, sdw, T, KH, KW, SH, SW, PH,
            PW, BW, BN, BC, L, METHOD, PAPER, OVERLAP, MASKED, SCALED, FAST, TAPED, SHARES,
            ADAPTIVE)
    tl.store(gw_ptr + pid * TP + offs_p, acc)
