"""The L2 model (bench/l2_reuse.py): LRU as its docstring says, and the W2 kernels' passes
over a set alternating their direction, which is what the model rewards."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from bench.l2_reuse import SECTOR, lru_traffic  # noqa: E402


def _stream(order, is_store=False):
    """One program's accesses, one 32-byte sector each (all of its bytes read or written)."""
    return [(is_store, np.array([s], dtype=np.uint64), SECTOR) for s in order]


def test_lru_misses_by_pass_direction():
    ten = list(range(10))
    # two passes over 10 sectors through 5: the same direction twice misses everything, the
    # second pass reversed starts on the 5 sectors read last
    same = lru_traffic({0: _stream(ten + ten)}, 5)
    snake = lru_traffic({0: _stream(ten + ten[::-1])}, 5)
    assert same == dict(loaded=20 * SECTOR, missed=20 * SECTOR, stored=0, sectors=20 * SECTOR)
    assert snake["missed"] == 15 * SECTOR
    # everything fits: only the first touch misses; a stored sector is then a hit
    assert lru_traffic({0: _stream(ten + ten)}, 10)["missed"] == 10 * SECTOR
    written = lru_traffic({0: _stream(ten, True) + _stream(ten)}, 10)
    assert (written["missed"], written["stored"], written["loaded"]) == (0, 10 * SECTOR,
                                                                        10 * SECTOR)


def test_programs_share_the_cache_in_lockstep():
    # two programs, 4 sectors each, read twice: in lockstep their 8 sectors exceed a cache
    # of 6 (all miss), where one program alone (4 <= 6) would hit its second pass
    a, b = list(range(4)), list(range(100, 104))
    both = lru_traffic({0: _stream(a + a), 1: _stream(b + b)}, 6)
    assert both["missed"] == 16 * SECTOR
    assert lru_traffic({0: _stream(a + a)}, 6)["missed"] == 4 * SECTOR


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="records the kernels' accesses under the interpreter")
@pytest.mark.parametrize("snake", [True, False], ids=["snake", "one-direction"])
@pytest.mark.parametrize("method", ["sinkhorn", "badmm-e"])
def test_forward_passes_alternate_direction(method, snake, monkeypatch):
    """W2's forward kernels (AdaptiveROTPool2d, 49 rows a set, the spread formed in the kernel:
    Sinkhorn's row pieces in lanes, B-E's one pass an iteration) on a set twice the cache:
    each of their passes (spread, 3 iterations, pooling; B-E: spread, 2 iterations, pooling)
    starts on the chunks the pass before read last, so about half of every pass after the
    first hits (measured: 0.74 and 0.68 of the loads miss). In one direction
    (``launch.SNAKE_ORDER = False``, the kernels before 2026-12-03) every pass of x misses
    (0.99 and 0.90: B-E's replays reread small vectors)."""
    import rotp_triton as rt
    from bench.l2_reuse import record_accesses
    from launch_counter import count_launches
    from rotp_triton.ops.rot.triton.badmm import launch as badmm_launch
    from rotp_triton.ops.rot.triton.sinkhorn import launch as sinkhorn_launch
    launch, kernel = {"sinkhorn": (sinkhorn_launch, "sinkhorn_fwd_kernel"),
                      "badmm-e": (badmm_launch, "badmm_fwd_kernel")}[method]
    monkeypatch.setattr(launch, "SNAKE_ORDER", snake)
    if method == "badmm-e":      # one program a set, as at W2's 256 sets (not split)
        monkeypatch.setattr(launch, "forward_splits", lambda *a: (1, 1))
    C = 256      # 4 or more feature chunks
    x = torch.randn(1, C, 7, 7)
    layer = rt.AdaptiveROTPool2d(C, method=method, num_iters=3, backend="triton")
    with count_launches() as launches, record_accesses([]) as fwd, torch.no_grad():
        layer(x)
    ce = launches.constexprs[launches.index(kernel)]
    assert ce["STATS"] and ce["SNAKE"] == snake and C // ce["BD"] >= 4
    assert (ce["P0"] > 0 and ce["RL"] > 0) if method == "sinkhorn" else ce["ONE_PASS"]
    (streams,) = [s for name, _, s in fwd if name == kernel]
    t = lru_traffic(streams, x.numel() * 4 // SECTOR // 2)
    if snake:
        assert t["missed"] < 0.80 * t["loaded"], t
    else:
        assert t["missed"] > 0.85 * t["loaded"], t


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="records the kernels' accesses under the interpreter")
@pytest.mark.parametrize("snake", [True, False], ids=["snake", "one-direction"])
def test_badmm_backward_passes_go_opposite_ways(snake, monkeypatch):
    """The B-E backward of one program a set (W2's: AdaptiveROTPool2d, 49 rows a set, the
    unfused schedule) on a set the size of the cache (W2: 401 KB a set, ~388 KB of L2 a
    program): each reverse step's pass 2 reads x, L̄' and Z̄', its pass 3 those and X̄ (all
    x-sized). With ``launch.SNAKE_ORDER`` pass 2 starts on the column blocks pass 3 read last
    and pass 3 on those pass 2 read last (measured: 0.84 of the loads miss); in one direction
    (the kernel before 2026-12-04) each pass starts on blocks evicted (0.94)."""
    import rotp_triton as rt
    from bench.l2_reuse import record_accesses
    from launch_counter import count_launches
    from rotp_triton.ops.rot.triton.badmm import launch
    monkeypatch.setattr(launch, "SNAKE_ORDER", snake)
    monkeypatch.setattr(launch, "forward_splits", lambda *a: (1, 1))
    # 4 or more feature chunks: 64 features a chunk at 16 warps, 128 at triton 3.6's 8
    C = 256 if launch.BACKWARD_WARPS == 16 else 512
    x = torch.randn(1, C, 7, 7, requires_grad=True)
    layer = rt.AdaptiveROTPool2d(C, method="badmm-e", num_iters=3, backend="triton")
    y = layer(x)
    with count_launches() as launches, record_accesses([]) as bwd:
        y.backward(torch.randn_like(y))
    ce = launches.constexprs[launches.index("badmm_bwd_kernel")]
    assert ce["SNAKE"] == snake and C // ce["BD"] >= 4
    (streams,) = [s for name, _, s in bwd if name == "badmm_bwd_kernel"]
    t = lru_traffic(streams, x.numel() * 4 // SECTOR)
    if snake:
        assert t["missed"] < 0.88 * t["loaded"], t
    else:
        assert t["missed"] > 0.91 * t["loaded"], t
