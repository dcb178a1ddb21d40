"""Autograd of the weight-table kernels and the family's entry point :func:`softplus_table`:
the (6, T) table of a ``ROTWeights`` in one launch forward and one backward (instead of a
softplus, a multiply and an add per learnable weight, a stack, and as many ops back)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...higher_order import recomputed_vjp, recorded_backward
from .launch import table_backward, table_forward


class SoftplusTableFunction(torch.autograd.Function):
    """table = base + scale · softplus(raw) on the learned rows (base elsewhere)."""

    @staticmethod
    def forward(ctx, base, scale, rows, shared, *raws):
        ctx.save_for_backward(scale, *raws)
        ctx.rows, ctx.shared = rows, shared
        return table_forward(base, scale, rows, raws, shared)

    @staticmethod
    def backward(ctx, g):
        if recorded_backward():  # the kernel's backward is first order: the torch ops'
            # (base only adds a constant: its value does not change the derivatives)
            base = torch.zeros(g.shape, dtype=g.dtype, device=g.device)

            def forward(scale, *raws):
                return table_ops(base, scale, ctx.rows, raws, ctx.shared)
            grads = recomputed_vjp(forward, ctx.saved_tensors, (False,) + tuple(
                ctx.needs_input_grad[4:]), (g,))
            return (None, None, None, None, *grads[1:])
        scale, *raws = ctx.saved_tensors
        graw = table_backward(g, scale, ctx.rows, raws, ctx.shared)       # [n_learned, T]
        # (rows as views by one unbind: a select each costs a dispatch, PERF.md front end)
        grads = (graw[:, :1] if ctx.shared else graw).unbind(0)
        return (None, None, None, None, *grads)


def table_ops(base: Tensor, scale: Tensor, rows: Sequence[int], raws: Sequence[Tensor],
              shared: bool) -> Tensor:
    """What the kernel computes, as torch ops: base + scale · softplus(raw) on the learned
    ``rows`` (a recorded backward differentiates them)."""
    out = list(base.unbind(0))
    for r, raw in zip(rows, raws):
        out[r] = base[r] + scale[r] * F.softplus(raw).expand(base.shape[1])
    return torch.stack(out)


def softplus_table(base: Tensor, scale: Tensor, rows: Sequence[int], raws: Sequence[Tensor],
                   shared: bool) -> Tensor:
    """The (6, T) fp32 weight table in one launch (eager; under torch.compile the caller uses
    torch ops, which inductor fuses).

    Args:
        base: (6, T) fp32: the fixed weights' values, the learned ones' floors.
        scale: (6,) fp32: the learned weights' softplus scales (read on the learned rows only).
        rows: the table rows (0 … 5) of the learned weights, in the order of ``raws``.
        raws: their fp32 raw parameters, each (T,), or (1,) when ``shared``.
    """
    return SoftplusTableFunction.apply(base, scale, tuple(rows), bool(shared), *raws)
