"""Launch-configuration sweep for the next GPU lease (issues 12, 13, 17): MEASURED times of the
W2 Sinkhorn and B-E kernels under the shipped and alternative layouts (the ones measured on
2026-11-29 among them), of W1 B-E with and without its split over several programs per set,
and of the W1 structure path (α0 = 0.1) at 16 and 8 warps, and the W3 window backwards'
layouts without spills under triton 3.6, each checked against the torch path.

The H200 run of 2026-11-29 measured the one-program-per-set kernels 2-7× over the kernel
report's prediction, with ~8 resident warps per SM (200-255 registers per thread; see
`bench/results/gpu_vs_prediction_2026-11-29.md`). The usual cure is more resident warps: fewer
elements (so registers) per thread, or more warps per CTA. The kernel report's calibrated
model (bench/latency_model.py) ranks such variants now (``kernel_report.py --variant NAME``)
but was fitted on 8-24 resident warps per SM, so this times them: each variant patches the
launchers' tiling functions or constants, compiles, checks y and the gradients against
backend="torch" (relative L2 ≤ 2e-3, as gpu_check's smoke) and times forward and
forward+backward (median of triton.testing.do_bench). Nothing here changes the package.

    python bench/gpu_tune.py [--out DIR] [--budget 150] [--only S,B-E]
    python bench/gpu_tune.py --smoke-cpu     # tiny shapes under the interpreter: checks the script

Writes ``gpu_tune_<device>_<date>.{md,json}`` (default bench/results) after every variant.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# first: gpu_check switches the interpreter on under --smoke-cpu before torch / triton load
from bench.gpu_check import (Env, deadline, graph_ms, is_timeout, log, pool_fn,  # noqa: E402
                              rel, workload)

import torch  # noqa: E402
from rotp_triton.ops.rot.triton import common as triton_common  # noqa: E402
from rotp_triton.ops.rot.triton.badmm import launch as badmm_launch  # noqa: E402
from rotp_triton.ops.rot.triton.sinkhorn import launch as sinkhorn_launch  # noqa: E402
from rotp_triton.ops.rot.triton.structure import launch as structure_launch  # noqa: E402
from rotp_triton.ops.rot.triton.window import launch as window_launch  # noqa: E402


def _sixteen_warps(sizes):
    """An 8-warp (BN, BD, BV, num_warps) at 16 warps on half the tile (BD first while >= 32)."""
    BN, BD, BV, nw = sizes
    if nw != 8:
        return sizes
    BN, BD = (BN, BD // 2) if BD >= 32 else (BN // 2, BD)
    return BN, BD, min(max(BV, 512), 1024), 16


def variants():
    """(workload, method, name, {module: {attribute: replacement}}): each differs from the
    shipped launchers in one decision. The shipped B-ADMM forward at W2 runs 16 warps a CTA
    (one CTA per SM), chosen by the kernel report's calibrated model (bench/latency_model.py),
    which was fitted on 8-24 resident warps per SM; the layout measured on the H200 on
    2026-11-29 (8 warps) is here to time it against, 32 warps to test the model beyond its
    range. The Sinkhorn row-pieces forward runs 16 resident warps per SM since 2026-12-01 (a
    128-register cap); its layout until then is here to time it against."""
    S, B, St, Wi = sinkhorn_launch, badmm_launch, structure_launch, window_launch
    bwd_blocks = B.backward_block_sizes
    SPLIT = dict(host_bound_splits=lambda splits, *a: splits)    # the shapes' split at any T
    return [
        # most valuable first (the sweep has a time budget): the two launcher choices the
        # calibrated model made on 2026-11-30, each against the layout measured on 2026-11-29
        ("W2", "badmm-e", "shipped", {}),
        ("W2", "badmm-e", "forward at 8 warps, as measured 2026-11-29", {B: dict(
            FORWARD_WARPS=8)}),
        # the W2 forwards' passes over a set in alternating directions since 2026-12-03 (snake
        # order: a pass starts on the chunks still in L2; bench/l2_reuse.py's LRU model,
        # PREDICTED, T = 4 forward HBM loads: B-E 0.530 -> 0.161 GB, Sinkhorn 0.622 -> 0.395;
        # results/l2_snake_order_2026-12-03.md), the B-ADMM backward's passes 2 and 3 since
        # 2026-12-04 (results/l2_badmm_backward_snake_2026-12-04.md), against one direction;
        # the kernel report counts both alike (no L2 in its model)
        ("W2", "badmm-e", "sweeps in one direction (forward until 2026-12-03, backward "
         "until 2026-12-04)", {B: dict(SNAKE_ORDER=False)}),
        ("W2", "sinkhorn", "shipped", {}),
        ("W2", "sinkhorn", "forward passes in one direction (until 2026-12-03)", {S: dict(
            SNAKE_ORDER=False)}),
        # the Sinkhorn one-tile kernels of fewer sets than SMs at 16 warps since 2026-12-03
        # (sinkhorn/launch.few_sets_launch; calibrated model: W1 T=4 forward kernel 138 -> 76
        # us, backward 135 -> 73; results/sinkhorn_few_sets_warps_2026-12-03.md) against the
        # 8 warps measured on 2026-11-29; its call is host-bound: the CUDA-graph column tells
        ("W1", "sinkhorn", "shipped", {}),
        ("W1", "sinkhorn", "one-tile kernels at 8 warps (until 2026-12-03)", {S: dict(
            FEW_SETS_WARPS=0)}),
        # the ragged exact forward's one-tile iterations and the backward's one-pass reverse
        # sweeps for sets of 129-512 rows since 2026-12-03 with triton >= 3.9, at 16 warps with
        # fewer sets than SMs (3.6 spills 32-96 B in the forward, 24 B in the 16-warp backward;
        # calibrated model, T=4: W5 forward kernel 226 -> 104 us at 8 warps, 69 at 16,
        # backward 201 -> 155 at 8, 106 at 16; results/sinkhorn_ragged_tiles_2026-12-03.md,
        # sinkhorn_ragged_bwd_tiles_2026-12-03.md)
        ("W5", "sinkhorn", "shipped", {}),
        ("W5", "sinkhorn", "ragged exact " + (
            "streamed only at 8 warps (as until 2026-12-03)" if S.RAGGED_TILE_ROWS
            else "with one-tile iterations and sweeps (shipped from triton 3.9; 3.6 spills)"),
         {S: dict(RAGGED_TILE_ROWS=0 if S.RAGGED_TILE_ROWS else S.ONE_TILE_MAX_N)}),
        ("W5", "sinkhorn", "ragged exact with one-tile iterations and sweeps at 8 warps", {S: dict(
            RAGGED_TILE_ROWS=S.ONE_TILE_MAX_N, FEW_SETS_WARPS=0)}),
        ("W2", "badmm-e", "fused backward (shipped up to T = 14 until 2026-11-30)", {B: dict(
            backward_fuses=lambda T, x_bytes: True)}),
        ("W2", "badmm-e", "forward at 32 warps", {B: dict(FORWARD_WARPS=32)}),
        # the unfused backward at 16 warps on half the tile (2 fp32 a thread) since
        # 2026-12-02 with triton >= 3.9 (calibrated model; results/badmm_backward_sixteen_warps
        # _2026-12-02.md) against its 8-warp layouts until then: the full tile, and the half
        # tile at 8 warps (4 fp32 a thread)
        ("W2", "badmm-e", "backward at 8 warps, full tile (until 2026-12-02)", {B: dict(
            BACKWARD_WARPS=8)}),
        ("W2", "badmm-e", "unfused backward on half tiles at 8 warps (4 fp32 per thread)",
         {B: dict(unfused_backward_block_sizes=lambda n, D, plan_grad: bwd_blocks(n, D))}),
        # the structure path (α0 > 0) runs one CTA per set: 16 warps, square GEMM tiles and
        # 2,048-element row tiles since 2026-11-30 (calibrated model: 18.0 -> 10.3 ms
        # fwd+bwd), against the 8-warp layout it replaced
        ("W1 a0=0.1", "badmm-e", "shipped", {}),
        ("W1 a0=0.1", "badmm-e", "structure at 8 warps, wide GEMM tiles (until 2026-11-30)",
         {St: dict(PER_SET_WARPS=8, WIDE_GEMM_TILES=True,
                   row_block=lambda BD: max(1, min(64, 4096 // BD)))}),
        # the window kernels' layouts of 2026-11-30 with triton >= 3.9 (window/launch.py; the
        # calibrated model: W3 T=4 B-E forward kernel 751 -> 508 us at 2 warps a window,
        # backward 2,962 -> 1,800 at 8; the first model +17 % / +20 % for the cross-warp
        # channel sums) against the 1-warp forward and 4-warp backward they replaced
        ("W3", "badmm-e", "shipped", {}),
        ("W3", "badmm-e", "window B-ADMM forward at 1 warp (32 fp32 a thread, uncapped)",
         {Wi: dict(FWD_LAYOUT=dict(Wi.FWD_LAYOUT, **{"badmm-e": (32, 255)}))}),
        ("W3", "badmm-e", "window B-ADMM backward at 4 warps (8 fp32 a thread, uncapped)",
         {Wi: dict(BWD_ELEMS=dict(Wi.BWD_ELEMS, **{"badmm-e": 8}), FRUGAL_REGISTERS=False)}),
        # 4 warps a window, 8 fp32 a thread under a 56-register cap (72 with triton 3.6): 36
        # resident warps per SM instead of 22. Calibrated model: W3 T=4 window forward
        # 353 -> 286 us (forward kernels 3.49 -> 2.94x SoL, issue 12's <= 3); first model
        # 159 -> 192 us; not shipped: the H200 ran the W3 B-ADMM forward calls in 0.56-0.69x
        # their calibrated time (9 warps per SM), so the model under-rates this kernel's
        # issue per warp (results/window_fwd_four_warps_2026-12-01.md)
        ("W3", "badmm-e", "window B-ADMM forward at 4 warps (8 fp32 a thread, cap 56; 72 with "
         "triton 3.6)",
         {Wi: dict(FWD_LAYOUT=dict(Wi.FWD_LAYOUT, **{
             "badmm-e": (8, 56 if Wi.FRUGAL_REGISTERS else 72)}))}),
        ("W3", "sinkhorn", "shipped", {}),
        # triton 3.6: the forwards' one-warp Sinkhorn / two-warp B-ADMM tiles on twice the
        # warps under caps of their own since 2026-12-04 (window/launch.py FWD_HALF_ELEMS; W3
        # T = 4 forward kernel calibrated with 3.6: S 404 -> 282 µs, B-E 425 -> 341;
        # results/window_fwd_triton36_2026-12-04.md) against their layouts until then
        *([("W3", m, "window forward as until 2026-12-04 with triton 3.6 (" + how + ")",
            {Wi: dict(FWD_HALF_ELEMS={})})
           for m, how in (("sinkhorn", "one warp uncapped"), ("badmm-e", "two warps under 128"))]
          if Wi.FWD_HALF_ELEMS else []),
        ("W3", "sinkhorn", "window Sinkhorn uncapped (forward 93, backward 196 registers with "
         "triton 3.9)", {Wi: dict(FWD_LAYOUT=dict(Wi.FWD_LAYOUT, sinkhorn=(32, 255)),
                                  FRUGAL_REGISTERS=False)}),
        # triton 3.6 (the H200 image's) spills in the window backwards' shipped layouts (W3:
        # Sinkhorn 1,520 B at T = 16, B-ADMM 8-48 B), 3.9 does not; these layouts build
        # without spills with 3.6 and the same 8 warps per SM, but the kernel report (built
        # with 3.6, spills not priced) puts them 23-39 % slower for their extra instructions
        # (results/aot_triton36_window_2026-12-04.md). With 3.9 the B-ADMM one is the shipped
        # layout without its register cap.
        ("W3", "badmm-e", "window B-ADMM backward at 8 warps, 4 fp32 a thread, uncapped (no "
         "spills with triton 3.6)", {Wi: dict(BWD_ELEMS=dict(Wi.BWD_ELEMS, **{"badmm-e": 4}),
                                              FRUGAL_REGISTERS=False)}),
        ("W3 T=16", "sinkhorn", "shipped", {}),
        ("W3 T=16", "sinkhorn", "window Sinkhorn backward at 8 fp32 a thread, 8 iterations a "
         "segment (no spills with triton 3.6)", {Wi: dict(
             BWD_ELEMS=dict(Wi.BWD_ELEMS, sinkhorn=8),
             BWD_ELEMS_PAPER=dict(Wi.BWD_ELEMS_PAPER, sinkhorn=8),
             BWD_SEGMENT=dict(Wi.BWD_SEGMENT, sinkhorn=8))}),
        # the row-pieces forward as [P / RL, BD, RL] tiles since 2026-12-02 (RL = 4 lanes a
        # column at W2, 128 registers: bench/results/sinkhorn_pieces_lanes_2026-12-02.md)
        # against its [P, BD] layouts until then (8 warps at 4 fp32 a thread under the cap; 4
        # warps at 16, uncapped) and RL = 2 (25 fp32 a thread: spills under the cap, uncapped
        # one CTA an SM); the backward capped with triton >= 3.9 where a stride is 1
        # (sinkhorn_pieces_bwd_cap_2026-12-01.md) against its other layout
        ("W2", "sinkhorn", "row-pieces forward as until 2026-12-02 (a column over 2 lanes and 8 "
         "warps, 16 features a chunk, 128 registers)", {S: dict(
             PIECES_FWD_ROW_LANES=1, PIECES_FWD_BD=16)}),
        ("W2", "sinkhorn", "row-pieces forward as until 2026-12-01 (4 warps, 16 fp32 a "
         "thread, no cap)", {S: dict(PIECES_FWD_ROW_LANES=1, PIECES_FWD_BD=32,
                                     PIECES_NUM_WARPS=4, PIECES_FWD_MAX_REGISTERS=255)}),
        ("W2", "sinkhorn", "row-pieces forward at 2 lanes a column (25 fp32 a thread), no cap",
         {S: dict(PIECES_FWD_ROW_LANES=2, PIECES_FWD_MAX_REGISTERS=255)}),
        ("W2", "sinkhorn", "row-pieces forward in lanes with any triton (shipped from 3.9; "
         "3.6 spills it)", {S: dict(PIECES_FWD_LANES=True)}),
        # the backward's reverse sweeps in lanes too since 2026-12-02 (S form, RL = 4, dx by its
        # own launch; bench/results/sinkhorn_pieces_bwd_lanes_2026-12-02.md), with triton 3.6
        # since 2026-12-04 (uncapped, one CTA an SM, dx under 128 registers: no spills;
        # results/sinkhorn_bwd_lanes_triton36_2026-12-04.md) against the [P, BD] sweeps with
        # dx in the backward kernel (3.6's layout until then), and with 3.6 against lanes of 8
        # under the 128-register cap (two CTAs an SM; 3.6 spills 24 B there, RL = 4 152 B)
        ("W2", "sinkhorn", "row-pieces backward sweeps " + (
            "as [P, BD] pieces, dx in the backward kernel (as until 2026-12-02; with triton "
            "3.6 until 2026-12-04)" if S.PIECES_BWD_LANES else "in lanes, dx by its own launch"),
         {S: dict(PIECES_BWD_LANES=not S.PIECES_BWD_LANES)}),
        ("W2", "sinkhorn", "row-pieces backward sweeps in lanes of 8 under 128 registers, dx "
         "under 128 (two CTAs an SM; triton 3.6 spills 24 B)", {S: dict(
             PIECES_BWD_CAPPED=True, PIECES_BWD_ROW_LANES=8, PIECES_DX_MAX_REGISTERS=128)}),
        # the exact forward's fixed shifts one per set since 2026-12-02 (triton >= 3.9: 3.6
        # spilled 8 B then, none at W2 T = 4 on 2026-12-04, 432 -> 429 µs calibrated;
        # bench/results/sinkhorn_set_shift_2026-12-02.md) against one per column
        ("W2", "sinkhorn", "forward " + (
            "with a shift per column (as until 2026-12-02)" if S.SET_SHIFT
            else "with a shift per set (shipped from 3.9)"),
         {S: dict(SET_SHIFT=not S.SET_SHIFT)}),
        ("W2", "sinkhorn", "row-pieces backward " + (
            "uncapped (all its fp32 a thread; 3.9's until 2026-12-01)" if S.PIECES_BWD_CAPPED
            else "at a quarter of its fp32 a thread, 128 registers (shipped with triton 3.9)"),
         {S: dict(PIECES_BWD_CAPPED=not S.PIECES_BWD_CAPPED)}),
        # triton 3.6 keeps the unfused W2 backward at 8 warps (BACKWARD_WARPS): at 16 it
        # builds W2's B-E exact call with the feature scale without spills (128 registers;
        # calibrated with 3.6 3,612 -> 3,341 µs at T = 4), but spills 44-156 B in other
        # configurations (paper variant, plan gradient, B-Q, D = 512 / 1,024)
        *([("W2", "badmm-e", "unfused backward at 16 warps with triton 3.6 (3.9's layout)",
            {B: dict(BACKWARD_WARPS=16)})] if B.BACKWARD_WARPS != 16 else []),
        ("W2", "badmm-e", "fused backward at 16 warps, 2 fp32 per thread", {B: dict(
            backward_fuses=lambda T, x_bytes: True,
            backward_block_sizes=lambda n, D: _sixteen_warps(bwd_blocks(n, D)))}),
        ("W2", "badmm-e", "forward streams at every T", {B: dict(
            forward_replays=lambda T, x_bytes, one_pass=False: False)}),
        ("W2", "badmm-e", "two passes per forward iteration", {B: dict(
            forward_one_pass=lambda *a: None)}),
        ("W2", "sinkhorn", "no row pieces (padded tile)", {S: dict(ROW_PIECES=False)}),
        ("W2", "sinkhorn", "4 warps everywhere", {S: dict(num_warps_for=lambda x, B_: 4)}),
        # W1 (50 sets < 132 SMs) is split over several programs per set by its shapes, but
        # since 2026-12-04 a call at T <= 6 runs one program a set (launch.host_bound_splits:
        # the split's 26 launches a fwd+bwd cost ~50-60 µs of host time each on the H200, W1 B-E
        # 3.16 ms for 0.59 ms of kernels; PREDICTED 3.1 -> 2.0 ms); the split as shipped until
        # then, eager and from a CUDA graph
        ("W1", "badmm-e", "shipped", {}),
        ("W1", "badmm-e", "split at every T (until 2026-12-04)", {B: SPLIT}),
        # the recorded forward in eager mode through the custom operator, as until
        # 2026-11-30 (now the autograd.Function: 24-28 % less host time on the CPU,
        # bench/results/host_overhead_eager_function.md): the host-bound W1 call measures it
        ("W1", "badmm-e", "custom operator in eager mode (until 2026-11-30)",
         {triton_common: dict(EAGER_FUNCTION=False)}),
        # the split backward rebuilds Z̄' since 2026-12-01 (1x the input less memory, twice
        # the replayed iterations, half tiles: results/badmm_zbar_rebuild_2026-12-01.md,
        # B-Q: badmm_bq_zbar_rebuild_2026-12-01.md) against the (rows, D) Z̄ scratch and full
        # tiles it replaced; split at T = 4 as until 2026-12-04 (against "split at every T")
        ("W1", "badmm-e", "backward keeps Z̄ in a (rows, D) scratch (until 2026-12-01)",
         {B: dict(backward_rebuilds_zbar=lambda per_row, fuse=False: False, **SPLIT)}),
        # ... and since the same day pass 3 sums pass 2's L̄', Z̄' part, so that pass 2 no
        # longer rebuilds (one replay past t per reverse step instead of two)
        ("W1", "badmm-e", "split backward: pass 2 rebuilds Z̄' too (unfused)",
         {B: dict(split_backward_fuses=lambda rebuild: False, **SPLIT)}),
        ("W1", "badmm-q", "shipped", {}),
        ("W1", "badmm-q", "split at every T (until 2026-12-04)", {B: SPLIT}),
        ("W1", "badmm-q", "backward keeps Z̄ in a (rows, D) scratch (until 2026-12-01)",
         {B: dict(backward_rebuilds_zbar=lambda per_row, fuse=False: False, **SPLIT)}),
    ]


@contextlib.contextmanager
def patched(patches):
    old = [(m, a, getattr(m, a)) for m, attrs in patches.items() for a in attrs]
    try:
        for m, attrs in patches.items():
            for a, v in attrs.items():
                setattr(m, a, v)
        yield
    finally:
        for m, a, v in old:
            setattr(m, a, v)


def _workload_a0(wl: str):
    """("W1", 0.1) from "W1 a0=0.1"; (wl, 0.0) without an α0 (a " T=..." part dropped)."""
    name, _, a0 = wl.partition(" T=")[0].partition(" a0=")
    return name, float(a0) if a0 else 0.0


def _workload_T(wl: str, T: int, smoke: bool) -> int:
    """The iterations of a variant: 16 for "W3 T=16", else the sweep's ``T`` (and always
    under --smoke-cpu, whose interpreter shapes are for small T)."""
    _, _, t = wl.partition(" T=")
    return int(t) if t and not smoke else T


def run_variant(env, wl, method, T, patches, reference):
    x0, ptr, kind, desc = reference["data"]
    row = {}
    with patched(patches):
        fn, params = pool_fn(kind, x0, ptr, method, T, "triton", env, a0=_workload_a0(wl)[1])
        x = x0.detach().clone().requires_grad_()
        y = fn(x)
        grads = torch.autograd.grad(y, [x] + params, reference["gy"], allow_unused=True)
        ry, rgrads = reference["out"]
        row["err_y"] = rel(y.float(), ry.float())
        row["err_dx"] = rel(grads[0].float(), rgrads[0].float())
        ok = all(e == e and e <= 2e-3 for e in (row["err_y"], row["err_dx"]))
        row["ok"] = ok
        leaves = [x] + params
        row["fwd_ms"] = env.do_bench(lambda: fn(x))
        row["fwd_bwd_ms"] = env.do_bench(
            lambda: torch.autograd.grad(fn(x).sum(), leaves, allow_unused=True))
        if not env.smoke:
            # the same fwd+bwd replayed from a CUDA graph: its kernels without the host front
            # end, which bounds W1's calls (a variant of its kernels shows only here)
            try:
                row["graph_fwd_bwd_ms"] = graph_ms(
                    lambda: torch.autograd.grad(fn(x).sum(), leaves, allow_unused=True), 20)
            except Exception as e:  # noqa: BLE001 (a capture failure is a result too)
                row["graph_status"] = f"{type(e).__name__}: {str(e)[:80]}"
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke-cpu", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--budget", type=float, default=150.0, help="seconds for the whole sweep")
    p.add_argument("--only", default="", help="comma-separated methods (sinkhorn,badmm-e)")
    args = p.parse_args(argv)
    if not args.smoke_cpu and not torch.cuda.is_available():
        print("gpu_tune: no CUDA device (use --smoke-cpu to check the script); exit 0")
        return 0
    env = Env(args.smoke_cpu)
    out_dir = args.out or (os.path.join(ROOT, "bench", "results") if not args.smoke_cpu
                           else "/tmp/gpu_tune_smoke")
    os.makedirs(out_dir, exist_ok=True)
    import triton
    dev = "cpu-smoke" if env.smoke else torch.cuda.get_device_name(0)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    slug = "".join(ch if ch.isalnum() else "-" for ch in dev.lower()).strip("-")
    base = os.path.join(out_dir, f"gpu_tune_{slug}_{date[:10]}")
    T = 2 if env.smoke else 4
    keep = [m for m in args.only.split(",") if m]
    rows, refs, end = [], {}, time.time() + args.budget
    for wl, method, name, patches in variants():
        if keep and method not in keep:
            continue
        Tv = _workload_T(wl, T, env.smoke)
        row = dict(workload=wl, T=Tv, method=method, variant=name)
        try:
            with deadline(end - time.time()):
                if (wl, method) not in refs:  # the torch path once: the check's reference
                    name_, a0 = _workload_a0(wl)
                    x0, ptr, kind, desc = workload(name_, env)
                    fn, params = pool_fn(kind, x0, ptr, method, Tv, "torch", env, a0=a0)
                    x = x0.clone().requires_grad_()
                    y = fn(x)
                    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y)
                    refs[wl, method] = dict(data=(x0, ptr, kind, desc), gy=gy, out=(
                        y.detach(), torch.autograd.grad(y, [x] + params, gy)))
                row.update(run_variant(env, wl, method, Tv, patches, refs[wl, method]))
        except Exception as e:
            row["status"] = "out of time" if is_timeout(e) else \
                f"error {type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        log(f"{wl} {method} | {name}: " + (f"fwd {row['fwd_ms']:.3f} ms, fwd+bwd "
                                      f"{row['fwd_bwd_ms']:.3f} ms, y {row['err_y']:.1e}, dx "
                                      f"{row['err_dx']:.1e} {'OK' if row['ok'] else 'FAIL'}"
                                      if "fwd_ms" in row else row.get("status", "")))
        meta = dict(device=dev, date=date, torch=torch.__version__, triton=triton.__version__)
        with open(base + ".json", "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        L = [f"# Launch-configuration sweep - {dev}, {date} (MEASURED)", "",
             f"torch {meta['torch']}, triton {meta['triton']}; T = {T} (a workload "
             "named '... T=n': n), fp32; medians of "
             "triton.testing.do_bench; errors: relative L2 against backend='torch' (≤ 2e-3).",
             "CUDA graph: the fwd+bwd replayed from a `torch.cuda.graph` capture (kernels, no "
             "host front end).", "",
             "| workload | method | variant | fwd ms | fwd+bwd ms | CUDA graph fwd+bwd ms | "
             "err y | err dx | ok / status |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            f_ = lambda k: f"{r[k]:.3f}" if k in r else ""  # noqa: E731
            e_ = lambda k: f"{r[k]:.1e}" if k in r else ""  # noqa: E731
            L.append(f"| {r['workload']} | {r['method']} | {r['variant']} | {f_('fwd_ms')} | "
                     f"{f_('fwd_bwd_ms')} | "
                     f"{f_('graph_fwd_bwd_ms') or r.get('graph_status', '')} | "
                     f"{e_('err_y')} | {e_('err_dx')} | "
                     f"{('OK' if r.get('ok') else 'FAIL') if 'ok' in r else r.get('status')} |")
        with open(base + ".md", "w") as f:
            f.write("\n".join(L) + "\n")
    bad = [r for r in rows if "ok" in r and not r["ok"]]
    log(f"wrote {base}.md and .json; {len(bad)} variants off the torch path")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
