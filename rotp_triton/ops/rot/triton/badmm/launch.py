"""Host side of the B-ADMM set kernels: tile sizes, the persistent grid, scratch, launchers,
and the choice between one program per set and the split schedules (:func:`forward_splits`).

Kernels and the algorithm: :mod:`.kernels` (split: :mod:`.split_kernels`,
:mod:`.split_backward_kernels`). Each launcher takes ``wrap`` (``None`` or
``torch.library.wrap_triton`` inside a custom op) and launches through ``common.launcher``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


from ..common import (FRUGAL_REGISTERS, aligned_row, as_f32, cdiv, flat_views, fp32_scratch,
                      launcher, next_pow2, sm_count)
from ..spread.launch import set_statistics, statistics_numel, statistics_views
from .kernels import (ADJ_FIRST, ADJ_S_STEP, WEIGHT_ROWS, badmm_bwd_kernel, badmm_coef_kernel,
                      badmm_dw_kernel, badmm_fwd_kernel, quad_flag)
from .split_backward_kernels import (badmm_split_bwd_cols_step_kernel,
                                     badmm_split_bwd_init_kernel, badmm_split_bwd_pass2_kernel,
                                     badmm_split_bwd_pass3_kernel,
                                     badmm_split_bwd_rows_step_kernel)
from .split_kernels import (badmm_split_column_lse_kernel, badmm_split_column_step_kernel,
                            badmm_split_init_state_kernel, badmm_split_plan_kernel,
                            badmm_split_row_lse_kernel)

__all__ = ["badmm_forward", "badmm_backward", "block_sizes", "forward_block_sizes",
           "backward_block_sizes", "rebuild_block_sizes", "unfused_backward_block_sizes",
           "history_like", "history_views", "param_grads_numel", "param_grad_views",
           "forward_replays", "forward_one_pass", "backward_fuses",
           "backward_rebuilds_zbar", "split_backward_fuses",
           "forward_splits", "backward_splits", "host_bound_splits"]


def block_sizes(n_hint: int, D: int):
    """(BN, BD, BV, num_warps): [BN, BD] tiles of <= 2048 fp32 (a few live tiles per thread at
    8 warps), BV-wide chunks for the vector steps. ``n_hint``: the set size of a dense batch
    (caps BN), 0 for a ragged one (not looked up: that would be a host sync).

    BV >= 32 · num_warps: a 1-D block narrower than the CTA is replicated across warps, and the
    vector steps update their vectors in place (load, then store the same lanes) - replicas in
    different warps would race. With BV covering every thread once, each lane has one owner."""
    BD = min(max(next_pow2(D), 16), 128)
    BN = max(16, 2048 // BD)
    if n_hint > 0:
        BN = min(BN, max(next_pow2(n_hint), 16))
    num_warps = 8 if BN * BD >= 2048 else 4
    BV = min(max(next_pow2(max(n_hint, D, 1)), 32 * num_warps), 1024)
    return BN, BD, BV, num_warps


def backward_block_sizes(n_hint: int, D: int):
    """(BN, BD, BV, num_warps) of the fused backward kernel: :func:`block_sizes`, with an
    8-warp tile halved (BD first, as long as it stays >= 32; else BN) to 4 fp32 per thread. Its
    pass 3 holds the state of two iterations, the adjoints of one and x per element (the next
    step's pass 2 rides along, :func:`.kernels._adjoint_p_step_tiles`): with 8 per thread that
    is ~770 bytes of stack spills at sm_90 (W2), with 4 none. Halving BD keeps the [BD]-vector
    loads per element the same (4 · vectors / BN bytes); smaller tiles keep their lanes. The
    unfused kernel takes these tiles too when it returns the plan's gradient (its first step
    reads log P̄): at 8 fp32 per thread that configuration sits at 255 registers and spilled
    16 bytes once the replay loaded its shifts as (R, log μ) pairs (W2, B-E)."""
    BN, BD, BV, num_warps = block_sizes(n_hint, D)
    if num_warps == 8 and BN * BD >= 2048:
        if BD >= 32:
            BD //= 2
        else:
            BN //= 2
    return BN, BD, BV, num_warps


def rebuild_block_sizes(n_hint: int, D: int):
    """(BN, BD, BV, num_warps) of the one-program-per-set backward that rebuilds Z̄' (ragged,
    unfused: :func:`backward_rebuilds_zbar`): :func:`backward_block_sizes`' half tile, with
    triton 3.6 (``common.FRUGAL_REGISTERS`` false) halved once more the same way (BD first;
    2 fp32 per thread at 8 warps). At 4 per thread 3.6's ptxas spilled in 8 of the 12
    configurations (B-E and B-Q, exact and paper, with the plan's gradient, the feature scale
    or both; 24-236 bytes at 255 registers); at 2 none do (208-242 registers, D = 128); 3.9 fits
    the half tile without spills (214-244; ``bench/results/aot_triton36_spills_2026-12-04.md``)."""
    BN, BD, BV, num_warps = backward_block_sizes(n_hint, D)
    if not FRUGAL_REGISTERS and BN * BD >= 4 * 32 * num_warps:
        if BD >= 32:
            BD //= 2
        else:
            BN //= 2
    return BN, BD, BV, num_warps


# Warps per CTA of the one-program-per-set forward on a tile of 2,048 fp32: see
# :func:`forward_block_sizes`; of the unfused backward on half that tile: see
# :func:`unfused_backward_block_sizes`.
FORWARD_WARPS = 16
BACKWARD_WARPS = 16 if FRUGAL_REGISTERS else 8
# The one-pass forward's sweeps alternate their direction (common.snake_start: each starts on
# the column blocks still in L2; W2 T = 4 B-E forward HBM loads 0.530 -> 0.161 GB under
# bench/l2_reuse.py's LRU model, PREDICTED: bench/results/l2_snake_order_2026-12-03.md), and
# the one-program-per-set backward's passes 2 and 3 go opposite ways (since 2026-12-04);
# False: every sweep in one direction (bench/gpu_tune.py times both)
SNAKE_ORDER = True


def forward_block_sizes(n_hint: int, D: int):
    """(BN, BD, BV, num_warps) of the one-program-per-set forward
    (:func:`.kernels.badmm_fwd_kernel`, both schedules): :func:`block_sizes`' tile, with a
    2,048-element tile at :data:`FORWARD_WARPS` = 16 warps (4 fp32 per thread) instead of 8.
    Its grid is one CTA per SM, so the warps per CTA are all the SM has in flight: the H200
    measured it at 8 warps (232 registers) 7.3× slower than the peak rates allow, the latency
    of its loads and dependent chains not hidden
    (``bench/results/gpu_vs_prediction_2026-11-29.md``). At 16 warps ptxas fits every
    configuration in 88-128 registers without spills (AOT test), and the calibrated model
    (``bench/latency_model.py``) predicts W2 B-E forward 1,464 -> 929 µs at T = 4 and
    14,531 -> 9,125 µs at T = 16 (a PREDICTION, within the 8-24 warps per SM the model was
    checked on; ``bench/gpu_tune.py`` times 8 and 32 beside it). The backward runs 16 warps
    on half this tile: :func:`unfused_backward_block_sizes`."""
    BN, BD, BV, num_warps = block_sizes(n_hint, D)
    if num_warps == 8 and BN * BD >= 2048 and FORWARD_WARPS != num_warps:
        num_warps = FORWARD_WARPS
        BV = min(max(BV, 32 * num_warps), 1024)       # BV >= 32 · num_warps: one owner a lane
    return BN, BD, BV, num_warps


def unfused_backward_block_sizes(n_hint: int, D: int, plan_grad: bool):
    """(BN, BD, BV, num_warps) of the unfused one-program-per-set backward of a dense batch
    (:func:`.kernels.badmm_bwd_kernel` without FUSE or ZREBUILD: W2): where
    :func:`block_sizes` gives an 8-warp tile of 2,048 fp32, :func:`backward_block_sizes`'
    half tile at :data:`BACKWARD_WARPS` = 16 warps (2 fp32 per thread). Its grid is one CTA
    per SM, like the forward's (:func:`forward_block_sizes`), so the warps per CTA are all the
    SM has in flight: at 8 (8 fp32 a thread on the full tile) ptxas took 242-255 registers,
    and 16 warps on that tile spill 8-104 bytes in some configurations (104 at W2 with the
    layers' feature scale); on the half tile every configuration fits in 103-127 registers
    without spills with triton 3.9 (AOT test and kernel report, 2026-12-04; 3.6, the H200
    image's, spills in 3 of W2's 6 configurations there, 44-112 bytes - 20-456 before the
    tile sums and column-major adjoints of 2026-12-04 - and keeps 8 warps:
    ``common.FRUGAL_REGISTERS``). The calibrated model (``bench/latency_model.py``) prices
    the doubled warps above the half tile's doubled instructions per element: W2 B-E
    backward 3,707 -> 3,260 µs at T = 4, 35,930 -> 34,595 at T = 16 (PREDICTIONS,
    ``bench/results/badmm_backward_sixteen_warps_2026-12-02.md``; ``bench/gpu_tune.py`` times
    the 8-warp layouts beside it). With BACKWARD_WARPS = 8: the layout until 2026-12-02 (the
    full tile; the half tile with the plan's gradient, whose full tile sat at 255 registers
    and spilled)."""
    BN, BD, BV, num_warps = block_sizes(n_hint, D)
    if num_warps != 8 or BN * BD < 2048:
        return BN, BD, BV, num_warps
    if BACKWARD_WARPS == 8:
        return backward_block_sizes(n_hint, D) if plan_grad else (BN, BD, BV, num_warps)
    BN, BD, BV, _ = backward_block_sizes(n_hint, D)
    return BN, BD, min(max(BV, 32 * BACKWARD_WARPS), 1024), BACKWARD_WARPS


def _num_programs(B: int, device: torch.device) -> int:
    """Persistent grid: one program per SM (a dense batch's scratch is O(programs · N · D));
    a few under the interpreter, so that the loop over sets is exercised."""
    return max(1, min(B, sm_count(device)))


class _Geometry:
    """Where each set lives: dense (B, N, D) with any strides, or ragged (rows, D) + ptr;
    and the scratch sizes (dense: per program; ragged: per row)."""

    def __init__(self, x: Tensor, ptr: Optional[Tensor]):
        self.ragged = ptr is not None
        self.D = x.shape[-1]
        if self.ragged:
            self.B = ptr.shape[0] - 1
            self.N = 0
            self.rows = x.shape[0]
            self.sxb, (self.sxn, self.sxd) = 0, x.stride()
            self.ptr = ptr
        else:
            self.B, self.N = x.shape[0], x.shape[1]
            self.rows = self.B * self.N
            self.sxb, self.sxn, self.sxd = x.stride()
            self.ptr = None
        self.blocks = block_sizes(self.N, self.D)
        # a set's size for the split heuristics: N, or the mean of a ragged batch (from shapes)
        self.set_size = self.N if not self.ragged else cdiv(self.rows, max(self.B, 1))
        self.grid = _num_programs(self.B, x.device)
        self.mat_numel = max(self.rows if self.ragged else self.grid * self.N, 1) * self.D
        self.nvec_numel = 9 * max(self.rows if self.ragged else self.grid * self.N, 1)

    def order(self, dummy: Tensor) -> Tensor:
        """Ragged: set ids by descending size (largest first, on the device - no host sync);
        dense: ``dummy`` (unused)."""
        if not self.ragged:
            return dummy
        return torch.argsort(self.ptr[1:] - self.ptr[:-1], descending=True)


def _fill_weight_table(w: Tensor, wc: Tensor, quad: int, wrap) -> Tensor:
    """Fill ``wc`` (WEIGHT_ROWS, T), a view of the saved history, with the kernels' weight
    table: w (6, T) followed by the replay's per-iteration records (α1, ρ and two reciprocals,
    :data:`.kernels.RECORDS`; :func:`.kernels.badmm_coef_kernel`: one launch in the forward,
    none in the backward)."""
    T = w.shape[1]
    BT = min(next_pow2(T), 128)
    launcher(badmm_coef_kernel, wrap)[(cdiv(T, BT),)](as_f32(w), wc, T, QUAD=quad, BT=BT)
    return wc


def _priors(dummy: Tensor, log_p0: Optional[Tensor], log_q0: Optional[Tensor]):
    """fp32 priors for the kernels; ``dummy`` (any fp32 tensor, never read) where absent."""
    lp0 = dummy if log_p0 is None else as_f32(log_p0)
    lq0 = dummy if log_q0 is None else as_f32(log_q0).reshape(-1)
    return lp0, lq0


def _scratch_shapes(geo: _Geometry, n_mats: int) -> list:
    """The fused kernels' scratch: n_mats (programs · N, D) state / adjoint matrices, 8
    D-vector slots per program (the forward uses the first 7: kernels.py, vector scratch) and
    9 N-vector slots."""
    return [geo.mat_numel] * n_mats + [geo.grid * 8 * geo.D, geo.nvec_numel]


def forward_replays(T: int, x_bytes: int, one_pass: bool = False) -> bool:
    """Forward schedule: rebuild the state from x and the vectors in every pass (REPLAY: reads
    x only; the pass of iteration t replays t elementwise iterations, ~19.4 SASS instructions
    per element each at sm_90 since the hot loop lost its divisions, selects and second vector
    loads - 155 per 8 elements in the W2 build, bench/results/badmm_2026-11-28_v3.md) or stream
    log S, Z through HBM scratch (2 x_bytes + 24 bytes per element-iteration). Predicted on
    H100 (3.0 TB/s; 2.96e13 lane-instructions/s): replaying costs ~(3.4 + 0.66 T) ps per
    element-iteration, streaming (2 x_bytes + 24) / 3 ps, so replay wins up to T ≈ 11 for fp32
    x and 9 for fp16/bf16 (was 6 / 5 at 31 instructions). Since the history's shifts are loaded
    without masks the hot loop is ~16.3 instructions per element (130 per 8); the threshold
    keeps the 19.4 estimate (T = 12, 13 not re-measured; at W2 T = 16 kernel_report prices
    the stream at 4.5 ms, the replay at ~6.6 ms: its T = 1..3 fit x 130/155). Prediction, not
    measured.
    ``one_pass``: the set kernel would run each replayed iteration as one sweep
    (:func:`forward_one_pass`: half the replays and one read of x per iteration); kernel_report
    prices its W2 B-E kernel (fp32) at 2.40 ps per element-iteration at T = 4 and 6.82 at
    T = 16, i.e. ~(0.93 + 0.368 T) ps, so it replays up to T = 26 for fp32 x and 22 for
    fp16/bf16 (W2 T = 16: 2.8 ms against the stream's 4.6 ms). Prediction, not measured. The
    calibrated model (``bench/latency_model.py``) would stream from T = 13 (W2 B-E forward at
    T = 16: 9.1 ms replayed, 7.5 ms streamed, but 13.6 GB of HBM traffic instead of 2.9 and
    twice the forward's peak memory, for 4 % of the forward+backward): kept until a GPU run
    measures both (``bench/gpu_tune.py``, "forward streams at every T")."""
    if one_pass:
        return T <= int(((2 * x_bytes + 24) / 3 - 0.93) / 0.368)
    return T <= int(((2 * x_bytes + 24) / 3 - 3.4) / 0.655)


def forward_one_pass(geo, quad: int, paper: bool):
    """Blocks (BN, BD, BV, num_warps) of the one-program-per-set forward if it can run each
    replayed iteration as one sweep over x (``ONE_PASS``: :func:`.kernels._one_pass_iteration`),
    else None. It needs every row of a set in one tile of the usual size
    (:func:`forward_block_sizes`: BN = N rounded up, BD the rest, at least 16) - so a dense
    batch - and B-E or the paper
    variant (the exact B-Q S-step needs P, hence Λ, inside the sweep); the launcher uses it
    with the replay schedule (:func:`forward_replays`). It saves one read of x and one replay
    of the state per iteration (W2: 49 rows, 64 × 32 tiles where the two passes use
    16 × 128)."""
    if geo.ragged or (quad and not paper):
        return None
    BN0, BD0, BV, num_warps = forward_block_sizes(geo.N, geo.D)
    BN = max(next_pow2(geo.N), 16)
    BD = min(BN0 * BD0 // BN, max(next_pow2(geo.D), 16))
    if BD < 16:
        return None
    return BN, BD, BV, num_warps if BN * BD >= BN0 * BD0 else min(num_warps, 4)


def backward_fuses(T: int, x_bytes: int) -> bool:
    """Backward schedule of the fused kernel: pass 3 also runs the L̄', Z̄' part of the next
    step's pass 2, which then reads x only (``FUSE``, with :func:`backward_block_sizes`' half
    tiles), or pass 2 reads L̄', Z̄' (8-warp tiles). Fitted to kernel_report's W2 predictions
    (H100; per element, fp32 x): fused (42 T - 51) bytes and (25.7 T² + 64 T) instructions,
    unfused (50 T - 56) bytes and (21.9 T² + 22 T) instructions (at T = 4 and 16: 117 / 669 and
    620 / 7,616 fused, 143 / 440 and 739 / 5,963 unfused); with 3.0 TB/s and 2.96e13
    lane-instructions/s the fused kernel is memory-bound and faster up to T = 14 (T = 4:
    1.00 vs 1.23 ms), the unfused one from T = 15 (T = 16: 6.3 vs 6.6 ms). That was the first
    model, which the H200 found 5.7× optimistic for this kernel. The calibrated model
    (``bench/latency_model.py``: at the same 8 resident warps, time ∝ bytes / 1.9e9 +
    instructions / 6.0e9 per warp) prices fused - unfused at 0.63 T² + 2.8 T + 2.6 > 0 per
    element with the fits above: the unfused schedule is faster at every T (W2 B-E fwd+bwd
    predicted 5,176 -> 4,608 µs at T = 4; at T = 16 48,035 fused vs 42,637 unfused; the
    fused variant of ``bench/gpu_tune.py`` priced by ``kernel_report.py --variant``). So FUSE
    is off; the fused schedule stays tested (``test_backward_schedules`` forces both) and
    compiled (AOT) for the GPU run that measures both. A PREDICTION, not measured."""
    return False


def backward_defers(fuse: bool, T: int, plan_grad: bool) -> bool:
    """Whether the fused backward's first reverse step leaves its L̄, Z̄, X̄ to the second to
    recompute (``DEFER``, :func:`.kernels._adjoint_p_step_tiles`): with FUSE (the second step's
    pass 2 then reads x only), T >= 2 and no plan gradient (whose log P̄ the first step reads
    from L̄'s scratch). Saves the first step's 12 bytes per element of writes and the
    second's 12 of reads (W2 T = 4: ~117 -> ~93) for one replayed iteration and the first
    step's adjoint math again in the second."""
    return fuse and T >= 2 and not plan_grad


def forward_splits(B: int, N: int, D: int, BN: int, BD: int, device: torch.device):
    """(NS, DS): row and column slices per set of the split forward (:mod:`.split_kernels`),
    (1, 1) for one program per set. Split only when there are fewer sets than SMs (W1: 50 sets
    of 500 × 100 on 132 SMs): aim at 4 programs per SM, columns first (a column slice keeps
    whole columns for R, a row slice whole rows for C), never more slices than tiles. ``N``:
    the set size, for a ragged batch the mean (rows / B: from shapes, no host sync). W2's 256
    sets already fill the machine (one ~250-register CTA per SM): the SASS model of
    bench/results/badmm_v2_2026-11-28.md predicts its 1 × 3 split no faster (0.55 vs 0.54 ms:
    4 launches per iteration instead of a loop inside one), so it is not split. Prediction,
    not measured."""
    sms = sm_count(device)
    if B >= sms:
        return 1, 1
    want = cdiv(4 * sms, max(B, 1))
    DS = min(cdiv(D, BD), want)
    NS = min(cdiv(N, BN), cdiv(want, DS))
    return NS, DS


# Where the split does not pay: its extra launches (~6 a fwd+bwd iteration at W1) each cost
# ~50-60 µs of host time on the H200's machine, fitted to its measured calls (results/
# gpu_vs_targets_2026-12-04.md: W1 B-E T=4 fwd+bwd 3.16 ms for 0.59 ms of kernels), more than
# the kernel time they save while T is small and the sets are W1-sized. PREDICTED (calibrated
# model, results/kernel_report_w1w5_badmm_t4_eager_one_program_94cacb1.md): W1 and W5 T=4
# fwd+bwd 3,098 -> 2,042 µs (kernels 534 -> 875 µs at W1 B-E); the split ahead again from
# T ~ 11, where the one-program kernels (~0.6 ms an iteration) outgrow the split's host time.
ONE_PROGRAM_MAX_ITERS = 6
ONE_PROGRAM_MAX_SET = 1 << 16                          # N·D of a set (W1: 50,000)


def host_bound_splits(splits: tuple, T: int, set_elements: int, device: torch.device) -> tuple:
    """``splits`` (of :func:`forward_splits` / :func:`backward_splits`), or (1, 1) where the
    split's launches would cost more host time than they save kernel time: a CUDA device, T ≤
    :data:`ONE_PROGRAM_MAX_ITERS` and sets of at most :data:`ONE_PROGRAM_MAX_SET` elements.
    Shapes and T decide, never the state of a CUDA-graph capture: a capture then runs the
    kernels its eager warm-up loaded (a Triton kernel's first launch loads its module, which a
    capturing stream does not permit), at the price of the one-program kernels (~0.3 ms more
    at W1 T = 4, PREDICTED) where the host time is gone. Layouts never depend on it (the
    forward's saved history, the backward's gx: :func:`_backward_geometry`), so the custom
    operator's fakes match. Not under the interpreter (CPU tensors): its tests exercise the
    split on small shapes."""
    if (splits == (1, 1) or device.type != "cuda" or T > ONE_PROGRAM_MAX_ITERS
            or set_elements > ONE_PROGRAM_MAX_SET):
        return splits
    return 1, 1


def backward_splits(B: int, N: int, D: int, BN: int, BD: int, device: torch.device):
    """(NS, DS) of the split backward (:mod:`.split_backward_kernels`), (1, 1) for one program
    per set: as the forward (fewer sets than SMs). Its adjoint scratch is (rows, D), which is
    the one-program-per-set kernel's (min(B, #SMs) · N, D) - ragged: (rows, D) - whenever it
    splits: no more memory."""
    return forward_splits(B, N, D, BN, BD, device)


def adjoints_column_major(geo: _Geometry, splits) -> bool:
    """Whether the one-program-per-set backward keeps its L̄, Z̄ scratch and gx column-major
    (``NMAJOR``, :func:`.kernels._adjoint_tile`; gx (B, N, D) with strides (N·D, 1, N)): a
    dense batch whose x steps along N faster than along D, an NCHW feature map's view (W2).
    Its x tiles load in a register layout with N fastest; row-major adjoint tiles took
    another, and ptxas moved them through shared memory each tile (pass 3 at W2: 7 tile
    exchanges, 14 barriers). x's gradient then has x's own layout (no copy where it flows back
    through the view). The split backward stays row-major."""
    return (splits == (1, 1) and not geo.ragged and geo.N > 1 and geo.D > 1
            and geo.sxn < geo.sxd)


def _grad_x_buffer(geo: _Geometry, nmajor: bool, device) -> Tensor:
    """badmm_backward's fp32 gx, unfilled: (rows, D), or (NMAJOR) (B, N, D) column-major."""
    if nmajor:
        return torch.empty(geo.B, geo.D, geo.N, device=device,
                           dtype=torch.float32).transpose(1, 2)
    return torch.empty(geo.rows, geo.D, device=device, dtype=torch.float32)


def _backward_geometry(x: Tensor, ptr: Optional[Tensor], T: int = 0) -> tuple:
    """(geometry, (NS, DS) of the split backward or (1, 1), NMAJOR) of badmm_backward; with
    ``T`` the splits :func:`host_bound_splits` keeps. NMAJOR - gx's layout, which the
    custom operator's fake (:func:`grad_x_like`, no T) must match - from the shapes alone."""
    geo = _Geometry(x, ptr)
    splits = (1, 1)
    if geo.B > 0 and geo.rows > 0 and geo.D > 0:
        BN, BD = geo.blocks[:2]
        splits = backward_splits(geo.B, geo.set_size, geo.D, BN, BD, x.device)
    nmajor = adjoints_column_major(geo, splits)
    if T:
        splits = host_bound_splits(splits, T, geo.set_size * geo.D, x.device)
    return geo, splits, nmajor


def grad_x_like(x: Tensor, ptr: Optional[Tensor]) -> Tensor:
    """An unfilled tensor shaped and laid out as the gx badmm_backward returns (its fake)."""
    geo, _splits, nmajor = _backward_geometry(x, ptr)
    return _grad_x_buffer(geo, nmajor, x.device).reshape(x.shape)


def _slice(size: int, parts: int, block: int):
    """(slice length, a multiple of ``block``; number of non-empty slices)."""
    length = cdiv(cdiv(size, parts), block) * block
    return length, cdiv(size, length)


def _split_slices(geo, NS: int, DS: int):
    """(NS, SD, DS) of a split launch: row slices per set (a dense batch gets no empty one),
    the column-slice length SD and the number of column slices."""
    if not geo.ragged:
        NS = _slice(geo.N, NS, geo.blocks[0])[1]
    SD, DS = _slice(geo.D, DS, geo.blocks[1])
    return NS, SD, DS


def _forward_split_shapes(geo, NS: int, DS: int, replay: bool) -> list:
    """Scratch of :func:`_forward_split`: column partials pm, pl, pa [B, NS, D], row partials
    qm, ql [DS, rows] and, when streaming, the state pair (rows, D)."""
    B, D, rows = geo.B, geo.D, geo.rows
    NS, _, DS = _split_slices(geo, NS, DS)
    return [B * NS * D] * 3 + [DS * rows] * 2 + ([] if replay else [rows * D] * 2)


def _forward_split(x, geo, wc, lp0, lq0, y, plan, hd, hn, NS, DS, scratch, *, quadratic,
                   paper, has_p0, has_q0, replay, wrap, scale=None):
    """The forward over B × NS × DS programs (dense or ragged): per iteration the two
    launches of :mod:`.split_kernels` (partial LSEs, each preceded by the other side's
    combine + vector step), then the last column step.
    Fills y, plan and the history hd, hn exactly like the one-program-per-set kernel.
    ``replay``: rebuild the state per tile; else stream it through a (rows, D) fp32 pair - the
    fused kernel's per-program pair has that size whenever the launcher splits (B < #SMs).
    The row slices of each set are sized on the device from N_b (no host sync). ``scale``:
    as :func:`badmm_forward`'s."""
    B, D, T, rows = geo.B, geo.D, wc.shape[1], geo.rows
    BN, BD, BV, num_warps = geo.blocks
    NS, SD, DS = _split_slices(geo, NS, DS)
    pm, pl, pa, qm, ql = scratch[:5]                    # [B, NS, D] x 3, [DS, rows] x 2
    u_p0 = -math.log(D)
    KV = hd.shape[-1]
    tiles = (B, NS, DS)
    ptr = geo.ptr if geo.ragged else y
    sets = dict(RAGGED=geo.ragged)
    flags = dict(sets, HAS_P0=has_p0, HAS_Q0=has_q0, QUAD=quadratic, KV=KV, REPLAY=replay,
                 SCALED=scale is not None)
    sc = y if scale is None else scale                  # unread without a scale
    sl, sz = (y, y) if replay else scratch[5:7]
    if not replay:
        launcher(badmm_split_init_state_kernel, wrap)[tiles](
            ptr, lp0, lq0, sl, sz, geo.N, D, NS, SD, u_p0, **sets, HAS_P0=has_p0,
            HAS_Q0=has_q0, BN=BN, BD=BD, num_warps=num_warps)
    xargs = (x, geo.sxb, geo.sxn, geo.sxd, ptr, lp0, lq0, wc, hd, hn, sl, sz, sc)
    for t in range(T):
        # the vector steps run inside the next tile launch (:mod:`.split_kernels`)
        launcher(badmm_split_column_lse_kernel, wrap)[tiles](
            *xargs, qm, ql, pm, pl, pa, geo.N, D, rows, T, t, NS, SD, DS, u_p0,
            **flags, PAPER=paper, POOL=t == T - 1, BN=BN, BD=BD, num_warps=num_warps)
        if t == T - 1:
            break
        launcher(badmm_split_row_lse_kernel, wrap)[tiles](
            *xargs, pm, pl, qm, ql, geo.N, D, rows, T, t, NS, SD, u_p0,
            **flags, PAPER=paper, BN=BN, BD=BD, num_warps=num_warps)
    launcher(badmm_split_column_step_kernel, wrap)[(B,)](
        ptr, lp0, wc, hd, pm, pl, pa, sc, y, geo.N, D, T, T - 1, NS, u_p0, **sets,
        HAS_P0=has_p0, QUAD=quadratic, PAPER=paper, KV=KV, POOL=True,
        SCALED=scale is not None, BV=BV, num_warps=num_warps)
    if plan is not None:
        launcher(badmm_split_plan_kernel, wrap)[tiles](
            *xargs, plan, geo.N, D, rows, T, NS, SD, u_p0,
            **flags, BN=BN, BD=BD, num_warps=num_warps)


def backward_rebuilds_zbar(per_row: bool, fuse: bool = False) -> bool:
    """Whether the backward rebuilds Z̄' in its passes (``ZREBUILD``,
    :func:`.kernels._rebuilt_zbar`) instead of keeping it in an fp32 scratch like L̄'s: unfused,
    where that scratch is ``per_row`` - (rows, D), as large as x: the split backward (fewer
    sets than SMs) and a ragged batch's one-program-per-set kernel; a dense batch's is per
    program (O(#SMs · N · D)). B-E's Z̄ follows the forward state and the per-step R̄ alone;
    B-Q's couples to L̄' (its P-step subtracts α1 S), so its rebuild composes each reverse
    step's 2 × 2 map of (L̄, Z̄) and also needs C̄ per step ((T, rows) floats, T / D × the
    input). It saves 1× the input of peak memory (fwd+bwd at T = 16, MEASURED on the CPU by
    ``bench/peak_memory.py``: W1 / W5 3.53 / 3.52 -> B-E 2.56 / 2.59, B-Q 2.72 / 2.71× the
    input, issue 17's ≤ 3×; ``bench/results/badmm_zbar_rebuild_2026-12-01.md``,
    ``badmm_bq_zbar_rebuild_2026-12-01.md``) and 12 bytes of HBM traffic per element and
    reverse step, for a replay continued to iteration T - 1 in pass 3 and (one program per
    set; the split backward unfused: :func:`split_backward_fuses`) pass 2, one more exp2 per
    element-iteration (B-Q two). Those passes run :func:`backward_block_sizes`' half tiles:
    at 8 fp32 a thread they sat at 227-255 registers and triton 3.6 spilled 88-408 bytes (one
    program per set, ragged, paper, with the feature scale: 2,100); with 3.6 the one-program-
    per-set kernel halves them again (:func:`rebuild_block_sizes`)."""
    return per_row and not fuse


def split_backward_fuses(rebuild: bool) -> bool:
    """Whether the split backward's pass 3 also sums the L̄', Z̄' part of the next reverse
    step's pass 2 (``FUSE``, :func:`.kernels._adjoint_p_step_tiles`), leaving that pass a
    sweep over x for the part of C̄: where it rebuilds Z̄' (``rebuild``), which pass 2 then
    skips - the replay past iteration t to T - 1 runs once per reverse step instead of twice.
    Without the rebuild the unfused pass 2 reads L̄', Z̄' on full tiles (the fused pass 3 needs
    the half tiles: :func:`backward_block_sizes`). PREDICTED (kernel report): the first model
    puts the fused schedule 5-14 % ahead (W1 / W5, T = 4 and 16); the calibrated one prices
    both alike (W1 T = 16 B-E 7.16 -> 7.11 ms) but the fused kernels 14 % above at W1 T = 4
    B-E (a host-bound call): its pass 3 holds two iterations' states through the rebuild
    (154 registers at W1, 8 warps per SM) - ``bench/results/badmm_bq_zbar_rebuild_2026-12-01.md``;
    ``bench/gpu_tune.py`` times the unfused one."""
    return rebuild


def _backward_split_shapes(geo, NS: int, DS: int, T: int, rebuild: bool, quadratic: int):
    """(zeroed, empty) scratch of :func:`_backward_split`: the pass partials gwt
    (B, T, 2, NS · DS, 2); L̄ (rows, D), Z̄ (rows, D) or (``rebuild``) the R̄ history
    (B, T, D), per-set D-vector slots (B, 7, D), N-vector slots (7, rows), τ [B, NS, D],
    σ [DS, rows], the step kernels' partials gwv (B, T, 4), pass 3's partials of ∂/∂σ
    [B, NS · DS] (read only with a feature scale) and (``rebuild``, B-Q) the C̄ history
    (T, rows) (1 float otherwise, unread)."""
    B, D, rows = geo.B, geo.D, geo.rows
    NS, _, DS = _split_slices(geo, NS, DS)
    return ([(B, T, 2, NS * DS, 2)],
            [rows * D, B * T * D if rebuild else rows * D, B * 7 * D, 7 * rows, B * NS * D,
             DS * rows, (B, T, 4), B * NS * DS, T * rows if rebuild and quadratic else 1])


def _backward_split(x, geo, wc, lp0, lq0, hd, hn, y32, gy, gplan, gx, gp0, gq0, NS, DS,
                    scratch, *, quadratic, paper, has_p0, has_q0, wrap, rebuild, fuse=False,
                    scale=None, ds=None):
    """The backward over B × NS × DS programs, dense or ragged (:mod:`.split_backward_kernels`):
    per reverse step a rows step, pass 2, a columns step and pass 3. Fills gx, gp0, gq0 (and
    with ``scale`` ds, as :func:`badmm_backward`) and returns gw (B, T, 4) like the
    one-program-per-set kernel. ``rebuild``: Z̄' rebuilt (:func:`backward_rebuilds_zbar`),
    ``fuse``: :func:`split_backward_fuses` (half tiles with either)."""
    B, D, T, rows = geo.B, geo.D, wc.shape[1], geo.rows
    BN, BD, BV, num_warps = geo.blocks
    NS, SD, DS = _split_slices(geo, NS, DS)
    (gwt,), (slb, szb, vd, vn, tau, sig, gwv, dsp, zc) = scratch  # _backward_split_shapes
    u_p0 = -math.log(D)
    KV = hd.shape[-1]
    tiles = (B, NS, DS)
    ptr = geo.ptr if geo.ragged else gx
    sets = dict(RAGGED=geo.ragged)
    flags = dict(sets, HAS_P0=has_p0, HAS_Q0=has_q0, QUAD=quadratic, PAPER=paper, KV=KV)
    scaled = dict(SCALED=scale is not None)
    sc, ds = (gx, gx) if scale is None else (scale, ds)   # unread without a scale
    if rebuild or fuse:   # szb: the R̄ history; half tiles (SD stays a multiple of BD)
        BN, BD = backward_block_sizes(geo.N, D)[:2]
    gp = gplan if gplan is not None else gx
    xargs = (x, geo.sxb, geo.sxn, geo.sxd, ptr, lp0, lq0, wc, hd, hn, vd, vn, slb, szb, zc)
    for tb in range(T - 1, -1, -1):
        launcher(badmm_split_bwd_rows_step_kernel, wrap)[(B,)](
            ptr, lq0, lp0, wc, hd, hn, vd, vn, sig, gwv, zc, geo.N, D, rows, T, tb, DS, u_p0,
            **flags, ZREBUILD=rebuild, BV=BV, num_warps=num_warps)
        has_tau = tb < T - 1 or gplan is not None
        if has_tau:
            launcher(badmm_split_bwd_pass2_kernel, wrap)[tiles](
                *xargs, sc, gp, gy, y32, tau, gwt, geo.N, D, rows, T, tb, NS, SD, DS, u_p0,
                **flags, PLAN=tb == T - 1, **scaled, GPLAN=gplan is not None, FUSE=fuse,
                ZREBUILD=rebuild, BN=BN, BD=BD, num_warps=num_warps)
        launcher(badmm_split_bwd_cols_step_kernel, wrap)[(B,)](
            ptr, lp0, wc, vd, tau, gwv, szb, geo.N, D, T, tb, NS, u_p0, int(has_tau), **sets,
            HAS_P0=has_p0, QUAD=quadratic, PAPER=paper, ZREBUILD=rebuild, BV=BV,
            num_warps=num_warps)
        launcher(badmm_split_bwd_pass3_kernel, wrap)[tiles](
            *xargs, gx, gy, y32, sig, gwt, sc, dsp, gp, tau, geo.N, D, rows, T, tb, NS, SD, DS,
            u_p0, **flags, ADJ=(ADJ_FIRST if tb == T - 1 else ADJ_S_STEP).value,
            PLAN=gplan is not None, FUSE=fuse, **scaled, ZREBUILD=rebuild, BN=BN, BD=BD,
            num_warps=num_warps)
    launcher(badmm_split_bwd_init_kernel, wrap)[(B,)](
        ptr, slb, vd, vn, gp0, gq0, sc, dsp, gy, y32, ds, geo.N, D, rows, NS * DS, **sets,
        HAS_P0=has_p0, HAS_Q0=has_q0, PAPER=paper, **scaled, BN=BN, BD=BD, BV=BV,
        num_warps=num_warps)
    return gwv, gwt                     # badmm_dw_kernel adds gwt's partials into gwv's


def _history_layout(x: Tensor, ptr: Optional[Tensor], T: int, paper: bool):
    """[(offset, shape)] of the weight table, hd and hn in the flat history, each segment
    starting on a 128-byte boundary (as separate allocations would: Triton specialises
    pointers on 16-byte alignment), and the total size."""
    KV = 4 if paper else 2
    D = x.shape[-1]
    B = x.shape[0] if ptr is None else ptr.shape[0] - 1
    rows = x.shape[0] * x.shape[1] if ptr is None else x.shape[0]
    out, o = [], 0
    for shape in ((WEIGHT_ROWS, T), (B, T, D, KV), (T, rows, KV)):
        out.append((o, shape))
        o += aligned_row(math.prod(shape))
    return out, o


def history_like(x: Tensor, ptr: Optional[Tensor], T: int, paper: bool,
                 extra: int = 0) -> Tensor:
    """Empty flat fp32 history saved for the backward (one allocation; :func:`history_views`
    splits it): the kernels' weight table (WEIGHT_ROWS, T) (:func:`_fill_weight_table`: the
    backward reuses it), and the vectors of every iteration, hd (B, T, D, KV) - R, log μ
    [, z1, unused] - and hn (T, rows, KV) - C, log η [, z2, unused] - (KV = 4 for the paper
    variant, else 2; an entry's slots adjacent, so that the replay loads R and log μ as one
    64-bit pair and forms its shift log μ - R: :func:`.kernels._hist_shift`). Sizes come from
    shapes only (no host sync). ``extra``: that many more elements at the end (the launcher's spread
    statistics, which are saved with it)."""
    return x.new_empty(_history_layout(x, ptr, T, paper)[1] + extra, dtype=torch.float32)


def history_views(h: Tensor, x: Tensor, ptr: Optional[Tensor], T: int, paper: bool):
    """(wc, hd, hn): views of the flat history ``h`` (:func:`history_like`)."""
    layout = _history_layout(x, ptr, T, paper)[0]
    return flat_views(h, [shape for _, shape in layout], [o for o, _ in layout])


def badmm_forward(x: Tensor, ptr: Optional[Tensor], w: Tensor, log_p0: Optional[Tensor],
                  log_q0: Optional[Tensor], *, quadratic: bool, paper: bool, return_plan: bool,
                  wrap=None, scale: Optional[Tensor] = None, spread: bool = False):
    """Pooled output and plan of T = w.shape[1] iterations. Returns (y (B, D) fp32, plan in
    x's layout and dtype or None, and the flat vector history for the backward:
    :func:`history_like`) [, with ``spread`` the (B, 2 + D) statistics].

    x: (B, N, D) any strides, or (rows, D) with ptr (B + 1,); w: fp32 (6, T) contiguous;
    log_p0 (B, D) / None; log_q0 (B, N) or (rows,) / None. scale: (B,) fp32 feature scale σ
    of each set, or None: the sets are pooled as x / σ and y = σ · pool(x / σ) (the kernels
    read x times 1/σ_b: :func:`.kernels.badmm_fwd_kernel` SCALED); the history is that of
    x / σ. spread (scale None): σ is each set's feature spread (the layers' scale="auto"),
    formed here: by the one-program-per-set kernel itself (STATS: one read of x, no launch of
    its own), or, for the split forward, by :func:`..spread.launch.spread_forward`; a fourth
    result is then its (B, 2 + D) fp32 statistics (σ, root, the feature means), which the
    backward's spread pass reads.
    """
    geo = _Geometry(x, ptr)
    B, D, T = geo.B, geo.D, w.shape[1]
    quadratic = quad_flag(quadratic, paper)              # the kernels' QUAD: B-Q exact is 2
    BN, BD, BV, num_warps = geo.blocks
    splits = host_bound_splits(forward_splits(B, geo.set_size, D, BN, BD, x.device), T,
                               geo.set_size * D, x.device)
    stats = spread and splits == (1, 1) and B > 0 and D > 0 and geo.rows > 0
    # the statistics the kernel forms (STATS) after the history, in its allocation: both are
    # saved for the backward
    h = history_like(x, ptr, T, paper, statistics_numel(B, D) if stats else 0)
    wc, hd, hn = history_views(h, x, ptr, T, paper)
    saved = set_statistics(x, ptr, B, D, stats, wrap,
                           out=h[h.numel() - statistics_numel(B, D):]) if spread else None
    if saved is not None:
        scale, root, mean = statistics_views(saved, B, D)
    y = torch.zeros(B, D, device=x.device, dtype=torch.float32)
    plan = torch.zeros(x.shape, device=x.device, dtype=x.dtype) if return_plan else None
    out = (y, plan, h) if not spread else (y, plan, h, saved)
    if B == 0 or geo.rows == 0 or D == 0:
        return out
    lp0, lq0 = _priors(y, log_p0, log_q0)
    one_program = splits == (1, 1)
    fits = forward_one_pass(geo, quadratic, paper) if one_program else None
    replay = forward_replays(T, x.element_size(), fits is not None)
    _fill_weight_table(w, wc, quadratic, wrap)
    if not one_program:
        _, scratch = fp32_scratch(x.device, empty=_forward_split_shapes(geo, *splits, replay))
        _forward_split(x, geo, wc, lp0, lq0, y, plan, hd, hn, *splits, scratch,
                       quadratic=quadratic, paper=paper, has_p0=log_p0 is not None,
                       has_q0=log_q0 is not None, replay=replay, wrap=wrap, scale=scale)
        return out
    _, (*mats, vd, vn) = fp32_scratch(x.device,
                                      empty=_scratch_shapes(geo, 0 if replay else 2))
    sl, sz = mats if mats else (y, y)                     # unused when replaying
    one_pass = fits if replay else None
    BN, BD, BV, num_warps = one_pass or forward_block_sizes(geo.N, D)
    launcher(badmm_fwd_kernel, wrap)[(geo.grid,)](
        x, geo.sxb, geo.sxn, geo.sxd, geo.ptr if geo.ragged else y, geo.order(y), lp0, lq0, wc,
        y if scale is None else scale, root if stats else y, mean if stats else y,
        y, plan if return_plan else y, sl, sz, vd, vn, hd, hn,
        B, geo.N, D, geo.rows, T, -math.log(D),
        RAGGED=geo.ragged, HAS_P0=log_p0 is not None, HAS_Q0=log_q0 is not None,
        QUAD=quadratic, PAPER=paper, PLAN=return_plan, REPLAY=replay, KV=hd.shape[-1],
        SCALED=scale is not None, STATS=stats, ONE_PASS=bool(one_pass), SNAKE=SNAKE_ORDER, BN=BN,
        BD=BD, BV=BV,
        num_warps=num_warps,
    )
    return out


def _param_grad_layout(B: int, T: int, D: int, rows: int):
    """[(offset, shape)] of dw (6, T), dlog_p0 (B, D), dlog_q0 (rows,) in the flat parameter
    gradient, each on a 128-byte line (a kernel argument each: an offset that follows B or T
    would compile the kernels again), and the total size (whole lines too: ∂/∂σ may follow)."""
    o1 = aligned_row(6 * T)
    o2 = o1 + aligned_row(B * D)
    return [(0, (6, T)), (o1, (B, D)), (o2, (rows,))], o2 + aligned_row(rows)


def param_grads_numel(B: int, T: int, D: int, rows: int) -> int:
    """Size of the backward's flat parameter gradient: dw (6, T), dlog_p0 (B, D), dlog_q0
    (rows,), each starting on a 128-byte line."""
    return _param_grad_layout(B, T, D, rows)[1]


def param_grad_views(dparams: Tensor, B: int, T: int, D: int, rows: int):
    """(dw (6, T), dlog_p0 (B, D), dlog_q0 (rows,)): views of the flat ``dparams``."""
    layout = _param_grad_layout(B, T, D, rows)[0]
    return tuple(flat_views(dparams, [s for _, s in layout], [o for o, _ in layout]))


def badmm_backward(x: Tensor, ptr: Optional[Tensor], w: Tensor, log_p0: Optional[Tensor],
                   log_q0: Optional[Tensor], h: Tensor, y32: Tensor, grad_y: Tensor,
                   grad_plan: Optional[Tensor], *, quadratic: bool, paper: bool, wrap=None,
                   scale: Optional[Tensor] = None):
    """Exact gradient of the T unrolled iterations. Returns fp32 (grad_x in x's shape, and one
    flat tensor of the parameter gradients, split by :func:`param_grad_views`: dw (6, T),
    grad_log_p0 (B, D), grad_log_q0 (rows,), zeros where the prior is absent). Host ops: the two
    outputs (the parameter gradients zeroed) and one scratch allocation (the split backward's
    with a fill: its pass partials).
    ``scale``: the forward's (B,) feature scale σ (y = σ · pool(x / σ), y32 that output): then
    grad_x is d loss / d(x / σ) and a third result ds (B,) fp32 is ∂ loss / ∂σ, the path
    through x / σ included (:func:`.kernels.badmm_bwd_kernel` SCALED)."""
    geo, splits, nmajor = _backward_geometry(x, ptr, w.shape[1])
    B, D, T = geo.B, geo.D, w.shape[1]
    quadratic = quad_flag(quadratic, paper)              # the kernels' QUAD: B-Q exact is 2
    dev = x.device
    w32 = as_f32(w)
    # every element is written by the kernels (the first reverse step's pass 3 - DEFER: the
    # second's - covers every row of every set; no kernel runs only when gx is empty), so no
    # fill: one full-size write less (tests: NaN-filled allocations)
    gx = _grad_x_buffer(geo, nmajor, dev)
    # (with a scale, ∂/∂σ (B,) after them: zero for an empty set, one allocation for both)
    n_params = param_grads_numel(B, T, D, geo.rows)
    dparams = torch.zeros(n_params + (B if scale is not None else 0), device=dev,
                          dtype=torch.float32)
    dw, gp0, gq0 = param_grad_views(dparams, B, T, D, geo.rows)
    ds = None if scale is None else dparams[n_params:]
    wc, hd, hn = history_views(h, x, ptr, T, paper)   # the forward's weight table too
    gwt, npart = dw, 0                  # the split backward's pass partials (none: unread)
    if B > 0 and geo.rows > 0 and D > 0:
        lp0, lq0 = _priors(gx, log_p0, log_q0)
        gplan = as_f32(grad_plan).reshape(geo.rows, D) if grad_plan is not None else None
        if splits != (1, 1):
            rebuild = backward_rebuilds_zbar(True)
            zeroed, empty = _backward_split_shapes(geo, *splits, T, rebuild, quadratic)
            zs, es = fp32_scratch(dev, zeroed=zeroed, empty=empty)
            gw, gwt = _backward_split(x, geo, wc, lp0, lq0, hd, hn, y32, as_f32(grad_y), gplan,
                                      gx, gp0, gq0, *splits, (zs, es), quadratic=quadratic,
                                      paper=paper, has_p0=log_p0 is not None,
                                      has_q0=log_q0 is not None, wrap=wrap, rebuild=rebuild,
                                      fuse=split_backward_fuses(rebuild), scale=scale, ds=ds)
            npart = gwt.shape[2] * gwt.shape[3]
        else:
            # gw (B, T, 4): per-set partials wrt (κ2, κ3, α1, ρ), every entry written by the
            # kernel; adjoints of log S, Z (ZREBUILD: log S, each program's (T, D) R̄ and,
            # B-Q, the (T, rows) C̄; 1 float otherwise, unread)
            fuse = backward_fuses(T, x.element_size())
            rebuild = backward_rebuilds_zbar(geo.ragged, fuse)
            shapes = [(B, T, 4)] + _scratch_shapes(geo, 2) + [1]
            if rebuild:
                shapes[2] = geo.grid * T * D
                shapes[-1] = T * geo.rows if quadratic else 1
            _, (gw, slb, szb, vd, vn, zc) = fp32_scratch(dev, empty=shapes)
            if rebuild:
                BN, BD, BV, num_warps = rebuild_block_sizes(geo.N, D)
            elif fuse:
                BN, BD, BV, num_warps = backward_block_sizes(geo.N, D)
            else:
                BN, BD, BV, num_warps = unfused_backward_block_sizes(geo.N, D,
                                                                     gplan is not None)
            launcher(badmm_bwd_kernel, wrap)[(geo.grid,)](
                x, geo.sxb, geo.sxn, geo.sxd, geo.ptr if geo.ragged else gx, geo.order(gx),
                lp0, lq0, wc, hd, hn, gx if scale is None else scale,
                y32, as_f32(grad_y), gplan if gplan is not None else gx,
                gx, gp0, gq0, gw, gx if ds is None else ds,
                slb, szb, zc, vd, vn,
                B, geo.N, D, geo.rows, T, -math.log(D),
                RAGGED=geo.ragged, HAS_P0=log_p0 is not None, HAS_Q0=log_q0 is not None,
                QUAD=quadratic, PAPER=paper, PLAN_GRAD=grad_plan is not None, KV=hd.shape[-1],
                FUSE=fuse, DEFER=backward_defers(fuse, T, grad_plan is not None),
                SCALED=scale is not None, ZREBUILD=rebuild, SNAKE=SNAKE_ORDER, NMAJOR=nmajor,
                BN=BN, BD=BD, BV=BV, num_warps=num_warps,
            )
    else:                               # nothing to differentiate: no set contributes
        gw, B = dw, 0
    BT = min(next_pow2(T), 128)
    launcher(badmm_dw_kernel, wrap)[(cdiv(T, BT),)](
        w32, gw, gwt, dw, B, T, npart, QUAD=quadratic, PAPER=paper, BT=BT,
        BI=min(128, max(8, 2048 // BT)))
    if scale is not None:
        return gx.reshape(x.shape), dparams, ds
    return gx.reshape(x.shape), dparams
