"""SASS-based prediction of the badmm v2 kernels (sm_90, H100): generates the tables of badmm_v2_2026-11-28.md.

Run from the repo root WITHOUT TRITON_INTERPRET: PYTHONPATH=. python bench/results/badmm_v2_2026-11-28_predict.py
"""
import collections, os, re, subprocess, sys
sys.path.insert(0, "tests")
import triton
from aot import compile_sm90
from rotp_triton.ops.rot.triton.badmm import kernels as m, launch, badmm_cost_model

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTR = {"x_ptr": "*fp32", "ptr_ptr": "*i64", "order_ptr": "*i64"}
ISSUE = 128 * 132 * 1.75e9        # lane-instructions / s
SFU = 3.7e12                      # exp2 / s
BW = 3.0e12                       # bytes / s


def sig(kernel, consts):
    return {n: "constexpr" if n in consts else PTR.get(n, "*fp32") if n.endswith("_ptr")
            else "fp32" if n == "u_p0" else "i32" for n in kernel.arg_names}


def loops_of(cubin):
    f = "/tmp/sass/k.cubin"
    open(f, "wb").write(cubin)
    sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", f], capture_output=True,
                          text=True).stdout.splitlines()
    ins, labels, pending = [], {}, []
    for l in sass:
        ml = re.match(r"^\.(L_x_\d+):", l.strip())
        if ml:
            pending.append(ml.group(1)); continue
        mi = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s*(.*?);", l)
        if mi:
            a = int(mi.group(1), 16)
            for p in pending:
                labels[p] = a
            pending = []
            ins.append((a, mi.group(2)))
    loops = set()
    for a, t in ins:
        mb = re.search(r"BRA\s.*?\.(L_x_\d+)", t)
        if mb and labels.get(mb.group(1), 1 << 40) <= a:
            loops.add((labels[mb.group(1)], a))
    out = []
    for L in sorted(loops):
        inner = [o for o in loops if o != L and L[0] <= o[0] and o[1] <= L[1]]
        own = [t for a, t in ins if L[0] <= a <= L[1] and not any(o[0] <= a <= o[1] for o in inner)]
        c = collections.Counter(re.sub(r"^(@!?U?P\w+\s+)", "", t).split()[0].split(".")[0] for t in own)
        out.append(dict(L=L, inner=inner, n=len(own), mufu=c["MUFU"], ldg=c["LDG"], stg=c["STG"]))
    return out, len(ins)


def analyse(kernel, D, N, quad, flag, replay):
    BN, BD, BV, nw = launch.block_sizes(N, D)
    consts = dict(RAGGED=False, HAS_P0=False, HAS_Q0=False, QUAD=quad, PAPER=False, BN=BN, BD=BD,
                  BV=BV, **{flag: False})
    consts["KV"] = 2
    if replay is not None:
        consts["REPLAY"] = replay
    c = compile_sm90(kernel, sig(kernel, consts), consts, num_warps=nw)
    loops, total = loops_of(c.asm["cubin"])
    per_thread = BN * BD / (32 * nw)        # tile elements per thread
    eff = (min(N, BN) if N < BN else BN) * min(D, BD) / (BN * BD) if D < BD else 1.0
    rep = [l for l in loops if not l["inner"] and l["mufu"] >= 16 and l["ldg"] >= 16 and l["stg"] == 0]
    rep_n = rep[0]["n"] if rep else 0
    rep_L = {l["L"] for l in rep}
    if replay is None or replay:
        bodies = [l for l in loops if l["inner"] and set(l["inner"]) <= rep_L and l["mufu"] >= 4]
    else:
        bodies = [l for l in loops if not l["inner"] and l["mufu"] >= 9 and l["ldg"] >= 30]
    out = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", "/tmp/sass/k.cubin"],
                         capture_output=True, text=True).stdout
    line = [l for l in out.splitlines() if "REG:" in l][0]
    regs = int(line.split("REG:")[1].split()[0]); spills = int(line.split("LOCAL:")[1].split()[0])
    return dict(total=total, regs=regs, spills=spills, per_thread=per_thread, eff=eff,
                replay=rep_n / per_thread / eff,
                bodies=[b["n"] / per_thread / eff for b in bodies], tile=(BN, BD, nw))


def predict(name, B, N, D, quad):
    n = B * N * D
    res = {}
    fr = analyse(m.badmm_fwd_kernel, D, N, quad, "PLAN", True)
    fs = analyse(m.badmm_fwd_kernel, D, N, quad, "PLAN", False)
    bw = analyse(m.badmm_bwd_kernel, D, N, quad, "PLAN_GRAD", None)
    print(f"## {name} {'B-Q' if quad else 'B-E'}: B={B} N={N} D={D}")
    print(f"fwd replay: {fr['total']} SASS instr, regs {fr['regs']}, spills {fr['spills']}, tile {fr['tile']}, "
          f"replay loop {fr['replay']:.1f} instr/elem-iter, pass bodies {[round(b, 1) for b in fr['bodies']]} instr/elem")
    print(f"fwd stream: {fs['total']} SASS instr, regs {fs['regs']}, spills {fs['spills']}, pass bodies {[round(b, 1) for b in fs['bodies']]} instr/elem")
    print(f"bwd: {bw['total']} SASS instr, regs {bw['regs']}, spills {bw['spills']}, replay loop {bw['replay']:.1f}, "
          f"pass bodies {[round(b, 1) for b in bw['bodies']]} instr/elem")
    A, Bp, lastA = fr["bodies"][0], fr["bodies"][1], fr["bodies"][2]
    sA, sB, slast = fs["bodies"][0], fs["bodies"][1], fs["bodies"][2]
    p2, p3 = bw["bodies"][0], bw["bodies"][1]
    rows = []
    for T in (4, 16):
        sched = "replay" if launch.forward_replays(T, 4) else "stream"
        cf = badmm_cost_model(n, T, schedule=sched)
        cb = badmm_cost_model(n, T, schedule=sched, backward=True)
        c1f = badmm_cost_model(n, T, schedule="v1")
        c1b = badmm_cost_model(n, T, schedule="v1", backward=True)
        if sched == "replay":
            fi = (T - 1) * (A + Bp) + lastA + cf["replay_iters"] / n * fr["replay"]
        else:
            fi = (T - 1) * (sA + sB) + slast
        bi = (T - 1) * (p2 + p3) + p3 + (cb["replay_iters"] - cf["replay_iters"]) / n * bw["replay"]
        tf = max(cf["bytes"] / BW, cf["exp2"] / SFU, fi * n / ISSUE)
        bb, be = cb["bytes"] - cf["bytes"], cb["exp2"] - cf["exp2"]
        tb = max(bb / BW, be / SFU, bi * n / ISSUE)
        sol = max((n * 4 + B * D * 4) / BW, 4 * T * n / SFU)
        t1f = max(c1f["bytes"] / BW, c1f["exp2"] / SFU)
        t1 = max(c1b["bytes"] / BW, c1b["exp2"] / SFU)
        rows.append((T, sched, c1f["bytes"] / 1e9, c1b["bytes"] / 1e9, cf["bytes"] / 1e9, cb["bytes"] / 1e9,
                     fi, bi, tf * 1e3, tb * 1e3, sol * 1e3, tf / sol, t1f * 1e3, t1 * 1e3, t1 / (tf + tb)))
    print("| T | fwd schedule | v1 fwd GB | v1 fwd+bwd GB | v2 fwd GB | v2 fwd+bwd GB | v2 fwd instr/elem | v2 bwd instr/elem | v2 fwd ms | v2 bwd ms | SoL fwd ms | v2 fwd ÷ SoL | v1 fwd ms | v1 fwd+bwd ms | v1 ÷ v2 (fwd+bwd) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| %d | %s | %.2f | %.1f | %.2f | %.1f | %.0f | %.0f | %.2f | %.2f | %.3f | %.1f× | %.2f | %.1f | %.1f× |" % r)
    print()


if __name__ == "__main__":
    predict("W2", 256, 49, 2048, False)
    predict("W2", 256, 49, 2048, True)
    predict("W1", 50, 500, 100, False)
    predict("W1", 50, 500, 100, True)
