"""Block configs, grids and host launchers of the Sinkhorn set kernels (``kernels.py``).

The launchers take the (6, T) weight table as it is (κ, 1/ε, ... are derived on chip) and do
no host synchronisation; sizes come from shapes only.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from ...params import A1, A3
from ..common import (FRUGAL_REGISTERS, as_f32, cdiv, flat_numel, launcher, next_pow2,
                      split_flat, sm_count)
from ..spread.launch import set_statistics, statistics_numel, statistics_views
from .kernels import (RV_SLOTS, sinkhorn_bwd_kernel, sinkhorn_dx_kernel, sinkhorn_fwd_kernel,
                      sinkhorn_split_a_kernel,
                      sinkhorn_split_b_kernel, sinkhorn_split_col_kernel,
                      sinkhorn_split_row_kernel)

# a dense set with at most this many rows is held in one [BN, BD] tile (one pass per iteration)
ONE_TILE_MAX_N = 512

# split sets (dense, exact): when there are fewer sets than SMs, each set's rows are split into
# blocks, one program each, combined through separate launches (kernels.sinkhorn_split_*).
# Off by default: the split kernels still use the v1 streamed loops (not yet SASS-tuned).
# SPLIT_ROWS forces the block size (tests: CI exercises the cross-program combine).
SPLIT_SETS = False
SPLIT_ROWS: Optional[int] = None
SPLIT_MIN_ROWS = 32

# the exact reverse iterations form S and Q from one exp2 per element while the exponent
# e = 2^(x s - C - R) is bounded by 2^ONE_EXP2_MAX_SHIFT (kernels._alpha_bound; tests set it
# below 0 to run the two-exp2 form everywhere)
ONE_EXP2_MAX_SHIFT = 64.0

# the exact reverse iteration t normalizes Q_t's rows where κ3_t = α3/(α3 + ε_t) exceeds this,
# i.e. α3 > 3 ε_t, and S_t's columns where κ2_t does (and forms both in the two-exp2 form:
# kernels._q_row_sums). The rounding of those sums enters x̄ amplified by about κ/(1 - κ), <= 3
# below it. Tests set it to -1 to normalize every iteration, or 2 for none.
NORM_MIN_KAPPA = 0.75

# elements of x per thread in one [BN, BD] tile: the forward and the backward's reverse sweeps
# hold ~3 tiles live, the dx pass (and the last sweep when it writes dx: it runs at BD / 2)
# ~6; with these budgets ptxas stays below 255 registers without spills (AOT test; 32 per
# thread in the v2 forward would halve its per-chunk vector work but spills to the stack;
# 8 in the sweeps paid the per-chunk column work and reductions over half as many elements).
FWD_ELEMS_PER_THREAD = 16
SWEEP_ELEMS_PER_THREAD = 16
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


# Fewer sets than SMs (W1: 50 on 132) give an SM at most one CTA, so a CTA's warps are all
# its resident warps; at 8 warps the one-tile kernels needed 229 (forward) / 238 (backward)
# registers, and the H200 ran such kernels 2-7x slower than the peak-rate model (latency at
# ~8 warps per SM, bench/results/gpu_vs_prediction_2026-11-29.md). A dense set of at least
# FEW_SETS_MIN_ROWS rows held in one tile then runs FEW_SETS_WARPS warps at FEW_SETS_FWD_ELEMS
# / FEW_SETS_BWD_ELEMS fp32 of x a thread (with a plan gradient half as many) under the
# 65,536 / (32 · warps) registers a CTA of that size may hold (W1: 122 / 127, no spills;
# calibrated model 138 -> 76 µs forward, 135 -> 73 backward at T = 4, with 1.8x / 1.3x the
# instructions: bench/results/sinkhorn_few_sets_warps_2026-12-03.md, PREDICTED). 8 fp32 a
# thread in the forward spilled 64 B.
FEW_SETS_WARPS = 16
FEW_SETS_FWD_ELEMS = 4
FEW_SETS_BWD_ELEMS = 8 if FRUGAL_REGISTERS else 4     # (triton 3.6 spilled 24 B at 8)
FEW_SETS_MIN_ROWS = 256
# the ragged exact backward holds the streamed sweeps beside its one-tile ones: at 8 fp32 a
# thread it spilled 96 B under the cap, at 4 none (127 registers; with a plan gradient too)
FEW_SETS_RAGGED_BWD_ELEMS = 4


def few_sets_elems(fwd: bool, halve: bool = False, ragged: bool = False) -> int:
    """fp32 of x a thread in :func:`few_sets_launch`'s tiles (``halve``: see there)."""
    if fwd:
        return FEW_SETS_FWD_ELEMS
    if ragged:
        return FEW_SETS_RAGGED_BWD_ELEMS
    return FEW_SETS_BWD_ELEMS // (2 if halve else 1)


def few_sets_launch(B: int, sms: int, N: Optional[int], D: int, one_tile: bool,
                    pieces: tuple, fwd: bool, halve: bool = False,
                    paper: bool = False) -> Optional[tuple]:
    """(BN, BD, num_warps, maxnreg) of a set kernel where there are fewer sets than SMs (see
    FEW_SETS_WARPS), or None: the launcher's own layout. Dense: one-tile sets of at least
    FEW_SETS_MIN_ROWS rows; ragged (N None): the exact forward and backward with their
    one-tile classes (RAGGED_TILE_ROWS), their streamed tiles at :func:`few_sets_elems` too
    (W5, T = 4, calibrated, PREDICTED: forward 243 -> 116 registers, 104 -> 69 µs,
    bench/results/sinkhorn_ragged_tiles_2026-12-03.md; backward 201 µs streamed at 8 warps,
    155 with the sweeps, 106 at 16 warps (128 registers),
    sinkhorn_ragged_bwd_tiles_2026-12-03.md). ``halve``: the dense backward holds more per
    element (a plan gradient, or the feature spread's terms: 16 B of spills at W1 with
    FEW_SETS_BWD_ELEMS), half the fp32 a thread then."""
    if not FEW_SETS_WARPS or B >= sms or pieces[0]:
        return None
    cap = min(MAX_REGISTERS, 65536 // (32 * FEW_SETS_WARPS))
    elems = few_sets_elems(fwd, halve, N is None)
    if N is None:
        if paper or not RAGGED_TILE_ROWS:
            return None
        return (*_blocks(D, None, elems * 32 * FEW_SETS_WARPS), FEW_SETS_WARPS, cap)
    if not one_tile or N < FEW_SETS_MIN_ROWS:
        return None
    BN, BD, _ = _config(D, N, elems, FEW_SETS_WARPS)
    return BN, BD, FEW_SETS_WARPS, cap


# A ragged batch's sizes are not known on the host (no sync), so its sets are streamed: two
# passes over x per exact iteration, an online max per tile. The forward also carries the
# one-tile iteration (the backward its one-pass reverse sweep; the dx pass stays streamed)
# for sets of RAGGED_TILE_ROWS / 2 < n <= RAGGED_TILE_ROWS rows and
# (RAGGED_HALF_TILE) of RAGGED_TILE_ROWS / 4 < n <= RAGGED_TILE_ROWS / 2 in a tile half as
# tall with the same features a chunk, chosen in the kernel from the set's size (at most half
# a tile padded; 0: off; bench/results/sinkhorn_ragged_tiles_2026-12-03.md). Tests lower it
# so that small sets take them. From triton 3.9 on: 3.6's build spills 32-96 B with them (and
# 3.9's 376 B with a half tile of twice the features a chunk).
RAGGED_TILE_ROWS = ONE_TILE_MAX_N if FRUGAL_REGISTERS else 0
RAGGED_HALF_TILE = True


def ragged_tile(D: int, num_warps: int, ragged: bool, paper: bool,
                elems: int = FWD_ELEMS_PER_THREAD) -> tuple:
    """(TILE_ROWS, TILE_BD, TILE_HALF) of the one-tile iterations (forward) or reverse sweeps
    (backward) of ragged sets (see RAGGED_TILE_ROWS): a tile of ``elems`` fp32 a thread at
    ``num_warps``; (0, 1, False): none."""
    if not ragged or paper or not RAGGED_TILE_ROWS:
        return 0, 1, False
    rows = next_pow2(RAGGED_TILE_ROWS)
    bd = elems * 32 * num_warps // rows
    return rows, max(min(bd, next_pow2(D), 128), 1), RAGGED_HALF_TILE and rows >= 2


def fwd_config(D: int, N: Optional[int], num_warps: int = 4) -> tuple:
    """(BN, BD, one_tile) of the forward: a dense batch with N <= 512 puts all of a set's rows in
    one tile (one pass over x per iteration instead of two); otherwise streamed [BN, BD] tiles."""
    return _config(D, N, FWD_ELEMS_PER_THREAD, num_warps)


# the register cap passed to ptxas with the set kernels' launches (forward, backward;
# ``maxnreg``): the hardware's 255 a thread. Without it ptxas 12.9 (triton 3.9) builds some
# small one-tile configurations in 80-168 registers and keeps values on the stack (16 x 128 at
# 8 warps: 128 registers, 136 B of spills; 172 and none with the cap). Not on the dx and split
# launches: there it raised registers without removing any spill (W1's dx 125 -> 152: fewer
# resident warps in the calibrated model)
MAX_REGISTERS = 255


# dense exact sets held in three power-of-two row pieces instead of one padded tile (see
# row_pieces; False: always the padded [BN, BD] tile)
ROW_PIECES = True


def row_pieces(N: Optional[int], BN: int, one_tile: bool, paper: bool) -> tuple:
    """(P0, P1, P2): the rows of a dense exact one-tile set as three power-of-two pieces
    P0 >= P1 >= P2 >= 1 covering N with the fewest rows (49 = 32 + 16 + 1), or (0, 0, 0) for
    the single [BN, BD] tile. Taken when it evaluates at most 7/8 of the padded tile's rows
    (W2: 49 of 64; W1's 500 = 256 + 128 + 116 pads to 512 like the tile: no)."""
    return _row_pieces(N, BN, one_tile, paper, ROW_PIECES)


# The block choices are pure functions of shapes and of the module's settings (part of the
# key): cached, as each call's host front end runs them again (~10 µs each in Python).
@functools.lru_cache(maxsize=1024)
def _row_pieces(N: Optional[int], BN: int, one_tile: bool, paper: bool, enabled: bool) -> tuple:
    if not enabled or N is None or not one_tile or paper or N < 3:
        return 0, 0, 0
    pows = [2 ** k for k in range(BN.bit_length()) if 2 ** k <= BN]
    best = None
    for p0 in pows:
        for p1 in (p for p in pows if p <= p0):
            for p2 in (p for p in pows if p <= p1):
                key = (p0 + p1 + p2, -p0, -p1)
                if p0 + p1 + p2 >= N and (best is None or key < best[0]):
                    best = (key, (p0, p1, p2))
    if best is None or 8 * sum(best[1]) > 7 * BN:
        return 0, 0, 0
    return best[1]


# the row-pieces launches (W2's layout: 256 sets of 49 rows, one program each). With one program
# per set an SM gets about two CTAs, whatever their registers; under a 128-register cap two
# 8-warp CTAs fit: 16 resident warps per SM instead of 8. Where the rows are contiguous (sxn ==
# 1: W2's NCHW view) the forward holds each piece as [P / RL, BD, RL] (kernels._lanes_layout):
# RL lanes share a column, each holding P / RL of its rows, so that a column sum needs no
# shared memory; RL is the fewest lanes (1, 2 or 4) that keep a thread at <=
# PIECES_FWD_ELEMS_PER_THREAD fp32 of x, and a chunk is 32 / RL columns a warp (W2: RL = 4,
# 8 + 4 + 1 fp32 a thread, 64 features a chunk, no spills under the cap with triton 3.9; RL = 2
# spills there; bench/results/sinkhorn_pieces_lanes_2026-12-02.md). Strided rows (a 64-bit
# address per row), sets that would need more lanes (> 64 rows) and triton 3.6
# (PIECES_FWD_LANES: it spills 32-384 B with the lanes) keep one row a lane at
# PIECES_FWD_STRIDED_ELEMS_PER_THREAD, the layout until 2026-12-02;
# PIECES_FWD_ROW_LANES / PIECES_FWD_BD fix RL / BD (tests, bench/gpu_tune.py). The backward
# keeps the launcher's warps at a quarter of its elements a thread under the same cap
# (PIECES_BWD_CAPPED; W2 T=4 backward kernel 952 -> 563 µs calibrated, PREDICTED,
# bench/results/sinkhorn_pieces_bwd_cap_2026-12-01.md) where the JIT specialises a unit stride
# of x (and of the plan gradient): W2's NCHW view and contiguous sets compile without spills at
# 9-400 rows (triton 3.9), the launch with no stride of 1 spills 32 B and keeps the uncapped
# layout; from triton 3.9 on (3.6 spills 16 B at W2's NCHW view with a plan gradient). Its
# reverse sweeps in the S form take the forward's lanes (pieces_bwd_lanes,
# kernels._lanes_bwd_sweep: rows contiguous, no plan gradient), and dx then goes to its own
# launch: beside the lanes sweep, the dx pass's state spilled 96 B
# (bench/results/sinkhorn_pieces_bwd_lanes_2026-12-02.md). With triton 3.6 (the H200 image's)
# the lanes sweep builds without spills only uncapped (PIECES_BWD_CAPPED off: 246 registers, one
# CTA an SM; under the cap 152 B) and the dx launch under 128 registers (two CTAs an SM; under
# 80: 96 B): W2 T = 4 backward kernels 1,178 -> 627 + 211 µs calibrated against 3.6's [P, BD]
# sweeps with dx inside (bench/results/sinkhorn_bwd_lanes_triton36_2026-12-04.md, PREDICTED).
PIECES_NUM_WARPS = 8
PIECES_FWD_ELEMS_PER_THREAD = 16
PIECES_FWD_STRIDED_ELEMS_PER_THREAD = 4
PIECES_FWD_MAX_REGISTERS = 128
PIECES_FWD_LANES = FRUGAL_REGISTERS
PIECES_FWD_ROW_LANES = 0
PIECES_FWD_BD = 0
PIECES_BWD_CAPPED = FRUGAL_REGISTERS
PIECES_BWD_ELEMS_DIVISOR = 4
PIECES_BWD_MAX_REGISTERS = 128
PIECES_MIN_BD = 8
PIECES_BWD_LANES = True
PIECES_BWD_ROW_LANES = 0
PIECES_DX_CHUNKS = 16
PIECES_DX_MAX_REGISTERS = 80 if FRUGAL_REGISTERS else 128
# The exact forward's fixed shifts one per set where they span little (kernels._SET_SHIFT_SPAN;
# bench/results/sinkhorn_set_shift_2026-12-02.md), from triton 3.9 on: 3.6 (the H200 image's)
# spilled 8 B in W2's row-pieces forward with them
SET_SHIFT = FRUGAL_REGISTERS
# The row-pieces forward's passes over a set alternate their direction (common.snake_start:
# each starts on the feature chunks still in L2; W2 T = 4 forward HBM loads 0.622 -> 0.395 GB
# under bench/l2_reuse.py's LRU model, PREDICTED: bench/results/l2_snake_order_2026-12-03.md);
# False: every pass in one direction (bench/gpu_tune.py times both)
SNAKE_ORDER = True


def pieces_config(D: int, pieces: tuple, BD: int, nw: int, elems_per_thread: int) -> int:
    """The feature chunk BD of a row-pieces kernel: the widest (at most the tile's BD) that
    keeps ``elems_per_thread`` elements per thread with ``nw`` warps."""
    budget = elems_per_thread * 32 * nw // sum(pieces)
    return max(min(BD, next_pow2(budget + 1) // 2, next_pow2(D)), 1)


def _wide_enough(bd: int, D: int) -> bool:
    """A capped layout's feature chunk is taken only from PIECES_MIN_BD features (or all D)."""
    return bd >= min(PIECES_MIN_BD, next_pow2(D))


def _rows_a_thread(pieces: tuple, rl: int) -> int:
    """fp32 of x a thread holds of the pieces' [P / RL, BD, RL] tiles."""
    return sum(max(p // rl, 1) for p in pieces)


def _row_lanes(pieces: tuple) -> int:
    """The fewest lanes a column (1, 2 or 4) that keep a thread at <=
    PIECES_FWD_ELEMS_PER_THREAD fp32 of x, or 0 (more than 64 rows)."""
    return next((r for r in (1, 2, 4)
                 if _rows_a_thread(pieces, r) <= PIECES_FWD_ELEMS_PER_THREAD), 0)


def pieces_fwd_launch(D: int, pieces: tuple, BD: int, unit_rows: bool) -> tuple:
    """(BD, RL, UNIT_N, num_warps, maxnreg) of the row-pieces forward (see PIECES_NUM_WARPS).
    Rows contiguous (``unit_rows``: sxn == 1), PIECES_FWD_LANES and a set whose pieces fit a
    thread at <= PIECES_FWD_ELEMS_PER_THREAD rows with RL <= 4 lanes a column (<= 64 rows):
    RL lanes a column, 32 / RL columns a warp, fewer warps where D has fewer features, the rows
    addressed as immediates of the loads (UNIT_N). Otherwise RL = 1 and a chunk of
    PIECES_FWD_STRIDED_ELEMS_PER_THREAD fp32 a thread (the tile's BD at most; 4 warps at
    FWD_ELEMS_PER_THREAD where that chunk would be too narrow): a row's address is then a
    register of its own, and more rows a thread spill (as do triton 3.6's builds of the lanes
    layout, and 81 or 400 rows at RL = 8 or 32: 16 / 48 B)."""
    rl = PIECES_FWD_ROW_LANES or _row_lanes(pieces)
    if (unit_rows and PIECES_FWD_LANES and rl) or PIECES_FWD_ROW_LANES:
        if PIECES_FWD_BD:
            return PIECES_FWD_BD, rl, unit_rows, PIECES_NUM_WARPS, PIECES_FWD_MAX_REGISTERS
        bd = min(next_pow2(D), 32 // rl * PIECES_NUM_WARPS)
        nw = min(PIECES_NUM_WARPS, max(bd * rl // 32, 1))
        cap = PIECES_FWD_MAX_REGISTERS if nw == PIECES_NUM_WARPS else MAX_REGISTERS
        return bd, rl, unit_rows, nw, cap
    bd = PIECES_FWD_BD or pieces_config(D, pieces, BD, PIECES_NUM_WARPS,
                                        PIECES_FWD_STRIDED_ELEMS_PER_THREAD)
    if _wide_enough(bd, D):
        return bd, 1, False, PIECES_NUM_WARPS, PIECES_FWD_MAX_REGISTERS
    return pieces_config(D, pieces, BD, 4, FWD_ELEMS_PER_THREAD), 1, False, 4, MAX_REGISTERS


def pieces_bwd_launch(D: int, pieces: tuple, BD: int, nw: int, has_gp: bool,
                      unit_stride: bool) -> tuple:
    """(BD, num_warps, maxnreg) of the row-pieces backward: the launcher's warps at a
    PIECES_BWD_ELEMS_DIVISOR-th of its elements per thread under PIECES_BWD_MAX_REGISTERS
    (W2: 8 warps, 49 × 16 and 49 × 8 with a plan gradient), or at all of them under
    MAX_REGISTERS (49 × 64 / 49 × 32) where that chunk would be too narrow, without
    ``unit_stride`` (x, and the plan gradient if any, with a stride of 1 that the JIT
    specialises) or with PIECES_BWD_CAPPED off."""
    elems = BWD_ELEMS_PER_THREAD if has_gp else SWEEP_ELEMS_PER_THREAD
    if PIECES_BWD_CAPPED and unit_stride:
        bd = pieces_config(D, pieces, BD, nw, max(elems // PIECES_BWD_ELEMS_DIVISOR, 1))
        if _wide_enough(bd, D):
            return bd, nw, PIECES_BWD_MAX_REGISTERS
    return pieces_config(D, pieces, BD, nw, elems), nw, MAX_REGISTERS


def pieces_bwd_lanes(D: int, pieces: tuple, nw: int, unit_rows: bool, has_gp: bool) -> tuple:
    """(RL, UNIT_N, BDP) of the row-pieces backward's reverse sweeps in the S form
    (kernels._lanes_bwd_sweep): where the forward takes its lanes (rows contiguous,
    ``unit_rows``; <= 64 rows), PIECES_BWD_LANES and no plan gradient, the same RL lanes a
    column and 32 / RL columns a warp of the launch's ``nw`` warps; else (0, False, 0): [P, BD]
    tiles. dx then goes to its own launch (sinkhorn_backward), and with a plan gradient the
    kernel would still spill. PIECES_BWD_ROW_LANES fixes RL (tests, bench/gpu_tune.py)."""
    rl = PIECES_BWD_ROW_LANES or _row_lanes(pieces)
    if not ((unit_rows and PIECES_BWD_LANES and rl and not has_gp) or PIECES_BWD_ROW_LANES):
        return 0, False, 0
    return rl, unit_rows, max(min(next_pow2(D), 32 // rl * nw), 1)


def bwd_config(D: int, N: Optional[int], num_warps: int = 4, has_gp: bool = False) -> tuple:
    """(BN, BD, one_tile) of the backward (one pass per reverse iteration when one_tile). With
    a plan gradient (has_gp) the sweeps hold its tile too: 8 elements per thread then."""
    return _config(D, N, BWD_ELEMS_PER_THREAD if has_gp else SWEEP_ELEMS_PER_THREAD, num_warps)


def fused_sweep_bd(BD: int, has_gp: bool) -> int:
    """Features per chunk of the last reverse sweep when it also writes dx (~2x the live
    tiles of a sweep): 8 elements per thread, i.e. BD / 2 of the 16-element sweeps."""
    return BD if has_gp else max(BD // 2, 1)


def dx_tile(D: int, N: Optional[int], num_warps: int = 4) -> tuple:
    """(BNX, BDX) of the backward's dx pass: the tile that minimises, per element of x, the
    padded elements plus the per-row and per-column vectors it loads for every iteration t
    (3 of each: b, C, C̄ and R, R̄, a), i.e. (padded N · padded D) · (1 + 3/BDX + 3/BNX); for a
    ragged batch (N unknown) rows are taken as unpadded."""
    return _dx_tile(D, N, num_warps, BWD_ELEMS_PER_THREAD)


@functools.lru_cache(maxsize=1024)
def _dx_tile(D: int, N: Optional[int], num_warps: int, elems_per_thread: int) -> tuple:
    tile = elems_per_thread * 32 * num_warps
    best = None
    for k in range(0, 8):
        BDX = min(2 ** k, next_pow2(D))
        BNX = max(tile // BDX, 1)
        if N is not None:
            BNX = min(BNX, next_pow2(max(N, 1)))
        rows = cdiv(N, BNX) * BNX if N is not None else BNX
        cost = rows * cdiv(D, BDX) * BDX * (1 + 3 / BDX + 3 / BNX)
        if best is None or cost <= best[0]:
            best = (cost, BNX, BDX)
    return best[1], best[2]


def fuse_dx(BN: int, BD: int, BNX: int, BDX: int, one_tile: bool, paper: bool) -> bool:
    """Write dx in the last reverse sweep (exact, one tile per set) instead of a separate pass:
    that saves one read of x and recomputing ȳ_0 (2 exp2 per element), and costs the extra
    per-row / per-column vectors (3 of each per iteration) that the sweep's [BN, BD] tile loads
    per element beyond the dx pass's [BNX, BDX] tile (BD: that sweep's chunk width,
    :func:`fused_sweep_bd`): fused while 3/BD + 3/BN is at most 1.5× 3/BDX + 3/BNX (W2's
    64 × 32 (8 warps) or 64 × 16 (4): yes; W1's 512 × 4: 3.6×, no).
    Independent of T, so that every T takes the same path."""
    if not one_tile or paper:
        return False
    return 3 / BD + 3 / BN <= 1.5 * (3 / BDX + 3 / BNX)


def split_dx(x: Tensor, B: int, N: Optional[int], fused: bool) -> bool:
    """dx of a dense batch by its own launch over row blocks (kernels.sinkhorn_dx_kernel) when
    there are fewer sets than SMs: the one-program-per-set backward leaves SMs idle, and the dx
    pass is elementwise. Not when the last reverse sweep writes dx (``fused``) or for ragged
    batches (row blocks per set would need the largest set's size on the host)."""
    return N is not None and not fused and B < sm_count(x.device)


def packed_rows(N: Optional[int], BNX: int, piece_rows: int, paper: bool, sxn: int) -> int:
    """Rows per set of the dx terms' packed row vectors (kernels._pack_row_vectors), or 0 (not
    packed). Packed: dense exact sets whose samples are contiguous in x (sxn = 1, e.g. an NCHW
    map viewed as (B, HW, C)): the dx tile then holds several consecutive rows per thread, and
    their per-row vectors, masked loads one by one, cost more than the element math (W2: 8 rows
    per thread, ~10 instructions per element and iteration). Padded to a multiple of 16 that
    covers the dx tiles' rows and the row pieces, they load as whole aligned vectors."""
    if N is None or paper or sxn != 1:
        return 0
    return cdiv(max(cdiv(N, BNX) * BNX, piece_rows), 16) * 16


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


def _split_iterations(x, B, N, D, NR, strides, w, lp0, lq0, has_p0, has_q0, A, Rn, Bv, Cn, sc,
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
            x, sxb, sxn, sxd, N, D, T, NR, t, w, Bv, Pr, NB, w if sc is None else sc, BN=rows,
            BD=BD, SCALED=sc is not None, num_warps=nw)
        launcher(sinkhorn_split_a_kernel, wrap)[(B,)](
            Pr, NB, D, T, t, w, lp0, -math.log2(D), A, Rn, HAS_P0=has_p0, BJ=BJ,
            BD=min(next_pow2(D), 1024), num_warps=4)
        launcher(sinkhorn_split_row_kernel, wrap)[(B, NB)](
            x, sxb, sxn, sxd, N, D, T, NR, t, w, A, Cn, Bv, lq0, Vr, NB,
            w if sc is None else sc, HAS_Q0=has_q0, BN=rows, BD=BD, SCALED=sc is not None,
            num_warps=nw)
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


def state_numel(B: int, T: int, D: int, NR: int) -> int:
    """Size of the forward's saved state, one fp32 buffer (one allocation: each host op costs
    ~5 µs on the GPU, PERF.md): A, Rn, Bv, Cn, rfin, tot (see :func:`state_views`)."""
    return flat_numel(_state_sizes(B, T, D, NR))


def _state_sizes(B: int, T: int, D: int, NR: int) -> list:
    return [B * (T + 1) * D, B * T * D, (T + 1) * NR, T * NR, B * D, B]


def state_views(state: Tensor, B: int, T: int, D: int, NR: int) -> list:
    """A (B, T + 1, D), Rn (B, T, D), Bv (T + 1, NR), Cn (T, NR), rfin (B, D), tot (B,): flat
    (1-D) views of those row-major arrays (only kernels read them; one host op)."""
    return split_flat(state, _state_sizes(B, T, D, NR))


def param_grads_numel(B: int, T: int, D: int, NR: int, has_p0: bool, has_q0: bool) -> int:
    """Size of the backward's flat parameter-gradient output: dw (6, T), dlog_p0 (B, D) if
    has_p0, dlog_q0 (NR,) if has_q0."""
    return flat_numel(_param_grad_sizes(B, T, D, NR, has_p0, has_q0))


def _param_grad_sizes(B: int, T: int, D: int, NR: int, has_p0: bool, has_q0: bool) -> list:
    return [6 * T, B * D if has_p0 else 0, NR if has_q0 else 0]


def param_grad_views(dparams: Tensor, B: int, T: int, D: int, NR: int, has_p0: bool,
                     has_q0: bool) -> tuple:
    """(dw (6, T), dlog_p0 (B, D) or None, dlog_q0 (NR,) or None) as views of ``dparams``
    (which may hold more after them)."""
    dw, dlp0, dlq0 = split_flat(dparams, _param_grad_sizes(B, T, D, NR, has_p0, has_q0))
    return dw.view(6, T), (dlp0.view(B, D) if has_p0 else None), (dlq0 if has_q0 else None)


def sinkhorn_forward(x: Tensor, ptr: Optional[Tensor], w: Tensor, log_p0: Optional[Tensor],
                     log_q0: Optional[Tensor], paper: bool, return_plan: bool, wrap=None,
                     scale: Optional[Tensor] = None, spread: bool = False):
    """Launch the fused forward.

    Args:
        x: (B, N, D) dense with any strides, or (N_total, D) ragged with ``ptr`` (B + 1,) int64.
        w: (6, T) float32 weight table (rows of ``params.py``; a2/a3 may be +inf).
        log_p0: (B, D) normalized natural-log prior over features, or None (uniform).
        log_q0: like x[..., 0] ((B, N) or (N_total,)), normalized per set, or None (uniform).
        paper: eq. (18) Jacobi updates instead of the exact Gauss-Seidel ones.
        return_plan: also write each set's plan, normalized to mass 1, in x's layout.
        wrap: ``torch.library.wrap_triton`` inside a triton_op, else None.
        scale: (B,) fp32 feature scale σ of each set, or None: the sets are pooled as x / σ
            and y = σ · pool(x / σ) (folded into the x-scales, ``common.set_inv_scale``).
        spread: (scale None) σ is each set's feature spread (the layers' scale="auto"), formed
            by the kernel itself (STATS, one more read of x), or by
            :func:`..spread.launch.spread_forward` where split launches run the iterations.

    Returns:
        y (B, D) fp32, plan (like x, or an empty tensor), and the saved state: one flat fp32
        buffer, see :func:`state_views` (A (B, T + 1, D), Rn (B, T, D), Bv (T + 1, NR),
        Cn (T, NR), rfin (B, D), tot (B,)). Three allocations, none initialised on the host:
        the kernel writes every entry that is read later. With ``spread`` a fourth result:
        the (B, 2 + D) fp32 statistics (σ, root, feature means) the backward reads - where
        the kernel forms them, a view of the state's allocation (after it, 128-byte aligned).
    """
    B, N, D, NR, (sxb, sxn, sxd) = layout(x, ptr)
    T = w.shape[1]
    rows = split_rows(x, B, N, paper)
    stats = spread and not rows and B > 0 and D > 0
    # the statistics the kernel forms (STATS) after the state, in the same allocation: both
    # are saved for the backward
    n_state = state_numel(B, T, D, NR)
    n_stats = statistics_numel(B, D) if stats else 0      # (n_state: whole 128-byte lines)
    state = torch.empty(n_state + n_stats, device=x.device, dtype=torch.float32)
    A, Rn, Bv, Cn, rfin, tot = state_views(state, B, T, D, NR)
    y = torch.empty(B, D, device=x.device, dtype=torch.float32)
    if return_plan:
        # rows of empty sets do not exist; a dense batch has none: every entry is written
        plan = torch.empty_like(x)
        spb, spn, spd = _strides3(plan, ptr is not None)
    else:
        plan = x.new_empty(0)
        spb = spn = spd = 0
    nw = num_warps_for(x, B)
    BN, BD, one_tile = fwd_config(D, N, nw)
    P0, P1, P2 = row_pieces(N, BN, one_tile, paper)
    cap, RL, unit_n = MAX_REGISTERS, 1, False
    few = few_sets_launch(B, sm_count(x.device), N, D, one_tile, (P0, P1, P2), True,
                          paper=paper)
    if few:
        BN, BD, nw, cap = few
    if P0:
        BD, RL, unit_n, nw, cap = pieces_fwd_launch(D, (P0, P1, P2), BD, sxn == 1)
    tile_rows, tile_bd, tile_half = ragged_tile(
        D, nw, ptr is not None, paper, few_sets_elems(True) if few else FWD_ELEMS_PER_THREAD)
    lp0 = as_f32(log_p0) if log_p0 is not None else y
    lq0 = as_f32(log_q0) if log_q0 is not None else y
    saved = set_statistics(x, ptr, B, D, stats, wrap,
                           out=state[n_state:]) if spread else None
    if saved is not None:
        scale, root, mean = statistics_views(saved, B, D)
    if B > 0 and D > 0:
        if rows:
            Bv[:NR].zero_()  # b_{-1} = 0 (the forward kernel writes it after the split launches)
            _split_iterations(x, B, N, D, NR, (sxb, sxn, sxd), w, lp0, lq0, log_p0 is not None,
                              log_q0 is not None, A, Rn, Bv, Cn, scale, rows, nw, wrap)
        launcher(sinkhorn_fwd_kernel, wrap)[(B,)](
            x, ptr if ptr is not None else y, _largest_first(ptr, y), sxb, sxn, sxd,
            N if N is not None else 0, D, T, NR,
            -math.log2(D), w, lp0, lq0, A, Rn, Bv, Cn, rfin, tot, y, plan, spb, spn, spd,
            y if scale is None else scale, root if stats else y, mean if stats else y,
            RAGGED=ptr is not None, HAS_P0=log_p0 is not None, HAS_Q0=log_q0 is not None,
            PAPER=paper, RETURN_PLAN=return_plan, ONE_TILE_N=one_tile, BN=BN, BD=BD,
            MASK_N=N is None or N != BN, ITERATE=not rows, P0=P0, P1=P1, P2=P2,
            MASK_P=P0 + P1 + P2 != N, SCALED=scale is not None, STATS=stats, RL=RL,
            UNIT_N=unit_n, SET_SHIFT=SET_SHIFT, SNAKE=SNAKE_ORDER, TILE_ROWS=tile_rows,
            TILE_BD=tile_bd,
            TILE_HALF=tile_half, num_warps=nw, maxnreg=cap)
    if spread:
        return y, plan, state, saved
    return y, plan, state


def sum_weight_grad_partials(dw: Tensor, ds: Optional[Tensor], dwp: Tensor, B: int, T: int,
                             nj: int, paper: bool, tx: bool) -> None:
    """dw (6, T) [and ds (B,)] += the shares that the backward's programs stored under
    FIXED_ORDER (``torch.use_deterministic_algorithms``), summed by torch's reductions (a fixed
    order: the same bits every run) instead of atomically in whatever order the programs ran.
    ``dwp``: (B, 3, T) rows α1, α2, α3 of each set (kernels._add_weight_grad), then ``nj``
    (B, nj, T + 2) rows of the dx launch (kernels.sinkhorn_dx_kernel: x-scale term t at t - with
    ``paper`` it belongs to ε_{max(t - 1, 0)}; ``tx``: it has them - the final log P's at T,
    ds's share at T + 1). Host ops: 2 (a sum and an add), 3-4 more with a dx launch, 2 more
    with ds."""
    dw[A1:A3 + 1] += dwp[:B * 3 * T].view(B, 3, T).sum(0)     # (rows A1, A2, A3 adjacent)
    if nj == 0:
        return
    per_dx = dwp[B * 3 * T:].view(B, nj, T + 2)
    tot = per_dx.sum((0, 1))
    if tx and paper:
        dw[A1, :T - 1] += tot[1:T]
        dw[A1, 0] += tot[0]
    elif tx:
        dw[A1] += tot[:T]
    dw[A1, T - 1] += tot[T]
    if ds is not None:
        ds += per_dx[:, :, T + 1].sum(1)


def sinkhorn_backward(x: Tensor, ptr: Optional[Tensor], w: Tensor, log_p0: Optional[Tensor],
                      log_q0: Optional[Tensor], paper: bool, y: Tensor, state: Tensor,
                      grad_y: Tensor, grad_plan: Optional[Tensor], wrap=None,
                      scale: Optional[Tensor] = None, spread: Optional[Tensor] = None):
    """Launch the fused backward (arguments as :func:`sinkhorn_forward`, plus its outputs).

    Args:
        grad_y: (B, D) gradient of y. grad_plan: gradient of the plan (x's shape) or None.

    Returns:
        dx (like x, x's dtype) and dparams: one flat fp32 tensor holding dw (6, T) (zeros in the
        rows Sinkhorn does not read), dlog_p0 and dlog_q0 where the priors are given; split it
        with :func:`param_grad_views`. Three allocations (dx, dparams zeroed: the kernel adds
        each set's share; scratch) and one launch; under ``torch.use_deterministic_algorithms``
        a zeroed table of the shares and :func:`sum_weight_grad_partials`' host ops more.
        With ``scale`` (the forward's σ): dx at fixed σ, and a third output ds (B,) fp32,
        ∂/∂σ (zeroed with dparams, one allocation).
        With ``spread`` too (σ the sets' spread: the (B, 2 + D) statistics that
        :func:`sinkhorn_forward` returned with ``spread``, ``scale`` = its first B): on the
        exact one-tile path dx is the whole x̄, the path through σ included
        (kernels.sinkhorn_bwd_kernel SPREAD; its dx pass is then never fused into the last
        sweep), and ds is None; elsewhere as without.
    """
    B, N, D, NR, (sxb, sxn, sxd) = layout(x, ptr)
    T = w.shape[1]
    A, Rn, Bv, Cn, rfin, tot = state_views(state, B, T, D, NR)
    has_p0, has_q0 = log_p0 is not None, log_q0 is not None
    dx = torch.empty_like(x)
    # (with a scale, ds (B,) after them: zero for an empty set, one allocation for both)
    n_params = param_grads_numel(B, T, D, NR, has_p0, has_q0)
    dparams = torch.zeros(n_params + (B if scale is not None else 0), device=x.device,
                          dtype=torch.float32)
    dw, dlp0, dlq0 = param_grad_views(dparams, B, T, D, NR, has_p0, has_q0)
    g = as_f32(grad_y)  # (no host op when it already is contiguous fp32)
    has_gp = grad_plan is not None
    gp = grad_plan if has_gp else g
    sgb, sgn, sgd = _strides3(gp, ptr is not None) if has_gp else (0, 0, 0)
    sdb, sdn, sdd = _strides3(dx, ptr is not None)
    nw = num_warps_for(x, B)
    BN, BD, one_tile = bwd_config(D, N, nw, has_gp)
    P0, P1, P2 = row_pieces(N, BN, one_tile, paper)
    cap, RL, unit_n, BDP = MAX_REGISTERS, 0, False, 0
    if P0:
        unit = 1 in (sxn, sxd) and (not has_gp or 1 in (sgn, sgd))
        BD, nw, cap = pieces_bwd_launch(D, (P0, P1, P2), BD, nw, has_gp, unit)
        RL, unit_n, BDP = pieces_bwd_lanes(D, (P0, P1, P2), nw, sxn == 1, has_gp)
    BNX, BDX = dx_tile(D, N, nw)
    # the spread's x̄ term needs ds before dx is written: never in the last sweep then (that
    # saves one read of x; the spread pass it avoids reads and writes x̄ and reads x)
    fold = spread is not None and one_tile and not paper
    nwb = nw                                        # (the dx launch keeps nw)
    few = few_sets_launch(B, sm_count(x.device), N, D, one_tile, (P0, P1, P2), False,
                          has_gp or fold)
    if few:
        BN, BD, nwb, cap = few
    # ragged exact: the one-pass reverse sweeps of the forward's one-tile classes
    tile_rows, tile_bd, tile_half = ragged_tile(
        D, nwb, ptr is not None, paper,
        few_sets_elems(False, has_gp, ptr is not None) if few else
        BWD_ELEMS_PER_THREAD if has_gp else SWEEP_ELEMS_PER_THREAD)
    BDF = fused_sweep_bd(BD, has_gp)
    fused = not fold and fuse_dx(P0 + P1 + P2 if P0 else BN, BDF, BNX, BDX, one_tile, paper)
    # the lanes sweeps (RL) hold too many registers for the dx pass's state beside them
    # (kernels._lanes_bwd_sweep; W2: 96 B of spills under the cap): dx by its own launch
    fused = fused and not RL
    split = split_dx(x, B, N, fused) or RL > 0
    # per-set partials of the weight gradient (dk2, dk3, deps_rec, deps_x), the per-set table
    # of x-scales s_t (xs), the one-exp2 bounds (eb), the adjoints Rbar, Cbar, abar, bbar, the
    # one-exp2 row factors Rho (kernels._alpha_bound) and the dx terms' packed row vectors RV
    # (packed_rows, with the S form's bound)
    npad = packed_rows(N, BNX, P0 + P1 + P2, paper, sxn)
    slots = RV_SLOTS.value
    # (part: the six (B, T) partials; every buffer flat, only kernels read them)
    sizes = [B * T] * 6 + [B * T * D, T * NR, B * D, NR, B, T * NR, B * T * slots * npad]
    scratch = torch.empty(flat_numel(sizes), device=x.device, dtype=torch.float32)
    *part, Rbar, Cbar, abar, bbar, pg, rho, rv = split_flat(scratch, sizes)
    lp0 = as_f32(log_p0) if has_p0 else g
    lq0 = as_f32(log_q0) if has_q0 else g
    sc = (scale, dparams[n_params:]) if scale is not None else (g, g)
    st = statistics_views(spread, B, D)[1:] if fold else (g, g)   # root, mean (B, D)
    # torch.use_deterministic_algorithms: the programs store their shares of dw (and ds)
    # instead of adding them atomically, and sum_weight_grad_partials adds them up in a fixed
    # order (same bits every run); otherwise an unread placeholder
    fixed = torch.are_deterministic_algorithms_enabled()
    # the dx launch: row blocks of BNX, or with the lanes (no plan gradient) feature blocks of
    # PIECES_DX_CHUNKS chunks, every row of a set in lanes (kernels._lanes_dx), under
    # PIECES_DX_MAX_REGISTERS: three 8-warp CTAs an SM (W2: 80 registers, no spills; 167
    # uncapped under maxnreg=255, one CTA an SM; left to ptxas, 80 with 8 B on the stack), two
    # with triton 3.6 (122 registers)
    lanes_dx = RL > 0 and not has_gp and npad > 0
    DB = BDP * PIECES_DX_CHUNKS
    nj = (cdiv(D, DB) if lanes_dx else cdiv(N, BNX)) if split else 0
    tx = not (one_tile and not paper)          # the dx launch's x-scale terms (its TX)
    dwp = (torch.zeros(B * 3 * T + B * nj * (T + 2), device=x.device, dtype=torch.float32)
           if fixed else g)
    if B > 0 and D > 0:
        launcher(sinkhorn_bwd_kernel, wrap)[(B,)](
            x, ptr if ptr is not None else g, _largest_first(ptr, g), sxb, sxn, sxd, sxn,
            N if N is not None else 0, D, T, NR, -math.log2(D), w, lp0, lq0, A, Rn, Bv, Cn, rfin,
            tot, y, g, gp, sgb, sgn, sgd, dx, sdb, sdn, sdd,
            dlp0 if has_p0 else g, dlq0 if has_q0 else g, dw, part[0], part[1], part[2],
            part[3], part[4], Rbar, Cbar, abar, bbar, pg, *sc, *st, rho, part[5],
            ONE_EXP2_MAX_SHIFT, rv, npad, dwp, NORM_MIN_KAPPA, RAGGED=ptr is not None,
            HAS_P0=has_p0, HAS_Q0=has_q0, PAPER=paper, HAS_GP=has_gp, ONE_TILE_N=one_tile,
            BN=BN, BD=BD, BT=next_pow2(T), BNX=BNX, BDX=BDX, FUSE_DX=fused, SPLIT_DX=split,
            BDF=BDF, P0=P0, P1=P1, P2=P2, MASK_P=P0 + P1 + P2 != N, SCALED=scale is not None,
            SPREAD=fold, PACK=npad > 0, FIXED_ORDER=fixed, RL=RL, UNIT_N=unit_n, BDP=BDP,
            TILE_ROWS=tile_rows, TILE_BD=tile_bd, TILE_HALF=tile_half, num_warps=nwb,
            maxnreg=cap)
        if split:
            launcher(sinkhorn_dx_kernel, wrap)[(B, nj)](
                x, sxb, sxn, sxd, N, D, T, NR, w, A, Rn, Bv, Cn, rfin, tot, y, g, gp, sgb, sgn,
                sgd, dx, sdb, sdn, sdd, Rbar, Cbar, pg, dw, part[4], *sc, *st, rho, part[5],
                ONE_EXP2_MAX_SHIFT, rv, npad, dwp[B * 3 * T:] if fixed else g, PAPER=paper,
                HAS_GP=has_gp, TX=tx, BNX=BNX, BDX=BDX, BT=next_pow2(T),
                SCALED=scale is not None, SPREAD=fold, PACK=npad > 0, FIXED_ORDER=fixed,
                RL=RL if lanes_dx else 0, UNIT_N=unit_n, P0=P0, P1=P1, P2=P2,
                MASK_P=P0 + P1 + P2 != N, BDP=BDP, DB=DB, num_warps=nw,
                **(dict(maxnreg=PIECES_DX_MAX_REGISTERS) if lanes_dx else {}))
        if fixed:
            sum_weight_grad_partials(dw, sc[1] if scale is not None and not fold else None,
                                     dwp, B, T, nj, paper, tx)
    if scale is not None:
        return dx, dparams[:n_params], None if fold else sc[1]
    return dx, dparams
