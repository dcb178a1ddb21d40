"""``rot_pool``: regularized optimal-transport pooling of a batch of sets (DESIGN §9)."""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from ._batching import (SetBatch, as_weight, check_finite, check_priors, compute_dtype,
                        make_set_batch)
from ._checks import check_rot_values
from .ops.rot.solvers import (METHODS, VARIANTS, normalized_plan, pool_from_log_plan,
                              rot_log_plan, wants_structure)

Weight = Union[float, Tensor]
BACKENDS = ("auto", "triton", "torch")


def check_rot_options(method: str, variant: str, num_iters: int, inner_iters: int,
                      backend: str) -> None:
    """Validate the solver options shared by ``rot_pool`` and every ROT layer."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, v in (("num_iters", num_iters), ("inner_iters", inner_iters)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def rot_pool(x: Tensor, index: Optional[Tensor] = None, ptr: Optional[Tensor] = None,
             dim_size: Optional[int] = None, *, method: str = "badmm-e", variant: str = "exact",
             num_iters: int = 4, inner_iters: int = 5, a0: Weight = 0.0, a1: Weight = 1.0,
             a2: Weight = 1.0, a3: Weight = 1.0, rho: Weight = 1.0, tau: Weight = 1.0,
             p0: Optional[Tensor] = None, q0: Optional[Tensor] = None, backend: str = "auto",
             return_plan: bool = False, log_p0: Optional[Tensor] = None,
             log_q0: Optional[Tensor] = None):
    r"""Pool each set of a batch with regularized optimal transport (Xu & Cheng, TPAMI 2023).

    For one set X ∈ R^{D×N} (code layout: ``x`` (N, D)), solve the ROT problem (eq. 3)

    .. math::
        P^* = \arg\min_{P>0,\,1^\top P 1 = 1} \langle -X, P\rangle
              - \alpha_0 \operatorname{tr}(\Sigma_1 P \Sigma_2 P^\top) + \alpha_1 R(P)
              + \alpha_2 \mathrm{KL}(P 1_N | p_0) + \alpha_3 \mathrm{KL}(P^\top 1_D | q_0)

    approximately with ``num_iters`` unrolled modules of ``method``, and return
    :math:`y_d = \sum_n P^*_{dn} X_{dn} / \sum_n P^*_{dn}` (eq. 5, evaluated as a softmax of
    :math:`\log P^*`).

    Args:
        x: ``(B, N, D)`` dense batch, or ``(N_total, D)`` ragged batch with ``index``/``ptr``.
        index: ``(N_total,)`` set id of each row (any order).
        ptr: ``(B + 1,)`` CSR offsets (rows grouped by set).
        dim_size: number of sets B (ragged; sets without rows pool to zeros).
        method: ``"sinkhorn"`` | ``"badmm-e"`` (Bregman ADMM, entropic) | ``"badmm-q"`` (quadratic).
        variant: ``"exact"`` (solves eq. 3, DESIGN §3.1) | ``"paper"`` (the published updates,
            with their defects, DESIGN §3.2-3.3).
        num_iters: T, the number of unrolled modules.
        inner_iters: K, Sinkhorn iterations per proximal step (Sinkhorn with α0 > 0 only).
        a0: α0 ≥ 0, structure (Gromov-Wasserstein) weight. The α0 > 0 algorithms run iff ``a0``
            has a positive entry or requires grad.
        a1: α1 > 0, smoothness (entropic or quadratic regularizer) weight.
        a2, a3: α2, α3 ∈ [0, inf], marginal KL weights (``float('inf')``: hard marginal).
        rho: ρ > 0, the Bregman ADMM penalty. tau: τ ≥ 0, the proximal weight (Sinkhorn, α0 > 0).
            Each weight is a float or a tensor of shape ``()`` or ``(T,)`` (entry t for module t);
            tensors are differentiable.
        p0: ``(B, D)`` or ``(D,)`` positive prior over features (normalized per set); None: uniform.
        q0: like ``x[..., 0]`` (``(N_total,)`` or ``(B, N)``), positive prior over each set's
            samples (normalized per set); None: uniform.
        backend: ``"auto"`` (Triton kernels for CUDA tensors where one applies, else torch),
            ``"triton"`` (require a kernel) or ``"torch"``.
        return_plan: also return the plan P in x's layout, each set's P summing to 1.
        log_p0, log_q0: the priors as finite logits instead (same shapes as p0 / q0; normalized
            per set by a log-softmax) - what attention priors should pass.

    Returns:
        ``y`` of shape ``(B, D)`` in x's dtype, and with ``return_plan=True`` also ``P``.
    """
    check_rot_options(method, variant, num_iters, inner_iters, backend)
    batch = make_set_batch(x, index, ptr, dim_size, pad=False)
    check_finite(x, "x")
    D = x.shape[-1]
    cdt = compute_dtype(x.dtype)
    T = num_iters
    kw = dict(device=x.device, dtype=cdt)
    w = dict(
        a0=as_weight(a0, "a0", T, **kw),
        a1=as_weight(a1, "a1", T, allow_zero=False, **kw),
        a2=as_weight(a2, "a2", T, allow_inf=True, **kw),
        a3=as_weight(a3, "a3", T, allow_inf=True, **kw),
        rho=as_weight(rho, "rho", T, allow_zero=False, **kw),
        tau=as_weight(tau, "tau", T, **kw),
    )
    check_rot_values(x, w["a1"], w["rho"])
    structure = wants_structure(a0)
    uniform_p0 = p0 is None and log_p0 is None
    uniform_q0 = q0 is None and log_q0 is None
    log_p0, log_q0 = check_priors(p0, q0, batch, D, cdt, log_p0, log_q0)

    if backend != "torch":
        from .ops.rot import dispatch
        out = dispatch.try_triton(x, batch, method=method, variant=variant, structure=structure,
                                  weights=w, log_p0=log_p0, log_q0=log_q0, num_iters=T,
                                  inner_iters=inner_iters, uniform_p0=uniform_p0,
                                  uniform_q0=uniform_q0, return_plan=return_plan,
                                  required=backend == "triton")
        if out is not None:
            return out if return_plan else out[0]

    y, plan = _rot_pool_torch(x, batch, method=method, variant=variant, structure=structure,
                              weights=w, log_p0=log_p0, log_q0=log_q0, num_iters=T,
                              inner_iters=inner_iters, return_plan=return_plan)
    return (y, plan) if return_plan else y


def _rot_pool_torch(x: Tensor, batch: SetBatch, *, method, variant, structure, weights, log_p0,
                    log_q0, num_iters, inner_iters, return_plan):
    """The torch path on the padded view of ``x``."""
    B, N = batch.mask.shape
    D = x.shape[-1]
    cdt = compute_dtype(x.dtype)
    if N == 0:  # every set is empty: zeros, still connected to x for autograd
        y = (x.sum() * 0).expand(B, D).clone()
        return y, (x * 0 if return_plan else None)
    if not structure:  # α0 = 0: no padding (segments), memory independent of T
        from .ops.rot.torch_pool import rot_pool_unrolled
        return rot_pool_unrolled(x, batch, method=method, variant=variant, weights=weights,
                                 log_p0=log_p0, log_q0=log_q0, num_iters=num_iters, cdt=cdt,
                                 return_plan=return_plan)
    xp = batch.pad_rows(x).to(cdt) if not batch.dense else x.to(cdt)
    # An empty set is solved on one dummy zero sample (finite everywhere, so no NaN reaches
    # shared weights in the backward) and its output is zeroed.
    empty = batch.lengths == 0
    mask = batch.mask
    if bool(empty.any()):
        mask = mask.clone()
        mask[:, 0] |= empty
    log_p = rot_log_plan(xp, mask, log_p0, log_q0, method=method, variant=variant,
                         structure=structure, num_iters=num_iters, inner_iters=inner_iters,
                         **weights)
    y = pool_from_log_plan(log_p, xp, mask).masked_fill(empty[:, None], 0.0).to(x.dtype)
    plan = None
    if return_plan:
        plan = batch.unpad_rows(normalized_plan(log_p, mask)).to(x.dtype)
    return y, plan
