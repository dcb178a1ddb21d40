"""The Triton path of ``rot_pool`` for α0 = 0 (imported by ``dispatch.py``).

``rot_pool_triton`` routes Sinkhorn to ``triton/sinkhorn`` (``sinkhorn_pool``: custom ops,
weight table, κ on chip) and Bregman ADMM to ``triton_badmm``. They run the Triton kernels on
CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .triton.sinkhorn import sinkhorn_pool


def rot_sinkhorn_triton(x: Tensor, ptr: Optional[Tensor], *, variant: str, a1: Tensor,
                        a2: Tensor, a3: Tensor, log_p0: Optional[Tensor],
                        log_q0: Optional[Tensor], return_plan: bool):
    """Sinkhorn (α0 = 0) on the fused kernels of ``triton/sinkhorn``; arguments as
    :func:`rot_pool_triton` (the (6, T) weight table is built here until route.py lands)."""
    zero = torch.zeros_like(a1, dtype=torch.float32)
    w = torch.stack([zero, a1.float(), a2.float(), a3.float(), zero, zero])
    return sinkhorn_pool(x, ptr, w, log_p0, log_q0, variant=variant, return_plan=return_plan)


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
    try:
        from .triton_badmm import rot_pool_badmm_triton
    except ImportError:  # no B-E/B-Q kernels yet: the torch path (priors already normalized)
        from ...functional import rot_pool
        return rot_pool(x, ptr=ptr, method=method, variant=variant, num_iters=a1.shape[0],
                        a1=a1, a2=a2, a3=a3, rho=rho, log_p0=log_p0, log_q0=log_q0,
                        backend="torch", return_plan=True) if return_plan else \
            (rot_pool(x, ptr=ptr, method=method, variant=variant, num_iters=a1.shape[0], a1=a1,
                      a2=a2, a3=a3, rho=rho, log_p0=log_p0, log_q0=log_q0, backend="torch"),
             None)
    return rot_pool_badmm_triton(x, ptr, method=method, variant=variant, a1=a1, a2=a2, a3=a3,
                                 rho=rho, log_p0=log_p0, log_q0=log_q0, return_plan=return_plan)
