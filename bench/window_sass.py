"""SASS of the window forward kernel at W3 (PERF.md): instruction mix per element-iteration and
a predicted time against the speed of light. A PREDICTION from sm_90 code compiled on a machine
without a GPU (PERF.md "Measuring on the CPU", point 2), never a measurement.

    python bench/window_sass.py [--out bench/results/window_sass_<date>.md] [--label v2]

Run without TRITON_INTERPRET. To analyse another revision's kernels, put its tree first on
PYTHONPATH (``git archive REV | tar -x -C /tmp/rev; PYTHONPATH=/tmp/rev python ...``): the
script reads that tree's ``launch`` configuration (the v1 launcher had no ``fwd_config``).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
if not os.environ.get("PYTHONPATH"):  # this tree's package, unless PYTHONPATH names another
    sys.path.insert(0, ROOT)
import triton  # noqa: E402
from aot import compile_sm90, ptxas_usage  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
FWD_ARGS = ["x_ptr", "y_ptr", "w_ptr", "C", "H", "W", "Ho", "Wo", "n_windows", "lp0",
            "sxb", "sxc", "sxh", "sxw", "syb", "syc", "syh", "syw"]
# H100 SXM (PERF.md): achieved HBM bandwidth, SFU rate, fp32 lanes × SMs × sustained clock
HBM_BPS = 3.0e12
SFU_PER_S = 3.7e12
LANES_PER_S = 128 * 132 * 1.75e9
W3 = (64, 256, 56, 56)
T = 4
METHODS = {0: "sinkhorn", 1: "badmm-e", 2: "badmm-q"}
# exp2/log2 per element and iteration that the algorithm needs (one per LSE over n and over d)
ALG_EXP_PER_ELEM_ITER = 2


def fwd_config(L, g, method, paper):
    """The launcher's real constexprs and warps (v2: launch.fwd_config, by method from
    2026-11-30; v1: block_sizes)."""
    if hasattr(L, "fwd_config"):
        try:
            cfg = dict(L.fwd_config(g, METHODS[method], "paper" if paper else "exact"))
        except TypeError:  # a tree whose forward tile did not depend on the method
            cfg = dict(L.fwd_config(g))
        cfg["FAST"] = True
        return cfg
    BW, BN, BC = L.block_sizes(g.kh * g.kw, g.C, L.FWD_TILE)
    return dict(BW=BW, BN=BN, BC=BC, num_warps=L.num_warps_for(BC))


def unit_strides(kernel, layout):
    """The stride arguments equal to 1 that the launcher's call specialises (Triton turns an
    int argument == 1 into a constant unless the kernel lists it in do_not_specialize)."""
    units = ["sxw", "syw"] if layout == "nchw" else ["sxc", "syc"]
    skip = set(getattr(kernel, "do_not_specialize", ()) or ())
    names = list(getattr(kernel, "arg_names", FWD_ARGS))
    skip |= {names[i] if isinstance(i, int) else i for i in skip}
    return [u for u in units if u not in skip]


def sass_of(kernel, cfg, g, method, paper, layout):
    cfg = dict(cfg)
    warps = cfg.pop("num_warps")
    maxnreg = cfg.pop("maxnreg", None)
    ce = dict(T=T, METHOD=method, PAPER=paper, **cfg, **g.constexprs())
    sig = {n: ("*fp32" if n.endswith("_ptr") else "fp32" if n == "lp0" else "i32")
           for n in FWD_ARGS}
    ce.update({u: 1 for u in unit_strides(kernel, layout)})
    sig.update({n: "constexpr" for n in ce})
    c = compile_sm90(kernel, sig, ce, num_warps=warps, maxnreg=maxnreg)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(c.asm["cubin"])
    sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", f.name], capture_output=True,
                          text=True, check=True).stdout
    os.unlink(f.name)
    u = ptxas_usage(c)
    return sass, warps, u["registers"], u["spill_bytes"]


def parse(sass: str):
    """Instructions (opcode strings) and the [start, end] index range of each backward branch
    (a loop)."""
    ins, labels, loops = [], {}, []
    for line in sass.splitlines():
        m = re.match(r"^(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.match(r"^\s+/\*[0-9a-f]{4}\*/\s+(.*?)\s*;", line)
        if m:
            ins.append(re.sub(r"^@!?U?P[0-9T]\s+", "", m.group(1)))
    for i, s in enumerate(ins):
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", s)
        if m and labels.get(m.group(1), 1 << 30) < i:
            loops.append((labels[m.group(1)], i))
    return ins, loops


def classes(ins):
    c = collections.Counter()
    for s in ins:
        op = s.split()[0]
        base = op.split(".")[0]
        c["all"] += 1
        if base == "MUFU":
            c["MUFU"] += 1
            c[op] += 1
        elif base in ("FFMA", "FADD", "FMUL", "FMNMX", "SHFL", "BAR", "FSEL", "FSETP", "LDG",
                      "STG", "LDS", "STS"):
            c[base] += 1
    return c


def analyse(L, K, method, paper, layout):
    from rotp_triton.ops.rot.triton.window.launch import geometry
    g = geometry(W3, (2, 2), (2, 2), (0, 0), False)
    cfg = fwd_config(L, g, method, paper)
    sass, warps, reg, local = sass_of(K.window_fwd_kernel, cfg, g, method, paper, layout)
    ins, loops = parse(sass)
    per_thread = cfg["BW"] * cfg["BN"] * cfg["BC"] / (32 * warps)   # elements per thread
    programs = -(-g.n_windows // cfg["BW"])
    # the T loop is the longest backward branch; its trip count: T (v1 and Sinkhorn v2),
    # T - 1 (B-ADMM v2, whose last P-step is peeled)
    a, b = max(loops, key=lambda ab: ab[1] - ab[0]) if loops else (0, -1)
    body = classes(ins[a:b + 1])
    rest = classes(ins[:a] + ins[b + 1:])
    trips = T - 1 if (hasattr(L, "fwd_config") and method > 0) else T
    dyn = {k: rest[k] + trips * body[k] for k in set(body) | set(rest)}
    threads = programs * warps * 32
    elems = g.n_windows * 4 * g.C
    bytes_ = elems * 4 + g.n_windows * g.C * 4
    t_hbm = bytes_ / HBM_BPS
    t_sfu = dyn.get("MUFU", 0) * threads / SFU_PER_S
    t_ins = dyn["all"] * threads / LANES_PER_S
    sol = max(t_hbm, ALG_EXP_PER_ELEM_ITER * elems * T / SFU_PER_S)
    pred = max(t_hbm, t_sfu, t_ins)
    per_ei = {k: v / (per_thread * T) for k, v in dyn.items()}
    loop_ei = {k: v / per_thread for k, v in body.items()}
    return dict(method=METHODS[method], variant="paper" if paper else "exact", layout=layout,
                tile=f"{cfg['BW']}x{cfg['BN']}x{cfg['BC']}",
                warps=warps, reg=reg, local=local, per_thread=per_thread,
                loop_len=b - a + 1, loop=loop_ei, kernel=per_ei, t_hbm=t_hbm, t_sfu=t_sfu,
                t_ins=t_ins, sol=sol, pred=pred)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="current")
    ap.add_argument("--methods", default="0,1,2")
    ap.add_argument("--layouts", default="nchw,channels_last")
    ap.add_argument("--eager", action="store_true", help="also predict the eager torch path")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET (the kernels must compile for sm_90)")
    from rotp_triton.ops.rot.triton.window import kernels as K, launch as L
    print(f"# {args.label}: {K.__file__}")
    keys = ["all", "MUFU", "MUFU.EX2", "MUFU.LG2", "MUFU.RCP", "FFMA", "FADD", "FMUL", "FMNMX",
            "FSEL", "FSETP", "SHFL", "BAR"]
    print("| layout | method | variant | tile | warps | regs | spill B | elem/thread | "
          + " | ".join(f"{k}/ei" for k in keys)
          + " | loop instr/elem | t_hbm µs | t_sfu µs | t_instr µs | predicted µs | ÷ SoL |")
    print("|" + "---|" * (12 + len(keys)))
    for layout in args.layouts.split(","):
        for m in map(int, args.methods.split(",")):
            for paper in (False, True):
                r = analyse(L, K, m, paper, layout)
                print(f"| {layout} | {r['method']} | {r['variant']} | {r['tile']} | {r['warps']} "
                      f"| {r['reg']} | {r['local']} | {r['per_thread']:g} | "
                      + " | ".join(f"{r['kernel'].get(k, 0):.2f}" for k in keys)
                      + f" | {r['loop'].get('all', 0):.1f} | {r['t_hbm'] * 1e6:.0f} | "
                      f"{r['t_sfu'] * 1e6:.0f} | {r['t_ins'] * 1e6:.0f} | "
                      f"{r['pred'] * 1e6:.0f} | {r['pred'] / r['sol']:.2f} |", flush=True)
    if args.eager:
        print("\n| method | variant | eager aten ops | eager bytes (GB) | predicted eager µs |")
        print("|---|---|---|---|---|")
        for m in map(int, args.methods.split(",")):
            for variant in ("exact", "paper"):
                ops, nbytes, t = eager_prediction(METHODS[m], variant)
                print(f"| {METHODS[m]} | {variant} | {ops} | {nbytes / 1e9:.1f} | {t * 1e6:.0f} |",
                      flush=True)



def eager_prediction(method: str, variant: str = "exact", scale_b: int = 64):
    """Predicted eager time of the torch path (ops/rot/torch/windows.rot_pool2d_torch) at W3, forward: run it
    on the CPU at batch 1 under a dispatch mode that counts aten ops and the bytes each reads
    and writes (views excluded), scale the bytes to batch 64, and charge bytes / HBM plus ~5 µs
    per op launch (about a lower bound for eager: no op is faster than its traffic plus its
    launch; broadcast operands are counted at their expanded size)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from rotp_triton.ops.rot.torch.windows import rot_pool2d_torch

    class Count(TorchDispatchMode):
        ops = 0
        nbytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(r.alias_info is not None for r in func._schema.returns):
                return out  # a view (or in-place alias): no kernel, no traffic
            seen = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            Count.ops += 1
            Count.nbytes += sum(t.numel() * t.element_size() for t in seen)
            return out

    x = torch.randn(1, *W3[1:])
    w = {k: torch.full((T,), v) for k, v in dict(a0=0.0, a1=100.0, a2=1.0, a3=1.0, rho=100.0,
                                                   tau=1.0).items()}
    with torch.no_grad(), Count():
        rot_pool2d_torch(x, (2, 2), (2, 2), (0, 0), False, method=method, variant=variant,
                         num_iters=T, inner_iters=1, weights=w)
    t = Count.nbytes * scale_b / HBM_BPS + Count.ops * 5e-6
    return Count.ops, Count.nbytes * scale_b, t


if __name__ == "__main__":
    main()
