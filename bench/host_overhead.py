"""Host front end: CPU time per call of the Triton path.

The H200 run of 2026-11-29 found W1 host-bound: 0.32 ms of kernels in a 1.83 ms Sinkhorn
fwd+bwd (`bench/results/gpu_vs_prediction_2026-11-29.md`), and the kernel report's calibrated
model prices that front end from the run (`bench/latency_model.py`), before the front end
changed (eager autograd.Function, direct launches, lighter views). Two ways to measure it:

* On this CPU (default; MEASURED here, no GPU): the public API on tiny CPU tensors that the
  launchers take for CUDA ones (``launch_recorder.h100_host``), with ``JITFunction.run``
  replaced by a no-op: the Python front end, torch's dispatch and autograd and the host aten
  ops, not triton's own launch path and not the kernels.
* On a GPU (``--device cuda``; one short call in a lease, ~1-2 min with compiles) the same
  cases on CUDA tensors, broken down: ``stub`` (launches stubbed as above: the front end on
  that host, CUDA allocator and autograd engine included), ``real`` (real launches: CPU µs
  until the call returns, each call started on an idle GPU, and its wall time to a
  synchronize), each kernel's launch path alone (every launch of one fwd+bwd replayed: CPU µs a
  launch, with its argument count) and the baselines of torch itself (an allocation, a no-op
  autograd.Function forward+backward). real - stub is what triton's launches cost on that
  host; stub - the baselines is the package's own front end.

    python bench/host_overhead.py [--reps 200] [--out bench/results/host_overhead.md]
    python bench/host_overhead.py --device cuda --out $OUT/host_overhead_gpu.md   # a GPU
    python bench/host_overhead.py --smoke-cpu   # the --device code path on CPU, interpreter

Prints, per case, forward and forward+backward µs (the smallest of 5 interleaved rounds'
medians, ``--reps`` calls in all) and the launches per fwd+bwd; ``--out`` also writes a
Markdown table (and, with ``--device`` or ``--smoke-cpu``, a JSON beside it). Machine noise is
large on a shared CPU: compare two versions in the same run, or runs taken back to back.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

SMOKE = "--smoke-cpu" in sys.argv
if SMOKE:  # before triton is imported: the --device path's code, run by the interpreter
    os.environ["TRITON_INTERPRET"] = "1"
elif os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("host_overhead.py needs real @triton.jit functions: unset TRITON_INTERPRET "
             "(or pass --smoke-cpu)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402

import rotp_triton as rt  # noqa: E402
from bench.launch_recorder import h100_host  # noqa: E402


def cases(T: int = 4, device: str = "cpu", tiny: bool = False):
    """(name, make) pairs; make() -> (forward fn, leaves for the gradient). ``tiny``: shapes
    for the interpreter (--smoke-cpu)."""
    def sets(method, a0=0.0):
        def make():
            shape = (2, 4, 3) if tiny else (50, 8, 8)                  # W1's call, tiny sets
            x = torch.randn(*shape, device=device, requires_grad=True)
            w = {k: torch.full((T,), 1.0, device=device, requires_grad=True)
                 for k in ("a1", "a2", "a3")}
            extra = dict(a0=a0) if a0 else {}
            return (lambda: rt.rot_pool(x, method=method, num_iters=T, backend="triton",
                                        **w, **extra)), [x, *w.values()]
        return make

    def module(cls, method, shape, *args):
        def make():
            m = cls(*args, method=method, num_iters=T, backend="triton").to(device)
            x = torch.randn(*shape, device=device, requires_grad=True)
            return (lambda: m(x)), [x, *m.parameters()]
        return make

    out = []
    for method in ("sinkhorn", "badmm-e", "badmm-q"):
        out.append((f"rot_pool dense {method}", sets(method)))
    for method in ("sinkhorn", "badmm-e"):
        C = 4 if tiny else 16
        out.append((f"AdaptiveROTPool2d {method}",
                    module(rt.AdaptiveROTPool2d, method, (1 if tiny else 4, C, 3, 3), C)))
        C = 4 if tiny else 8
        out.append((f"ROTPool2d 2x2 {method}",
                    module(rt.ROTPool2d, method, (1 if tiny else 2, C, 4, 4), C, 2)))
    out.append(("rot_pool dense badmm-e a0=0.1", sets("badmm-e", 0.1)))
    if tiny:  # one case of each launcher family is enough to check the script
        out = [c for c in out if c[0] in ("rot_pool dense sinkhorn", "ROTPool2d 2x2 badmm-e",
                                          "AdaptiveROTPool2d badmm-e")]
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_us(fn, reps: int, device: str = "cpu") -> float:
    """Median CPU µs until ``fn`` returns; on a GPU each call starts on an idle device (the
    synchronize after it is not timed), so a call's kernels never hold up the next."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        _sync(device)
    return statistics.median(times) * 1e6


def _wall_us(fn, reps: int, device: str) -> float:
    """Median µs of a call and the synchronize after it (kernels included)."""
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def _runs():
    """The ``run`` methods a launch ends in: ``JITFunction.run`` (and, under the interpreter,
    ``InterpretedFunction.run``)."""
    out = [triton.runtime.jit.JITFunction]
    if os.environ.get("TRITON_INTERPRET") == "1":
        from triton.runtime.interpreter import InterpretedFunction
        out.append(InterpretedFunction)
    return out


class _Launches:
    """Within the block every launch is counted; ``stub``: and skipped, ``record``: and kept as
    (kernel, args, kwargs, grid) for :func:`launch_costs`."""

    def __init__(self, stub: bool, record: bool = False):
        self.stub, self.record, self.count, self.recorded = stub, record, 0, []

    def __enter__(self):
        self.saved = [(cls, cls.run) for cls in _runs()]
        for cls, real in self.saved:
            def run(fn, *args, grid, warmup, _real=real, **kwargs):
                if warmup:
                    return _real(fn, *args, grid=grid, warmup=warmup, **kwargs)
                self.count += 1
                if self.record:
                    self.recorded.append((fn, args, dict(kwargs), grid))
                if self.stub:
                    return None
                return _real(fn, *args, grid=grid, warmup=warmup, **kwargs)
            cls.run = run
        return self

    def __exit__(self, *exc):
        for cls, real in self.saved:
            cls.run = real


def _fwd_bwd(f, leaves):
    def call():
        torch.autograd.grad(f().sum(), leaves, allow_unused=True)
    return call


def measure(reps: int = 200, rounds: int = 5, device: str = "cpu", modes=("stub",)) -> list:
    """Per case and mode: the smallest of ``rounds`` medians of ``reps / rounds`` calls, the
    rounds interleaved across cases (a shared CPU's slow spells then hit every case alike).
    ``stub``: launches skipped; ``real``: launched, also the wall time of fwd+bwd."""
    rows, per = [], max(1, reps // rounds)
    calls = []
    for name, make in cases(T=2 if SMOKE else 4, device=device, tiny=SMOKE):
        f, leaves = make()
        fb = _fwd_bwd(f, leaves)
        with _Launches(stub="real" not in modes):            # compiles, caches, allocator
            for _ in range(1 if SMOKE else 3):
                fb()
        with _Launches(stub=True) as counted:
            fb()
        calls.append((name, f, fb, counted.count))
    best = {(name, m): [float("inf")] * 3 for name, *_ in calls for m in modes}
    for _ in range(rounds):
        for mode in modes:  # (real launches unpatched: not even a Python frame more)
            with _Launches(stub=True) if mode == "stub" else contextlib.nullcontext():
                for name, f, fb, _n in calls:
                    b = best[name, mode]
                    _sync(device)
                    with torch.no_grad():
                        b[0] = min(b[0], _median_us(f, per, device))
                    b[1] = min(b[1], _median_us(fb, per, device))
                    if mode == "real":
                        b[2] = min(b[2], _wall_us(fb, per, device))
    for name, _f, _fb, n in calls:
        for mode in modes:
            fwd, fb, wall = best[name, mode]
            rows.append(dict(case=name, mode=mode, fwd_us=fwd, fwd_bwd_us=fb, launches=n,
                             wall_fwd_bwd_us=wall if mode == "real" else None))
            extra = f"   wall {wall:7.0f} us" if mode == "real" else ""
            print(f"{name:34s} {mode:4s} fwd {fwd:7.0f} us   fwd+bwd {fb:7.0f} us   "
                  f"{n} launches{extra}", flush=True)
    return rows


def launch_costs(reps: int, device: str) -> list:
    """Triton's launch path alone, per kernel: each launch of one fwd+bwd of every case (real
    launches) replayed ``reps`` times with its own arguments, CPU µs until it returns (the
    device idle at each start). The replays rewrite that call's outputs and scratch only."""
    rows = []
    for name, make in cases(T=2 if SMOKE else 4, device=device, tiny=SMOKE):
        f, leaves = make()
        fb = _fwd_bwd(f, leaves)
        fb()
        with _Launches(stub=False, record=True) as rec:
            fb()
        _sync(device)
        for fn, args, kwargs, grid in rec.recorded:
            def replay(fn=fn, args=args, kwargs=kwargs, grid=grid):
                fn[grid](*args, **kwargs)
            replay()
            _sync(device)
            us = _median_us(replay, reps, device)
            rows.append(dict(case=name, kernel=fn.__name__, args=len(args) + len(kwargs),
                             us=us))
            print(f"{name:34s} launch {fn.__name__:40s} {rows[-1]['args']:3d} args "
                  f"{us:7.1f} us", flush=True)
    return rows


class _Noop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


def baselines(reps: int, device: str) -> dict:
    """torch's own costs on this host: an allocation, a small add, and the forward+backward
    of a no-op autograd.Function (the autograd engine's round trip, ``.sum()`` and its grad)."""
    x = torch.randn(50, 8, 8, device=device, requires_grad=True)
    out = dict(
        empty_us=_median_us(lambda: torch.empty(4096, device=device), reps, device),
        add_us=_median_us(lambda: x.detach() + 1, reps, device),
        noop_fwd_bwd_us=_median_us(
            lambda: torch.autograd.grad(_Noop.apply(x).sum(), [x]), reps, device))
    for k, v in out.items():
        print(f"baseline {k:16s} {v:7.1f} us", flush=True)
    return out


def _environment(device: str) -> str:
    import platform
    where = (torch.cuda.get_device_name() if device.startswith("cuda")
             else f"CPU ({platform.processor() or platform.machine()})")
    return (f"{where}; torch {torch.__version__}, triton {triton.__version__}, Python "
            f"{platform.python_version()}, {os.cpu_count()} CPUs, 1 torch thread")


def write(path: str, rows: list, launches: list, base: dict, device: str, reps: int,
          rounds: int) -> None:
    import subprocess
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    on_gpu = device.startswith("cuda")
    what = ("MEASURED on the GPU's host" if on_gpu else
            "the --device code path, interpreter, CPU (not a measurement)" if SMOKE else
            "MEASURED on the CPU (kernel launches stubbed)")
    lines = [f"# Host front end, {what}, commit {rev}", "", f"{_environment(device)}; the "
             f"smallest of {rounds} interleaved rounds' medians, {reps} calls in all; "
             "`bench/host_overhead.py`.", ""]
    if not (on_gpu or SMOKE):
        lines += ["| case | fwd µs | fwd+bwd µs | launches per fwd+bwd |", "|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['fwd_us']:.0f} | {r['fwd_bwd_us']:.0f} | "
                  f"{r['launches']} |" for r in rows]
    else:
        by = {(r["case"], r["mode"]): r for r in rows}
        names = list(dict.fromkeys(r["case"] for r in rows))
        lines += ["CPU µs until the call returns (each call started on an idle device); wall: "
                  "the call and a synchronize; stub: launches skipped.", "",
                  "| case | launches | stub fwd | stub fwd+bwd | real fwd | real fwd+bwd | "
                  "real - stub fwd+bwd | Σ launch paths | wall fwd+bwd |", "|---" * 9 + "|"]
        for n in names:
            st, re_ = by.get((n, "stub")), by.get((n, "real"))
            lsum = sum(r["us"] for r in launches if r["case"] == n)
            cell = (lambda r, k: f"{r[k]:.0f}" if r and r.get(k) is not None else "-")
            diff = f"{re_['fwd_bwd_us'] - st['fwd_bwd_us']:.0f}" if st and re_ else "-"
            lines.append(f"| {n} | {(st or re_)['launches']} | {cell(st, 'fwd_us')} | "
                         f"{cell(st, 'fwd_bwd_us')} | {cell(re_, 'fwd_us')} | "
                         f"{cell(re_, 'fwd_bwd_us')} | {diff} | {lsum:.0f} | "
                         f"{cell(re_, 'wall_fwd_bwd_us')} |")
        lines += ["", "Each launch of one fwd+bwd replayed alone (CPU µs until it returns):", "",
                  "| case | kernel | arguments | µs |", "|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['kernel']} | {r['args']} | {r['us']:.1f} |"
                  for r in launches]
        lines += ["", "torch's own costs on this host: "
                  + ", ".join(f"{k} {v:.1f} µs" for k, v in base.items()) + "."]
        with open(os.path.splitext(path)[0] + ".json", "w") as fh:
            json.dump(dict(commit=rev, environment=_environment(device), reps=reps, rows=rows,
                           launches=launches, baselines=base), fh, indent=1)
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=None, help="calls per case (200; smoke 2)")
    p.add_argument("--device", default="cpu", help="cpu (launches stubbed) or cuda")
    p.add_argument("--smoke-cpu", action="store_true",
                   help="run the --device path on CPU under the interpreter (checks the script)")
    p.add_argument("--out", default=None, help="also write a Markdown table here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    breakdown = args.smoke_cpu or args.device != "cpu"
    reps = args.reps or (2 if args.smoke_cpu else 200)
    rounds = 1 if args.smoke_cpu else 5
    if not breakdown:
        with h100_host():
            rows = measure(reps, rounds)
        launches, base = [], {}
    else:
        # value checks off, as they are for CUDA tensors (README): a stubbed launch leaves its
        # outputs, a module's weight table among them, uninitialised
        with rt.set_value_checks(False):
            rows = measure(reps, rounds, args.device, modes=("stub", "real"))
            launches = launch_costs(max(1, reps // 4), args.device)
            base = baselines(reps, args.device)
    if args.out:
        write(args.out, rows, launches, base, args.device, reps, rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
