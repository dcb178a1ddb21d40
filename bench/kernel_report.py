"""Kernel report: what the Triton kernels would do on an H100, predicted on a CPU (issue 10;
PERF.md "Measuring on the CPU"). Every time in it is a PREDICTION.

    python bench/kernel_report.py [--quick] [--out DIR]

For each case (workload W1, W2, W3, W5 at T = 4 and 16; Sinkhorn, B-E, B-Q exact; B-E paper
once; α0 > 0 for B-E W1 T = 4; W3a at T = 4: W3's image through AdaptiveROTPool2d(256, 24),
overlapping 3 × 3 windows), forward and forward+backward, through the PUBLIC API only:

1. Launches (``bench/launch_recorder.py``): the call runs at full size on CPU tensors that pass
   for CUDA ones (``h100_host``), with every Triton launch recorded and skipped: grid,
   constexprs, num_warps, num_stages and the divisibility specialisation, as the launcher and
   triton choose them for an H100. The host aten ops and syncs of the same call are counted
   (``frontend_report.count_host_ops``).
2. SASS (``bench/sass.py``): each distinct launch compiled for sm_90; registers, spills, shared
   memory, and the innermost-loop instruction mix.
3. Work (``bench/interp_counter.py``, in a subprocess under ``TRITON_INTERPRET=1``): global
   bytes loaded + stored and exp2/log2 evaluations of each kernel, on the same call with FEWER
   SETS (same per-set shape: 1 set for W1/W2, the first 3 sets for W5, one 8×8 image for W3),
   scaled by the element ratio (not a kernel whose grid is the same at both sizes: the weight
   table, per-call coefficients), run at the case's OWN T. Nothing is extrapolated in T: the
   launchers choose their schedule from T (the B-ADMM forward replays the state up to T = 11
   for fp32 x and streams it above, bench/results/badmm_2026-11-28_v3.md), so work measured at
   other T prices another schedule - the former fit through T = 1, 2, 3 priced W2 T = 16's
   streamed forward as a T² replay (7.8 ms instead of the streamed kernel's time) and paired
   that count with the streamed kernel's SASS, and it priced kernels that T = 1 never launches
   (the split B-ADMM row pass and backward pass 2 at W1) at zero work. A reduced problem is
   ~1e5 elements, so T = 16 costs seconds to a minute of interpreter time per case. These
   counts are cached in ~/.cache/rotp_triton_bench/<hash of rotp_triton's sources>/ (the
   interpreter dominates the report's time); ROTP_BENCH_NO_CACHE=1 turns the cache off.
4. Dynamic instructions: the interpreter's exp2+log2 count × the hot loop's instructions per
   MUFU.EX2/LG2 (the hot loop: the innermost SASS loop with the most MUFU among those that
   ran, by the runs of the column below). Per
   element-iteration = that / (elements × T). Kernels whose loops have no EX2/LG2 get none
   (their time is then bounded by bytes only, and the table says "n/a"). The kernel table's
   column "loops by runs" counts instead every SASS instruction as often as its loop ran
   (``sass.dynamic_instructions``: the cubin's line info matched with the interpreter's counts
   of the same source sites; fallback loops that no input took count 0), per thread; it is
   what the issues' "instructions per element-iteration" targets read. (The timing columns
   still use the hot-loop estimate, the one the calibrated model was fitted with: priced by
   runs it fits the measured kernels closer and the calls out of sample worse,
   `bench/results/latency_model_recount_2026-12-02.md`.)
5. Predicted kernel time, per kernel (its launches summed) = max(bytes / 3.0 TB/s, MUFU / 3.7e12
   /s, instructions / (128 · 132 · 1.75 GHz)) ÷ min(1, programs / 132) + 4 µs per launch; the
   front end adds, per non-view host aten op, what an eager op costs, max(5 µs, the bytes it
   moves / 3.0 TB/s) (the layer's full-size host ops - the feature scale's statistics and x / s
   and their gradient - move as many bytes as a kernel; they were priced at 5 µs flat until
   2026-11-29), and 10 µs per sync (serially: a conservative model). SoL: ``bench/sol.py``
   (problem bytes, minimal exp2 count).
6. Eager torch path (backend="torch", reduced batch, bytes scaled like 3.): Σ over non-view aten
   ops of max(5 µs, op bytes (inputs + outputs) / 3.0 TB/s) + 10 µs per sync.
   torch.compile model: one fused kernel per reduction (an op whose output is smaller than its
   largest input) + one for the rest, each reading its largest input and writing its output
   once: Σ max(4 µs, bytes / 3.0 TB/s), + 10 µs per sync (a graph break). A crude model, stated
   as such; replace both with gpu_check.py measurements when a GPU is available.

Writes bench/results/kernel_report.{md,json}. Runs WITHOUT TRITON_INTERPRET (the worker sets it).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench import latency_model, sol  # noqa: E402
from bench.frontend_report import ALLOC_OPS  # noqa: E402

METHODS = ("sinkhorn", "badmm-e", "badmm-q")
SHORT = {"sinkhorn": "S", "badmm-e": "B-E", "badmm-q": "B-Q"}


# --------------------------------------------------------------------------------------------
# cases and workloads
# --------------------------------------------------------------------------------------------
def cases(quick: bool) -> list[dict]:
    out = []
    if quick:
        return [dict(workload="W1", T=4, method="sinkhorn", variant="exact", a0=0.0),
                dict(workload="W1", T=4, method="badmm-e", variant="exact", a0=0.0)]
    for wl in ("W1", "W2", "W3", "W5"):
        for T in (4, 16):
            for m in METHODS:
                out.append(dict(workload=wl, T=T, method=m, variant="exact", a0=0.0))
    for m in METHODS:   # adaptive windows that overlap (W3's image, AdaptiveROTPool2d)
        out.append(dict(workload="W3a", T=4, method=m, variant="exact", a0=0.0))
    out.append(dict(workload="W1", T=4, method="badmm-e", variant="paper", a0=0.0))
    out.append(dict(workload="W1", T=4, method="badmm-e", variant="exact", a0=0.1))
    return out


def case_id(c: dict) -> str:
    s = f"{c['workload']} T={c['T']} {SHORT[c['method']]}"
    if c["variant"] != "exact":
        s += f" {c['variant']}"
    if c["a0"]:
        s += f" a0={c['a0']}"
    return s


def _w5_ptr(sets: int | None):
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(20, 501, (128,), generator=g)
    if sets is not None:
        sizes = sizes[:sets]
    ptr = torch.zeros(sizes.numel() + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(sizes, 0)
    return ptr


def workload_input(wl: str, reduced: bool):
    """(x, ptr or None, description). Reduced: fewer sets, same per-set shape."""
    g = torch.Generator().manual_seed(0)
    if wl == "W1":
        B = 1 if reduced else 50
        return torch.randn(B, 500, 100, generator=g), None, f"{B} x 500 x 100 dense"
    if wl == "W2":
        B = 1 if reduced else 256
        return torch.randn(B, 2048, 7, 7, generator=g), None, \
            f"({B}, 2048, 7, 7) NCHW, AdaptiveROTPool2d(2048) (sets of 49 x 2048, strided)"
    if wl == "W3":
        shape = (1, 256, 8, 8) if reduced else (64, 256, 56, 56)
        return torch.randn(*shape, generator=g), None, f"{shape} ROTPool2d(256, 2)"
    if wl == "W3a":   # 56 -> 24 and 7 -> 3 give the same windows: 3 rows, 2 or 3 apart
        shape = (1, 256, 7, 7) if reduced else (64, 256, 56, 56)
        return torch.randn(*shape, generator=g), None, \
            f"{shape} AdaptiveROTPool2d(256, {W3A_OUT(shape[2])}): 3 × 3 windows, overlapping"
    if wl == "W5":
        ptr = _w5_ptr(3 if reduced else None)
        n = int(ptr[-1])
        return torch.randn(n, 128, generator=g), ptr, \
            f"ragged {ptr.numel() - 1} sets of 20-500 rows x 128 ({n} rows)"
    raise ValueError(wl)


def output_elements(wl: str, x, ptr) -> int:
    if wl == "W1":
        return x.shape[0] * x.shape[2]
    if wl == "W2":
        return x.shape[0] * x.shape[1]
    if wl == "W3":
        return x.numel() // 4
    if wl == "W3a":
        return x.shape[0] * x.shape[1] * W3A_OUT(x.shape[2]) ** 2
    return (ptr.numel() - 1) * x.shape[1]


def W3A_OUT(size: int) -> int:
    """W3a's output side: 3/7 of the image's (56 -> 24, 7 -> 3)."""
    return size * 3 // 7


def work_elements(wl: str, x, ptr) -> int:
    """The elements the algorithm works on: x's, or for W3a its windows' samples (a pixel lies
    in up to four overlapping windows: 9 samples a window, 24² windows on 56² pixels)."""
    if wl != "W3a":
        return x.numel()
    from rotp_triton.ops.rot.window_geometry import adaptive_bounds
    side = sum(e - s for s, e in adaptive_bounds(x.shape[2], W3A_OUT(x.shape[2])))
    return x.shape[0] * x.shape[1] * side * side


def make_call(c: dict, T: int, reduced: bool, backend: str):
    """(forward fn, leaves requiring grad, x) for case ``c`` with T iterations."""
    import rotp_triton as rt
    x0, ptr, _ = workload_input(c["workload"], reduced)
    x = x0.clone().requires_grad_()
    kw = dict(method=c["method"], variant=c["variant"], num_iters=T, backend=backend)
    if c["workload"] in ("W2", "W3", "W3a"):
        if c["workload"] == "W2":
            m = rt.AdaptiveROTPool2d(2048, **kw)
        elif c["workload"] == "W3a":
            m = rt.AdaptiveROTPool2d(256, W3A_OUT(x.shape[2]), **kw)
        else:
            m = rt.ROTPool2d(256, 2, **kw)
        return (lambda: m(x)), [x, *m.parameters()], x
    w = {k: torch.full((T,), 1.0, requires_grad=True) for k in ("a1", "a2", "a3")}
    extra = dict(a0=c["a0"]) if c["a0"] else {}
    return (lambda: rt.rot_pool(x, ptr=ptr, **kw, **w, **extra)), [x, *w.values()], x


def _grad(y, leaves):
    torch.autograd.grad(y.float().sum(), [t for t in leaves if t.requires_grad],
                        allow_unused=True)


# --------------------------------------------------------------------------------------------
# worker (TRITON_INTERPRET=1): kernel work at the case's T and torch-path op records
# --------------------------------------------------------------------------------------------
def _by_name(works) -> dict:
    agg = collections.defaultdict(lambda: dict(launches=0, programs=0, programs_total=0,
                                               load_bytes=0, store_bytes=0, exp2=0, log2=0,
                                               sites=collections.Counter(), site_elems={}))
    for w in works:
        a = agg[w.name]
        a["launches"] += 1
        a["programs"] = max(a["programs"], w.programs)
        a["programs_total"] += w.programs
        for k in ("load_bytes", "store_bytes", "exp2", "log2"):
            a[k] += getattr(w, k)
        a["sites"].update(w.sites)
        for k, n in w.site_elems.items():
            a["site_elems"][k] = max(a["site_elems"].get(k, 1), n)
    return {n: dict(a, sites=dict(a["sites"])) for n, a in agg.items()}


def run_reduced(c: dict, T: int, recorder) -> tuple:
    """Case ``c`` at T on the reduced batch through the Triton path, launched as for the full
    batch (``same_launch_plan``): forward, then backward, each under ``recorder()`` (a context
    manager yielding what it records). Returns the (forward, backward) records."""
    from bench.interp_counter import FULL_SETS, same_launch_plan
    fwd, leaves, x = make_call(c, T, reduced=True, backend="triton")
    _, ptr, _ = workload_input(c["workload"], reduced=True)
    reduced_sets = x.shape[0] if ptr is None else ptr.numel() - 1
    with same_launch_plan(FULL_SETS[c["workload"]], reduced_sets):
        with recorder() as wf:
            y = fwd()
        with recorder() as wb:
            _grad(y, leaves)
    return wf, wb


def kernel_work(c: dict, T: int) -> dict:
    from bench.interp_counter import count_kernel_work
    wf, wb = run_reduced(c, T, count_kernel_work)
    return dict(fwd=_by_name(wf), bwd=_by_name(wb))


def torch_ops(c: dict) -> dict:
    """aten ops of the torch path (reduced batch): [name, in bytes, out bytes, reduction]."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from bench.frontend_report import SYNC_OPS, VIEW_OPS as views

    class Rec(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            ins = [a for a in torch.utils._pytree.tree_leaves((args, kwargs))
                   if isinstance(a, torch.Tensor)]
            outs = [a for a in torch.utils._pytree.tree_leaves(out)
                    if isinstance(a, torch.Tensor)]
            nb = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
            big = max([t.numel() for t in ins], default=0)
            self.rows.append([name, nb(ins), nb(outs), bool(outs) and big > 0 and
                              max(t.numel() for t in outs) < big and name not in views,
                              name in views, name in SYNC_OPS, max([nb([t]) for t in ins],
                                                                   default=0)])
            return out

    fwd, leaves, _ = make_call(c, c["T"], reduced=True, backend="torch")
    fwd()
    r1 = Rec()
    with r1:
        y = fwd()
    r2 = Rec()
    with r2:
        _grad(y, leaves)
    return dict(fwd=r1.rows, bwd=r2.rows)


def _source_hash() -> str:
    """Hash of the package's sources, the work counter and the versions: the interpreter's counts
    depend on nothing else (set ROTP_BENCH_NO_CACHE=1 after changing the workloads here)."""
    import hashlib
    h = hashlib.sha1()
    for base in (os.path.join(ROOT, "rotp_triton"),):
        for dirpath, _, files in sorted(os.walk(base)):
            for f in sorted(files):
                if f.endswith(".py"):
                    with open(os.path.join(dirpath, f), "rb") as fh:
                        h.update(f.encode() + fh.read())
    for f in ("interp_counter.py",):
        with open(os.path.join(ROOT, "bench", f), "rb") as fh:
            h.update(fh.read())
    import triton
    h.update(triton.__version__.encode() + torch.__version__.encode())
    return h.hexdigest()[:16]


_SRC_HASH = None


def _work_cache_path(work_key) -> str | None:
    """Where the interpreter's counts of one (workload, method, variant, α0, T) are cached (the
    interpreter dominates the report's time), or None with ROTP_BENCH_NO_CACHE=1."""
    global _SRC_HASH
    if os.environ.get("ROTP_BENCH_NO_CACHE"):
        return None
    if _SRC_HASH is None:
        _SRC_HASH = _source_hash()
    name = "_".join(str(k) for k in work_key)
    return os.path.join(os.path.expanduser("~/.cache/rotp_triton_bench"), _SRC_HASH,
                        f"work_T_{name}.json")


def worker(spec_path: str, out_path: str) -> int:
    torch.set_num_threads(1)
    spec = json.load(open(spec_path))
    res = {}
    for c in spec:
        cid = case_id(c)
        work_key = (c["workload"], c["method"], c["variant"], c["a0"], c["T"]) + (
            (c["tune"],) if c.get("tune") else ())
        t0 = time.time()
        path = _work_cache_path(work_key)
        if path and os.path.exists(path):
            work = json.load(open(path))
        else:
            with tuned(c):
                work = kernel_work(c, c["T"])    # at the case's own T: its own schedule
            if path:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                json.dump(work, open(path, "w"))
        res[cid] = dict(work=work, torch=torch_ops(c))
        print(f"  [worker] {cid}: {time.time() - t0:.1f} s", flush=True)
    json.dump(res, open(out_path, "w"))
    return 0


def tuned(c: dict):
    """The launch-configuration variant of ``bench/gpu_tune.py`` that case ``c`` names
    (``--variant``), patched into the launchers; a no-op context otherwise."""
    import contextlib
    if not c.get("tune"):
        return contextlib.nullcontext()
    from bench import gpu_tune
    for wl, method, name, patches in gpu_tune.variants():
        if (wl, method, name) == (c["workload"], c["method"], c["tune"]):
            return gpu_tune.patched(patches)
    raise ValueError(f"no gpu_tune variant {c['tune']!r} for {c['workload']} {c['method']}")


# --------------------------------------------------------------------------------------------
# main process: record launches, compile, read SASS, predict
# --------------------------------------------------------------------------------------------
def record_case(c: dict):
    """Full-size launches (fwd, bwd) and host ops (fwd, fwd+bwd) of the Triton path."""
    from bench.frontend_report import VIEW_OPS as views, count_host_ops
    from bench.launch_recorder import h100_host, record_launches
    out = {}
    with h100_host(), tuned(c):
        fwd, leaves, x = make_call(c, c["T"], reduced=False, backend="triton")
        with record_launches() as lf:
            ops_f, syncs_f = count_host_ops(fwd)
        y = None
        with record_launches() as lb:
            def fb():
                nonlocal y
                y = fwd()
                _grad(y, leaves)
            ops_fb, syncs_fb = count_host_ops(fb)
    nv = lambda ops: sum(n for k, n in ops.items() if k not in views)  # noqa: E731
    n_f = len(lf)
    out["launches_fwd"] = lf
    out["launches_bwd"] = lb[n_f:]  # fb re-runs the forward first
    nb = lambda ops: [b for n, b in ops.op_bytes if n not in views]  # noqa: E731
    out["host"] = dict(fwd_ops=nv(ops_f), fwd_syncs=syncs_f, fwd_bwd_ops=nv(ops_fb),
                       fwd_bwd_syncs=syncs_fb, fwd_op_bytes=nb(ops_f),
                       fwd_bwd_op_bytes=nb(ops_fb))
    out["x_elements"] = x.numel()
    out["work_elements"] = work_elements(c["workload"], x, None)   # the per el-it divisor
    out["x_bytes"] = x.element_size()
    return out


def front_end_seconds(op_bytes, syncs: int) -> float:
    """The Triton path's host front end: each non-view host aten op priced as an eager op,
    max(5 µs, bytes it moves / HBM bandwidth) - the layer's own full-size ops (the feature
    scale's statistics and x / s, the gradient's casts) move as many bytes as a kernel - plus
    10 µs per sync."""
    return sum(max(sol.ATEN_OP_S, b / sol.HBM_BYTES_PER_S) for b in op_bytes) + \
        syncs * sol.SYNC_S


def predict_torch(rows, scale: float) -> tuple[float, float, int, int]:
    """(eager s, compile s, non-view ops, syncs) of a recorded torch-path pass."""
    eager = comp = 0.0
    ops = syncs = 0
    fused_rest = 0.0
    for name, b_in, b_out, is_red, is_view, is_sync, big_in in rows:
        if is_sync:
            syncs += 1
            eager += sol.SYNC_S
            comp += sol.SYNC_S
        if is_view or is_sync:
            continue
        ops += 1
        if name in ALLOC_OPS:           # an allocation moves no bytes (as front_end_seconds)
            b_in = b_out = 0
        eager += max(sol.ATEN_OP_S, (b_in + b_out) * scale / sol.HBM_BYTES_PER_S)
        if is_red:
            comp += max(sol.LAUNCH_S, (big_in + b_out) * scale / sol.HBM_BYTES_PER_S)
        else:
            fused_rest = max(fused_rest, b_out * scale)
    comp += max(sol.LAUNCH_S, fused_rest / sol.HBM_BYTES_PER_S)
    return eager, comp, ops, syncs


def _hot_loop_that_ran(a: dict, dyn: dict) -> dict | None:
    """The hot loop among the innermost loops that ran: the one with the most MUFU (then the
    most instructions) of those that executed any instruction by ``sass.dynamic_instructions``
    (``dyn``). A fallback's copy of a loop that no input takes - as big as the loop it stands
    in for, or bigger - is not it. None without such a loop."""
    ran = {(int(L["loop"][0], 16), int(L["loop"][1], 16)) for L in dyn.get("loops", [])
           if L["loop"] and L["instructions"] > 0}
    inner = [L for L in a.get("innermost_loops") or [] if (L["start"], L["end"]) in ran]
    return max(inner, key=lambda L: (L["mix"]["MUFU"], L["mix"]["total"]), default=None)


def analyse(c, rec, work, scale, sass_cache):
    from bench import sass
    T = c["T"]
    el = rec.get("work_elements", rec["x_elements"])
    res = dict(case=case_id(c), **{k: c[k] for k in ("workload", "T", "method", "variant", "a0")})
    kernels = {}
    for pass_ in ("fwd", "bwd"):
        launches = rec[f"launches_{pass_}"]
        by_name = collections.defaultdict(list)
        for L in launches:
            by_name[L.name].append(L)
        for name, Ls in by_name.items():
            ks = []
            for L in Ls:
                k = L.key()
                if k not in sass_cache:
                    try:
                        sass_cache[k] = sass.analyse_launch(L)
                    except Exception as e:  # a kernel ptxas rejects: reported, not hidden
                        sass_cache[k] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
                ks.append(sass_cache[k])
            a = ks[0]
            got = work["work"][pass_].get(name)
            if got is None:
                w = dict(load_bytes=0, store_bytes=0, exp2=0, log2=0)
                note = "not seen under the interpreter"
            else:
                # A kernel whose grid is the same at the reduced and the full batch (the weight
                # table, per-call coefficients) does the same work at both: not scaled.
                same_grid = (got.get("programs") == max(L.programs for L in Ls)
                             and got["launches"] == len(Ls))
                k_scale = 1.0 if same_grid else scale
                w = {k: got[k] * k_scale for k in ("load_bytes", "store_bytes", "exp2", "log2")}
                note = "grid independent of the batch: not scaled" if same_grid else ""
            mufu_dyn = w["exp2"] + w["log2"]
            # every instruction weighted by its loop's runs (sass.dynamic_instructions): the
            # loops of fallback branches count as often as the interpreter took them
            dyn_ei = dyn_mufu = None
            hot = a.get("hot") or {}
            if got is not None and got.get("sites") and not a.get("error"):
                d = sass.dynamic_instructions(sass.compile_launch(Ls[0]).asm["cubin"],
                                              got["sites"], got["programs_total"],
                                              got.get("site_elems"), Ls[0].num_warps * 32)
                thr = Ls[0].num_warps * 32 * k_scale
                dyn_ei = d["instructions"] * thr / (el * T)
                # thread MUFU by those runs ÷ the interpreter's element count: ~1 when the
                # weighting is right (above 1 by the lanes that compute a vector replicated)
                dyn_mufu = d["mufu"] * thr / mufu_dyn if mufu_dyn else None
                hot = _hot_loop_that_ran(a, d) or hot
            hmix = hot.get("mix", {})
            ex = hmix.get("EX2LG2", 0)
            per_ei = {}
            instr = None
            if ex:
                instr = mufu_dyn * hmix["total"] / ex
                for cat in ("total", "MUFU", "FP32", "SHFL", "BAR", "LDG", "STG"):
                    per_ei[cat] = mufu_dyn * hmix[cat] / ex / (el * T)
            programs = max(L.programs for L in Ls)
            frac = min(1.0, programs / sol.H100_SMS)
            nbytes = w["load_bytes"] + w["store_bytes"]
            t_mem = nbytes / sol.HBM_BYTES_PER_S
            t_sfu = mufu_dyn / sol.sfu_rate()
            t_issue = (instr or 0) / sol.issue_rate()
            t = max(t_mem, t_sfu, t_issue) / frac + sol.LAUNCH_S * len(Ls)
            bound = max((t_mem, "memory"), (t_sfu, "SFU"), (t_issue, "issue"))[1]
            kernels[f"{pass_}:{name}"] = dict(
                pass_=pass_, name=name, launches=len(Ls), distinct_specialisations=len(
                    {L.key() for L in Ls}), grid=list(Ls[0].grid), programs=programs,
                num_warps=Ls[0].num_warps, num_stages=Ls[0].num_stages,
                regs=a.get("regs"), local_bytes=a.get("local_bytes"),
                stack_bytes=a.get("stack_bytes"),
                spill_ldl_stl=a.get("spill_ldl_stl"), shared_bytes=a.get("shared_bytes"),
                loops=a.get("loops"), hot_loop_mix=hmix, per_element_iteration=per_ei,
                dynamic_instructions_per_element_iteration=dyn_ei, dynamic_mufu_ratio=dyn_mufu,
                bytes=nbytes, mufu=mufu_dyn, instructions=instr, predicted_s=t, bound=bound,
                note=note, error=a.get("error"))
    res["kernels"] = kernels
    return res


def add_calibrated(row: dict) -> None:
    """The calibrated model's times (``bench/latency_model.py``, fitted to the H200) beside the
    first model's, in place: per kernel ``calibrated_s`` and per pass ``kernel_cal_s``,
    ``host_cal_s`` (the fitted host front end) and ``predicted_cal_s`` (the larger of the two),
    its ratios to SoL, eager and torch.compile.
    Needs only what a report JSON stores, so an old report can be repriced (``--reprice``)."""
    for k in row["kernels"].values():
        k["calibrated_s"] = None if k.get("error") else latency_model.calibrated_seconds(k)
    for pass_, s in row["summary"].items():
        passes = ("fwd",) if pass_ == "fwd" else ("fwd", "bwd")
        ks = [k for k in row["kernels"].values() if k["pass_"] in passes]
        cal = [k["calibrated_s"] for k in ks]
        if any(c is None for c in cal):
            s.update(kernel_cal_s=None, predicted_cal_s=None, host_cal_s=None,
                     kernel_cal_ratio_to_sol=None,
                     speedup_vs_eager_cal=None, speedup_vs_compile_cal=None)
            continue
        total = latency_model.call_seconds(pass_, s["launches"], sum(cal))
        s.update(kernel_cal_s=sum(cal), predicted_cal_s=total,
                 host_cal_s=latency_model.host_seconds(pass_, s["launches"]),
                 kernel_cal_ratio_to_sol=sum(cal) / s["sol_s"],
                 speedup_vs_eager_cal=s["eager_s"] / total,
                 speedup_vs_compile_cal=s["compile_s"] / total)


def summarise(c, rec, res, torch_rows, scale, x_el_full, y_el_full, x_bytes,
              work_el_full=None):
    """``work_el_full``: the elements the algorithm works on where they are not x's (W3a's
    overlapping windows): the SoL's transcendentals and the per element-iteration counts."""
    T = c["T"]
    work = work_el_full or x_el_full
    structure = bool(c["a0"])
    out = {}
    for pass_, passes in (("fwd", ("fwd",)), ("fwd+bwd", ("fwd", "bwd"))):
        ks = [k for k in res["kernels"].values() if k["pass_"] in passes]
        bwd = pass_ != "fwd"
        kernel_s = sum(k["predicted_s"] for k in ks)
        h = rec["host"]
        ops, syncs, op_bytes = (h["fwd_ops"], h["fwd_syncs"], h["fwd_op_bytes"]) if not bwd \
            else (h["fwd_bwd_ops"], h["fwd_bwd_syncs"], h["fwd_bwd_op_bytes"])
        front = front_end_seconds(op_bytes, syncs)
        pb = sol.problem_bytes(x_el_full, x_bytes, y_el_full, x_bytes, backward=bwd)
        ex = sol.min_transcendentals(work, T, backward=bwd, structure=structure)
        sol_s, sol_bound = sol.sol_seconds(pb, ex)
        e1, c1, o1, s1 = predict_torch(torch_rows["fwd"], scale)
        if bwd:
            e2, c2, o2, s2 = predict_torch(torch_rows["bwd"], scale)
            e1, c1, o1, s1 = e1 + e2, c1 + c2, o1 + o2, s1 + s2
        total = kernel_s + front
        mufu = sum(k["mufu"] for k in ks)
        instr = [k["instructions"] for k in ks]
        out[pass_] = dict(
            launches=sum(k["launches"] for k in ks), kernel_s=kernel_s, front_end_s=front,
            host_ops=ops, host_syncs=syncs, predicted_s=total,
            hbm_bytes=sum(k["bytes"] for k in ks), problem_bytes=pb,
            mufu=mufu, mufu_per_element_iteration=mufu / (work * T),
            min_exp2=ex, instructions=sum(i for i in instr if i) if any(instr) else None,
            sol_s=sol_s, sol_bound=sol_bound, eager_s=e1, eager_ops=o1, eager_syncs=s1,
            compile_s=c1, ratio_to_sol=total / sol_s, kernel_ratio_to_sol=kernel_s / sol_s,
            speedup_vs_eager=e1 / total, speedup_vs_compile=c1 / total)
    return out


def selected(cid: str, only: str) -> bool:
    """Whether ``--only`` keeps case ``cid``: any of its ';'-separated filters is a substring of
    it, or, ending in '$', the whole of it."""
    return any(cid == f[:-1] if f.endswith("$") else f in cid for f in only.split(";"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one workload (W1, T=4, S and B-E)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--only", default="", help="filter on case ids: a substring, or several "
                   "separated by ';' (a case is kept if any matches); a filter ending in '$' "
                   "matches a whole id ('W1 T=4 B-E$' leaves out 'W1 T=4 B-E paper')")
    p.add_argument("--variant", default="", help="price a launch-configuration variant of "
                   "bench/gpu_tune.py (its name, e.g. 'row-piece forward: 8 warps') for the "
                   "cases of its workload and method")
    p.add_argument("--reprice", metavar="JSON", help="add the calibrated model's columns to a "
                   "stored report (written to --out under the same name; nothing compiled)")
    p.add_argument("--jobs", type=int, default=1, help="interpreter workers (processes) that "
                   "count the cases' traffic side by side, each with its share of the cases "
                   "(the compiles run beside them in this process); the report is the same")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    if args.reprice:
        return reprice(args.reprice, args.out)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernel_report: run WITHOUT TRITON_INTERPRET (kernels are compiled for sm_90)")
        return 2
    from bench import sass
    if sass.tool("nvdisasm") is None or sass.tool("cuobjdump") is None:
        print("kernel_report: nvdisasm/cuobjdump not found (they ship with triton's nvidia "
              "backend)")
        return 2
    t_start = time.time()
    cs = [c for c in cases(args.quick) if selected(case_id(c), args.only)]
    if args.variant:
        from bench import gpu_tune
        which = {(wl, m) for wl, m, name, _ in gpu_tune.variants() if name == args.variant}
        if not which:
            print(f"kernel_report: no gpu_tune variant named {args.variant!r}")
            return 2
        cs = [dict(c, tune=args.variant) for c in cs if (c["workload"], c["method"]) in which
              and c["variant"] == "exact" and not c["a0"]]
    tmp = tempfile.mkdtemp(prefix="kernel_report_")
    # the cases dealt round-robin to the workers (the slow T = 16 B-ADMM ones spread out)
    jobs = max(1, min(args.jobs, len(cs)))
    shares = [(os.path.join(tmp, f"spec{i}.json"), os.path.join(tmp, f"work{i}.json"))
              for i in range(jobs)]
    for i, (spec, _) in enumerate(shares):
        json.dump(cs[i::jobs], open(spec, "w"))
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    # ROTP_REPORT_WORKER_PYTHONPATH: the interpreter worker's own PYTHONPATH, so that this
    # process can compile with another triton (e.g. a GPU image's 3.6, put first on PYTHONPATH)
    # while the traffic is counted under the installed one (3.6's interpreter fails here)
    if "ROTP_REPORT_WORKER_PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["ROTP_REPORT_WORKER_PYTHONPATH"]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", spec, wout],
                              env=env, cwd=ROOT)    # they run while this process compiles
             for spec, wout in shares]
    torch.set_num_threads(1)
    recs, sass_cache = {}, {}
    for c in cs:
        t0 = time.time()
        rec = recs[case_id(c)] = record_case(c)
        for L in rec["launches_fwd"] + rec["launches_bwd"]:
            if L.key() not in sass_cache:
                try:
                    sass_cache[L.key()] = sass.analyse_launch(L)
                except Exception as e:
                    sass_cache[L.key()] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        print(f"{case_id(c)}: {len(rec['launches_fwd'])} + {len(rec['launches_bwd'])} launches, "
              f"{len(sass_cache)} kernels compiled so far ({time.time() - t0:.1f} s)",
              flush=True)
    work = {}
    for proc, (_, wout) in zip(procs, shares):
        rc = proc.wait()
        if rc != 0:
            print(f"kernel_report: interpreter worker failed (exit {rc})")
            return 1
        work.update(json.load(open(wout)))
    rows = []
    for c in cs:
        cid = case_id(c)
        x_full, ptr_full, desc = workload_input(c["workload"], reduced=False)
        x_red, ptr_red, _ = workload_input(c["workload"], reduced=True)
        scale = x_full.numel() / x_red.numel()
        rec = recs[cid]
        res = analyse(c, rec, work[cid], scale, sass_cache)
        res["workload_desc"] = desc
        res["scale"] = scale
        res["summary"] = summarise(c, rec, res, work[cid]["torch"], scale, x_full.numel(),
                                   output_elements(c["workload"], x_full, ptr_full),
                                   x_full.element_size(),
                                   work_elements(c["workload"], x_full, ptr_full))
        add_calibrated(res)
        rows.append(res)
    meta = dict(torch=torch.__version__, triton=__import__("triton").__version__,
                date=time.strftime("%Y-%m-%d"), quick=args.quick, tune=args.variant,
                git=_git_rev(), seconds=round(time.time() - t_start, 1),
                model=dict(hbm_bytes_per_s=sol.HBM_BYTES_PER_S, sfu_per_s=sol.sfu_rate(),
                           issue_per_s=sol.issue_rate(), sms=sol.H100_SMS,
                           clock_hz=sol.SUSTAINED_SM_CLOCK_HZ, launch_s=sol.LAUNCH_S,
                           aten_op_s=sol.ATEN_OP_S, sync_s=sol.SYNC_S,
                           **_calibration_meta()))
    write(args.out, meta, rows, "kernel_report")
    print(f"wrote {args.out}/kernel_report.{{md,json}} in {time.time() - t_start:.0f} s")
    return 0


def _calibration_meta() -> dict:
    return dict(bytes_per_s_per_warp=latency_model.BYTES_PER_S_PER_WARP,
                lane_instr_per_s_per_warp=latency_model.LANE_INSTR_PER_S_PER_WARP)


def write(out_dir: str, meta: dict, rows: list, stem: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    md = markdown(meta, rows)
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(md)
    print(md)


def reprice(path: str, out_dir: str) -> int:
    """Re-render a stored report (JSON) with the calibrated model's columns: no compile, no
    interpreter; the first model's numbers are kept as they were."""
    with open(path) as f:
        rep = json.load(f)
    for r in rep["rows"]:
        add_calibrated(r)
    rep["meta"]["model"].update(_calibration_meta())
    rep["meta"]["repriced"] = f"{time.strftime('%Y-%m-%d')} at {_git_rev()}"
    write(out_dir, rep["meta"], rep["rows"], os.path.splitext(os.path.basename(path))[0])
    return 0


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True).stdout.strip()
    except Exception:
        return "?"


def _us(s) -> str:
    return "n/a" if s is None else f"{s * 1e6:,.0f}"


def _x(v) -> str:
    return "n/a" if v is None else f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def resident_warps(k: dict) -> int:
    """Warps of this kernel resident on one SM (``latency_model.machine_warps`` over the SMs it
    occupies): few warps mean latency is not hidden (the calibrated model's premise)."""
    return round(latency_model.machine_warps(k) / max(min(sol.H100_SMS, int(k["programs"])), 1))


def markdown(meta, rows) -> str:
    m = meta["model"]
    L = ["# Kernel report - PREDICTIONS for one H100 (computed on a CPU, nothing measured)", "",
         f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['git']}, {meta['date']}"
         f"{' (--quick)' if meta['quick'] else ''}"
         + (f"; launch-configuration variant '{meta['tune']}' of bench/gpu_tune.py"
            if meta.get("tune") else "") + f"; {meta['seconds']} s to produce"
         + (f"; calibrated columns added {meta['repriced']} (`--reprice`: same counts)"
            if meta.get("repriced") else "") + ".", "",
         "How each number is made: `bench/kernel_report.py` docstring and `bench/README.md`. "
         f"Model: HBM {m['hbm_bytes_per_s'] / 1e12:.1f} TB/s, SFU {m['sfu_per_s'] / 1e12:.2f}e12 "
         f"exp2/s, issue 128 lanes x {m['sms']} SMs x {m['clock_hz'] / 1e9:.2f} GHz, "
         f"{m['launch_s'] * 1e6:.0f} µs/launch, max({m['aten_op_s'] * 1e6:.0f} µs, bytes / HBM) "
         "per host aten op, "
         f"{m['sync_s'] * 1e6:.0f} µs/sync. HBM bytes and MUFU counts come from the interpreter "
         "on fewer sets (same per-set shape) scaled by the element ratio, at the case's own T "
         "(the schedule the launcher picks for it; nothing extrapolated); bytes are global "
         "loads + stores (L2 hits not modelled: an upper "
         "bound on HBM traffic: W1 (10 MB) and a W5 set fit in the 50 MB L2, so their "
         "'memory' bounds are pessimistic). Not modelled: load imbalance across programs (W5's "
         "largest set), overlap of the host front end with kernels (added serially), "
         "occupancy beyond programs ÷ 132. The torch.compile column is a crude fusion model.",
         "",
         "**Checked on a GPU** (H200, torch 2.11, triton 3.6, 2026-11-29: "
         "`bench/results/gpu_vs_prediction_2026-11-29.md`): kernels with few resident warps "
         "per SM (column 'warps / SM' below; ~8 for "
         "the one-program-per-set kernels) ran 2-7× slower than predicted - latency is not "
         "modelled (reading that device's triton 3.6 SASS predicts the same times) - while "
         "a kernel with ~24 ran on its prediction (so the bytes and instructions look counted "
         "right); the host front end cost ~1.5 ms per "
         "W1 fwd+bwd where the model prices ~50 µs. Read the first model's µs as a lower "
         "bound. The **calibrated** columns price the kernels by occupancy instead "
         "(`bench/latency_model.py`, fitted to that run's kernel profile): on the run's "
         "kernel-bound calls outside the fit (W2 and W3 at T = 16, W3 at T = 4) measured ÷ "
         "calibrated was 0.52-1.31 where measured ÷ first model was 1.6-4.2 "
         "(`bench/results/latency_model_fit_2026-11-30.md`).",
         "",
         "## Summary (every time a PREDICTION)", "",
         "| case | pass | launches | host ops / syncs | kernel µs | front end µs | predicted µs "
         "| SoL µs (bound) | ÷ SoL | kernel ÷ SoL | × eager | × compile | HBM bytes ÷ problem "
         "| MUFU / el-it (min) | calibrated: kernel µs | host µs | call µs | kernel ÷ SoL | "
         "× eager | × compile |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for pass_, s in r["summary"].items():
            el_it = s["mufu_per_element_iteration"]
            min_el_it = s["min_exp2"] / (s["mufu"] / el_it) if s["mufu"] and el_it else None
            L.append(
                f"| {r['case']} | {pass_} | {s['launches']} | {s['host_ops']} / "
                f"{s['host_syncs']} | {_us(s['kernel_s'])} | {_us(s['front_end_s'])} | "
                f"{_us(s['predicted_s'])} | {_us(s['sol_s'])} ({s['sol_bound']}) | "
                f"{_x(s['ratio_to_sol'])} | {_x(s['kernel_ratio_to_sol'])} | "
                f"{_x(s['speedup_vs_eager'])} | {_x(s['speedup_vs_compile'])} | "
                f"{_x(s['hbm_bytes'] / s['problem_bytes'])} | {el_it:.2f} "
                f"({'n/a' if min_el_it is None else f'{min_el_it:.2f}'}) | "
                f"{_us(s.get('kernel_cal_s'))} | {_us(s.get('host_cal_s'))} | "
                f"{_us(s.get('predicted_cal_s'))} | {_x(s.get('kernel_cal_ratio_to_sol'))} | "
                f"{_x(s.get('speedup_vs_eager_cal'))} | {_x(s.get('speedup_vs_compile_cal'))} |")
    L += ["", "× eager / × compile: predicted eager (torch.compile) time ÷ predicted Triton time "
          "(> 1: the Triton path is faster). ÷ SoL includes the front end; kernel ÷ SoL does "
          "not. MUFU / el-it: dynamic exp2+log2 per element-iteration (N·D·T), with the "
          "algorithm's minimum in brackets. Calibrated: the kernels priced by "
          "`bench/latency_model.py` instead (a resident warp sustains "
          f"{m.get('bytes_per_s_per_warp', latency_model.BYTES_PER_S_PER_WARP):.3g} B/s and "
          f"{m.get('lane_instr_per_s_per_warp', latency_model.LANE_INSTR_PER_S_PER_WARP):.3g} "
          "thread instructions/s, memory and issue not overlapped; fitted to 14 kernels "
          "measured on the H200, × 1.33 rms, leave-one-out 0.48-1.79); host: the front end "
          "fitted to that run's host-bound calls (W1, W5: "
          f"{latency_model.HOST_CALL_S['fwd'] * 1e6:.0f} / "
          f"{latency_model.HOST_CALL_S['fwd+bwd'] * 1e6:.0f} µs per forward / forward+backward "
          f"call + {latency_model.HOST_PER_LAUNCH_S * 1e6:.0f} µs per launch, × 1.17 rms); "
          "call: the larger of the two (the host enqueues while the GPU runs) - also a "
          "PREDICTION.", "",
          "## Kernels (per case; SASS of the sm_90 build of the recorded launch)", "",
          "| case | kernel | launches | grid | programs ÷ 132 | warps / stages | regs | "
          "warps / SM | spill (stack + local B, LDL+STL) | smem B | hot loop: instr / MUFU / "
          "FP32 / SHFL "
          "/ BAR / LDG+STG | per el-it: instr / MUFU / FP32 / SHFL | per el-it: instr, loops "
          "by runs (MUFU by runs ÷ counted) | GB | bound | µs | calibrated µs | note |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for k in r["kernels"].values():
            if k.get("error"):
                L.append(f"| {r['case']} | {k['pass_']}:{k['name']} | {k['launches']} | "
                         f"compile error: {k['error'][:120]} ||||||||||||||")
                continue
            h = k["hot_loop_mix"]
            pe = k["per_element_iteration"]
            hot = (f"{h.get('total', 0)} / {h.get('MUFU', 0)} / {h.get('FP32', 0)} / "
                   f"{h.get('SHFL', 0)} / {h.get('BAR', 0)} / "
                   f"{h.get('LDG', 0) + h.get('STG', 0)}") if h else "no loop"
            per = (f"{pe['total']:.1f} / {pe['MUFU']:.2f} / {pe['FP32']:.1f} / "
                   f"{pe['SHFL']:.2f}") if pe else "n/a"
            dyn = k.get("dynamic_instructions_per_element_iteration")
            mr = k.get("dynamic_mufu_ratio")
            dyn = "n/a" if dyn is None else f"{dyn:.1f}" + ("" if mr is None else f" ({mr:.2f})")
            L.append(
                f"| {r['case']} | {k['pass_']}:{k['name']} | {k['launches']} | "
                f"{tuple(k['grid'])} | {k['programs'] / sol.H100_SMS:.2f} | {k['num_warps']} / "
                f"{k['num_stages']} | {k['regs']} | {resident_warps(k)} | "
                f"{(k.get('stack_bytes') or 0) + (k['local_bytes'] or 0)}, "
                f"{k['spill_ldl_stl']} | "
                f"{k['shared_bytes']} | {hot} | {per} | {dyn} | {k['bytes'] / 1e9:.3f} | "
                f"{k['bound']} | "
                f"{_us(k['predicted_s'])} | {_us(k.get('calibrated_s'))} | {k['note']} |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
