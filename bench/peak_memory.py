"""Peak memory of the Triton path at the real workload shapes, on the CPU (MEASURED here: the
host code's allocations; no kernel runs).

Every buffer of the Triton path is allocated by torch on the host side (outputs, scratch, saved
tensors, gradients); the kernels allocate nothing. So running the public API at W1/W2/W3/W5's
shapes with every launch stubbed (``bench/launch_recorder.h100_host``, as
``bench/host_overhead.py``) and summing the CPU allocator's events (``torch.profiler`` with
``profile_memory``) gives the same live bytes that ``torch.cuda.max_memory_allocated`` sees on a
GPU, up to the caching allocator's 512-byte rounding. ``bench/gpu_check.py`` measures the same
quantity on the device (peak above the level before the call, the input and its parameters
already allocated); the H200 run of 2026-11-29 is the check of this tool (``--compare``).

    python bench/peak_memory.py [--T 4 16] [--workloads W1 W2 W3 W5] [--out FILE.md]
        [--compare bench/results/gpu_nvidia-h200_2026-11-29.json]

Per row: forward and forward+backward peak above the pre-call level, in MiB and ÷ the input's
bytes, and (``--breakdown K``) the sizes of the K largest allocations alive at the
forward+backward peak.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("peak_memory.py needs real @triton.jit functions: unset TRITON_INTERPRET")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402

from bench.common import cpu_peak_bytes  # noqa: E402
from bench.gpu_check import Env, _workload_cpu, pool_fn  # noqa: E402
from bench.launch_recorder import h100_host  # noqa: E402

METHODS = ("sinkhorn", "badmm-e", "badmm-q")


def measure(workloads, Ts, methods=METHODS, breakdown: int = 0, a0: float = 0.0):
    env = Env(smoke=False)
    env.device = "cpu"
    real = triton.runtime.jit.JITFunction.run
    triton.runtime.jit.JITFunction.run = lambda self, *a, **k: None
    rows = []
    try:
        with h100_host():
            for wl in workloads:
                x0, ptr, kind, desc = _workload_cpu(wl, env)
                if a0 and kind in ("global", "window"):
                    print(f"{wl}: a layer workload, no α0 - skipped", flush=True)
                    continue
                for T in Ts:
                    for method in methods:
                        fn, params = pool_fn(kind, x0, ptr, method, T, "triton", env, a0=a0)
                        row = dict(workload=wl, T=T, method=method + (f" a0={a0:g}" if a0 else ""),
                                   desc=desc,
                                   input_bytes=x0.numel() * x0.element_size())
                        for bwd in (False, True):
                            x = x0.detach().clone().requires_grad_(bwd)
                            leaves = [x] + [p for p in params if p.requires_grad]

                            def run(fn=fn, x=x, leaves=leaves, bwd=bwd):
                                y = fn(x)
                                if bwd:
                                    torch.autograd.grad(y.float().sum(), leaves,
                                                        allow_unused=True)
                            run()                                   # warm-up, as gpu_check
                            if bwd and breakdown:
                                row["fwd+bwd"], row["top"] = cpu_peak_bytes(run, breakdown)
                            else:
                                row["fwd+bwd" if bwd else "fwd"] = cpu_peak_bytes(run)
                        rows.append(row)
                        print(f"{wl} T={T:2d} {row['method']:9s} fwd {row['fwd'] / 2**20:7.1f} MiB "
                              f"({row['fwd'] / row['input_bytes']:.3f}x)  fwd+bwd "
                              f"{row['fwd+bwd'] / 2**20:7.1f} MiB "
                              f"({row['fwd+bwd'] / row['input_bytes']:.3f}x)", flush=True)
                        if row.get("top"):
                            print("      largest allocations alive at the fwd+bwd peak (MiB): "
                                  + ", ".join(f"{n / 2**20:.2f}" for n in row["top"]))
    finally:
        triton.runtime.jit.JITFunction.run = real
    return rows


def device_peaks(path: str) -> dict:
    """(workload, T, method, pass) -> peak ÷ input from a gpu_check JSON (triton rows)."""
    with open(path) as fh:
        d = json.load(fh)
    out = {}
    for r in d["rows"] if isinstance(d, dict) else d:
        if r.get("impl") == "triton" and r.get("peak_bytes") and not r.get("section",
                                                                            "").startswith("a0"):
            out[(r["workload"], int(r["T"]), r["method"], r["pass_"])] = \
                r["peak_bytes"] / r["input_bytes"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[4, 16])
    p.add_argument("--workloads", nargs="+", default=["W1", "W2", "W5", "W3"])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--a0", type=float, default=0.0,
                   help="α0 > 0: the structure path (rot_pool workloads: W1, W5)")
    p.add_argument("--breakdown", type=int, default=0,
                   help="list this many of the largest allocations live at the fwd+bwd peak")
    p.add_argument("--compare", default=None, help="a gpu_check JSON with device peaks")
    p.add_argument("--out", default=None, help="also write a Markdown table here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(args.workloads, args.T, args.methods, args.breakdown, args.a0)
    dev = device_peaks(args.compare) if args.compare else {}
    if args.out:
        import subprocess
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        lines = [f"# Peak memory of the Triton path, MEASURED on the CPU (launches stubbed), "
                 f"commit {rev}", "",
                 f"torch {torch.__version__}, triton {triton.__version__}; `bench/peak_memory.py`"
                 ": bytes allocated above the pre-call level (input and parameters already "
                 "live), fp32, H100 host (132 SMs)." + (f" Device column: `{args.compare}`."
                                                        if dev else ""), "",
                 "| workload | T | method | fwd MiB | fwd ÷ input | fwd+bwd MiB | fwd+bwd ÷ input"
                 + (" | device fwd ÷ input | device fwd+bwd ÷ input |" if dev else " |"),
                 "|---|---|---|---|---|---|---|" + ("---|---|" if dev else "")]
        for r in rows:
            ib = r["input_bytes"]
            line = (f"| {r['workload']} | {r['T']} | {r['method']} | {r['fwd'] / 2**20:.1f} | "
                    f"{r['fwd'] / ib:.3f} | {r['fwd+bwd'] / 2**20:.1f} | {r['fwd+bwd'] / ib:.3f} |")
            if dev:
                k = (r["workload"], r["T"], r["method"])
                line += "".join(f" {dev[k + (ps,)]:.3f} |" if k + (ps,) in dev else " - |"
                                for ps in ("fwd", "fwd+bwd"))
            lines.append(line)
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
