"""Host launchers of the window kernels (``kernels.py``): output geometry, tile sizes, grids.

No host synchronisation and no per-weight arithmetic here: the kernels read the (6, T) weight
table directly. The backward's weight cotangent comes back as per-program partial sums
(grid × next_pow2(6T)) summed on the device in a fixed order (deterministic).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ... import params
from ..common import FAST_MATH, FRUGAL_REGISTERS, launcher, next_pow2, sm_count
from .kernels import window_bwd_kernel, window_fwd_kernel
# the window geometry: one formula for every path
from ...window_geometry import (adaptive_bounds, adaptive_windows_overlap,
                                largest_adaptive_window, pool_output_size)

METHOD_IDS = {"sinkhorn": 0, "badmm-e": 1, "badmm-q": 2}
# Tiles [BW, BN, BC]: BW windows per program so that a tile holds at least *_TILE elements, and
# as many warps as give each thread the layout's elements (1 to MAX_WARPS), with a cap on the
# registers a thread may use (ptxas maxnreg). Both set how many warps an SM keeps resident
# (65,536 registers), by which bench/latency_model.py's calibrated model prices a window kernel;
# the AOT test (tests/ops/rot/test_window.py) checks that each configuration compiles within its
# cap without spills. Not yet timed on a GPU (bench/gpu_tune.py times the earlier layouts too).
FWD_TILE = 1024
BWD_TILE = 512
# triton 3.6 (the H200 image's) builds these kernels in more registers than 3.9 (the Sinkhorn
# forward at W3: 137 against 93; at a cap of 96 it spills 92 B where 3.9 fits 72; the 8-warp
# B-ADMM backward spills 304 B at 128): the caps and the 8-warp B-ADMM backward found with 3.9
# apply from 3.9 on (common.FRUGAL_REGISTERS; 3.6 keeps the uncapped 1-warp Sinkhorn forward
# and 4-warp backward)
# (elements a thread, register cap) of the forward's exact unmasked tiles; masked tiles and the
# paper variant (Sinkhorn: 188 B of spills at 72) take the same elements uncapped. Sinkhorn
# keeps x and two vectors: 72 registers at 32 elements (28 resident one-warp windows per SM;
# uncapped 93: 21), a cap for one-warp tiles only (C <= 256 at 2×2: summing the channels
# across warps needs more, 108-116 B of spills at 72); B-ADMM x and two tiles (log S, Z): 16
# elements in 128 registers at 2-8 warps (32 took 215: 9 warps per SM), and 32 uncapped
# beyond 8 warps (16 warps at 128 registers spill); exact B-E and B-Q in 88 with 3.9 (no P or
# log P formed: 22 warps per SM instead of 16; 3.6 spills 488 / 332 B at 96, 3.9 spilled 40 /
# 108 B at 96 before). The cap is that of a one-window tile: a thread of a tile of w windows
# holds the per-sample vectors of several windows, so B-ADMM takes CAP_STEP registers more
# per doubling of w (``cap_step``), and tiles of more than FWD_CAP_WINDOWS windows none (3.9,
# 2×2, exact unmasked: B-E at C = 128 spilled 40 B at 88, at C = 64 44 B at 96, at C = 32
# 124 B even at 128 (uncapped: 211 registers); Sinkhorn at C = 32 192 B at 72)
FWD_LAYOUT = {"sinkhorn": (32, 72 if FRUGAL_REGISTERS else 255),
              "badmm-e": (16, 88 if FRUGAL_REGISTERS else 128),
              "badmm-q": (16, 88 if FRUGAL_REGISTERS else 128)}
CAP_STEP = {"sinkhorn": 0, "badmm-e": 8, "badmm-q": 8}
FWD_CAP_WINDOWS = 4
# With triton 3.6 the forward's exact unmasked tiles of few warps run on twice the warps (half
# the elements a thread) under caps of their own: {method: (up to that many warps, cap)}
# (+ cap_step for tiles of several windows). 3.6 builds 3.9's layouts in more registers: the
# one-warp Sinkhorn tile (W3's [1, 4, 256]) in 136 uncapped (15 resident warps an SM),
# spilling under 104; on two warps under 72: 72, no spills (28 resident warps, as 3.9's one
# warp under 72). The two-warp B-ADMM tile spills 332-488 B under 96 and took 128 (16
# resident warps); on four under 80: no spills (24). W3 T = 4 forward kernels, calibrated
# with 3.6: Sinkhorn 404 -> 282 µs, B-E 425 -> 341 (3.9's layouts: 242 and 353; more warps
# under lower caps price lower still, at 36-40 resident warps, beyond the occupancy the model
# was fitted on; PREDICTED, bench/results/window_fwd_triton36_2026-12-04.md)
FWD_HALF_ELEMS = {} if FRUGAL_REGISTERS else {"sinkhorn": (1, 72), "badmm-e": (2, 80),
                                              "badmm-q": (2, 80)}
# masked exact tiles of one window (3×3 windows, adaptive ones, padding, C < next_pow2(C);
# triton 3.9): caps of their own. Uncapped, the B-ADMM forward of a 3×3 window at C = 256
# ([1, 16, 256], 8 warps) took 135-138 registers: one CTA, 8 warps per SM; at 120, 112-120
# and no spills for [1, 4 or 16, 64-256] tiles (112 spilled 72 B at [2, 4, 128]), two CTAs.
# Sinkhorn at 96: 79-96 registers, no spills up to [1, 4, 2048] (72 spilled 16-204 B in
# some). Several windows a tile (C < 64 for 3×3) stay uncapped (C = 3 spilled 8 B at 128),
# and so do B-ADMM's wide tiles (beyond 4,096 elements: [1, 16, 512] spilled 288 B at 120)
FWD_MASKED_CAP = {"sinkhorn": 96 if FRUGAL_REGISTERS else 255,
                  "badmm-e": 120 if FRUGAL_REGISTERS else 255,
                  "badmm-q": 120 if FRUGAL_REGISTERS else 255}
# the backward's elements a thread: it keeps L iterations' states per thread, the Sinkhorn
# state two vectors per window (8 elements a thread at W3 cross 4 warps: +50 % instructions,
# sm_90, 2026-11-30), B-ADMM two tiles: the exact variant 4 elements a thread (8 warps a W3
# window; 2 CTAs per SM in 128 registers instead of 2 of 4 warps at 229), the paper variant
# (twice the tape) 8
BWD_ELEMS = {"sinkhorn": 16, "badmm-e": 4 if FRUGAL_REGISTERS else 8,
             "badmm-q": 4 if FRUGAL_REGISTERS else 8}
BWD_ELEMS_PAPER = {"sinkhorn": 16, "badmm-e": 8, "badmm-q": 8}
# the registers an exact unmasked backward needs besides its tape, at BWD_ELEMS (triton 3.9,
# W3, no spills under a cap of this plus the tape, rounded up to 8, at L = 1 to 16: Sinkhorn
# 4 taped steps in 157 registers, 16 untaped in 184-192; B-ADMM 4 steps in 128): the cap leaves
# room for more resident CTAs than the uncapped 196-229 registers (W3 T=4 S 10 -> 12 warps per
# SM, T=16 8 -> 10). Sinkhorn: tiles of one window only (C >= 256 at 2×2; a thread holding
# samples of two windows keeps twice the per-sample tape: C = 64, T = 16 spilled 692 B)
BWD_BASE_REGISTERS = {"sinkhorn": 128, "badmm-e": 96, "badmm-q": 96}
# Small C (tiles of several windows, 3.9 sm_90 AOT, 2×2): B-ADMM takes CAP_STEP more per
# doubling of the windows a tile, and no cap beyond BWD_CAP_WINDOWS (C = 32 spilled 16-24 B at
# 128, 8 B at 144); each thread holds the vectors of at most BWD_WINDOWS_PER_THREAD windows
# (exact, paper), more warps otherwise (Sinkhorn at C = 8: 328-944 B of spills in one warp)
BWD_CAP_WINDOWS = 2
BWD_WINDOWS_PER_THREAD = {False: 2, True: 1}
MAX_WARPS = 16
# The backward's segment length L: the iterations whose states it keeps in registers at once,
# at most BWD_SEGMENT and BWD_TAPE_REGISTERS per thread at the full register cap, fewer under a
# lower cap (``tape_registers``). T ≤ L runs in O(T); beyond, each further segment first
# replays the iterations before it. Calibrated on sm_90 AOT register counts at W3
# (tests/ops/rot/test_window.py: no spills).
BWD_SEGMENT = {"sinkhorn": 16, "badmm-e": 4, "badmm-q": 4}
BWD_TAPE_REGISTERS = 64
# programs per SM of the backward's persistent grid
BWD_PROGRAMS_PER_SM = 8


class Geometry(NamedTuple):
    """Sizes of one window pooling problem (all host ints, from shapes only). ``adaptive``:
    nn.AdaptiveAvgPool2d's windows for the output size (Ho, Wo) (``window_geometry``), kh × kw
    the largest of them, stride and padding 0 (unused)."""
    B: int
    C: int
    H: int
    W: int
    Ho: int
    Wo: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    adaptive: bool = False

    @property
    def n_windows(self) -> int:
        return self.B * self.Ho * self.Wo

    @property
    def overlap(self) -> bool:
        """Windows share pixels: the backward accumulates dx with atomics."""
        if self.adaptive:
            return (adaptive_windows_overlap(self.H, self.Ho)
                    or adaptive_windows_overlap(self.W, self.Wo))
        return self.sh < self.kh or self.sw < self.kw

    @property
    def tiles_image(self) -> bool:
        """Every pixel lies in exactly one window (stride = kernel, no padding, no remainder;
        adaptive windows cover the image, so: without overlap)."""
        if self.adaptive:
            return not self.overlap
        return (self.sh == self.kh and self.sw == self.kw and self.ph == 0 and self.pw == 0
                and self.Ho * self.kh == self.H and self.Wo * self.kw == self.W)

    def constexprs(self) -> dict:
        return dict(KH=self.kh, KW=self.kw, SH=self.sh, SW=self.sw, PH=self.ph, PW=self.pw,
                    ADAPTIVE=self.adaptive)


def geometry(x_shape, kernel_size, stride, padding, ceil_mode: bool,
             output_size=None) -> Geometry:
    """The windows of nn.MaxPool2d (kernel_size, stride, padding, ceil_mode; dilation 1) or,
    with ``output_size`` (oh, ow), those of nn.AdaptiveAvgPool2d (the other arguments unused)."""
    B, C, H, W = x_shape
    if output_size:
        oh, ow = output_size
        return Geometry(B, C, H, W, oh, ow, largest_adaptive_window(H, oh),
                        largest_adaptive_window(W, ow), 0, 0, 0, 0, True)
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    return Geometry(B, C, H, W, pool_output_size(H, kh, sh, ph, ceil_mode),
                    pool_output_size(W, kw, sw, pw, ceil_mode), kh, kw, sh, sw, ph, pw)


def block_sizes(N: int, C: int, budget: int) -> Tuple[int, int, int]:
    """(BW, BN, BC): windows per program, next_pow2 of the samples and of the channels."""
    BN, BC = next_pow2(N), next_pow2(C)
    return max(1, min(64, budget // (BN * BC))), BN, BC


def num_warps_for(tile_elems: int, per_thread: int) -> int:
    """Warps that give each thread ``per_thread`` elements of the tile (a power of 2)."""
    return max(1, min(MAX_WARPS, tile_elems // (32 * per_thread)))


def max_registers(num_warps: int) -> int:
    """The register cap passed to ptxas (``maxnreg``): all that one CTA may use (65,536 per SM,
    at most 255 per thread). Without it ptxas picks fewer registers for some backward kernels
    and spills (sm_90 AOT: B-Q exact at W3 168 registers + 32 B of spills; 192 and none
    with the cap)."""
    return min(255, 65536 // (32 * num_warps)) // 8 * 8


def masked(g: Geometry, BN: int, BC: int) -> bool:
    """Some window loses samples (padding, border, ceil_mode, k² not a power of 2) or
    C < next_pow2(C): the kernels mask their reductions."""
    if g.adaptive:   # windows of different sizes (one size: the local windows' route)
        full = g.H % g.Ho == 0 and g.W % g.Wo == 0 and g.kh * g.kw == BN
    else:
        full = (g.ph == 0 and g.pw == 0 and g.kh * g.kw == BN
                and (g.Ho - 1) * g.sh + g.kh <= g.H and (g.Wo - 1) * g.sw + g.kw <= g.W)
    return not full or g.C != BC


def cap_step(method: str, windows: int) -> int:
    """Registers a tile of ``windows`` (a power of 2) windows needs beyond a one-window tile's
    cap: CAP_STEP per doubling."""
    return CAP_STEP[method] * (windows.bit_length() - 1)


def fwd_layout(method: str, variant: str, tile: int, is_masked: bool,
               windows: int = 1) -> Tuple[int, int]:
    """(num_warps, maxnreg) of a forward tile of ``tile`` elements in ``windows`` windows
    (``FWD_LAYOUT``, ``cap_step``, ``FWD_CAP_WINDOWS``)."""
    elems, cap = FWD_LAYOUT[method]
    wide = method != "sinkhorn" and tile > 8 * 32 * elems
    if wide:
        elems, cap = 32, 255           # beyond 8 warps: 32 a thread, uncapped (as before)
    warps = num_warps_for(tile, elems)
    full = variant == "exact" and tile == warps * 32 * elems
    half = FWD_HALF_ELEMS.get(method)
    if (half and full and warps <= half[0] and not is_masked and not wide
            and windows <= FWD_CAP_WINDOWS):
        return 2 * warps, half[1] + cap_step(method, windows)
    if is_masked:   # FWD_MASKED_CAP: one window a tile only
        capped, cap = full and windows == 1 and not wide, FWD_MASKED_CAP[method]
    else:
        capped = (full and (warps == 1 or method != "sinkhorn") and windows <= FWD_CAP_WINDOWS)
        cap += cap_step(method, windows)
    return warps, min(max_registers(warps), cap) if capped else max_registers(warps)


def fwd_config(g: Geometry, method: str, variant: str) -> dict:
    """Block sizes and the mask flags of the forward kernel: MASKED (``masked``); TAIL when
    the last tile is partial (then only its loads and stores are masked)."""
    BW, BN, BC = block_sizes(g.kh * g.kw, g.C, FWD_TILE)
    is_masked = masked(g, BN, BC)
    warps, regs = fwd_layout(method, variant, BW * BN * BC, is_masked, BW)
    return dict(BW=BW, BN=BN, BC=BC, MASKED=is_masked, TAIL=g.n_windows % BW != 0,
                FAST=FAST_MATH.value, num_warps=warps, maxnreg=regs)


def tape_registers(method: str, paper: bool, BN: int, per_thread: int,
                   lse: bool = False, windows: int = 1) -> int:
    """Registers per thread that one iteration's state takes in the backward's tape: a
    window's samples of a channel sit in one thread, so an N-vector (b, log η, z2) costs BN
    for each of the ``windows`` windows the thread holds, a C-vector (a, log μ, z1)
    per_thread / BN, a tile (log S, Z) per_thread. ``lse`` (Sinkhorn): the step's LogSumExps
    over the channels too (C: BN, LSE_d(v): 1, per window)."""
    c_vec = max(1, per_thread // BN)
    if method == "sinkhorn":
        return windows * (BN + (BN + 1 if lse else 0)) + (c_vec if paper else 0)
    return 2 * per_thread + (2 * BN * windows + 2 * c_vec if paper else 0)


def windows_per_thread(BW: int, BC: int, num_warps: int) -> int:
    """Windows whose vectors one thread holds: the lanes spread over the channels first, then
    over the windows (all BW windows when BC fills the CTA's threads)."""
    threads = 32 * num_warps
    return max(1, BW * min(BC, threads) // threads)


def bwd_config(g: Geometry, T: int, method: str, variant: str) -> dict:
    """Block sizes, segment length L, mask flag and register cap of the backward."""
    BW, BN, BC = block_sizes(g.kh * g.kw, g.C, BWD_TILE)
    paper = variant == "paper"
    is_masked = masked(g, BN, BC)
    warps = num_warps_for(BW * BN * BC, (BWD_ELEMS_PAPER if paper else BWD_ELEMS)[method])
    # small C: more warps until a thread holds the vectors of at most BWD_WINDOWS_PER_THREAD
    # windows (their tape and reductions spilled beyond)
    while (windows_per_thread(BW, BC, warps) > BWD_WINDOWS_PER_THREAD[paper]
           and warps < MAX_WARPS and BW * BN * BC >= 64 * warps):
        warps *= 2
    per_thread = max(1, BW * BN * BC // (32 * warps))
    wpt = windows_per_thread(BW, BC, warps)
    regs = max_registers(warps)  # the tape's budget shrinks with the register cap
    budget = BWD_TAPE_REGISTERS * regs // 248
    fit = budget // tape_registers(method, paper, BN, per_thread, windows=wpt)
    # Sinkhorn: when all T iterations fit in one segment with the channel LSEs on the tape,
    # keep them there (TAPED: two fewer reductions across the lanes per reverse step)
    taped = method == "sinkhorn" and T <= min(BWD_SEGMENT[method],
                                              budget // tape_registers(method, paper, BN,
                                                                       per_thread, lse=True,
                                                                       windows=wpt))
    L = max(1, min(T, BWD_SEGMENT[method], fit))
    if (FRUGAL_REGISTERS and not paper and not is_masked
            and (BW == 1 or method != "sinkhorn" and BW <= BWD_CAP_WINDOWS)):
        need = BWD_BASE_REGISTERS[method] + L * tape_registers(method, paper, BN, per_thread,
                                                               lse=taped, windows=wpt)
        need += cap_step(method, BW)
        regs = min(regs, -(-need // 8) * 8)
    return dict(BW=BW, BN=BN, BC=BC, L=L, MASKED=is_masked, FAST=FAST_MATH.value,
                num_warps=warps, maxnreg=regs, TAPED=taped)


def is_channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def empty_like_layout(x: Tensor, shape, dtype) -> Tensor:
    """A new tensor in x's memory format (channels_last stays channels_last)."""
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=x.device, memory_format=fmt)


def window_forward(x: Tensor, w: Tensor, g: Geometry, method: str, variant: str,
                   wrap=None, scale: Optional[Tensor] = None) -> Tensor:
    """y (B, C, Ho, Wo) in x's dtype and memory format; with ``scale`` (B,) fp32 (each image's
    feature scale s) y = s · pool(x / s), folded into the kernel's load and store."""
    y = empty_like_layout(x, (g.B, g.C, g.Ho, g.Wo), x.dtype)
    if g.n_windows == 0 or g.C == 0:
        return y
    cfg = fwd_config(g, method, variant)
    grid = (-(-g.n_windows // cfg["BW"]),)
    launcher(window_fwd_kernel, wrap)[grid](
        x, y, w, w if scale is None else scale, g.C, g.H, g.W, g.Ho, g.Wo, g.n_windows,
        -math.log(g.C), *x.stride(), *y.stride(), T=w.shape[1], METHOD=METHOD_IDS[method],
        PAPER=variant == "paper", SCALED=scale is not None, **cfg, **g.constexprs())
    return y


def sum_window_shares(shares: Tensor, g: Geometry, x: Tensor) -> Tensor:
    """x̄ (B, C, H, W) fp32 in x's memory format from the windows' shares (B, C, kh·kw,
    Ho·Wo), each pixel's shares summed in a fixed order by ``F.fold`` (torch's col2im: one
    thread per output element, no atomics). The fold covers the padded frame the windows span,
    which the image's rows and columns are then cut from (padding, ceil_mode and the pixels no
    window reaches included). Adaptive windows: :func:`_sum_adaptive_shares`."""
    if g.adaptive:
        return _sum_adaptive_shares(shares, g, x)
    Hp, Wp = (g.Ho - 1) * g.sh + g.kh, (g.Wo - 1) * g.sw + g.kw
    frame = torch.nn.functional.fold(shares.view(g.B, g.C * g.kh * g.kw, g.Ho * g.Wo),
                                     (Hp, Wp), (g.kh, g.kw), stride=(g.sh, g.sw))
    hi, wi = min(g.H, Hp - g.ph), min(g.W, Wp - g.pw)
    gx = empty_like_layout(x, x.shape, torch.float32)
    if hi < g.H or wi < g.W:
        gx.zero_()
    gx[:, :, :hi, :wi] = frame[:, :, g.ph:g.ph + hi, g.pw:g.pw + wi]
    return gx


def _sum_adaptive_shares(shares: Tensor, g: Geometry, x: Tensor) -> Tensor:
    """:func:`sum_window_shares` for adaptive windows (no fold geometry): each pixel gathers
    its slots (sample, window) of ``shares`` - at most M of them, the missing ones weighted
    0 - and sums them in a fixed order."""
    slots, used = (t.to(shares.device) for t in _adaptive_pixel_slots(
        g.H, g.W, g.Ho, g.Wo, g.kh, g.kw))
    got = shares.reshape(g.B, g.C, -1).index_select(2, slots.view(-1))   # [B, C, H·W·M]
    gx = empty_like_layout(x, x.shape, torch.float32)
    gx.copy_((got.view(g.B, g.C, g.H, g.W, -1) * used).sum(-1))
    return gx


@functools.lru_cache(maxsize=64)
def _adaptive_pixel_slots(H: int, W: int, Ho: int, Wo: int, kh: int, kw: int):
    """((H, W, M) int64, (H, W, M) fp32): per pixel the flat slots n·Ho·Wo + window of the
    adaptive windows' samples at that pixel (n = (h - h0)·kw + (w - w0)), padded with slot 0,
    and 1 for a slot of the pixel, 0 for padding."""
    rows, cols = adaptive_bounds(H, Ho), adaptive_bounds(W, Wo)
    per_pixel = [[] for _ in range(H * W)]
    for i, (h0, h1) in enumerate(rows):
        for j, (w0, w1) in enumerate(cols):
            for h in range(h0, h1):
                for w in range(w0, w1):
                    n = (h - h0) * kw + (w - w0)
                    per_pixel[h * W + w].append(n * Ho * Wo + i * Wo + j)
    M = max(len(v) for v in per_pixel)
    slots = torch.tensor([v + [0] * (M - len(v)) for v in per_pixel], dtype=torch.int64)
    used = torch.tensor([[1.0] * len(v) + [0.0] * (M - len(v)) for v in per_pixel])
    return slots.view(H, W, M), used.view(H, W, M)


def window_backward(x: Tensor, w: Tensor, gy: Tensor, g: Geometry, method: str, variant: str,
                    wrap=None, scale: Optional[Tensor] = None):
    """(dx in x's dtype and memory format, dw (6, T) float32). With ``scale`` (the forward's
    y = s · f(x / s)): (d(x / s), dw, ds (B,) fp32) - the cotangent of x / s, not yet of x
    (the spread's backward adds the path through s and divides by s)."""
    T = w.shape[1]
    live = g.n_windows > 0 and g.C > 0
    # overlapping windows accumulate dx atomically in fp32, in an order that varies on a GPU;
    # under torch.use_deterministic_algorithms they store their shares instead (SHARES) and
    # sum_window_shares adds them up. Otherwise every pixel is written once (by its window,
    # in x's dtype) or belongs to no window (then zeros are needed)
    shares = g.overlap and live and torch.are_deterministic_algorithms_enabled()
    if shares:
        gx = torch.zeros(g.B, g.C, g.kh * g.kw, g.Ho * g.Wo, dtype=torch.float32,
                         device=x.device)
    else:
        gx = empty_like_layout(x, x.shape, torch.float32 if g.overlap else x.dtype)
        if g.overlap or not g.tiles_image:
            gx.zero_()
    cfg = bwd_config(g, T, method, variant)
    TP = next_pow2(T * params.NUM_WEIGHTS)
    n_tiles = max(1, -(-g.n_windows // cfg["BW"]))
    n_prog = max(1, min(n_tiles, BWD_PROGRAMS_PER_SM * sm_count(x.device)))
    gw = torch.zeros(n_prog, TP, dtype=torch.float32, device=x.device)
    # SCALED: each window's share of ds, summed per image below (deterministic)
    ds = (torch.empty(g.B, g.Ho * g.Wo, dtype=torch.float32, device=x.device)
          if scale is not None else None)
    if live:
        launcher(window_bwd_kernel, wrap)[(n_prog,)](
            x, gy, w, gx, gw, w if scale is None else scale, gw if ds is None else ds, g.C,
            g.H, g.W, g.Ho, g.Wo, g.n_windows, n_tiles, -(-T // cfg["L"]), -math.log(g.C),
            *x.stride(), *gy.stride(), *gx.stride(), T=T, TP=TP, METHOD=METHOD_IDS[method],
            PAPER=variant == "paper", OVERLAP=g.overlap and not shares, SHARES=shares,
            SCALED=scale is not None, **cfg, **g.constexprs())
    if shares:
        gx = sum_window_shares(gx, g, x)
    gw = gw.sum(0)[:T * params.NUM_WEIGHTS].view(params.NUM_WEIGHTS, T)
    if scale is not None:  # the fp32 x̄ of overlapping windows stays fp32 for the spread pass
        return gx, gw, ds.sum(1) if live else ds.new_zeros(g.B)
    return (gx if gx.dtype == x.dtype else gx.to(x.dtype)), gw   # no host op when equal
