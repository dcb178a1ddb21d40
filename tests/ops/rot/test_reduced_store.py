"""``common.store_reduced``: a reduced vector stored where its threads hold it, without the
shared-memory round trip (an STS, an LDS and two barriers a chunk) that ``tl.store`` makes
when it gives the store a layout of its own. Checked in sm_90 PTX of a probe kernel (a
subprocess: the suite runs under TRITON_INTERPRET, where nothing is compiled)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBES = ("tl.store", "store_reduced", "tl.store masked", "store_reduced masked")


def _probe_kernel():
    import triton
    import triton.language as tl

    from rotp_triton.ops.rot.triton.common import store_reduced

    @triton.jit
    def column_lse_kernel(x_ptr, out_ptr, sxd, D, VARIANT: tl.constexpr, BD: tl.constexpr):
        # a [8, BD, 4] tile per feature chunk (rows in registers and in 4 lanes, features in 8
        # lanes and the warps, as the Sinkhorn row pieces), its column LSE stored per chunk
        r = tl.arange(0, 8)
        q = tl.arange(0, 4)
        for d0 in range(0, D, BD):
            od = d0 + tl.arange(0, BD)
            x = tl.load(x_ptr + (r * 4)[:, None, None] + (od * sxd)[None, :, None]
                        + q[None, None, :])
            col = tl.log2(tl.sum(tl.sum(tl.exp2(x), axis=0), axis=1))          # [BD]
            if VARIANT == 0:
                tl.store(out_ptr + od, col)
            elif VARIANT == 1:
                store_reduced(out_ptr + od, col)
            elif VARIANT == 2:
                tl.store(out_ptr + od, col, mask=od < D)
            else:
                store_reduced(out_ptr + od, col, od < D)

    return column_lse_kernel


def _main():
    sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
                        os.path.abspath(__file__)))))]
    from aot import compile_sm90
    from rotp_triton.ops.rot.triton.common import STORE_IN_LAYOUT
    print("STORE_IN_LAYOUT", int(bool(STORE_IN_LAYOUT)))
    kernel = _probe_kernel()
    sig = {"x_ptr": "*fp32", "out_ptr": "*fp32", "sxd": "i32", "D": "i32",
           "VARIANT": "constexpr", "BD": "constexpr"}
    for variant, name in enumerate(PROBES):
        ptx = compile_sm90(kernel, sig, {"VARIANT": variant, "BD": 64}, num_warps=8).asm["ptx"]
        print("PROBE", variant, ptx.count("st.shared"), ptx.count("bar.sync"),
              ptx.count("st.global"))


@pytest.fixture(scope="module")
def probe_counts():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, text=True,
                         capture_output=True, timeout=600)
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.startswith("PROBE")]
    assert len(rows) == len(PROBES), out.stderr[-3000:]
    counts = {PROBES[int(r[1])]: tuple(map(int, r[2:])) for r in rows}
    on = [ln.split()[1] for ln in out.stdout.splitlines() if ln.startswith("STORE_IN_LAYOUT")]
    return counts, on == ["1"]


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_store_reduced_skips_the_shared_memory_round_trip(probe_counts, masked):
    """With ``STORE_IN_LAYOUT`` (the GPU build from triton 3.9 on) no STS and no barrier; else
    (triton 3.6) the helper is ``tl.store``, round trip included."""
    counts, store_in_layout = probe_counts
    suffix = " masked" if masked else ""
    plain = counts["tl.store" + suffix]
    sts, bar, stg = plain
    assert sts >= 1 and bar >= 1 and stg >= 1      # the round trip the helper avoids
    sts, bar, stg = counts["store_reduced" + suffix]
    if store_in_layout:
        assert (sts, bar) == (0, 0) and stg >= 1
    else:
        assert (sts, bar, stg) == plain


if __name__ == "__main__":
    _main()
