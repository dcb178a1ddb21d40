"""Benchmark of image ROT pooling on the GPU (issue 4): local 2×2 windows, a ResNet-50 head, and a
full ResNet-50 training step.

    python bench/bench_image.py [--quick] [--no-compile] [--workloads W3 W2 W4] [--smoke-cpu]

Without a GPU it prints a message and exits 0 (``--smoke-cpu`` instead runs the script's logic on
tiny inputs under TRITON_INTERPRET=1: timings meaningless, nothing written).

Workloads (fp32 unless said otherwise; layer defaults: B-E exact, T = 4, a1 = ρ = 100):
    W3  ROTPool2d(C, 2) on (64, 256, 56, 56) and (256, 64, 112, 112), NCHW and channels_last:
        forward and forward+backward (gradients for x and the learnable weights) of
          triton         ROTPool2d(C, 2, backend="triton") (the fused window kernels,
                         rotp_triton/ops/rot/triton/window), best of a tile sweep
          torch eager    ROTPool2d(C, 2, backend="torch") (unfold + batched solver)
          torch.compile  of the torch layer
          nn.AvgPool2d(2), nn.MaxPool2d(2)
        (the ROT layers with scale=None: the pooling itself, without the per-image rescale)
        median time (triton.testing.do_bench, return_mode="median"), peak memory above the
        pre-call allocation (torch.cuda.max_memory_allocated), and for triton the speed of light
        SoL = max(bytes / copy bandwidth, transcendentals / SFU rate) and the ratio to it
        (bench/sol.py, PERF.md): bytes x read + y written (forward); + gy read, gx written
        (backward); transcendentals the algorithm's minimum, (2T + 1)·N·C per window forward and
        as much again backward. Copy bandwidth is measured in the same run (1 GiB
        device-to-device copy); the SFU rate is assumed, 16 exp2 / SM / clock × SMs × the
        sustained clock (1.75 GHz, not the maximum).
    W2  AdaptiveROTPool2d(2048) on a ResNet-50 head (256, 2048, 7, 7) (rot_pool on the strided
        (B, HW, C) view: backend="triton" runs the set kernels of
        rotp_triton/ops/rot/triton/sinkhorn|badmm, backend="torch" the torch path), NCHW and
        channels_last, against nn.AdaptiveAvgPool2d(1); forward and forward+backward.
    W4  torchvision ResNet-50 training step (batch 64, 224×224, SGD momentum 0.9, channels_last,
        bf16 autocast): AdaptiveAvgPool2d vs replace_avgpool (AdaptiveROTPool2d); step-time ratio.
        Skipped when torchvision is not importable.
Results: bench/results/image_<device>_<date>.{md,json}.
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

from bench import common  # noqa: E402
from bench import sol as sol_mod  # noqa: E402

DEVICE = "cuda"


def _runner(fn, x, params, backward):
    leaves = [x] + [p for p in params if p.requires_grad]

    def run():
        y = fn(x)
        if backward:
            torch.autograd.grad(y.float().sum(), leaves)
        return y
    return run


def _safe(do_bench, run):
    try:
        ms, peak = common.measure(do_bench, run, DEVICE)
        return ms, peak, None
    except Exception as e:  # OOM, compile failure, missing kernel
        common.cuda("empty_cache", DEVICE)
        return float("nan"), float("nan"), f"{type(e).__name__}: {str(e)[:160]}"


# --------------------------------------------------------------------------------------------
def bench_w3(do_bench, bw, sfu_rate, args):
    from torch import nn

    from rotp_triton.nn.image import ROTPool2d
    from rotp_triton.ops.rot.triton.window import launch as tw  # FWD_TILE, BWD_TILE (swept)

    shapes = [(64, 256, 56, 56), (256, 64, 112, 112)]
    if args.quick:
        shapes = [(8, 256, 56, 56), (32, 64, 112, 112)]
    if args.smoke_cpu:
        shapes = [(1, 8, 6, 6)]
    rows = []
    for shape in shapes:
        B, C, H, W = shape
        T = 4
        # backend="triton": the kernels or an error (never a silent fall-back to the torch path);
        # under TRITON_INTERPRET=1 (smoke) they also run on CPU tensors
        layer = ROTPool2d(C, 2, backend="triton", scale=None).to(DEVICE)
        params = list(layer.parameters())
        n_el = B * C * H * W
        in_bytes = n_el * 4
        Ho, Wo = H // 2, W // 2
        nc = B * Ho * Wo * 4 * C                       # N·C summed over the windows
        for layout in ("nchw", "channels_last"):
            x0 = torch.randn(shape, device=DEVICE)
            if layout == "channels_last":
                x0 = x0.contiguous(memory_format=torch.channels_last)
            wl = f"W3 {B}x{C}x{H}x{W} {layout}"
            for bwd in (False, True):
                pass_ = "fwd+bwd" if bwd else "fwd"
                x = x0.detach().requires_grad_(bwd)

                def add(impl, fn, extra=None, ps=params):
                    ms, peak, err = _safe(do_bench, _runner(fn, x, ps if bwd else [], bwd))
                    row = dict(workload=wl, impl=impl, pass_=pass_, ms=ms, peak_bytes=peak,
                               input_bytes=in_bytes, error=err, **(extra or {}))
                    rows.append(row)
                    print(_fmt(row), flush=True)
                    return row

                # triton: sweep the register tile sizes, keep the best
                best = None
                saved = (tw.FWD_TILE, tw.BWD_TILE)
                tiles = [(1024, 512)] if args.smoke_cpu else \
                    [(f, b) for f in (512, 1024, 2048, 4096) for b in ((256, 512, 1024) if bwd
                                                                      else (512,))]
                for ft, bt in tiles:
                    tw.FWD_TILE, tw.BWD_TILE = ft, bt
                    ms, peak, err = _safe(do_bench, _runner(layer, x, params if bwd else [],
                                                            bwd))
                    if err is None and (best is None or ms < best[0]):
                        best = (ms, peak, ft, bt)
                tw.FWD_TILE, tw.BWD_TILE = saved
                by = sol_mod.problem_bytes(n_el, 4, n_el // 4, 4, backward=bwd)
                ex = sol_mod.min_transcendentals(nc, T, backward=bwd)
                sol, sol_bound = sol_mod.sol_seconds(by, ex, bandwidth=bw, sfu=sfu_rate)
                sol *= 1e3
                row = dict(workload=wl, impl="triton", pass_=pass_,
                           ms=best[0] if best else float("nan"),
                           peak_bytes=best[1] if best else float("nan"), input_bytes=in_bytes,
                           tiles=f"fwd {best[2]} bwd {best[3]}" if best else None,
                           sol_ms=sol, sol_bound=sol_bound,
                           error=None if best else "every tile failed")
                if best:
                    row["ratio_to_sol"] = best[0] / sol
                rows.append(row)
                print(_fmt(row), flush=True)
                torch_layer = ROTPool2d(C, 2, backend="torch", scale=None).to(DEVICE)
                torch_params = list(torch_layer.parameters())
                add("torch eager", torch_layer, ps=torch_params)
                if not args.no_compile:
                    torch._dynamo.reset()
                    add("torch.compile", torch.compile(torch_layer), ps=torch_params)
                add("nn.AvgPool2d(2)", nn.AvgPool2d(2), ps=[])
                add("nn.MaxPool2d(2)", nn.MaxPool2d(2), ps=[])
                del x
                common.cuda("empty_cache", DEVICE)
    return rows


def bench_w2(do_bench, args):
    from torch import nn

    from rotp_triton.nn.image import AdaptiveROTPool2d
    shape = (32, 2048, 7, 7) if args.quick else (256, 2048, 7, 7)
    if args.smoke_cpu:
        shape = (2, 16, 3, 3)
    rows = []
    B, C, H, W = shape
    layers = [(f"AdaptiveROTPool2d ({label})", AdaptiveROTPool2d(C, backend=backend).to(DEVICE))
              for label, backend in (("set kernels", "triton"), ("torch path", "torch"))]
    for layout in ("nchw", "channels_last"):
        x0 = torch.randn(shape, device=DEVICE)
        if layout == "channels_last":
            x0 = x0.contiguous(memory_format=torch.channels_last)
        for bwd in (False, True):
            x = x0.detach().requires_grad_(bwd)
            impls = [(impl, layer, list(layer.parameters())) for impl, layer in layers]
            impls.append(("nn.AdaptiveAvgPool2d(1)", nn.AdaptiveAvgPool2d(1), []))
            for impl, fn, ps in impls:
                ms, peak, err = _safe(do_bench, _runner(fn, x, ps if bwd else [], bwd))
                row = dict(workload=f"W2 {B}x{C}x{H}x{W} {layout}", impl=impl,
                           pass_="fwd+bwd" if bwd else "fwd", ms=ms, peak_bytes=peak,
                           input_bytes=x.numel() * 4, error=err)
                rows.append(row)
                print(_fmt(row), flush=True)
    return rows


def bench_w4(do_bench, args):
    try:
        import torchvision
    except ImportError:
        print("W4 skipped: torchvision is not importable")
        return [dict(workload="W4 ResNet-50 train step", impl="-", pass_="-", ms=float("nan"),
                     peak_bytes=float("nan"), error="torchvision not importable")]
    from rotp_triton import replace_avgpool
    batch = 16 if args.quick else 64
    res = 224
    if args.smoke_cpu:
        batch, res = 2, 32
    rows = []
    times = {}
    for impl in ("AdaptiveAvgPool2d", "AdaptiveROTPool2d"):
        torch.manual_seed(0)
        model = torchvision.models.resnet50(weights=None)
        if impl == "AdaptiveROTPool2d":
            replace_avgpool(model)
        model = model.to(DEVICE).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(batch, 3, res, res, device=DEVICE).contiguous(
            memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (batch,), device=DEVICE)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        ms, peak, err = _safe(do_bench, step)
        times[impl] = ms
        row = dict(workload=f"W4 ResNet-50 train step b{batch} {res}px bf16 channels_last",
                   impl=impl, pass_="step", ms=ms, peak_bytes=peak, error=err)
        rows.append(row)
        print(_fmt(row), flush=True)
        del model, opt
        common.cuda("empty_cache", DEVICE)
    rows[-1]["ratio_to_avgpool"] = times["AdaptiveROTPool2d"] / times["AdaptiveAvgPool2d"]
    print(f"W4 step-time ratio ROT / avg = {rows[-1]['ratio_to_avgpool']:.3f}")
    return rows


# --------------------------------------------------------------------------------------------
def _fmt(r) -> str:
    s = f"{r['workload']:<40} {r['impl']:<40} {r['pass_']:<8} {r['ms']:9.3f} ms"
    if r.get("peak_bytes") == r.get("peak_bytes"):
        s += f"  peak {r['peak_bytes'] / 2**20:9.1f} MiB"
    if "sol_ms" in r:
        s += f"  SoL {r['sol_ms']:.3f} ms ({r['sol_bound']})"
        if "ratio_to_sol" in r:
            s += f" {r['ratio_to_sol']:.2f}x"
    if r.get("tiles"):
        s += f"  [{r['tiles']}]"
    if r.get("error"):
        s += f"  ERROR {r['error']}"
    return s


def _markdown(meta, rows) -> str:
    lines = [f"# Image pooling benchmark ({meta['device']}, {meta['date']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}; {meta['sms']} SMs, max SM clock "
             f"{meta['sm_clock_hz'] / 1e9:.2f} GHz; SFU rate assumed "
             f"{common.SFU_PER_SM_PER_CLK}/SM/clk at the sustained clock = "
             f"{meta['sfu_rate_per_s'] / 1e12:.2f} T/s; "
             f"measured copy bandwidth "
             f"{meta['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s. Medians of "
             f"triton.testing.do_bench. Command: `python bench/bench_image.py "
             f"{' '.join(meta['argv'])}`.", "",
             "| workload | impl | pass | ms | peak MiB | SoL ms | bound | × SoL | notes |",
             "|---|---|---|---|---|---|---|---|---|"]

    def f(r, k, fmt):
        v = r.get(k)
        return "" if v is None or v != v else format(v, fmt)
    for r in rows:
        note = r.get("tiles") or ""
        if "ratio_to_avgpool" in r:
            note = f"step ratio ROT/avg {r['ratio_to_avgpool']:.3f}"
        if "speedup_vs_eager" in r:
            note += f"; {r['speedup_vs_eager']:.1f}× vs eager"
        if "speedup_vs_compile" in r:
            note += f"; {r['speedup_vs_compile']:.1f}× vs compile"
        if r.get("error"):
            note += f" error: {r['error']}"
        pk = r.get("peak_bytes")
        lines.append(f"| {r['workload']} | {r['impl']} | {r['pass_']} | {f(r, 'ms', '.3f')} | "
                     f"{'' if pk is None or pk != pk else format(pk / 2**20, '.1f')} | "
                     f"{f(r, 'sol_ms', '.3f')} | {r.get('sol_bound', '')} | "
                     f"{f(r, 'ratio_to_sol', '.2f')} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller batches")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--workloads", nargs="+", default=["W3", "W2", "W4"])
    p.add_argument("--smoke-cpu", action="store_true",
                   help="run the script's logic on CPU under TRITON_INTERPRET=1 (tiny inputs, "
                        "timings meaningless, nothing written)")
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = common.select_device(args.smoke_cpu, "bench_image")
    if DEVICE is None:
        return 0
    import triton
    if args.smoke_cpu:
        # the interpreter runs the kernels on CPU tensors with backend="triton", which the W3 /
        # W2 kernel rows set; W4's replace_avgpool layers ("auto") take the torch path on CPU
        do_bench = common.wall_clock_bench
    else:
        from triton.testing import do_bench
    dev_name, sms, clk, sfu_rate, bw = common.machine(do_bench, DEVICE,
                                                      cpu_copy_elements=1 << 16)
    print(f"device {dev_name}: {sms} SMs, SM clock {clk / 1e9:.2f} GHz, SFU rate (assumed) "
          f"{sfu_rate / 1e12:.2f} T/s, copy bandwidth (measured) {bw / 1e12:.2f} TB/s")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    rows = []
    if "W3" in args.workloads:
        rows += bench_w3(do_bench, bw, sfu_rate, args)
    if "W2" in args.workloads:
        rows += bench_w2(do_bench, args)
    if "W4" in args.workloads:
        rows += bench_w4(do_bench, args)
    # speed-ups of the kernels against the torch path, same workload and pass
    key = {(r["workload"], r["impl"], r["pass_"]): r for r in rows}
    for r in rows:
        if r["impl"] == "triton" and r["ms"] == r["ms"]:
            for other, k in (("torch eager", "speedup_vs_eager"),
                             ("torch.compile", "speedup_vs_compile")):
                o = key.get((r["workload"], other, r["pass_"]))
                if o is not None and o["ms"] == o["ms"]:
                    r[k] = o["ms"] / r["ms"]
    meta = dict(device=dev_name, sms=sms, sm_clock_hz=clk, sfu_rate_per_s=sfu_rate,
                copy_bandwidth_bytes_per_s=bw, torch=torch.__version__,
                triton=triton.__version__, python=platform.python_version(),
                date=datetime.date.today().isoformat(), argv=list(argv or sys.argv[1:]))
    md = _markdown(meta, rows)
    print()
    print(md)
    if args.smoke_cpu:
        return 0
    base = common.write_results("image", dev_name, meta["date"], meta, rows, md)
    print(f"wrote {base}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
