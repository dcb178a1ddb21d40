"""SASS-based prediction of the SPLIT badmm v2 kernels (sets over NS x DS programs) vs one
program per set, sm_90 (H100): the "split" section of badmm_v2_2026-11-28.md.

Run from the repo root WITHOUT TRITON_INTERPRET:
PYTHONPATH=.:tests python bench/results/badmm_v2_2026-11-28_split_predict.py
Model as badmm_v2_2026-11-28_predict.py (bytes / exp2 / issue-bound maximum, whole machine busy)
plus occupancy: a launch of P programs of r registers at 8 warps fills
min(1, P / (132 * floor(65536 / (256 r)))) of the machine's CTA slots (wave quantisation
ignored beyond that), and 4 us per extra launch (no CUDA graph).
"""
import os, sys
sys.path.insert(0, "tests")
sys.path.insert(0, os.path.dirname(__file__))
import torch
from aot import compile_sm90
from rotp_triton.ops.rot.triton.badmm import kernels as m, launch, badmm_cost_model
from rotp_triton.ops.rot.triton.badmm import split_kernels as s, split_backward_kernels as sb
import importlib
pred = importlib.import_module("badmm_v2_2026-11-28_predict")

SMS, LAUNCH = 132, 4e-6
launch.sm_count = lambda device: SMS          # the launchers' heuristics as on an H100


def body(kernel, consts, per_thread, eff, nw):
    """(instr per element of the pass body (outer loops holding the replay loop), replay loop
    instr per element-iteration, registers)."""
    c = compile_sm90(kernel, pred.sig(kernel, consts), consts, num_warps=nw)
    loops, total = pred.loops_of(c.asm["cubin"])
    rep = [l for l in loops if not l["inner"] and l["mufu"] >= 16 and l["ldg"] >= 16
           and l["stg"] == 0]
    rep_L = {l["L"] for l in rep}
    bodies = [l for l in loops if l["inner"] and set(l["inner"]) <= rep_L and l["mufu"] >= 4]
    if not rep:     # streamed: the innermost tile loop is the pass body
        bodies = [l for l in loops if not l["inner"] and l["mufu"] >= 2]
    out = os.popen(f"{pred.BIN}/cuobjdump --dump-resource-usage /tmp/sass/k.cubin").read()
    regs = int([l for l in out.splitlines() if "REG:" in l][0].split("REG:")[1].split()[0])
    b = max(x["n"] for x in bodies) / per_thread / eff if bodies else 0.0
    r = rep[0]["n"] / per_thread / eff if rep else 0.0
    return b, r, regs


def fill(programs, regs):
    per_sm = max(1, 65536 // (256 * max(regs, 1)))
    return min(1.0, programs / (SMS * per_sm))


def run(name, B, N, D, quad, T=4, forced=None):
    """One table row; ``forced``: (NS, DS) for both directions instead of the heuristics."""
    n = B * N * D
    BN, BD, BV, nw = launch.block_sizes(N, D)
    per_thread = BN * BD / (32 * nw)
    eff = min(D, BD) / BD if D < BD else 1.0
    c = dict(RAGGED=False, HAS_P0=False, HAS_Q0=False, QUAD=quad, KV=2, BN=BN, BD=BD)
    cA, rA, gA = body(s.badmm_split_column_lse_kernel, dict(c, POOL=False, REPLAY=True),
                      per_thread, eff, nw)
    cB, rB, gB = body(s.badmm_split_row_lse_kernel, dict(c, REPLAY=True), per_thread, eff, nw)
    p2, r2, g2 = body(sb.badmm_split_bwd_pass2_kernel, dict(c, PAPER=False, PLAN=False),
                      per_thread, eff, nw)
    p3, r3, g3 = body(sb.badmm_split_bwd_pass3_kernel, dict(c, PAPER=False), per_thread, eff,
                      nw)
    replay = launch.forward_replays(T, 4)
    sA, _, gsA = body(s.badmm_split_column_lse_kernel, dict(c, POOL=False, REPLAY=False),
                      per_thread, eff, nw)
    sB, _, gsB = body(s.badmm_split_row_lse_kernel, dict(c, REPLAY=False), per_thread, eff, nw)
    NS, DS = forced or launch.forward_splits(B, N, D, BN, BD, torch.device("cpu"))
    NSb, DSb = forced or launch.backward_splits(B, N, D, BN, BD, torch.device("cpu"))
    P = B * NS * DS
    sched = "replay" if replay else "stream"
    cf = badmm_cost_model(n, T, schedule=sched)
    cb = badmm_cost_model(n, T, schedule=sched, backward=True)
    ri_f = cf["replay_iters"] / n
    ri_b = (cb["replay_iters"] - cf["replay_iters"]) / n
    # forward: (T-1) x (A + B) + last A, replay iterations split evenly between A and B
    fiA = T * cA + ri_f / 2 * rA
    fiB = (T - 1) * cB + ri_f / 2 * rB
    if replay:
        tA = max(T * n * 4 / pred.BW, fiA * n / pred.ISSUE) / fill(P, gA)
        tB = max((T - 1) * n * 4 / pred.BW, fiB * n / pred.ISSUE) / fill(P, gB)
    else:       # streamed: A reads x + 2 state, B reads x + 2 state and writes 2 state
        tA = max(T * n * 12 / pred.BW, T * sA * n / pred.ISSUE) / fill(P, gsA)
        tB = max((T - 1) * n * 20 / pred.BW, (T - 1) * sB * n / pred.ISSUE) / fill(P, gsB)
        rA, rB, cA, cB, gA, gB = 0.0, 0.0, sA, sB, gsA, gsB
    tf = tA + tB + (4 * (T - 1) + 2 + (not replay)) * LAUNCH
    tf = max(tf, cf["exp2"] / pred.SFU)
    bi2 = (T - 1) * p2 + ri_b / 2 * r2
    bi3 = T * p3 + ri_b / 2 * r3
    bbytes = cb["bytes"] - cf["bytes"]
    Pb = B * NSb * DSb
    tb = (max(bbytes * 0.45 / pred.BW, bi2 * n / pred.ISSUE) / fill(Pb, g2)
          + max(bbytes * 0.55 / pred.BW, bi3 * n / pred.ISSUE) / fill(Pb, g3)
          + (4 * T + 1) * LAUNCH * (Pb > B))
    sol = max((n * 4 + B * D * 4) / pred.BW, 4 * T * n / pred.SFU)
    print(f"| {name} {'B-Q' if quad else 'B-E'}{' (forced)' if forced else ''} | {T} {sched} | fwd {NS}x{DS} ({P} programs), bwd "
          f"{NSb}x{DSb} ({Pb}) | regs A {gA} B {gB} p2 {g2} p3 {g3} | bodies A {cA:.1f} B {cB:.1f}"
          f" p2 {p2:.1f} p3 {p3:.1f}; replay {rA:.1f}/{rB:.1f}/{r2:.1f}/{r3:.1f} | "
          f"{tf * 1e3:.3f} | {tb * 1e3:.3f} | {sol * 1e3:.3f} | {tf / sol:.1f}x |")


if __name__ == "__main__":
    print("| shape | T | split (NS x DS) | registers | instr / elem (pass bodies; replay per "
          "elem-iter) | fwd ms | bwd ms | SoL fwd ms | fwd / SoL |")
    print("|---|---|---|---|---|---|---|---|---|")
    run("W1", 50, 500, 100, False)
    run("W1", 50, 500, 100, True)
    run("W1", 50, 500, 100, False, T=16)
    run("W2", 256, 49, 2048, False, forced=(1, 3))
    run("W2", 256, 49, 2048, False, forced=(1, 16))
