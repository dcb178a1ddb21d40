"""Occupancy-aware kernel time, calibrated on the H200 measurements of 2026-11-29: the kernel
report's second model (its first, ``sol``'s peak rates, was 2-7× optimistic for the kernels
with few resident warps; `results/gpu_vs_prediction_2026-11-29.md`).

Model (every time from it is a PREDICTION, labelled "calibrated"): a resident warp keeps a
bounded amount of work in flight, so each warp sustains at most ``BYTES_PER_S_PER_WARP`` of
global traffic and ``LANE_INSTR_PER_S_PER_WARP`` of issue; with few warps per SM neither
latency is hidden and the two phases do not overlap, so

    t = bytes / min(HBM, warps · b) + instructions / min(SMs · 128 · clock, warps · i)
        (at least the SFU bound) + 4 µs per launch,

``warps`` = resident CTAs (registers, shared memory, 64 warps and 32 CTAs per SM, and the grid:
at most ``programs`` CTAs) × warps per CTA, summed over the machine; ``SMs`` = min(132,
programs). The two rates are fitted (least squares of log(model ÷ measured)) to the 14 kernels
whose device time the H200 profile gives and whose bytes and instructions the kernel report
counted for the same launch configuration (:data:`MEASURED`); a single-program kernel
(badmm_dw_kernel, a serial chain) is outside the model and excluded.

The host front end of a call is priced alike, from the same run: a fixed cost per forward or
forward+backward call plus one per Triton launch (``HOST_*``, fitted to the W1 and W5 calls,
which were host-bound there), and a call takes the larger of host and kernels.

    python bench/latency_model.py [--out results/latency_model_fit.md]
    python bench/latency_model.py --compare \
        bench/results/kernel_report_h200_code_68db8d4_recount_2026-12-02.json

prints the fit: the two rates, each kernel's measured ÷ model ratio and the leave-one-out
ratios (each kernel predicted by the rates fitted to the other 13) - the honest error bar -
and, out of sample, every end-to-end call of the same H200 run (:data:`VALIDATION`: T = 16,
the window kernels of W3) against the reports' calibrated prediction. ``--compare`` fits the
model twice to one report of the measured code, instructions priced by the hot loop (shipped)
and counted by runs, and judges both out of sample: the by-runs fit is closer on the 14 kernels
and worse on the 18 calls (results/latency_model_recount_2026-12-02.md, on counts that read
every loop's trips right; results/latency_model_by_runs_2026-12-01.md before).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import sol  # noqa: E402

# Fitted by :func:`fit` (``python bench/latency_model.py`` reproduces them): global bytes per
# second and thread instructions per second that one resident warp sustains.
BYTES_PER_S_PER_WARP = 1.9e9
LANE_INSTR_PER_S_PER_WARP = 6.0e9
# Fitted by :func:`fit_host` to the host-bound calls of the same run (W1, W5): the host front
# end of one call on the H200's machine, a fixed part per forward or forward+backward call and
# a part per Triton launch.
HOST_CALL_S = {"fwd": 520e-6, "fwd+bwd": 1850e-6}
HOST_PER_LAUNCH_S = 48e-6

RESULTS = os.path.join(ROOT, "bench", "results")
# (kernel report JSON holding the launch's bytes / instructions / registers, case, kernel,
# device µs per fwd+bwd call measured by torch.profiler on the H200 (all of the kernel's
# launches in the call): gpu_nvidia-h200_2026-11-29_followup_profile.md, and for W2 the
# table of gpu_vs_prediction_2026-11-29.md). The W2 report is the one of the measured code
# (01bcbb6: same grids, warps and registers as the profiled kernels); the W1 rows come from the
# full report as it stood when the rates were fitted (kernel_report_before_62b9b6c: the
# current kernel_report.json prices later code).
MEASURED = [
    ("kernel_report_w2_t4_after_01bcbb6.json", "W2 T=4 S", "sinkhorn_fwd_kernel", 1024),
    ("kernel_report_w2_t4_after_01bcbb6.json", "W2 T=4 S", "sinkhorn_bwd_kernel", 1199),
    ("kernel_report_w2_t4_after_01bcbb6.json", "W2 T=4 B-E", "badmm_fwd_kernel", 1801),
    ("kernel_report_w2_t4_after_01bcbb6.json", "W2 T=4 B-E", "badmm_bwd_kernel", 4619),
    ("kernel_report_w2_t4_after_01bcbb6.json", "W2 T=4 B-Q", "badmm_fwd_kernel", 1669),
    ("kernel_report_w2_t4_after_01bcbb6.json", "W2 T=4 B-Q", "badmm_bwd_kernel", 4962),
    ("kernel_report_w2_t4_after_01bcbb6.json", "W2 T=4 B-E", "spread_grad_kernel", 120),
    ("kernel_report_before_62b9b6c.json", "W1 T=4 S", "sinkhorn_fwd_kernel", 166),
    ("kernel_report_before_62b9b6c.json", "W1 T=4 S", "sinkhorn_bwd_kernel", 117),
    ("kernel_report_before_62b9b6c.json", "W1 T=4 S", "sinkhorn_dx_kernel", 34),
    ("kernel_report_before_62b9b6c.json", "W1 T=4 B-E", "badmm_split_bwd_pass3_kernel", 194),
    ("kernel_report_before_62b9b6c.json", "W1 T=4 B-E", "badmm_split_bwd_pass2_kernel", 123),
    ("kernel_report_before_62b9b6c.json", "W1 T=4 B-E", "badmm_split_row_lse_kernel", 120),
    ("kernel_report_before_62b9b6c.json", "W1 T=4 B-E", "badmm_split_column_lse_kernel", 74),
]


# End-to-end calls measured in the same H200 run (gpu_check.py, median of do_bench), and the
# kernel reports that price them, first match wins: W2 T = 4 and W3 T = 4 from reports of the
# code closest to the measured one, the rest (T = 16) from the full report of 91c40dd (W2's
# B-ADMM forward then had its streamed T = 16 schedule, as measured).
VALIDATION = ("gpu_nvidia-h200_2026-11-29.json",
              ("kernel_report_w2_t4_after_01bcbb6.json", "kernel_report_w3_t4_after_e605b21.json",
               "kernel_report_before_62b9b6c.json"))


def ctas_per_sm(regs: int, num_warps: int, shared_bytes: int = 0) -> int:
    """CTAs of one kernel an H100/H200 SM holds: registers (allocated per warp in units of
    256), shared memory (228 KiB), 64 warps, 32 CTAs."""
    per_warp = -(-int(regs) * 32 // 256) * 256
    ctas = min(65536 // max(per_warp * num_warps, 1), 64 // num_warps, 32)
    if shared_bytes:
        ctas = min(ctas, 228 * 1024 // int(shared_bytes))
    return max(ctas, 0)


def machine_warps(k: dict) -> int:
    """Resident warps over the whole machine for kernel ``k`` (a kernel report entry): CTAs per
    SM × 132, at most one per program, × warps per CTA."""
    ctas = ctas_per_sm(k["regs"], k["num_warps"], k.get("shared_bytes") or 0)
    return min(int(k["programs"]), ctas * sol.H100_SMS) * int(k["num_warps"])


def calibrated_seconds(k: dict, rates: tuple | None = None) -> float | None:
    """Predicted time of a kernel report entry (its launches summed) under this model; None
    when the report could not compile it (no registers known)."""
    if not k.get("regs") or not k.get("num_warps"):
        return None
    b, i = rates or (BYTES_PER_S_PER_WARP, LANE_INSTR_PER_S_PER_WARP)
    warps = machine_warps(k)
    sms = min(sol.H100_SMS, int(k["programs"]))
    t_mem = k["bytes"] / min(sol.HBM_BYTES_PER_S, warps * b)
    t_issue = (k.get("instructions") or 0) / min(sms * sol.LANES_PER_SM_PER_CLK
                                                 * sol.SUSTAINED_SM_CLOCK_HZ, warps * i)
    t_sfu = k.get("mufu", 0) / sol.sfu_rate() / min(1.0, sms / sol.H100_SMS)
    return max(t_mem + t_issue, t_sfu) + sol.LAUNCH_S * int(k["launches"])


def measured_kernels() -> list:
    """[(report entry, measured seconds, label)] of :data:`MEASURED`."""
    out, cache = [], {}
    for fname, case, name, us in MEASURED:
        if fname not in cache:
            with open(os.path.join(RESULTS, fname)) as f:
                cache[fname] = {(r["case"], k["name"]): k for r in json.load(f)["rows"]
                                for k in r["kernels"].values()}
        out.append((cache[fname][case, name], us * 1e-6, f"{case} {name}"))
    return out


def _log_errors(data, rates) -> list:
    return [math.log(calibrated_seconds(k, rates) / s) for k, s, _ in data]


def fit(data) -> tuple:
    """The (bytes, instructions) per warp-second minimising Σ log² (model ÷ measured): a grid
    in log space refined twice around its best point."""
    def loss(p):
        return sum(e * e for e in _log_errors(data, p))
    lo, hi, best = (math.log(1e7), math.log(1e7)), (math.log(1e11), math.log(1e12)), None
    for _ in range(3):
        grid = [(math.exp(lo[0] + (hi[0] - lo[0]) * a / 40), math.exp(lo[1] + (hi[1] - lo[1])
                                                                       * c / 40))
                for a in range(41) for c in range(41)]
        best = min(grid, key=loss)
        step = ((hi[0] - lo[0]) / 40 * 2, (hi[1] - lo[1]) / 40 * 2)
        lo = (math.log(best[0]) - step[0], math.log(best[1]) - step[1])
        hi = (math.log(best[0]) + step[0], math.log(best[1]) + step[1])
    return best


def host_seconds(pass_: str, launches: int, params: tuple | None = None) -> float:
    """The host front end of one call on the H200's machine: a fixed cost per forward call or
    forward+backward call (Python front end, torch's custom-op and autograd dispatch, the host
    aten ops) plus one per Triton launch (:func:`fit_host`)."""
    f1, f2, per = params or (HOST_CALL_S["fwd"], HOST_CALL_S["fwd+bwd"], HOST_PER_LAUNCH_S)
    return (f1 if pass_ == "fwd" else f2) + per * launches


def call_seconds(pass_: str, launches: int, kernel_s: float,
                 params: tuple | None = None) -> float:
    """A call's time: the host enqueues while the GPU runs (no host sync on these paths), so
    the larger of the two."""
    return max(host_seconds(pass_, launches, params), kernel_s)


def by_runs_instructions(k: dict, row: dict) -> float | None:
    """Kernel ``k``'s thread instructions counted by runs (the report's per element-iteration
    figure, ``sass.dynamic_instructions``, times the case's element-iterations N·D·T), or None
    where its report has none. The model prices the hot loop's estimate instead (``k``'s
    "instructions"): refitted on these counts it fits the 14 kernels closer but misses the
    calls out of sample by more (:func:`compare_pricings`)."""
    per = k.get("dynamic_instructions_per_element_iteration")
    s = row["summary"]["fwd"]
    if per is None or not s.get("mufu"):
        return None
    return per * s["mufu"] / s["mufu_per_element_iteration"]


def _priced(k: dict, row: dict, pricing: str) -> dict:
    """``k`` with its instructions as ``pricing`` counts them ("hot loop": as stored)."""
    return k if pricing == "hot loop" else dict(k, instructions=by_runs_instructions(k, row))


def _rows(fnames) -> dict:
    """Case -> report row of the exact, α0 = 0 cases, the first report that has it winning."""
    priced = {}
    for fname in fnames:
        with open(os.path.join(RESULTS, fname)) as f:
            for r in json.load(f)["rows"]:
                if r.get("variant", "exact") == "exact" and not r.get("a0"):
                    priced.setdefault(r["case"], r)
    return priced


def _priced_calls(rows: dict | None = None, rates: tuple | None = None,
                  pricing: str = "hot loop", validation: tuple = VALIDATION) -> list:
    """[(case, workload, pass, measured s, first model s, calibrated kernel s, launches)] of
    ``validation`` = (gpu_check JSON, report JSONs) (or of ``rows``, priced at ``rates`` with
    ``pricing``'s counts). The α0 > 0 section's calls are not the reports' α0 = 0 cases."""
    gpu, reports = validation
    with open(os.path.join(RESULTS, gpu)) as f:
        measured = [r for r in json.load(f)["rows"] if r.get("impl") == "triton" and "ms" in r
                    and not str(r.get("section", "")).startswith("a0")]
    priced = rows if rows is not None else _rows(reports)
    short = {"sinkhorn": "S", "badmm-e": "B-E", "badmm-q": "B-Q"}
    out = []
    for m in measured:
        case = f"{m['workload']} T={m['T']} {short[m['method']]}"
        row = priced.get(case)
        if row is None:
            continue
        s = row["summary"][m["pass_"]]
        passes = ("fwd",) if m["pass_"] == "fwd" else ("fwd", "bwd")
        cal = sum(calibrated_seconds(_priced(k, row, pricing), rates)
                  for k in row["kernels"].values() if k["pass_"] in passes)
        out.append((case, m["workload"], m["pass_"], m["ms"] * 1e-3, s["predicted_s"], cal,
                    s["launches"]))
    return out


def compare_pricings(report: str) -> dict:
    """The model fitted twice to the 14 kernels of :data:`MEASURED`, their counts taken from
    ``report`` (one report of the measured code:
    ``kernel_report_h200_code_68db8d4_recount_2026-12-02.json``),
    instructions priced as the hot loop's estimate and as counted by runs; each with its host
    front end refitted (:func:`fit_host`) and judged on the calls of :data:`VALIDATION` outside
    the fit. {pricing: dict(rates, host, rms, worst, loo (min, max), oos [(case, pass,
    measured ÷ call)], oos_rms)}, rms and worst as factors."""
    rows = _rows([os.path.abspath(report) if os.path.exists(report) else report])
    fitted = {case for _f, case, _n, _us in MEASURED}
    out = {}
    for pricing in ("hot loop", "by runs"):
        data = []
        for _f, case, name, us in MEASURED:
            k = next(k for k in rows[case]["kernels"].values() if k["name"] == name)
            data.append((_priced(k, rows[case], pricing), us * 1e-6, f"{case} {name}"))
        rates = fit(data)
        errs = _log_errors(data, rates)
        loo = [math.exp(_log_errors([data[j]], fit(data[:j] + data[j + 1:]))[0])
               for j in range(len(data))]
        calls = _priced_calls(rows, rates, pricing)
        host = fit_host([c for c in calls if c[1] in ("W1", "W5")])
        oos = [(case, ps, ms / call_seconds(ps, n, k, host))
               for case, wl, ps, ms, _f, k, n in calls
               if wl not in ("W1", "W5") and case not in fitted]
        out[pricing] = dict(
            rates=rates, host=host, rms=math.exp(math.sqrt(sum(e * e for e in errs) / len(errs))),
            worst=math.exp(max(abs(e) for e in errs)), loo=(min(loo), max(loo)), oos=oos,
            oos_rms=math.exp(math.sqrt(sum(math.log(r) ** 2 for *_x, r in oos) / len(oos))))
    return out


def host_bound_calls() -> list:
    """The W1 and W5 calls, host-bound on the H200 (its profile: 0.32 ms of kernels in W1's
    1.83 ms Sinkhorn call, 0.66 of 3.01 ms in B-E's): what :func:`fit_host` fits."""
    return [c for c in _priced_calls() if c[1] in ("W1", "W5")]


def fit_host(calls) -> tuple:
    """(fixed forward s, fixed forward+backward s, s per launch) minimising Σ log²(model ÷
    measured) of :func:`call_seconds` over ``calls`` (a grid, 20 / 25 / 2 µs steps)."""
    best = None
    for f1 in range(200, 1200, 20):
        for f2 in range(800, 2600, 25):
            for per in range(10, 90, 2):
                p = (f1 * 1e-6, f2 * 1e-6, per * 1e-6)
                err = sum(math.log(call_seconds(ps, n, k, p) / ms) ** 2
                          for _c, _w, ps, ms, _f, k, n in calls)
                if best is None or err < best[0]:
                    best = (err, p)
    return best[1]


def validation_rows() -> list:
    """[(case, pass, measured s, first model s, calibrated s, kernel-bound?)] of
    :data:`VALIDATION`; calibrated = :func:`call_seconds` (kernels by occupancy, the host by
    :func:`host_seconds`). W1 and W5 were host-bound on the H200 (not kernel-bound)."""
    return [(case, ps, ms, first, call_seconds(ps, n, k), wl not in ("W1", "W5"))
            for case, wl, ps, ms, first, k, n in _priced_calls()]


def host_report() -> list:
    calls = host_bound_calls()
    p = fit_host(calls)
    shipped = (HOST_CALL_S["fwd"], HOST_CALL_S["fwd+bwd"], HOST_PER_LAUNCH_S)
    errs = [math.log(call_seconds(ps, n, k, shipped) / ms) for _c, _w, ps, ms, _f, k, n in calls]
    rms = math.sqrt(sum(e * e for e in errs) / len(errs))
    L = [f"Fitted: {p[0] * 1e6:.0f} µs per forward call, {p[1] * 1e6:.0f} µs per "
         f"forward+backward call, {p[2] * 1e6:.0f} µs per Triton launch (shipped "
         f"{shipped[0] * 1e6:.0f} / {shipped[1] * 1e6:.0f} / {shipped[2] * 1e6:.0f}); call = "
         f"max(host, calibrated kernels): rms × {math.exp(rms):.2f} over {len(calls)} calls. "
         "(This project's 2-core CPU spends ~0.2 / ~0.5 ms on the same front end with the "
         "launches stubbed, `bench/host_overhead.py`: the H200's host is slower, and its "
         "launches are real.)", "",
         "| case | pass | launches | measured µs | host model µs | calibrated kernels µs | "
         "measured ÷ call | leave-one-out ÷ |", "|---|---|---|---|---|---|---|---|"]
    for j, (case, _w, ps, ms, _f, k, n) in enumerate(calls):
        q = fit_host(calls[:j] + calls[j + 1:])
        L.append(f"| {case} | {ps} | {n} | {ms * 1e6:,.0f} | "
                 f"{host_seconds(ps, n, shipped) * 1e6:,.0f} | {k * 1e6:,.0f} | "
                 f"{ms / call_seconds(ps, n, k, shipped):.2f} | "
                 f"{ms / call_seconds(ps, n, k, q):.2f} |")
    return L


def report() -> str:
    data = measured_kernels()
    rates = fit(data)
    shipped = _log_errors(data, (BYTES_PER_S_PER_WARP, LANE_INSTR_PER_S_PER_WARP))
    loo = []
    for j in range(len(data)):
        q = fit(data[:j] + data[j + 1:])
        loo.append(math.exp(_log_errors([data[j]], q)[0]))
    rms = math.sqrt(sum(e * e for e in shipped) / len(shipped))
    L = ["# Occupancy-aware kernel model fitted to the H200 (2026-11-29)", "",
         "`bench/latency_model.py` (model in its docstring). Fitted rates per resident warp: "
         f"{rates[0]:.3g} B/s of global traffic, {rates[1]:.3g} thread instructions/s "
         f"({rates[1] / 32 / sol.SUSTAINED_SM_CLOCK_HZ:.3f} warp instructions per clock); "
         f"shipped constants {BYTES_PER_S_PER_WARP:.3g} and {LANE_INSTR_PER_S_PER_WARP:.3g}: "
         f"rms |log(model ÷ measured)| {rms:.2f} (× {math.exp(rms):.2f}), worst × "
         f"{math.exp(max(abs(e) for e in shipped)):.2f}.", "",
         "| kernel (case) | grid | warps, regs | resident warps / SM | measured µs | "
         "first model µs (÷) | calibrated µs | model ÷ measured | leave-one-out ÷ |",
         "|---|---|---|---|---|---|---|---|---|"]
    for (k, s, label), e, lo in zip(data, shipped, loo):
        per_sm = machine_warps(k) / min(sol.H100_SMS, int(k["programs"]))
        L.append(f"| {label} | {k['programs']} | {k['num_warps']}, {k['regs']} | "
                 f"{per_sm:.0f} | {s * 1e6:.0f} | {k['predicted_s'] * 1e6:.0f} "
                 f"({k['predicted_s'] / s:.2f}) | {calibrated_seconds(k) * 1e6:.0f} | "
                 f"{math.exp(e):.2f} | {lo:.2f} |")
    L += ["", "first model: the report's peak-rate prediction of the same launch "
          "(÷: its time ÷ measured). Leave-one-out: the kernel predicted by the rates fitted "
          "to the other 13. Every kernel here had 8-24 resident warps per SM: the model's "
          "linear gain from more warps is an extrapolation beyond that range until a GPU run "
          "measures it (`bench/gpu_tune.py`).", "",
          "## Host front end, fitted to the host-bound calls of the same run (W1, W5)", "",
          *host_report(), "",
          "## Out of sample: end-to-end calls of the same run", "",
          f"Measured: `{VALIDATION[0]}`; priced by " + ", ".join(f"`{f}`" for f in VALIDATION[1])
          + " (first that has the case). Calibrated = the larger of the calibrated kernels and "
          "the fitted host front end. W1 and W5 were host-bound on the H200: their rows are "
          "what the host part is fitted to.",
          "", "| case | pass | measured µs | first model µs (measured ÷) | calibrated µs "
          "(measured ÷) | kernel-bound | in the fit |", "|---|---|---|---|---|---|---|"]
    fitted = {case for _f, case, _n, _us in MEASURED}
    bound = []
    for case, pass_, ms, first, cal, kb in validation_rows():
        L.append(f"| {case} | {pass_} | {ms * 1e6:,.0f} | {first * 1e6:,.0f} ({ms / first:.2f}) "
                 f"| {cal * 1e6:,.0f} ({ms / cal:.2f}) | {'yes' if kb else 'no (host)'} | "
                 f"{'kernels' if case in fitted else 'host' if not kb else 'no'} |")
        if kb and case not in fitted:
            bound.append((ms / first, ms / cal))
    if bound:
        L += ["", f"Kernel-bound calls out of the fit ({len(bound)}): measured ÷ first model "
              f"{min(b[0] for b in bound):.2f}-{max(b[0] for b in bound):.2f}, measured ÷ "
              f"calibrated {min(b[1] for b in bound):.2f}-{max(b[1] for b in bound):.2f}."]
    return "\n".join(L) + "\n"


def compare_report(report: str) -> str:
    """:func:`compare_pricings` as Markdown."""
    got = compare_pricings(report)
    L = [f"Counts: `{os.path.basename(report)}`; measured: `{VALIDATION[0]}`.", "",
         "| instructions priced | B/s a warp | instr/s a warp | host fwd / fwd+bwd / launch µs "
         "| 14 kernels: rms × (worst) | leave-one-out | 18 calls out of sample: rms × | "
         "range |", "|---|---|---|---|---|---|---|---|"]
    for pricing, g in got.items():
        r = [x for *_c, x in g["oos"]]
        L.append(f"| {pricing} | {g['rates'][0]:.3g} | {g['rates'][1]:.3g} | "
                 + " / ".join(f"{h * 1e6:.0f}" for h in g["host"])
                 + f" | {g['rms']:.3f} ({g['worst']:.2f}) | {g['loo'][0]:.2f}-{g['loo'][1]:.2f} "
                 f"| {g['oos_rms']:.3f} | {min(r):.2f}-{max(r):.2f} |")
    names = list(got)
    L += ["", "| case | pass | " + " | ".join(f"measured ÷ call, {n}" for n in names) + " |",
          "|---|---|" + "---|" * len(names)]
    for j, (case, ps, _r) in enumerate(got[names[0]]["oos"]):
        L.append(f"| {case} | {ps} | "
                 + " | ".join(f"{got[n]['oos'][j][2]:.2f}" for n in names) + " |")
    return "\n".join(L) + "\n"


def validate(gpu: str, report: str) -> str:
    """The shipped model (its two rates and host costs, unchanged) judged on a later GPU run of
    later code: each call of ``gpu`` (a gpu_check JSON) against ``report`` (a kernel report
    JSON of the code that ran), measured ÷ predicted call; and the host costs that run's W1 / W5
    calls would refit (:func:`fit_host`), for comparison only."""
    gpu, report = os.path.abspath(gpu), os.path.abspath(report)
    calls = _priced_calls(validation=(gpu, (report,)))
    if not calls:
        raise ValueError(f"no call of {gpu} has a case in {report}")
    host = fit_host([c for c in calls if c[1] in ("W1", "W5")])
    L = [f"# The calibrated model on {os.path.basename(gpu)} (out of sample)", "",
         f"Measured: `{os.path.basename(gpu)}` (gpu_check.py, median of do_bench). Predicted: "
         f"`{os.path.basename(report)}` priced by the shipped model - "
         f"{BYTES_PER_S_PER_WARP:.2g} B/s and {LANE_INSTR_PER_S_PER_WARP:.2g} instr/s a warp, "
         f"host {HOST_CALL_S['fwd'] * 1e6:.0f} / {HOST_CALL_S['fwd+bwd'] * 1e6:.0f} µs a "
         f"fwd / fwd+bwd call + {HOST_PER_LAUNCH_S * 1e6:.0f} µs a launch (fitted to "
         f"{VALIDATION[0]}, none of these calls). A call = max(host, kernels).", "",
         "| case | pass | launches | measured µs | calibrated kernels µs | host µs | call µs "
         "| measured ÷ call | bound in the model |", "|---|---|---|---|---|---|---|---|---|"]
    ratios = {"host": [], "kernels": []}
    for case, _wl, ps, ms, _first, k, n in calls:
        h = host_seconds(ps, n)
        c = call_seconds(ps, n, k)
        bound = "host" if h >= k else "kernels"
        ratios[bound].append(ms / c)
        L.append(f"| {case} | {ps} | {n} | {ms * 1e6:,.0f} | {k * 1e6:,.0f} | {h * 1e6:,.0f} | "
                 f"{c * 1e6:,.0f} | {ms / c:.2f} | {bound} |")

    def rms(xs):
        return math.exp(math.sqrt(sum(math.log(x) ** 2 for x in xs) / len(xs))) if xs else 0.0
    L += ["", "| bound in the model | calls | rms factor | measured ÷ call, min - max |",
          "|---|---|---|---|"]
    for bound, xs in ratios.items():
        if xs:
            L.append(f"| {bound} | {len(xs)} | ×{rms(xs):.2f} | {min(xs):.2f} - {max(xs):.2f} |")
    L += ["", f"Host costs refitted to this run's W1 / W5 calls (not shipped): "
          f"{host[0] * 1e6:.0f} / {host[1] * 1e6:.0f} µs a fwd / fwd+bwd call + "
          f"{host[2] * 1e6:.0f} µs a launch."]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="also write the Markdown here")
    p.add_argument("--compare", metavar="JSON", help="fit the model to this report's counts "
                   "twice, instructions by the hot loop and by runs, and compare them out of "
                   "sample (compare_pricings)")
    p.add_argument("--validate", nargs=2, metavar=("GPU_JSON", "REPORT_JSON"),
                   help="judge the shipped model on a later gpu_check run against a kernel "
                   "report of the code that ran (validate)")
    args = p.parse_args(argv)
    text = (validate(*args.validate) if args.validate else
            compare_report(args.compare) if args.compare else report())
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
