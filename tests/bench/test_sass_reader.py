"""The measurement kit of bench/ (issue 10) on inputs whose answers are known: the SASS reader
(sm_90, compiled without a GPU), the launch recorder on a real rot_pool call, the interpreter's
work counter and the host-op counter. The SASS tests run in a subprocess without
TRITON_INTERPRET (kernels must be real JITFunctions to compile)."""
import json
import os
import sys

import pytest
import torch

from kernel_utils import run_without_interpreter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from bench import sass  # noqa: E402

needs_nvdisasm = pytest.mark.skipif(sass.tool("nvdisasm") is None or sass.tool("cuobjdump")
                                    is None, reason="nvdisasm/cuobjdump not shipped here")

_PRELUDE = f"""
import json, sys
sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {HERE!r})
import torch
from bench import sass
from bench.launch_recorder import record_launches, h100_host
"""


@needs_nvdisasm
@pytest.mark.parametrize("block,warps", [(1024, 4), (512, 8)], ids=["1024x4w", "512x8w"])
def test_exp2_loop_has_one_mufu_per_element(block, warps):
    out = run_without_interpreter(_PRELUDE + f"""
import probe_kernels as pk
x = torch.zeros(4096); y = torch.empty_like(x)
with record_launches() as L:
    pk.exp2_loop_kernel[(1,)](x, y, x.numel(), BLOCK={block}, num_warps={warps})
a = sass.analyse_launch(L[0])
print(json.dumps(dict(hot=a["hot"], loops=a["loops"], grid=L[0].grid, warps=L[0].num_warps)))
""")
    r = json.loads(out.strip().splitlines()[-1])
    assert r["loops"] >= 1, "the tile loop was not found"
    assert r["grid"] == [1, 1, 1] or tuple(r["grid"]) == (1, 1, 1)
    assert r["warps"] == warps
    per_thread = block // (32 * warps)  # elements each thread holds per tile
    hot = r["hot"]["mix"]
    # one exp2 per element: as many MUFU.EX2 as fp32 words loaded in the loop, a whole number
    # of tiles per trip (ptxas may unroll the tile loop)
    assert hot["EX2LG2"] == hot["LDG_WORDS"] == hot["MUFU"], hot
    assert hot["EX2LG2"] % per_thread == 0 and hot["EX2LG2"] >= per_thread, hot
    assert hot["STG"] >= 1, hot


@needs_nvdisasm
def test_reduction_shows_shfl_and_bar():
    out = run_without_interpreter(_PRELUDE + """
import probe_kernels as pk
x = torch.zeros(1024); y = torch.empty(1)
with record_launches() as L:
    pk.block_sum_kernel[(1,)](x, y, BLOCK=1024, num_warps=4)
a = sass.analyse_launch(L[0])
print(json.dumps(a["kernel_mix"]))
""")
    mix = json.loads(out.strip().splitlines()[-1])
    assert mix["SHFL"] >= 5, mix  # log2(32) butterfly steps within a warp
    assert mix["BAR"] >= 1, mix   # the cross-warp combine goes through shared memory
    assert mix["MUFU"] == 0, mix


@needs_nvdisasm
def test_recorder_records_a_real_rot_pool_launch():
    out = run_without_interpreter(_PRELUDE + """
import rotp_triton as rt
x = torch.randn(3, 40, 24)
with h100_host(), record_launches() as L:
    y = rt.rot_pool(x, method="sinkhorn", num_iters=2, backend="triton")
assert not torch.Tensor.__dict__.get("is_cuda"), "h100_host did not restore Tensor.is_cuda"
a = sass.analyse_launch(L[0])
print(json.dumps(dict(n=len(L), programs=L[0].programs, warps=L[0].num_warps,
                      regs=a["regs"], total=a["kernel_mix"]["total"], shape=list(y.shape))))
""")
    r = json.loads(out.strip().splitlines()[-1])
    assert r["n"] >= 1 and r["programs"] >= 1 and r["warps"] >= 1, r
    assert r["regs"] > 0 and r["total"] > 0, r
    assert r["shape"] == [3, 24]


@needs_nvdisasm
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="the site counts come from the interpreter")
def test_dynamic_instructions_weigh_each_loop_by_its_runs():
    """``fallback_sum_kernel`` holds the same tile loop twice: one runs 8 trips, the other sits
    in a branch that is not taken. Weighed by the interpreter's site counts, the first loop
    executes 8 MUFU.EX2 per thread (whatever ptxas's unroll factor), the fallback copy none;
    the whole kernel exactly 8 (the trips ptxas peels into straight-line code beside an
    unrolled loop are taken off the loop's). The kernel report's hot loop is the loop that
    ran, though the copy (one multiply more a trip: x · 0.5) is as big or bigger."""
    import probe_kernels as pk
    from bench.interp_counter import count_kernel_work
    trips, block = 8, 128
    n = (trips - 1) * block + 5
    x = torch.zeros(n)
    y = torch.empty(1)
    with count_kernel_work() as W:
        pk.fallback_sum_kernel[(1,)](x, y, n, BLOCK=block, num_warps=4)
    counts = json.dumps(dict(sites=W[0].sites, elems=W[0].site_elems))
    out = run_without_interpreter(_PRELUDE + f"""
import probe_kernels as pk
c = json.loads({counts!r})
x = torch.zeros({n}); y = torch.empty(1)
with record_launches() as L:
    pk.fallback_sum_kernel[(1,)](x, y, {n}, BLOCK={block}, num_warps=4)
cubin = sass.compile_launch(L[0]).asm["cubin"]
d = sass.dynamic_instructions(cubin, c["sites"], 1, c["elems"], 128)
ins, labels = sass.disassemble(cubin)
body = {{f"{{a:#x}}": sum(1 for i in ins if a <= i.addr <= b and i.opcode.startswith("MUFU.EX2"))
        for a, b in sass.loops(ins, labels)}}
from bench.kernel_report import _hot_loop_that_ran
hot = _hot_loop_that_ran(sass.analyse_cubin(cubin), d)
print(json.dumps(dict(mufu=d["mufu"], loops=d["loops"], body=body, hot=f"{{hot['start']:#x}}")))
""")
    r = json.loads(out.strip().splitlines()[-1])
    loops = [b for b in r["loops"] if b["loop"]]
    assert len(loops) == 2, r
    live = [b for b in loops if b["instructions"] > 0]
    assert len(live) == 1, r                    # the fallback copy counts 0
    assert 0 < live[0]["runs"] * r["body"][live[0]["loop"][0]] <= trips, r
    assert r["mufu"] == trips, r
    assert r["hot"] == live[0]["loop"][0], r    # the report prices the loop that ran


# (kernel, trips, tile elements, warps): loops whose SASS trips ptxas makes differ from the
# source trips in one way each (probe_kernels' docstrings)
_TRIP_PROBES = {
    # two exp2 per element in one statement and a row vector replicated across lanes: neither
    # says the body is unrolled (the B-ADMM replay was counted at half its trips)
    "replay": ("replay_kernel", 9, 1024, 4),
    # a static_range inside the loop: its statement runs 4x as often as the loop
    "static copies": ("static_copies_kernel", 9, 256, 4),
    # unrolled 4x beside a remainder loop, trips peeled in front: 5 and 12 trips split
    # differently among the copies
    "unrolled, 5 trips": ("small_body_kernel", 5, 256, 8),
    "unrolled, 12 trips": ("small_body_kernel", 12, 256, 8),
    # a persistent loop over 7 tiles: unrolled, a remainder loop, trips peeled before and
    # after it, and the trip count's MUFU.RCP before it (no trip)
    "persistent": ("persistent_kernel", 7, 256, 4),
    # a long branch taken on the first trip only, a short one on the others: most of the
    # loop's instructions ran once
    "first trip": ("first_trip_kernel", 9, 256, 4),
    # a pass of 16 tiles with a constant trip count, unrolled into the loop's body: not a
    # 16-fold copy of the body
    "inlined pass": ("inlined_pass_kernel", 9, 256, 4),
}
# exp2 per element over all trips (the interpreter's count, checked against the probe)
_TRIP_PROBE_EXP2 = {"static copies": 4 * 9, "replay": 2 * 9, "first trip": 2 + 8}


def _probe_launch(name, trips, tile, warps):
    """The probe's launch as a line of Python (the same in both processes)."""
    if name == "replay_kernel":
        return (f"pk.replay_kernel[(1,)](torch.zeros({tile}), torch.zeros({trips} * 16), "
                f"torch.empty({tile}), {trips}, BN=16, BD={tile // 16}, num_warps={warps})")
    if name == "static_copies_kernel":
        return (f"pk.static_copies_kernel[(1,)](torch.zeros({tile}), torch.empty({tile}), "
                f"{trips}, C=4, BLOCK={tile}, num_warps={warps})")
    if name == "first_trip_kernel":
        return (f"pk.first_trip_kernel[(1,)](torch.zeros({trips} * {tile}), "
                f"torch.empty({tile}), {trips}, 0, BLOCK={tile}, num_warps={warps})")
    if name == "inlined_pass_kernel":
        return (f"pk.inlined_pass_kernel[(1,)](torch.zeros({trips} * {tile}), "
                f"torch.zeros({trips} * 16 * {tile}), torch.empty({tile}), {trips}, "
                f"BLOCK={tile}, V=16, num_warps={warps})")
    if name == "persistent_kernel":
        return (f"pk.persistent_kernel[(1,)](torch.zeros({trips} * {tile}), "
                f"torch.empty({trips} * {tile}), {trips}, BLOCK={tile}, num_warps={warps})")
    return (f"pk.small_body_kernel[(1,)](torch.zeros({trips} * {tile}), torch.empty({tile}), "
            f"{trips}, BLOCK={tile}, num_warps={warps})")


@needs_nvdisasm
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="the site counts come from the interpreter")
@pytest.mark.parametrize("probe", list(_TRIP_PROBES))
def test_dynamic_instructions_count_source_trips(probe):
    """Weighed by its runs, every SASS loop's MUFU.EX2 add up to the interpreter's exp2 per
    thread: each tile covers every thread once, so nothing is replicated and the two counts
    must agree exactly (the remainder's share of an unrolled loop is an estimate, but the trips
    it moves between the copies carry the same MUFU each)."""
    import probe_kernels as pk
    from bench.interp_counter import count_kernel_work
    name, trips, tile, warps = _TRIP_PROBES[probe]
    with count_kernel_work() as W:
        exec(_probe_launch(name, trips, tile, warps), dict(pk=pk, torch=torch))
    threads = 32 * warps
    assert tile % threads == 0
    counts = json.dumps(dict(sites=W[0].sites, elems=W[0].site_elems))
    out = run_without_interpreter(_PRELUDE + f"""
import probe_kernels as pk
c = json.loads({counts!r})
with record_launches() as L:
    {_probe_launch(name, trips, tile, warps)}
cubin = sass.compile_launch(L[0]).asm["cubin"]
d = sass.dynamic_instructions(cubin, c["sites"], 1, c["elems"], {threads})
print(json.dumps(dict(mufu=d["mufu"], loops=d["loops"])))
""")
    r = json.loads(out.strip().splitlines()[-1])
    assert W[0].exp2 == tile * _TRIP_PROBE_EXP2.get(probe, trips)
    assert r["mufu"] == pytest.approx(W[0].exp2 / threads, rel=1e-9), r


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="the work counter runs under the interpreter")
def test_site_counts_of_instructions_without_a_site():
    """How often an instruction runs that the interpreter did not count itself
    (sass._SiteCounts): its own site's count where it has one (at most its loop's runs); 0
    inside a call that never ran; the loop's runs, but never more than the most frequent site
    of the call it was inlined from: a helper's reduction that ptxas placed inside an element
    loop's address range runs as often as the helper's statements, not as the loop."""
    sites = {"k.py:10<k.py:90": 3,            # a vector pass's statement before its loop
             "k.py:12<k.py:90": 12,           # its loop's body (4 trips a call)
             "k.py:40<k.py:95": 96}           # an element loop's body
    counts = sass._SiteCounts(sites)
    assert counts.runs("k.py:12<k.py:90", 96.0) == (12.0, "matched")
    assert counts.runs("k.py:40<k.py:95", 32.0) == (32.0, "matched")
    assert counts.runs("k.py:14<k.py:90", 96.0) == (12.0, None)      # the helper's max
    assert counts.runs("k.py:14<k.py:90", 8.0) == (8.0, None)
    assert counts.runs("k.py:14<k.py:91", 96.0) == (0.0, "dead")     # a call that never ran
    assert counts.runs("k.py:50", 96.0) == (96.0, None)              # the kernel's own body


def test_divergent_fallback_is_neither_a_loop_nor_run():
    """A shuffle under a branch ptxas cannot prove warp-uniform gets a BRA.DIV to a fallback
    laid out at the kernel's end, whose jump back spans unrelated code: sass.divergent_paths
    finds it (target through the returning BRA), and sass.loops keeps only the real loop."""
    I = sass.Instr
    instrs = [I(0x00, "", "FADD", "R1, R1, R2"),
              I(0x10, "", "BRA.DIV", "UR6, `(.L_x_9)"),
              I(0x20, "", "SHFL.BFLY", "PT, R3, R1, 0x1, 0x1f"),
              I(0x30, "", "FADD", "R1, R1, R3"),
              I(0x40, "@P0", "BRA", "`(.L_x_1)"),
              I(0x50, "", "EXIT", ""),
              I(0x60, "", "WARPSYNC.COLLECTIVE", "R4, `(.L_x_10)"),
              I(0x70, "", "SHFL.BFLY", "P6, R3, R1, R5, R6"),
              I(0x80, "", "ENDCOLLECTIVE", ""),
              I(0x90, "", "BRA", "`(.L_x_2)"),
              I(0xa0, "", "BRA", "`(.L_x_11)")]
    labels = {".L_x_1": 0x00, ".L_x_2": 0x30, ".L_x_9": 0x60, ".L_x_10": 0x80,
              ".L_x_11": 0xa0}
    assert sass.divergent_paths(instrs, labels) == {0x60, 0x70, 0x80, 0x90}
    assert sass.loops(instrs, labels) == [(0x00, 0x40)]


def test_interp_counter_counts_bytes_and_exp2():
    import probe_kernels as pk
    from bench.interp_counter import count_kernel_work
    n, block = 300, 128
    x = torch.zeros(n)
    y = torch.empty_like(x)
    with count_kernel_work() as W:
        pk.exp2_loop_kernel[(1,)](x, y, n, BLOCK=block)
    assert len(W) == 1 and W[0].programs == 1
    assert W[0].load_bytes == 4 * n and W[0].store_bytes == 4 * n  # masked-in elements only
    assert W[0].exp2 == 3 * block  # whole tiles, masked lanes included (as on a GPU)


def test_count_host_ops_counts_syncs():
    from bench.frontend_report import count_host_ops
    t = torch.ones(3)

    def fn():
        if bool((t * 2).sum() > 0):  # mul, sum, gt, then a sync
            return t + 1
    ops, syncs = count_host_ops(fn)
    assert syncs == 1
    assert ops["mul"] == 1 and ops["add"] == 1 and ops["_local_scalar_dense"] == 1


def test_host_ops_are_priced_by_the_bytes_they_move():
    """The kernel report prices every host op of the Triton path like an eager op,
    max(5 µs, bytes / HBM): a full-size op on the layer's input costs what its traffic costs,
    an allocation or a view moves nothing."""
    from bench import sol
    from bench.frontend_report import count_host_ops
    from bench.kernel_report import front_end_seconds
    big = torch.ones(10_000_000)                                    # 40 MB

    def fn():
        torch.empty(10)
        return (big * 2).view(-1)[:5].sum()

    ops, syncs = count_host_ops(fn)
    moved = dict(ops.op_bytes)
    assert moved["empty"] == 0
    assert moved["mul"] == 80_000_000                               # read 40 MB, write 40 MB
    assert moved["sum"] == 5 * 4 + 4                                # a 5-element slice in
    assert "view" not in moved or moved["view"] == 0
    # the pricing model's arithmetic (a formula of the report, nothing is timed)
    bytes_ = [b for n, b in ops.op_bytes if n in ("empty", "mul", "sum")]
    priced = front_end_seconds(bytes_, syncs)                       # 5 + 5 + 26.7 µs
    assert priced == pytest.approx(2 * sol.ATEN_OP_S + 8e7 / sol.HBM_BYTES_PER_S)
    priced = front_end_seconds([3e9], 1)
    assert priced == pytest.approx(3e9 / sol.HBM_BYTES_PER_S + sol.SYNC_S)
