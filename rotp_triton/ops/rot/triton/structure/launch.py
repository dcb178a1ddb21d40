"""Host side of the α0 > 0 kernels: block sizes, the launches of one forward iteration
(``run_iterations``), the pooling launch, the reverse steps of the backward (recompute the
state entering iteration t, then its adjoint kernels) and the whole forward / backward
(``structure_forward`` / ``structure_backward``, wrapped as custom operators in ``op.py``).
Kernels: ``kernels.py``; derivations and the memory/recompute scheme:
../../../../../docs/adjoints.md.

Every per-row tensor is in the caller's row layout, (R, D) fp32 with R = B·N (dense) or the
ragged row count: no padding. Each kernel finds set b's rows on the device from ``bounds``
(ptr for a ragged batch, N·arange(B + 1) for a dense one); sizes and scratch come from shapes
only (the host never reads ptr). An empty set has no rows: it pools to 0.
Launches per iteration (each step kernel computes its structure product in-program first):
B-E/B-Q 2 (P-step, S-step), S 1; backward: ⌈√T⌉-spaced checkpoints, adjoints fused likewise,
except that with fewer sets than SMs each adjoint kernel is followed by the (n_b, D) stage of
its structure product's adjoint on J programs per set (``adjoint_row_programs``); the
pooling's adjoint runs in the backward's factors launch.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
from torch import Tensor

from ...params import kappa
from ..common import (aligned_row, as_f32, cdiv, fp32_scratch, launcher, next_pow2,
                      sm_count)
from .kernels import (badmm_p_step_bwd_kernel, badmm_p_step_kernel, badmm_s_step_bwd_kernel,
                      badmm_s_step_kernel, pool_from_log_plan_kernel, sigma_adjoint_kernel,
                      sigma_adjoint_rows_kernel, sigma_product_kernel,
                      sinkhorn_prox_step_bwd_kernel, sinkhorn_prox_step_kernel,
                      structure_factors_bwd_kernel, structure_factors_kernel)

# The structure product's dots: "ieee" (fp32 FMA, the default: kernels == reference to 1e-4),
# "tf32" (tensor cores, 10-bit mantissa: expected ~1e-3 relative error of y, not yet measured
# on a GPU) or "tensor-core" (tf32 for fp32/fp16 inputs, bf16 dots for bf16 inputs: expected
# ~1e-2). Set here or with ROTP_STRUCTURE_DOT; docs/adjoints.md states the accuracy.
DOT_PRECISION = os.environ.get("ROTP_STRUCTURE_DOT", "ieee")
DOT_PRECISIONS = ("ieee", "tf32", "tensor-core")


def dot_precision(dtype: torch.dtype) -> str:
    """The ``tl.dot`` precision constexpr for inputs of ``dtype`` under DOT_PRECISION."""
    if DOT_PRECISION not in DOT_PRECISIONS:
        raise ValueError(f"ROTP_STRUCTURE_DOT / DOT_PRECISION must be one of {DOT_PRECISIONS}, "
                         f"got {DOT_PRECISION!r}")
    if DOT_PRECISION == "tensor-core":
        return "bf16" if dtype == torch.bfloat16 else "tf32"
    return DOT_PRECISION

# How kernels are launched: directly, or through torch.library.wrap_triton while the body of
# one of the custom operators of op.py runs (so torch.compile can trace the launches).
_LAUNCH_WRAP = [None]


def _wrap(kernel):
    return launcher(kernel, _LAUNCH_WRAP[0])


# ============================================================================================
# host launchers
# ============================================================================================
# Warps of the one-program-per-set kernels. Their grid is one CTA per set (W1: 50 CTAs on 50
# SMs), so a CTA's warps are all its SM has in flight; the calibrated model
# (bench/latency_model.py: a resident warp sustains a fitted rate of traffic and instructions)
# prices the W1 α0 = 0.1 T = 4 B-E forward+backward at 18.0 ms with 8 warps and 10.3 ms with 16
# (square GEMM tiles, 2048-element row tiles; a PREDICTION, not measured). At 16 warps a thread
# has 128 registers: ptxas fits every kernel with no spills but one adjoint's 32 B (W1 sizes,
# test_aot_sm90), where wide GEMM tiles spill 8-252 B and 4096-element row tiles 8-168 B.
PER_SET_WARPS = 16


def row_block(BD: int) -> int:
    """Rows per chunk of the per-set kernels: about 2048 fp32 values per [BN, BD] tile (4 per
    thread at :data:`PER_SET_WARPS`)."""
    return max(1, min(64, 2048 // BD))


def mm_tile(D: int) -> int:
    """Output tile of the in-program GEMMs (``_program_mm``), from the feature count only:
    next_power_of_2(D) within [16, 64] (16: the smallest ``tl.dot`` tile; 64: a [64, 64] fp32
    accumulator over the CTA's warps). The same under the interpreter as on a GPU, so the
    interpreter's traffic counts are the GPU binary's."""
    return max(16, min(64, next_pow2(D)))


# Wide GEMM tiles (BW up to 128): a GEMM whose output has D (or n_b < D) rows or columns reads
# its (n_b, D) operand, and its exp, once instead of ⌈D/64⌉ times (W1: x's and the state's
# re-reads halved). At 8 warps, with the K step of the FMA dots at 8 (mm_k_step), ptxas fit
# them (the adjoints spilled < 0.5 KiB); at PER_SET_WARPS = 16 they spill 16-252 B in the
# products and 8-528 B in the step kernels and adjoints, so they are off by default
# (ROTP_STRUCTURE_WIDE_TILES=1 turns them on). Square tiles read the operands twice at W1 (the
# step kernels' bytes +13 %) for twice the warps: W1 α0 = 0.1 T = 4 forward+backward predicted
# 18.0 -> 10.3 ms (calibrated), where 16 warps with wide tiles would be 9.1 ms with spills.
WIDE_GEMM_TILES = os.environ.get("ROTP_STRUCTURE_WIDE_TILES", "0") == "1"


def mm_wide(D: int, precision: str = "ieee") -> int:
    """The wide side of a GEMM tile (BW): with WIDE_GEMM_TILES next_power_of_2(D) up to 128, so
    that a GEMM whose output has D (or n_b < D) rows or columns reads its (n_b, D) operand once;
    otherwise BT (square tiles). Tensor-core dots keep square tiles (wide, the tf32 adjoint
    spilled 1.4 KiB; square, none), and so do FMA dots where the K step is 16 (triton 3.6:
    wide, up to 2.3 KiB spilled in the step adjoints)."""
    if not WIDE_GEMM_TILES or precision != "ieee" or mm_k_step(D, precision) > 8:
        return mm_tile(D)
    return max(mm_tile(D), min(128, next_pow2(D)))


def _min_fp32_dot_k() -> int:
    """The smallest K that the installed triton's NVIDIA backend accepts in a tl.dot of fp32
    operands: 8 in triton 3.9, 16 in 3.6 (whose compiler rejects K = 8: the H200 run of
    2026-11-29, bench/results/gpu_nvidia-h200_2026-11-29.log)."""
    try:
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import min_dot_size
        return int(min_dot_size(GPUTarget("cuda", 90, 32))(tl.float32, tl.float32)[2])
    except Exception:  # pragma: no cover - another backend layout: the common minimum
        return 16


MIN_FP32_DOT_K = _min_fp32_dot_k()


def mm_k_step(D: int, precision: str) -> int:
    """The K step (BK) of the in-program GEMMs. fp32 FMA dots ("ieee") hold a [BM, BK] and a
    [BK, BN] operand slice per thread besides the accumulator: BK = 8 (tl.dot's smallest K
    from triton 3.9; 16 where the installed triton needs it) keeps a [128, 64] tile in
    registers (BK = 64 spilled 9.5 KiB per adjoint kernel at W1). Tensor-core dots need
    K >= 16: BK = 16 (BK = 64 spilled 7.5 KiB in the tf32 adjoint)."""
    return max(8, MIN_FP32_DOT_K) if precision == "ieee" else 16


# Programs per set of the structure adjoint's (n_b, D) stage (sigma_adjoint_rows_kernel); None:
# adjoint_row_programs decides (tests set an int to force the split on small shapes).
ADJOINT_ROW_PROGRAMS: Optional[int] = None


def adjoint_row_programs(B: int, R: int, D: int, device: torch.device) -> int:
    """J, the programs per set of the adjoint's (n_b, D) stage: 1 keeps it inside the step
    adjoint kernel (one program per set); J > 1 gives it its own (B, J) launch, whose programs
    take every J-th output row tile of a set. Only with fewer sets than SMs (W1: 50 sets, 132
    SMs): J = ⌊#SMs / B⌋, one wave of ~250-register CTAs (one per SM: ⌈#SMs / B⌉ would start a
    second wave for a few programs), at most the set's row tiles (mean set size R / B: from
    shapes, no host read of ptr)."""
    if ADJOINT_ROW_PROGRAMS is not None:
        return max(1, int(ADJOINT_ROW_PROGRAMS))
    sms = sm_count(device)
    if B == 0 or B >= sms:
        return 1
    return max(1, min(sms // B, cdiv(cdiv(R, B), mm_tile(D))))


def gram_slot(B: int, R: int, D: int, N: Optional[int]) -> int:
    """Elements per set of the Gram matrix and of each (S, S) product scratch
    (kernels._gram_block), S = min(n_b, D): a dense batch's S² (W1: 100² against the 500·100 of
    a row-layout block, 5× less), a ragged batch's D² where B·D² < R·D; 0 otherwise, i.e. the
    row layout (set b's block at bounds[b]·D, S² <= n_b·D). From shapes only."""
    if N is not None:
        return min(N, D) ** 2
    return D * D if B * D * D < R * D else 0


def gram_elems(B: int, R: int, D: int, slot: int) -> int:
    """Elements of one (S, S) matrix per set in the layout of ``slot`` (gram_slot)."""
    return B * slot if slot > 0 else R * D


def mm_meta(D: int, precision: str = "ieee") -> dict:
    """The tile constexprs of the in-program GEMMs (BT, BW, BK) for D features."""
    return dict(zip(("BT", "BW", "BK"), _mm_meta(D, precision, WIDE_GEMM_TILES)))


# every launch of a call asks for them (~20 per B-ADMM forward+backward): cached, the module's
# setting in the key
@functools.lru_cache(maxsize=256)
def _mm_meta(D: int, precision: str, wide: bool) -> tuple:
    return mm_tile(D), mm_wide(D, precision), mm_k_step(D, precision)


class Factors:
    """The per-set structure factors and the smaller Gram matrix of a batch, row layout.

    xc, xt: (R, D) fp32 (DESIGN §2, scaled so Σ1 = xcᵀxc, Σ2 = xt xtᵀ); gram: set b's (S, S)
    matrix, S = min(n_b, D) (Σ1 when n_b >= D, else Σ2), in slots of ``slot`` elements per set
    (gram_slot; 0: at bounds[b]·D). Scratch of the in-program products is laid out the same
    way, k matrices per set, so it is sized from shapes.
    """

    def __init__(self, xc: Tensor, xt: Tensor, gram: Tensor, bounds: Tensor, slot: int,
                 precision: str = "ieee", scratch: Optional[dict] = None):
        self.xc, self.xt, self.gram, self.bounds = xc, xt, gram, bounds
        self.slot = slot
        self.precision = precision          # tl.dot precision, see dot_precision
        self.B = bounds.shape[0] - 1
        self.D = xc.shape[1]
        self._scratch = dict(scratch or {})     # k -> k (S, S) per set: views carved by setup
        # programs per set of the adjoint's (n_b, D) stage (1: inside the step adjoint kernel)
        self.row_programs = adjoint_row_programs(self.B, xc.shape[0], self.D, xc.device)

    def scratch(self, k: int) -> Tensor:
        """k (S, S) matrices per set, fp32, allocated once per Factors."""
        if k not in self._scratch:
            self._scratch[k] = self.xc.new_empty(k * self.gram.numel())
        return self._scratch[k]

    def apply(self, m: Tensor, *, exp: bool = False, out: Optional[Tensor] = None) -> Tensor:
        """Σ2 m Σ1 (paper Σ1 M Σ2) per set for m (R, D); with ``exp`` m holds log M.
        One launch."""
        out = torch.empty_like(m) if out is None else out
        if self.B > 0:
            _wrap(sigma_product_kernel)[(self.B,)](
                m, self.xc, self.xt, self.gram, self.scratch(2), self.slot, out, self.bounds,
                self.D,
                EXP_M=exp, **self.meta(),
                num_warps=PER_SET_WARPS)
        return out

    def adjoint(self, log_m: Tensor, g: Tensor, dxc: Tensor, dxt: Tensor, dm: Tensor) -> None:
        """Adjoint of out = Σ2 exp(log_m) Σ1 for the upstream gradient g (R, D):
        dm += exp(log_m) ⊙ ∂L/∂M (= ∂L/∂log_m), dxc / dxt += ∂L/∂xc, ∂L/∂xt. One launch
        (two with the split (n_b, D) stage, adjoint_rows)."""
        if self.B > 0:
            _wrap(sigma_adjoint_kernel)[(self.B,)](
                log_m, g, self.xc, self.xt, self.gram, self.scratch(5), self.slot, dxc, dxt, dm,
                self.bounds, self.D, **self.meta(), ROWS_HERE=self.rows_here,
                num_warps=PER_SET_WARPS)
            self.adjoint_rows(log_m, g, dxc, dxt, dm)

    @property
    def rows_here(self) -> bool:
        """ROWS_HERE of the step adjoint kernels: their epilogue does the whole adjoint."""
        return self.row_programs == 1

    def adjoint_rows(self, log_m: Tensor, g: Tensor, dxc: Tensor, dxt: Tensor,
                     dm: Tensor) -> None:
        """After a step adjoint kernel launched with ROWS_HERE=False: the (n_b, D) stage of its
        structure product's adjoint (same log_m, g, dm as its epilogue's), on B × J programs.
        One launch; none when rows_here."""
        if self.B > 0 and not self.rows_here:
            _wrap(sigma_adjoint_rows_kernel)[(self.B, self.row_programs)](
                log_m, g, self.xc, self.xt, self.scratch(5), self.slot, dxc, dxt, dm, self.bounds,
                self.D, **self.meta(), num_warps=PER_SET_WARPS)

    def step_args(self) -> tuple:
        """The trailing tensor arguments of a step kernel whose prologue computes its
        structure product in-program: (xc, xt, gram, scratch, slot)."""
        return (self.xc, self.xt, self.gram, self.scratch(2), self.slot)

    def adjoint_args(self, dxc: Tensor, dxt: Tensor) -> tuple:
        """Same for an adjoint kernel whose epilogue is the structure product's adjoint:
        (xc, xt, gram, scratch, slot, dxc, dxt)."""
        return (self.xc, self.xt, self.gram, self.scratch(5), self.slot, dxc, dxt)

    def meta(self) -> dict:
        """The constexprs of the in-program structure product."""
        return dict(PRECISION=self.precision, **mm_meta(self.D, self.precision))


class _Problem:
    """Everything a forward needs, in the row layout (module docstring)."""

    def __init__(self, x32, bounds, log_p0, log_q0, log_s0, w, method, variant, T, K,
                 scratch: Optional[dict] = None, N: Optional[int] = None):
        self.x32, self.bounds = x32, bounds
        self.scratch = scratch if scratch is not None else {}   # setup's carved views by name
        self.N = N                                  # rows per set of a dense batch, else None
        self.log_p0, self.log_q0, self.log_s0 = log_p0, log_q0, log_s0
        self.w = w                                  # dict of contiguous fp32 (T,) tensors
        self.method, self.variant, self.T, self.K = method, variant, T, K
        self.R, self.D = x32.shape
        self.B = bounds.shape[0] - 1
        self.BD = next_pow2(self.D)
        self.BN = row_block(self.BD)
        self._set_of_row = None

    @property
    def set_of_row(self) -> Tensor:
        """(R,) int64: the set of each row, for the torch segment sums of the backward."""
        if self._set_of_row is None:
            rows = torch.arange(self.R, device=self.x32.device)
            self._set_of_row = torch.searchsorted(self.bounds[1:].contiguous(), rows,
                                                  right=True)
        return self._set_of_row

    def set_sum(self, v: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """Σ over each set's rows of v (R, ...) -> (B, ...); ``out``: a zeroed (B, ...) tensor
        to write it to. One host op for a dense batch (a sum over its N axis)."""
        if self.N is not None:
            return torch.sum(v.view(self.B, self.N, *v.shape[1:]), 1, out=out)
        out = v.new_zeros((self.B,) + tuple(v.shape[1:])) if out is None else out
        return out.index_add_(0, self.set_of_row, v)


def _fp32(v: Tensor, device) -> Tensor:
    """v detached as contiguous fp32 on ``device``; no op when it already is."""
    v = v.detach()
    if v.dtype == torch.float32 and v.device == device and v.is_contiguous():
        return v
    return v.to(device=device, dtype=torch.float32).contiguous()


def _scratch_layout(R: int, D: int, B: int, G: int, T: int, K: int, method: str,
                    variant: str, backward: bool, p0: bool, gy: bool, x32: bool) -> tuple:
    """(zeroed, empty, shared): name -> shape of everything a forward (``backward`` False)
    or a backward allocates for itself, carved by setup from one fp32 allocation
    (common.fp32_scratch: two host ops); ``shared``: name -> the name whose storage it reuses
    (never live at the same time). Not here, as they leave the launcher: the forward's
    log P_T (B-E/B-Q: run_iterations' log_p; S: log_s0), y, the plan; the backward's outputs.
    ``G``: elements of one (S, S) matrix per set (gram_elems). ``p0``: log p0 is uniform
    (carved, then filled); ``gy``: gy is None (a zero (B, D)); ``x32``: x needs an fp32 row
    copy (else the kernels read x itself: it is fp32 and contiguous).
    Names without "_" are the reverse pass's _Buffers (any not here is allocated when asked)."""
    rd, vd, vn = (R, D), (B, D), (R,)
    sink, paper = method == "sinkhorn", variant == "paper"
    zeroed, empty = {}, {}
    empty.update(_xc=rd, _xt=rd, _gram=(G,), _lq0=vn, _fac2=(2 * G,), _run_sig=rd,
                 _run_cbuf=vn)
    if x32:
        empty["_x32"] = rd
    if p0:
        empty["_lp0"] = vd
    if sink:
        empty.update(_run_y0=rd, _run_bvec=vn)
        if backward:
            empty["_log_s0"] = rd           # the forward's is its log P_T: an output
    else:
        empty["_log_s0"] = rd
        zeroed["_z0"] = rd
        if paper:
            zeroed.update(_z1_0=vd, _z2_0=vn)
    if not backward:
        return zeroed, empty, {}
    # the structure products' scratch: the step kernels' two (S, S) per set (_fac2) are the
    # first two of the adjoint kernels' five (launches on one stream never overlap; setup)
    del empty["_fac2"]
    empty["_fac5"] = (5 * G,)
    if gy:
        zeroed["_gy"] = vd
    # ∂L/∂xc, ∂L/∂xt; the adjoint kernels' per-set weight partials; ∂L/∂log p0, ∂L/∂log q0
    # per iteration (row t: iteration t's, row T: the initial state's), summed at the end;
    # rows padded to whole lines (aligned_row: each is a kernel argument of its own)
    zeroed.update(_g_xc=rd, _g_xt=rd, _wp=(T, B, 8) if sink else (2, T, B, 8),
                  _acc_lp0=(T + 1, aligned_row(B * D)), _acc_lq0=(T + 1, aligned_row(R)))
    # Reverse step t writes its gradients to the buffers of parity t % 2 and reads step
    # t + 1's, so a buffer of parity T % 2 is free until step T - 2 writes it: ∂L/∂log P_T
    # (setup's _g_lp_T, read by step T - 1 only) waits there (B-E/B-Q: in step T - 1's own
    # g_l, which it writes last) and so does the zero gradient of the final state (B-E/B-Q).
    # What run_iterations uses (_run_*: the checkpoint and transient runs) is dead whenever it
    # runs, before the re-runs or the reverse step it serves; so is the log P it writes.
    # The initial state (setup's _log_s0, _z0), which the checkpoints are run from, waits in
    # buffers that the reverse pass reuses and is rebuilt for the last segment
    # (_rebuild_initial_state) where _initial_state_reused says so.
    now, nxt = T % 2, (T - 1) % 2
    if sink:
        # sinkhorn_reverse_step's log P after step t is written and never read: into gy0,
        # which its adjoint kernel writes next
        empty.update(sig=rd, y0=rd, g_lp_par0=rd, g_lp_par1=rd, g_sig=rd, gy0=rd, bvec=vn,
                     c=vn, gb=vn, gc=vn, h_r=(B, K, D), h_a=(B, K, D), h_c=(K, R), h_b=(K, R))
        del empty["_run_sig"], empty["_run_y0"]
        shared = {"_g_lp_T": f"g_lp_par{now}", "_run_sig": "sig", "_run_y0": "y0",
                  "log_p_next": "gy0"}
        if _initial_state_reused(method, T):
            del empty["_log_s0"]
            shared["_log_s0"] = "g_sig"        # until reverse step T - 1 writes it
        return zeroed, empty, shared
    # log S, Z of the states run_iterations makes: the checkpoints (_add_sqrt_checkpoints)
    # and, with segments longer than 2, _badmm_rerun_pair's transient one
    k = math.ceil(math.sqrt(T))
    for slot in [f"ck{i}" for i in range(len(range(k, T, k)))] + (["tr"] if k > 2 else []):
        empty.update({f"_{slot}_log_s": rd, f"_{slot}_z": rd})
    if paper:
        zeroed.update(_g_log_mu=vd, _g_log_eta=vn, _g_z1=vd, _g_z2=vn, g_lq0_paper=vn)
        empty["g_lp0"] = vd
    # what badmm_rerun keeps of two consecutive iterations (slots 0, 1); the Z after the later
    # one is never read (its reverse step starts from the earlier one's): badmm_rerun writes
    # it to g_sig, as it does the Z after a lone re-run in slot 0
    for slot in range(min(T, 2)):
        empty.update({f"{k}{slot}": rd for k in ("sig_s", "log_p", "sig_p", "ls_new")})
        empty.update({f"{k}{slot}": vd for k in ("r", "mu")})
        empty.update({f"{k}{slot}": vn for k in ("c", "eta")})
    empty["z_new0"] = rd
    # the reverse step's gradients (badmm_reverse_step): g_z_par*, g_l_par* by parity;
    # g_sig, g_lp, g_p are a step's transients (the P-step adjoint's ∂L/∂Σ(S) reuses g_sig)
    zeroed.update({f"g_z_par{now}": rd, f"g_l_par{now}": rd})
    empty.update({f"g_z_par{nxt}": rd, f"g_l_par{nxt}": rd, "g_sig": rd, "g_lp": rd,
                  "g_p": rd})
    empty["gvec"] = vn
    del empty["_run_sig"]
    shared = {"_g_log_s": f"g_l_par{now}", "_g_z": f"g_z_par{now}", "_g_lp_T": f"g_l_par{nxt}",
              "_run_lp": "g_p", "_run_sig": "sig_p0"}
    if _initial_state_reused(method, T):
        # in re-run slot 1 (the checkpoint runs do not touch it), Z zeroed there
        del empty["_log_s0"], zeroed["_z0"]
        zeroed["sig_s1"] = empty.pop("sig_s1")
        shared.update(_log_s0="ls_new1", _z0="sig_s1")
    return zeroed, empty, shared


def _initial_state_reused(method: str, T: int) -> bool:
    """Whether the backward keeps the initial state in buffers that the reverse pass reuses
    (_scratch_layout) and rebuilds it for the last segment (_rebuild_initial_state): S from
    T = 2 (at T = 1 the one reverse step reads log P⁰ while it writes g_sig, where it waits),
    B-E/B-Q where there is a checkpoint (T >= 3) whose buffers, free by then, take it."""
    return T >= 2 if method == "sinkhorn" else T > math.ceil(math.sqrt(T))


def _carve(device, zeroed: dict, empty: dict, shared: dict) -> dict:
    """name -> view of one fp32 allocation (fp32_scratch), the ``zeroed`` ones cleared;
    each name of ``shared`` is the view of the name it maps to."""
    z, e = fp32_scratch(device, zeroed=list(zeroed.values()), empty=list(empty.values()))
    views = dict(zip([*zeroed, *empty], [*z, *e]))
    views.update({k: views[v] for k, v in shared.items()})
    return views


def setup(x: Tensor, ptr: Optional[Tensor], log_p0: Optional[Tensor],
          log_q0: Optional[Tensor], weights: dict, method: str, variant: str, K: int,
          pool_grad: Optional[tuple] = None):
    """(problem, factors): one launch computes x's fp32 copy, the factors, the Gram matrices,
    log q0 and the initial state log(p0 q0ᵀ) (structure_factors_kernel).

    pool_grad (the backward's setup): (log P_T (R, D) fp32, gy (B, D) or None, gplan (x's
    shape) or None); the same launch then also pulls the pooling's gradient back (its
    POOL_BWD epilogue): problem.g_lp_T = ∂L/∂log P_T and problem.g_x = the pooling's ∂L/∂x
    (R, D) fp32, which the backward accumulates x's other direct terms into.

    Everything the forward or backward needs for itself is carved from one allocation
    (_scratch_layout), kept by name in problem.scratch."""
    dense = x.dim() == 3
    dev = x.device
    D = x.shape[-1]
    N = None
    if dense:
        B, N = x.shape[0], x.shape[1]
        bounds = (torch.arange(0, (B + 1) * N, N, device=dev, dtype=torch.int64) if N > 0
                  else torch.zeros(B + 1, device=dev, dtype=torch.int64))
        s_xb, s_xn, s_xd = x.stride()
    else:
        bounds = ptr if ptr.dtype == torch.int64 and ptr.device == dev and ptr.is_contiguous() \
            else ptr.to(device=dev, dtype=torch.int64).contiguous()
        B = bounds.shape[0] - 1
        s_xb, (s_xn, s_xd) = 0, x.stride()
    R = x.shape[0] * x.shape[1] if dense else x.shape[0]
    precision = dot_precision(x.dtype)
    f32 = dict(device=dev, dtype=torch.float32)
    w = {k: _fp32(v, dev) for k, v in weights.items()}
    T = int(w["a1"].shape[0])
    backward = pool_grad is not None
    slot = gram_slot(B, R, D, N)
    # x itself is the kernels' row layout when it is fp32 and contiguous: no copy
    copy_x = not (x.dtype == torch.float32 and x.is_contiguous())
    sc = _carve(dev, *_scratch_layout(R, D, B, gram_elems(B, R, D, slot), T, K, method,
                                       variant, backward, log_p0 is None,
                                       backward and pool_grad[1] is None, copy_x))
    if log_p0 is None:
        lp0 = sc["_lp0"].fill_(-math.log(max(D, 1)))
    else:
        lp0 = _fp32(log_p0, dev)
    q_in = None if log_q0 is None else log_q0.detach().reshape(R).contiguous()
    # x's fp32 copy, the factors and the Gram matrices; the initial state (S's forward runs
    # in it and returns it as log P_T, which the backward keeps: its own allocation there)
    x32 = sc["_x32"] if copy_x else x.detach().view(R, D)
    xc, xt, gram, lq0 = sc["_xc"], sc["_xt"], sc["_gram"], sc["_lq0"]
    log_s0 = sc["_log_s0"] if "_log_s0" in sc else torch.empty(R, D, **f32)
    pool = dict(log_p_T=x32, gy=x32, gplan=x32, g_lp_T=x32, g_x=x32)   # unused without POOL_BWD
    if backward:
        log_p_T, gy, gplan = pool_grad
        if gy is None:
            gy = sc["_gy"]
        elif gy.dtype == torch.float32:      # one host op at most (as_f32 issues two)
            gy = gy.detach().contiguous()
        else:
            gy = as_f32(gy)
        pool = dict(log_p_T=log_p_T, gy=gy,
                    gplan=x32 if gplan is None else gplan.reshape(R, D).contiguous(),
                    g_lp_T=sc["_g_lp_T"], g_x=torch.zeros(R, D, **f32))
    if B > 0:
        BD = next_pow2(D)
        _wrap(structure_factors_kernel)[(B,)](
            x, bounds, lp0, q_in if q_in is not None else lq0, x32, xc, xt, gram, slot, lq0,
            log_s0, s_xb, s_xn, s_xd, D, *pool.values(), DENSE_X=dense, WRITE_X32=copy_x,
            HAS_Q0=q_in is not None,
            PRECISION=precision, **mm_meta(D, precision), BN=row_block(BD), BD=BD,
            POOL_BWD=backward,
            HAS_GPLAN=backward and pool_grad[2] is not None,
            num_warps=PER_SET_WARPS)
    pb = _Problem(x32, bounds, lp0, lq0, log_s0, w, method, variant, T, K, scratch=sc, N=N)
    pb.g_lp_T, pb.g_x = pool["g_lp_T"], pool["g_x"]
    fac_scratch = {k: sc[f"_fac{k}"] for k in (2, 5) if f"_fac{k}" in sc}
    if 5 in fac_scratch:
        fac_scratch[2] = fac_scratch[5][:2 * gram.numel()]
    return pb, Factors(xc, xt, gram, bounds, slot, precision, fac_scratch)


def init_state(pb: _Problem) -> dict:
    """State before iteration 0: log S = log P = log(p0 q0ᵀ), Z = 0 (+ the paper's duals)."""
    st = {"log_s": pb.log_s0}
    if pb.method != "sinkhorn":
        sc = pb.scratch     # setup's zeroed views (one launcher calls init_state once)
        st["z"] = sc["_z0"] if "_z0" in sc else torch.zeros_like(pb.log_s0)
        if pb.variant == "paper":
            st["log_mu"] = pb.log_p0.clone()
            st["log_eta"] = pb.log_q0.clone()
            st["z1"] = sc["_z1_0"] if "_z1_0" in sc else torch.zeros_like(pb.log_p0)
            st["z2"] = sc["_z2_0"] if "_z2_0" in sc else torch.zeros_like(pb.log_q0)
    return st


def run_iterations(pb: _Problem, fac: Factors, st: dict, t0: int, t1: int,
                   inplace: bool = False, slot: Optional[str] = None) -> dict:
    """Iterations t0..t1-1 with the Triton kernels, on a copy of ``st`` (on ``st`` itself with
    ``inplace``: the forward, whose initial state nobody needs afterwards).

    For B-E/B-Q the key ``log_p`` holds the P of the last iteration run; for S ``log_s``
    holds log P (the proximal state).

    ``slot`` (B-E/B-Q, not inplace; the backward's runs): the new state's log S and Z are
    setup's views ``_{slot}_log_s``, ``_{slot}_z`` (_scratch_layout) instead of copies (the
    first P-step reads ``st``'s log S, the S-steps write log S before reading it), and the
    returned state has no log P (written to the transient ``_run_lp``).
    """
    log_s_in = st["log_s"]
    transient_lp = None
    if inplace:
        st = dict(st)
    elif slot is not None and t1 > t0 and f"_{slot}_log_s" in pb.scratch:
        sc = pb.scratch
        new = {k: v.clone() for k, v in st.items() if k not in ("log_s", "log_p", "z")}
        new["log_s"] = sc[f"_{slot}_log_s"]
        new["z"] = sc[f"_{slot}_z"].copy_(st["z"])
        st, transient_lp = new, sc["_run_lp"]
    else:
        st = {k: v.clone() for k, v in st.items()}
        log_s_in = st["log_s"]
    w = pb.w
    B, R, D = pb.B, pb.R, pb.D
    sig = _scratch(pb, "_run_sig", pb.x32)     # internal to this call: setup's views
    sigma = fac.step_args()       # each step kernel computes its Σ2 exp(·) Σ1 into sig first
    paper = pb.variant == "paper"
    if pb.method == "sinkhorn":
        y0 = _scratch(pb, "_run_y0", pb.x32)
        bvec = _scratch(pb, "_run_bvec", pb.log_q0)
        cbuf = _scratch(pb, "_run_cbuf", pb.log_q0)
        for t in range(t0, t1):
            _wrap(sinkhorn_prox_step_kernel)[(B,)](
                pb.x32, st["log_s"], sig, y0, bvec, cbuf, pb.log_p0, pb.log_q0, bvec, bvec,
                bvec, bvec, pb.bounds, w["a0"], w["a1"], w["a2"], w["a3"], w["tau"], t, pb.K,
                R, D, *sigma, PAPER=paper, SAVE=False, BN=pb.BN, BD=pb.BD,
                num_warps=PER_SET_WARPS, **fac.meta())
        return st
    quad = pb.method == "badmm-q"
    log_p = st.get("log_p") if transient_lp is None else transient_lp
    if log_p is None:
        log_p = torch.empty_like(pb.x32)    # the forward's log P_T, or a state's: its own
    cbuf = _scratch(pb, "_run_cbuf", pb.log_q0)
    dummy = pb.log_p0
    for t in range(t0, t1):
        _wrap(badmm_p_step_kernel)[(B,)](
            pb.x32, log_s_in if t == t0 else st["log_s"], st["z"], sig, log_p, pb.log_p0,
            st.get("log_mu", dummy), dummy, dummy, pb.bounds, w["a0"], w["a1"], w["a2"],
            w["rho"], t, D, *sigma,
            QUADRATIC=quad, PAPER=paper, SAVE=0, BN=pb.BN, BD=pb.BD,
            num_warps=PER_SET_WARPS, **fac.meta())
        _wrap(badmm_s_step_kernel)[(B,)](
            log_p, st["z"], sig, st["log_s"], cbuf, pb.log_q0, st.get("log_eta", dummy),
            st.get("z2", dummy), pb.log_p0, st.get("log_mu", dummy), st.get("z1", dummy),
            dummy, pb.bounds, w["a0"], w["a1"], w["a2"], w["a3"], w["rho"], t, D, *sigma,
            QUADRATIC=quad, PAPER=paper, SAVE=0, BN=pb.BN, BD=pb.BD,
            num_warps=PER_SET_WARPS, **fac.meta())
    if transient_lp is None:
        st["log_p"] = log_p
    return st


def _scratch(pb: _Problem, name: str, like: Tensor) -> Tensor:
    """setup's carved view ``name``, or a new tensor like ``like`` where setup made none."""
    v = pb.scratch.get(name)
    return torch.empty_like(like) if v is None else v


def final_log_p(pb: _Problem, st: dict) -> Tensor:
    return st["log_s"] if pb.method == "sinkhorn" else st["log_p"]


def pool_launch(pb: _Problem, log_p: Tensor, out_dtype, plan: Optional[Tensor]) -> Tensor:
    """y (B, D) in out_dtype; with ``plan`` (R, D contiguous) also the normalized plan."""
    y = torch.empty(pb.B, pb.D, device=log_p.device, dtype=out_dtype)
    if pb.B > 0:
        _wrap(pool_from_log_plan_kernel)[(pb.B,)](
            log_p, pb.x32, y, plan if plan is not None else y, pb.bounds, pb.D,
            WRITE_PLAN=plan is not None, BN=pb.BN, BD=pb.BD, num_warps=PER_SET_WARPS)
    return y


# ============================================================================================
# backward: re-run an iteration saving what its adjoint needs, then the adjoint kernels
# ============================================================================================
_FLT_MAX = torch.finfo(torch.float32).max


def _dkappa_parts(alpha: Tensor, w: Tensor):
    """(∂κ/∂α, -∂κ/∂w) = (w, α) / (α + w)² of κ(α, w) = α/(α + w), both 0 at α = +inf (α is
    clamped to the largest float: (α + w)² = inf, w/inf = α/inf = 0; a finite α's values are
    unchanged). Five host ops for any shape (α2, α3 stacked: both at once)."""
    a = alpha.clamp(max=_FLT_MAX)
    den = (a + w) ** 2
    return w / den, a / den


def _dkappa(alpha: Tensor, w: Tensor):
    """(∂κ/∂α, ∂κ/∂w) of κ(α, w) = α/(α + w); both 0 at α = +inf."""
    k_a, nk_w = _dkappa_parts(alpha, w)
    return k_a, -nk_w


class _Buffers:
    """Scratch of the reverse pass, allocated once per backward and reused by every reverse
    step (each kernel overwrites every row of what it writes: the row layout has no padding),
    so a step issues launches, not allocations. ``get(name, like)``: an uninitialised tensor
    shaped like ``like``; ``zeros(name, like)``: one that stays zero (never written)."""

    def __init__(self, carved: Optional[dict] = None):
        # setup's views (_scratch_layout: the names without "_"); others allocated when asked
        self._d = {k: v for k, v in (carved or {}).items() if not k.startswith("_")}

    def get(self, name: str, like: Tensor, shape: Optional[tuple] = None) -> Tensor:
        """(``shape``: that shape instead of like's, like's dtype and device.)"""
        if name not in self._d:
            self._d[name] = (torch.empty_like(like) if shape is None
                             else like.new_empty(shape))
        return self._d[name]

    def zeros(self, name: str, like: Tensor) -> Tensor:
        if name not in self._d:
            self._d[name] = torch.zeros_like(like)
        return self._d[name]


def badmm_rerun(pb: _Problem, fac: Factors, st: dict, t: int, bufs: _Buffers,
                slot: int, last: bool) -> dict:
    """Re-run B-E/B-Q iteration t from ``st`` (the state entering t, not modified), keeping
    what its adjoint needs: R, log μ, C, log η, Σ(S), Σ(P), log P and the new state, in the
    buffers of ``slot`` (0 or 1: two consecutive iterations can be kept at once). Returns them
    with ``st`` and ``next`` (the state entering t + 1, which a re-run of t + 1 starts from).
    ``last``: no re-run starts from this one's state, whose Z no adjoint reads: it goes to the
    transient g_sig (dead until the reverse step's S-step adjoint writes it)."""
    B, D = pb.B, pb.D
    w = pb.w
    paper = pb.variant == "paper"
    kw = dict(QUADRATIC=pb.method == "badmm-q", PAPER=paper, BN=pb.BN, BD=pb.BD,
              num_warps=PER_SET_WARPS, **fac.meta())
    dummy = pb.log_p0
    sigma = fac.step_args()
    rows, vec_d, vec_n = pb.x32, pb.log_p0, pb.log_q0
    sv = {k: bufs.get(f"{k}{slot}", rows) for k in ("sig_s", "log_p", "sig_p", "ls_new")}
    sv["z_new"] = bufs.get("g_sig" if last else f"z_new{slot}", rows)
    sv.update({k: bufs.get(f"{k}{slot}", vec_d) for k in ("r", "mu")})
    sv.update({k: bufs.get(f"{k}{slot}", vec_n) for k in ("c", "eta")})
    _wrap(badmm_p_step_kernel)[(B,)](pb.x32, st["log_s"], st["z"], sv["sig_s"], sv["log_p"],
                                     pb.log_p0, st.get("log_mu", dummy), sv["r"], sv["mu"],
                                     pb.bounds, w["a0"], w["a1"], w["a2"], w["rho"], t, D,
                                     *sigma, SAVE=1, **kw)
    sv["z_new"].copy_(st["z"])
    new = {k: st[k].clone() for k in ("log_mu", "log_eta", "z1", "z2")} if paper else {}
    _wrap(badmm_s_step_kernel)[(B,)](sv["log_p"], sv["z_new"], sv["sig_p"], sv["ls_new"],
                                     sv["c"], pb.log_q0, new.get("log_eta", dummy),
                                     new.get("z2", dummy), pb.log_p0, new.get("log_mu", dummy),
                                     new.get("z1", dummy), sv["eta"], pb.bounds, w["a0"],
                                     w["a1"], w["a2"], w["a3"], w["rho"], t, D, *sigma,
                                     SAVE=1, **kw)
    sv["st"], sv["new"] = st, new
    sv["next"] = {"log_s": sv["ls_new"], "z": sv["z_new"], **new}
    return sv


def badmm_reverse_step(pb: _Problem, fac: Factors, sv: dict, t: int, g: dict,
                       g_lp_ext: Optional[Tensor], acc: dict, bufs: _Buffers,
                       wp_s: Tensor, wp_p: Tensor) -> dict:
    """Pull the gradient of the state after B-E/B-Q iteration t (``g``: log_s, z and, paper,
    log_mu, log_eta, z1, z2) and ∂L/∂log P_{t+1} (``g_lp_ext``, last iteration only) back to the
    state entering t, in Triton, from what ``badmm_rerun`` kept of iteration t (``sv``): the
    two adjoint kernels and the two structure-product adjoints. The paper variant's
    eq. (26)-(28) updates are O(N + D) vectors, differentiated here with torch.
    Accumulates into acc["x"], acc["xc"], acc["xt"], acc["lp0"], acc["lq0"] (and, paper, the
    weights of those updates); the adjoint kernels' per-set partial sums of the weights go to
    wp_s, wp_p ((B, 8) each), reduced for all t at once by ``_badmm_weight_grads``.
    """
    B, D = pb.B, pb.D
    w = pb.w
    quad = pb.method == "badmm-q"
    paper = pb.variant == "paper"
    kw = dict(QUADRATIC=quad, PAPER=paper, BN=pb.BN, BD=pb.BD, num_warps=PER_SET_WARPS,
              **fac.meta())
    dummy = pb.log_p0
    adj = fac.adjoint_args(acc["xc"], acc["xt"])
    rows, vec_d, vec_n = pb.x32, pb.log_p0, pb.log_q0
    st, new = sv["st"], sv["new"]
    sig_s, log_p, sig_p, ls_new = sv["sig_s"], sv["log_p"], sv["sig_p"], sv["ls_new"]
    r, mu, cbuf, eta = sv["r"], sv["mu"], sv["c"], sv["eta"]
    row_x = col_x = dummy
    g_out = {}
    if paper:
        # eqs. (26)-(28): log μ' = lognorm((1-κ2)(log μ - z1/ρ) + κ2 log p0),
        # z1' = z1 + ρ(μ' - Σ_n P), and the same over n for log η', z2' with S'
        rho = w["rho"][t]
        k2 = kappa(w["a2"][t], rho)
        k3 = kappa(w["a3"][t], rho)
        k2_a, k2_w = _dkappa(w["a2"][t], rho)
        k3_a, k3_w = _dkappa(w["a3"][t], rho)
        mu_n, eta_n = torch.exp(new["log_mu"]), torch.exp(new["log_eta"])
        g_mu_tot = g["log_mu"] + rho * g["z1"] * mu_n                         # [B, D]
        g_u = g_mu_tot - mu_n * g_mu_tot.sum(1, keepdim=True)
        g_eta_tot = g["log_eta"] + rho * g["z2"] * eta_n                      # [R]
        g_v = g_eta_tot - eta_n * pb.set_sum(g_eta_tot)[pb.set_of_row]
        g_rho = ((g["z1"] * (new["z1"] - st["z1"])).sum()
                 + (g["z2"] * (new["z2"] - st["z2"])).sum()) / rho
        g_rho = g_rho + ((1 - k2) * g_u * st["z1"]).sum() / rho ** 2 \
            + ((1 - k3) * g_v * st["z2"]).sum() / rho ** 2
        g_k2 = (g_u * (pb.log_p0 - (st["log_mu"] - st["z1"] / rho))).sum()
        g_k3 = (g_v * (pb.log_q0 - (st["log_eta"] - st["z2"] / rho))).sum()
        acc["lp0"][t].add_(k2 * g_u)
        acc["lq0"][t].add_(k3 * g_v)
        g_out = {"log_mu": (1 - k2) * g_u, "log_eta": (1 - k3) * g_v,
                 "z1": g["z1"] - (1 - k2) * g_u / rho, "z2": g["z2"] - (1 - k3) * g_v / rho}
        acc["rho"][t] += g_rho + g_k2 * k2_w + g_k3 * k3_w
        acc["a2"][t] += g_k2 * k2_a
        acc["a3"][t] += g_k3 * k3_a
        row_x = (-rho * g["z2"]).contiguous()          # ∂/∂S'_nd of z2' = ... - ρ Σ_d S'_nd
        col_x = (-rho * g["z1"]).contiguous()          # ∂/∂P_nd of z1' = ... - ρ Σ_n P_nd
    # adjoint of the S-step and the dual update; g_z_out and g_l alternate between two
    # buffers (the next step reads this step's while writing its own)
    par = t % 2
    g_z_out, g_l = bufs.get(f"g_z_par{par}", rows), bufs.get(f"g_l_par{par}", rows)
    g_sig, g_lp, g_p = (bufs.get(k, rows) for k in ("g_sig", "g_lp", "g_p"))
    # (not paper: the kernels write ∂L/∂log p0, ∂L/∂log q0 of iteration t to row t of acc's)
    g_lq0 = bufs.zeros("g_lq0_paper", vec_n) if paper else acc["lq0"][t]
    gvec = bufs.get("gvec", vec_n)
    _wrap(badmm_s_step_bwd_kernel)[(B,)](g["log_s"], g["z"], log_p, st["z"], sig_p, ls_new,
                                         cbuf, eta, pb.log_q0, g_z_out, g_sig, g_lp, g_p,
                                         g_lq0, gvec, row_x, col_x, wp_s, pb.bounds, w["a0"],
                                         w["a1"], w["a3"], w["rho"], t, D, *adj,
                                         ROWS_HERE=fac.rows_here, **kw)   # + the Σ(P) path
    fac.adjoint_rows(log_p, g_sig, acc["xc"], acc["xt"], g_lp)
    if g_lp_ext is not None:
        g_lp += g_lp_ext
    # adjoint of the P-step
    g_lp0 = bufs.get("g_lp0", vec_d) if paper else acc["lp0"][t]
    g_sig_s = g_sig      # the S-step adjoint's ∂L/∂Σ(P) is consumed: its buffer is free
    _wrap(badmm_p_step_bwd_kernel)[(B,)](g_lp, g_p, log_p, st["log_s"], st["z"], pb.x32, sig_s,
                                         r, mu, pb.log_p0, g_l, acc["x"], g_z_out, g_sig_s,
                                         g_lp0, wp_p, pb.bounds,
                                         w["a0"], w["a1"], w["a2"], w["rho"], t, D, *adj,
                                         ROWS_HERE=fac.rows_here, **kw)   # + the Σ(S) path
    fac.adjoint_rows(st["log_s"], g_sig_s, acc["xc"], acc["xt"], g_l)
    if paper:
        g_out["log_mu"] = g_out["log_mu"] + g_lp0        # P-step: log P = Y + log μ - R
        g_out["log_eta"] = g_out["log_eta"] + gvec       # S-step: log S' = Y' + log η - C
    g_out["log_s"] = g_l
    g_out["z"] = g_z_out
    return g_out


def _badmm_weight_grads(pb: _Problem, wp: Tensor, acc: dict) -> None:
    """The (T,) weight gradients from the adjoint kernels' per-set partial sums of every
    iteration, wp (2, T, B, 8): [0] p-step (∂/∂α0, ∂/∂α1 direct, ∂/∂w_P, ∂/∂κ2), [1] s-step
    (∂/∂α0, ∂/∂α1 direct, ∂/∂ρ direct, ∂/∂κ3, ∂/∂w), with the κ derivatives, for all t at once
    and both κ together (acc["table"]: the (6, T) gradient whose rows acc[name] are)."""
    w = pb.w
    quad = pb.method == "badmm-q"
    paper = pb.variant == "paper"
    s = wp.sum(2)                                                 # [2, T, 8]
    pp, ps = s[0].unbind(1), s[1].unbind(1)                       # [T] each
    rho, a1 = w["rho"], w["a1"]
    table = acc["table"]
    # the steps' weights (kernels' _p_step_weight, _s_step_weight): B-Q exact divides both by
    # ρ + α1 (stable majorized step), so ∂/∂w counts for α1 as well as ρ there
    p_has_a1 = quad and not paper
    s_has_a1 = not (quad and paper)
    table[0:2].add_(s[:, :, 0:2].sum(0).t())                         # α0, α1 direct: both steps
    g_wp, g_w = pp[2], ps[4]
    if not paper:   # κ2 = κ(α2, w_P), κ3 = κ(α3, w) (paper: log μ, log η are states)
        w_p = rho + a1 if p_has_a1 else rho
        w_s = (w_p if p_has_a1 else a1 + rho) if s_has_a1 else rho
        k_a, nk_w = _dkappa_parts(torch.stack((w["a2"], w["a3"])),
                                  w_p if w_p is w_s else torch.stack((w_p, w_s)))
        table[2:4].addcmul_(s[:, :, 3], k_a)                     # α2 (κ2: p), α3 (κ3: s)
        g_wp = torch.addcmul(g_wp, pp[3], nk_w[0], value=-1)
        g_w = torch.addcmul(g_w, ps[3], nk_w[1], value=-1)
    if p_has_a1:
        acc["a1"] += g_wp
    if s_has_a1:
        acc["a1"] += g_w
    acc["rho"].add_(ps[2]).add_(g_wp).add_(g_w)


def sinkhorn_reverse_step(pb: _Problem, fac: Factors, st: dict, t: int, g_out: Tensor,
                          acc: dict, bufs: _Buffers, wp: Tensor) -> Tensor:
    """Pull ∂L/∂log P_{t+1} back through the proximal S step t (K inner iterations), in
    Triton: re-run step t saving Y0 and the inner history, then the adjoint kernel and the
    structure-product adjoint. Returns ∂L/∂log P_t; accumulates like badmm_reverse_step (the
    weights' per-set partial sums into wp (B, 8), reduced by ``_sinkhorn_weight_grads``).
    """
    B, R, D, K = pb.B, pb.R, pb.D, pb.K
    w = pb.w
    kw = dict(BN=pb.BN, BD=pb.BD, num_warps=PER_SET_WARPS, **fac.meta())
    rows, vec_n = pb.x32, pb.log_q0
    log_p = st["log_s"]
    sig, y0 = bufs.get("sig", rows), bufs.get("y0", rows)  # Σ(P_t) from the step's prologue
    bvec, cbuf = bufs.get("bvec", vec_n), bufs.get("c", vec_n)
    h_r, h_a = (bufs.get(k, rows, (B, K, D)) for k in ("h_r", "h_a"))   # R_k, a_k per set
    h_c, h_b = (bufs.get(k, rows, (K, R)) for k in ("h_c", "h_b"))      # C_k, b_k per row
    out = bufs.get("log_p_next", rows)
    out.copy_(log_p)
    _wrap(sinkhorn_prox_step_kernel)[(B,)](pb.x32, out, sig, y0, bvec, cbuf, pb.log_p0,
                                           pb.log_q0, h_r, h_a, h_c, h_b, pb.bounds, w["a0"],
                                           w["a1"], w["a2"], w["a3"], w["tau"], t, K, R, D,
                                           *fac.step_args(), PAPER=pb.variant == "paper",
                                           SAVE=True, **kw)
    g_lp = bufs.get(f"g_lp_par{t % 2}", rows)   # read by the next step while it writes its own
    g_lp0, g_lq0 = acc["lp0"][t], acc["lq0"][t]     # rows t of the per-iteration sums
    g_sig = bufs.get("g_sig", rows)
    _wrap(sinkhorn_prox_step_bwd_kernel)[(B,)](g_out, pb.x32, log_p, sig, y0,
                                               bufs.get("gy0", rows), h_r, h_a, h_c, h_b,
                                               bufs.get("gb", vec_n), bufs.get("gc", vec_n),
                                               pb.log_p0, pb.log_q0, g_lp, acc["x"],
                                               g_sig, g_lp0, g_lq0, wp,
                                               pb.bounds, w["a0"], w["a1"], w["a2"], w["a3"],
                                               w["tau"], t, K, R, D,
                                               *fac.adjoint_args(acc["xc"], acc["xt"]),
                                               PAPER=pb.variant == "paper",
                                               ROWS_HERE=fac.rows_here, **kw)  # + Σ path
    fac.adjoint_rows(log_p, g_sig, acc["xc"], acc["xt"], g_lp)
    return g_lp


def _sinkhorn_weight_grads(pb: _Problem, wp: Tensor, acc: dict) -> None:
    """The (T,) weight gradients of S from the per-set partial sums wp (T, B, 8) = (∂/∂α0,
    ∂/∂τ direct, ∂/∂ε direct, ∂/∂κ2, ∂/∂κ3) of every step, ε = α1 + τ, for all t at once
    (both κ together; acc["table"]: the (6, T) gradient whose rows acc[name] are)."""
    w = pb.w
    s = wp.sum(1)                                                 # [T, 8]
    ps = s.unbind(1)
    eps = w["a1"] + w["tau"]
    k_a, nk_w = _dkappa_parts(torch.stack((w["a2"], w["a3"])), eps)
    g_eps = torch.addcmul(ps[2], ps[3], nk_w[0], value=-1).addcmul_(ps[4], nk_w[1], value=-1)
    acc["a0"] += ps[0]
    acc["tau"].add_(ps[1]).add_(g_eps)
    acc["a1"] += g_eps
    acc["table"][2:4].addcmul_(s[:, 3:5].t(), k_a)                 # α2 (κ2), α3 (κ3)


_WEIGHTS = ("a0", "a1", "a2", "a3", "rho", "tau")


def _initial_state_grads(pb: _Problem, g_state: dict, grads: list) -> None:
    """Pull the gradient of the initial state to the priors: log S⁰ = log p0 + log q0;
    paper B-ADMM also starts from log μ⁰ = log p0, log η⁰ = log q0. Into row T of grads[3],
    grads[4] (zeroed, (T + 1, B, D) and (T + 1, R): one row per iteration, then this)."""
    g0 = g_state["log_s"]
    g_lp0, g_lq0 = grads[3][pb.T], grads[4][pb.T]
    pb.set_sum(g0, out=g_lp0)
    torch.sum(g0, 1, out=g_lq0)
    if "log_mu" in g_state:
        g_lp0 += g_state["log_mu"]
        g_lq0 += g_state["log_eta"]


def _rebuild_initial_state(pb: _Problem, st0: dict) -> dict:
    """The state before iteration 0 (init_state's ``st0``) again, for the reverse pass's
    last segment where _initial_state_reused: log S⁰ = log p0 + log q0 (the same fp32 sum as
    structure_factors_kernel's) into the first checkpoint's buffers (B-E/B-Q, free once its
    segment is done; Z = 0 there) or a new tensor (S: the freed checkpoints' memory). The
    paper variant's vectors were never overwritten."""
    sc, st = pb.scratch, dict(st0)
    if pb.method == "sinkhorn":
        log_s = torch.empty_like(pb.x32)
    else:
        log_s = sc["_ck0_log_s"]
        st["z"] = sc["_ck0_z"].zero_()
    if pb.N is not None:
        torch.add(pb.log_p0.view(pb.B, 1, pb.D), pb.log_q0.view(pb.B, pb.N, 1),
                  out=log_s.view(pb.B, pb.N, pb.D))
    else:
        torch.index_select(pb.log_p0, 0, pb.set_of_row, out=log_s).add_(pb.log_q0[:, None])
    st["log_s"] = log_s
    return st


def _add_sqrt_checkpoints(pb: _Problem, fac: Factors, ckpts: dict) -> None:
    """States entering iterations k, 2k, ... (k = ⌈√T⌉) from one forward sweep, so that the
    reverse pass recomputes at most k - 1 iterations per step: T (sweep) + T(k - 1)/2
    iterations in all instead of T(T - 1)/2, for ⌈√T⌉ - 1 transient states."""
    k = math.ceil(math.sqrt(pb.T))
    t_prev = max(ckpts)
    for i, t1 in enumerate(range(k, pb.T, k)):
        if t1 > t_prev:
            ckpts[t1] = run_iterations(pb, fac, ckpts[t_prev], t_prev, t1, slot=f"ck{i}")
            t_prev = t1


def _badmm_rerun_pair(pb: _Problem, fac: Factors, ckpts: dict, t: int,
                      bufs: _Buffers) -> dict:
    """{t - 1: kept, t: kept} (just {t: kept} when t starts its checkpoint segment): re-run
    iterations t - 1 and t with ``badmm_rerun`` from the state entering t - 1 (rebuilt from the
    segment's checkpoint), so that the reverse pass recomputes the state entering t - 1 once
    for two reverse steps: (m + 1)²/4 iterations per segment of m instead of m(m + 1)/2, for
    one more slot of kept buffers (5 (R, D))."""
    t_ck = max(k for k in ckpts if k <= t)
    t0 = max(t - 1, t_ck)
    # (slot "tr": the previous pair's transient state is no longer needed)
    st = run_iterations(pb, fac, ckpts[t_ck], t_ck, t0, slot="tr") if t0 > t_ck else ckpts[t_ck]
    if t0 == t_ck and t0 > 0:
        del ckpts[t_ck]       # its segment is done after these: free the state
    kept = {}
    for slot, tt in enumerate(range(t0, t + 1)):
        kept[tt] = badmm_rerun(pb, fac, st, tt, bufs, slot, last=tt == t)
        st = kept[tt]["next"]
    return kept


def reverse_iterations(pb: _Problem, fac: Factors, g_lp_T: Tensor, grads: list,
                       table: Tensor) -> None:
    """The T iterations in reverse with the adjoint kernels (no torch autograd), from the
    initial state and ⌈√T⌉-spaced checkpoints made here.

    g_lp_T: ∂L/∂log P_T (R, D). Accumulates into ``grads`` = [x, xc, xt (R, D), log p0
    (T + 1, B, D), log q0 (T + 1, R), a0, a1, a2, a3, rho, tau (T,)] (x: the direct dependence
    only; xc, xt: the factors, chained to x by structure_factors_bwd_kernel; log p0, log q0:
    row t iteration t's gradient, row T the initial state's, all zeroed, summed by the
    caller; the weights: the rows of ``table`` (6, T)).
    """
    acc = {"x": grads[0], "xc": grads[1], "xt": grads[2], "lp0": grads[3], "lq0": grads[4],
           "table": table}
    acc.update({k: grads[5 + i] for i, k in enumerate(_WEIGHTS)})
    ckpts = {0: init_state(pb)}
    _add_sqrt_checkpoints(pb, fac, ckpts)

    k = math.ceil(math.sqrt(pb.T))
    rebuild = [_initial_state_reused(pb.method, pb.T)]

    def enter(t):
        """Before the states of reverse step t are made: in the last segment (t < k), once a
        reverse step has run, the initial state again where its buffers were reused."""
        if rebuild[0] and t < k and t < pb.T - 1:
            ckpts[0] = _rebuild_initial_state(pb, ckpts[0])
            rebuild[0] = False

    def state_entering(t):
        enter(t)
        t_ck = max(k for k in ckpts if k <= t)
        st = run_iterations(pb, fac, ckpts[t_ck], t_ck, t) if t > t_ck else ckpts[t_ck]
        if t == t_ck and t > 0:
            del ckpts[t_ck]       # its segment is done: free the state
        return st

    bufs = _Buffers(pb.scratch)
    # the adjoint kernels' per-set weight partials: (T, B, 8) for S; (2, T, B, 8) for
    # B-E/B-Q, [0] the p-step's, [1] the s-step's
    wp = pb.scratch.get("_wp")
    if pb.method == "sinkhorn":
        if wp is None:
            wp = pb.x32.new_zeros(pb.T, pb.B, 8)
        g_lp = g_lp_T
        for t in reversed(range(pb.T)):
            g_lp = sinkhorn_reverse_step(pb, fac, state_entering(t), t, g_lp, acc, bufs,
                                         wp[t])
        g_state = {"log_s": g_lp}
        _sinkhorn_weight_grads(pb, wp, acc)
    else:
        if wp is None:
            wp = pb.x32.new_zeros(2, pb.T, pb.B, 8)
        g_state = {k: _scratch(pb, f"_g_{k}", v) for k, v in ckpts[0].items()}   # zeroed
        kept = {}
        for t in reversed(range(pb.T)):
            if t not in kept:
                enter(t)
                kept = _badmm_rerun_pair(pb, fac, ckpts, t, bufs)
            g_state = badmm_reverse_step(pb, fac, kept.pop(t), t, g_state,
                                         g_lp_T if t == pb.T - 1 else None, acc, bufs,
                                         wp[1, t], wp[0, t])
        _badmm_weight_grads(pb, wp, acc)
    _initial_state_grads(pb, g_state, grads)


# ============================================================================================
# the whole forward and backward (the bodies of op.py's custom operators)
# ============================================================================================
def structure_forward(x: Tensor, ptr: Optional[Tensor], log_p0, log_q0, weights: dict,
                      method: str, variant: str, K: int, return_plan: bool):
    """(y (B, D) in x's dtype, plan in x's shape and dtype or None, log P_T (R, D) fp32)."""
    pb, fac = setup(x, ptr, log_p0, log_q0, weights, method, variant, K)
    log_p = final_log_p(pb, run_iterations(pb, fac, init_state(pb), 0, pb.T, inplace=True))
    plan = torch.empty(x.shape, device=x.device, dtype=x.dtype) if return_plan else None
    y = pool_launch(pb, log_p, x.dtype, plan)
    return y, plan, log_p


def structure_backward(x: Tensor, ptr: Optional[Tensor], log_p0, log_q0, weights: dict,
                       log_p_T: Tensor, gy: Optional[Tensor], gplan: Optional[Tensor],
                       method: str, variant: str, K: int):
    """Gradients of structure_forward's y and plan: (∂L/∂x in x's shape and dtype, ∂L/∂log p0
    (B, D) fp32, ∂L/∂log q0 (R,) fp32, ∂L/∂weights (6, T) fp32 in _WEIGHTS order)."""
    # the pooling's adjoint runs in the factors' launch (g_lp_T, and x's direct gradient g_x)
    pb, fac = setup(x, ptr, log_p0, log_q0, weights, method, variant, K,
                    pool_grad=(log_p_T, gy, gplan))
    # setup's zeroed views: ∂L/∂xc, ∂L/∂xt, the per-iteration ∂L/∂log p0, ∂L/∂log q0
    # (x's own is pb.g_x: it becomes x.grad)
    sc = pb.scratch
    g_w = pb.x32.new_zeros(len(_WEIGHTS), pb.T)
    acc_lp0, acc_lq0 = sc["_acc_lp0"], sc["_acc_lq0"]     # (T + 1, B, D), (T + 1, R) in them
    acc_lp0 = acc_lp0.as_strided((pb.T + 1, pb.B, pb.D), (acc_lp0.shape[1], pb.D, 1))
    acc_lq0 = acc_lq0.as_strided((pb.T + 1, pb.R), (acc_lq0.shape[1], 1))
    grads = [pb.g_x, sc["_g_xc"], sc["_g_xt"], acc_lp0, acc_lq0, *g_w.unbind(0)]
    reverse_iterations(pb, fac, pb.g_lp_T, grads, g_w)
    if pb.B > 0:   # the factors' gradients through the centring and normalization, into x's
        _wrap(structure_factors_bwd_kernel)[(pb.B,)](pb.x32, grads[1], grads[2], grads[0],
                                                     pb.bounds, pb.D, BN=pb.BN, BD=pb.BD,
                                                     num_warps=PER_SET_WARPS)
    gx = grads[0].view(x.shape)
    if gx.dtype != x.dtype:
        gx = gx.to(x.dtype)
    return gx, grads[3].sum(0), grads[4].sum(0), g_w
