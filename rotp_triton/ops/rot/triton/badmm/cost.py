"""Bytes, exp2 and replayed element-iterations of the B-ADMM kernels, computed from their pass
structure (launch.py / kernels.py) - the inputs of a speed-of-light prediction (PERF.md,
"Measuring on the CPU", 3-4). Vector work (O(N + D) per set and pass) is left out.

``schedule``: "v1" - the kernels before issue 17 (state streamed through HBM scratch, backward
recomputing the forward from iteration 0 for every reverse step); "stream" / "replay" - the v2
forward schedules (:func:`.launch.forward_replays` picks), both with the v2 backward (state
rebuilt per tile from x and the vector history, passes 2-3 per reverse step; pass 3 also runs
the L̄', Z̄' part of the next step's pass 2, which then reads x only; without a plan the first
step's adjoints are recomputed by the second, DEFER).
"""
from __future__ import annotations

__all__ = ["badmm_cost_model"]


def _v1(T: int, bx: int, return_plan: bool, backward: bool):
    it_bytes, it_exp = 2 * bx + 24, 5

    def forward_to(t):  # init + t full iterations
        return 8 + t * it_bytes, t * it_exp

    fb, fe = forward_to(T - 1)
    fb, fe = fb + bx + 8, fe + 2                                    # last pass A (pooling)
    if return_plan:
        fb, fe = fb + 2 * bx + 8, fe + 2
    if not backward:
        return fb, fe, 0
    bb, be = 8 + 8, 0                                               # zero adjoints, final sums
    for t in range(T):
        rb, re = forward_to(t)
        bb, be = bb + rb + bx + 8, be + re + 2                      # recompute + pass A
        if t < T - 1:
            bb, be = bb + bx + 8, be + 3                            # pass B (read only)
            bb, be = bb + bx + 16, be + 3                           # pass 1: S, P, S'
            bb, be = bb + bx + 24, be + 3                           # pass 2: S, P, S'
        elif return_plan:
            bb, be = bb + bx + 16, be + 2                           # plan adjoint
        bb, be = bb + bx + 32, be + 2                               # pass 3: S, softmax
    return fb + bb, fe + be, 0


def _replay(t: int):
    """exp2 of rebuilding iteration t's state: S_0, then P and S' per replayed iteration."""
    return 1 + 2 * t


def _v2(T: int, bx: int, return_plan: bool, backward: bool, replay: bool):
    if replay:   # passes A (R) and B (C) per iteration read x only; state rebuilt in each
        fb, fe, ri = 0, 0, 0
        for t in range(T - 1):
            fb, fe, ri = fb + 2 * bx, fe + 2 * _replay(t) + 5, ri + 2 * t
        fb, fe, ri = fb + bx, fe + _replay(T - 1) + 2, ri + (T - 1)        # last pass A + pool
        if return_plan:
            fb, fe, ri = fb + 2 * bx, fe + _replay(T - 1) + 1, ri + (T - 1)
    else:
        fb, fe, _ = _v1(T, bx, return_plan, False)
        ri = 0
    if not backward:
        return fb, fe, ri
    bb, be = 8 + 8, 0                                 # zero L̄, Z̄; final prior sums
    for t in range(T):
        if t == T - 1 and return_plan:
            bb, be, ri = bb + bx + 8, be + _replay(t) + 1, ri + t          # plan adjoint
        if t < T - 1:   # pass 2: the S-step adjoint's part of C̄ (reads x only)
            bb, be, ri = bb + bx, be + _replay(t) + 4, ri + t
        bb, be, ri = bb + bx + 24, be + _replay(t) + 2, ri + t             # pass 3 (+ σ)
        if t > 0:       # pass 3 also runs pass 2 of t - 1 on the L̄, Z̄ it forms (P, e2)
            be += 2
    if T >= 2 and not return_plan:
        # DEFER: the first reverse step stores no L̄, Z̄, X̄ (12 bytes), the second reads none
        # (12) but replays iteration T - 1 again and forms its pooling adjoint (P, S', e)
        bb, be, ri = bb - 24, be + 3, ri + 1
    if bx != 4:
        bb += 4 + bx                                  # fp32 x-gradient cast to x's dtype
    return fb + bb, fe + be, ri


def badmm_cost_model(num_elements: int, T: int, *, x_bytes: int = 4, return_plan: bool = False,
                     backward: bool = False, schedule: str = "v1") -> dict:
    """Totals for ``num_elements`` = Σ_b N_b · D elements, x of ``x_bytes`` per element, fp32
    state: {"bytes", "exp2", "replay_iters"} (the last: element-iterations of the elementwise
    state replay, ~31 SASS instructions each at sm_90 - bench/results/badmm_v2_*.md)."""
    if schedule == "v1":
        b, e, r = _v1(T, x_bytes, return_plan, backward)
    elif schedule in ("stream", "replay"):
        b, e, r = _v2(T, x_bytes, return_plan, backward, schedule == "replay")
    else:
        raise ValueError(f"schedule must be 'v1', 'stream' or 'replay', got {schedule!r}")
    return dict(bytes=b * num_elements, exp2=e * num_elements, replay_iters=r * num_elements)
