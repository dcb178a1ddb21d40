"""Host launchers of the feature-scale kernels (``kernels.py``): two launches and one allocation
each way, nothing read on the host."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..common import cdiv, flat_numel, launcher, next_pow2, split_flat
from .kernels import (spread_grad_dot_kernel, spread_grad_kernel, spread_normalize_kernel,
                      spread_stats_kernel)


def bfs_strides(t: Tensor, sample_dims: Tuple[int, ...]) -> Optional[Tuple[int, int, int]]:
    """(batch, feature, sample) strides of ``t`` (B, ...) read as (B, F, S): images (B, C, H, W)
    with ``sample_dims`` (2, 3), sets (B, N, D) with (1,), the rows (rows, D) of a ragged batch
    with (0,) (batch stride 0: ``ptr`` locates the sets); None when the sample dims do not
    collapse into one stride (then the caller copies or uses the torch path)."""
    if sample_dims == (0,) and t.dim() == 2:
        return 0, t.stride(1), t.stride(0)
    if sample_dims == (1,) and t.dim() == 3:
        return t.stride(0), t.stride(2), t.stride(1)
    if sample_dims == (2, 3) and t.dim() == 4:
        H, W = t.shape[2], t.shape[3]
        sh, sw = t.stride(2), t.stride(3)
        if W == 1:
            ss = sh
        elif H == 1 or sh == W * sw:
            ss = sw
        else:
            return None
        return t.stride(0), t.stride(1), ss
    return None


def sizes(x: Tensor, sample_dims: Tuple[int, ...],
          ptr: Optional[Tensor] = None) -> Tuple[int, int, int]:
    """(B, F, S) of x (B, ...) with samples along ``sample_dims``; ragged: (sets, D, 0)."""
    if ptr is not None:
        return ptr.shape[0] - 1, x.shape[1], 0
    F = x.shape[1] if 1 not in sample_dims else x.shape[2]
    S = x.numel() // max(x.shape[0] * F, 1)
    return x.shape[0], F, S


def block_sizes(F: int, S: int) -> Tuple[int, int, int]:
    """(BS, BF, num_warps): 1,024-element tiles at 4 warps, samples up to 64 per tile (an image
    head's 7 × 7 pixels: 64; ragged sets, S = 0 here: 64), features filling the rest. Not
    larger: where the pixels are contiguous (NCHW images, a head's (B, HW, C) view) the JIT
    specialises the sample stride to 1 and 4,096-element tiles then spill at sm_90 (grad kernel
    32 registers + 10 KB of spills, the others up to 352 B; 1,024: at most 128 registers and
    none, tests/ops/rot/test_spread.py::test_aot_compile_sm90)."""
    BS = 64 if S == 0 else min(next_pow2(S), 64)
    BF = max(16, min(next_pow2(F), 1024 // BS))
    return BS, BF, 4


def statistics_numel(B: int, F: int) -> int:
    """Elements of the flat statistics buffer of B sets of F features (σ, root, the feature
    means: :func:`statistics_views`)."""
    return flat_numel([B, B, B * F])


def statistics_views(saved: Tensor, B: int, F: int) -> list:
    """(σ (B,), root (B,), the feature means (B·F,)): flat views of the (B, 2 + F) fp32
    statistics :func:`spread_forward` saves (set kernels form them with STATS); one split."""
    return split_flat(saved, [B, B, B * F])


def spread_forward(x: Tensor, sample_dims: Tuple[int, ...], out_dtype: Optional[torch.dtype],
                   ptr: Optional[Tensor] = None, wrap=None):
    """(x / s in ``out_dtype`` and x's memory format, saved (B, 2 + F) fp32: s, root, then the
    features' means). x: (B, F, S) through :func:`bfs_strides` (checked by the caller), any
    float dtype, B, F, S >= 1; or the rows (rows, D) of ``ptr``'s sets (``sample_dims`` (0,),
    B >= 1, D >= 1, sets may be empty). ``out_dtype`` None: no x / s (None returned in its
    place; the second launch only forms s): for a pooling kernel that folds 1 / s in."""
    B, F, S = sizes(x, sample_dims, ptr)
    BS, BF, num_warps = block_sizes(F, S)
    NFB = cdiv(F, BF)
    normalize = out_dtype is not None
    out = torch.empty_like(x, dtype=out_dtype) if normalize else None
    # one allocation: what the backward keeps (s, root, mean) and the blocks' variance sums
    # (each as a scale and the sum over its square: kernels.spread_stats_kernel)
    segments = [statistics_numel(B, F), B * NFB, B * NFB]
    buf = torch.empty(flat_numel(segments), device=x.device, dtype=torch.float32)
    saved, part, pc = split_flat(buf, segments)
    s, root, mean = statistics_views(saved, B, F)
    grid = (B, NFB)
    rag = dict(RAGGED=ptr is not None)
    ptr = ptr if ptr is not None else buf                 # unread when dense
    xst = bfs_strides(x, sample_dims)
    launcher(spread_stats_kernel, wrap)[grid](x, *xst, ptr, mean, part, pc, F, S, NFB, **rag,
                                              BS=BS, BF=BF, num_warps=num_warps)
    launcher(spread_normalize_kernel, wrap)[grid if normalize else (B, 1)](
        x, *xst, out if normalize else x, *(bfs_strides(out, sample_dims) if normalize else xst),
        ptr, part, pc, s, root, F, S, NFB, **rag, BS=BS, BF=BF, BP=next_pow2(NFB),
        NORMALIZE=normalize, num_warps=num_warps)
    return out, saved


def set_statistics(x: Tensor, ptr: Optional[Tensor], B: int, D: int, in_kernel: bool,
                   wrap=None, out: Optional[Tensor] = None) -> Tensor:
    """The (B, 2 + D) fp32 statistics of the sets' spread (σ, root, the feature means, as
    :func:`spread_forward` saves them) for a set kernel that folds 1 / σ in: an empty buffer
    that the kernel fills itself (``in_kernel``: its STATS, ``common.set_spread``; ``out``,
    if given, is that buffer: a view of an allocation the launcher makes anyway), else
    formed by the two launches of :func:`spread_forward` (x (B, N, D), or ragged rows with
    ``ptr``)."""
    if in_kernel:
        if out is not None:
            return out
        return torch.empty(statistics_numel(B, D), device=x.device, dtype=torch.float32)
    return spread_forward(x, (1,) if ptr is None else (0,), None, ptr, wrap=wrap)[1]


def spread_backward(x: Tensor, sample_dims: Tuple[int, ...], saved: Tensor, g: Tensor,
                    g_s: Tensor, ptr: Optional[Tensor] = None, wrap=None,
                    g_s_total: bool = False, out: Optional[Tensor] = None,
                    g_over_s: bool = True) -> Tensor:
    """x̄ (x's dtype and memory format) from ḡ = d loss / d(x / s) (any strides: copied when
    its sample dims do not collapse) and s̄ (B,) fp32: the direct gradient of s, or with
    ``g_s_total`` all of it (the path through x / s included: a pooling kernel that folded
    1 / s in formed it; then one launch, no dot pass). ``out``: where x̄ goes (like x), may be
    ḡ itself (each program reads its tile of ḡ before it writes x̄ there): no x-sized
    allocation. ``g_over_s`` False: ḡ is ∂/∂x at fixed s already (not ∂/∂(x / s))."""
    B, F, S = sizes(x, sample_dims, ptr)
    BS, BF, num_warps = block_sizes(F, S)
    NFB = cdiv(F, BF)
    s, root, mean = statistics_views(saved, B, F)
    gst = bfs_strides(g, sample_dims)
    if gst is None:
        g = g.contiguous()
        gst = bfs_strides(g, sample_dims)
    gx = torch.empty_like(x) if out is None else out
    part = s if g_s_total else torch.empty(B * NFB, device=x.device, dtype=torch.float32)
    grid = (B, NFB)
    xst = bfs_strides(x, sample_dims)
    rag = dict(RAGGED=ptr is not None)
    ptr = ptr if ptr is not None else part                # unread when dense
    if not g_s_total:
        launcher(spread_grad_dot_kernel, wrap)[grid](g, *gst, x, *xst, ptr, part, F, S, NFB,
                                                     **rag, BS=BS, BF=BF, num_warps=num_warps)
    launcher(spread_grad_kernel, wrap)[grid](
        g, *gst, x, *xst, gx, *bfs_strides(gx, sample_dims), ptr, mean, s, root, g_s, part, F,
        S, NFB, **rag, BS=BS, BF=BF, BP=next_pow2(NFB), DOT=not g_s_total, G_OVER_S=g_over_s,
        num_warps=num_warps)
    return gx
