"""Generalized Sum Pooling (GSP), batched torch implementation (DESIGN.md §6).

Gurbuz, Sener, Alatan, "Generalized Sum Pooling for Metric Learning", ICCV 2023.

For one set of n samples x_i, projected by a 1x1 convolution to h_i = W x_i, and K prototypes
z_k, with pi(v) = v / max(1, ||v||) (projection onto the unit ball):

    c_ki  = || pi(z_k) - pi(h_i) ||,        s_i = sum_k exp(-gamma c_ki)
    rho_i = (1/n) / (1 + alpha s_i),        pi_ki = alpha rho_i exp(-gamma c_ki)
    alpha solves  sum_i alpha rho_i s_i = mu

(partial transport of mass mu from the samples to the prototypes, entropy 1/gamma; rho_i is the
mass of sample i left untransported). Outputs: the pooled features
x_bar = sum_i ((1/n - rho_i)/mu) h_i and the attribute histogram a_k = sum_i pi_ki / mu.

How it is computed (all equal to the formulas above; chosen for range and exactness):

* In t = log alpha and l_i = log s_i = LSE_k(-gamma c_ki), alpha rho_i s_i = sigma(t + l_i)/n, so
  alpha solves the scalar monotone equation F(t) = (1/n) sum_i sigma(t + l_i) - mu = 0, whose root
  lies in [logit(mu) - max_i l_i, logit(mu) - min_i l_i]. It is solved per set by Newton's method
  safeguarded by bisection on that bracket, to |F| <= tol (the transported mass is mu to within
  tol; default 1e-12 for float64 state, 1e-6 for float32), at most ``num_iters`` steps. Measured:
  <= 20 steps even with the l_i spread over 1000 (float32 and float64, mu from 1e-4 to 0.9999),
  2-5 on typical features. The paper's fixed point alpha <- mu / sum_i rho_i s_i converges
  linearly with a rate close to 1 when mu is close to 1: after its default 100 iterations the
  transported mass is still off by ~5e-3 at mu = 0.99 (gamma = 5, K = 64, n = 49). No
  exp(-gamma c) is formed unnormalised, so a large gamma cannot underflow s_i to 0.
* c_ki uses ||a||^2 + ||b||^2 - 2 a.b (no (B, K, n, D) difference tensor). In float32 the ~1e-7
  rounding of that sum gives c an absolute error up to ~3e-4 for near-coincident points (the
  sqrt of the rounding), i.e. a relative error up to ~gamma * 3e-4 in their kernel; float64 is
  exact to ~1e-8 there.
* Gradients: implicit, not unrolled. The root t* is found without autograd; then two Newton
  steps t <- N(t, l) = t - F(t, l) / F'(t, l) are taken from it with autograd recording. Their
  value is t* (up to tol); since N_t = 0 at the root, the first step's derivative is the
  implicit-function-theorem one, dt/dl_i = -sigma'(t + l_i) / sum_j sigma'(t + l_j), and the
  second step makes the second derivative the implicit function's too (Newton doubles the order
  of contact; one step, or F' detached, gives a wrong one), for gradients that are
  differentiated again (create_graph). Exact for the solved equation, O(n) extra work, no
  memory for iterations.
* Pooling weights w_i = (1/n - rho_i)/mu = sigma(t + l_i)/(n mu) are evaluated as
  sigma(t + l_i) / sum_j sigma(t + l_j) (equal at the root) so they sum to 1 exactly whatever the
  solve tolerance: gamma = 0 or equal s_i give global average pooling to rounding. Likewise
  a_k = sum_i w_i softmax_k(-gamma c_ki), which sums to 1 exactly.
* mu = 1 means alpha = inf: sigma = 1 for every sample (rho = 0), handled as that limit.
* mass and gamma are hyper-parameters (Python floats): no gradient flows to them.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from rotp_triton._autocast import without_autocast
from rotp_triton._batching import (SetBatch, check_finite, check_tensor, compute_dtype,
                                   make_set_batch)
from rotp_triton._fx import traced_as_function
from rotp_triton._transforms import transforms_active

__all__ = ["gsp_pool", "GSPOutput", "check_gsp_hparams", "as_set_input"]

# torch.compiler.is_exporting is recent: an older torch cannot export GSPool (eager is the same)
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)

GAMMA_MAX = 1e6


class GSPOutput(NamedTuple):
    """Everything :func:`gsp_pool` computes (``return_plan=True``).

    pooled: ``(B, D_out)``; histogram: ``(B, K)``; plan: pi_ki in x's row layout,
    ``(N_total, K)`` ragged or ``(B, N, K)`` dense (each set's plan sums to mu); rho: residual
    masses like ``x[..., 0]`` (each set's rho sums to 1 - mu); alpha: ``(B,)`` (inf when mu = 1,
    0 for empty sets).
    """
    pooled: Tensor
    histogram: Tensor
    plan: Tensor
    rho: Tensor
    alpha: Tensor


def as_set_input(x, index, ptr, dim_size, mask: Optional[Tensor] = None) -> tuple:
    """Accept sets (2-D ragged / 3-D dense, optionally masked) or images ``(B, C, H, W)``;
    returns ``(x, batch)`` with ``batch`` a :class:`~rotp_triton._batching.SetBatch`.

    An image is the set of its H*W pixels with C features: ``x.flatten(2).transpose(1, 2)``
    (a view, no copy). ``mask``: ``(B, N)`` bool for a dense ``x``, True for the real samples
    (the masked batch is pooled as the ragged batch ``x[mask]``).
    """
    check_tensor(x, "x", ndim=(2, 3, 4))
    if x.dim() == 4:
        if index is not None or ptr is not None or mask is not None:
            raise ValueError(f"index/ptr/mask are only used with set input; got an image batch "
                             f"(B, C, H, W) of shape {tuple(x.shape)}")
        if dim_size is not None and dim_size != x.shape[0]:
            raise ValueError(f"dim_size ({dim_size}) disagrees with the image batch size {x.shape[0]}")
        x = x.flatten(2).transpose(1, 2)
        dim_size = None
    if mask is not None:
        if x.dim() != 3:
            raise ValueError(f"mask is only used with a dense (B, N, D) x, got x of shape "
                             f"{tuple(x.shape)}")
        check_tensor(mask, "mask", ndim=(2,), floating=False)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"mask must have shape {tuple(x.shape[:2])} (like x[..., 0]), got "
                             f"{tuple(mask.shape)}")
        if dim_size is not None and dim_size != x.shape[0]:
            raise ValueError(f"dim_size ({dim_size}) disagrees with the dense batch size {x.shape[0]}")
        B = x.shape[0]
        mask = mask.to(x.device)
        index = torch.arange(B, device=x.device)[:, None].expand_as(mask)[mask]
        x, dim_size = x[mask], B
    check_finite(x, "x")
    return x, make_set_batch(x, index, ptr, dim_size)


def _check_int(v, name: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def _check_float(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def check_gsp_hparams(mass, gamma, num_iters, tol=None) -> tuple:
    """Validate GSP hyper-parameters; returns ``(mass, gamma, num_iters, tol)`` as Python numbers."""
    mass = _check_float(mass, "mass")
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    gamma = _check_float(gamma, "gamma")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if gamma > GAMMA_MAX:
        # beyond, float32 cannot resolve t + l_i (|l_i| ~ 2 gamma) and the transported mass drifts
        # from mu (measured: 4e-4 relative at 1e6, 2e-2 at 1e8, all mass at 5e37)
        raise ValueError(f"gamma must be <= {GAMMA_MAX:g} (the transported mass is lost beyond), "
                         f"got {gamma}")
    num_iters = _check_int(num_iters, "num_iters", 1)
    if tol is not None:
        tol = _check_float(tol, "tol")
        if tol <= 0:
            raise ValueError(f"tol must be > 0, got {tol}")
    return mass, gamma, num_iters, tol


def _unit_ball(v: Tensor) -> Tensor:
    """pi(v) = v / max(1, ||v||) per row; sqrt(max(1, ||v||^2)) keeps the gradient finite at 0."""
    return v / torch.sqrt(torch.clamp((v * v).sum(-1, keepdim=True), min=1.0))


def _safe_sqrt(d2: Tensor) -> Tensor:
    """sqrt of a non-negative tensor with gradient 0 (a subgradient) where it is 0, never NaN."""
    pos = d2 > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, d2, torch.ones_like(d2))), torch.zeros_like(d2))


@torch.no_grad()
def _solve_log_alpha(ell: Tensor, mask: Tensor, n: Tensor, mu: float, num_iters: int,
                     tol: float) -> Tensor:
    """Root t of F(t) = (1/n) sum_i sigma(t + l_i) - mu per set (safeguarded Newton).

    ell: ``(B, N)`` log s_i; mask: ``(B, N)`` real samples (every set has at least one);
    n: ``(B,)`` float sample counts. Returns ``(B,)``.
    """
    m = mask.to(ell.dtype)
    logit_mu = math.log(mu) - math.log1p(-mu)
    # F is increasing; sigma(t + min l) <= F + mu <= sigma(t + max l) brackets the root.
    lo = logit_mu - ell.masked_fill(~mask, float("-inf")).amax(1)
    hi = logit_mu - ell.masked_fill(~mask, float("inf")).amin(1)
    t = logit_mu - (ell * m).sum(1) / n              # inside the bracket (mean of l)
    tiny = torch.finfo(ell.dtype).tiny
    for _ in range(num_iters):
        sg = torch.sigmoid(t[:, None] + ell) * m
        F = sg.sum(1) / n - mu
        done = F.abs() <= tol
        # The early exit reads a value on the host, which torch.export and torch.func's vmap
        # cannot: there all num_iters run (a set that is done keeps its t: the rest change
        # nothing). Under torch.compile it stays, a graph break: unrolled, 100 steps took
        # inductor ~2 min.
        if not _is_exporting() and not transforms_active() and bool(done.all()):
            break
        dF = (sg * (1.0 - sg)).sum(1) / n
        hi = torch.where(F > 0, t, hi)
        lo = torch.where(F < 0, t, lo)
        t_newton = t - F / dF.clamp_min(tiny)
        inside = (t_newton > lo) & (t_newton < hi)
        t = torch.where(done, t, torch.where(inside, t_newton, 0.5 * (lo + hi)))
    return t


@traced_as_function  # outermost: the graph's node calls the public function
@without_autocast
def gsp_pool(x: Tensor, prototypes: Tensor, index: Optional[Tensor] = None,
             ptr: Optional[Tensor] = None, dim_size: Optional[int] = None, *,
             weight: Optional[Tensor] = None, mass: float = 0.3, gamma: float = 5.0,
             num_iters: int = 100, tol: Optional[float] = None, return_histogram: bool = False,
             return_plan: bool = False, mask: Optional[Tensor] = None):
    """Generalized Sum Pooling of a batch of sets or images (see the module docstring).

    Args:
        x: ``(N_total, D_in)`` ragged with ``index``/``ptr``, ``(B, N, D_in)`` dense, or images
            ``(B, D_in, H, W)`` (each image the set of its H*W pixels).
        prototypes: ``(K, D_out)`` the prototypes z_k.
        index: ``(N_total,)`` set id of each row (any order). ptr: ``(B + 1,)`` CSR offsets.
        dim_size: number of sets B (ragged input; sets without rows give zeros).
        mask: ``(B, N)`` bool for a dense x, True for real samples (rows of the plan/rho
            outputs are then those of ``x[mask]``).
        weight: ``(D_out, D_in)`` the 1x1 projection (a ``Linear`` / 1x1 ``Conv2d`` weight);
            ``None`` pools x itself (D_out = D_in).
        mass: mu in (0, 1], the transported mass. gamma: >= 0, inverse entropy weight.
        num_iters: at most this many Newton/bisection steps for alpha (all of them in a model
            exported by torch.export, which cannot stop on a value: <= 20 suffice).
        tol: stop when |sum_ki pi_ki - mu| <= tol per set (default 1e-12 in float64 state,
            1e-6 in float32 state).
        return_histogram: also return the histogram ``(B, K)``.
        return_plan: return a :class:`GSPOutput` (pooled, histogram, plan, rho, alpha).
    Returns:
        pooled ``(B, D_out)`` in x's dtype; ``(pooled, histogram)`` with ``return_histogram``;
        a :class:`GSPOutput` with ``return_plan``. Empty sets give zeros.
    """
    mass, gamma, num_iters, tol = check_gsp_hparams(mass, gamma, num_iters, tol)
    x, batch = as_set_input(x, index, ptr, dim_size, mask)
    D_in = x.shape[-1]
    check_tensor(prototypes, "prototypes", ndim=(2,))
    if weight is not None:
        check_tensor(weight, "weight", ndim=(2,))
        if weight.shape[1] != D_in:
            raise ValueError(f"weight must have shape (D_out, {D_in}) (x has {D_in} features), "
                             f"got {tuple(weight.shape)}")
    D_out = D_in if weight is None else weight.shape[0]
    if prototypes.shape[1] != D_out or prototypes.shape[0] < 1:
        raise ValueError(f"prototypes must have shape (K >= 1, {D_out}) (the projected feature "
                         f"size), got {tuple(prototypes.shape)}")
    cd = compute_dtype(x.dtype)
    if tol is None:
        tol = 1e-12 if cd == torch.float64 else 1e-6
    out = _gsp_padded(batch, weight, prototypes, mass, gamma, num_iters, tol, cd, return_plan)
    pooled, hist = out[0].to(x.dtype), out[1].to(x.dtype)
    if return_plan:
        plan, rho, alpha = out[2:]
        return GSPOutput(pooled, hist, batch.unpad_rows(plan).to(x.dtype),
                         batch.unpad_rows(rho).to(x.dtype), alpha)
    return (pooled, hist) if return_histogram else pooled


def _gsp_padded(batch: SetBatch, weight, prototypes, mu, gamma, num_iters, tol, cd, return_plan):
    X = batch.x.to(cd)
    H = X if weight is None else X @ weight.to(cd).T           # 1x1 convolution, (B, N, D_out)
    Z = prototypes.to(cd)
    B, N = batch.mask.shape
    K = Z.shape[0]
    if N == 0:  # every set empty: zeros, still attached to the graph so backward() works
        z = H.new_zeros
        hist = (0.0 * Z.sum(-1))[None, :].expand(B, K)
        return H.sum(1), hist, z(B, 0, K), z(B, 0), z(B)
    nonempty = batch.lengths > 0
    # An empty set gets one fake sample (its zero padding row) so that every quantity stays
    # finite; its outputs are zeroed below and its row is not connected to x, so no gradient leaks.
    mask = batch.mask.clone()
    mask[:, 0] |= ~nonempty
    m = mask.to(cd)
    n = batch.lengths.clamp_min(1).to(cd)

    pH, pZ = _unit_ball(H), _unit_ball(Z)
    # ||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b avoids a (B, K, N, D) difference tensor.
    d2 = (pZ * pZ).sum(-1)[None, :, None] + (pH * pH).sum(-1)[:, None, :] \
        - 2.0 * torch.einsum("kd,bnd->bkn", pZ, pH)
    logits = -gamma * _safe_sqrt(d2.clamp_min(0.0))              # -gamma c_ki, (B, K, N)
    ell = torch.logsumexp(logits, dim=1)                          # l_i = log s_i, (B, N)
    q = torch.softmax(logits, dim=1)                              # exp(-gamma c_ki) / s_i

    if mu == 1.0:
        z = None
        sig = m                                                   # alpha = inf: all mass moves
        alpha = torch.full((B,), float("inf"), dtype=cd, device=X.device)
    else:
        t = _solve_log_alpha(ell.detach(), mask, n, mu, num_iters, tol)
        if ell.requires_grad:
            # implicit differentiation: two Newton steps from the root t*, whose first and
            # second derivatives are the implicit function's (module docstring)
            for _ in range(2):
                sg = torch.sigmoid(t[:, None] + ell) * m
                F = sg.sum(1) / n - mu
                dF = ((sg * (1.0 - sg)).sum(1) / n).clamp_min(torch.finfo(cd).tiny)
                t = t - F / dF
        z = t[:, None] + ell
        sig = torch.sigmoid(z) * m                                # n alpha rho_i s_i
        alpha = torch.exp(t)
    w = sig / sig.sum(1, keepdim=True)                            # (1/n - rho_i)/mu, sums to 1
    keep = nonempty.to(cd)[:, None]
    pooled = torch.einsum("bn,bnd->bd", w, H) * keep
    hist = torch.einsum("bn,bkn->bk", w, q) * keep                # a_k = sum_i pi_ki / mu
    if not return_plan:
        return pooled, hist
    plan = (sig / n[:, None])[:, :, None] * q.transpose(1, 2)     # pi_ki, (B, N, K)
    plan = plan * batch.mask.to(cd)[:, :, None]
    if z is None:
        rho = torch.zeros_like(sig)
    else:
        rho = torch.sigmoid(-z) * batch.mask.to(cd) / n[:, None]  # (1/n) / (1 + alpha s_i)
    alpha = torch.where(nonempty, alpha, torch.zeros_like(alpha))
    return pooled, hist, plan, rho, alpha
