"""Block configs, grids and host launchers of the Sinkhorn set kernels (``kernels.py``).

The launchers take the (6, T) weight table as it is (κ, 1/ε, ... are derived on chip) and do
no host synchronisation; sizes come from shapes only.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..common import cdiv, launcher, next_pow2, sm_count
from .kernels import (sinkhorn_bwd_kernel, sinkhorn_fwd_kernel, sinkhorn_split_a_kernel,
                      sinkhorn_split_b_kernel, sinkhorn_split_col_kernel,
                      sinkhorn_split_row_kernel, sinkhorn_wgrad_kernel)

# a dense set with at most this many rows is held in one [BN, BD] tile (one pass per iteration)
ONE_TILE_MAX_N = 512

# the v2 forward iterations (kernels._lean_iteration, _shifted_exact_iteration) for sets held in
# one tile; False: the v1 one-sweep iteration. A module flag so that tests and the SASS report
# can compare both.
LEAN_FORWARD = True

# split sets (dense, exact): when there are fewer sets than SMs, each set's rows are split into
# blocks, one program each, combined through separate launches (kernels.sinkhorn_split_*).
# Off by default: the split kernels still use the v1 streamed loops (not yet SASS-tuned).
# SPLIT_ROWS forces the block size (tests: CI exercises the cross-program combine).
SPLIT_SETS = False
SPLIT_ROWS: Optional[int] = None
SPLIT_MIN_ROWS = 32

# elements of x per thread in one [BN, BD] tile: the forward holds ~3 tiles live, the backward's
# dx pass ~6; with these budgets ptxas stays below 255 registers without spills (AOT test; 32
# per thread in the v2 forward would halve its per-chunk vector work but spills to the stack).
FWD_ELEMS_PER_THREAD = 16
BWD_ELEMS_PER_THREAD = 8


def _blocks(D: int, N: Optional[int], tile: int) -> tuple:
    """[BN, BD] tile: BD covers D up to 128 features, BN fills the rest of a ``tile``-element
    budget (capped by the set size when it is known, i.e. for dense batches)."""
    BD = min(next_pow2(D), 128)
    BN = max(tile // BD, 1)
    if N is not None:
        BN = min(BN, next_pow2(max(N, 1)))
    return BN, BD


def _config(D: int, N: Optional[int], elems_per_thread: int, num_warps: int) -> tuple:
    tile = elems_per_thread * 32 * num_warps
    if N is not None and N <= ONE_TILE_MAX_N:
        BN = next_pow2(max(N, 1))
        return BN, max(min(tile // BN, next_pow2(D), 128), 1), True
    BN, BD = _blocks(D, N, tile)
    return BN, BD, False


def fwd_config(D: int, N: Optional[int], num_warps: int = 4) -> tuple:
    """(BN, BD, one_tile) of the forward: a dense batch with N <= 512 puts all of a set's rows in
    one tile (one pass over x per iteration instead of two); otherwise streamed [BN, BD] tiles."""
    return _config(D, N, FWD_ELEMS_PER_THREAD, num_warps)


def bwd_config(D: int, N: Optional[int], num_warps: int = 4) -> tuple:
    """(BN, BD, one_tile) of the backward (one pass per reverse iteration when one_tile)."""
    return _config(D, N, BWD_ELEMS_PER_THREAD, num_warps)


def num_warps_for(x: Tensor, B: int) -> int:
    """One program per set: with fewer sets than about two per SM (W1: 50, W5: 128 sets) each
    program gets 8 warps to keep enough loads in flight; many small sets use 4."""
    if not x.is_cuda:
        return 4
    return 8 if B < 2 * sm_count(x.device) else 4


def split_rows(x: Tensor, B: int, N: Optional[int], paper: bool) -> int:
    """Rows per block of a split set, or 0 (one program per set)."""
    if N is None or paper or N < 2:
        return 0
    if SPLIT_ROWS is not None:
        return next_pow2(min(SPLIT_ROWS, N))
    if not SPLIT_SETS:
        return 0
    blocks = min(cdiv(sm_count(x.device), max(B, 1)), N // SPLIT_MIN_ROWS)
    return next_pow2(cdiv(N, blocks)) if blocks >= 2 else 0


def _split_iterations(x, B, N, D, NR, strides, w, lp0, lq0, has_p0, has_q0, A, Rn, Bv, Cn,
                      rows, nw, wrap):
    """All T exact iterations of a dense batch with each set split into blocks of ``rows``."""
    sxb, sxn, sxd = strides
    T = w.shape[1]
    NB = cdiv(N, rows)
    BD = max(min(next_pow2(D), FWD_ELEMS_PER_THREAD * 32 * nw // rows, 128), 1)
    BJ = next_pow2(NB)
    Pr = torch.empty(B, NB, D, device=x.device, dtype=torch.float32)
    Vr = torch.empty(B, NB, device=x.device, dtype=torch.float32)
    for t in range(T):
        launcher(sinkhorn_split_col_kernel, wrap)[(B, NB)](
            x, sxb, sxn, sxd, N, D, T, NR, t, w, Bv, Pr, NB, BN=rows, BD=BD, num_warps=nw)
        launcher(sinkhorn_split_a_kernel, wrap)[(B,)](
            Pr, NB, D, T, t, w, lp0, -math.log2(D), A, Rn, HAS_P0=has_p0, BJ=BJ,
            BD=min(next_pow2(D), 1024), num_warps=4)
        launcher(sinkhorn_split_row_kernel, wrap)[(B, NB)](
            x, sxb, sxn, sxd, N, D, T, NR, t, w, A, Cn, Bv, lq0, Vr, NB, HAS_Q0=has_q0,
            BN=rows, BD=BD, num_warps=nw)
        launcher(sinkhorn_split_b_kernel, wrap)[(B, NB)](
            N, T, NR, t, Cn, Bv, Vr, NB, BN=rows, BJ=BJ, num_warps=1)


def _largest_first(ptr: Optional[Tensor], dummy: Tensor) -> Tensor:
    """Set ids of a ragged batch by decreasing size (the kernels' program order, so that the
    largest set starts first); ``dummy`` for a dense batch (programs in set order)."""
    if ptr is None:
        return dummy
    return torch.argsort(ptr[1:] - ptr[:-1], descending=True)


def layout(x: Tensor, ptr: Optional[Tensor]):
    """(B, N or None, D, NR, strides (b, n, d)) of a dense (B, N, D) or ragged (NR, D) batch."""
    if ptr is None:
        B, N, D = x.shape
        return B, N, D, B * N, (x.stride(0), x.stride(1), x.stride(2))
    NR, D = x.shape
    return ptr.shape[0] - 1, None, D, NR, (0, x.stride(0), x.stride(1))


def _strides3(t: Tensor, ragged: bool) -> tuple:
    return (0, t.stride(0), t.stride(1)) if ragged else (t.stride(0), t.stride(1), t.stride(2))


def sinkhorn_forward(x: Tensor, ptr: Optional[Tensor], w: Tensor, log_p0: Optional[Tensor],
                     log_q0: Optional[Tensor], paper: bool, return_plan: bool, wrap=None):
    """Launch the fused forward.

    Args:
        x: (B, N, D) dense with any strides, or (N_total, D) ragged with ``ptr`` (B + 1,) int64.
        w: (6, T) float32 weight table (rows of ``params.py``; a2/a3 may be +inf).
        log_p0: (B, D) normalized natural-log prior over features, or None (uniform).
        log_q0: like x[..., 0] ((B, N) or (N_total,)), normalized per set, or None (uniform).
        paper: eq. (18) Jacobi updates instead of the exact Gauss-Seidel ones.
        return_plan: also write each set's plan, normalized to mass 1, in x's layout.
        wrap: ``torch.library.wrap_triton`` inside a triton_op, else None.

    Returns:
        y (B, D) fp32, plan (like x, or an empty tensor), and the saved state
        A (B, T + 1, D), Rn (B, T, D), Bv (T + 1, NR), Cn (T, NR), rfin (B, D), tot (B,).
    """
    B, N, D, NR, (sxb, sxn, sxd) = layout(x, ptr)
    T = w.shape[1]
    f32 = dict(device=x.device, dtype=torch.float32)
    A = torch.zeros(B, T + 1, D, **f32)
    Rn = torch.empty(B, T, D, **f32)
    Bv = torch.zeros(T + 1, NR, **f32)
    Cn = torch.empty(T, NR, **f32)
    rfin = torch.empty(B, D, **f32)
    tot = torch.zeros(B, **f32)
    y = torch.zeros(B, D, **f32)
    if return_plan:
        plan = torch.zeros_like(x)  # rows of empty sets do not exist; keep it defined anyway
        spb, spn, spd = _strides3(plan, ptr is not None)
    else:
        plan = x.new_empty(0)
        spb = spn = spd = 0
    nw = num_warps_for(x, B)
    BN, BD, one_tile = fwd_config(D, N, nw)
    lp0 = log_p0.float().contiguous() if log_p0 is not None else y
    lq0 = log_q0.float().contiguous() if log_q0 is not None else y
    rows = split_rows(x, B, N, paper)
    if B > 0 and D > 0:
        if rows:
            _split_iterations(x, B, N, D, NR, (sxb, sxn, sxd), w, lp0, lq0, log_p0 is not None,
                              log_q0 is not None, A, Rn, Bv, Cn, rows, nw, wrap)
        launcher(sinkhorn_fwd_kernel, wrap)[(B,)](
            x, ptr if ptr is not None else y, _largest_first(ptr, y), sxb, sxn, sxd, N if N is not None else 0, D, T, NR,
            -math.log2(D), w, lp0, lq0, A, Rn, Bv, Cn, rfin, tot, y, plan, spb, spn, spd,
            RAGGED=ptr is not None, HAS_P0=log_p0 is not None, HAS_Q0=log_q0 is not None,
            PAPER=paper, RETURN_PLAN=return_plan, ONE_TILE_N=one_tile, BN=BN, BD=BD,
            LEAN=LEAN_FORWARD, MASK_N=N is None or N != BN, ITERATE=not rows, num_warps=nw)
    return y, plan, A, Rn, Bv, Cn, rfin, tot


def sinkhorn_backward(x: Tensor, ptr: Optional[Tensor], w: Tensor, log_p0: Optional[Tensor],
                      log_q0: Optional[Tensor], paper: bool, y: Tensor, A: Tensor, Rn: Tensor,
                      Bv: Tensor, Cn: Tensor, rfin: Tensor, tot: Tensor, grad_y: Tensor,
                      grad_plan: Optional[Tensor], wrap=None):
    """Launch the fused backward and the weight-table gradient (arguments as
    :func:`sinkhorn_forward`, plus its outputs).

    Args:
        grad_y: (B, D) gradient of y. grad_plan: gradient of the plan (x's shape) or None.

    Returns:
        dx (like x, x's dtype), dlog_p0 (B, D) or None, dlog_q0 (like log_q0) or None,
        dw (6, T) fp32 (zeros in the rows Sinkhorn does not read).
    """
    B, N, D, NR, (sxb, sxn, sxd) = layout(x, ptr)
    T = w.shape[1]
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = torch.zeros_like(x)
    dlp0 = torch.zeros(B, D, **f32)
    dlq0 = torch.zeros(NR, **f32)
    # per-set partials of the weight gradient, folded by sinkhorn_wgrad_kernel
    part = torch.zeros(4, B, T, **f32)
    deps_fin = torch.zeros(B, **f32)
    dw = torch.empty(6, T, **f32)
    Rbar = torch.empty(B, T, D, **f32)
    Cbar = torch.empty(T, NR, **f32)
    abar = torch.empty(B, D, **f32)
    bbar = torch.empty(NR, **f32)
    g = grad_y.float().contiguous()
    has_gp = grad_plan is not None
    gp = grad_plan if has_gp else g
    sgb, sgn, sgd = _strides3(gp, ptr is not None) if has_gp else (0, 0, 0)
    sdb, sdn, sdd = _strides3(dx, ptr is not None)
    nw = num_warps_for(x, B)
    BN, BD, one_tile = bwd_config(D, N, nw)
    lp0 = log_p0.float().contiguous() if log_p0 is not None else g
    lq0 = log_q0.float().contiguous() if log_q0 is not None else g
    if B > 0 and D > 0:
        launcher(sinkhorn_bwd_kernel, wrap)[(B,)](
            x, ptr if ptr is not None else g, _largest_first(ptr, g), sxb, sxn, sxd, N if N is not None else 0, D, T, NR,
            -math.log2(D), w, lp0, lq0, A, Rn, Bv, Cn, rfin, tot, y,
            g, gp, sgb, sgn, sgd, dx, sdb, sdn, sdd,
            dlp0, dlq0, part[0], part[1], part[2], part[3], deps_fin, Rbar, Cbar, abar, bbar,
            RAGGED=ptr is not None, HAS_P0=log_p0 is not None, HAS_Q0=log_q0 is not None,
            PAPER=paper, HAS_GP=has_gp, ONE_TILE_N=one_tile, BN=BN, BD=BD, BT=next_pow2(T),
            num_warps=nw)
    launcher(sinkhorn_wgrad_kernel, wrap)[(1,)](
        w, part[0], part[1], part[2], part[3], deps_fin, dw, B, T, PAPER=paper,
        BT=next_pow2(T), num_warps=1)
    return (dx, dlp0 if log_p0 is not None else None,
            dlq0.reshape(log_q0.shape) if log_q0 is not None else None, dw)
