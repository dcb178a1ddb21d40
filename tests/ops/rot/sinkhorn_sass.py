"""sm_90 compilation of the Sinkhorn set kernels with the launchers' real constexprs, register /
spill usage, and the instruction mix of the innermost loop (PERF.md, "Measuring on the CPU" 2).

Run WITHOUT ``TRITON_INTERPRET`` (``tests/ops/rot/test_sinkhorn.py`` runs it in a subprocess):

    python tests/ops/rot/sinkhorn_sass.py usage fwd1 exact fp32 8 [...]  # REG / LOCAL per config
    python tests/ops/rot/sinkhorn_sass.py small fwd1 64 64 4 [...]       # SMALL_CONFIGS entries
    python tests/ops/rot/sinkhorn_sass.py loop W1 exact               # innermost-loop counts
    python tests/ops/rot/sinkhorn_sass.py atomics dx paper fp32 4 fixed [...]  # atomics in SASS

Workloads: W1 = 50 × 500 × 100 dense contiguous fp32, W2 = x (256, 2048, 7, 7) viewed as
(256, 49, 2048) (``.flatten(2).transpose(1, 2)``). The numbers are read from SASS, not timed.
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(os.path.dirname(
    os.path.dirname(HERE)))]  # tests/ (aot.py) and the repo root

import triton  # noqa: E402

from aot import HOPPER, compile_sm90  # noqa: E402
from rotp_triton.ops.rot.triton.sinkhorn import kernels as K  # noqa: E402
from rotp_triton.ops.rot.triton.sinkhorn import launch as L  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_X_PTRS = ("x_ptr", "plan_ptr", "gp_ptr", "dx_ptr")
_I64 = ("sxb", "sxn", "sxd", "sxn_u", "spb", "spn", "spd", "sgb", "sgn", "sgd", "sdb", "sdn", "sdd")
_F32 = ("lp0_u", "one_exp2_max", "norm_min_kappa")


def signature(kernel, constexprs: dict, xdt: str) -> dict:
    """Argument types by name: x-like pointers in ``xdt``, ``ptr_ptr`` int64, other pointers
    fp32, strides int64, sizes int32. A constexpr parameter not in ``constexprs`` takes its
    default there (as a launch that omits it; else it would compile as a runtime int)."""
    for p in kernel.params:
        if p.is_constexpr and p.name not in constexprs and p.default is not inspect._empty:
            constexprs[p.name] = p.default
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _X_PTRS:
            sig[name] = f"*{xdt}"
        elif name in ("ptr_ptr", "order_ptr"):
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
           unit_stride: bool = False, unit_rows: bool = False, sets: int = 256,
           spread: bool = False) -> tuple:
    """(kernel, constexprs) the launcher would use for this shape; ``unit_stride``: x has a
    stride of 1 that the JIT specialises (the row-pieces backward's capped layout);
    ``unit_rows``: x's rows are contiguous (sxn == 1: the row-pieces forward's lanes layout);
    ``sets``: the batch's sets on 132 SMs (fewer: launch.few_sets_launch's layout);
    ``spread``: with the layers' feature scale (_fold_scale).
    """
    paper = variant == "paper"
    if which.startswith("fwd"):
        BN, BD, one = L.fwd_config(D, N, num_warps)
        P0, P1, P2 = L.row_pieces(N, BN, one, paper)
        few = L.few_sets_launch(sets, 132, N, D, one, (P0, P1, P2), True, paper=paper)
        if few:
            BN, BD = few[:2]
        RL, unit_n = 1, False
        if P0:  # the row-pieces forward (its own warps and cap: launch_options)
            BD, RL, unit_n = L.pieces_fwd_launch(D, (P0, P1, P2), BD, unit_rows)[:3]
        TR, TBD, HALF = L.ragged_tile(D, few[2] if few else num_warps, ragged, paper,
                                      L.few_sets_elems(True) if few else L.FWD_ELEMS_PER_THREAD)
        ce = dict(RAGGED=ragged, HAS_P0=True, HAS_Q0=True, PAPER=paper, RETURN_PLAN=True,
                  ONE_TILE_N=one, BN=BN, BD=BD, MASK_N=N is None or N != BN, P0=P0, P1=P1,
                  P2=P2, MASK_P=N is not None and P0 + P1 + P2 != N, RL=RL,
                  UNIT_N=unit_n, SET_SHIFT=L.SET_SHIFT, SNAKE=L.SNAKE_ORDER, TILE_ROWS=TR,
                  TILE_BD=TBD, TILE_HALF=HALF)
        return K.sinkhorn_fwd_kernel, ce
    has_gp = not which.endswith("nogp")  # bwd*nogp: no plan gradient (wider sweep tiles)
    BN, BD, one = L.bwd_config(D, N, num_warps, has_gp)
    P0, P1, P2 = L.row_pieces(N, BN, one, paper)
    RL, unit_n, BDP = 0, False, 0
    if P0:  # the row-pieces reverse sweeps (the launcher's warps, their own cap, lanes)
        BD = L.pieces_bwd_launch(D, (P0, P1, P2), BD, num_warps, has_gp, unit_stride)[0]
        RL, unit_n, BDP = L.pieces_bwd_lanes(D, (P0, P1, P2), num_warps, unit_rows, has_gp)
    BNX, BDX = L.dx_tile(D, N, num_warps)
    # (the layers' feature scale, exact one tile: _fold_scale's SPREAD; sets of W1's size)
    few = L.few_sets_launch(sets, 132, N, D, one, (P0, P1, P2), False,
                            has_gp or spread and one and not paper)
    if few:
        BN, BD = few[:2]
    TR, TBD, HALF = L.ragged_tile(D, few[2] if few else num_warps, ragged, paper,
                                  L.few_sets_elems(False, has_gp, ragged) if few else
                                  L.BWD_ELEMS_PER_THREAD if has_gp else L.SWEEP_ELEMS_PER_THREAD)
    ce = dict(RAGGED=ragged, HAS_P0=True, HAS_Q0=True, PAPER=paper, HAS_GP=has_gp, ONE_TILE_N=one,
              BN=BN, BD=BD, BT=16, BNX=BNX, BDX=BDX, BDF=L.fused_sweep_bd(BD, has_gp),
              FUSE_DX=L.fuse_dx(P0 + P1 + P2 if P0 else BN, L.fused_sweep_bd(BD, has_gp), BNX,
                                BDX, one, paper),
              P0=P0, P1=P1, P2=P2, MASK_P=N is not None and P0 + P1 + P2 != N, RL=RL,
              UNIT_N=unit_n, BDP=BDP, TILE_ROWS=TR, TILE_BD=TBD, TILE_HALF=HALF)
    # dense with dx not in the sweep: the few-sets case (dx by its own launch) is compiled,
    # as is every launch with the lanes sweeps (launch.sinkhorn_backward)
    ce["FUSE_DX"] = ce["FUSE_DX"] and not RL
    ce["SPLIT_DX"] = not ragged and not ce["FUSE_DX"]
    # dense exact at W2's layout (the NCHW view, samples contiguous): packed dx row vectors
    ce["PACK"] = not ragged and L.packed_rows(N, BNX, P0 + P1 + P2, paper, 1) > 0
    return K.sinkhorn_bwd_kernel, ce


def launch_options(which: str, variant: str, N, D: int, num_warps: int,
                   unit_stride: bool = False, unit_rows: bool = False,
                   sets: int = 256, spread: bool = False) -> tuple:
    """(num_warps, maxnreg) the launcher passes with ``config``'s launch: the row-pieces
    kernels and few large sets (launch.few_sets_launch) have their own."""
    paper = variant == "paper"
    fwd = which.startswith("fwd")
    has_gp = not fwd and not which.endswith("nogp")
    BN, BD, one = (L.fwd_config(D, N, num_warps) if fwd
                   else L.bwd_config(D, N, num_warps, has_gp))
    pieces = L.row_pieces(N, BN, one, paper)
    few = L.few_sets_launch(sets, 132, N, D, one, pieces, fwd,
                            has_gp or spread and one and not paper, paper=paper)
    if few:
        return few[2:]
    if pieces[0] and fwd:
        return L.pieces_fwd_launch(D, pieces, BD, unit_rows)[3:]
    if pieces[0]:
        return L.pieces_bwd_launch(D, pieces, BD, num_warps, has_gp, unit_stride)[1:]
    return num_warps, L.MAX_REGISTERS


# the launcher configurations compiled by the AOT test: (which, variant, x dtype, warps)
# fwd / bwd: streamed tiles (ragged, D = 2048; the exact forward and backward also hold their
# one-tile iterations and sweeps for sets of 129-512 rows, launch.ragged_tile); fwd1 / bwd1:
# one tile per set (dense N = 49; the exact forward then holds the rows in three pieces: its
# chunk within the tile of the launcher's warps, 8 at W2's 256 sets on 132 SMs, launched with
# its own: launch_options);
# bwd / bwd1 with a plan gradient, bwdnogp / bwd1nogp without (the launcher then picks wider
# sweep tiles, launch.bwd_config); split_*: the split-set launches at W1's shape; dx: the
# row-block dx launch at W1's shape; "@few": fewer sets than SMs (64; launch.few_sets_launch:
# the ragged exact forward and backward at 16 warps)
AOT_CONFIGS = [("fwd", "exact", "bf16", 8), ("fwd", "exact", "fp32", 4),
               ("fwd+s@few", "exact", "bf16", 8), ("bwd@few", "exact", "bf16", 8),
               ("fwd", "paper", "fp32", 4),
               ("fwd1", "exact", "fp32", 8), ("fwd1", "exact", "bf16", 8),
               ("fwd1", "paper", "bf16", 4),
               ("bwd", "exact", "fp32", 4), ("bwd", "paper", "fp16", 8),
               ("bwd1", "exact", "bf16", 8), ("bwd1", "paper", "fp32", 4),
               ("bwdnogp", "exact", "fp32", 4), ("bwd1nogp", "exact", "bf16", 8),
               ("bwd1nogp", "exact", "fp32", 4), ("bwd1nogp", "paper", "fp32", 8),
               ("split_col", "exact", "bf16", 8), ("split_a", "exact", "fp32", 4),
               ("split_row", "exact", "fp32", 8), ("split_b", "exact", "fp32", 1),
               ("dx", "exact", "bf16", 8), ("dx", "paper", "fp32", 4),
               # "+s": the layers' feature scale folded in (SCALED; W2: one tile, no plan;
               # exact one-tile backward and dx: SPREAD too, σ's x̄ term in the dx pass, the
               # backward's own pass at W2's 256 sets)
               ("fwd1+s", "exact", "fp32", 8), ("bwd1nogp+s", "exact", "fp32", 8),
               ("bwd1nogp+s", "exact", "bf16", 4),
               ("bwd1nogp+s", "paper", "fp32", 4), ("dx+s", "paper", "fp32", 4),
               ("dx+s", "exact", "bf16", 8), ("split_row+s", "exact", "fp32", 8)]


# small dense sets of contiguous rows, exact, one tile (no row pieces), (which, N, D, warps):
# 16-128 rows, 32-128 features, where ptxas without launch.MAX_REGISTERS chose 80-128
# registers and spilled; compiled with the JIT's specialisations of a contiguous (B, N, D)
# batch (unit feature stride: vector loads)
SMALL_CONFIGS = [("fwd1", 16, 32, 8), ("fwd1", 16, 128, 8), ("fwd1", 32, 32, 4),
                 ("fwd1", 64, 64, 4), ("fwd1", 64, 64, 8), ("fwd1", 128, 64, 8),
                 ("fwd1", 32, 128, 8), ("bwd1", 32, 64, 8), ("bwd1", 64, 64, 4),
                 ("bwd1", 128, 64, 8), ("bwd1nogp", 32, 64, 4), ("bwd1nogp", 64, 64, 4),
                 ("bwd1nogp", 64, 64, 8), ("bwd1nogp", 128, 64, 8),
                 # row pieces, exact forward under launch.PIECES_FWD_MAX_REGISTERS: 25 = 16 + 8
                 # + 1 and 49 rows (8 fp32 a thread spilled 24 B there), 196 (a chunk narrower
                 # than launch.PIECES_MIN_BD: the 4-warp layout)
                 ("fwd1", 25, 2048, 8), ("fwd1", 49, 2048, 8), ("fwd1", 196, 512, 8),
                 # the row-pieces forward in lanes (rows contiguous: "@nchw"; W2's 49 rows are
                 # AOT_CONFIGS'): RL = 2 at 25 rows, RL = 4 with two pieces narrower than RL at
                 # 36 = 32 + 2 + 2; 81 rows (RL would be 8: 16 B spilled) one row a lane
                 ("fwd1@nchw", 25, 2048, 8), ("fwd1@nchw", 36, 2048, 8),
                 ("fwd1@nchw", 81, 2048, 8),
                 # the row-pieces backward under launch.PIECES_BWD_MAX_REGISTERS (a unit stride
                 # specialised), contiguous and ("@nchw") W2's NCHW view, with and without a
                 # plan gradient, "+s" with the layers' feature scale (W2's launch)
                 ("bwd1", 49, 2048, 8), ("bwd1nogp", 25, 2048, 8), ("bwd1nogp+s", 49, 2048, 8),
                 ("bwd1@nchw", 49, 2048, 8), ("bwd1nogp@nchw", 49, 2048, 8),
                 ("bwd1nogp+s@nchw", 49, 2048, 8), ("bwd1nogp+s@nchw", 81, 2048, 8),
                 # its reverse sweeps in lanes (rows contiguous, no plan gradient; W2's 49 rows
                 # above): RL = 2 at 25 rows, RL = 4 with two pieces narrower than RL at 36
                 ("bwd1nogp@nchw", 25, 2048, 8), ("bwd1nogp+s@nchw", 36, 2048, 8),
                 # and its dx launch in lanes (launch.PIECES_DX_MAX_REGISTERS): W2's, 36 rows
                 ("dx+s@nchw", 49, 2048, 8), ("dx@nchw", 36, 2048, 8),
                 # fewer sets (64) than SMs, at least launch.FEW_SETS_MIN_ROWS rows: 16 warps
                 # under 128 registers (launch.few_sets_launch); W1's 500 x 100, a wide set
                 ("fwd1", 500, 100, 8), ("fwd1+s", 500, 100, 8), ("fwd1%paper", 500, 100, 8),
                 ("bwd1nogp", 500, 100, 8), ("bwd1", 500, 100, 8), ("bwd1nogp+s", 500, 100, 8),
                 ("bwd1nogp%paper", 256, 2048, 8)]


def _fold_scale(ce: dict, which: str, variant: str) -> None:
    """The constexprs of the layers' feature scale folded in (SCALED; the one-program-per-set
    forward, dense or ragged, forms σ itself; the exact one-tile backward and dx: σ's x̄ term
    in the dx pass, SPREAD), as launch.sinkhorn_forward / sinkhorn_backward set them."""
    ce["SCALED"] = True
    if which in ("fwd", "fwd1"):
        ce["STATS"] = True
    if variant == "exact" and (which == "dx" or which.startswith("bwd") and ce["ONE_TILE_N"]):
        ce["SPREAD"] = True
        if which != "dx":
            ce["FUSE_DX"] = False
            ce["SPLIT_DX"] = bool(ce["RL"])


def compile_small(which: str, N: int, D: int, nw: int, B: int = 64):
    """A ``SMALL_CONFIGS`` entry as the launcher builds it for B fp32 sets of contiguous rows,
    or ("...@nchw") the sets of an NCHW image batch viewed as (B, H·W, C) (samples
    contiguous), "+s": with the layers' feature scale."""
    which, variant = (which[:-6], "paper") if which.endswith("%paper") else (which, "exact")
    which, nchw = which.removesuffix("@nchw"), which.endswith("@nchw")
    which, scaled = which.removesuffix("+s"), which.endswith("+s")
    if which == "dx":      # the lanes dx launch (rows contiguous, its register cap)
        kern, ce = lanes_dx_config(N, D, nw)
        cap = L.PIECES_DX_MAX_REGISTERS
        if scaled:
            ce.update(SCALED=True, SPREAD=True)
    else:
        kern, ce = config(which, variant, N, D, nw, unit_stride=True, unit_rows=nchw, sets=B,
                          spread=scaled)
        nw, cap = launch_options(which, variant, N, D, nw, unit_stride=True, unit_rows=nchw,
                                 sets=B, spread=scaled)
        if scaled:
            _fold_scale(ce, which, variant)
    ints = dict(N=N, D=D, T=4, NR=B * N)
    for p in ("sx", "sp", "sg", "sd"):      # x, plan, plan gradient, dx: all (B, N, D)
        ints.update({p + "b": N * D, p + "n": 1 if nchw else D, p + "d": N if nchw else 1})
    ints["sxn_u"] = ints["sxn"]
    if which == "dx":
        ints["NPAD"] = L.packed_rows(N, ce["BNX"], ce["P0"] + ce["P1"] + ce["P2"], False, 1)
    return compile_like_jit(kern, signature(kern, ce, "fp32"), ce, ints, nw, cap)


def split_config(which: str, N: int, D: int, num_warps: int) -> tuple:
    """(kernel, constexprs) of a split-set launch (launch._split_iterations) for B = 50 sets
    of N rows on 132 SMs."""
    rows = L.next_pow2(L.cdiv(N, min(L.cdiv(132, 50), N // L.SPLIT_MIN_ROWS)))
    NB = L.cdiv(N, rows)
    BD = max(min(L.next_pow2(D), L.FWD_ELEMS_PER_THREAD * 32 * num_warps // rows, 128), 1)
    return {"split_col": (K.sinkhorn_split_col_kernel, dict(BN=rows, BD=BD)),
            "split_a": (K.sinkhorn_split_a_kernel,
                        dict(HAS_P0=True, BJ=L.next_pow2(NB), BD=min(L.next_pow2(D), 1024))),
            "split_row": (K.sinkhorn_split_row_kernel, dict(HAS_Q0=True, BN=rows, BD=BD)),
            "split_b": (K.sinkhorn_split_b_kernel, dict(BN=rows, BJ=L.next_pow2(NB)))}[which]


def dx_config(variant: str, N: int, D: int, num_warps: int) -> tuple:
    """(kernel, constexprs) of the row-block dx launch (launch.split_dx) for N rows, D features."""
    BNX, BDX = L.dx_tile(D, N, num_warps)
    one = L.bwd_config(D, N, num_warps)[2]
    return K.sinkhorn_dx_kernel, dict(PAPER=variant == "paper", HAS_GP=True,
                                      TX=not (one and variant == "exact"), BNX=BNX, BDX=BDX,
                                      BT=16)


def lanes_dx_config(N: int, D: int, num_warps: int) -> tuple:
    """(kernel, constexprs) of the dx launch with the backward's lanes (launch.sinkhorn_backward:
    dense exact sets of contiguous rows, no plan gradient; kernels._lanes_dx)."""
    BN, BD, one = L.bwd_config(D, N, num_warps, False)
    P0, P1, P2 = L.row_pieces(N, BN, one, False)
    RL, unit_n, BDP = L.pieces_bwd_lanes(D, (P0, P1, P2), num_warps, True, False)
    BNX, BDX = L.dx_tile(D, N, num_warps)
    return K.sinkhorn_dx_kernel, dict(
        PAPER=False, HAS_GP=False, TX=False, BNX=BNX, BDX=BDX, BT=16, PACK=True, RL=RL,
        UNIT_N=unit_n, P0=P0, P1=P1, P2=P2, MASK_P=P0 + P1 + P2 != N, BDP=BDP,
        DB=BDP * L.PIECES_DX_CHUNKS)


def compile_config(which, variant, xdt, nw, fixed_order: bool = False):
    """``fixed_order``: the backward / dx launch under ``torch.use_deterministic_algorithms``
    (FIXED_ORDER: weight-gradient shares stored, not added atomically); "...@few": 64 sets,
    fewer than the SMs (launch.few_sets_launch), else 256."""
    which, sets = (which[:-4], 64) if which.endswith("@few") else (which, 256)
    scaled = which.endswith("+s")
    which = which.removesuffix("+s")
    cap = L.MAX_REGISTERS
    if which == "dx":  # W1's shape
        kern, ce = dx_config(variant, 500, 100, nw)
    elif which.startswith("split"):  # W1's shape
        kern, ce = split_config(which, 500, 100, nw)
    else:
        ragged = which in ("fwd", "bwd", "bwdnogp")
        # (dense: W2's NCHW view, rows contiguous)
        kern, ce = config(which, variant, None if ragged else 49, 2048, nw, ragged=ragged,
                          unit_rows=not ragged, sets=sets)
        nw, cap = launch_options(which, variant, None if ragged else 49, 2048, nw,
                                 unit_rows=not ragged, sets=sets)
    if scaled:
        _fold_scale(ce, which, variant)
    if fixed_order:
        ce["FIXED_ORDER"] = True
    capped = kern in (K.sinkhorn_fwd_kernel, K.sinkhorn_bwd_kernel)  # (as the launchers)
    return compile_sm90(kern, signature(kern, ce, xdt), ce, num_warps=nw,
                        maxnreg=cap if capped else None)


def usage(compiled) -> tuple:
    """(registers, spill bytes) per thread from cuobjdump -res-usage; spills are LOCAL + STACK
    (ptxas puts register spills of these kernels on the stack frame)."""
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.cubin")
        open(p, "wb").write(compiled.asm["cubin"])
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", p],
                             capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+).*LOCAL:(\d+)", res)
    return int(m.group(1)), int(m.group(2)) + int(m.group(3))


def sass(compiled) -> str:
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.cubin")
        open(p, "wb").write(compiled.asm["cubin"])
        return subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", p], capture_output=True,
                              text=True, check=True).stdout


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def atomic_instructions(compiled) -> int:
    """Atomic and reduction instructions in the SASS (ATOM, ATOMG, ATOMS, RED, REDG; predicated
    or not; not REDUX, a warp reduction)."""
    return sum(1 for line in sass(compiled).splitlines()
               for m in [_INSTR.search(line)]
               if m and re.match(r"(@!?U?P\w+\s+)?(ATOM[GS]?|REDG?)\b", m.group(2)))


# the kernels' rare-path guard (kernels._TINY = 2^-60 as printed by nvdisasm): the forward
# branch that follows a comparison with it skips the exact-LSE fallback on the hot path
_TINY_TEXT = "8.6736173798840354721e-19"


def _hot_path(instrs: list, labels: dict, a: int, b: int) -> list:
    """The instructions of instrs[a..b] that one trip of the loop executes when no fallback is
    taken: a conditional forward branch right after a comparison with 2^-60 is followed."""
    out, i = [], a
    while i <= b:
        ins = instrs[i]
        out.append(ins)
        m = re.search(r"^@!?P\d\s+BRA\b.*?(\.L_x_\d+)", ins)
        if m and _TINY_TEXT in " ".join(instrs[max(a, i - 3):i]) and labels[m.group(1)] > i:
            i = labels[m.group(1)]
            continue
        i += 1
    return out


def innermost_loops(text: str) -> list:
    """Innermost loops (a backward branch whose body holds no other backward branch) as dicts:
    instruction count, MUFU count, opcode histogram of one trip's hot path (``_hot_path``)."""
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
        body = [s for s in _hot_path(instrs, labels, a, b) if not s.startswith("NOP")]
        ops = {}
        for s in body:
            op = re.sub(r"^@!?U?P\w+\s+", "", s).split()[0].split(".")[0]
            ops[op] = ops.get(op, 0) + 1
        out.append(dict(start=a, n=len(body), mufu=ops.get("MUFU", 0), ops=ops))
    return out


# the int arguments of the launch (W1 contiguous: sxd = 1; W2 the NCHW view: sxn = 1), compiled
# with the JIT's specialisations (compile_like_jit)
WORKLOADS = {"W1": dict(B=50, N=500, D=100, xdt="fp32", unit_stride="sxd",
                       ints=dict(sxb=50000, sxn=100, sxd=1, N=500, D=100, T=4, NR=25000)),
             "W2": dict(B=256, N=49, D=2048, xdt="fp32", unit_stride="sxn",
                       ints=dict(sxb=100352, sxn=1, sxd=49, sxn_u=1, N=49, D=2048, T=4,
                                 NR=12544))}


def compile_like_jit(kernel, sig: dict, constexprs: dict, ints: dict, num_warps: int,
                     maxnreg: int = L.MAX_REGISTERS):
    """compile_sm90 with the JIT's specialisation of the launch: an int argument is i32 when it
    fits, one equal to 1 is a constant (unless ``do_not_specialize``), one divisible by 16 and every pointer (torch allocations) carry
    ``tt.divisibility = 16``, which is what lets the compiler vectorise and hoist."""
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    ce = dict(constexprs)
    for name, v in ints.items():
        if name not in fn.arg_names:     # (the workload's ints cover both kernels)
            continue
        if v == 1 and name not in fn.do_not_specialize:
            ce[name] = 1
            sig[name] = "constexpr"
        elif name in sig and sig[name] != "constexpr":
            sig[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"  # the JIT types ints by value
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if sig[name].startswith("*") or (name in ints and ints[name] % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=ce, attrs=attrs)
    return triton.compile(src, target=HOPPER, options={"num_warps": num_warps, "num_stages": 3,
                                                       "maxnreg": maxnreg})


def loop_report(name: str, variant: str) -> str:
    """The forward's innermost-loop counts per element-iteration for workload ``name``."""
    wl = WORKLOADS[name]
    nw = 8 if wl["B"] < 2 * 132 else 4  # launch.num_warps_for on an H100 (132 SMs)
    unit_rows = wl["unit_stride"] == "sxn"
    kern, ce = config("fwd1", variant, wl["N"], wl["D"], nw, unit_rows=unit_rows)
    nw, cap = launch_options("fwd1", variant, wl["N"], wl["D"], nw, unit_rows=unit_rows)
    c = compile_like_jit(kern, signature(kern, ce, wl["xdt"]), ce, wl["ints"], nw, cap)
    regs, local = usage(c)
    loops = [lp for lp in innermost_loops(sass(c)) if lp["mufu"] > 0]
    rows = ce["P0"] + ce["P1"] + ce["P2"] if ce["P0"] else ce["BN"]
    elems = rows * ce["BD"] / (32 * nw)  # x elements per thread per trip of a tile loop
    lines = [f"{name} {variant}: rows={rows} BD={ce['BD']} warps={nw} regs={regs} "
             f"spill bytes={local} elements/thread/trip={elems:g}"]
    for lp in loops:
        top = ", ".join(f"{k} {v}" for k, v in sorted(lp["ops"].items(), key=lambda kv: -kv[1])[:10])
        lines.append(f"  loop@{lp['start']}: {lp['n']} instr, {lp['mufu']} MUFU per trip; "
                     f"per element: {lp['n'] / elems:.1f} instr, {lp['mufu'] / elems:.2f} MUFU "
                     f"[{top}]")
    return "\n".join(lines)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET")
    if sys.argv[1] == "usage":       # one or more configs: which variant xdt warps, ...
        args = sys.argv[2:]
        for i in range(0, len(args), 4):
            which, variant, xdt, nw = args[i], args[i + 1], args[i + 2], int(args[i + 3])
            regs, local = usage(compile_config(which, variant, xdt, nw))
            print("USAGE", which, variant, xdt, nw, regs, local, flush=True)
    elif sys.argv[1] == "small":     # one or more SMALL_CONFIGS entries: which N D warps, ...
        args = sys.argv[2:]
        for i in range(0, len(args), 4):
            which, N, D, nw = args[i], int(args[i + 1]), int(args[i + 2]), int(args[i + 3])
            regs, local = usage(compile_small(which, N, D, nw))
            print("USAGE", which, N, D, nw, regs, local, flush=True)
    elif sys.argv[1] == "atomics":   # one or more configs: which variant xdt warps fixed, ...
        args = sys.argv[2:]
        for i in range(0, len(args), 5):
            which, variant, xdt, nw = args[i], args[i + 1], args[i + 2], int(args[i + 3])
            fixed = args[i + 4] == "fixed"
            n = atomic_instructions(compile_config(which, variant, xdt, nw, fixed))
            print("ATOMICS", which, variant, xdt, nw, args[i + 4], n, flush=True)
    else:
        print(loop_report(sys.argv[2], sys.argv[3]))
