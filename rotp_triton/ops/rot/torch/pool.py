"""``rot_pool`` on the torch path. α0 = 0: ``unpadded.py`` (dense as it is, ragged on segments,
memory independent of T). α0 > 0: a batch of sets padded to ``(B, N_max, D)`` with a mask,
solved by ``sets.py``; the plan is put back into the caller's layout (DESIGN §1, §3).

An empty set of a ragged batch is solved on one dummy zero sample (finite everywhere, so no NaN
reaches shared weights in the backward) and its output is zeroed; masked ops, not a host-side
test, so that ``torch.compile(fullgraph=True)`` traces it. Design: ../../../../../shared/DESIGN.md
§1, §3.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ...._batching import SetBatch, check_priors, compute_dtype
from ..params import weight_rows
from .sets import normalized_plan, pool_from_log_plan, rot_log_plan
from .unpadded import rot_pool_unrolled


def rot_pool_padded(x: Tensor, batch: SetBatch, table: Tensor, *, method: str, variant: str,
                    structure: bool, num_iters: int, inner_iters: int, p0, q0, log_p0, log_q0,
                    return_plan: bool):
    """(y (B, D) in x's dtype, plan in x's layout or None); ``table``: the (6, T) weights in
    the compute dtype; priors as given to ``rot_pool`` (validated, normalised here)."""
    D = x.shape[-1]
    cdt = compute_dtype(x.dtype)
    log_p0, log_q0 = check_priors(p0, q0, batch, D, cdt, log_p0, log_q0)
    B, N = batch.mask.shape
    if N == 0:  # every set is empty: zeros, still connected to x for autograd
        y = (x.sum() * 0).expand(B, D).clone()
        return y, (x * 0 if return_plan else None)
    if not structure:  # α0 = 0: no padding (segments), memory independent of T
        return rot_pool_unrolled(x, batch, method=method, variant=variant,
                                 weights=weight_rows(table), log_p0=log_p0, log_q0=log_q0,
                                 num_iters=num_iters, cdt=cdt, return_plan=return_plan)
    xp = x.to(cdt) if batch.dense else batch.pad_rows(x).to(cdt)
    mask = batch.mask
    empty = None
    if not batch.dense:
        empty = batch.lengths == 0
        first = torch.arange(N, device=x.device) == 0
        mask = mask | (empty[:, None] & first[None, :])
    log_p = rot_log_plan(xp, mask, log_p0, log_q0, method=method, variant=variant,
                         structure=structure, num_iters=num_iters, inner_iters=inner_iters,
                         **weight_rows(table))
    y = pool_from_log_plan(log_p, xp, mask)
    if empty is not None:
        y = y.masked_fill(empty[:, None], 0.0)
    plan = None
    if return_plan:
        plan = batch.unpad_rows(normalized_plan(log_p, mask)).to(x.dtype)
    return y.to(x.dtype), plan
