"""Benchmark of ROT set pooling with α0 = 0 on the GPU: Triton kernels vs the torch path.

    python bench/bench_triton_set.py [--quick] [--no-compile] [--T 4 16] [--methods ...]

Workloads (issue 3):
    W1  50 sets × 500 samples × 100 features (dense, paper Fig. 8)
    W2  ResNet-50 head: a (256, 2048, 7, 7) tensor pooled over H·W, read as the strided
        (B, HW, C) = (256, 49, 2048) view x.flatten(2).transpose(1, 2) (no copy)
    W5  ragged graph batch: 128 sets of 20-500 nodes (uniform, seed 0), D = 128, ptr
For T = 4 and 16 and every method (variant "exact"), the median time (triton.testing.do_bench,
return_mode="median") of the forward and of forward+backward (gradients for x and the (T,)
weights a1, a2, a3), and the peak memory above what was allocated before the call
(torch.cuda.max_memory_allocated), for: triton (rot_pool backend="triton": the kernels of
rotp_triton/ops/rot/triton/sinkhorn and badmm, routed by ops/rot/route.py, or an error), eager
torch (backend="torch"), torch.compile of the torch path, and mean pooling.

Speed of light (bench/sol.py, PERF.md): max(problem bytes / measured copy bandwidth, the
algorithm's minimal exp2 count / SFU rate) for every method: bytes = x read once + y written
(forward), + dy read and dx written (backward); exp2 = (2T + 1)·N·D forward, as much again
backward; SFU rate 16 exp2/SM/clock × SMs × the sustained clock (1.75 GHz, not the maximum).
The bandwidth is measured in the same run (a device-to-device copy of 1 GiB: 2 GiB moved).
Results go to bench/results/triton_set_<device>_<date>.{md,json}.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import common, sol  # noqa: E402

DEVICE = "cuda"


def _workloads(quick: bool, smoke: bool = False):
    g = torch.Generator(device="cpu").manual_seed(0)
    out = {}
    if smoke:  # CPU smoke run of the script's logic (interpreter): tiny stand-ins
        img = torch.randn(2, 8, 2, 2, generator=g)
        ptr = torch.tensor([0, 3, 3, 8])
        return dict(W1=dict(x=torch.randn(2, 5, 4, generator=g), ptr=None, desc="smoke"),
                    W2=dict(x=img.flatten(2).transpose(1, 2), ptr=None, desc="smoke"),
                    W5=dict(x=torch.randn(8, 4, generator=g), ptr=ptr, desc="smoke"))
    B1 = 10 if quick else 50
    out["W1"] = dict(x=torch.randn(B1, 500, 100, generator=g).to(DEVICE), ptr=None,
                     desc=f"{B1} x 500 x 100 dense")
    B2 = 32 if quick else 256
    img = torch.randn(B2, 2048, 7, 7, generator=g).to(DEVICE)
    out["W2"] = dict(x=img.flatten(2).transpose(1, 2), ptr=None,
                     desc=f"{B2} x 2048 x 7 x 7 as (B, 49, 2048) strided view")
    B5 = 32 if quick else 128
    sizes = torch.randint(20, 501, (B5,), generator=g)
    ptr = torch.zeros(B5 + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(sizes, 0)
    out["W5"] = dict(x=torch.randn(int(ptr[-1]), 128, generator=g).to(DEVICE), ptr=ptr.to(DEVICE),
                     desc=f"ragged {B5} sets of 20-500 x 128 ({int(ptr[-1])} rows)")
    return out


def _mean_pool(x, ptr):
    if ptr is None:
        return x.mean(1)
    lengths = ptr[1:] - ptr[:-1]
    index = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device), lengths,
                                    output_size=x.shape[0])
    s = torch.zeros(lengths.numel(), x.shape[1], device=x.device, dtype=x.dtype)
    s.index_add_(0, index, x)
    return s / lengths.clamp_min(1)[:, None].to(x.dtype)


def _measure(do_bench, fn, x, weights, backward: bool):
    """(median ms, peak bytes above the pre-call allocation) of fn(x, *weights)[, backward]."""
    leaves = [x] + list(weights)

    def run():
        y = fn(x, *weights)
        if backward:
            torch.autograd.grad(y.sum(), [t for t in leaves if t.requires_grad])
        return y

    return common.measure(do_bench, run, DEVICE)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller batches (a smoke run)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--T", type=int, nargs="+", default=None,
                   help="unrolled iterations (default 4 16; 2 with --smoke-cpu)")
    p.add_argument("--methods", nargs="+", default=["sinkhorn", "badmm-e", "badmm-q"])
    p.add_argument("--workloads", nargs="+", default=["W1", "W2", "W5"])
    p.add_argument("--smoke-cpu", action="store_true",
                   help="check the script on CPU under TRITON_INTERPRET=1 with tiny inputs "
                        "(timings meaningless, nothing written)")
    args = p.parse_args(argv)
    if args.T is None:
        args.T = [2] if args.smoke_cpu else [4, 16]

    global DEVICE
    DEVICE = common.select_device(args.smoke_cpu, "bench_triton_set")
    if DEVICE is None:
        return 0
    try:
        import triton
        from triton.testing import do_bench
    except Exception as e:  # pragma: no cover
        print(f"bench_triton_set: triton unavailable ({e}); exit 0.")
        return 0
    import rotp_triton as rt

    badmm_kernels = True  # reported as before; rot_pool raises if a kernel is missing

    if args.smoke_cpu:
        do_bench = common.wall_clock_bench  # noqa: F811
    dev_name, sms, clk, sfu_rate, bw = common.machine(do_bench, DEVICE)
    print(f"device {dev_name}: {sms} SMs, max SM clock {clk / 1e9:.2f} GHz, assumed SFU rate "
          f"{common.SFU_PER_SM_PER_CLK}/SM/clk at the sustained clock = {sfu_rate / 1e12:.2f} T/s; "
          f"measured copy "
          f"bandwidth {bw / 1e12:.2f} TB/s")
    print(f"torch {torch.__version__}, triton {triton.__version__}; B-ADMM Triton kernels: "
          f"{'yes' if badmm_kernels else 'no (rot_pool falls back to the torch path)'}")

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    rows = []
    work = _workloads(args.quick, args.smoke_cpu)
    for wname in args.workloads:
        wl = work[wname]
        x0, ptr = wl["x"], wl["ptr"]
        in_bytes = x0.numel() * x0.element_size()
        # mean pooling, once per workload
        xm = x0.detach().requires_grad_()
        for bwd in (False, True):
            ms, peak = _measure(do_bench, lambda x: _mean_pool(x, ptr), xm, [], bwd)
            rows.append(dict(workload=wname, T="-", method="mean", impl="mean pooling",
                             pass_="fwd+bwd" if bwd else "fwd", ms=ms, peak_bytes=peak,
                             input_bytes=in_bytes))
        for T in args.T:
            for method in args.methods:
                ws = [torch.full((T,), v, device=DEVICE, requires_grad=True)
                      for v in (1.0, 1.0, 1.0)]

                def pool(x, a1, a2, a3, backend, method=method, T=T):
                    return rt.rot_pool(x, ptr=ptr, method=method, num_iters=T, a1=a1, a2=a2,
                                       a3=a3, backend=backend)

                impls = [("triton", lambda x, *w: pool(x, *w, backend="triton")),
                         ("torch eager", lambda x, *w: pool(x, *w, backend="torch"))]
                if not args.no_compile:
                    torch._dynamo.reset()
                    compiled = torch.compile(lambda x, *w: pool(x, *w, backend="torch"))
                    impls.append(("torch.compile", compiled))
                for impl, fn in impls:
                    for bwd in (False, True):
                        x = x0.detach().requires_grad_()
                        try:
                            ms, peak = _measure(do_bench, fn, x, ws, bwd)
                            err = None
                        except Exception as e:  # OOM, missing kernel, compile failure
                            ms, peak, err = float("nan"), float("nan"), repr(e)[:200]
                            common.cuda("empty_cache", DEVICE)
                        row = dict(workload=wname, T=T, method=method, impl=impl,
                                   pass_="fwd+bwd" if bwd else "fwd", ms=ms, peak_bytes=peak,
                                   input_bytes=in_bytes, error=err)
                        if impl == "triton" and err is None:
                            ye = x0.shape[0] * x0.shape[-1] if ptr is None else \
                                (ptr.numel() - 1) * x0.shape[-1]
                            by = sol.problem_bytes(x0.numel(), x0.element_size(), ye,
                                                   x0.element_size(), backward=bwd)
                            ex = sol.min_transcendentals(x0.numel(), T, backward=bwd)
                            s_, bound = sol.sol_seconds(by, ex, bandwidth=bw, sfu=sfu_rate)
                            row.update(sol_ms=s_ * 1e3, sol_bound=bound,
                                       ratio_to_sol=ms / (s_ * 1e3))
                        rows.append(row)
                        print(_fmt_row(row), flush=True)

    # derived speed-ups
    by_key = {(r["workload"], r["T"], r["method"], r["impl"], r["pass_"]): r for r in rows}
    for r in rows:
        if r["impl"] == "triton":
            for other, key in (("torch eager", "speedup_vs_eager"),
                               ("torch.compile", "speedup_vs_compile")):
                o = by_key.get((r["workload"], r["T"], r["method"], other, r["pass_"]))
                if o is not None and o["ms"] == o["ms"] and r["ms"] == r["ms"]:
                    r[key] = o["ms"] / r["ms"]

    if args.smoke_cpu:
        print(_markdown(dict(device=dev_name, date="-", torch=torch.__version__,
                             triton=triton.__version__, sms=sms, sm_clock_hz=clk,
                             sfu_assumption="-", sfu_rate_per_s=sfu_rate,
                             copy_bandwidth_bytes_per_s=bw, badmm_kernels=badmm_kernels,
                             workloads={}), rows))
        return 0
    date = datetime.date.today().isoformat()
    meta = dict(device=dev_name, sms=sms, sm_clock_hz=clk, sfu_rate_per_s=sfu_rate,
                sfu_assumption=f"{common.SFU_PER_SM_PER_CLK} exp2 per SM per clock",
                copy_bandwidth_bytes_per_s=bw, torch=torch.__version__,
                triton=triton.__version__, python=platform.python_version(), date=date,
                quick=args.quick, badmm_kernels=badmm_kernels,
                workloads={k: v["desc"] for k, v in work.items()})
    base = common.write_results("triton_set", dev_name, date, meta, rows,
                                _markdown(meta, rows))
    print(f"\nwrote {base}.md and .json")
    return 0


def _fmt_row(r) -> str:
    s = (f"{r['workload']:3} T={str(r['T']):>2} {r['method']:8} {r['impl']:28} {r['pass_']:7} "
         f"{r['ms']:9.3f} ms  peak {r['peak_bytes'] / 2**20:9.1f} MiB "
         f"({r['peak_bytes'] / r['input_bytes']:.2f}x input)")
    if "sol_ms" in r:
        s += f"  SoL {r['sol_ms']:.3f} ms ({r['sol_bound']}), {r['ratio_to_sol']:.1f}x SoL"
    if r.get("error"):
        s += f"  ERROR {r['error']}"
    return s


def _markdown(meta, rows) -> str:
    lines = [f"# ROT set pooling (alpha0 = 0): Triton vs torch - {meta['device']}, {meta['date']}",
             "",
             f"torch {meta['torch']}, triton {meta['triton']}; {meta['sms']} SMs at "
             f"{meta['sm_clock_hz'] / 1e9:.2f} GHz; SFU rate assumed {meta['sfu_assumption']} = "
             f"{meta['sfu_rate_per_s'] / 1e12:.2f} T/s; measured copy bandwidth "
             f"{meta['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s; B-ADMM Triton kernels: "
             f"{meta['badmm_kernels']}.", ""]
    for k, v in meta["workloads"].items():
        lines.append(f"- {k}: {v}")
    lines += ["", "Median times (do_bench), peak memory above the pre-call allocation "
              "(ratio to the input size). SoL = speed of light (bench/sol.py: problem bytes, the "
              "algorithm's minimal exp2 count, sustained clock).",
              "",
              "| workload | T | method | impl | pass | ms | peak MiB | peak/input | vs eager | "
              "vs compile | SoL ms | bound | x SoL |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(key, fmt):
            v = r.get(key)
            return "" if v is None or v != v else format(v, fmt)
        lines.append(
            f"| {r['workload']} | {r['T']} | {r['method']} | {r['impl']} | {r['pass_']} | "
            f"{f('ms', '.3f')} | {r['peak_bytes'] / 2**20:.1f} | "
            f"{r['peak_bytes'] / r['input_bytes']:.2f} | {f('speedup_vs_eager', '.1f')} | "
            f"{f('speedup_vs_compile', '.1f')} | {f('sol_ms', '.3f')} | {r.get('sol_bound', '')} "
            f"| {f('ratio_to_sol', '.1f')} |" + (f" error: {r['error']}" if r.get("error") else ""))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
