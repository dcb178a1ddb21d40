"""Autograd for the B-ADMM set kernels and the family's entry point :func:`badmm_pool`.

Where ``torch.library.triton_op`` exists the launchers are the custom operators
``rotp_triton::badmm_fwd`` / ``rotp_triton::badmm_bwd`` (one opaque node each for
torch.compile); otherwise :class:`BadmmFunction` calls them directly.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ...higher_order import recorded_backward
from ..common import HAS_TRITON_OP, direct_launch, eager_function
from ..recompute import set_grads
from ..spread.launch import spread_backward
from .launch import (badmm_backward, badmm_forward, grad_x_like, history_like,
                     param_grad_views, param_grads_numel)

__all__ = ["badmm_pool", "BadmmFunction", "SpreadBadmmFunction", "badmm_fwd_op",
           "badmm_bwd_op"]


def _cast(g: Tensor, like: Optional[Tensor]):
    """``g`` in ``like``'s dtype and shape (no host op when they match), None without ``like``."""
    if like is None:
        return None
    g = g if g.shape == like.shape else g.view(like.shape)
    return g if g.dtype == like.dtype else g.to(like.dtype)


def _input_grads(x, w, log_p0, log_q0, y32, gx, dparams):
    """The backward's result: (dx, None, dw, dlog_p0, dlog_q0, None, None, None), each in its
    input's dtype, from gx and the flat fp32 parameter gradients (views, no copies)."""
    B, D = y32.shape
    rows = x.numel() // D if D else 0
    dw, gp0, gq0 = param_grad_views(dparams, B, w.shape[1], D, rows)
    return (_cast(gx, x), None, _cast(dw, w), _cast(gp0, log_p0), _cast(gq0, log_q0),
            None, None, None)


def _recorded_grads(ctx, grad_y, grad_plan) -> tuple:
    """The backward's result where autograd records it (create_graph): the gradients of the
    torch path recomputed (``..recompute``)."""
    grads = set_grads(ctx, ctx.saved_tensors[:5], (grad_y, grad_plan),
                      method="badmm-q" if ctx.quadratic else "badmm-e",
                      variant="paper" if ctx.paper else "exact", return_plan=ctx.return_plan)
    return (*grads, None, None, None)


class BadmmFunction(torch.autograd.Function):
    """y (B, D) fp32-then-x.dtype [and the plan] of T B-ADMM iterations; differentiable in x,
    the weight table w (6, T), log p0 and log q0."""

    @staticmethod
    def forward(ctx, x, ptr, w, log_p0, log_q0, quadratic, paper, return_plan):
        y32, plan, h = badmm_forward(x, ptr, w, log_p0, log_q0, quadratic=quadratic,
                                          paper=paper, return_plan=return_plan)
        ctx.save_for_backward(x, ptr, w, log_p0, log_q0, h, y32)
        ctx.quadratic, ctx.paper, ctx.return_plan = quadratic, paper, return_plan
        if plan is None:
            plan = x.new_zeros(0)
            ctx.mark_non_differentiable(plan)
        ctx.mark_non_differentiable(h)
        ctx.set_materialize_grads(False)    # the history (and an unused plan): no zero gradient
        return y32.to(x.dtype), plan, h

    @staticmethod
    def backward(ctx, grad_y, grad_plan, grad_h):
        if recorded_backward():  # the kernels' backward is first order: the torch path's
            return _recorded_grads(ctx, grad_y, grad_plan)
        x, ptr, w, log_p0, log_q0, h, y32 = ctx.saved_tensors
        if grad_y is None:
            grad_y = torch.zeros_like(y32)
        gp = grad_plan.contiguous() if (ctx.return_plan and grad_plan is not None) else None
        gx, dparams = badmm_backward(x, ptr, w, log_p0, log_q0, h, y32, grad_y, gp,
                                     quadratic=ctx.quadratic, paper=ctx.paper)
        return _input_grads(x, w, log_p0, log_q0, y32, gx, dparams)


class SpreadBadmmFunction(torch.autograd.Function):
    """y = σ · (B-ADMM pooling of x / σ) with σ (B,) each set's feature spread
    (``ops/rot/spread.py``, the layers' ``scale="auto"``), 1/σ folded into the kernels'
    reads of x: forward the kernel reading x (no x / σ pass, no output multiply), σ formed
    by the one-program-per-set kernel itself in one more read of x (the split forward: by
    the statistics launches); backward the kernel (d loss / d(x / σ) and ds) and one spread
    pass (x̄ = ḡ / σ + ds·∂σ/∂x, no dot pass). No priors, no plan. Saves x, the table, the
    kernel's vector history and (B, 2 + D) statistics."""

    @staticmethod
    def forward(ctx, x, ptr, w, quadratic, paper, sample_dims):
        y, _plan, h, saved = badmm_forward(x, ptr, w, None, None, quadratic=quadratic,
                                           paper=paper, return_plan=False, spread=True)
        B = y.shape[0]
        ctx.save_for_backward(x, ptr, w, h, y, saved)
        ctx.args = (quadratic, paper, sample_dims, B)
        return y

    @staticmethod
    def backward(ctx, gy):
        quadratic, paper, sample_dims, B = ctx.args
        if recorded_backward():  # the kernels' backward is first order: the torch path's
            x, ptr, w = ctx.saved_tensors[:3]
            gx, _, dw = set_grads(ctx, (x, ptr, w, None, None), (gy,),
                                  method="badmm-q" if quadratic else "badmm-e",
                                  variant="paper" if paper else "exact", spread=True)[:3]
            return gx, None, dw, None, None, None
        x, ptr, w, h, y, saved = ctx.saved_tensors
        g_xs, dparams, ds = badmm_backward(x, ptr, w, None, None, h, y, gy, None,
                                           quadratic=quadratic, paper=paper, scale=saved[:B])
        D = x.shape[-1]
        dw = param_grad_views(dparams, B, w.shape[1], D, x.numel() // D if D else 0)[0]
        gx = None
        if ctx.needs_input_grad[0]:
            # x̄ overwrites d(x / σ) where the two match (x's dtype and strides)
            same = g_xs.dtype == x.dtype and g_xs.stride() == x.stride()
            gx = spread_backward(x, sample_dims, saved, g_xs, ds, ptr, g_s_total=True,
                                 out=g_xs if same else None)
        return gx, None, _cast(dw, w), None, None, None


badmm_fwd_op = None
badmm_bwd_op = None

if HAS_TRITON_OP:
    try:
        from torch.library import triton_op, wrap_triton

        @triton_op("rotp_triton::badmm_fwd", mutates_args=())
        def badmm_fwd_op(x: Tensor, ptr: Optional[Tensor], w: Tensor, log_p0: Optional[Tensor],
                         log_q0: Optional[Tensor], quadratic: bool, paper: bool,
                         return_plan: bool) -> Tuple[Tensor, Tensor, Tensor]:
            """(y (B, D) fp32, plan in x's layout or an empty tensor, flat vector history)."""
            y, plan, h = badmm_forward(x, ptr, w, log_p0, log_q0, quadratic=quadratic,
                                       paper=paper, return_plan=return_plan, wrap=wrap_triton)
            return y, (plan if plan is not None else x.new_empty(0)), h

        @triton_op("rotp_triton::badmm_bwd", mutates_args=())
        def badmm_bwd_op(x: Tensor, ptr: Optional[Tensor], w: Tensor, log_p0: Optional[Tensor],
                         log_q0: Optional[Tensor], h: Tensor, y32: Tensor,
                         grad_y: Tensor, grad_plan: Optional[Tensor], quadratic: bool,
                         paper: bool) -> Tuple[Tensor, Tensor]:
            """(dx fp32 like x, the flat fp32 parameter gradients: launch.param_grad_views)."""
            return badmm_backward(x, ptr, w, log_p0, log_q0, h, y32, grad_y, grad_plan,
                                  quadratic=quadratic, paper=paper, wrap=wrap_triton)

        def _setup_context(ctx, inputs, output):
            x, ptr, w, log_p0, log_q0, quadratic, paper, return_plan = inputs
            ctx.save_for_backward(x, ptr, w, log_p0, log_q0, output[2], output[0])
            ctx.quadratic, ctx.paper, ctx.return_plan = quadratic, paper, return_plan
            # plan (unless used) and the history get no gradient: no zeros materialised
            ctx.set_materialize_grads(False)

        def _backward(ctx, grad_y, grad_plan, grad_h):
            if recorded_backward():  # the kernels' backward is first order: the torch path's
                return _recorded_grads(ctx, grad_y, grad_plan)
            x, ptr, w, log_p0, log_q0, h, y32 = ctx.saved_tensors
            gp = grad_plan.contiguous() if (ctx.return_plan and grad_plan is not None) else None
            if grad_y is None:
                grad_y = torch.zeros_like(y32)
            gx, dparams = badmm_bwd_op(x, ptr, w, log_p0, log_q0, h, y32,
                                       grad_y.contiguous(), gp, ctx.quadratic, ctx.paper)
            return _input_grads(x, w, log_p0, log_q0, y32, gx, dparams)

        badmm_fwd_op.register_autograd(_backward, setup_context=_setup_context)

        # Explicit fake kernels: under TRITON_INTERPRET=1 wrap_triton hands back the raw
        # interpreted kernel, which cannot run on fake tensors, so tracing needs these.
        @badmm_fwd_op.register_fake
        def _badmm_fwd_fake(x, ptr, w, log_p0, log_q0, quadratic, paper, return_plan):
            B = x.shape[0] if ptr is None else ptr.shape[0] - 1
            plan = torch.empty_like(x, memory_format=torch.contiguous_format) if return_plan \
                else x.new_empty(0)
            h = history_like(x, ptr, w.shape[1], paper)
            return x.new_empty(B, x.shape[-1], dtype=torch.float32), plan, h

        @badmm_bwd_op.register_fake
        def _badmm_bwd_fake(x, ptr, w, log_p0, log_q0, h, y32, grad_y, grad_plan,
                            quadratic, paper):
            f = dict(dtype=torch.float32)
            B, D = y32.shape
            rows = x.numel() // D if D else 0
            return (grad_x_like(x, ptr),      # (x's layout where x is an NCHW view)
                    x.new_empty(param_grads_numel(B, w.shape[1], D, rows), **f))
    except Exception:  # pragma: no cover - a torch whose triton_op rejects these ops
        badmm_fwd_op = badmm_bwd_op = None


def badmm_pool(x: Tensor, ptr: Optional[Tensor], w: Tensor, log_p0: Optional[Tensor],
               log_q0: Optional[Tensor], *, quadratic: bool, variant: str, return_plan: bool,
               spread: bool = False):
    """ROT pooling by Bregman ADMM (α0 = 0) on the Triton kernels (interface: docs/kernels.md).

    Args:
        x: ``(B, N, D)`` dense batch with any strides, or ``(N_total, D)`` ragged batch whose
            rows are grouped by set, with ``ptr`` ``(B + 1,)`` int64. fp32 / fp16 / bf16.
        w: float32 ``(6, T)`` weight table (rows ``params.A0 … TAU``; a2, a3 may be +inf);
            may require grad (row A0 must be 0 and TAU is unused: their gradients are 0).
        log_p0: ``(B, D)`` normalised log prior over features, or ``None`` (uniform).
        log_q0: like ``x[..., 0]``, normalised per set, or ``None`` (uniform).
        quadratic: B-Q (True) or B-E (False). variant: ``"exact"`` or ``"paper"``.
        return_plan: also return each set's plan P (total mass 1) in x's layout and dtype.
        spread: pool x / σ and return σ · y, σ each set's feature spread (the layers'
            ``scale="auto"``), folded into the kernels (eager, no priors, no plan; the caller
            checks): :class:`SpreadBadmmFunction`.

    Returns:
        ``(y (B, D) in x's dtype (0 for empty sets), plan or None)``.
    """
    paper = variant == "paper"
    if direct_launch(x, ptr, w, log_p0, log_q0):   # nothing to record: the launcher itself
        if spread:
            return badmm_forward(x, ptr, w, None, None, quadratic=quadratic, paper=paper,
                                 return_plan=False, spread=True)[0].to(x.dtype), None
        y32, plan, _ = badmm_forward(x, ptr, w, log_p0, log_q0, quadratic=quadratic,
                                     paper=paper, return_plan=return_plan)
        return y32.to(x.dtype), (plan if return_plan else None)
    if spread:
        y = SpreadBadmmFunction.apply(x, ptr, w, quadratic, paper,
                                      (1,) if ptr is None else (0,))
        return y.to(x.dtype), None
    if badmm_fwd_op is not None and not eager_function(x, ptr, w, log_p0, log_q0):
        y32, plan, _ = badmm_fwd_op(x, ptr, w, log_p0, log_q0, quadratic, paper,
                                       return_plan)
        y = y32.to(x.dtype)
    else:
        y, plan, _ = BadmmFunction.apply(x, ptr, w, log_p0, log_q0, quadratic, paper,
                                            return_plan)
    return y, (plan if return_plan else None)
