"""Cold compile cost of a call: the sm_90 binaries its kernels need and the seconds triton takes
to build them (the wait of a first call, before any kernel runs). MEASURED on this machine's
CPU; no GPU needed (the compile is the same work on a GPU host, on that host's CPU).

    python bench/compile_time.py [--only 'CASE;CASE$'] [--out DIR]
    python bench/compile_time.py --stream 20 [--compile]


The cases are ``kernel_report.py``'s (same ids, same ``--only``). Each case runs in a fresh
process with an empty triton cache: its launches (forward, then forward+backward) are recorded
as an H100 would see them (``launch_recorder``), every distinct specialisation is compiled for
sm_90 and timed. A kernel's *configurations* are its distinct declared-``tl.constexpr`` values;
each binary beyond them is a specialisation triton made from an argument's value (an int equal
to 1, or divisible by 16) - an iteration index passed as a plain int costs two extra binaries
per kernel this way, which ``@triton.jit(do_not_specialize=[...])`` removes.

``--stream N``: the binaries a training loop's first N ragged batches need (a PyG loader:
16-128 sets of 5-59 rows of 64 features, new sizes every batch) through ``ROTPool`` with its
defaults, per method: counted, not compiled. One per configuration is the aim; before
2e5f22a the batches' sizes moved scratch views off a 16-byte boundary and flipped ints'
divisibility, and each new combination compiled again.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def configuration(launch) -> tuple:
    """The launch's declared-constexpr values and launch options: what the launcher chose, as
    opposed to what triton specialised on its own."""
    declared = {i for i, p in enumerate(launch.fn.params) if p.is_constexpr}
    cx = tuple(sorted((k, repr(v)) for k, v in launch.constexprs.items() if k[0] in declared))
    return cx, launch.num_warps, launch.num_stages


def binaries(launches) -> dict:
    """kernel name -> dict(launches, configurations, binaries, keys: {key: first launch})."""
    out = collections.OrderedDict()
    for L in launches:
        k = out.setdefault(L.name, dict(launches=0, configs=set(), keys={}))
        k["launches"] += 1
        k["configs"].add(configuration(L))
        k["keys"].setdefault(L.key(), L)
    return out


def _warm_up() -> float:
    """Compile one trivial kernel first: triton's one-off start-up (LLVM, the backend) is not
    any kernel's cost."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    @triton.jit
    def _copy(x_ptr, y_ptr, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        tl.store(y_ptr + o, tl.load(x_ptr + o))

    t0 = time.perf_counter()
    src = triton.compiler.ASTSource(fn=_copy, signature={"x_ptr": "*fp32", "y_ptr": "*fp32",
                                                         "BLOCK": "constexpr"},
                                    constexprs={(2,): 128})
    triton.compile(src, target=GPUTarget("cuda", 90, 32))
    return time.perf_counter() - t0


def worker(case_json: str, out_path: str) -> int:
    """One case in this (fresh) process: record, compile every binary cold, time it."""
    import torch
    from bench import kernel_report, sass
    torch.set_num_threads(1)
    c = json.loads(case_json)
    init_s = _warm_up()
    rec = kernel_report.record_case(c)
    rows, seen = [], set()
    for part in ("launches_fwd", "launches_bwd"):
        for name, k in binaries(rec[part]).items():
            for key, L in k["keys"].items():
                if key in seen:
                    continue
                seen.add(key)
                t0 = time.perf_counter()
                ck = sass.compile_launch(L)
                rows.append(dict(part=part[len("launches_"):], kernel=name,
                                 seconds=time.perf_counter() - t0,
                                 regs=int(getattr(ck, "n_regs", 0) or 0)))
    every = binaries(rec["launches_fwd"] + rec["launches_bwd"])
    kernels = {n: dict(launches=k["launches"], configurations=len(k["configs"]),
                       binaries=len(k["keys"])) for n, k in every.items()}
    json.dump(dict(case=kernel_report.case_id(c), init_s=init_s,
                   launches_fwd=len(rec["launches_fwd"]), launches_bwd=len(rec["launches_bwd"]),
                   binaries=rows, kernels=kernels), open(out_path, "w"))
    return 0


def markdown(meta: dict, results: list) -> str:
    out = [f"# Cold compile time of a call (sm_90, MEASURED on this CPU) - {meta['date']}", "",
           f"git {meta['git']}, torch {meta['torch']}, triton {meta['triton']}; each case in a "
           "fresh process with an empty triton cache; triton's start-up (one trivial kernel, "
           f"{meta['init_s']:.1f} s median) is not counted. *extra* = binaries beyond the "
           "kernels' declared-constexpr configurations (value specialisations).", "",
           "| case | launches fwd + bwd | binaries | extra | fwd s | fwd+bwd s | slowest |",
           "|---|---|---|---|---|---|---|"]
    for r in results:
        fwd = sum(b["seconds"] for b in r["binaries"] if b["part"] == "fwd")
        tot = sum(b["seconds"] for b in r["binaries"])
        extra = sum(k["binaries"] - k["configurations"] for k in r["kernels"].values())
        per = collections.Counter()
        for b in r["binaries"]:
            per[b["kernel"]] += b["seconds"]
        slow = ", ".join(f"{n} {s:.1f} s" for n, s in per.most_common(2))
        out.append(f"| {r['case']} | {r['launches_fwd']} + {r['launches_bwd']} | "
                   f"{len(r['binaries'])} | {extra} | {fwd:.1f} | {tot:.1f} | {slow} |")
    out += ["", "Kernels with more binaries than configurations:", ""]
    any_extra = False
    for r in results:
        for n, k in r["kernels"].items():
            if k["binaries"] > k["configurations"]:
                any_extra = True
                out.append(f"- {r['case']}: `{n}` {k['binaries']} binaries, "
                           f"{k['configurations']} configurations, {k['launches']} launches")
    if not any_extra:
        out.append("- none")
    return "\n".join(out) + "\n"


def stream(n: int, compile_them: bool = False) -> dict:
    """method -> kernel -> [launches, configurations, binaries] over ``n`` ragged batches
    (and "compile_s": the seconds to build them all for sm_90, with ``compile_them``)."""
    import torch
    import rotp_triton as rt
    from bench.launch_recorder import h100_host, record_launches
    out = {}
    for method in ("sinkhorn", "badmm-e", "badmm-q"):
        g = torch.Generator().manual_seed(0)
        pool = rt.ROTPool(64, method=method, num_iters=4, backend="triton")
        launches = []
        for _ in range(n):
            sizes = torch.randint(5, 60, (int(torch.randint(16, 129, (1,), generator=g)),),
                                  generator=g)
            ptr = torch.zeros(sizes.numel() + 1, dtype=torch.long)
            ptr[1:] = sizes.cumsum(0)
            x = torch.randn(int(ptr[-1]), 64, generator=g, requires_grad=True)
            with h100_host(), record_launches() as L:
                pool(x, ptr=ptr).sum().backward()
            launches += L
        kernels = binaries(launches)
        out[method] = {name: [k["launches"], len(k["configs"]), len(k["keys"])]
                       for name, k in kernels.items()}
        if compile_them:      # cold (main points triton at an empty cache): the loop's wait
            from bench import sass
            t0 = time.perf_counter()
            for k in kernels.values():
                for L in k["keys"].values():
                    sass.compile_launch(L)
            out[method]["compile_s"] = time.perf_counter() - t0
    return out


def main(argv=None) -> int:
    from bench import kernel_report
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help="kernel_report.py's case filter")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--stem", default="compile_time")
    p.add_argument("--stream", type=int, default=0, metavar="N",
                   help="count the binaries of N ragged training batches through ROTPool")
    p.add_argument("--compile", action="store_true",
                   help="with --stream: also build them cold for sm_90 and time it")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    if args.stream:
        if args.compile:
            os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile_time_")
            _warm_up()
        for method, kernels in stream(args.stream, args.compile).items():
            secs = kernels.pop("compile_s", None)
            print(f"{method}: " + ", ".join(f"{n} {b} binaries / {c} configurations"
                                           for n, (_, c, b) in kernels.items())
                  + ("" if secs is None else f"; built in {secs:.1f} s"), flush=True)
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_time: run WITHOUT TRITON_INTERPRET (kernels are compiled for sm_90)")
        return 2
    cs = [c for c in kernel_report.cases(False)
          if not args.only or kernel_report.selected(kernel_report.case_id(c), args.only)]
    results = []
    for c in cs:
        with tempfile.TemporaryDirectory(prefix="compile_time_") as tmp:
            out = os.path.join(tmp, "result.json")
            env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(tmp, "cache"),
                       PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
            rc = subprocess.call([sys.executable, os.path.abspath(__file__), "--worker",
                                  json.dumps(c), out], env=env, cwd=ROOT)
            if rc != 0:
                print(f"compile_time: {kernel_report.case_id(c)} failed (exit {rc})")
                return 1
            r = json.load(open(out))
        results.append(r)
        print(f"{r['case']}: {len(r['binaries'])} binaries, "
              f"{sum(b['seconds'] for b in r['binaries']):.1f} s", flush=True)
    inits = sorted(r["init_s"] for r in results)
    meta = dict(date=time.strftime("%Y-%m-%d"), git=kernel_report._git_rev(),
                torch=__import__("torch").__version__, triton=__import__("triton").__version__,
                init_s=inits[len(inits) // 2] if inits else 0.0)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, args.stem + ".json"), "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    with open(os.path.join(args.out, args.stem + ".md"), "w") as f:
        f.write(markdown(meta, results))
    print(f"wrote {args.out}/{args.stem}.{{md,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
