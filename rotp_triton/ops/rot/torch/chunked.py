"""The exact α0 = 0 solvers and the pooling on the CPU, one chunk of sets at a time.

:class:`ChunkedRotPool` returns the pooled output y (B, D) directly: forward and backward run
the solver of :mod:`.unrolled` (and its hand-written adjoints) chunk by chunk (:mod:`.chunks`),
so every x-sized temporary of the unchunked path - the solver's scratch, log P, the pooling's
softmax - is chunk-sized, and the elementwise passes run from cache instead of DRAM. Forward
and backward peak: the gradient of x plus a few chunks plus the saved per-iteration vectors
(bench/results/cpu_2026-11-28_chunked.md).

Pooling (eq. 5) and its adjoint, per set: w = softmax over rows of log P, y = Σ_n w x;
dx += w dy, d log P = w dy (x - y). The backward rebuilds log P of a chunk inside the last
iteration's adjoint (replayed from the saved vectors) and calls :func:`_pool_vjp` on it. A
recorded backward (``create_graph=True``) runs the plain loop instead (``..higher_order``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..higher_order import recomputed_vjp, recorded_backward
from . import adjoint
from .arena import Arena
from .unrolled import exact_backward, plain_log_plan, run_iterations


class _ChunkRecord:
    """What the backward of one chunk needs (the attributes ``exact_backward`` reads)."""

    def __init__(self, solver, L, T, needs_input_grad, wf):
        self.solver, self.L, self.T, self.wf = solver, L, T, wf
        self.needs_input_grad = needs_input_grad
        self.keep, self.vec_keep = [], []
        self.final = None
        self.saved_tensors = ()
        self.lse = self.y = None                  # the pooling's LSE over rows and y (per set)


def _pool(L, log_p: Tensor, x: Tensor, arena: Arena):
    """(y, LSE over rows of log P), both as the layout's per-set vectors; no autograd."""
    tmp, buf = arena.take(), arena.take()
    lse, m = L.lse_rows(log_p, tmp, with_shift=True)                     # tmp = exp(log P - m)
    w = tmp.mul_(L.rows_out(torch.exp(m - lse), buf))                    # softmax over rows
    y = L.sum_rows(w.mul_(x))
    arena.give(tmp, buf)
    return y, lse


def _pool_vjp(L, x: Tensor, lse: Tensor, y: Tensor, g_y: Tensor, gx: Tensor):
    """The function ``(log P, arena) -> d log P`` (an owned buffer) that adds dx to ``gx``."""
    def grad_log_p(log_p: Tensor, arena: Arena) -> Tensor:
        w, buf = arena.take(), arena.take()
        torch.sub(log_p, L.rows_out(lse, buf), out=w).exp_()             # softmax over rows
        w.mul_(L.rows_out(g_y, buf))                                     # w dy
        gx.add_(w)
        w.mul_(torch.sub(x, L.rows_out(y, buf), out=buf))                # w dy (x - y)
        arena.give(buf)
        return w
    return grad_log_p


def _solve_chunks(solver, chunks, B, T, x, lp0, lq0, w, records=None):
    """y (B, D) (0 for sets in no chunk: empty); ``w``: the weights as lists of floats; with
    ``records`` (a list), appends each chunk's record."""
    y = x.new_zeros(B, x.shape[-1])
    arena = None
    for ch in chunks:
        xc = ch.gather_rows(x)
        lp0c, lq0c = lp0[ch.sets], ch.gather_rows(lq0)
        if arena is None or arena.like.shape != xc.shape:
            arena = Arena(xc)
        rec = None
        if records is not None:
            rec = _ChunkRecord(solver, ch.L, T, None, w)
            records.append(rec)
        state = run_iterations(solver, ch.L, xc, lp0c, lq0c, w, T,
                               None if rec is None else rec.keep,
                               None if rec is None else rec.vec_keep, arena=arena)
        log_p = solver.output(ch.L, xc, w, state, arena)
        yc, lse = _pool(ch.L, log_p, xc, arena)
        y[ch.sets] = yc.reshape(-1, x.shape[-1])
        if rec is not None:
            rec.final = state if not solver.replay else None
            rec.lse, rec.y = lse, yc
        arena.give(log_p, *[s for s in state if s.shape == xc.shape])
        del state, log_p
    return y


class ChunkedRotPool(torch.autograd.Function):
    """y (B, D) of the exact α0 = 0 solver ``solver`` with pooling, chunk by chunk."""

    @staticmethod
    def forward(ctx, solver, chunks, B, T, x, lp0, lq0, a1, a2, a3, rho):
        w = _floats((a1, a2, a3, rho))
        records = []
        with torch.no_grad():
            y = _solve_chunks(solver, chunks, B, T, x, lp0, lq0, w, records)
        ctx.solver, ctx.chunks, ctx.T, ctx.records = solver, chunks, T, records
        ctx.save_for_backward(x, lp0, lq0, a1, a2, a3, rho)
        return y

    @staticmethod
    def backward(ctx, g_y):
        if recorded_backward():  # create_graph: the plain iterations, differentiable again
            return (None, None, None, None, *recomputed_vjp(
                lambda *s: _plain_pool(ctx.solver, ctx.chunks, g_y.shape[0], ctx.T, *s),
                ctx.saved_tensors, ctx.needs_input_grad[4:], (g_y,)))
        x, lp0, lq0, *w = ctx.saved_tensors
        need = ctx.needs_input_grad[4:]
        gx = torch.zeros_like(x) if need[0] else None
        g_lp0 = torch.zeros_like(lp0) if need[1] else None
        g_lq0 = torch.zeros_like(lq0) if need[2] else None
        g_w = [torch.zeros_like(wi) if n else None for wi, n in zip(w, need[3:])]
        arena = None
        pending: dict = {}                        # weight gradients, applied once at the end
        for ch, rec in zip(ctx.chunks, ctx.records):
            xc = ch.gather_rows(x)
            if arena is None or arena.like.shape != xc.shape:
                arena = Arena(xc)
            rec.saved_tensors = (xc, lp0[ch.sets], ch.gather_rows(lq0), *w)
            rec.needs_input_grad = (None,) * 3 + tuple(need)
            gxc = (gx[ch.rows] if gx is not None and isinstance(ch.rows, slice)
                   else torch.zeros_like(xc))
            g_set = ch.L.set_vector(g_y[ch.sets])
            grads = exact_backward(rec, _pool_vjp(ch.L, xc, rec.lse, rec.y, g_set, gxc),
                                     gx=gxc, arena=arena, pending=pending)
            if gx is not None:
                ch.scatter_rows(gx, gxc)
            if g_lp0 is not None:
                g_lp0[ch.sets] = grads[1]
            if g_lq0 is not None:
                ch.scatter_rows(g_lq0, grads[2])
            rec.saved_tensors = None       # the chunk's (gathered) x; keep the vectors: a
                                           # retained graph may run backward again
        adjoint.apply_weight_grads(pending, w, g_w)
        return (None, None, None, None, gx, g_lp0, g_lq0, *g_w)


def _plain_pool(solver, chunks, B: int, T: int, x: Tensor, lp0: Tensor, lq0: Tensor,
                *w: Tensor) -> Tensor:
    """y (B, D) chunk by chunk by the plain loop, with autograd recording (a recorded
    backward: ``..higher_order``)."""
    y = x.new_zeros(B, x.shape[-1])
    for ch in chunks:
        xc = ch.gather_rows(x)
        log_p = plain_log_plan(solver, ch.L, T, xc, lp0[ch.sets], ch.gather_rows(lq0), *w)
        y[ch.sets] = ch.L.pool(log_p, xc).reshape(-1, x.shape[-1])
    return y


def chunked_rot_pool(solver, chunks, B: int, T: int, x: Tensor, lp0: Tensor, lq0: Tensor,
                     a1: Tensor, a2: Tensor, a3: Tensor, rho: Tensor) -> Tensor:
    """y (B, D): through :class:`ChunkedRotPool` when autograd records, else forward only."""
    tensors = (x, lp0, lq0, a1, a2, a3, rho)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return ChunkedRotPool.apply(solver, chunks, B, T, *tensors)
    with torch.no_grad():
        return _solve_chunks(solver, chunks, B, T, x, lp0, lq0, _floats((a1, a2, a3, rho)))


def _floats(w) -> tuple:
    """The (T,) weights as lists of Python floats (the CPU: no device sync), so that the
    per-iteration weight formulas are host arithmetic, not 0-d tensor ops per chunk."""
    return tuple(wi.detach().tolist() for wi in w)
