"""α0 > 0 (the structure term) as an autograd op: the custom operators
``rotp_triton::structure_fwd`` / ``structure_bwd`` (``torch.library.triton_op``, launches
through ``wrap_triton``, explicit fake kernels; ``StructureROTFunction`` where torch has no
triton_op), and the family's entry point ``structure_pool`` (docs/kernels.md: the (6, T)
weight table).

The backward is the exact gradient of the T unrolled iterations (x through Σ1, Σ2 and their
centring, every per-iteration weight, the prior logits), recomputed from the inputs: the
forward saves x, the weights and log P_T only (memory independent of T); the backward keeps
⌈√T⌉-spaced checkpoints (O(T^1.5) recompute). Dense and ragged batches are both handled in
the caller's row layout with no host read of ptr, so torch.compile(fullgraph=True) traces
either. Derivations and the launch plan: ../../../../../docs/adjoints.md; design:
../../../../../../shared/DESIGN.md §3, §7.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ...higher_order import recomputed_vjp, recorded_backward
from ..common import eager_function
from ..recompute import pool_sets
from .launch import _LAUNCH_WRAP, _WEIGHTS, structure_backward, structure_forward

_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
structure_fwd_op = None
structure_bwd_op = None


def _weights(ws) -> dict:
    return dict(zip(_WEIGHTS, ws))


def _fwd(x, ptr, log_p0, log_q0, a0, a1, a2, a3, rho, tau, method, variant, K, return_plan):
    """(y (B, D) in x's dtype, plan in x's shape or an empty tensor, log P_T (R, D) fp32)."""
    y, plan, log_p = structure_forward(x, ptr, log_p0, log_q0,
                                       _weights((a0, a1, a2, a3, rho, tau)), method, variant,
                                       K, return_plan)
    return y, (plan if plan is not None else x.new_empty(0)), log_p


def _bwd(x, ptr, log_p0, log_q0, a0, a1, a2, a3, rho, tau, log_p_T, gy, gplan, method,
         variant, K):
    """(∂L/∂x like x, ∂L/∂log p0 (B, D), ∂L/∂log q0 (R,), ∂L/∂weights (6, T)), fp32 but x's."""
    return structure_backward(x, ptr, log_p0, log_q0, _weights((a0, a1, a2, a3, rho, tau)),
                              log_p_T, gy, gplan, method, variant, K)


def _rows(x: Tensor) -> int:
    return x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]


def _input_grads(x, log_p0, log_q0, ws, grads):
    """The backward's outputs cast to the inputs' dtypes (None for absent priors)."""
    gx, g_lp0, g_lq0, g_w = grads
    g_lp0 = g_lp0.to(log_p0.dtype) if log_p0 is not None else None
    g_lq0 = g_lq0.view(log_q0.shape).to(log_q0.dtype) if log_q0 is not None else None
    return gx, g_lp0, g_lq0, [g_w[i].to(w.dtype) for i, w in enumerate(ws)]


def _recorded_grads(ctx, gy, gplan, method, variant, K, return_plan) -> list:
    """Gradients of (x, ptr, log p0, log q0, a0 … τ) that autograd records (create_graph):
    the torch path recomputed (``..recompute``)."""
    def forward(x, ptr, lp0, lq0, *ws):
        return pool_sets(x, ptr, torch.stack(ws), lp0, lq0, method=method, variant=variant,
                         structure=True, inner_iters=K, return_plan=return_plan)
    return recomputed_vjp(forward, ctx.saved_tensors[:10], ctx.needs_input_grad[:10],
                          (gy, gplan))


class StructureROTFunction(torch.autograd.Function):
    """The same forward and backward as the custom operators, for a torch without triton_op."""

    @staticmethod
    def forward(ctx, x, ptr, log_p0, log_q0, a0, a1, a2, a3, rho, tau, meta):
        y, plan, log_p = _fwd(x, ptr, log_p0, log_q0, a0, a1, a2, a3, rho, tau,
                              meta["method"], meta["variant"], meta["K"], meta["return_plan"])
        ctx.meta = meta
        ctx.save_for_backward(x, ptr, log_p0, log_q0, a0, a1, a2, a3, rho, tau, log_p)
        return y, plan

    @staticmethod
    def backward(ctx, gy, gplan):
        m = ctx.meta
        if recorded_backward():  # the kernels' backward is first order: the torch path's
            return (*_recorded_grads(ctx, gy, gplan, m["method"], m["variant"], m["K"],
                                     m["return_plan"]), None)
        x, ptr, log_p0, log_q0, *ws, log_p_T = ctx.saved_tensors
        grads = _bwd(x, ptr, log_p0, log_q0, *ws, log_p_T, gy,
                     gplan if m["return_plan"] else None, m["method"], m["variant"], m["K"])
        gx, g_lp0, g_lq0, gws = _input_grads(x, log_p0, log_q0, ws, grads)
        return (gx, None, g_lp0, g_lq0, *gws, None)


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
        def structure_fwd_op(x: Tensor, ptr: Optional[Tensor], log_p0: Optional[Tensor],
                             log_q0: Optional[Tensor], a0: Tensor, a1: Tensor, a2: Tensor,
                             a3: Tensor, rho: Tensor, tau: Tensor, method: str, variant: str,
                             K: int, return_plan: bool) -> Tuple[Tensor, Tensor, Tensor]:
            """See :func:`launch.structure_forward`."""
            return _wrapped(_fwd, x, ptr, log_p0, log_q0, a0, a1, a2, a3, rho, tau, method,
                            variant, K, return_plan)

        @triton_op("rotp_triton::structure_bwd", mutates_args=())
        def structure_bwd_op(x: Tensor, ptr: Optional[Tensor], log_p0: Optional[Tensor],
                             log_q0: Optional[Tensor], a0: Tensor, a1: Tensor, a2: Tensor,
                             a3: Tensor, rho: Tensor, tau: Tensor, log_p_T: Tensor,
                             gy: Optional[Tensor], gplan: Optional[Tensor], method: str,
                             variant: str, K: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
            """See :func:`launch.structure_backward`."""
            return _wrapped(_bwd, x, ptr, log_p0, log_q0, a0, a1, a2, a3, rho, tau, log_p_T,
                            gy, gplan, method, variant, K)

        def _setup_context(ctx, inputs, output):
            (x, ptr, log_p0, log_q0, a0, a1, a2, a3, rho, tau, method, variant, K,
             return_plan) = inputs
            ctx.save_for_backward(x, ptr, log_p0, log_q0, a0, a1, a2, a3, rho, tau, output[2])
            ctx.args = (method, variant, K, return_plan)

        def _backward(ctx, gy, gplan, g_lp_out):
            method, variant, K, return_plan = ctx.args
            if recorded_backward():  # the kernels' backward is first order: the torch path's
                return (*_recorded_grads(ctx, gy, gplan, method, variant, K, return_plan),
                        None, None, None, None)
            x, ptr, log_p0, log_q0, *ws, log_p_T = ctx.saved_tensors
            grads = structure_bwd_op(x, ptr, log_p0, log_q0, *ws, log_p_T, gy,
                                     gplan if return_plan else None, method, variant, K)
            gx, g_lp0, g_lq0, gws = _input_grads(x, log_p0, log_q0, ws, grads)
            return (gx, None, g_lp0, g_lq0, *gws, None, None, None, None)

        structure_fwd_op.register_autograd(_backward, setup_context=_setup_context)

        # Explicit fake kernels: under TRITON_INTERPRET=1 wrap_triton hands back the raw
        # interpreted kernel, which cannot run on fake tensors, so tracing needs these.
        @structure_fwd_op.register_fake
        def _structure_fwd_fake(x, ptr, log_p0, log_q0, a0, a1, a2, a3, rho, tau, method,
                                variant, K, return_plan):
            B = x.shape[0] if ptr is None else ptr.shape[0] - 1
            D = x.shape[-1]
            plan = x.new_empty(x.shape) if return_plan else x.new_empty(0)
            return x.new_empty(B, D), plan, x.new_empty(_rows(x), D, dtype=torch.float32)

        @structure_bwd_op.register_fake
        def _structure_bwd_fake(x, ptr, log_p0, log_q0, a0, a1, a2, a3, rho, tau, log_p_T, gy,
                                gplan, method, variant, K):
            B = x.shape[0] if ptr is None else ptr.shape[0] - 1
            f = dict(dtype=torch.float32)
            return (x.new_empty(x.shape), x.new_empty(B, x.shape[-1], **f),
                    x.new_empty(_rows(x), **f), x.new_empty(6, a1.shape[0], **f))
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
    # options, dtype and shapes were checked by the caller (route.py)
    if x.dim() == 3:
        ptr = None
    elif ptr is None:
        raise ValueError("a ragged x needs ptr")
    elif ptr.dtype != torch.int64 or ptr.device != x.device:
        ptr = ptr.to(device=x.device, dtype=torch.int64)
    K, return_plan = int(inner_iters), bool(return_plan)
    if structure_fwd_op is not None and not eager_function(x, ptr, log_p0, log_q0, a0, a1, a2,
                                                           a3, rho, tau):
        y, plan, _ = structure_fwd_op(x, ptr, log_p0, log_q0, a0, a1, a2, a3, rho, tau,
                                      method, variant, K, return_plan)
        return y, (plan if return_plan else None)
    meta = dict(method=method, variant=variant, K=K, return_plan=return_plan)
    y, plan = StructureROTFunction.apply(x, ptr, log_p0, log_q0, a0, a1, a2, a3, rho, tau, meta)
    return y, (plan if return_plan else None)


def structure_pool(x: Tensor, ptr: Optional[Tensor], w: Tensor, log_p0: Optional[Tensor],
                   log_q0: Optional[Tensor], *, method: str, variant: str, inner_iters: int,
                   return_plan: bool):
    """The family's entry point (docs/kernels.md): the (6, T) weight table ``w`` instead of six
    vectors; otherwise as :func:`rot_pool_structure_triton`."""
    a0, a1, a2, a3, rho, tau = w.unbind(0)
    return rot_pool_structure_triton(x, ptr, method=method, variant=variant, a0=a0, a1=a1,
                                     a2=a2, a3=a3, rho=rho, tau=tau, inner_iters=inner_iters,
                                     log_p0=log_p0, log_q0=log_q0, return_plan=return_plan)
