"""CPU torch path of ``rot_pool`` against a baseline checkout, same run, 1 thread (issue #16).

    git worktree add /tmp/base 1f0e5b2
    python bench/cpu_path.py --base /tmp/base --out bench/results/cpu_$(date +%F).md [--rounds 5]

Each tree runs in its own long-lived subprocess (the tree first on sys.path); the timed rounds
alternate between the two, so both are timed under the same load of a shared machine. Cases:

* W1 (50 × 500 × 100, fp32, dense), S / B-E / B-Q exact, α0 = 0: forward+backward time (min of
  rounds, loss y.sum(), x and every (T,) weight require grad) at T = 4, and peak memory above
  the level before the call at T = 4 and 16 (profiler allocator events, bench/test_bench_cpu.py).
* the skewed ragged batch of issue #16: one 20,000-row set + 199 one-row sets, D = 15 (x is
  1.2 MB), B-E T = 4, forward+backward time and peak.
"""
from __future__ import annotations

import argparse
import datetime
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


def inputs(case, T):
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


def call(case, method, T):
    x, w, extra = inputs(case, T)
    y = rt.rot_pool(x, **extra, method=method, num_iters=T, backend="torch", **w)
    y.sum().backward()


for line in sys.stdin:                      # "time|peak case method T", one answer per line
    what, case, method, T = line.split()
    T = int(T)
    if what == "time":                      # wall and CPU seconds of this process
        t0, c0 = time.perf_counter(), time.process_time()
        call(case, method, T)
        print(time.perf_counter() - t0, time.process_time() - c0, flush=True)
    else:
        print(peak_bytes(lambda: call(case, method, T)), flush=True)
'''


class Child:
    """A long-lived process with one tree on its path; rounds of the two trees alternate, so
    both see the same load on a shared machine."""

    def __init__(self, root):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.p = subprocess.Popen([sys.executable, "-c", CHILD.replace("ROOT", repr(root))],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=env)

    def ask(self, *words) -> list:
        self.p.stdin.write(" ".join(map(str, words)) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("benchmark child died")
        return [float(v) for v in line.split()]

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def measure(children: dict, case, method, T, rounds):
    """{name: dict(min_s, median_s, cpu_min_s, peak)}; rounds alternate between the children.
    CPU seconds (of the child process) are less sensitive than wall time to other load on a
    shared machine (waiting for a core is not counted; cache and memory contention still is)."""
    times = {n: [] for n in children}
    cpus = {n: [] for n in children}
    if rounds:
        for c in children.values():
            c.ask("time", case, method, T)                      # warm-up
        for _ in range(rounds):
            for n, c in children.items():
                wall, cpu = c.ask("time", case, method, T)
                times[n].append(wall)
                cpus[n].append(cpu)
    out = {}
    for n, c in children.items():
        ts = sorted(times[n])
        out[n] = dict(min_s=ts[0] if ts else None, median_s=ts[len(ts) // 2] if ts else None,
                      cpu_min_s=min(cpus[n]) if cpus[n] else None,
                      peak=int(c.ask("peak", case, method, T)[0]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--out")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-base-skew", action="store_true",
                    help="the baseline needs ~7 GB and ~45 s on the skewed batch")
    ap.add_argument("--no-skew", action="store_true", help="W1 only")
    args = ap.parse_args()
    load_before = os.getloadavg()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    x_w1 = 50 * 500 * 100 * 4
    rows = []
    both = {"base": Child(args.base), "new": Child(here)}
    for method in ("sinkhorn", "badmm-e", "badmm-q"):
        for T in (4, 16):
            r = measure(both, "W1", method, T, args.rounds if T == 4 else 0)
            print(method, T, r, flush=True)
            rows.append(("W1", method, T, r))
    for c in both.values():
        c.close()
    if not args.no_skew:
        new_only = {"new": Child(here)}
        r = measure(new_only, "skew", "badmm-e", 4, 3)
        new_only["new"].close()
        if not args.skip_base_skew:
            base_only = {"base": Child(args.base)}
            r.update(measure(base_only, "skew", "badmm-e", 4, 0))
            base_only["base"].close()
        print("skew", r, flush=True)
        rows.append(("skew", "badmm-e", 4, r))
    load_after = os.getloadavg()

    def fmt_t(m):
        if m.get("min_s") is None:
            return "—"
        return f"{m['min_s'] * 1e3:.0f} ms (median {m['median_s'] * 1e3:.0f})"

    def fmt_m(m):
        return m["error"] if "error" in m else f"{m['peak'] / 2**20:.1f} MiB"

    lines = [f"# CPU torch path vs {os.path.basename(args.base)} ({datetime.date.today()})", "",
             f"`python bench/cpu_path.py --base <worktree of 1f0e5b2>`; {platform.machine()}, "
             f"{os.cpu_count()} CPUs (shared), torch {__import__('torch').__version__}, 1 thread, "
             f"fp32, exact variant, α0 = 0, fwd+bwd (loss y.sum(), x and (T,) weights require "
             f"grad). Time: min (median) of {args.rounds} rounds after a warm-up, T = 4 only; "
             f"the rounds of the two trees alternate (one long-lived process each) so both see "
             f"the same load; the ratio uses the minima. Peak: bytes of tensor storage "
             f"alive above the level before the call (profiler allocator events); W1's x is "
             f"{x_w1 / 2**20:.1f} MiB. CPU ÷: the same ratio of the minimum CPU seconds of "
             f"each child (waiting for a core not counted). Load average (1, 5, 15 min) before: "
             f"{', '.join(f'{v:.1f}' for v in load_before)}; after: "
             f"{', '.join(f'{v:.1f}' for v in load_after)}.", "",
             "| workload | method | T | base time | new time | new ÷ base | CPU ÷ | base peak "
             "| new peak | new peak ÷ x |", "|---|---|---|---|---|---|---|---|---|---|"]
    for case, method, T, r in rows:
        b, n = r.get("base", {}), r["new"]
        ratio = (f"{n['min_s'] / b['min_s']:.2f}" if b.get("min_s") and n.get("min_s") else "—")
        cpu = (f"{n['cpu_min_s'] / b['cpu_min_s']:.2f}" if b.get("cpu_min_s")
               and n.get("cpu_min_s") else "—")
        xb = x_w1 if case == "W1" else 20199 * 15 * 4
        per_x = f"{n['peak'] / xb:.1f}×" if "peak" in n else "—"
        lines.append(f"| {case} | {method} | {T} | {fmt_t(b) if b else 'not run'} | {fmt_t(n)} "
                     f"| {ratio} | {cpu} | {fmt_m(b) if b else 'not run'} | {fmt_m(n)} "
                     f"| {per_x} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
