"""Autograd and custom-op wrappers of the Sinkhorn set kernels, and the family's entry point
:func:`sinkhorn_pool` (the kernel interface of docs/kernels.md, DESIGN §3.1-3.2, α0 = 0).

``rotp_triton::sinkhorn_fwd`` / ``sinkhorn_bwd`` are ``torch.library.triton_op`` s with
registered autograd and explicit fake kernels, so ``torch.compile(fullgraph=True)`` traces them
as one node each; without ``triton_op`` a plain ``torch.autograd.Function`` is used. The forward
saves x (no copy) and O(T·(N + D)) vectors per set (one flat state tensor); the backward
recomputes every softmax. Each op allocates its outputs once per kind (flat state, flat
parameter gradients: every host op costs ~5 µs on the GPU, PERF.md).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ...higher_order import recorded_backward
from ..common import HAS_TRITON_OP, direct_launch, eager_function
from ..recompute import set_grads
from ..spread.launch import spread_backward
from .launch import (layout, param_grad_views, param_grads_numel, sinkhorn_backward,
                     sinkhorn_forward, state_numel)

_OP_NS = "rotp_triton"


class SinkhornFunction(torch.autograd.Function):
    """(y fp32, plan) = f(x, ptr, w, log p0, log q0): T fused Sinkhorn iterations + pooling."""

    @staticmethod
    def forward(ctx, x, ptr, w, log_p0, log_q0, paper, return_plan):
        y, plan, state = sinkhorn_forward(x, ptr, w, log_p0, log_q0, paper, return_plan)
        ctx.save_for_backward(x, ptr, w, log_p0, log_q0, y, state)
        ctx.paper = paper
        ctx.return_plan = return_plan
        ctx.set_materialize_grads(False)    # an unused plan gets no zero gradient
        return y, plan

    @staticmethod
    def backward(ctx, gy, gplan):
        if recorded_backward():  # the kernels' backward is first order: the torch path's
            return (*_recorded_grads(ctx, gy, gplan), None, None)
        x, ptr, w, log_p0, log_q0, y, state = ctx.saved_tensors
        gp = gplan.contiguous() if (ctx.return_plan and gplan is not None) else None
        gy = torch.zeros_like(y) if gy is None else gy
        dx, dparams = sinkhorn_backward(x, ptr, w, log_p0, log_q0, ctx.paper, y, state,
                                        gy.contiguous(), gp)
        dw, dlp0, dlq0 = _param_grads(dparams, x, ptr, w, log_p0, log_q0)
        return dx, None, dw, dlp0, dlq0, None, None


def _recorded_grads(ctx, gy, gplan) -> list:
    """Gradients of (x, ptr, w, log p0, log q0) that autograd records (create_graph): the
    torch path recomputed (``..recompute``)."""
    return set_grads(ctx, ctx.saved_tensors[:5], (gy, gplan), method="sinkhorn",
                     variant="paper" if ctx.paper else "exact", return_plan=ctx.return_plan)


def _param_grads(dparams, x, ptr, w, log_p0, log_q0):
    """(dw, dlog_p0 or None, dlog_q0 shaped like log_q0 or None): views of the flat dparams."""
    B, _, D, NR, _ = layout(x, ptr)
    dw, dlp0, dlq0 = param_grad_views(dparams, B, w.shape[1], D, NR, log_p0 is not None,
                                      log_q0 is not None)
    return dw, dlp0, (dlq0.view(log_q0.shape) if log_q0 is not None else None)


class SpreadSinkhornFunction(torch.autograd.Function):
    """y = σ · (Sinkhorn pooling of x / σ) with σ (B,) each set's feature spread
    (``ops/rot/spread.py``, the layers' ``scale="auto"``), 1/σ folded into the kernels'
    x-scales: forward the kernel reading x (no x / σ pass, no output multiply), σ formed by
    the kernel itself in one more read of x (by the statistics launches where split launches
    run the iterations); backward the kernel, which on the exact one-tile path writes the
    whole x̄ (ds·∂σ/∂x included), elsewhere ∂/∂x at fixed σ and ds, then one spread pass
    (x̄ += ds·∂σ/∂x, written over the kernel's x̄). No priors, no plan. Saves x, the table,
    the kernel's O(T·(N + D)) state and (B, 2 + D) statistics."""

    @staticmethod
    def forward(ctx, x, ptr, w, paper, sample_dims):
        y, _plan, state, saved = sinkhorn_forward(x, ptr, w, None, None, paper, False,
                                                  spread=True)
        B = y.shape[0]
        ctx.save_for_backward(x, ptr, w, y, state, saved)
        ctx.args = (paper, sample_dims, B)
        return y

    @staticmethod
    def backward(ctx, gy):
        paper, sample_dims, B = ctx.args
        if recorded_backward():  # the kernels' backward is first order: the torch path's
            x, ptr, w = ctx.saved_tensors[:3]
            gx, _, dw = set_grads(ctx, (x, ptr, w, None, None), (gy,), method="sinkhorn",
                                  variant="paper" if paper else "exact", spread=True)[:3]
            return gx, None, dw, None, None
        x, ptr, w, y, state, saved = ctx.saved_tensors
        dx, dparams, ds = sinkhorn_backward(x, ptr, w, None, None, paper, y, state,
                                            gy.contiguous(), None, scale=saved[:B],
                                            spread=saved)
        dw, _dlp0, _dlq0 = _param_grads(dparams, x, ptr, w, None, None)
        if not ctx.needs_input_grad[0]:
            gx = None
        elif ds is None:                   # the kernel added the path through σ itself
            gx = dx
        else:
            gx = spread_backward(x, sample_dims, saved, dx, ds, ptr, g_s_total=True, out=dx,
                                 g_over_s=False)
        return gx, None, dw, None, None


sinkhorn_fwd_op = None
sinkhorn_bwd_op = None

if HAS_TRITON_OP:
    try:
        from torch.library import triton_op, wrap_triton

        @triton_op(f"{_OP_NS}::sinkhorn_fwd", mutates_args=())
        def sinkhorn_fwd_op(x: Tensor, ptr: Optional[Tensor], w: Tensor,
                            log_p0: Optional[Tensor], log_q0: Optional[Tensor], paper: bool,
                            return_plan: bool) -> Tuple[Tensor, Tensor, Tensor]:
            """(y fp32, plan, flat state); see launch.sinkhorn_forward."""
            return sinkhorn_forward(x, ptr, w, log_p0, log_q0, paper, return_plan,
                                    wrap=wrap_triton)

        @triton_op(f"{_OP_NS}::sinkhorn_bwd", mutates_args=())
        def sinkhorn_bwd_op(x: Tensor, ptr: Optional[Tensor], w: Tensor,
                            log_p0: Optional[Tensor], log_q0: Optional[Tensor], paper: bool,
                            y: Tensor, state: Tensor, grad_y: Tensor,
                            grad_plan: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
            """(dx, flat dparams: dw (6, T), then dlog_p0, dlog_q0 where given)."""
            return sinkhorn_backward(x, ptr, w, log_p0, log_q0, paper, y, state, grad_y,
                                     grad_plan, wrap=wrap_triton)

        def _setup_context(ctx, inputs, output):
            x, ptr, w, log_p0, log_q0, paper, return_plan = inputs
            y, plan, state = output
            ctx.save_for_backward(x, ptr, w, log_p0, log_q0, y, state)
            ctx.paper = paper
            ctx.return_plan = return_plan
            # the state output gets no gradient: no zero tensor materialised for it
            ctx.set_materialize_grads(False)

        def _backward(ctx, gy, gplan, _state_grad):
            if recorded_backward():  # the kernels' backward is first order: the torch path's
                return (*_recorded_grads(ctx, gy, gplan), None, None)
            x, ptr, w, log_p0, log_q0, y, state = ctx.saved_tensors
            gp = gplan.contiguous() if (ctx.return_plan and gplan is not None) else None
            gy = torch.zeros_like(y) if gy is None else gy  # (not materialised: y unused)
            dx, dparams = sinkhorn_bwd_op(x, ptr, w, log_p0, log_q0, ctx.paper, y, state,
                                          gy.contiguous(), gp)
            dw, dlp0, dlq0 = _param_grads(dparams, x, ptr, w, log_p0, log_q0)
            return dx, None, dw, dlp0, dlq0, None, None

        sinkhorn_fwd_op.register_autograd(_backward, setup_context=_setup_context)

        # Explicit fake (meta) kernels: under TRITON_INTERPRET=1 wrap_triton hands back the raw
        # interpreted kernel, which cannot run on fake tensors, so tracing needs these.
        @sinkhorn_fwd_op.register_fake
        def _sinkhorn_fwd_fake(x, ptr, w, log_p0, log_q0, paper, return_plan):
            B, _, D, NR, _ = layout(x, ptr)
            f = dict(device=x.device, dtype=torch.float32)
            plan = torch.empty_like(x) if return_plan else x.new_empty(0)
            return (x.new_empty(B, D, **f), plan,
                    x.new_empty(state_numel(B, w.shape[1], D, NR), **f))

        @sinkhorn_bwd_op.register_fake
        def _sinkhorn_bwd_fake(x, ptr, w, log_p0, log_q0, paper, y, state, grad_y, grad_plan):
            B, _, D, NR, _ = layout(x, ptr)
            n = param_grads_numel(B, w.shape[1], D, NR, log_p0 is not None, log_q0 is not None)
            return torch.empty_like(x), x.new_empty(n, device=x.device, dtype=torch.float32)
    except Exception:  # pragma: no cover - a torch whose triton_op rejects this op
        sinkhorn_fwd_op = sinkhorn_bwd_op = None


def sinkhorn_pool(x: Tensor, ptr: Optional[Tensor], w: Tensor, log_p0: Optional[Tensor],
                  log_q0: Optional[Tensor], *, variant: str, return_plan: bool,
                  spread: bool = False):
    """Sinkhorn ROT pooling (α0 = 0) of every set on the fused kernels.

    Args:
        x: (B, N, D) dense (any strides) or (N_total, D) ragged with ``ptr`` (B + 1,) int64.
        w: (6, T) float32 weight table (rows of ``params.py``), may require grad; the kernels
            read ε = α1, κ2 = κ(α2, ε), κ3 = κ(α3, ε) from it on chip.
        log_p0: (B, D) normalised log prior or None; log_q0: like x[..., 0] or None.
        variant: "exact" | "paper". return_plan: also return each set's plan (mass 1).
        spread: pool x / σ and return σ · y, σ each set's feature spread (the layers'
            ``scale="auto"``), folded into the kernels (eager, no priors, no plan; the caller
            checks): ``SpreadSinkhornFunction``.

    Returns:
        (y (B, D) in x.dtype, plan in x's layout and dtype, or None).
    """
    paper = variant == "paper"
    if direct_launch(x, ptr, w, log_p0, log_q0):   # nothing to record: the launcher itself
        if spread:
            return sinkhorn_forward(x, ptr, w, None, None, paper, False, spread=True)[0].to(
                x.dtype), None
        y, plan, _ = sinkhorn_forward(x, ptr, w, log_p0, log_q0, paper, return_plan)
        return y.to(x.dtype), (plan if return_plan else None)
    if spread:
        y = SpreadSinkhornFunction.apply(x, ptr, w, paper, (1,) if ptr is None else (0,))
        return y.to(x.dtype), None
    if sinkhorn_fwd_op is not None and not eager_function(x, ptr, w, log_p0, log_q0):
        y, plan, _ = sinkhorn_fwd_op(x, ptr, w, log_p0, log_q0, paper, return_plan)
    else:
        y, plan = SinkhornFunction.apply(x, ptr, w, log_p0, log_q0, paper, return_plan)
    return y.to(x.dtype), (plan if return_plan else None)
