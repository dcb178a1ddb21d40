"""The trainable optimal-transport embedding (OTK), batched torch implementation (DESIGN.md §6).

Mialon, Chen, d'Aspremont, Mairal, "A Trainable Optimal Transport Embedding for Feature
Aggregation and its Relationship to Attention", ICLR 2021.

For one set of n samples x_i (d features) and h heads of p learnable supports W^c (p x d):

    S^c = x W^cT                          (n x p scores; the transport cost is -S^c)
    P^c = the entropic balanced OT plan, marginals 1/n on the samples and 1/p on the supports:
          argmax <S^c, P> + eps H(P),    computed by ``num_iters`` Sinkhorn iterations
    y^c = p P^cT x                        (p x d),    output: heads concatenated, (p, h d)

Each Sinkhorn iteration updates the sample potential, then the support potential (the official
code's order), so the support marginals hold exactly after the last iteration.

Column scaling (the choice DESIGN §6 asks to document): the plan is multiplied by p, so every
support's column sums to 1 and each output row y_j is a convex combination of the set's samples
(the paper multiplies by sqrt(p) instead; that is this output times 1/sqrt(p)). Hence p = 1, or
W = 0, gives mean pooling for any eps; the output is invariant to the order of the samples and
permuting the supports permutes the output rows.

In the log domain the scaled plan is evaluated as a softmax over the samples, A_ij =
softmax_i(S_ij / eps + f_i) (DESIGN §1: never exponentiate an unnormalised log plan to pool); it
is the same as p exp(S/eps + f + g) after the support update. The scaling domain (u, v updates,
``log_domain=False``) is the official fast path; it subtracts each set's largest score before
exp (which leaves P unchanged) but still underflows when the scores of a set spread over more
than ~80 eps (float32) / ~700 eps (float64).

Gradients are those of the unrolled iterations (autograd); ``num_iters`` is small (10 by default).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from rotp_triton._autocast import without_autocast
from rotp_triton._batching import SetBatch, check_tensor, compute_dtype
from rotp_triton._fx import traced_as_function
from rotp_triton.ops.gsp import _check_float, _check_int, as_set_input

__all__ = ["otk_pool", "check_otk_hparams", "kmeans"]


def check_otk_hparams(eps, num_iters, log_domain) -> tuple:
    """Validate OTK hyper-parameters; returns ``(eps, num_iters, log_domain)``."""
    eps = _check_float(eps, "eps")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    num_iters = _check_int(num_iters, "num_iters", 1)
    if not isinstance(log_domain, bool):
        raise TypeError(f"log_domain must be a bool, got {type(log_domain).__name__}")
    return eps, num_iters, log_domain


@traced_as_function  # outermost: the graph's node calls the public function
@without_autocast
def otk_pool(x: Tensor, weight: Tensor, index: Optional[Tensor] = None,
             ptr: Optional[Tensor] = None, dim_size: Optional[int] = None, *, eps: float = 0.1,
             num_iters: int = 10, log_domain: bool = True, return_plan: bool = False,
             mask: Optional[Tensor] = None):
    """OTK embedding of a batch of sets or images (see the module docstring).

    Args:
        x: ``(N_total, d)`` ragged with ``index``/``ptr``, ``(B, N, d)`` dense, or images
            ``(B, d, H, W)`` (each image the set of its H*W pixels).
        weight: ``(h, p, d)`` the supports of every head, or ``(p, d)`` for one head.
        index: ``(N_total,)`` set id of each row (any order). ptr: ``(B + 1,)`` CSR offsets.
        dim_size: number of sets B (ragged input; sets without rows give zeros).
        mask: ``(B, N)`` bool for a dense x, True for real samples (the plan's rows are then
            those of ``x[mask]``).
        eps: entropic regularisation, > 0. num_iters: Sinkhorn iterations, >= 1.
        log_domain: log-domain potentials (stable for any eps) or scaling vectors.
        return_plan: also return the scaled plans in x's row layout, ``(N_total, h, p)`` ragged
            or ``(B, N, h, p)`` dense (images: ``(B, H*W, h, p)``); each support's column sums to 1
            over a set's rows, and ``y[b, j, c*d:(c+1)*d] = sum_i A[i, c, j] x_i``.
    Returns:
        ``(B, p, h*d)`` in x's dtype [, the plans]. Empty sets give zeros.
    """
    eps, num_iters, log_domain = check_otk_hparams(eps, num_iters, log_domain)
    x, batch = as_set_input(x, index, ptr, dim_size, mask)
    d = x.shape[-1]
    check_tensor(weight, "weight", ndim=(2, 3))
    if weight.dim() == 2:
        weight = weight.unsqueeze(0)
    if weight.shape[-1] != d or weight.shape[1] < 1 or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape (heads, p >= 1, {d}) or (p, {d}) (x has {d} "
                         f"features), got {tuple(weight.shape)}")
    cd = compute_dtype(x.dtype)
    y, A = _otk_padded(batch, weight.to(cd), eps, num_iters, log_domain, cd)
    y = y.to(x.dtype)
    if return_plan:
        return y, batch.unpad_rows(A.permute(0, 2, 1, 3)).to(x.dtype)
    return y


def _otk_padded(batch: SetBatch, W: Tensor, eps: float, T: int, log_domain: bool, cd):
    X = batch.x.to(cd)                                            # (B, N, d)
    B, N = batch.mask.shape
    h, p, d = W.shape
    if N == 0:  # every set empty: zeros, still attached to the graph so backward() works
        y = torch.einsum("bnd,hpd->bphd", X, W).reshape(B, p, h * d)
        return y, X.new_zeros(B, h, 0, p)
    nonempty = batch.lengths > 0
    # An empty set gets one fake sample (its zero padding row) so that every quantity stays
    # finite; its output is zeroed below and the row is not connected to x.
    mask = batch.mask.clone()
    mask[:, 0] |= ~nonempty
    n = batch.lengths.clamp_min(1).to(cd)
    S = torch.einsum("bnd,hpd->bhnp", X, W) / eps                 # scores / eps, (B, h, N, p)
    rows = mask[:, None, :, None]                                 # real samples
    if log_domain:
        log_n = torch.log(n)[:, None, None]
        S_rows = S.masked_fill(~rows, float("-inf"))              # padding rows carry no mass
        g = S.new_zeros(B, h, p)
        for _ in range(T):
            f = -log_n - torch.logsumexp(S + g[:, :, None, :], dim=3)          # (B, h, N)
            g = -math.log(p) - torch.logsumexp(S_rows + f[..., None], dim=2)   # (B, h, p)
        A = torch.softmax(S_rows + f[..., None], dim=2)           # = p exp(S/eps + f + g)
    else:
        # shift by the set's largest score: P is unchanged, exp overflows later
        shift = S.masked_fill(~rows, float("-inf")).amax(dim=(2, 3), keepdim=True)
        Kmat = torch.exp(S - shift).masked_fill(~rows, 0.0)
        rmask = mask[:, None, :]
        v = S.new_ones(B, h, p)
        for _ in range(T):
            Kv = (Kmat @ v[..., None]).squeeze(-1)                 # (B, h, N)
            # padding rows: a safe denominator (their u is 0) so no 0/0 reaches the gradient
            u = torch.where(rmask, (1.0 / n)[:, None, None] / torch.where(rmask, Kv, 1.0), 0.0)
            v = (1.0 / p) / (Kmat.transpose(2, 3) @ u[..., None]).squeeze(-1)
        A = p * u[..., None] * Kmat * v[:, :, None, :]
    y = torch.einsum("bhnp,bnd->bphd", A, X).reshape(B, p, h * d)
    keep = nonempty.to(cd)
    return y * keep[:, None, None], A * (keep[:, None, None, None] * batch.mask[:, None, :, None])


@torch.no_grad()
def kmeans(points: Tensor, k: int, *, num_iters: int = 20,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """Lloyd's k-means with k-means++ seeding (used to initialise OTK supports from data).

    Args:
        points: ``(M, d)`` with M >= k. k: number of centroids.
        num_iters: Lloyd iterations (stops early once the assignment no longer changes).
        generator: random generator of the seeding (on points' device).
    Returns:
        ``(k, d)`` centroids in points' dtype. An emptied cluster is re-seeded at the point
        farthest from its centroid, so all k centroids are distinct data-driven points.
    """
    check_tensor(points, "points", ndim=(2,))
    k = _check_int(k, "k", 1)
    num_iters = _check_int(num_iters, "num_iters", 0)
    M = points.shape[0]
    if M < k:
        raise ValueError(f"k-means needs at least k = {k} points, got {M}")
    P = points.to(compute_dtype(points.dtype))
    # k-means++: each new seed drawn with probability proportional to the squared distance to
    # the nearest seed so far (spreads the seeds; O(log k)-competitive in expectation).
    first = torch.randint(M, (1,), generator=generator, device=P.device)
    C = P[first]
    d2 = ((P - C[0]) ** 2).sum(-1)
    for _ in range(1, k):
        if float(d2.sum()) > 0:
            nxt = torch.multinomial(d2, 1, generator=generator)
        else:  # fewer distinct points than k: duplicates are unavoidable
            nxt = torch.randint(M, (1,), generator=generator, device=P.device)
        C = torch.cat([C, P[nxt]])
        d2 = torch.minimum(d2, ((P - P[nxt]) ** 2).sum(-1))
    assign = None
    for _ in range(num_iters):
        dist = torch.cdist(P, C)                                   # (M, k)
        new_assign = dist.argmin(1)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        counts = torch.bincount(assign, minlength=k).to(P.dtype)
        sums = torch.zeros_like(C).index_add_(0, assign, P)
        C = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], C)
        far = dist.min(1).values
        for j in torch.nonzero(counts == 0).flatten().tolist():
            i = far.argmax()
            C[j] = P[i]
            far[i] = -1.0                                          # not twice the same point
    return C.to(points.dtype)
