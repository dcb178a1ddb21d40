"""L2 reuse of the kernels' global traffic: a PREDICTION from an LRU model, computed on a CPU.

``kernel_report.py`` prices every global load as HBM traffic, an upper bound: on an H100 a
load that finds its sector in the 50 MB L2 never reaches HBM. Which loads do depends on the
order in which the programs that share the L2 touch their data, and that order is what a
kernel can choose (e.g. the direction of its passes over a set: issue 12). This script
replays each kernel's global accesses, recorded under the interpreter on the kernel report's
reduced batch (``kernel_report.make_call``, ``same_launch_plan``), through an LRU cache and
prints what would still come from HBM.

The model (every number it gives is a PREDICTION):

* The programs of a launch run concurrently and in lockstep: their accesses interleave op by
  op (program 0's k-th load or store, program 1's k-th, ...). Stores allocate their sectors
  (write-back: every stored byte still goes to HBM once).
* 32-byte sectors, LRU over the whole cache; no partitioning, no hashing conflicts, no
  prefetch. H100's L2 is two partitions of 25 MB: ``--l2-mb 25`` prices a cache that holds a
  line in each partition it is read from.
* At full size ``R`` programs are resident (``min(programs, CTAs per SM x 132)``, from the
  kernel report's registers and warps: ``--report``), and each of them gets ``L2 / R`` of the
  cache: the reduced launch's ``p`` programs share ``p x L2 / R``. The reduced batch's bytes
  are scaled to the full one by the report's element ratio, as the kernel report does.
* Launches see a cold cache (the input is assumed not to be in L2 when a call starts, and
  nothing is carried from one launch to the next: a lower bound on reuse between launches).

    python bench/l2_reuse.py --only 'W2 T=4 S$' [--l2-mb 50] [--out FILE.md]

Columns: global loads (what the kernel report counts), their part served by HBM under the
model, the hit rate (of the sectors loads touch), stores, and the memory-bound µs of each
(bytes / 3.0 TB/s).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SECTOR = 32
DEFAULT_REPORT = os.path.join(ROOT, "bench", "results", "kernel_report.json")


@contextlib.contextmanager
def record_accesses(out: list):
    """Under the interpreter: append per launch ``(kernel name, grid programs, streams)``, with
    ``streams[program]`` the program's global accesses in order, each ``(is_store, sectors,
    bytes)``: the sorted distinct 32-byte sectors of one masked load or store, and its bytes
    (masked-in elements, as ``interp_counter`` counts them)."""
    import numpy as np
    from triton.runtime import interpreter as I

    from bench.interp_counter import interpreter_patched

    B = I.InterpreterBuilder
    saved = {n: B.__dict__[n] for n in ("create_masked_load", "create_masked_store",
                                         "set_grid_dim", "set_grid_idx")}
    saved["__call__"] = I.GridExecutor.__call__
    cur = [None, 0, (1, 1, 1)]    # the launch's streams, the running program, the grid

    def access(is_store, ptrs, mask):
        if cur[0] is None:
            return
        a = np.asarray(ptrs.data).reshape(-1)
        m = np.asarray(mask.data).reshape(-1).astype(bool)
        if m.any():
            size = np.dtype(I._get_np_dtype(ptrs.get_element_ty())).itemsize
            secs = np.unique(a[m].astype(np.uint64) // SECTOR)
            cur[0][cur[1]].append((is_store, secs, int(m.sum()) * size))

    def masked_load(self, ptrs, mask, other, *a, **k):
        access(False, ptrs, mask)
        return saved["create_masked_load"](self, ptrs, mask, other, *a, **k)

    def masked_store(self, ptrs, value, mask, *a, **k):
        access(True, ptrs, mask)
        return saved["create_masked_store"](self, ptrs, value, mask, *a, **k)

    def grid_dim(self, nx, ny, nz):
        cur[2] = (int(nx), int(ny), int(nz))
        return saved["set_grid_dim"](self, nx, ny, nz)

    def grid_idx(self, x, y, z):
        g = cur[2]
        cur[1] = x + g[0] * (y + g[1] * z)
        return saved["set_grid_idx"](self, x, y, z)

    def call(self, *args, **kwargs):
        streams = collections.defaultdict(list)
        cur[0] = streams
        name = getattr(self.fn, "__name__", "?")
        try:
            return saved["__call__"](self, *args, **kwargs)
        finally:
            g = cur[2]
            out.append((name, g[0] * g[1] * g[2], dict(streams)))
            cur[0] = None

    with interpreter_patched(dict(create_masked_load=masked_load,
                                  create_masked_store=masked_store, set_grid_dim=grid_dim,
                                  set_grid_idx=grid_idx), call):
        yield out


def lru_traffic(streams: dict, capacity_sectors: int) -> dict:
    """Replay the programs' streams in lockstep through an LRU cache of ``capacity_sectors``:
    bytes loaded and stored (as the kernel report counts them) and bytes of the load misses
    (HBM: 32 per missed sector)."""
    cache = collections.OrderedDict()
    loaded = missed = stored = touched = 0
    progs = [streams[p] for p in sorted(streams)]
    for k in range(max((len(s) for s in progs), default=0)):
        for s in progs:
            if k >= len(s):
                continue
            is_store, secs, nbytes = s[k]
            if not is_store:
                touched += secs.size
            for sec in secs.tolist():
                if sec in cache:
                    cache.move_to_end(sec)
                else:
                    if not is_store:
                        missed += SECTOR
                    cache[sec] = None
                    if len(cache) > capacity_sectors:
                        cache.popitem(last=False)
            if is_store:
                stored += nbytes
            else:
                loaded += nbytes
    return dict(loaded=loaded, missed=missed, stored=stored, sectors=touched * SECTOR)


def _report_kernels(path: str, case: str) -> dict:
    """{(pass, kernel name): report entry} of ``case`` in a kernel report JSON, or {}."""
    try:
        with open(path) as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError, KeyError):
        return {}
    for r in rows:
        if r["case"] == case:
            return {(k["pass_"], k["name"]): k for k in r["kernels"].values()}
    return {}


def resident_programs(entry: dict | None) -> int | None:
    """Programs of a report entry resident at once on an H100 (None: unknown)."""
    if not entry or not entry.get("regs") or not entry.get("num_warps"):
        return None
    from bench import latency_model, sol
    ctas = latency_model.ctas_per_sm(entry["regs"], entry["num_warps"],
                                     entry.get("shared_bytes") or 0)
    return max(1, min(int(entry["programs"]), ctas * sol.H100_SMS))


def worker(case_id: str, l2_mb: float, report: str) -> list:
    """Rows of one case (run with TRITON_INTERPRET=1)."""
    from bench import kernel_report as kr
    from bench.sol import H100_SMS
    c = [c for c in kr.cases(False) if kr.case_id(c) == case_id][0]
    x_full, _, _ = kr.workload_input(c["workload"], reduced=False)
    x_red, _, _ = kr.workload_input(c["workload"], reduced=True)
    scale = x_full.numel() / x_red.numel()
    entries = _report_kernels(report, case_id)
    rf, rb = kr.run_reduced(c, c["T"], lambda: record_accesses([]))
    launches = [("fwd", *r) for r in rf] + [("bwd", *r) for r in rb]
    agg = collections.OrderedDict()
    l2 = l2_mb * 2 ** 20
    for pass_, name, programs, streams in launches:
        e = entries.get((pass_, name))
        resident = resident_programs(e)
        full_programs = int(e["programs"]) if e else None
        # a grid the batch does not scale (the weight table): counted as it ran
        k_scale = 1.0 if (full_programs is not None and full_programs == programs) else scale
        if resident is None:
            resident = max(1, min(round(programs * scale), H100_SMS))
        share = l2 / resident
        cap = max(1, int(share * max(1, len(streams)) / SECTOR))
        t = lru_traffic(streams, cap)
        a = agg.setdefault((pass_, name), dict(case=case_id, pass_=pass_, kernel=name,
                                               launches=0, loaded=0.0, missed=0.0,
                                               stored=0.0, sectors=0.0, resident=resident,
                                               share_kb=share / 1024))
        a["launches"] += 1
        for k in ("loaded", "missed", "stored", "sectors"):
            a[k] += t[k] * k_scale
    return list(agg.values())


def _markdown(rows, l2_mb) -> str:
    from bench.sol import HBM_BYTES_PER_S as hbm
    L = [f"L2 model: LRU, {l2_mb:g} MB, 32-B sectors, programs in lockstep (PREDICTION; "
         "`bench/l2_reuse.py`)", "",
         "| case | kernel | launches | resident programs | L2 a program (KB) | global loads GB "
         "| HBM loads GB (model) | hit % | stores GB | µs at HBM: report | µs at HBM: model |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hit = 100.0 * (1 - r["missed"] / r["sectors"]) if r["sectors"] else 0.0
        L.append(f"| {r['case']} | {r['pass_']}:{r['kernel']} | {r['launches']} | "
                 f"{r['resident']} | {r['share_kb']:,.0f} | {r['loaded'] / 1e9:.3f} | "
                 f"{r['missed'] / 1e9:.3f} | {hit:.0f} | {r['stored'] / 1e9:.3f} | "
                 f"{(r['loaded'] + r['stored']) / hbm * 1e6:,.0f} | "
                 f"{(r['missed'] + r['stored']) / hbm * 1e6:,.0f} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="W2 T=4 S$",
                   help="regex over the kernel report's case ids (default: 'W2 T=4 S$')")
    p.add_argument("--l2-mb", type=float, default=50.0)
    p.add_argument("--report", default=DEFAULT_REPORT,
                   help="kernel report JSON for each kernel's occupancy")
    p.add_argument("--out", default=None, help="also write a Markdown table here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.l2_mb, a.report)))
        return 0
    from bench import kernel_report as kr
    ids = [kr.case_id(c) for c in kr.cases(False) if re.search(a.only, kr.case_id(c))]
    if not ids:
        sys.exit(f"no case matches --only {a.only!r}")
    rows = []
    env = dict(os.environ, TRITON_INTERPRET="1")
    for cid in ids:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", cid,
                            "--l2-mb", str(a.l2_mb), "--report", a.report],
                           env=env, capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            sys.exit(f"{cid}: worker failed\n{r.stderr[-3000:]}")
        rows += json.loads(r.stdout.strip().splitlines()[-1])
    md = _markdown(rows, a.l2_mb)
    print(md)
    if a.out:
        with open(a.out, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
