"""Speed of light (SoL) and the H100 rates every bench script uses (PERF.md, "Workloads and
targets" and "Measuring on the CPU").

SoL = max(problem bytes / HBM bandwidth, the algorithm's minimal transcendental count / SFU rate):
the bytes the *problem* must move (x read once, y and the plan if asked written once; the
backward also reads dy and writes dx once) and the exp2/log2 the *method* needs, never what an
implementation happens to do.
"""
from __future__ import annotations

# H100 SXM (PERF.md): achieved HBM bandwidth, SMs, sustained SM clock under load (not the
# 1.98 GHz maximum), SFU exp2 throughput per SM per clock, fp32 lanes per SM per clock.
HBM_BYTES_PER_S = 3.0e12
H100_SMS = 132
SUSTAINED_SM_CLOCK_HZ = 1.75e9
SFU_PER_SM_PER_CLK = 16
LANES_PER_SM_PER_CLK = 128


def sfu_rate(sms: int = H100_SMS, clock_hz: float = SUSTAINED_SM_CLOCK_HZ) -> float:
    """exp2 per second: 16 / SM / clock (≈ 3.7e12 on an H100 at 1.75 GHz)."""
    return SFU_PER_SM_PER_CLK * sms * clock_hz


def issue_rate(sms: int = H100_SMS, clock_hz: float = SUSTAINED_SM_CLOCK_HZ) -> float:
    """Thread instructions per second: 128 lanes / SM / clock."""
    return LANES_PER_SM_PER_CLK * sms * clock_hz


# Host costs of the prediction model (PERF.md): a kernel launch, an eager aten op, a host sync.
LAUNCH_S = 4e-6
ATEN_OP_S = 5e-6
SYNC_S = 10e-6


def min_transcendentals(elements: int, T: int, backward: bool = False, structure: bool = False,
                        inner_iters: int = 5) -> int:
    """The algorithm's minimal exp2 count for ``elements`` = Σ N·D (or windows × window size ×
    channels) and T iterations.

    Every method (Sinkhorn, B-E, B-Q) updates the plan by two normalisations per iteration (over
    features, over samples), each an LSE needing one exp2 per element (the normalised plan is
    that exp2 rescaled, no second transcendental), and the pooling softmax needs one more:
    2T + 1 per element. The backward recomputes each of them once (the adjoint products reuse the
    value): another 2T + 1. α0 > 0 runs ``inner_iters`` Sinkhorn iterations per proximal step
    plus one exp2 of the plan per step for the structure term: (2K + 1)T + 1, forward and again
    backward."""
    per = (2 * inner_iters + 1) * T + 1 if structure else 2 * T + 1
    return elements * per * (2 if backward else 1)


def problem_bytes(x_elements: int, x_bytes: int, y_elements: int, y_bytes: int,
                  backward: bool = False, plan: bool = False) -> int:
    """x read once, y written once (+ the plan, x-sized, if asked); the backward adds dy read
    and dx written (and the plan's gradient read if asked)."""
    b = x_elements * x_bytes + y_elements * y_bytes + (x_elements * x_bytes if plan else 0)
    if backward:
        b += y_elements * y_bytes + x_elements * x_bytes + (x_elements * x_bytes if plan else 0)
    return b


def sol_seconds(nbytes: float, transcendentals: float, bandwidth: float = HBM_BYTES_PER_S,
                sfu: float | None = None) -> tuple[float, str]:
    """(SoL seconds, "memory" | "SFU")."""
    sfu = sfu_rate() if sfu is None else sfu
    tm, ts = nbytes / bandwidth, transcendentals / sfu
    return (tm, "memory") if tm >= ts else (ts, "SFU")
