"""Reference Generalized Sum Pooling (GSP) for ONE set: a literal transcription, no tricks.

Gurbuz, Sener, Alatan, "Generalized Sum Pooling for Metric Learning", ICCV 2023; DESIGN.md §6.

One set of n samples x_i (rows of ``x``), projected by a 1x1 convolution (a linear map ``weight``)
to h_i; K prototypes z_k. With pi(v) = v / max(1, ||v||) the projection onto the unit ball:

    c_ki  = || pi(z_k) - pi(h_i) ||                          (binary cost)
    s_i   = sum_k exp(-gamma c_ki)
    rho_i = (1/n) / (1 + alpha s_i)                          (residual mass of sample i)
    pi_ki = alpha rho_i exp(-gamma c_ki)                     (transport plan)
    alpha solves  sum_i alpha rho_i s_i = mu                 (total transported mass = mu)

The scalar alpha is found with the paper's fixed point (official code, ``fixedPointIteration``):
alpha <- mu / sum_i rho_i(alpha) s_i, started from alpha = 1. It converges monotonically, with a
rate equal to a weighted mean of alpha s_i / (1 + alpha s_i) (< 1), so slowly when mu is close
to 1: pass a large ``num_iters`` for an oracle. Gradients are those of the unrolled iterations
(plain autograd).

    pooled  x_bar = sum_i ((1/n - rho_i) / mu) h_i
    histogram a_k = sum_i pi_ki / mu

This file must not import rotp_triton: it is the independent oracle of the package's tests.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class GSPReference(NamedTuple):
    pooled: Tensor     # (D_out,)
    histogram: Tensor  # (K,)
    plan: Tensor       # (K, n)   pi_ki
    rho: Tensor        # (n,)     residual masses
    alpha: Tensor      # ()       the scalar of the transport plan


def unit_ball(v: Tensor) -> Tensor:
    """pi(v) = v / max(1, ||v||) for every row of ``v`` (projection onto the unit ball)."""
    norms = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return v / torch.clamp(norms, min=1.0)


def safe_norm(v: Tensor) -> Tensor:
    """||v|| over the last axis with gradient 0 (a subgradient) at v = 0 instead of NaN."""
    sq = (v * v).sum(-1)
    pos = sq > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def gsp_reference(x: Tensor, prototypes: Tensor, weight: Optional[Tensor] = None, *,
                  mass: float = 0.3, gamma: float = 5.0, num_iters: int = 100,
                  tol: float = -1.0) -> GSPReference:
    """GSP of one set.

    Args:
        x: ``(n, D_in)`` the set's samples (n may be 0).
        prototypes: ``(K, D_out)`` the prototypes z_k.
        weight: ``(D_out, D_in)`` the 1x1 projection (``None``: identity, D_out = D_in).
        mass: mu in (0, 1], the total transported mass.
        gamma: >= 0, inverse entropy weight (1/gamma is the entropy regularisation).
        num_iters: fixed-point iterations for alpha.
        tol: stop early once an iteration changes alpha by at most tol * alpha (default: never).
    """
    h = x if weight is None else x @ weight.T              # 1x1 convolution
    n = h.shape[0]
    K = prototypes.shape[0]
    if n == 0:
        zero = h.new_zeros(())
        return GSPReference(h.new_zeros(h.shape[1]), h.new_zeros(K), h.new_zeros(K, 0),
                            h.new_zeros(0), zero)
    mu = mass
    pz = unit_ball(prototypes)                             # pi(z_k)
    ph = unit_ball(h)                                      # pi(h_i)
    c = torch.stack([torch.stack([safe_norm(pz[k] - ph[i]) for i in range(n)]) for k in range(K)])
    E = torch.exp(-gamma * c)                              # exp(-gamma c_ki), (K, n)
    s = E.sum(0)                                           # s_i
    q = 1.0 / n                                            # source mass of each sample
    if mu == 1.0:
        # alpha = inf: rho_i = 0 and alpha rho_i = 1 / (n s_i) (the limit of the formulas)
        rho = h.new_zeros(n)
        alpha = h.new_tensor(float("inf"))
        plan = E * (q / s)[None, :]
    else:
        alpha = h.new_tensor(1.0)
        for _ in range(num_iters):
            rho = q / (1.0 + alpha * s)                    # rho_i(alpha)
            prev, alpha = alpha, mu / (rho * s).sum()      # fixed point of sum_i alpha rho_i s_i = mu
            if abs(float(alpha.detach() - prev.detach())) <= tol * float(alpha.detach()):
                break
        rho = q / (1.0 + alpha * s)
        plan = alpha * rho[None, :] * E                    # pi_ki = alpha rho_i exp(-gamma c_ki)
    pooled = (((q - rho) / mu)[:, None] * h).sum(0)        # x_bar = sum_i (1/n - rho_i)/mu h_i
    hist = plan.sum(1) / mu                                # a_k = sum_i pi_ki / mu
    return GSPReference(pooled, hist, plan, rho, alpha)
