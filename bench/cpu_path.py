"""CPU torch path of ``rot_pool`` against a baseline checkout, same run, 1 thread (issue #16).

    git worktree add /tmp/base 1f0e5b2
    python bench/cpu_path.py --base /tmp/base --out bench/results/cpu_$(date +%F).md

Each measurement runs in a fresh subprocess with the tree under test first on sys.path, so both
trees are timed on the same machine in the same run. Cases:

* W1 (50 × 500 × 100, fp32, dense), S / B-E / B-Q exact, α0 = 0: forward+backward time (min of
  rounds, loss y.sum(), x and every (T,) weight require grad) at T = 4, and peak memory above
  the level before the call at T = 4 and 16 (profiler allocator events, bench/test_bench_cpu.py).
* the skewed ragged batch of issue #16: one 20,000-row set + 199 one-row sets, D = 15 (x is
  1.2 MB), B-E T = 4, forward+backward time and peak.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

CHILD = r'''
import json, os, sys, time
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import torch
torch.set_num_threads(1)
import rotp_triton as rt
from test_bench_cpu import peak_bytes
case, method, T, rounds = CASE, METHOD, TT, ROUNDS

def inputs():
    g = torch.Generator().manual_seed(0)
    if case == "W1":
        x = torch.randn(50, 500, 100, generator=g).requires_grad_()
        extra = {}
    else:
        sizes = torch.tensor([20000] + [1] * 199)
        x = torch.randn(int(sizes.sum()), 15, generator=g).requires_grad_()
        extra = dict(index=torch.repeat_interleave(torch.arange(200), sizes))
    w = {k: torch.full((T,), 1.0).requires_grad_() for k in ("a1", "a2", "a3", "rho")}
    return x, w, extra

def call():
    x, w, extra = inputs()
    y = rt.rot_pool(x, **extra, method=method, num_iters=T, backend="torch", **w)
    y.sum().backward()

times = []
if rounds:
    call()
    for _ in range(rounds):
        t0 = time.perf_counter(); call(); times.append(time.perf_counter() - t0)
peak = peak_bytes(call)
print(json.dumps(dict(min_s=min(times) if times else None, peak=peak)))
'''


def measure(root, case, method, T, rounds):
    code = (CHILD.replace("ROOT", repr(root)).replace("CASE", repr(case))
            .replace("METHOD", repr(method)).replace("TT", str(T)).replace("ROUNDS", str(rounds)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=900)
    if out.returncode != 0:
        return dict(error=out.stderr.strip().splitlines()[-1][:120])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--out")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-base-skew", action="store_true",
                    help="the baseline needs ~7 GB and ~45 s on the skewed batch")
    args = ap.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    x_w1 = 50 * 500 * 100 * 4
    rows = []
    for method in ("sinkhorn", "badmm-e", "badmm-q"):
        for T in (4, 16):
            r = {}
            for name, root in (("base", args.base), ("new", here)):
                r[name] = measure(root, "W1", method, T, args.rounds if T == 4 else 0)
                print(method, T, name, r[name], flush=True)
            rows.append(("W1", method, T, r))
    r = {"new": measure(here, "skew", "badmm-e", 4, 1)}
    print("skew new", r["new"], flush=True)
    if not args.skip_base_skew:
        r["base"] = measure(args.base, "skew", "badmm-e", 4, 0)
        print("skew base", r["base"], flush=True)
    rows.append(("skew", "badmm-e", 4, r))

    def fmt_t(m):
        return "—" if m.get("min_s") is None else f"{m['min_s'] * 1e3:.0f} ms"

    def fmt_m(m):
        return m["error"] if "error" in m else f"{m['peak'] / 2**20:.1f} MiB"

    lines = [f"# CPU torch path vs {os.path.basename(args.base)} ({datetime.date.today()})", "",
             f"`python bench/cpu_path.py --base <worktree of 1f0e5b2>`; {platform.machine()}, "
             f"{os.cpu_count()} CPUs (shared), torch {__import__('torch').__version__}, 1 thread, "
             f"fp32, exact variant, α0 = 0, fwd+bwd (loss y.sum(), x and (T,) weights require "
             f"grad). Time: min of {args.rounds} rounds (T = 4 only). Peak: bytes of tensor storage "
             f"alive above the level before the call (profiler allocator events); W1's x is "
             f"{x_w1 / 2**20:.1f} MiB.", "",
             "| workload | method | T | base time | new time | new ÷ base | base peak | new peak "
             "| new peak ÷ x |", "|---|---|---|---|---|---|---|---|---|"]
    for case, method, T, r in rows:
        b, n = r.get("base", {}), r["new"]
        ratio = (f"{n['min_s'] / b['min_s']:.2f}" if b.get("min_s") and n.get("min_s") else "—")
        xb = x_w1 if case == "W1" else 20199 * 15 * 4
        per_x = f"{n['peak'] / xb:.1f}×" if "peak" in n else "—"
        lines.append(f"| {case} | {method} | {T} | {fmt_t(b) if b else 'not run'} | {fmt_t(n)} "
                     f"| {ratio} | {fmt_m(b) if b else 'not run'} | {fmt_m(n)} | {per_x} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
