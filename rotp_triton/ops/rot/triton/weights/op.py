"""Autograd of the weight-table kernels and the family's entry point :func:`softplus_table`:
the (6, T) table of a ``ROTWeights`` in one launch forward and one backward (instead of a
softplus, a multiply and an add per learnable weight, a stack, and as many ops back)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .launch import table_backward, table_forward


class SoftplusTableFunction(torch.autograd.Function):
    """table = base + scale · softplus(raw) on the learned rows (base elsewhere)."""

    @staticmethod
    def forward(ctx, base, scale, rows, shared, *raws):
        ctx.save_for_backward(scale, *raws)
        ctx.rows, ctx.shared = rows, shared
        return table_forward(base, scale, rows, raws, shared)

    @staticmethod
    @once_differentiable  # (the kernels' own backward is first order too)
    def backward(ctx, g):
        scale, *raws = ctx.saved_tensors
        graw = table_backward(g, scale, ctx.rows, raws, ctx.shared)       # [n_learned, T]
        # (rows as views by one unbind: a select each costs a dispatch, PERF.md front end)
        grads = (graw[:, :1] if ctx.shared else graw).unbind(0)
        return (None, None, None, None, *grads)


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
