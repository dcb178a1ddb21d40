"""sm_90 compilation of the Sinkhorn set kernels with the launchers' real constexprs, register /
spill usage, and the instruction mix of the innermost loop (PERF.md, "Measuring on the CPU" 2).

Run WITHOUT ``TRITON_INTERPRET`` (``tests/ops/rot/test_sinkhorn.py`` runs it in a subprocess):

    python tests/ops/rot/sinkhorn_sass.py usage fwd1 exact fp32 8     # REG / LOCAL of one config
    python tests/ops/rot/sinkhorn_sass.py loop W1 exact v2            # innermost-loop counts

Workloads: W1 = 50 × 500 × 100 dense contiguous fp32, W2 = x (256, 2048, 7, 7) viewed as
(256, 49, 2048) (``.flatten(2).transpose(1, 2)``). The numbers are read from SASS, not timed.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(os.path.dirname(
    os.path.dirname(HERE)))]  # tests/ (aot.py) and the repo root

import triton  # noqa: E402

from aot import compile_sm90  # noqa: E402
from rotp_triton.ops.rot.triton.sinkhorn import kernels as K  # noqa: E402
from rotp_triton.ops.rot.triton.sinkhorn import launch as L  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_X_PTRS = ("x_ptr", "plan_ptr", "gp_ptr", "dx_ptr")
_I64 = ("sxb", "sxn", "sxd", "spb", "spn", "spd", "sgb", "sgn", "sgd", "sdb", "sdn", "sdd")
_F32 = ("lp0_u",)


def signature(kernel, constexprs: dict, xdt: str) -> dict:
    """Argument types by name: x-like pointers in ``xdt``, ``ptr_ptr`` int64, other pointers
    fp32, strides int64, sizes int32."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _X_PTRS:
            sig[name] = f"*{xdt}"
        elif name == "ptr_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in _I64:
            sig[name] = "i64"
        elif name in _F32:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def config(which: str, variant: str, N, D: int, num_warps: int, ragged: bool = False,
           lean: bool = None) -> tuple:
    """(kernel, constexprs) the launcher would use for this shape (``lean``: the v2 forward
    iteration; default: what the launcher uses now)."""
    paper = variant == "paper"
    if which.startswith("fwd"):
        BN, BD, one = L.fwd_config(D, N, num_warps)
        ce = dict(RAGGED=ragged, HAS_P0=True, HAS_Q0=True, PAPER=paper, RETURN_PLAN=True,
                  ONE_TILE_N=one, BN=BN, BD=BD,
                  LEAN=L.LEAN_FORWARD if lean is None else lean, MASK_N=N is None or N != BN)
        return K.sinkhorn_fwd_kernel, ce
    BN, BD, one = L.bwd_config(D, N, num_warps)
    ce = dict(RAGGED=ragged, HAS_P0=True, HAS_Q0=True, PAPER=paper, HAS_GP=True, ONE_TILE_N=one,
              BN=BN, BD=BD, BT=16)
    return K.sinkhorn_bwd_kernel, ce


# the launcher configurations compiled by the AOT test: (which, variant, x dtype, warps)
# fwd / bwd: streamed tiles (ragged, D = 2048); fwd1 / bwd1: one tile per set (dense N = 49)
AOT_CONFIGS = [("fwd", "exact", "bf16", 8), ("fwd", "paper", "fp32", 4),
               ("fwd1", "exact", "fp32", 8), ("fwd1", "paper", "bf16", 4),
               ("bwd", "exact", "fp32", 4), ("bwd", "paper", "fp16", 8),
               ("bwd1", "exact", "bf16", 8), ("bwd1", "paper", "fp32", 4)]


def compile_config(which, variant, xdt, nw):
    ragged = which in ("fwd", "bwd")
    kern, ce = config(which, variant, None if ragged else 49, 2048, nw, ragged=ragged)
    return compile_sm90(kern, signature(kern, ce, xdt), ce, num_warps=nw)


def usage(compiled) -> tuple:
    """(registers, local-memory bytes) per thread from cuobjdump -res-usage."""
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.cubin")
        open(p, "wb").write(compiled.asm["cubin"])
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", p],
                             capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*LOCAL:(\d+)", res)
    return int(m.group(1)), int(m.group(2))


def sass(compiled) -> str:
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.cubin")
        open(p, "wb").write(compiled.asm["cubin"])
        return subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", p], capture_output=True,
                              text=True, check=True).stdout


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def innermost_loops(text: str) -> list:
    """Innermost loops (a backward branch whose body holds no other backward branch) as dicts:
    instruction count, MUFU count, opcode histogram."""
    instrs, labels = [], {}
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _INSTR.search(line)
        if m:
            instrs.append(m.group(2).strip())
    loops = []
    for i, ins in enumerate(instrs):
        m = re.search(r"\bBRA\b.*?(\.L_x_\d+)", ins)
        if m and labels.get(m.group(1), i + 1) <= i:
            loops.append((labels[m.group(1)], i))
    inner = [(a, b) for a, b in loops
             if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    out = []
    for a, b in inner:
        body = [s for s in instrs[a:b + 1] if not s.startswith("NOP")]
        ops = {}
        for s in body:
            op = re.sub(r"^@!?U?P\w+\s+", "", s).split()[0].split(".")[0]
            ops[op] = ops.get(op, 0) + 1
        out.append(dict(start=a, n=len(body), mufu=ops.get("MUFU", 0), ops=ops))
    return out


# strides: W1 contiguous (sxd = 1), W2 the NCHW view (sxn = 1); the JIT specialises a stride of
# 1 as a constant, so these are compiled as such
WORKLOADS = {"W1": dict(B=50, N=500, D=100, xdt="fp32", unit_stride="sxd"),
             "W2": dict(B=256, N=49, D=2048, xdt="fp32", unit_stride="sxn")}


def loop_report(name: str, variant: str, lean: bool) -> str:
    """The forward's innermost-loop counts per element-iteration for workload ``name``."""
    wl = WORKLOADS[name]
    nw = 8 if wl["B"] < 2 * 132 else 4  # launch.num_warps_for on an H100 (132 SMs)
    kern, ce = config("fwd1", variant, wl["N"], wl["D"], nw, lean=lean)
    ce[wl["unit_stride"]] = 1
    c = compile_sm90(kern, signature(kern, ce, wl["xdt"]), ce, num_warps=nw)
    regs, local = usage(c)
    loops = [lp for lp in innermost_loops(sass(c)) if lp["mufu"] > 0]
    elems = ce["BN"] * ce["BD"] / (32 * nw)  # x elements per thread per trip of a tile loop
    lines = [f"{name} {variant} {'v2' if lean else 'v1'}: BN={ce['BN']} BD={ce['BD']} warps={nw} regs={regs} "
             f"local={local} elements/thread/trip={elems:g}"]
    for lp in loops:
        top = ", ".join(f"{k} {v}" for k, v in sorted(lp["ops"].items(), key=lambda kv: -kv[1])[:10])
        lines.append(f"  loop@{lp['start']}: {lp['n']} instr, {lp['mufu']} MUFU per trip; "
                     f"per element: {lp['n'] / elems:.1f} instr, {lp['mufu'] / elems:.2f} MUFU "
                     f"[{top}]")
    return "\n".join(lines)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET")
    if sys.argv[1] == "usage":
        which, variant, xdt, nw = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
        regs, local = usage(compile_config(which, variant, xdt, nw))
        print("USAGE", which, variant, xdt, nw, regs, local)
    else:
        print(loop_report(sys.argv[2], sys.argv[3], sys.argv[4] == "v2"))
