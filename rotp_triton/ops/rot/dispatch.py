"""Choosing between the Triton kernels and the torch path for ``rot_pool``.

The kernels read the caller's tensor directly: a dense ``(B, N, D)`` batch with any strides, or
a ragged ``(N_total, D)`` batch whose rows are grouped by set (``ptr``). A ragged batch with an
unsorted ``index`` is gathered into set order first, and its plan scattered back.
"""
from __future__ import annotations

import os
import torch
from torch import Tensor

from ..._batching import SetBatch


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401  (only whether it imports)
    except Exception:  # pragma: no cover - triton missing
        return False
    return True


def try_triton(x: Tensor, batch: SetBatch, *, method: str, variant: str, structure: bool,
               weights: dict, log_p0: Tensor, log_q0: Tensor, num_iters: int, inner_iters: int,
               uniform_p0: bool, uniform_q0: bool, return_plan: bool, required: bool):
    """Run the Triton path and return ``(y, plan_or_None)``, or ``None`` to use the torch path.

    ``required`` (backend="triton") turns every "no kernel applies" into a ValueError.
    """
    def unavailable(why: str):
        if required:
            raise ValueError(f"backend='triton' is not available here: {why}")
        return None

    if not triton_available():
        return unavailable("triton is not installed")
    on_device = x.is_cuda or (required and interpreter_enabled())
    if not on_device:
        return unavailable("x must be a CUDA tensor (or set TRITON_INTERPRET=1 for CPU tensors)")
    if x.dtype == torch.float64:
        return unavailable("the kernels take float32/float16/bfloat16 inputs; use backend='torch' "
                           "for float64")
    try:
        if structure:
            from .triton.structure import op as kernels
        else:
            from . import triton_set as kernels
    except ImportError as e:  # pragma: no cover - kernel module not built yet
        return unavailable(f"no kernel module ({e})")

    # the kernels want rows grouped by set
    order = None
    xk, ptr = x, batch.ptr
    log_q0_rows = None if uniform_q0 else batch.unpad_rows(log_q0) if not batch.dense else log_q0
    if not batch.dense and ptr is None:
        order = torch.argsort(batch.index, stable=True)
        xk = x[order]
        ptr = torch.zeros(batch.num_sets + 1, dtype=torch.int64, device=x.device)
        ptr[1:] = torch.cumsum(batch.lengths, 0)
        if log_q0_rows is not None:
            log_q0_rows = log_q0_rows[order]
    w = weights
    common = dict(method=method, variant=variant, a1=w["a1"], a2=w["a2"], a3=w["a3"],
                  rho=w["rho"], log_p0=None if uniform_p0 else log_p0, log_q0=log_q0_rows,
                  return_plan=return_plan)
    if structure:
        y, plan = kernels.rot_pool_structure_triton(xk, None if batch.dense else ptr, a0=w["a0"],
                                                    tau=w["tau"], inner_iters=inner_iters,
                                                    **common)
    else:
        y, plan = kernels.rot_pool_triton(xk, None if batch.dense else ptr, **common)
    if plan is not None and order is not None:
        plan = plan[torch.argsort(order)]
    return y, plan
