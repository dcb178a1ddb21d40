"""Triton kernels for local k×k ROT pooling of images with α0 = 0 (DESIGN §7).

Every window of an image ``x (B, C, H, W)`` is one set: its valid pixel positions are the N ≤ kh·kw
samples, the C channels the features. The kernels reproduce, window by window, what
``rotp_triton.ops.rot.solvers`` computes for one set (uniform priors p0, q0; every method,
both variants). N is tiny (4 for 2×2), so one program owns a tile of ``BW`` windows and all C
channels (``BC = next_pow2(C)``) as a ``[BW, BN, BC]`` register tile, read from NCHW or
channels_last (any strides) without a copy; padding and the positions past the border under
``ceil_mode`` are masked out of every reduction over samples. All T iterations run in one launch
with fp32 state.

Backward: the exact gradient of the T unrolled iterations, recomputed in registers. For each
t = T-1 … 0 the program reruns the forward from x to the state at the start of iteration t
(O(T²) iterations, T is small) and back-propagates through iteration t; nothing per iteration
is saved, so memory does not grow with T. The solver weights enter as a ``(T, 6)`` table of
derived per-iteration scalars (1/ε, κ2, κ3, ρ, 1/ρ, ...) built in torch, whose gradient the
kernel returns as per-program partial sums; autograd maps it back to a1, a2, a3, ρ.

Per-window updates (LSE_n: over the window's valid samples, LSE_d: over the C channels; the
pooled output is y_d = Σ_n softmax_n(L_·d) x_nd, and every per-channel shift of L cancels):
  Sinkhorn exact:  R = LSE_n(x/ε + b); a = lognorm_d(κ2 log p0 + (1-κ2) R) - R
                   C = LSE_d(x/ε + a); b = lognorm_n(κ3 log q0 + (1-κ3) C) - C;  L = x/ε_T + b
  Sinkhorn paper:  R, C from Y = x/ε' + a + b;  a = κ2(a/ε + log p0 - R), b = κ3(b/ε + log q0 - C)
  B-ADMM:          DESIGN §3.1 (exact) / §3.2 (paper), state log S, Z (N×C per window)
                   [+ log μ, z1 (C), log η, z2 (N) for paper]; L = Y of the last P-step.

Limits (measured by ptxas through tests/test_image.py::test_aot_compile_sm90; not yet timed on a
GPU): a window's next_pow2(N) × next_pow2(C) tile lives in registers, so very wide windows
(2×2 with C > 1024) would spill - ``ROTPool2d(backend="auto")`` sends them to the torch path;
there is no loop over channel blocks. The backward reruns 0 + 1 + … + (T-1) forward iterations
(O(T²) work, O(1) memory in T). For NCHW the channels of a tile are H·W apart: every sector a
tile fetches is used by it, but how well those loads coalesce (vs channels_last, where the
channel axis is contiguous) has not been measured yet - bench/bench_image.py times both.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .solvers import kappa

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
NUM_PARAMS = 6          # columns of the per-iteration parameter table
METHOD_IDS = {"sinkhorn": 0, "badmm-e": 1, "badmm-q": 2}
# register budget: elements of one [BW, BN, BC] tile per program (8 / 4 per thread at 4 warps).
# sm_90 AOT (ptxas via tests/test_image.py), 2×2 windows, B-E, T = 4: forward 108 registers at
# C = 64 (80 at C = 256), backward ~125; a 4096-element forward tile needs 255. Tuned without a
# GPU: bench/bench_image.py sweeps them.
FWD_TILE = 1024
BWD_TILE = 512


# --------------------------------------------------------------------------------------------
# reductions (masked; every reduced row holds at least one valid entry)
# --------------------------------------------------------------------------------------------
@triton.jit
def _exp(v):
    return tl.exp2(v * LOG2E)


@triton.jit
def _lse(y, valid, AXIS: tl.constexpr):
    """LogSumExp of y along AXIS over the valid entries, keeping the reduced axis (size 1)."""
    yv = tl.where(valid, y, float("-inf"))
    m = tl.expand_dims(tl.max(yv, axis=AXIS), AXIS)
    s = tl.expand_dims(tl.sum(tl.exp2((yv - m) * LOG2E), axis=AXIS), AXIS)
    return m + tl.log2(s) * LN2


@triton.jit
def _softmax(y, valid, AXIS: tl.constexpr):
    """softmax of y along AXIS over the valid entries (0 elsewhere)."""
    yv = tl.where(valid, y, float("-inf"))
    m = tl.expand_dims(tl.max(yv, axis=AXIS), AXIS)
    e = tl.exp2((yv - m) * LOG2E)
    return e * (1.0 / tl.expand_dims(tl.sum(e, axis=AXIS), AXIS))


@triton.jit
def _lse_softmax(y, valid, AXIS: tl.constexpr):
    """(LogSumExp, softmax) of y along AXIS over the valid entries from one pass of exps: the
    B-ADMM plans are softmax · marginal (P = softmax_n(Y) μ, S = softmax_d(Y2) η), which saves
    two exps per element and iteration over exp(log P), exp(log S)."""
    yv = tl.where(valid, y, float("-inf"))
    m = tl.expand_dims(tl.max(yv, axis=AXIS), AXIS)
    e = tl.exp2((yv - m) * LOG2E)
    s = tl.expand_dims(tl.sum(e, axis=AXIS), AXIS)
    return m + tl.log2(s) * LN2, e * (1.0 / s)


@triton.jit
def _sum(v, AXIS: tl.constexpr):
    return tl.expand_dims(tl.sum(v, axis=AXIS), AXIS)


@triton.jit
def _lognorm_bwd(g, sm, valid, AXIS: tl.constexpr):
    """VJP of v -> v - LSE(v) along AXIS: g - softmax(v) Σ g (sm = softmax(v))."""
    g = tl.where(valid, g, 0.0)
    return tl.where(valid, g - sm * _sum(g, AXIS), 0.0)


# --------------------------------------------------------------------------------------------
# Sinkhorn: state a [BW, 1, BC], b [BW, BN, 1]
# --------------------------------------------------------------------------------------------
@triton.jit
def _sinkhorn_step(x, a, b, u_prev, u, k2, k3, lp0, lq0, sv, cv, PAPER: tl.constexpr):
    """One iteration: (a, b) -> (a', b'). ``u`` = 1/ε_t; ``u_prev`` = 1/ε of the Y the paper's
    Jacobi step reads (ε_{t-1}, ε_0 at t = 0)."""
    if PAPER:
        y = x * u_prev + a + b                                         # [BW, BN, BC]
        r = _lse(y, sv, 1)                                             # [BW, 1, BC]
        c = tl.where(sv, _lse(y, cv, 2), 0.0)                          # [BW, BN, 1]
        a_new = tl.where(cv, k2 * (a * u + lp0 - r), 0.0)
        b_new = tl.where(sv, k3 * (b * u + lq0 - c), 0.0)
    else:
        xu = x * u
        r = _lse(xu + b, sv, 1)                                        # [BW, 1, BC] R_d
        v = k2 * lp0 + (1 - k2) * r
        a_new = tl.where(cv, v - _lse(v, cv, 2) - r, 0.0)
        c = tl.where(sv, _lse(xu + a_new, cv, 2), 0.0)                 # [BW, BN, 1] C_n
        q = k3 * lq0 + (1 - k3) * c
        b_new = tl.where(sv, q - _lse(q, sv, 1) - c, 0.0)
    return a_new, b_new


@triton.jit
def _sinkhorn_step_bwd(x, a, b, u_prev, u, k2, k3, lp0, lq0, sv, cv, ga_new, gb_new,
                       PAPER: tl.constexpr):
    """VJP of _sinkhorn_step: returns (gx, ga, gb, gu_prev, gu, gk2, gk3); the scalar grads are
    summed over the tile."""
    if PAPER:
        y = x * u_prev + a + b
        r = _lse(y, sv, 1)
        c = tl.where(sv, _lse(y, cv, 2), 0.0)
        ga_new = tl.where(cv, ga_new, 0.0)
        gb_new = tl.where(sv, gb_new, 0.0)
        gk2 = tl.sum(tl.sum(tl.sum(ga_new * (a * u + lp0 - r), 2), 1), 0)
        gk3 = tl.sum(tl.sum(tl.sum(gb_new * (b * u + lq0 - c), 2), 1), 0)
        gu = (tl.sum(tl.sum(tl.sum(k2 * ga_new * a, 2), 1), 0)
              + tl.sum(tl.sum(tl.sum(k3 * gb_new * b, 2), 1), 0))
        # y feeds R (softmax over n) and C (softmax over d)
        gy = (_softmax(y, sv, 1) * (-k2 * ga_new) + _softmax(y, cv, 2) * (-k3 * gb_new))
        gy = tl.where(sv & cv, gy, 0.0)
        gx = u_prev * gy
        gu_prev = tl.sum(tl.sum(tl.sum(x * gy, 2), 1), 0)
        ga = k2 * u * ga_new + _sum(gy, 1)
        gb = k3 * u * gb_new + _sum(gy, 2)
    else:
        xu = x * u
        y1 = xu + b
        r = _lse(y1, sv, 1)                                            # [BW, 1, BC]
        v = k2 * lp0 + (1 - k2) * r
        a_new = tl.where(cv, v - _lse(v, cv, 2) - r, 0.0)
        y2 = xu + a_new
        c = tl.where(sv, _lse(y2, cv, 2), 0.0)                         # [BW, BN, 1]
        q = k3 * lq0 + (1 - k3) * c
        # b' = lognorm_n(q) - C
        gq = _lognorm_bwd(gb_new, _softmax(q, sv, 1), sv, 1)           # [BW, BN, 1]
        gc = tl.where(sv, -gb_new + (1 - k3) * gq, 0.0)
        gk3 = tl.sum(tl.sum(tl.sum(gq * (lq0 - c), 2), 1), 0)
        gy2 = tl.where(sv & cv, _softmax(y2, cv, 2) * gc, 0.0)         # [BW, BN, BC]
        ga = tl.where(cv, ga_new + _sum(gy2, 1), 0.0)                  # [BW, 1, BC]
        # a' = lognorm_d(v) - R
        gv = _lognorm_bwd(ga, _softmax(v, cv, 2), cv, 2)
        gr = tl.where(cv, -ga + (1 - k2) * gv, 0.0)
        gk2 = tl.sum(tl.sum(tl.sum(gv * (lp0 - r), 2), 1), 0)
        gy1 = tl.where(sv & cv, _softmax(y1, sv, 1) * gr, 0.0)
        gx = u * (gy1 + gy2)
        gu = tl.sum(tl.sum(tl.sum(x * (gy1 + gy2), 2), 1), 0)
        gu_prev = gu * 0.0
        gb = _sum(gy1, 2)
        ga = ga * 0.0                                                  # a does not feed a'
    return gx, ga, gb, gu_prev, gu, gk2, gk3


# --------------------------------------------------------------------------------------------
# Bregman ADMM: state log S, Z [BW, BN, BC]; log μ, z1 [BW, 1, BC]; log η, z2 [BW, BN, 1]
# (the last four are the paper variant's marginal variables and stay put in the exact variant)
# params: ρ, 1/ρ, κ2, κ3, c1, c2 with c1 = 1/(α1+ρ), c2 = ρ/(α1+ρ) (B-E) or c1 = α1/ρ (B-Q)
# --------------------------------------------------------------------------------------------
@triton.jit
def _admm_p_logits(x, log_s, z, irho, c1, m, QUAD: tl.constexpr):
    """Y of the P-step: log S + (X - Z)/ρ [- α1 S/ρ] (masked to 0)."""
    y = log_s + (x - z) * irho
    if QUAD:
        y = y - c1 * tl.where(m, _exp(log_s), 0.0)
    return tl.where(m, y, 0.0)


@triton.jit
def _admm_step(x, log_s, z, lmu, leta, z1, z2, rho, irho, k2, k3, c1, c2, lp0, lq0, sv, cv,
               QUAD: tl.constexpr, PAPER: tl.constexpr):
    """One B-ADMM iteration; returns the new state and Y (the P-step logits of this iteration)."""
    m = sv & cv
    y = _admm_p_logits(x, log_s, z, irho, c1, m, QUAD)                 # [BW, BN, BC]
    r, sm1 = _lse_softmax(y, sv, 1)                                    # [BW, 1, BC] R
    if PAPER:
        log_mu = lmu
    else:
        v = k2 * lp0 + (1 - k2) * r
        log_mu = v - _lse(v, cv, 2)
    log_p = tl.where(m, y + log_mu - r, 0.0)
    p = tl.where(m, sm1 * _exp(log_mu), 0.0)                           # exp(log P)
    if QUAD:
        y2 = log_p + z * irho - c1 * p
    else:
        y2 = z * c1 + log_p * c2
    c, sm2 = _lse_softmax(y2, cv, 2)                                   # [BW, BN, 1] C
    c = tl.where(sv, c, 0.0)
    if PAPER:
        log_eta = leta
    else:
        q = k3 * lq0 + (1 - k3) * c
        log_eta = q - _lse(q, sv, 1)
    log_s_new = tl.where(m, y2 + log_eta - c, 0.0)
    s_new = tl.where(m, sm2 * _exp(log_eta), 0.0)                      # exp(log S')
    z_new = z + rho * (p - s_new)
    if PAPER:
        t1 = (1 - k2) * (lmu - z1 * irho) + k2 * lp0
        lmu_new = tl.where(cv, t1 - _lse(t1, cv, 2), 0.0)
        t2 = (1 - k3) * (leta - z2 * irho) + k3 * lq0
        leta_new = tl.where(sv, t2 - _lse(t2, sv, 1), 0.0)
        z1_new = tl.where(cv, z1 + rho * (_exp(lmu_new) - _sum(p, 1)), 0.0)
        z2_new = tl.where(sv, z2 + rho * (_exp(leta_new) - _sum(s_new, 2)), 0.0)
    else:
        lmu_new, leta_new, z1_new, z2_new = lmu, leta, z1, z2
    return log_s_new, z_new, lmu_new, leta_new, z1_new, z2_new, y


@triton.jit
def _tsum(v):
    return tl.sum(tl.sum(tl.sum(v, 2), 1), 0)


@triton.jit
def _admm_step_bwd(x, log_s, z, lmu, leta, z1, z2, rho, irho, k2, k3, c1, c2, lp0, lq0, sv, cv,
                   g_log_s_new, g_z_new, g_lmu_new, g_leta_new, g_z1_new, g_z2_new, g_y,
                   QUAD: tl.constexpr, PAPER: tl.constexpr):
    """VJP of _admm_step (g_y: cotangent of the returned Y). Returns gx, the state cotangents
    and the (tile-summed) cotangents of ρ, 1/ρ, κ2, κ3, c1, c2."""
    m = sv & cv
    # ---- recompute the forward of this iteration
    s = tl.where(m, _exp(log_s), 0.0)
    y = _admm_p_logits(x, log_s, z, irho, c1, m, QUAD)
    r, sm1 = _lse_softmax(y, sv, 1)
    if PAPER:
        log_mu = lmu
    else:
        v = k2 * lp0 + (1 - k2) * r
        log_mu = v - _lse(v, cv, 2)
    log_p = tl.where(m, y + log_mu - r, 0.0)
    p = tl.where(m, sm1 * _exp(log_mu), 0.0)
    if QUAD:
        y2 = log_p + z * irho - c1 * p
    else:
        y2 = z * c1 + log_p * c2
    c, sm2 = _lse_softmax(y2, cv, 2)
    c = tl.where(sv, c, 0.0)
    if PAPER:
        log_eta = leta
    else:
        q = k3 * lq0 + (1 - k3) * c
        log_eta = q - _lse(q, sv, 1)
    s_new = tl.where(m, sm2 * _exp(log_eta), 0.0)

    # ---- backward
    g_z = tl.where(m, g_z_new, 0.0)
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
        lmu_new = tl.where(cv, t1 - _lse(t1, cv, 2), 0.0)
        leta_t2 = leta - z2 * irho
        t2 = (1 - k3) * leta_t2 + k3 * lq0
        leta_new = tl.where(sv, t2 - _lse(t2, sv, 1), 0.0)
        g_z1n = tl.where(cv, g_z1_new, 0.0)
        g_z2n = tl.where(sv, g_z2_new, 0.0)
        g_rho += _tsum(g_z1n * (_exp(lmu_new) - _sum(p, 1)))
        g_rho += _tsum(g_z2n * (_exp(leta_new) - _sum(s_new, 2)))
        g_z1 = g_z1n
        g_z2 = g_z2n
        g_p += -rho * g_z1n
        g_s_new += -rho * g_z2n
        g_lmu_n = g_lmu_new + rho * _exp(lmu_new) * g_z1n
        g_leta_n = g_leta_new + rho * _exp(leta_new) * g_z2n
        g_t1 = _lognorm_bwd(g_lmu_n, _softmax(t1, cv, 2), cv, 2)
        g_k2 = _tsum(g_t1 * (lp0 - lmu_t1))
        g_lmu = (1 - k2) * g_t1
        g_z1 += -(1 - k2) * irho * g_t1
        g_irho += -_tsum((1 - k2) * z1 * g_t1)
        g_t2 = _lognorm_bwd(g_leta_n, _softmax(t2, sv, 1), sv, 1)
        g_k3 = _tsum(g_t2 * (lq0 - leta_t2))
        g_leta = (1 - k3) * g_t2
        g_z2 += -(1 - k3) * irho * g_t2
        g_irho += -_tsum((1 - k3) * z2 * g_t2)
    # log S' = Y2 + log η - LSE_d(Y2)
    g_ls = tl.where(m, g_log_s_new + s_new * g_s_new, 0.0)
    g_c = -_sum(g_ls, 2)                                               # [BW, BN, 1]
    if PAPER:
        g_leta += _sum(g_ls, 2)
    else:
        g_q = _lognorm_bwd(_sum(g_ls, 2), _softmax(q, sv, 1), sv, 1)
        g_c += (1 - k3) * g_q
        g_k3 = _tsum(g_q * (lq0 - c))
    g_c = tl.where(sv, g_c, 0.0)
    g_y2 = tl.where(m, g_ls + sm2 * g_c, 0.0)
    if QUAD:
        g_logp = g_y2
        g_z += irho * g_y2
        g_irho += _tsum(z * g_y2)
        g_p += -c1 * g_y2
        g_c1 = -_tsum(p * g_y2)
        g_c2 = g_rho * 0.0
    else:
        g_logp = c2 * g_y2
        g_z += c1 * g_y2
        g_c1 = _tsum(z * g_y2)
        g_c2 = _tsum(log_p * g_y2)
    g_logp = tl.where(m, g_logp + p * g_p, 0.0)
    # log P = Y + log μ - LSE_n(Y)
    g_lmu_sum = _sum(g_logp, 1)                                        # [BW, 1, BC]
    g_r = -g_lmu_sum
    if PAPER:
        g_lmu += g_lmu_sum
    else:
        g_v = _lognorm_bwd(g_lmu_sum, _softmax(v, cv, 2), cv, 2)
        g_r += (1 - k2) * g_v
        g_k2 = _tsum(g_v * (lp0 - r))
    g_r = tl.where(cv, g_r, 0.0)
    g_yy = tl.where(m, g_logp + g_y + sm1 * g_r, 0.0)
    # Y = log S + (X - Z)/ρ [- c1 S]
    g_x = irho * g_yy
    g_z += -irho * g_yy
    g_irho += _tsum((x - z) * g_yy)
    g_log_s = g_yy
    if QUAD:
        g_c1 += -_tsum(s * g_yy)
        g_log_s += -c1 * s * g_yy
    g_log_s = tl.where(m, g_log_s, 0.0)
    return (g_x, g_log_s, g_z, g_lmu, g_leta, g_z1, g_z2,
            g_rho, g_irho, g_k2, g_k3, g_c1, g_c2)


# --------------------------------------------------------------------------------------------
# tile setup shared by the forward and backward kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _sinkhorn_run(x, prm_ptr, n_steps, lp0, lq0, sv, cv, PAPER: tl.constexpr,
                  BW: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr):
    """(a, b, 1/ε) after the first ``n_steps`` Sinkhorn iterations from a = b = 0 (the forward,
    and the backward's recomputation of the state at the start of an iteration)."""
    a = tl.zeros([BW, 1, BC], dtype=tl.float32)
    b = tl.zeros([BW, BN, 1], dtype=tl.float32)
    u_prev = tl.load(prm_ptr)
    for t in range(n_steps):
        u = tl.load(prm_ptr + t * 6)
        a, b = _sinkhorn_step(x, a, b, u_prev, u, tl.load(prm_ptr + t * 6 + 1),
                              tl.load(prm_ptr + t * 6 + 2), lp0, lq0, sv, cv, PAPER)
        u_prev = u
    return a, b, u_prev


@triton.jit
def _admm_run(x, prm_ptr, n_steps, lp0, lq0, sv, cv, QUAD: tl.constexpr, PAPER: tl.constexpr,
              BW: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr):
    """The B-ADMM state (log S, Z, log μ, log η, z1, z2) and the last P-step's logits after the
    first ``n_steps`` iterations from log S = log(p0 q0ᵀ), Z = 0."""
    m = sv & cv
    log_s = tl.where(m, lp0 + lq0 + tl.zeros([BW, BN, BC], dtype=tl.float32), 0.0)
    z = tl.zeros([BW, BN, BC], dtype=tl.float32)
    lmu = tl.where(cv, lp0 + tl.zeros([BW, 1, BC], dtype=tl.float32), 0.0)
    leta = lq0
    z1 = tl.zeros([BW, 1, BC], dtype=tl.float32)
    z2 = tl.zeros([BW, BN, 1], dtype=tl.float32)
    logits = z
    for t in range(n_steps):
        p = prm_ptr + t * 6
        log_s, z, lmu, leta, z1, z2, logits = _admm_step(
            x, log_s, z, lmu, leta, z1, z2, tl.load(p), tl.load(p + 1), tl.load(p + 2),
            tl.load(p + 3), tl.load(p + 4), tl.load(p + 5), lp0, lq0, sv, cv, QUAD, PAPER)
    return log_s, z, lmu, leta, z1, z2, logits


@triton.jit
def _window_tile(pid, C, H, W, Ho, Wo, n_windows, KH: tl.constexpr, KW: tl.constexpr,
                 SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                 BW: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr):
    """Indices and masks of the program's [BW, BN, BC] tile of (window, sample, channel)."""
    offs_w = pid * BW + tl.arange(0, BW)                               # [BW]
    w_ok = offs_w < n_windows
    ow = offs_w % Wo
    oh = (offs_w // Wo) % Ho
    bi = (offs_w // Wo) // Ho
    offs_n = tl.arange(0, BN)
    ki = offs_n // KW
    kj = offs_n % KW
    hh = oh[:, None] * SH - PH + ki[None, :]                           # [BW, BN]
    ww = ow[:, None] * SW - PW + kj[None, :]
    inside = ((offs_n[None, :] < KH * KW) & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
              & w_ok[:, None])
    # windows past the end get one dummy sample so that every reduction stays finite
    sv2 = inside | ((offs_n[None, :] == 0) & (offs_w[:, None] >= n_windows))
    offs_c = tl.arange(0, BC)
    c_ok = offs_c < C
    return offs_w, w_ok, ow, oh, bi, hh, ww, inside, sv2, offs_c, c_ok


@triton.jit
def rot_window_pool_fwd_kernel(
    x_ptr, y_ptr, prm_ptr,
    C, H, W, Ho, Wo, n_windows, lp0,
    sxb, sxc, sxh, sxw, syb, syc, syh, syw,
    T: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, BW: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
    METHOD: tl.constexpr, PAPER: tl.constexpr,
):
    """y[b, :, oh, ow] = ROT pooling of window (oh, ow) of image b, all T iterations fused."""
    pid = tl.program_id(0)
    offs_w, w_ok, ow, oh, bi, hh, ww, inside, sv2, offs_c, c_ok = _window_tile(
        pid, C, H, W, Ho, Wo, n_windows, KH, KW, SH, SW, PH, PW, BW, BN, BC)
    sv = sv2[:, :, None]                                               # [BW, BN, 1]
    cv = c_ok[None, None, :]                                           # [1, 1, BC]
    ptrs = (x_ptr + bi.to(tl.int64)[:, None, None] * sxb + offs_c[None, None, :] * sxc
            + hh[:, :, None] * sxh + ww[:, :, None] * sxw)
    x = tl.load(ptrs, mask=inside[:, :, None] & cv, other=0.0).to(tl.float32)  # [BW, BN, BC]
    count = tl.sum(sv2.to(tl.float32), axis=1)                         # [BW] valid samples
    lq0 = tl.where(sv, -tl.log2(count)[:, None, None] * LN2, 0.0)     # [BW, BN, 1] uniform q0

    if METHOD == 0:
        a, b, u_prev = _sinkhorn_run(x, prm_ptr, T, lp0, lq0, sv, cv, PAPER, BW, BN, BC)
        logits = x * u_prev + b
    else:
        log_s, z, lmu, leta, z1, z2, logits = _admm_run(x, prm_ptr, T, lp0, lq0, sv, cv,
                                                        METHOD == 2, PAPER, BW, BN, BC)
    # eq. (5): y_d = Σ_n softmax_n(L)_nd x_nd
    w = _softmax(logits, sv, 1)
    y = tl.sum(w * x, axis=1)                                          # [BW, BC]
    yptrs = (y_ptr + bi.to(tl.int64)[:, None] * syb + offs_c[None, :] * syc
             + oh[:, None] * syh + ow[:, None] * syw)
    tl.store(yptrs, y.to(y_ptr.dtype.element_ty), mask=w_ok[:, None] & c_ok[None, :])


@triton.jit
def _acc(acc, offs_p, k, v):
    """acc[k] += v for a scalar v (acc: the program's [TP] parameter-cotangent accumulator)."""
    return tl.where(offs_p == k, acc + v, acc)


@triton.jit
def _window_bwd_tile(
    tile, acc, offs_p, x_ptr, gy_ptr, prm_ptr, gx_ptr,
    C, H, W, Ho, Wo, n_windows, lp0,
    sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw, sdb, sdc, sdh, sdw,
    T: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, BW: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
    METHOD: tl.constexpr, PAPER: tl.constexpr, OVERLAP: tl.constexpr,
):
    """Backward of one tile of BW windows: gx (fp32, pre-zeroed) += ∂y/∂x ᵀ gy; returns acc plus
    the tile's ∂y/∂prm ᵀ gy (T × 6, flattened). Recomputes the forward from x for every t."""
    offs_w, w_ok, ow, oh, bi, hh, ww, inside, sv2, offs_c, c_ok = _window_tile(
        tile, C, H, W, Ho, Wo, n_windows, KH, KW, SH, SW, PH, PW, BW, BN, BC)
    sv = sv2[:, :, None]
    cv = c_ok[None, None, :]
    m = sv & cv
    b64 = bi.to(tl.int64)[:, None, None]
    lmask = inside[:, :, None] & cv
    x = tl.load(x_ptr + b64 * sxb + offs_c[None, None, :] * sxc + hh[:, :, None] * sxh
                + ww[:, :, None] * sxw, mask=lmask, other=0.0).to(tl.float32)
    gyp = (gy_ptr + bi.to(tl.int64)[:, None] * sgb + offs_c[None, :] * sgc
           + oh[:, None] * sgh + ow[:, None] * sgw)
    gy = tl.load(gyp, mask=w_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    gy = gy[:, None, :]                                                # [BW, 1, BC]
    count = tl.sum(sv2.to(tl.float32), axis=1)
    lq0 = tl.where(sv, -tl.log2(count)[:, None, None] * LN2, 0.0)

    if METHOD == 0:
        # ---- final state (a_T, b_T) and the output's cotangent of b_T
        a, b, u_prev = _sinkhorn_run(x, prm_ptr, T, lp0, lq0, sv, cv, PAPER, BW, BN, BC)
        logits = x * u_prev + b
        w = _softmax(logits, sv, 1)
        yv = _sum(w * x, 1)
        g_l = tl.where(m, w * (x - yv) * gy, 0.0)                      # [BW, BN, BC]
        gx = tl.where(m, w * gy, 0.0) + u_prev * g_l
        g_u_last = _tsum(x * g_l)
        ga = tl.zeros([BW, 1, BC], dtype=tl.float32)
        gb = _sum(g_l, 2)
        g_u_carry = g_u_last          # cotangent of 1/ε_t carried into iteration t's record
        for tt in range(T):
            t = T - 1 - tt
            # recompute the state at the start of iteration t
            a, b, u_prev = _sinkhorn_run(x, prm_ptr, t, lp0, lq0, sv, cv, PAPER, BW, BN, BC)
            u = tl.load(prm_ptr + t * 6)
            gx_t, ga, gb, g_up, g_u, g_k2, g_k3 = _sinkhorn_step_bwd(
                x, a, b, u_prev, u, tl.load(prm_ptr + t * 6 + 1), tl.load(prm_ptr + t * 6 + 2),
                lp0, lq0, sv, cv, ga, gb, PAPER)
            gx += gx_t
            # 1/ε_t: its use in step t, in step t+1's Y (paper) or the output (carry), and the
            # paper's initial Y = x/ε_0 (g_up of step 0)
            acc = _acc(acc, offs_p, t * 6, g_u + g_u_carry + tl.where(t == 0, g_up, 0.0))
            acc = _acc(acc, offs_p, t * 6 + 1, g_k2)
            acc = _acc(acc, offs_p, t * 6 + 2, g_k3)
            g_u_carry = g_up
    else:
        g_ls = tl.zeros([BW, BN, BC], dtype=tl.float32)
        g_z = tl.zeros([BW, BN, BC], dtype=tl.float32)
        g_lmu = tl.zeros([BW, 1, BC], dtype=tl.float32)
        g_leta = tl.zeros([BW, BN, 1], dtype=tl.float32)
        g_z1 = tl.zeros([BW, 1, BC], dtype=tl.float32)
        g_z2 = tl.zeros([BW, BN, 1], dtype=tl.float32)
        gx = tl.zeros([BW, BN, BC], dtype=tl.float32)
        for tt in range(T):
            t = T - 1 - tt
            log_s, z, lmu, leta, z1, z2, _y = _admm_run(x, prm_ptr, t, lp0, lq0, sv, cv,
                                                        METHOD == 2, PAPER, BW, BN, BC)
            p = prm_ptr + t * 6
            rho = tl.load(p)
            irho = tl.load(p + 1)
            k2 = tl.load(p + 2)
            k3 = tl.load(p + 3)
            c1 = tl.load(p + 4)
            c2 = tl.load(p + 5)
            # the output reads Y of the last P-step only
            g_y = tl.zeros([BW, BN, BC], dtype=tl.float32)
            if t == T - 1:  # the output reads Y of the last P-step only (a scalar branch)
                y_last = _admm_p_logits(x, log_s, z, irho, c1, m, METHOD == 2)
                w = _softmax(y_last, sv, 1)
                yv = _sum(w * x, 1)
                g_y = tl.where(m, w * (x - yv) * gy, 0.0)
                gx += tl.where(m, w * gy, 0.0)
            (gx_t, g_ls, g_z, g_lmu, g_leta, g_z1, g_z2,
             g_rho, g_irho, g_k2, g_k3, g_c1, g_c2) = _admm_step_bwd(
                x, log_s, z, lmu, leta, z1, z2, rho, irho, k2, k3, c1, c2, lp0, lq0, sv, cv,
                g_ls, g_z, g_lmu, g_leta, g_z1, g_z2, g_y, METHOD == 2, PAPER)
            gx += gx_t
            acc = _acc(acc, offs_p, t * 6, g_rho)
            acc = _acc(acc, offs_p, t * 6 + 1, g_irho)
            acc = _acc(acc, offs_p, t * 6 + 2, g_k2)
            acc = _acc(acc, offs_p, t * 6 + 3, g_k3)
            acc = _acc(acc, offs_p, t * 6 + 4, g_c1)
            acc = _acc(acc, offs_p, t * 6 + 5, g_c2)
    gptrs = (gx_ptr + b64 * sdb + offs_c[None, None, :] * sdc + hh[:, :, None] * sdh
             + ww[:, :, None] * sdw)
    if OVERLAP:
        tl.atomic_add(gptrs, gx, mask=lmask)
    else:
        tl.store(gptrs, gx, mask=lmask)
    return acc


@triton.jit
def rot_window_pool_bwd_kernel(
    x_ptr, gy_ptr, prm_ptr, gx_ptr, gprm_ptr,
    C, H, W, Ho, Wo, n_windows, n_tiles, lp0,
    sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw, sdb, sdc, sdh, sdw,
    T: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, BW: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
    TP: tl.constexpr, METHOD: tl.constexpr, PAPER: tl.constexpr, OVERLAP: tl.constexpr,
):
    """Backward of local ROT pooling. A grid of a few programs per SM strides over the tiles of
    windows, so the per-program parameter cotangents gprm (grid × TP, TP = next_pow2(6T)) stay
    small and their sum on the host is deterministic."""
    pid = tl.program_id(0)
    offs_p = tl.arange(0, TP)
    acc = tl.zeros([TP], dtype=tl.float32)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        acc = _window_bwd_tile(
            tile, acc, offs_p, x_ptr, gy_ptr, prm_ptr, gx_ptr, C, H, W, Ho, Wo, n_windows, lp0,
            sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw, sdb, sdc, sdh, sdw, T, KH, KW, SH, SW, PH,
            PW, BW, BN, BC, METHOD, PAPER, OVERLAP)
    tl.store(gprm_ptr + pid * TP + offs_p, acc)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------
def window_params(method: str, variant: str, a1: Tensor, a2: Tensor, a3: Tensor,
                  rho: Tensor) -> Tensor:
    """The (T, 6) table of per-iteration scalars the kernels read (differentiable in the
    weights). Sinkhorn: [1/ε, κ(α2, ε), κ(α3, ε), 0, 0, 0] with ε = α1. B-ADMM: [ρ, 1/ρ, κ2, κ3,
    c1, c2] with κ2 = κ(α2, ρ); κ3 = κ(α3, α1 + ρ) (B-E exact) or κ(α3, ρ); c1 = 1/(α1 + ρ),
    c2 = ρ/(α1 + ρ) (B-E) or c1 = α1/ρ, c2 = 0 (B-Q)."""
    zero = torch.zeros_like(a1)
    if method == "sinkhorn":
        cols = [1.0 / a1, kappa(a2, a1), kappa(a3, a1), zero, zero, zero]
    elif method == "badmm-e":
        w = a1 + rho
        k3 = kappa(a3, w) if variant == "exact" else kappa(a3, rho)
        cols = [rho, 1.0 / rho, kappa(a2, rho), k3, 1.0 / w, rho / w]
    else:
        cols = [rho, 1.0 / rho, kappa(a2, rho), kappa(a3, rho), a1 / rho, zero]
    return torch.stack(cols, dim=1).contiguous()


def _block_sizes(N: int, C: int, budget: int) -> Tuple[int, int, int]:
    BN = triton.next_power_of_2(N)
    BC = triton.next_power_of_2(C)
    BW = max(1, min(64, budget // (BN * BC)))
    return BW, BN, BC


class _Geometry:
    def __init__(self, x: Tensor, kernel_size, stride, padding, ceil_mode: bool):
        from ...nn.image import pool_output_size  # one formula for every path
        B, C, H, W = x.shape
        self.B, self.C, self.H, self.W = B, C, H, W
        (self.kh, self.kw), (self.sh, self.sw), (self.ph, self.pw) = kernel_size, stride, padding
        self.Ho = pool_output_size(H, self.kh, self.sh, self.ph, ceil_mode)
        self.Wo = pool_output_size(W, self.kw, self.sw, self.pw, ceil_mode)
        self.n_windows = B * self.Ho * self.Wo
        self.overlap = self.sh < self.kh or self.sw < self.kw

    def constexprs(self) -> dict:
        return dict(KH=self.kh, KW=self.kw, SH=self.sh, SW=self.sw, PH=self.ph, PW=self.pw)


def _max_programs(device) -> int:
    """Grid of the backward: a few resident programs per SM (the interpreter: 64)."""
    if device.type == "cuda":
        return 8 * torch.cuda.get_device_properties(device).multi_processor_count
    return 64


def _like_layout(x: Tensor, shape, dtype) -> Tensor:
    """A new tensor in x's memory format (channels_last stays channels_last)."""
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=x.device, memory_format=fmt)


def _launch_fwd(x: Tensor, prm: Tensor, g: _Geometry, method: str, variant: str) -> Tensor:
    y = _like_layout(x, (g.B, g.C, g.Ho, g.Wo), x.dtype)
    if g.n_windows == 0 or g.C == 0:
        return y
    BW, BN, BC = _block_sizes(g.kh * g.kw, g.C, FWD_TILE)
    grid = (triton.cdiv(g.n_windows, BW),)
    rot_window_pool_fwd_kernel[grid](
        x, y, prm, g.C, g.H, g.W, g.Ho, g.Wo, g.n_windows, -math.log(g.C),
        *x.stride(), *y.stride(), T=prm.shape[0], BW=BW, BN=BN, BC=BC,
        METHOD=METHOD_IDS[method], PAPER=variant == "paper", num_warps=4 if BC <= 256 else 8,
        **g.constexprs())
    return y


def _launch_bwd(x: Tensor, gy: Tensor, prm: Tensor, g: _Geometry, method: str,
                variant: str) -> Tuple[Tensor, Tensor]:
    gx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    gx = gx.contiguous(memory_format=torch.channels_last) if (
        x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()) else gx
    T = prm.shape[0]
    BW, BN, BC = _block_sizes(g.kh * g.kw, g.C, BWD_TILE)
    TP = triton.next_power_of_2(T * NUM_PARAMS)
    n_tiles = triton.cdiv(g.n_windows, BW)
    n_prog = max(1, min(n_tiles, _max_programs(x.device)))
    gprm = torch.zeros(n_prog, TP, dtype=torch.float32, device=x.device)
    if g.n_windows > 0:
        rot_window_pool_bwd_kernel[(n_prog,)](
            x, gy, prm, gx, gprm, g.C, g.H, g.W, g.Ho, g.Wo, g.n_windows, n_tiles,
            -math.log(g.C), *x.stride(), *gy.stride(), *gx.stride(), T=T, BW=BW, BN=BN, BC=BC,
            TP=TP, METHOD=METHOD_IDS[method], PAPER=variant == "paper", OVERLAP=g.overlap,
            num_warps=4 if BC <= 256 else 8, **g.constexprs())
    gprm = gprm.sum(0)[:T * NUM_PARAMS].reshape(T, NUM_PARAMS)
    return gx.to(x.dtype), gprm


class RotWindowPoolFunction(torch.autograd.Function):
    """y = local ROT pooling of x's windows (α0 = 0); inputs x (B, C, H, W) and the (T, 6)
    parameter table; backward recomputes everything from x (no per-iteration state saved)."""

    @staticmethod
    def forward(ctx, x, prm, geometry, method, variant):
        y = _launch_fwd(x, prm, geometry, method, variant)
        ctx.save_for_backward(x, prm)
        ctx.geometry, ctx.method, ctx.variant = geometry, method, variant
        return y

    @staticmethod
    def backward(ctx, gy):
        x, prm = ctx.saved_tensors
        gx, gprm = _launch_bwd(x, gy, prm, ctx.geometry, ctx.method, ctx.variant)
        return (gx if ctx.needs_input_grad[0] else None,
                gprm.to(prm.dtype) if ctx.needs_input_grad[1] else None, None, None, None)


def _as_pair(v, name: str) -> Tuple[int, int]:
    vals = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if len(vals) != 2 or any(isinstance(e, bool) or not isinstance(e, int) for e in vals):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    return vals


def _as_vec(w, T: Optional[int], name: str, device) -> Tensor:
    t = w if isinstance(w, Tensor) else torch.tensor([float(w)])
    t = t.to(device=device, dtype=torch.float32).reshape(-1)
    if T is not None and t.numel() == 1 and T > 1:
        t = t.expand(T)
    return t


def rot_pool2d_triton(x: Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                      *, method: str = "badmm-e", variant: str = "exact",
                      a1=100.0, a2=1.0, a3=1.0, rho=100.0,
                      num_iters: Optional[int] = None) -> Tensor:
    """Local ROT pooling of every k×k window of ``x`` with the Triton kernels (α0 = 0).

    Args:
        x: (B, C, H, W) float32/float16/bfloat16 on CUDA (or CPU under TRITON_INTERPRET=1), any
            strides (NCHW, channels_last, non-contiguous views are read in place).
        kernel_size, stride, padding: int or pair (as nn.MaxPool2d; stride None = kernel_size).
        ceil_mode: as nn.MaxPool2d.
        method: "sinkhorn" | "badmm-e" | "badmm-q"; variant: "exact" | "paper".
        a1, a2, a3, rho: floats or (T,) / (1,) tensors (a2, a3 may be inf); differentiable.
        num_iters: T (default: the longest weight tensor's length; 4 if all are floats).
    Returns:
        (B, C, Ho, Wo) in x's dtype, channels_last if x is.
    """
    if method not in METHOD_IDS:
        raise ValueError(f"method must be one of {tuple(METHOD_IDS)}, got {method!r}")
    if variant not in ("exact", "paper"):
        raise ValueError(f"variant must be 'exact' or 'paper', got {variant!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32/float16/bfloat16 for the kernels, got {x.dtype}")
    k = _as_pair(kernel_size, "kernel_size")
    s = k if stride is None else _as_pair(stride, "stride")
    p = _as_pair(padding, "padding")
    if num_iters is None:
        lens = [w.numel() for w in (a1, a2, a3, rho) if isinstance(w, Tensor)]
        num_iters = max(lens) if lens else 4
    vec = [_as_vec(w, num_iters, n, x.device) for n, w in
           (("a1", a1), ("a2", a2), ("a3", a3), ("rho", rho))]
    for n, v in zip(("a1", "a2", "a3", "rho"), vec):
        if v.numel() != num_iters:
            raise ValueError(f"{n} must have 1 or num_iters = {num_iters} entries, got "
                             f"{v.numel()}")
    prm = window_params(method, variant, *vec)
    g = _Geometry(x, k, s, p, ceil_mode)
    return RotWindowPoolFunction.apply(x, prm, g, method, variant)
