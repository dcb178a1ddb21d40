"""Benchmark of the α0 > 0 ROT kernels (issue 5): Triton vs the eager torch path vs
torch.compile of the torch path.

    python bench/bench_triton_structure.py            # on a GPU; exits 0 with a message without
    python bench/bench_triton_structure.py --smoke    # tiny shapes on CPU under the interpreter
                                                      # (checks the script, times mean nothing)

Workloads (DESIGN §7 / issue 5):
  W1: dense 50 sets × 500 samples × 100 features, α0 > 0 learnable, T = 4 and T = 16.
  W5: ragged graph batch, 128 sets of 20-500 nodes (uniform, seed 0), D = 128, T = 4.
for B-E, B-Q and S (K = 5 inner iterations). Reported: median forward and forward+backward
time (triton.testing.do_bench), peak memory of one forward+backward above the inputs, the
FLOP count of the structure products of one forward (what the kernels compute: per set
4·n·D² + 2·D³ per product when D <= N_max, else 4·n²·D + 2·n³; the Gram matrix Σ1 or Σ2 is
computed once with the factors), the achieved TFLOP/s of the product alone (one Σ M Σ
application, ``Factors.apply``: one launch, timed on its own) and of the whole forward
(products' FLOPs / forward time, a lower bound). The backward builds ⌈√T⌉-spaced
checkpoints itself (the forward stores no state). ``--dot`` sets ``launch.DOT_PRECISION`` (the
structure product's tl.dot precision). Kernels: rotp_triton/ops/rot/triton/structure/.
Results: bench/results/structure_<device>_<date>.md/.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rotp_triton as rt  # noqa: E402
from bench import common  # noqa: E402
from rotp_triton.ops.rot.triton.structure import launch as sl  # noqa: E402

METHODS = ("badmm-e", "badmm-q", "sinkhorn")


def timer(fn, device):
    """Median milliseconds of fn()."""
    if device == "cuda":
        import triton
        return triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median")
    return common.wall_clock_bench(fn)


def peak_mb(fn, device):
    """Peak MiB allocated during fn() above the allocation before it (nan on CPU)."""
    if device != "cuda":
        return float("nan")
    return common.peak_bytes(fn, device) / 2**20


def workloads(device, smoke):
    g = torch.Generator().manual_seed(0)
    if smoke:
        w1 = dict(B=3, N=20, D=8)
        sizes = torch.randint(2, 20, (4,), generator=g)
        D5 = 8
        t_list = (2,)
    else:
        w1 = dict(B=50, N=500, D=100)
        sizes = torch.randint(20, 501, (128,), generator=g)
        D5 = 128
        t_list = (4, 16)
    out = []
    x1 = torch.randn(w1["B"], w1["N"], w1["D"], generator=g).to(device)
    for T in t_list:
        out.append((f"W1 {w1['B']}x{w1['N']}x{w1['D']} T={T}", x1, None, T))
    x5 = torch.randn(int(sizes.sum()), D5, generator=g).to(device)
    ptr = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(sizes, 0)
    out.append((f"W5 ragged {len(sizes)} sets 20-500 x{D5} T={t_list[0]}", x5, ptr.to(device),
                t_list[0]))
    return out


def product_flops(lens, D, n_max):
    """FLOPs of one Σ2 M Σ1 application as the kernels do it (per-batch branch)."""
    tot = 0
    for n in lens:
        n = int(n)
        if n == 0:
            continue
        tot += 4 * n * D * D + 2 * D ** 3 if D <= n_max else 4 * n * n * D + 2 * n ** 3
    return tot


def bench_product(x, ptr, device):
    """ms of one structure product alone (``Factors.apply``: one launch) on the workload, at the
    dot precision the forward uses for x's dtype."""
    if ptr is None:
        B, N, D = x.shape
        lens = torch.full((B,), N, dtype=torch.int64, device=x.device)
    else:
        lens = ptr[1:] - ptr[:-1]
        D = x.shape[1]
    n_max = int(lens.max()) if lens.numel() else 0
    ws = {k: torch.ones(1, device=x.device) for k in ("a0", "a1", "a2", "a3", "rho", "tau")}
    pb, fac = sl.setup(x, ptr, None, None, ws, "badmm-e", "exact", 1)
    x32 = pb.x32
    m = torch.randn_like(x32)
    out = torch.empty_like(x32)
    ms = timer(lambda: fac.apply(m, exp=True, out=out), device)
    return ms, product_flops(lens.tolist(), D, n_max)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--dot", choices=sl.DOT_PRECISIONS, default=None,
                    help="tl.dot precision of the structure product (launch.DOT_PRECISION)")
    args = ap.parse_args()
    if args.dot:
        sl.DOT_PRECISION = args.dot
    device = common.select_device(SMOKE, "bench_triton_structure", "Use --smoke to check the "
                                  "script on CPU under the Triton interpreter.")
    if device is None:
        return 0
    dev_name = torch.cuda.get_device_name() if device == "cuda" else "cpu-interpreter"
    rows = []
    for name, x, ptr, T in workloads(device, SMOKE):
        ms_prod, flops_prod = bench_product(x, ptr, device)
        for method in METHODS:
            n_prod = 1 if method == "sinkhorn" else 2
            flops_fwd = flops_prod * n_prod * T
            a0 = torch.full((T,), 0.5, device=device, requires_grad=True)
            kw = dict(method=method, num_iters=T, inner_iters=5, a1=1.0, a2=1.0, a3=1.0, rho=1.0,
                      tau=1.0)

            def call(backend, xx, fn=None):
                f = fn or rt.rot_pool
                return f(xx, ptr=ptr, a0=a0, backend=backend, **kw)

            res = dict(workload=name, method=method, T=T, product_gflop=flops_prod / 1e9,
                       product_ms=ms_prod, product_tflops=flops_prod / ms_prod / 1e9,
                       forward_product_gflop=flops_fwd / 1e9,
                       forward_product_tflops_note="products' FLOPs / whole triton forward")
            compiled = None
            if not args.no_compile and device == "cuda":
                try:
                    compiled = torch.compile(rt.rot_pool, dynamic=False)
                except Exception as e:  # pragma: no cover
                    res["compile_error"] = repr(e)[:200]
            impls = [("triton", "triton", None), ("eager", "torch", None)]
            if compiled is not None:
                impls.append(("compile", "torch", compiled))
            for label, backend, fn in impls:
                xg = x.detach().requires_grad_()

                def fwd():
                    with torch.no_grad():
                        return call(backend, x, fn)

                def fwdbwd():
                    y = call(backend, xg, fn)
                    y.sum().backward()
                    xg.grad = None
                    a0.grad = None

                try:
                    fwd()
                    fwdbwd()                     # warm-up / compilation
                    res[f"{label}_fwd_ms"] = timer(fwd, device)
                    res[f"{label}_fwdbwd_ms"] = timer(fwdbwd, device)
                    res[f"{label}_peak_mb"] = peak_mb(fwdbwd, device)
                except Exception as e:  # record and go on (e.g. out of memory in eager)
                    res[f"{label}_error"] = repr(e)[:200]
                    if device == "cuda":
                        torch.cuda.empty_cache()
            if "triton_fwd_ms" in res:
                res["forward_tflops"] = flops_fwd / res["triton_fwd_ms"] / 1e9
            rows.append(res)
            print(json.dumps(res), flush=True)
    write(rows, dev_name, device)
    return 0


def _f(v, fmt="{:.3g}"):
    return fmt.format(v) if isinstance(v, (int, float)) else "-"


def write(rows, dev_name, device):
    date = datetime.date.today().isoformat()
    # smoke runs are not results
    out_dir = common.RESULTS_DIR if not SMOKE else os.environ.get("TMPDIR", "/tmp")
    meta = dict(device=dev_name, **common.versions(), dot_precision=sl.DOT_PRECISION,
                date=date)
    hdr = ("| workload | method | triton fwd ms | eager fwd ms | compile fwd ms | triton f+b ms | "
           "triton √T-ckpt f+b ms | eager f+b ms | compile f+b ms | f+b speedup vs eager | "
           "vs compile | peak MB triton/√T-ckpt/eager/compile | product GFLOP | "
           "product TFLOP/s | fwd TFLOP/s |")
    lines = [f"# α0 > 0 kernels on {dev_name} ({date})", "",
             f"torch {meta['torch']}, triton {meta.get('triton')}, dot precision "
             f"{meta['dot_precision']}, checkpoint_every {meta['checkpoint_every']}", "",
             hdr, "|" + "---|" * 15]
    for r in rows:
        sp_e = (r.get("eager_fwdbwd_ms", float("nan")) / r["triton_fwdbwd_ms"]
                if "triton_fwdbwd_ms" in r else None)
        sp_c = (r.get("compile_fwdbwd_ms", float("nan")) / r["triton_fwdbwd_ms"]
                if "triton_fwdbwd_ms" in r else None)
        peaks = "/".join(_f(r.get(f"{k}_peak_mb"), "{:.0f}")
                         for k in ("triton", "triton_ckpt", "eager", "compile"))
        lines.append(
            f"| {r['workload']} | {r['method']} | {_f(r.get('triton_fwd_ms'))} | "
            f"{_f(r.get('eager_fwd_ms'))} | {_f(r.get('compile_fwd_ms'))} | "
            f"{_f(r.get('triton_fwdbwd_ms'))} | {_f(r.get('triton_ckpt_fwdbwd_ms'))} | "
            f"{_f(r.get('eager_fwdbwd_ms'))} | "
            f"{_f(r.get('compile_fwdbwd_ms'))} | {_f(sp_e)} | {_f(sp_c)} | {peaks} | "
            f"{_f(r['product_gflop'])} | {_f(r['product_tflops'])} | "
            f"{_f(r.get('forward_tflops'))} |")
    errs = [f"- {r['workload']} {r['method']}: {k} = {v}" for r in rows for k, v in r.items()
            if k.endswith("error")]
    if errs:
        lines += ["", "Errors:"] + errs
    base = common.write_results("structure", dev_name, date, meta, rows, "\n".join(lines) + "\n",
                                out_dir)
    print("\n".join(lines))
    print(f"\nwrote {base}.md/.json")


if __name__ == "__main__":
    sys.exit(main())
