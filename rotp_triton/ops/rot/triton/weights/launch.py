"""Host launchers of the weight-table kernels (``kernels.py``): one program, one launch each
way, one allocation each way; nothing read on the host."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ...params import NUM_WEIGHTS as NUM_ROWS  # the table's rows a0 … tau
from ..common import launcher, next_pow2
from .kernels import table_bwd_kernel, table_fwd_kernel


def _row_args(rows: Sequence[int], raws: Sequence[Tensor], dummy: Tensor):
    """(pointer per table row: its raw parameter or ``dummy``, learned flag per row, position
    of each learned row in the gradient buffer)."""
    ptrs, learn, pos = [dummy] * NUM_ROWS, [False] * NUM_ROWS, [0] * NUM_ROWS
    for k, (i, r) in enumerate(zip(rows, raws)):
        ptrs[i], learn[i], pos[i] = r, True, k
    return ptrs, learn, pos


def table_forward(base: Tensor, scale: Tensor, rows: Sequence[int], raws: Sequence[Tensor],
                  shared: bool, wrap=None) -> Tensor:
    """(6, T) fp32 table: base + scale · softplus(raw) on the learned ``rows``."""
    T = base.shape[1]
    out = torch.empty((NUM_ROWS, T), dtype=torch.float32, device=base.device)
    ptrs, learn, _ = _row_args(rows, raws, base)
    launcher(table_fwd_kernel, wrap)[(1,)](out, base, scale, *ptrs, T, *learn, SHARED=shared,
                                           BLOCK_T=next_pow2(T))
    return out


def table_backward(g: Tensor, scale: Tensor, rows: Sequence[int], raws: Sequence[Tensor],
                   shared: bool, wrap=None) -> Tensor:
    """(len(rows), T) fp32: row k the gradient of ``raws[k]`` (column 0 only if ``shared``)."""
    T = g.shape[1]
    out = torch.empty((len(rows), T), dtype=torch.float32, device=g.device)
    ptrs, learn, pos = _row_args(rows, raws, scale)
    launcher(table_bwd_kernel, wrap)[(1,)](out, g, g.stride(0), g.stride(1), scale, *ptrs, T,
                                           *pos, *learn, SHARED=shared, BLOCK_T=next_pow2(T))
    return out
