"""The Triton path of ``rot_pool`` for α0 = 0 (imported by ``dispatch.py``).

``rot_pool_triton`` routes Sinkhorn to the fused kernels of ``triton_sinkhorn`` and Bregman ADMM
to ``triton.badmm``. The Sinkhorn kernels are wrapped as two custom operators
(``rotp_triton::sinkhorn_fwd`` / ``sinkhorn_bwd``, built with ``torch.library.triton_op`` where
torch has it) with registered autograd and explicit fake kernels, so
``torch.compile(fullgraph=True)`` traces them without a graph break. They run the Triton kernels
on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (no separate CPU kernel: dispatch
sends CPU tensors to the torch path). Without ``triton_op`` a plain ``torch.autograd.Function``
is used.

The weights enter as ε = α1, κ2 = κ(α2, ε), κ3 = κ(α3, ε) (each (T,)), computed here with torch
ops, so autograd (or the compiled graph) carries their gradients on to α1, α2, α3.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import triton_sinkhorn as _k
from .solvers import kappa

_OP_NS = "rotp_triton"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------
# the autograd Function (used directly when torch has no triton_op)
# --------------------------------------------------------------------------------------------
class RotSinkhornFunction(torch.autograd.Function):
    """y, plan = f(x, ε, κ2, κ3, log p0, log q0): T fused Sinkhorn iterations + pooling.

    Saves x (no copy) and the per-iteration vectors (O(T·(N + D)) per set); the backward
    recomputes every softmax from them.
    """

    @staticmethod
    def forward(ctx, x, ptr, eps, k2, k3, log_p0, log_q0, paper, return_plan):
        y, plan, *state = _k.sinkhorn_forward(x, ptr, eps, k2, k3, log_p0, log_q0, paper,
                                              return_plan)
        ctx.save_for_backward(x, ptr, eps, k2, k3, log_p0, log_q0, y, *state)
        ctx.paper = paper
        ctx.return_plan = return_plan
        return y.to(x.dtype), plan

    @staticmethod
    def backward(ctx, gy, gplan):
        x, ptr, eps, k2, k3, log_p0, log_q0, y, *state = ctx.saved_tensors
        gp = gplan if (ctx.return_plan and gplan is not None) else None
        dx, dlp0, dlq0, dk2, dk3, deps = _k.sinkhorn_backward(
            x, ptr, eps, k2, k3, log_p0, log_q0, ctx.paper, y, *state, gy, gp)
        return dx, None, deps, dk2, dk3, dlp0, dlq0, None, None


# --------------------------------------------------------------------------------------------
# custom operators (torch.compile sees them as one node each)
# --------------------------------------------------------------------------------------------
_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
sinkhorn_fwd_op = None
sinkhorn_bwd_op = None


if _HAS_TRITON_OP:
    try:
        from torch.library import triton_op, wrap_triton

        @triton_op(f"{_OP_NS}::sinkhorn_fwd", mutates_args=())
        def sinkhorn_fwd_op(x: Tensor, ptr: Optional[Tensor], eps: Tensor, k2: Tensor,
                            k3: Tensor, log_p0: Optional[Tensor], log_q0: Optional[Tensor],
                            paper: bool, return_plan: bool
                            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                       Tensor]:
            """(y fp32, plan, A, Rn, Bv, Cn, rfin, tot); see triton_sinkhorn.sinkhorn_forward."""
            return _k.sinkhorn_forward(x, ptr, eps, k2, k3, log_p0, log_q0, paper, return_plan,
                                       wrap=wrap_triton)

        @triton_op(f"{_OP_NS}::sinkhorn_bwd", mutates_args=())
        def sinkhorn_bwd_op(x: Tensor, ptr: Optional[Tensor], eps: Tensor, k2: Tensor,
                            k3: Tensor, log_p0: Optional[Tensor], log_q0: Optional[Tensor],
                            paper: bool, y: Tensor, A: Tensor, Rn: Tensor, Bv: Tensor,
                            Cn: Tensor, rfin: Tensor, tot: Tensor, grad_y: Tensor,
                            grad_plan: Optional[Tensor]
                            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
            """(dx, dlog_p0, dlog_q0, dk2, dk3, deps); absent priors give empty gradients."""
            dx, dlp0, dlq0, dk2, dk3, deps = _k.sinkhorn_backward(
                x, ptr, eps, k2, k3, log_p0, log_q0, paper, y, A, Rn, Bv, Cn, rfin, tot,
                grad_y, grad_plan, wrap=wrap_triton)
            # absent priors: distinct empty tensors (custom-op outputs may not alias)
            return (dx, dlp0 if dlp0 is not None else x.new_empty(0, dtype=torch.float32),
                    dlq0 if dlq0 is not None else x.new_empty(0, dtype=torch.float32),
                    dk2, dk3, deps)

        def _setup_context(ctx, inputs, output):
            x, ptr, eps, k2, k3, log_p0, log_q0, paper, return_plan = inputs
            y, plan, *state = output
            ctx.save_for_backward(x, ptr, eps, k2, k3, log_p0, log_q0, y, *state)
            ctx.paper = paper
            ctx.return_plan = return_plan

        def _backward(ctx, gy, gplan, *_state_grads):
            x, ptr, eps, k2, k3, log_p0, log_q0, y, *state = ctx.saved_tensors
            gp = gplan.contiguous() if (ctx.return_plan and gplan is not None) else None
            dx, dlp0, dlq0, dk2, dk3, deps = sinkhorn_bwd_op(
                x, ptr, eps, k2, k3, log_p0, log_q0, ctx.paper, y, *state, gy.contiguous(), gp)
            return (dx, None, deps, dk2, dk3, dlp0 if log_p0 is not None else None,
                    dlq0 if log_q0 is not None else None, None, None)

        sinkhorn_fwd_op.register_autograd(_backward, setup_context=_setup_context)

        # Explicit fake (meta) kernels: under TRITON_INTERPRET=1 wrap_triton hands back the raw
        # interpreted kernel, which cannot run on fake tensors, so tracing needs these.
        @sinkhorn_fwd_op.register_fake
        def _sinkhorn_fwd_fake(x, ptr, eps, k2, k3, log_p0, log_q0, paper, return_plan):
            B, _, D, NR, _ = _k._layout(x, ptr)
            T = eps.shape[0]
            f = dict(device=x.device, dtype=torch.float32)
            plan = torch.empty_like(x) if return_plan else x.new_empty(0)
            return (x.new_empty(B, D, dtype=torch.float32), plan,
                    x.new_empty(B, T + 1, D, **f), x.new_empty(B, T, D, **f),
                    x.new_empty(T + 1, NR, **f), x.new_empty(T, NR, **f),
                    x.new_empty(B, D, **f), x.new_empty(B, **f))

        @sinkhorn_bwd_op.register_fake
        def _sinkhorn_bwd_fake(x, ptr, eps, k2, k3, log_p0, log_q0, paper, y, A, Rn, Bv, Cn,
                               rfin, tot, grad_y, grad_plan):
            B, _, D, NR, _ = _k._layout(x, ptr)
            T = eps.shape[0]
            f = dict(device=x.device, dtype=torch.float32)
            return (torch.empty_like(x),
                    x.new_empty(B, D, **f) if log_p0 is not None else x.new_empty(0, **f),
                    x.new_empty(log_q0.shape, **f) if log_q0 is not None else x.new_empty(0, **f),
                    x.new_empty(T, **f), x.new_empty(T, **f), x.new_empty(T, **f))
    except Exception:  # pragma: no cover - a torch whose triton_op rejects this op
        _HAS_TRITON_OP = False
        sinkhorn_fwd_op = sinkhorn_bwd_op = None


def rot_sinkhorn_triton(x: Tensor, ptr: Optional[Tensor], *, variant: str, a1: Tensor,
                        a2: Tensor, a3: Tensor, log_p0: Optional[Tensor],
                        log_q0: Optional[Tensor], return_plan: bool):
    """Sinkhorn (α0 = 0) on the fused kernels; arguments as :func:`rot_pool_triton`."""
    eps = a1.float()
    k2 = kappa(a2.float(), eps)
    k3 = kappa(a3.float(), eps)
    paper = variant == "paper"
    if _HAS_TRITON_OP and sinkhorn_fwd_op is not None:
        y32, plan, *_ = sinkhorn_fwd_op(x, ptr, eps, k2, k3, log_p0, log_q0, paper, return_plan)
        y = y32.to(x.dtype)
    else:
        y, plan = RotSinkhornFunction.apply(x, ptr, eps, k2, k3, log_p0, log_q0, paper,
                                            return_plan)
    return y, (plan if return_plan else None)


def rot_pool_triton(x: Tensor, ptr: Optional[Tensor], *, method: str, variant: str, a1: Tensor,
                    a2: Tensor, a3: Tensor, rho: Tensor, log_p0: Optional[Tensor],
                    log_q0: Optional[Tensor], return_plan: bool):
    """ROT pooling with α0 = 0 on Triton kernels.

    Args:
        x: (B, N, D) dense batch (any strides, read in place) or (N_total, D) ragged batch whose
            rows are grouped by set.
        ptr: (B + 1,) int64 CSR offsets for a ragged x, None for a dense one.
        method: "sinkhorn" | "badmm-e" | "badmm-q". variant: "exact" | "paper".
        a1, a2, a3, rho: (T,) weights (a2, a3 may be +inf); may require grad.
        log_p0: (B, D) normalized log prior over features, or None (uniform).
        log_q0: like x[..., 0] ((B, N) or (N_total,)), normalized per set, or None (uniform).
        return_plan: also return each set's plan (mass 1) in x's layout.

    Returns:
        (y (B, D) in x's dtype, plan or None).
    """
    if method == "sinkhorn":
        return rot_sinkhorn_triton(x, ptr, variant=variant, a1=a1, a2=a2, a3=a3, log_p0=log_p0,
                                   log_q0=log_q0, return_plan=return_plan)
    from .triton.badmm import badmm_pool
    z = torch.zeros_like(a1, dtype=torch.float32)
    w = torch.stack([z, a1.float(), a2.float(), a3.float(), rho.float(), z])   # (6, T) table
    return badmm_pool(x, ptr, w, log_p0, log_q0, quadratic=method == "badmm-q", variant=variant,
                      return_plan=return_plan)
