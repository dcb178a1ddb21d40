"""Host front end: CPU time per call of the Triton path with every kernel launch stubbed out
(MEASURED on this machine's CPU; no GPU, nothing runs on a device).

The H200 run of 2026-11-29 found W1 host-bound: 0.32 ms of kernels in a 1.83 ms Sinkhorn
fwd+bwd (`bench/results/gpu_vs_prediction_2026-11-29.md`). This measures that host part without
a GPU: the public API on tiny CPU tensors that the launchers take for CUDA ones
(``launch_recorder.h100_host``), with ``JITFunction.run`` replaced by a no-op, so what is timed
is the Python front end, torch's custom-op and autograd dispatch and the host aten ops, not
triton's own launch path (on the device: tens of µs per launch more) and not the kernels.

    python bench/host_overhead.py [--reps 200] [--out bench/results/host_overhead.md]

Prints, per case, forward and forward+backward µs (the smallest of 5 interleaved rounds'
medians, ``--reps`` calls in all) and the launches per fwd+bwd. Machine noise is large on a
shared CPU: compare two versions in the same run, or runs taken back to back.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("host_overhead.py needs real @triton.jit functions: unset TRITON_INTERPRET")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402

import rotp_triton as rt  # noqa: E402
from bench.launch_recorder import h100_host  # noqa: E402


def cases(T: int = 4):
    """(name, make) pairs; make() -> (forward fn, leaves for the gradient)."""
    def sets(method, a0=0.0):
        def make():
            x = torch.randn(50, 8, 8, requires_grad=True)        # W1's call, tiny sets
            w = {k: torch.full((T,), 1.0, requires_grad=True) for k in ("a1", "a2", "a3")}
            extra = dict(a0=a0) if a0 else {}
            return (lambda: rt.rot_pool(x, method=method, num_iters=T, backend="triton",
                                        **w, **extra)), [x, *w.values()]
        return make

    def module(cls, method, shape, *args):
        def make():
            m = cls(*args, method=method, num_iters=T, backend="triton")
            x = torch.randn(*shape, requires_grad=True)
            return (lambda: m(x)), [x, *m.parameters()]
        return make

    out = []
    for method in ("sinkhorn", "badmm-e", "badmm-q"):
        out.append((f"rot_pool dense {method}", sets(method)))
    for method in ("sinkhorn", "badmm-e"):
        out.append((f"AdaptiveROTPool2d {method}",
                    module(rt.AdaptiveROTPool2d, method, (4, 16, 3, 3), 16)))
        out.append((f"ROTPool2d 2x2 {method}", module(rt.ROTPool2d, method, (2, 8, 4, 4), 8, 2)))
    out.append(("rot_pool dense badmm-e a0=0.1", sets("badmm-e", 0.1)))
    return out


def _median_us(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def measure(reps: int = 200, rounds: int = 5) -> list:
    """Per case: the smallest of ``rounds`` medians of ``reps / rounds`` calls, the rounds
    interleaved across cases (a shared CPU's slow spells then hit every case alike)."""
    launches = [0]

    def no_launch(self, *args, **kwargs):
        launches[0] += 1
    real = triton.runtime.jit.JITFunction.run
    triton.runtime.jit.JITFunction.run = no_launch
    rows, per = [], max(1, reps // rounds)
    try:
        with h100_host():
            calls = []
            for name, make in cases():
                f, leaves = make()

                def fwd_bwd(f=f, leaves=leaves):
                    torch.autograd.grad(f().sum(), leaves, allow_unused=True)
                for _ in range(5):                                  # warm-up
                    fwd_bwd()
                launches[0] = 0
                fwd_bwd()
                calls.append((name, f, fwd_bwd, launches[0]))
            best = {name: [float("inf"), float("inf")] for name, *_ in calls}
            for _ in range(rounds):
                for name, f, fwd_bwd, _n in calls:
                    with torch.no_grad():
                        best[name][0] = min(best[name][0], _median_us(f, per))
                    best[name][1] = min(best[name][1], _median_us(fwd_bwd, per))
            for name, _f, _fb, n in calls:
                rows.append(dict(case=name, fwd_us=best[name][0], fwd_bwd_us=best[name][1],
                                 launches=n))
                print(f"{name:34s} fwd {rows[-1]['fwd_us']:7.0f} us   fwd+bwd "
                      f"{rows[-1]['fwd_bwd_us']:7.0f} us   {n} launches", flush=True)
    finally:
        triton.runtime.jit.JITFunction.run = real
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--out", default=None, help="also write a Markdown table here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(args.reps)
    if args.out:
        import subprocess
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        lines = [f"# Host front end, MEASURED on the CPU (kernel launches stubbed), commit {rev}",
                 "", f"torch {torch.__version__}, triton {triton.__version__}; the smallest of 5 "
                 f"interleaved rounds' medians, {args.reps} calls in all, 1 thread; "
                 "`bench/host_overhead.py`.", "",
                 "| case | fwd µs | fwd+bwd µs | launches per fwd+bwd |", "|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['fwd_us']:.0f} | {r['fwd_bwd_us']:.0f} | "
                  f"{r['launches']} |" for r in rows]
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
