"""CPU benchmark of the torch path of ``rot_pool`` on the paper's Fig. 8 workload.

50 sets × 500 samples × 100 features (dense ``(B, N, D)``, float32), T = 4 unrolled modules, for
S, B-E and B-Q (exact variant, α0 = 0), one α0 > 0 row (B-E, α0 = 0.1) and mean pooling as the
baseline, all in the same run:

* time of the forward (under ``torch.no_grad()``: inference) and of forward + backward (x and
  every weight, as (T,) tensors, require grad - except α0 = 0, kept constant because a
  learnable α0 selects the α0 > 0 algorithm; the loss is ``y.sum()``), by pytest-benchmark;
* peak memory of the same call: the largest number of bytes of tensor storage alive at once
  during the call, above what was alive before it, read from PyTorch's profiler
  (``torch.profiler.profile(profile_memory=True)``: every CPU allocation and free of the
  c10 allocator with the running total; ``tracemalloc`` would not see them, it only tracks
  Python's own allocator). Measured in a separate, untimed call.

Run (not part of the test suite):

    python -m pytest bench/test_bench_cpu.py --benchmark-only
    ROTP_BENCH_OUT=bench/results/cpu_$(date +%F).md python -m pytest bench/test_bench_cpu.py \
        --benchmark-only            # also writes a Markdown table of time and peak memory

Environment: ``ROTP_BENCH_THREADS`` sets torch's CPU threads (default: torch's default).
"""
from __future__ import annotations

import datetime
import os
import platform
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import rotp_triton as rt  # noqa: E402
from bench import common  # noqa: E402
from rotp_triton.ops.rot.params import wants_structure  # noqa: E402

B, N, D, T = 50, 500, 100, 4
if os.environ.get("ROTP_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["ROTP_BENCH_THREADS"]))

# (row label, method or None for mean pooling, a0)
CASES = [
    ("mean pooling", None, 0.0),
    ("S, exact, α0 = 0", "sinkhorn", 0.0),
    ("B-E, exact, α0 = 0", "badmm-e", 0.0),
    ("B-Q, exact, α0 = 0", "badmm-q", 0.0),
    ("B-E, exact, α0 = 0.1", "badmm-e", 0.1),
]
IDS = ["mean", "sinkhorn", "badmm-e", "badmm-q", "badmm-e-a0"]
ROWS: dict = {}   # (label, mode) -> {"median_s", "peak_mib"}


def make_inputs(method, a0, grad: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, D, generator=g).requires_grad_(grad)
    w = {k: torch.full((T,), v).requires_grad_(grad)
         for k, v in dict(a0=a0, a1=1.0, a2=1.0, a3=1.0, rho=1.0, tau=1.0).items()}
    if a0 == 0:
        # a0 that requires grad selects the α0 > 0 algorithm (rot_pool's rule): keep it constant
        w["a0"] = w["a0"].detach()
    assert wants_structure(w["a0"]) == (a0 > 0)
    return x, w


def pool(x, w, method):
    if method is None:
        return x.mean(1)
    return rt.rot_pool(x, method=method, variant="exact", num_iters=T, backend="torch", **w)


def forward_call(method, a0):
    x, w = make_inputs(method, a0, grad=False)

    def run():
        with torch.no_grad():
            return pool(x, w, method)
    return run


def forward_backward_call(method, a0):
    x, w = make_inputs(method, a0, grad=True)
    leaves = [x] + [v for v in w.values() if method is not None and v.requires_grad]

    def run():
        for t in leaves:
            t.grad = None
        pool(x, w, method).sum().backward()
    return run


def peak_bytes(fn) -> int:
    """Peak bytes of CPU tensor storage alive during ``fn()`` above the level at its start."""
    return common.cpu_peak_bytes(fn)


@pytest.mark.parametrize("label,method,a0", CASES, ids=IDS)
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_rot_pool_cpu(benchmark, label, method, a0, mode):
    make = forward_call if mode == "forward" else forward_backward_call
    fn = make(method, a0)
    fn()  # warm-up (and checks it runs)
    peak = peak_bytes(fn)
    benchmark.group = mode
    benchmark.extra_info.update(peak_mib=peak / 2**20, workload=f"B={B} N={N} D={D} T={T}")
    rounds = 20 if method is None else 5
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    if benchmark.stats is None:  # --benchmark-disable: fn ran once, no timing to record
        return
    stats = benchmark.stats.stats if hasattr(benchmark.stats, "stats") else benchmark.stats
    ROWS[(label, mode)] = dict(median_s=stats.median, min_s=stats.min, peak_mib=peak / 2**20,
                               rounds=rounds)


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


@pytest.fixture(scope="module", autouse=True)
def markdown_report():
    """With ROTP_BENCH_OUT set, write the Markdown table of time and memory after the run."""
    yield
    out = os.environ.get("ROTP_BENCH_OUT")
    if not out or not ROWS:
        return
    x_mib = B * N * D * 4 / 2**20
    lines = [
        f"# CPU path of rot_pool, Fig. 8 workload ({datetime.date.today().isoformat()})",
        "",
        f"B = {B} sets × N = {N} samples × D = {D} features, float32, dense, T = {T}; weights "
        "α1 = α2 = α3 = ρ = 1 as (T,) tensors; `backend=\"torch\"`. Forward under no_grad; "
        "forward+backward with x and every weight requiring grad (loss y.sum()), except a "
        "zero α0, which stays constant (a learnable α0 selects the α0 > 0 algorithm). Time: median "
        "(min) over the rounds of pytest-benchmark (5 for ROT, 20 for mean pooling); the ratio "
        "uses the minima, the least disturbed by other jobs on a shared machine. Peak: the most "
        "bytes of tensor storage alive "
        "at once during the call, above the level before it (torch.profiler memory events; "
        f"the input x itself is {x_mib:.1f} MiB).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"torch threads: {torch.get_num_threads()}; load average at the end "
        f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} (the machine was shared: absolute "
        "times are inflated by contention, ratios to mean pooling in the same run less so).",
        "",
        "| case | mode | time median (min) | min ÷ mean pooling's min | peak memory |",
        "|---|---|---|---|---|",
    ]
    for mode in ("forward", "forward+backward"):
        base = ROWS.get(("mean pooling", mode), {}).get("min_s")
        for label, _, _ in CASES:
            r = ROWS.get((label, mode))
            if r is None:
                continue
            ratio = f"{r['min_s'] / base:.0f}×" if base else "-"
            peak = fmt_bytes(r["peak_mib"] * 2**20)
            lines.append(f"| {label} | {mode} | {r['median_s'] * 1e3:.1f} ms "
                         f"({r['min_s'] * 1e3:.1f}) | {ratio} | {peak} |")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
