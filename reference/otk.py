"""Reference OTK embedding for ONE set: a literal transcription, no tricks.

Mialon, Chen, d'Aspremont, Mairal, "A Trainable Optimal Transport Embedding for Feature
Aggregation and its Relationship to Attention", ICLR 2021; DESIGN.md §6.

One set of n samples x_i (rows of ``x``, d features); h heads, each with p learnable supports
W^c in R^{p x d}. Per head c:

    S   = x W^cT                                          (n x p scores; the cost is -S)
    P   = argmax_{P 1_p = 1_n / n, P^T 1_n = 1_p / p} <S, P> + eps H(P)   (entropic balanced OT)
    y^c = p P^T x                                         (p x d)

computed by T Sinkhorn iterations, each a row update then a column update (as the official
code), so the column marginals 1/p hold exactly after the last iteration:

    log domain:  f_i = -log n - LSE_j(S_ij / eps + g_j),   g_j = -log p - LSE_i(S_ij / eps + f_i)
                 P_ij = exp(S_ij / eps + f_i + g_j)
    scaling:     K = exp(S / eps),  u = (1/n) / (K v),  v = (1/p) / (K^T u),  P = diag(u) K diag(v)

Column scaling: P is multiplied by p, so each support's column sums to 1 and every output row is
a convex combination of the inputs (the paper scales by sqrt(p) instead). Output: the heads
concatenated along features, (p, h d). With p = 1 the output is the mean of the set.

This file must not import rotp_triton: it is the independent oracle of the package's tests.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def otk_reference(x: Tensor, weight: Tensor, *, eps: float = 0.1, num_iters: int = 10,
                  log_domain: bool = True, return_plan: bool = False):
    """OTK embedding of one set.

    Args:
        x: ``(n, d)`` the set's samples (n may be 0: zeros).
        weight: ``(h, p, d)`` the supports of every head.
        eps: entropic regularisation (> 0).
        num_iters: Sinkhorn iterations T.
        log_domain: log-domain (f, g) updates, else scaling (u, v) updates.
        return_plan: also return the plans, ``(h, n, p)``, columns scaled to sum 1.
    Returns:
        ``(p, h d)`` [, ``(h, n, p)``].
    """
    n, d = x.shape
    h, p, _ = weight.shape
    if n == 0:
        out = x.new_zeros(p, h * d)
        return (out, x.new_zeros(h, 0, p)) if return_plan else out
    outs, plans = [], []
    for c in range(h):
        S = x @ weight[c].T                                # (n, p) scores
        if log_domain:
            f = x.new_zeros(n)
            g = x.new_zeros(p)
            for _ in range(num_iters):
                f = -math.log(n) - torch.logsumexp(S / eps + g[None, :], dim=1)
                g = -math.log(p) - torch.logsumexp(S / eps + f[:, None], dim=0)
            P = torch.exp(S / eps + f[:, None] + g[None, :])
        else:
            K = torch.exp(S / eps)
            u = x.new_ones(n)
            v = x.new_ones(p)
            for _ in range(num_iters):
                u = (1.0 / n) / (K @ v)
                v = (1.0 / p) / (K.T @ u)
            P = u[:, None] * K * v[None, :]
        A = p * P                                          # column scaling: each column sums to 1
        outs.append(A.T @ x)                               # (p, d) = p P^T x
        plans.append(A)
    out = torch.cat(outs, dim=1)                           # heads concatenated: (p, h d)
    return (out, torch.stack(plans)) if return_plan else out
