"""Helpers shared by the GPU benchmark scripts (bench_triton_set.py, bench_image.py,
bench_triton_structure.py): the no-GPU guard, the machine description (SMs, SM clock, assumed
SFU rate, measured copy bandwidth), timing with peak memory, and writing the results.

Every helper takes ``device`` ("cuda", or "cpu" in a script's CPU smoke mode, where the CUDA
calls are skipped and timings come from a wall-clock stand-in for ``do_bench``). Nothing here
imports triton at import time: a smoke run must set TRITON_INTERPRET before triton is imported.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import time
from typing import NamedTuple

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

from bench import sol  # noqa: E402  (the SoL formula and rates every script shares)

# exp2 per SM per clock assumed for the speed of light (the SFU throughput of sm_80/sm_90)
SFU_PER_SM_PER_CLK = sol.SFU_PER_SM_PER_CLK


def no_gpu(script: str, hint: str = "") -> bool:
    """True (after printing why) when there is no CUDA device: the caller returns 0."""
    if torch.cuda.is_available():
        return False
    print(f"{script}: no CUDA device - this benchmark measures GPU kernels; nothing to do "
          f"(exit 0).{' ' + hint if hint else ''}")
    return True


def select_device(smoke: bool, script: str, hint: str = "") -> str | None:
    """The device to benchmark on: "cpu" for a smoke run (the Triton interpreter switched on:
    call this before triton is imported), "cuda" on a GPU, None (after printing why: the
    caller returns 0) otherwise."""
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        return "cpu"
    return None if no_gpu(script, hint) else "cuda"


def cuda(name: str, device: str, default=0):
    """torch.cuda.<name>() on a GPU run; ``default`` in the CPU smoke run."""
    return getattr(torch.cuda, name)() if device == "cuda" else default


def wall_clock_bench(fn, return_mode="median", **_):
    """Stand-in for triton.testing.do_bench in the CPU smoke runs: median ms of 2 calls."""
    ts = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def sm_clock_hz() -> float:
    """Max SM clock: nvidia-smi if present, else torch's property, else the H100 SXM boost."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=20).stdout
        return float(out.strip().splitlines()[0]) * 1e6
    except Exception:
        pass
    khz = getattr(torch.cuda.get_device_properties(0), "clock_rate", None)
    return float(khz) * 1e3 if khz else 1.98e9


def copy_bandwidth(do_bench, device: str, cpu_elements: int = 1 << 20) -> float:
    """Bytes/s of a device-to-device copy (read + write) of 1 GiB of fp32 on the GPU,
    ``cpu_elements`` fp32 in a smoke run."""
    n = 1 << 28 if device == "cuda" else cpu_elements
    a = torch.empty(n, device=device, dtype=torch.float32)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), return_mode="median")
    a = b = None  # free them before emptying the cache
    cuda("empty_cache", device)
    return 2 * n * 4 / (ms * 1e-3)


class Machine(NamedTuple):
    device: str                       # name
    sms: int
    sm_clock_hz: float                # max SM clock (reported; the SFU rate uses the sustained)
    sfu_rate_per_s: float             # assumed: 16 x SMs x sustained clock (1.75 GHz, or max if lower)
    copy_bandwidth_bytes_per_s: float  # measured


def machine(do_bench, device: str, cpu_copy_elements: int = 1 << 20) -> Machine:
    """The machine as the speed-of-light estimates see it (placeholders 1 SM at 1 GHz named
    "cpu-smoke" in a smoke run)."""
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        clk = sm_clock_hz()
    else:
        name, sms, clk = "cpu-smoke", 1, 1e9
    return Machine(name, sms, clk, sol.sfu_rate(sms, min(clk, sol.SUSTAINED_SM_CLOCK_HZ)),
                   copy_bandwidth(do_bench, device, cpu_copy_elements))


def peak_bytes(run, device: str) -> float:
    """Peak bytes allocated during run() above what was allocated before it (0 on CPU)."""
    cuda("synchronize", device)
    cuda("empty_cache", device)
    base = cuda("memory_allocated", device)
    cuda("reset_peak_memory_stats", device)
    run()
    cuda("synchronize", device)
    return cuda("max_memory_allocated", device) - base


def cpu_peak_bytes(run, largest: int = 0):
    """Peak bytes of CPU tensor storage alive during ``run()`` above the level at its start,
    from the c10 allocator's events (``torch.profiler`` with ``profile_memory``; ``tracemalloc``
    sees only Python's allocator). With ``largest``: also the sizes of that many of the largest
    allocations alive at the peak (a free is matched to the latest live allocation of its
    size: the events carry no address)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                     and e.device_type() == torch._C._autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    live = peak = 0
    alive, at_peak = [], []
    for e in events:
        n = e.nbytes()
        live += n
        if largest:
            if n > 0:
                alive.append(n)
            elif -n in alive:
                del alive[len(alive) - 1 - alive[::-1].index(-n)]
        if live > peak:
            peak, at_peak = live, sorted(alive, reverse=True)[:largest]
    return (peak, at_peak) if largest else peak


def measure(do_bench, run, device: str):
    """(median ms, peak bytes above the pre-call allocation) of run(), after a warm-up call
    (compilation, autotuning)."""
    run()
    peak = peak_bytes(run, device)
    return do_bench(run, return_mode="median"), peak


def versions() -> dict:
    """torch, triton (if importable) and Python versions."""
    out = dict(torch=torch.__version__, python=platform.python_version())
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception:  # pragma: no cover
        pass
    return out


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (for file names)."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def write_results(stem: str, device_name: str, date: str, meta: dict, rows: list, md: str,
                  out_dir: str = RESULTS_DIR) -> str:
    """Write <out_dir>/<stem>_<device>_<date>.json ({meta, rows}) and .md; returns the path
    without the extension."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"{stem}_{device_slug(device_name)}_{date}")
    with open(base + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    with open(base + ".md", "w") as f:
        f.write(md)
    return base
