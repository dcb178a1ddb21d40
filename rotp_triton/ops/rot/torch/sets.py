"""Batched PyTorch solvers of the ROT problem (DESIGN §3): the CPU path and the fallback.

α0 = 0 runs :mod:`.unrolled` (memory independent of T; dense and ragged batches without
padding go through :mod:`.unpadded`); this module keeps the padded-batch entry point and the
α0 > 0 algorithms, one checkpointed module per outer iteration.

Everything works on a padded batch in the code layout: x (B, N, D) (rows = samples), a boolean
mask (B, N), and a log plan log P (B, N, D). Paper's "row d of P" is column d here: LSE over
samples n is ``dim=1``, LSE over features d is ``dim=2``.

Padding never meets real data: every reduction over n masks padding to -inf first, and every
state update writes 0 into padding, so padded entries stay finite (no inf - inf, no NaN in the
backward). Each set's result depends on that set alone.

Weights arrive as (T,) tensors (entry t for unrolled module t); a2, a3 may be +inf.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...._transforms import plain_ops
from ..params import kappa, wants_structure  # noqa: F401  (wants_structure: re-exported)
from .layouts import Padded
from .structure import StructureFactors, structure_factors
from .unrolled import Badmm, unrolled_log_plan

METHODS = ("sinkhorn", "badmm-e", "badmm-q")
VARIANTS = ("exact", "paper")

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def lse_n(y: Tensor, mask: Tensor) -> Tensor:
    """LogSumExp over the samples of each set: (B, N, D) -> (B, 1, D), padding excluded."""
    return torch.logsumexp(y.masked_fill(~mask[..., None], _NEG_INF), dim=1, keepdim=True)


def lse_d(y: Tensor) -> Tensor:
    """LogSumExp over features: (B, N, D) -> (B, N, 1)."""
    return torch.logsumexp(y, dim=2, keepdim=True)


def lognorm_d(v: Tensor) -> Tensor:
    """log-softmax over features of a (B, 1, D) vector."""
    return v - torch.logsumexp(v, dim=2, keepdim=True)


def lognorm_n(v: Tensor, mask: Tensor) -> Tensor:
    """log-softmax over the samples of each set of a (B, N, 1) vector; padding -> 0."""
    m = mask[..., None]
    out = v - torch.logsumexp(v.masked_fill(~m, _NEG_INF), dim=1, keepdim=True)
    return out.masked_fill(~m, 0.0)


def zero_pad(v: Tensor, mask: Tensor) -> Tensor:
    return v.masked_fill(~mask[..., None], 0.0)


def masked_exp(log_v: Tensor, mask: Tensor) -> Tensor:
    return torch.exp(log_v.masked_fill(~mask[..., None], _NEG_INF))


# --------------------------------------------------------------------------------------------
# Sinkhorn (S)
# --------------------------------------------------------------------------------------------
def _sinkhorn_exact_inner(y0: Tensor, mask: Tensor, log_p0: Tensor, log_q0: Tensor,
                          k2: Tensor, k3: Tensor, iters: int) -> Tensor:
    """Gauss-Seidel unbalanced Sinkhorn (DESIGN §3.1) on the fixed kernel y0 = -C/ε (the inner
    loop of α0 > 0; α0 = 0 runs unrolled.SinkhornExact)."""
    B, N, D = y0.shape
    a = y0.new_zeros(B, 1, D)
    b = y0.new_zeros(B, N, 1)
    y = y0
    kk2, kk3 = k2, k3
    for t in range(iters):
        r = lse_n(y + b, mask)                                        # [B, 1, D] R_d
        a = lognorm_d(kk2 * log_p0 + (1 - kk2) * r) - r
        c = zero_pad(lse_d(y + a), mask)                              # [B, N, 1] C_n
        b = zero_pad(lognorm_n(kk3 * log_q0 + (1 - kk3) * c, mask) - c, mask)
    return y + a + b


def _sinkhorn_paper_inner(y_of, mask: Tensor, log_p0: Tensor, log_q0: Tensor,
                          k2, k3, eps, iters: int, y_init: Tensor) -> Tensor:
    """Eq. (18) as printed: Jacobi updates of a, b from one Y, with the a/α1' term.

    ``y_of(t)`` is the kernel -C/α1' of iteration t; ``k2(t)``, ``k3(t)``, ``eps(t)`` the weights.
    """
    B, N, D = y_init.shape
    a = y_init.new_zeros(B, 1, D)
    b = y_init.new_zeros(B, N, 1)
    y = y_init
    for t in range(iters):
        e = eps(t)
        r = lse_n(y, mask)                                            # [B, 1, D]
        c = zero_pad(lse_d(y), mask)                                  # [B, N, 1]
        a = k2(t) * (a / e + log_p0 - r)
        b = zero_pad(k3(t) * (b / e + log_q0 - c), mask)
        y = y_of(t) + a + b
    return y


def sinkhorn_structure(x: Tensor, mask: Tensor, log_p0: Tensor, log_q0: Tensor,
                       sf: StructureFactors, *, variant: str, a0: Tensor, a1: Tensor,
                       a2: Tensor, a3: Tensor, tau: Tensor, T: int, K: int) -> Tensor:
    """S with α0 > 0: proximal point (Alg. 1), T outer modules × K inner iterations."""
    log_p = zero_pad(log_p0 + log_q0, mask)                          # log P⁰ = log(p0 q0ᵀ)
    for t in range(T):
        log_p = _checkpointed(_sinkhorn_structure_module, log_p, x, mask, log_p0, log_q0, sf,
                              variant, a0, a1, a2, a3, tau, t, K)
    return log_p


def _checkpointed(fn, *args):
    """fn(*args), recomputed in the backward when autograd records (memory: one module's
    activations plus the state between modules, instead of every module's activations)."""
    if torch.is_grad_enabled() and not plain_ops():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _sinkhorn_structure_module(log_p, x, mask, log_p0, log_q0, sf, variant, a0, a1, a2, a3, tau,
                               t, K):
    """Outer module t of Alg. 1: the proximal cost at log P and K inner iterations."""
    p = masked_exp(log_p, mask)
    cost = -x - a0[t] * sf.apply(p) - tau[t] * log_p             # C_t
    eps = a1[t] + tau[t]
    k2 = kappa(a2[t], eps)
    k3 = kappa(a3[t], eps)
    y0 = zero_pad(-cost / eps, mask)
    if variant == "exact":
        log_p = _sinkhorn_exact_inner(y0, mask, log_p0, log_q0, k2, k3, K)
    else:
        log_p = _sinkhorn_paper_inner(lambda _t: y0, mask, log_p0, log_q0,
                                      lambda _t: k2, lambda _t: k3, lambda _t: eps, K,
                                      y_init=y0)
    return zero_pad(log_p, mask)


# --------------------------------------------------------------------------------------------
# Bregman ADMM (B-E, B-Q)
# --------------------------------------------------------------------------------------------
def badmm(x: Tensor, mask: Tensor, log_p0: Tensor, log_q0: Tensor,
          sf: Optional[StructureFactors], *, quadratic: bool, variant: str, a0: Optional[Tensor],
          a1: Tensor, a2: Tensor, a3: Tensor, rho: Tensor, T: int) -> Tensor:
    """Two-block Bregman ADMM with α0 > 0 (DESIGN §3.1, exact; §3.2, paper Alg. 2), one
    checkpointed module per iteration (the step is unrolled.Badmm's, with the structure term)."""
    L = Padded(mask)
    solver = Badmm(quadratic=quadratic, variant=variant, sf=sf, a0=a0)
    w = (a1, a2, a3, rho)
    state = solver.init(L, x, log_p0, log_q0)

    def module(t, *state):
        return solver.step(L, t, x, log_p0, log_q0, w, state)[0]

    for t in range(T):
        state = _checkpointed(module, t, *state)
    return state[2]


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def rot_log_plan(x: Tensor, mask: Tensor, log_p0: Tensor, log_q0: Tensor, *, method: str,
                 variant: str, structure: bool, a0: Tensor, a1: Tensor, a2: Tensor, a3: Tensor,
                 rho: Tensor, tau: Tensor, num_iters: int, inner_iters: int) -> Tensor:
    """log P (B, N, D) for a padded batch; padding entries are 0 (mask them before use).

    Args:
        x: (B, N, D) samples in the compute dtype, padding rows 0.
        mask: (B, N) bool.
        log_p0: (B, D) normalized log prior over features.
        log_q0: (B, N) normalized log prior over each set's samples (padding 0).
        a0, a1, a2, a3, rho, tau: (T,) weights.
    """
    log_p0 = log_p0.unsqueeze(1)                                     # [B, 1, D]
    log_q0 = log_q0.unsqueeze(2)                                     # [B, N, 1]
    T = num_iters
    sf = structure_factors(x, mask) if structure else None
    if not structure:  # memory independent of T (unrolled.py)
        # no padding (e.g. image windows): the mask-free layout has the hand-written adjoints
        full = not plain_ops() and bool(mask.all())
        return unrolled_log_plan(Padded(None if full else mask), x, log_p0, log_q0,
                                 method=method, variant=variant, a1=a1, a2=a2, a3=a3, rho=rho,
                                 T=T)
    if method == "sinkhorn":
        return sinkhorn_structure(x, mask, log_p0, log_q0, sf, variant=variant, a0=a0, a1=a1,
                                  a2=a2, a3=a3, tau=tau, T=T, K=inner_iters)
    return badmm(x, mask, log_p0, log_q0, sf, quadratic=(method == "badmm-q"), variant=variant,
                 a0=a0, a1=a1, a2=a2, a3=a3, rho=rho, T=T)


def pool_from_log_plan(log_p: Tensor, x: Tensor, mask: Tensor) -> Tensor:
    """Eq. (5) from log P: y_d = Σ_n softmax_n(log P[:, d]) x_nd. (B, N, D) -> (B, D).

    Every set must have at least one True in ``mask`` (the caller gives empty sets a dummy).
    """
    w = torch.softmax(log_p.masked_fill(~mask[..., None], _NEG_INF), dim=1)
    return (w * x).sum(1)


def normalized_plan(log_p: Tensor, mask: Tensor) -> Tensor:
    """Each set's P scaled to total mass 1, padding 0."""
    lp = log_p.masked_fill(~mask[..., None], _NEG_INF)
    return torch.exp(lp - torch.logsumexp(lp.flatten(1), dim=1)[:, None, None])
