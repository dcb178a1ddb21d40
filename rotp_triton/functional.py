"""``rot_pool``: regularized optimal-transport pooling of a batch of sets (DESIGN §9).

The public boundary: options, shapes and (where value checks are on, ``ops/rot/params.py``)
values are checked here once; the weights become one (6, T) table; ``ops/rot/route.py`` picks
the Triton kernels or the torch path. Mathematics and API: ../../shared/DESIGN.md §2-3, §9;
front-end cost budget: ../../shared/PERF.md.
"""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from ._batching import SetBatch, compute_dtype, make_set_batch
from .ops.rot.params import A1, BACKENDS, RHO, check_options, wants_structure, weight_table
from .ops.rot.route import pool_sets
from ._checks import check_rot_values
from ._fx import traced_as_function

Weight = Union[float, Tensor]
check_rot_options = check_options  # the layers' name for it

__all__ = ["rot_pool", "rot_pool_table", "check_rot_options", "BACKENDS"]


@traced_as_function
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
    check_options(method, variant, num_iters, inner_iters, backend)
    batch = make_set_batch(x, index, ptr, dim_size, pad=False)
    table = weight_table(a0, a1, a2, a3, rho, tau, num_iters, x.device,
                         dtype=compute_dtype(x.dtype))
    return rot_pool_table(x, batch, table, structure=wants_structure(a0),
                          method=method, variant=variant, num_iters=num_iters,
                          inner_iters=inner_iters, p0=p0, q0=q0, backend=backend,
                          return_plan=return_plan, log_p0=log_p0, log_q0=log_q0)


def rot_pool_table(x: Tensor, batch: SetBatch, table: Tensor, *, structure: bool, method: str,
                   variant: str, num_iters: int, inner_iters: int, p0=None, q0=None,
                   backend: str = "auto", return_plan: bool = False, log_p0=None, log_q0=None,
                   spread: bool = False):
    """:func:`rot_pool` of ``x`` and its ``batch`` (``make_set_batch(..., pad=False)``) with
    the weights already the (6, T) table in x's compute dtype (``ops/rot/params.py``) and
    ``structure`` decided: what the layers call with ``ROTWeights.table`` (options checked
    when the layer was built; a layer may share the batch with its scale statistic).
    ``spread``: the layers' ``scale="auto"`` (``route.pool_sets``)."""
    check_rot_values(x, table[A1], table[RHO])  # x finite and not too large for α1, ρ: one pass
    y, plan = pool_sets(x, batch, table, method=method, variant=variant, structure=structure,
                        num_iters=num_iters, inner_iters=inner_iters, p0=p0, q0=q0,
                        log_p0=log_p0, log_q0=log_q0, backend=backend, return_plan=return_plan,
                        spread=spread)
    return (y, plan) if return_plan else y
