"""The torch path of ``rot_pool`` for α0 = 0 without padding: dense batches as they are,
ragged batches on segments (:mod:`.layouts`), solvers from :mod:`.unrolled`.

Memory is O(N_total × D) for a ragged batch whatever its skew (the padded view costs
B × N_max × D), and does not grow with T (:class:`.unrolled.UnrolledRot`). On the CPU, outside
torch.compile, the exact variant without plan output runs chunk by chunk of sets
(:mod:`.chunked`): memory about 2× x (x and its gradient) instead of ~8-19× x, and faster.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ...._transforms import plain_ops
from .chunked import chunked_rot_pool
from .chunks import chunk_bytes_for, dense_chunks, segment_chunks
from .layouts import Padded, Segments
from .unrolled import make_solver, unrolled_log_plan

CHUNKED = True   # the chunked CPU path (tests compare it with the unchunked one)


def _chunkable(x: Tensor, variant: str, return_plan: bool) -> bool:
    """Chunks pay off on the CPU (cache) and read set sizes and weights on the host: not under
    torch.compile, nor under a Python dispatch mode (fake tensors have no values; op recorders
    such as bench/kernel_report.py's eager model want the device-independent op stream)."""
    return (CHUNKED and x.device.type == "cpu" and variant == "exact" and not return_plan
            and not plain_ops() and _get_current_dispatch_mode() is None)


def _in_domain(w: dict) -> bool:
    """The chunked path does its weight formulas in Python floats, where 1/0 raises: weights
    the value checks would reject (they may be off) take the tensor path, which gives what
    IEEE arithmetic gives, as the caller asked."""
    pos = [w["a1"], w["rho"], w["a2"], w["a3"]]
    return all(bool((t > 0).all()) for t in pos) and all(
        bool(torch.isfinite(w[k]).all()) for k in ("a1", "rho"))


def rot_pool_unrolled(x: Tensor, batch, *, method: str, variant: str, weights: dict,
                      log_p0: Tensor, log_q0: Tensor, num_iters: int, cdt, return_plan: bool):
    """(y (B, D) in x's dtype, plan in x's layout or None) for α0 = 0.

    ``batch`` is the caller's SetBatch; ``log_p0`` (B, D) and ``log_q0`` (B, N_max) as
    ``check_priors`` returns them (normalised per set, padding 0).
    """
    xc = x.to(cdt).contiguous()   # the solvers run many elementwise passes over it
    w = {k: weights[k] for k in ("a1", "a2", "a3", "rho")}
    if batch.dense:
        L = Padded(None)
        lp0, lq0 = log_p0.unsqueeze(1), log_q0.unsqueeze(2)
    else:
        L = Segments(batch.index, batch.num_sets, batch.lengths)
        if log_q0.dim() == 2 and log_q0.stride(1) == 0:   # uniform: one value per set
            lq0 = log_q0[:, 0].index_select(0, batch.index).unsqueeze(1)
        else:
            lq0 = batch.unpad_rows(log_q0).unsqueeze(1)
        lp0 = log_p0
    if _chunkable(xc, variant, return_plan) and _in_domain(w):
        solver = make_solver(method, variant)
        size = chunk_bytes_for(solver)
        chunks = (dense_chunks(xc, size) if batch.dense
                  else segment_chunks(xc, batch.index, batch.lengths, size))
        y = chunked_rot_pool(solver, chunks, batch.num_sets, num_iters, xc, lp0, lq0, **w)
        return y.to(x.dtype), None
    log_p = unrolled_log_plan(L, xc, lp0, lq0, method=method, variant=variant, T=num_iters, **w)
    y = L.pool(log_p, xc).to(x.dtype)          # a ragged empty set has no rows: y = 0
    plan = L.normalized_plan(log_p).to(x.dtype) if return_plan else None
    return y, plan
