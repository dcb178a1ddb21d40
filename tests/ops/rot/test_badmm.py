"""Fused Bregman ADMM kernels (B-E, B-Q; α0 = 0) against the float64 reference, forward and
gradients.

Runs under TRITON_INTERPRET=1 on CPU by default and on CUDA with ROTP_TEST_DEVICE=cuda (see
conftest.py / kernel_utils.py). Every comparison is a relative error in the 2-norm,
‖kernel - reference‖ / max(‖reference‖, floor), against ``reference.rot`` evaluated in float64
on the same (rounded) inputs: tolerance RTOL[dtype] (fp32 1e-4). The floor (1e-2, for
gradients only; the cotangents are O(1)) covers gradients that are zero in exact arithmetic -
in the paper variant α2 and α3 have no effect (DESIGN §3.3, defect 2), and with T = 1 the
paper variant's output does not depend on p0 - so the kernel's value is fp32 rounding noise of
sums of N·D O(1) terms (up to ~1e-6 absolute) while float64 gives ~1e-17: a pure relative
error would compare noise with noise. A non-zero gradient must still match to 1e-6 absolute.
"""
import math
import types

import pytest
import torch

import reference.rot as ref
import rotp_triton as rt
from kernel_utils import DEVICE, KERNEL_DTYPES, ON_CUDA, RTOL, rel_err, run_without_interpreter
from rotp_triton.ops.rot.triton import badmm as badmm_pkg
from rotp_triton.ops.rot.triton.badmm import launch, op
from rotp_triton.ops.rot.triton.common import aligned_row
from rotp_triton.ops.rot.triton.spread.launch import statistics_numel

GRAD_FLOOR = 1e-2
WEIGHTS = ("a1", "a2", "a3", "rho")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _weights(T, gen, inf_a2=False):
    w = dict(a1=0.5 + torch.rand(T, generator=gen), a2=0.3 + 2 * torch.rand(T, generator=gen),
             a3=0.3 + 2 * torch.rand(T, generator=gen), rho=0.6 + torch.rand(T, generator=gen))
    if inf_a2:
        w["a2"][-1] = math.inf
    return w


def rot_pool_badmm_triton(x, ptr, *, method, variant, a1, a2, a3, rho, log_p0, log_q0,
                          return_plan):
    """The entry point with (T,) weights: builds the (6, T) table as the router does."""
    z = torch.zeros_like(a1)
    w = torch.stack([z, a1, a2, a3, rho, z])
    return badmm_pkg.badmm_pool(x, ptr, w, log_p0, log_q0, quadratic=method == "badmm-q",
                                variant=variant, return_plan=return_plan)


def _segments(ptr):
    return [(int(ptr[i]), int(ptr[i + 1])) for i in range(len(ptr) - 1)]


def _log_softmax_rows(lq, ptr):
    """Per-set log-softmax of a dense (B, N) or ragged (rows,) tensor of logits."""
    if ptr is None:
        return torch.log_softmax(lq, dim=-1)
    parts = [torch.log_softmax(lq[s:e], 0) for s, e in _segments(ptr)]
    return torch.cat(parts) if parts else lq


def _loss(y, plan, cy, cp):
    loss = (y.double() * cy.double().to(y.device)).sum()
    if cp is not None:
        loss = loss + (plan.double() * cp.double().to(plan.device)).sum()
    return loss


def _run_kernel(x, ptr, method, variant, w, lp, lq, cy, cp, dtype=torch.float32, x_view=None):
    """Kernel on DEVICE. ``x_view(xd)`` (optional) turns the leaf into the strided view that the
    kernel reads. Returns outputs and the gradients of x, the prior logits and the weights."""
    xd = x.to(DEVICE, dtype).detach().requires_grad_()
    xk = x_view(xd) if x_view is not None else xd
    ws = {k: v.to(DEVICE).detach().requires_grad_() for k, v in w.items()}
    lpd = lp.to(DEVICE).detach().requires_grad_() if lp is not None else None
    lqd = lq.to(DEVICE).detach().requires_grad_() if lq is not None else None
    ptrd = ptr.to(DEVICE) if ptr is not None else None
    y, plan = rot_pool_badmm_triton(
        xk, ptrd, method=method, variant=variant, **ws,
        log_p0=torch.log_softmax(lpd, -1) if lpd is not None else None,
        log_q0=_log_softmax_rows(lqd, ptrd) if lqd is not None else None,
        return_plan=cp is not None)
    _loss(y, plan, cy, cp).backward()
    out = dict(y=y.detach(), x=xd.grad, **{k: v.grad for k, v in ws.items()})
    if cp is not None:
        out["plan"] = plan.detach()
    if lp is not None:
        out["lp"] = lpd.grad
    if lq is not None:
        out["lq"] = lqd.grad
    return out


def _run_reference(x, ptr, method, variant, w, lp, lq, cy, cp, x_view=None):
    """reference.rot.rot_pool_sets in float64 on CPU, same inputs, same loss."""
    x64 = x.detach().cpu().double().requires_grad_()
    xr = x_view(x64) if x_view is not None else x64
    ws = {k: v.detach().cpu().double().requires_grad_() for k, v in w.items()}
    lp64 = lp.detach().cpu().double().requires_grad_() if lp is not None else None
    lq64 = lq.detach().cpu().double().requires_grad_() if lq is not None else None
    if ptr is None:
        xs = list(xr.unbind(0))
        q0s = list(torch.softmax(lq64, -1).unbind(0)) if lq is not None else None
    else:
        segs = _segments(ptr)
        xs = [xr[s:e] for s, e in segs]
        q0s = [torch.softmax(lq64[s:e], 0) for s, e in segs] if lq is not None else None
    p0s = torch.softmax(lp64, -1) if lp is not None else None
    T = w["a1"].numel()
    y, plans = ref.rot_pool_sets(xs, p0s, q0s, method=method, variant=variant, num_iters=T, **ws)
    plan = None
    if cp is not None:
        plan = torch.stack(plans) if ptr is None else torch.cat(plans)
    _loss(y, plan, cy, cp).backward()
    out = dict(y=y.detach(), x=x64.grad, **{k: v.grad for k, v in ws.items()})
    if cp is not None:
        out["plan"] = plan.detach()
    if lp is not None:
        out["lp"] = lp64.grad
    if lq is not None:
        out["lq"] = lq64.grad
    return out


def _err(a, b, floor):
    if b is None:  # not connected to the reference's loss: a zero gradient
        b = torch.zeros(a.shape)
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    return float((a - b).norm() / max(float(b.norm()), floor))


def _compare(k, r, tol):
    assert set(k) == set(r)
    errs = {key: _err(k[key], r[key], 1e-30 if key in ("y", "plan") else GRAD_FLOOR)
            for key in r}
    bad = {key: e for key, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"


def _check_ragged_with_empty_sets(method, variant, lengths, *, D, T, seed, inf_a2=False,
                                  plan=True):
    """A ragged batch with empty sets (priors, every weight, the plan unless ``plan`` is
    False): empty sets pool to 0, everything is finite, and the kernel matches the reference
    (fp32)."""
    gen = torch.Generator().manual_seed(seed)
    ptr = torch.tensor([0] + lengths).cumsum(0)
    rows = int(ptr[-1])
    x = torch.randn(rows, D, generator=gen)
    w = _weights(T, gen, inf_a2=inf_a2)
    lp = torch.randn(len(lengths), D, generator=gen)
    lq = torch.randn(rows, generator=gen)
    cy = torch.randn(len(lengths), D, generator=gen)
    cp = torch.randn(rows, D, generator=gen) if plan else None
    args = (x, ptr, method, variant, w, lp, lq, cy, cp)
    k = _run_kernel(*args)
    empty = torch.tensor(lengths) == 0
    assert bool((k["y"].cpu()[empty] == 0).all())
    assert all(bool(torch.isfinite(v).all()) for v in k.values())
    _compare(k, _run_reference(*args), RTOL[torch.float32])



def _case(B, N, D, T, gen, priors=True, inf_a2=False, plan=True):
    x = torch.randn(B, N, D, generator=gen)
    w = _weights(T, gen, inf_a2)
    lp = torch.randn(B, D, generator=gen) if priors else None
    lq = torch.randn(B, N, generator=gen) if priors else None
    cy = torch.randn(B, D, generator=gen)
    cp = torch.randn(B, N, D, generator=gen) if plan else None
    return x, w, lp, lq, cy, cp


def _small_blocks(monkeypatch):
    """Force 16-wide tiles and vector chunks so that small shapes run several tiles (online
    LSE across tiles, partial tiles). Interpreter only: on a GPU BV must cover the CTA."""
    bv = 16 if not ON_CUDA else 128
    monkeypatch.setattr(launch, "block_sizes", lambda n, d: (16, 16, bv, 4))


def _returns_of(monkeypatch, name):
    """A list that records every value launch.<name> returns (the launcher's choices)."""
    got = []
    real = getattr(launch, name)
    monkeypatch.setattr(launch, name, lambda *a, **k: got.append(real(*a, **k)) or got[-1])
    return got


def _recorded_backwards(monkeypatch):
    """A list that records (x, results) of every badmm_backward the kernel path runs."""
    grads = []
    real = op.badmm_backward
    monkeypatch.setattr(op, "badmm_backward",
                        lambda x, *a, **k: grads.append((x, real(x, *a, **k))) or grads[-1][1])
    return grads


def _nchw_image(seed: int):
    """((B, C, H, W), an NCHW image, T = 3 weights, the (B, H·W, C) strided view its pooling
    reads - sets of H·W samples along x's fastest axis - and the generator)."""
    gen = torch.Generator().manual_seed(seed)
    B, C, H, W, T = 2, 19, 5, 7, 3
    img = torch.randn(B, C, H, W, generator=gen)
    w = _weights(T, gen, inf_a2=True)
    return (B, C, H, W), img, w, (lambda t: t.flatten(2).transpose(1, 2)), gen


# --------------------------------------------------------------------------------------------
# forward and gradients against the reference
# --------------------------------------------------------------------------------------------
def _schedule(monkeypatch, schedule):
    """Force the forward's state schedule: rebuilt from x and the vectors ("replay") or
    streamed through the N × D scratch ("stream"); the launcher picks by T otherwise."""
    monkeypatch.setattr(launch, "forward_replays",
                        lambda T, xb, one_pass=False: schedule == "replay")


SCHEDULES = ["replay", "stream"]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("variant", ["exact", "paper"])
@pytest.mark.parametrize("method", ["badmm-e", "badmm-q"])
def test_matches_reference(method, variant, schedule, monkeypatch):
    """Dense batch, per-iteration weights (one α2 = ∞), given p0 and q0, y and plan
    cotangents: y, P and the gradients of x, the prior logits, α1, α2, α3, ρ (all (T,))."""
    _schedule(monkeypatch, schedule)
    gen = torch.Generator().manual_seed(1)
    x, w, lp, lq, cy, cp = _case(3, 7, 5, 4, gen, inf_a2=True)
    args = (x, None, method, variant, w, lp, lq, cy, cp)
    _compare(_run_kernel(*args), _run_reference(*args), RTOL[torch.float32])


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("method,variant", [("badmm-e", "exact"), ("badmm-q", "paper")])
def test_several_tiles(method, variant, schedule, monkeypatch):
    """Sets larger than one [16, 16] tile and one 16-chunk of the vector loops, N and D not
    multiples of 16: the online LSEs and partial tiles."""
    _small_blocks(monkeypatch)
    _schedule(monkeypatch, schedule)
    gen = torch.Generator().manual_seed(2)
    x, w, lp, lq, cy, cp = _case(2, 37, 19, 2, gen)
    args = (x, None, method, variant, w, lp, lq, cy, cp)
    _compare(_run_kernel(*args), _run_reference(*args), RTOL[torch.float32])


@pytest.mark.parametrize("scale", [1.0, 300.0], ids=["one-pass", "pass-B-again"])
@pytest.mark.parametrize("method,variant", [("badmm-e", "exact"), ("badmm-e", "paper"),
                                            ("badmm-q", "paper"), ("badmm-q", "exact")])
def test_one_pass_iterations(method, variant, scale, monkeypatch):
    """A dense set whose rows fit one tile runs each forward iteration as one sweep
    (launch.forward_one_pass, kernels._one_pass_iteration) for B-E and the paper variant, not
    for the exact B-Q: x (2, 13, 40) in 16 × 16 tiles, so three column blocks (the online Λ
    and C), priors, a plan and every gradient against the reference. x · 300 takes |R| past
    FUSED_MAGNITUDE, where the exact variant forms C again by pass B: there the weight and
    prior gradients of the fp32 kernels are off the float64 reference by up to 3.6 (relative;
    ρ, B-E exact) whichever the schedule, so the comparison is with the two-pass kernel."""
    _small_blocks(monkeypatch)
    _schedule(monkeypatch, "replay")
    monkeypatch.setattr(launch, "forward_splits", lambda *a: (1, 1))
    chosen = _returns_of(monkeypatch, "forward_one_pass")
    gen = torch.Generator().manual_seed(31)
    x, w, lp, lq, cy, cp = _case(2, 13, 40, 4, gen)
    args = (x * scale, None, method, variant, w, lp, lq, cy, cp)
    if scale == 1.0:
        _compare(_run_kernel(*args), _run_reference(*args), RTOL[torch.float32])
    else:
        k = _run_kernel(*args)
        monkeypatch.setattr(launch, "forward_one_pass", lambda *a: None)
        _compare(k, _run_kernel(*args), RTOL[torch.float32])
    one_pass = method == "badmm-e" or variant == "paper"
    assert chosen == [(16, 16, 16 if not ON_CUDA else 128, 4) if one_pass else None]


@pytest.mark.parametrize("method,variant", [("badmm-e", "exact"), ("badmm-q", "paper")])
def test_one_pass_persistent_loop(method, variant, monkeypatch):
    """The one-pass forward steps through its sets by the grid size (kernels.badmm_fwd_kernel,
    ONE_PASS): 7 sets on the interpreter's 4 programs, so three programs take two sets; with
    priors and a plan, against the reference."""
    _small_blocks(monkeypatch)
    _schedule(monkeypatch, "replay")
    monkeypatch.setattr(launch, "forward_splits", lambda *a: (1, 1))
    chosen = _returns_of(monkeypatch, "forward_one_pass")
    grids = []
    real = launch._num_programs
    monkeypatch.setattr(launch, "_num_programs",
                        lambda *a: grids.append(real(*a)) or grids[-1])
    gen = torch.Generator().manual_seed(32)
    x, w, lp, lq, cy, cp = _case(7, 5, 12, 2, gen)
    args = (x, None, method, variant, w, lp, lq, cy, cp)
    _compare(_run_kernel(*args), _run_reference(*args), RTOL[torch.float32])
    assert chosen and chosen[0] is not None and grids[0] == 4, (chosen, grids)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("method,variant", [("badmm-e", "exact"), ("badmm-q", "paper"),
                                            ("badmm-q", "exact"), ("badmm-e", "paper")])
def test_backward_schedules(method, variant, fuse, monkeypatch):
    """Both backward schedules of the one-program-per-set kernel (launch.backward_fuses picks
    by T): pass 3 also summing the next step's pass 2 from the adjoints it forms, whose pass 2
    then reads x only ("fused"), or pass 2 reading L̄', Z̄' ("unfused"); several [16, 16] tiles
    in both directions (τ over row blocks, σ over column blocks), with and without priors.
    Without a plan cotangent the fused schedule also defers the first reverse step's adjoints
    to the second (launch.backward_defers): T = 3 (dense) and T = 2 (ragged: the second step
    is the last)."""
    _small_blocks(monkeypatch)
    monkeypatch.setattr(launch, "backward_fuses", lambda T, xb: fuse)
    defers = _returns_of(monkeypatch, "backward_defers")
    # one program per set (B < the interpreter's 4 'SMs' would pick the split backward)
    monkeypatch.setattr(launch, "backward_splits", lambda *a: (1, 1))
    calls = []
    real = launch._backward_split
    monkeypatch.setattr(launch, "_backward_split", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(21)
    x, w, lp, lq, cy, cp = _case(2, 37, 19, 3, gen, inf_a2=True)
    for priors, plan in (((lp, lq), cp), ((None, None), None)):
        args = (x, None, method, variant, w, *priors, cy, plan)
        _compare(_run_kernel(*args), _run_reference(*args), RTOL[torch.float32])
    # ragged, empty sets included, sets spanning several row blocks
    _check_ragged_with_empty_sets(method, variant, [0, 3, 0, 35, 1, 0], D=19,
                                  T=2 if fuse else 3, seed=22, plan=not fuse)
    assert not calls
    assert defers == ([False, True, True] if fuse else [False] * 3)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("method,variant", [("badmm-e", "exact"), ("badmm-q", "paper"),
                                            ("badmm-q", "exact"), ("badmm-e", "paper")])
def test_column_major_adjoints(method, variant, fuse, monkeypatch):
    """x an NCHW image's view (sets of H·W samples along x's fastest axis): the
    one-program-per-set backward keeps L̄, Z̄ and gx column-major, x's own order
    (launch.adjoints_column_major, kernels._adjoint_tile NMAJOR), in both schedules, over
    several [16, 16] tiles each way, with priors and a plan cotangent (the plan pass writes
    L̄ in that order, the priors' pass reads it) and without; gx comes back with x's strides,
    and everything matches the reference."""
    _small_blocks(monkeypatch)
    monkeypatch.setattr(launch, "backward_fuses", lambda T, xb: fuse)
    monkeypatch.setattr(launch, "backward_splits", lambda *a: (1, 1))
    chosen = _returns_of(monkeypatch, "adjoints_column_major")
    grads = _recorded_backwards(monkeypatch)
    (B, C, H, W), img, w, view, gen = _nchw_image(23)
    lp, lq = torch.randn(B, C, generator=gen), torch.randn(B, H * W, generator=gen)
    cy, cp = torch.randn(B, C, generator=gen), torch.randn(B, H * W, C, generator=gen)
    for priors, plan in (((lp, lq), cp), ((None, None), None)):
        args = (img, None, method, variant, w, *priors, cy, plan)
        _compare(_run_kernel(*args, x_view=view), _run_reference(*args, x_view=view),
                 RTOL[torch.float32])
    assert chosen == [True, True]
    assert [g[1][0].stride() for g in grads] == [g[0].stride() for g in grads] == \
        [(C * H * W, 1, H * W)] * 2


@pytest.mark.parametrize("path", ["fused", "unfused", "split"])
@pytest.mark.parametrize("method,variant", [(m, v) for m in ("badmm-e", "badmm-q")
                                            for v in ("exact", "paper")],
                         ids=[f"{m}-{v}" for m in ("badmm-e", "badmm-q")
                              for v in ("exact", "paper")])
def test_small_rho_weight_gradients(method, variant, path, monkeypatch):
    """Small ρ and α1 (0.05): the last P-step's Y = log S + (X - Z)/ω is near one-hot over
    each column's rows, and ∂/∂(1/ω) = Σ (X - Z) ⊙ Ȳ holds the pooling's Σ X ⊙ Ȳ_pool, whose
    columns sum to 0. It cancelled terms ~100× its value until pass 3 took Σ y ⊙ Ȳ_pool
    (rounding only) back out: ∂/∂ρ was up to 6e-4 off here (1.6e-3 on another draw) and
    ∂/∂α1 2e-4, and 7 of the 12 cases failed. Every backward schedule: fused (which defers
    the first step's adjoints: no plan cotangent), unfused, split over programs."""
    _small_blocks(monkeypatch)
    if path == "split":
        _split(monkeypatch, 2, 2)
    else:
        monkeypatch.setattr(launch, "backward_fuses", lambda T, xb: path == "fused")
        monkeypatch.setattr(launch, "backward_splits", lambda *a: (1, 1))
    gen = torch.Generator().manual_seed(8)
    T = 4
    x = torch.randn(4, 9, 20, generator=gen)
    w = dict(a1=torch.full((T,), 0.05), a2=torch.ones(T), a3=torch.ones(T),
             rho=torch.full((T,), 0.05))
    args = (x, None, method, variant, w, None, None, torch.randn(4, 20, generator=gen), None)
    _compare(_run_kernel(*args), _run_reference(*args), RTOL[torch.float32])


@pytest.mark.parametrize("method,variant", [("badmm-e", "exact"), ("badmm-q", "exact"),
                                            ("badmm-q", "paper")])
def test_unfused_backward_on_half_tiles(method, variant, monkeypatch):
    """The shipped unfused one-program backward of a dense batch whose tile would be an 8-warp
    [16, 128] (W2's shape class: N >= 16, D >= 128) runs launch.unfused_backward_block_sizes'
    half tile, [16, 64] with 512-wide vector chunks at 16 warps (triton >= 3.9; 8 warps and
    the full tile before): 2 row blocks × 3 column blocks a pass here, with and without priors
    and a plan cotangent, against the reference."""
    monkeypatch.setattr(launch, "backward_splits", lambda *a: (1, 1))
    picked = _returns_of(monkeypatch, "unfused_backward_block_sizes")
    gen = torch.Generator().manual_seed(23)
    x, w, lp, lq, cy, cp = _case(2, 20, 160, 2, gen, inf_a2=True)
    for priors, plan in (((lp, lq), cp), ((None, None), None)):
        args = (x, None, method, variant, w, *priors, cy, plan)
        _compare(_run_kernel(*args), _run_reference(*args), RTOL[torch.float32])
    if launch.BACKWARD_WARPS == 16:
        assert picked == [(16, 64, 512, 16)] * 2
    else:          # triton 3.6: the half tile only with the plan's gradient
        assert picked == [(16, 64, 256, 8), (16, 128, 256, 8)]


@pytest.mark.parametrize("case", ["fused-plan", "fused-defer", "ragged", "ragged-q", "split"])
def test_no_kernel_reads_memory_it_did_not_write(case, monkeypatch):
    """Every torch.empty the launchers take (outputs such as x̄, the scratch, the history) is
    NaN-filled for the kernel's forward and backward: a kernel that read an element nobody wrote
    (or an output left unwritten) would give NaN or a wrong gradient. (Ragged and split: the
    backward rebuilds Z̄' from its R̄ [and C̄] histories.)"""
    _small_blocks(monkeypatch)
    if case == "split":
        _split(monkeypatch, 3, 2)
    else:
        monkeypatch.setattr(launch, "backward_splits", lambda *a: (1, 1))
        monkeypatch.setattr(launch, "forward_splits", lambda *a: (1, 1))
    real_empty = torch.empty

    def nan_empty(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(math.nan) if t.is_floating_point() else t
    gen = torch.Generator().manual_seed(31)
    if case.startswith("ragged"):
        lengths = [0, 3, 0, 35, 1]
        ptr = torch.tensor([0] + lengths).cumsum(0)
        x = torch.randn(int(ptr[-1]), 19, generator=gen)
        w = _weights(3, gen)
        lq = torch.randn(x.shape[0], generator=gen)
        args = (x, ptr, "badmm-q" if case == "ragged-q" else "badmm-e", "exact", w,
                torch.randn(5, 19, generator=gen), lq, torch.randn(5, 19, generator=gen), None)
    else:
        x, w, lp, lq, cy, cp = _case(2, 37, 19, 3, gen, plan=case != "fused-defer")
        args = (x, None, "badmm-q" if case == "split" else "badmm-e", "exact", w, lp, lq, cy,
                cp)
    monkeypatch.setattr(torch, "empty", nan_empty)
    k = _run_kernel(*args)
    monkeypatch.setattr(torch, "empty", real_empty)
    _compare(k, _run_reference(*args), RTOL[torch.float32])


def _split(monkeypatch, NS, DS, schedule="replay"):
    """Force the split forward and backward (:mod:`badmm.split_kernels`,
    :mod:`badmm.split_backward_kernels`) with NS row and DS column slices per set (the forward
    replays the state or streams it: ``schedule``). Returns the list of split launchers
    called."""
    _schedule(monkeypatch, schedule)
    monkeypatch.setattr(launch, "forward_splits", lambda B, N, D, BN, BD, dev: (NS, DS))
    monkeypatch.setattr(launch, "backward_splits", lambda B, N, D, BN, BD, dev: (NS, DS))
    calls = []
    for name in ("_forward_split", "_backward_split"):
        real = getattr(launch, name)
        monkeypatch.setattr(launch, name, lambda *a, _r=real, _n=name, **k:
                            calls.append(_n) or _r(*a, **k))
    return calls


@pytest.mark.parametrize("NS,DS", [(3, 2), (1, 2), (2, 1)], ids=["3x2", "1x2", "2x1"])
@pytest.mark.parametrize("method,variant", [("badmm-e", "exact"), ("badmm-q", "paper"),
                                            ("badmm-q", "exact"), ("badmm-e", "paper")])
def test_split_forward_backward(method, variant, NS, DS, monkeypatch):
    """Sets spread over NS x DS programs in the forward and the backward (partials combined by
    separate launches; N and D not multiples of the 16-wide slices, 3 row slices of 37 rows =
    16 + 16 + 5): y, plan and the gradients as the reference."""
    _small_blocks(monkeypatch)
    calls = _split(monkeypatch, NS, DS)
    gen = torch.Generator().manual_seed(12)
    x, w, lp, lq, cy, cp = _case(2, 37, 19, 3, gen, inf_a2=True)
    args = (x, None, method, variant, w, lp, lq, cy, cp)
    _compare(_run_kernel(*args), _run_reference(*args), RTOL[torch.float32])
    assert set(calls) >= {"_forward_split", "_backward_split"}, calls


@pytest.mark.parametrize("method,variant,schedule", [("badmm-q", "exact", "fused-rebuild"),
                                                     ("badmm-e", "paper", "fused-rebuild"),
                                                     ("badmm-q", "paper", "unfused-rebuild"),
                                                     ("badmm-q", "exact", "stored")])
def test_split_backward_schedules(method, variant, schedule, monkeypatch):
    """The split backward's three schedules at T = 4 (the rebuild composes up to two later
    reverse steps): Z̄' rebuilt in pass 3, which also sums pass 2's L̄', Z̄' part (the
    launcher's: :func:`launch.split_backward_fuses`), rebuilt in both passes, or kept in a
    (rows, D) scratch (:func:`launch.backward_rebuilds_zbar` off: ``bench/gpu_tune.py``'s
    other schedules; the T = 3 split tests run the launcher's for every method and variant);
    against the reference."""
    _small_blocks(monkeypatch)
    calls = _split(monkeypatch, 3, 2)
    if schedule != "fused-rebuild":
        monkeypatch.setattr(launch, "split_backward_fuses", lambda rebuild: False)
    if schedule == "stored":
        monkeypatch.setattr(launch, "backward_rebuilds_zbar", lambda per_row, fuse=False: False)
    gen = torch.Generator().manual_seed(17)
    x, w, lp, lq, cy, cp = _case(2, 37, 19, 4, gen)
    args = (x, None, method, variant, w, lp, lq, cy, cp)
    _compare(_run_kernel(*args), _run_reference(*args), RTOL[torch.float32])
    assert set(calls) >= {"_forward_split", "_backward_split"}, calls


@pytest.mark.parametrize("method,variant", [("badmm-e", "exact"), ("badmm-q", "paper"),
                                            ("badmm-q", "exact"), ("badmm-e", "paper")])
def test_split_streamed_forward(method, variant, monkeypatch):
    """The split forward streaming its state through the (B, N, D) scratch (3 x 2 slices; the
    state written by one iteration's row launch is read, shifted by the history's C and log η,
    by the next iteration's column launch) and the split backward, against the reference."""
    _small_blocks(monkeypatch)
    calls = _split(monkeypatch, 3, 2, schedule="stream")
    gen = torch.Generator().manual_seed(14)
    x, w, lp, lq, cy, cp = _case(2, 37, 19, 3, gen, inf_a2=True)
    args = (x, None, method, variant, w, lp, lq, cy, cp)
    _compare(_run_kernel(*args), _run_reference(*args), RTOL[torch.float32])
    assert set(calls) >= {"_forward_split", "_backward_split"}, calls


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("method,variant", [("badmm-q", "exact"), ("badmm-e", "paper"),
                                            ("badmm-e", "exact"), ("badmm-q", "paper")])
def test_split_ragged_with_empty_sets(method, variant, schedule, monkeypatch):
    """A ragged batch split 3 x 2: each set's row slices are sized on the device from N_b
    (37 rows: 16 + 16 + 5; 20 rows: 16 + 4 + an empty slice; 5 rows: one slice, two empty),
    empty sets first, in the middle and last pool to 0 with finite gradients, the others
    match the reference."""
    _small_blocks(monkeypatch)
    calls = _split(monkeypatch, 3, 2, schedule=schedule)
    _check_ragged_with_empty_sets(method, variant, [0, 37, 0, 5, 20, 0], D=19, T=3, seed=15,
                                  inf_a2=True)
    assert set(calls) >= {"_forward_split", "_backward_split"}, calls


@pytest.mark.parametrize("method", ["badmm-e", "badmm-q"])
def test_split_uniform_priors_strided(method, monkeypatch):
    """The split forward and backward with uniform priors, no plan, x read through an NCHW
    view."""
    _small_blocks(monkeypatch)
    calls = _split(monkeypatch, 2, 2)
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 19, 5, 7, generator=gen)
    w = _weights(2, gen)
    cy = torch.randn(2, 19, generator=gen)
    view = lambda t: t.flatten(2).transpose(1, 2)                    # (B, 35, 19), strided
    args = (x, None, method, "exact", w, None, None, cy, None)
    _compare(_run_kernel(*args, x_view=view), _run_reference(*args, x_view=view),
             RTOL[torch.float32])
    assert set(calls) >= {"_forward_split", "_backward_split"}, calls


def test_split_saves_what_the_fused_kernel_saves(monkeypatch):
    """The split schedules keep the same autograd state (x, y, the table, the vector history)
    at T = 2 and T = 6, and the extra buffers they allocate are O(T) vectors plus
    T-independent partials and scratch: none grows with T times N × D (a buffer that did would
    add 4 · 4 · N · D bytes from T = 2 to 6, far above the vectors' 4 · per_iter). Was T = 16;
    T = 6 tests the same growth in a third of the interpreter time. Launches stubbed: the
    sizes are the host's (the kernels' results are checked by the split tests above)."""
    _small_blocks(monkeypatch)
    monkeypatch.setattr(launch, "launcher", lambda kernel, wrap=None: _NoLaunch())
    gen = torch.Generator().manual_seed(16)
    B, N, D = 2, 37, 19
    x = torch.randn(B, N, D, generator=gen).to(DEVICE).requires_grad_()
    allocated = []
    real_empty, real_zeros = launch.torch.empty, launch.torch.zeros
    real_scratch = launch.fp32_scratch

    inside_scratch = []

    def counting(real):
        def alloc(*shape, **kw):
            t = real(*shape, **kw)
            if not inside_scratch:
                allocated.append(t.numel() * t.element_size())
            return t
        return alloc

    def counting_scratch(device, zeroed=(), empty=()):  # the buffers asked for (no padding)
        inside_scratch.append(True)
        try:
            zs, es = real_scratch(device, zeroed=zeroed, empty=empty)
        finally:
            inside_scratch.pop()
        allocated.extend(t.numel() * t.element_size() for t in (*zs, *es))
        return zs, es

    def run(T, split):
        calls = []
        if split:
            calls = _split(monkeypatch, 3, 2, schedule="stream")
        else:
            monkeypatch.setattr(launch, "forward_splits", lambda *a: (1, 1))
            monkeypatch.setattr(launch, "backward_splits", lambda *a: (1, 1))
            _schedule(monkeypatch, "stream")
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        w = {k: v.to(DEVICE).requires_grad_() for k, v in _weights(T, gen).items()}
        allocated.clear()
        monkeypatch.setattr(launch.torch, "empty", counting(real_empty))
        monkeypatch.setattr(launch.torch, "zeros", counting(real_zeros))
        monkeypatch.setattr(launch, "fp32_scratch", counting_scratch)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y, _ = rot_pool_badmm_triton(x, None, method="badmm-e", variant="exact", **w,
                                         log_p0=None, log_q0=None, return_plan=False)
        y.sum().backward()
        monkeypatch.setattr(launch.torch, "empty", real_empty)
        monkeypatch.setattr(launch.torch, "zeros", real_zeros)
        monkeypatch.setattr(launch, "fp32_scratch", real_scratch)
        assert not split or set(calls) == {"_forward_split", "_backward_split"}, calls
        return sum(sizes), sum(allocated)

    (f2, _), (f6, _) = run(2, False), run(6, False)
    (s2, a2), (s6, a6) = run(2, True), run(6, True)
    assert (s2, s6) == (f2, f6), (s2, s6, f2, f6)
    # per extra iteration: the fp32 weight partials (B, T, 4) and (B, T, 2, NS·DS, 2), the
    # (6, T) weight gradient and B-E's R̄ history (B, T, D) only (the (WEIGHT_ROWS, T) table is
    # part of the saved history); the weight gradient's segment of the flat parameter
    # gradient is padded to whole 128-byte lines (launch.param_grads_numel)
    per_iter = 4 * (B * 4 + B * 2 * 3 * 2 * 2 + B * D)
    dw_growth = 4 * (aligned_row(6 * 6) - aligned_row(6 * 2))
    assert a6 - a2 == 4 * per_iter + dw_growth, (a2, a6)


@pytest.mark.parametrize("case", ["W1", "ragged"])
@pytest.mark.parametrize("method,variant", [("badmm-e", "exact"), ("badmm-e", "paper"),
                                            ("badmm-q", "exact"), ("badmm-q", "paper")])
def test_backward_memory_where_the_scratch_is_per_row(case, method, variant, monkeypatch):
    """T = 16, launches stubbed (only the host's allocations, the same on a GPU), an H100's
    132 SMs: W1 (50 sets of 500 × 100, fp32: the split backward) and a ragged batch of 200
    sets of 20-500 rows, D = 128 (one program per set, its adjoint scratch per row). There
    both methods rebuild Z̄' in their passes (:func:`launch.backward_rebuilds_zbar`), so the
    backward allocates x̄, one (rows, D) adjoint (L̄) and vectors (B-Q: its (T, rows) C̄
    history too, T / D × the input), and with the saved history the forward+backward stays
    under issue 17's 3× the input - except B-Q paper, 3.1×: the paper variant's history
    holds 4 slots an entry (z1, z2) and B-Q adds its C̄ history."""
    monkeypatch.setattr(launch, "launcher", lambda kernel, wrap=None: _NoLaunch())
    monkeypatch.setattr(launch, "forward_replays", lambda *a, **k: True)   # no state scratch
    monkeypatch.setattr(launch, "sm_count", lambda device: 132)            # an H100
    from harness import allocation_counter
    gen = torch.Generator().manual_seed(45)
    T = 16
    if case == "W1":
        B, N, D, ptr = 50, 500, 100, None
        x = torch.randn(B, N, D, generator=gen)
    else:
        B, N, D = 200, 0, 128
        ptr = torch.cat([torch.zeros(1, dtype=torch.long),
                         torch.randint(20, 501, (B,), generator=gen).cumsum(0)])
        x = torch.randn(int(ptr[-1]), D, generator=gen)
        ptr = ptr.to(DEVICE)
    x = x.to(DEVICE).requires_grad_()
    split = launch.backward_splits(B, N or 260, D, *launch.block_sizes(N, D)[:2], x.device)
    assert (split != (1, 1)) == (case == "W1"), split
    w = {k: v.to(DEVICE) for k, v in _weights(T, gen).items()}
    y, _ = rot_pool_badmm_triton(x, ptr, method=method, variant=variant, **w, log_p0=None,
                                 log_q0=None, return_plan=False)
    history = y.grad_fn.saved_tensors if hasattr(y.grad_fn, "saved_tensors") else ()
    with allocation_counter() as allocs:
        torch.autograd.grad(y.sum(), [x])
    bwd = 4 * sum(allocs.sizes)             # every backward buffer is fp32 and live at its end
    saved = sum(t.numel() * t.element_size() for t in history
                if t is not None and t.data_ptr() not in (x.data_ptr(), ptr.data_ptr()
                                                          if ptr is not None else -1))
    x_bytes = x.numel() * 4
    vectors = T / D if method == "badmm-q" else 0.0                 # B-Q's C̄ history
    assert 2 * x_bytes <= bwd < (2.2 + vectors) * x_bytes, (bwd, x_bytes)   # x̄ and L̄
    bound = 3.15 if (method, variant) == ("badmm-q", "paper") else 3.0
    assert saved > 0.2 * x_bytes and bwd + saved <= bound * x_bytes, (bwd, saved, x_bytes)


class _NoLaunch:
    """A launcher that runs nothing: ``kernel[grid](...)`` returns None."""

    def __getitem__(self, grid):
        return lambda *a, **k: None


def test_split_heuristic():
    """Few sets are split (never into more slices than tiles), many sets are not."""
    cpu = torch.device("cpu")
    assert launch.forward_splits(1, 500, 100, 16, 128, cpu) != (1, 1)
    NS, DS = launch.forward_splits(1, 20, 20, 16, 16, cpu)
    assert NS <= 2 and DS <= 2
    assert launch.forward_splits(1000, 500, 100, 16, 128, cpu) == (1, 1)


def test_host_bound_splits_run_one_program_per_set_where_launches_dominate():
    """On a GPU, few small iterations of W1-sized sets run one program a set (each of the
    split's launches costs host time); larger T or sets and the interpreter keep the shape
    rule's split."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    T_max, set_max = launch.ONE_PROGRAM_MAX_ITERS, launch.ONE_PROGRAM_MAX_SET
    assert launch.host_bound_splits((4, 3), 4, 500 * 100, cuda) == (1, 1)        # W1, T = 4
    assert launch.host_bound_splits((4, 3), T_max, set_max, cuda) == (1, 1)
    assert launch.host_bound_splits((4, 3), T_max + 1, 500 * 100, cuda) == (4, 3)
    assert launch.host_bound_splits((4, 3), 4, set_max + 1, cuda) == (4, 3)
    assert launch.host_bound_splits((4, 3), 4, 500 * 100, cpu) == (4, 3)
    assert launch.host_bound_splits((1, 1), 4, 500 * 100, cuda) == (1, 1)


@pytest.mark.parametrize("method", ["badmm-e", "badmm-q"])
def test_one_program_by_host_cost_keeps_the_shape_rule_layout(method, monkeypatch):
    """The shape rule splits (gx row-major, as the custom operator's fake says), the host-cost
    rule runs one program a set: gx keeps the fake's layout - not x's, as it would where the shapes
    alone chose one program - and forward and gradients match the reference."""
    _small_blocks(monkeypatch)
    monkeypatch.setattr(launch, "forward_splits", lambda *a: (2, 1))
    monkeypatch.setattr(launch, "backward_splits", lambda *a: (2, 1))
    chosen = []
    monkeypatch.setattr(launch, "host_bound_splits",
                        lambda splits, *a: chosen.append(splits) or (1, 1))
    launched = []
    real_launcher = launch.launcher
    monkeypatch.setattr(launch, "launcher", lambda kernel, *a: launched.append(
        getattr(kernel, "fn", kernel).__name__) or real_launcher(kernel, *a))
    grads = _recorded_backwards(monkeypatch)
    (B, C, H, W), img, w, view, gen = _nchw_image(29)
    cy = torch.randn(B, C, generator=gen)
    args = (img, None, method, "exact", w, None, None, cy, None)
    _compare(_run_kernel(*args, x_view=view), _run_reference(*args, x_view=view),
             RTOL[torch.float32])
    assert chosen == [(2, 1), (2, 1)]                         # the forward's, the backward's
    assert "badmm_fwd_kernel" in launched and "badmm_bwd_kernel" in launched
    assert not [name for name in launched if "split" in name]
    (x, (gx, _dparams)), = grads
    assert gx.stride() == launch.grad_x_like(x, None).stride() == (H * W * C, C, 1)


def test_one_pass_heuristic():
    """One sweep per iteration for dense sets whose rows fit a tile of the usual size, with the
    replay, for B-E and the paper variant; with it the replay is kept to larger T (W2 at
    T = 16: replayed with one sweep, streamed with two)."""
    def geo(N, D, ragged=False):
        return types.SimpleNamespace(N=N, D=D, ragged=ragged, blocks=launch.block_sizes(N, D))

    e, q, q_paper = launch.quad_flag(False, False), launch.quad_flag(True, False), \
        launch.quad_flag(True, True)
    assert launch.forward_one_pass(geo(49, 2048), e, False) == (64, 32, 1024, 16)
    assert launch.forward_one_pass(geo(49, 2048), q_paper, True) == (64, 32, 1024, 16)
    assert launch.forward_one_pass(geo(49, 2048), q, False) is None            # B-Q exact
    assert launch.forward_one_pass(geo(0, 2048, ragged=True), e, False) is None
    assert launch.forward_one_pass(geo(500, 100), e, False) is None            # W1's rows
    assert launch.forward_one_pass(geo(7, 5), e, False) == (16, 16, 128, 4)
    assert not launch.forward_replays(16, 4) and launch.forward_replays(16, 4, one_pass=True)
    assert launch.forward_replays(11, 4) and not launch.forward_replays(40, 4, one_pass=True)


@pytest.mark.parametrize("N,D,T", [(1, 1, 2), (1, 6, 1), (5, 1, 2)])
@pytest.mark.parametrize("method", ["badmm-e", "badmm-q"])
def test_awkward_shapes(method, N, D, T):
    """N = 1, D = 1, T = 1, uniform priors."""
    gen = torch.Generator().manual_seed(3)
    x, w, lp, lq, cy, cp = _case(2, N, D, T, gen, priors=False)
    args = (x, None, method, "exact", w, lp, lq, cy, cp)
    _compare(_run_kernel(*args), _run_reference(*args), RTOL[torch.float32])


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("method,variant", [("badmm-q", "exact"), ("badmm-e", "paper")])
def test_ragged_with_empty_sets(method, variant, schedule, monkeypatch):
    """Ragged batch (ptr) with empty sets first, in the middle and last: those pool to 0 and
    every gradient is finite; the others match the reference. Small tiles so that a set spans
    several tiles and the persistent grid (3 programs on CPU) loops over sets."""
    _small_blocks(monkeypatch)
    _schedule(monkeypatch, schedule)
    _check_ragged_with_empty_sets(method, variant, [0, 3, 0, 18, 1, 0], D=5, T=2, seed=4)


@pytest.mark.parametrize("variant", ["exact", "paper"])
@pytest.mark.parametrize("method", ["badmm-e", "badmm-q"])
def test_ragged_backward_rebuilds_zbar(method, variant, monkeypatch):
    """A ragged batch with as many sets as programs (one program per set, unfused: the
    launcher's choice) rebuilds Z̄' in passes 2 and 3 (:func:`launch.backward_rebuilds_zbar`,
    :func:`kernels._rebuilt_zbar`) from a per-program (T, D) R̄ history (and, B-Q, the
    (T, rows) C̄ history): at T = 4 the rebuild composes up to two later reverse steps and
    the last one's pooling and plan terms; with empty sets, priors and a plan gradient,
    against the reference."""
    _small_blocks(monkeypatch)
    _schedule(monkeypatch, "replay")
    monkeypatch.setattr(launch, "backward_fuses", lambda *a: False)
    chosen = _returns_of(monkeypatch, "backward_rebuilds_zbar")
    _check_ragged_with_empty_sets(method, variant, [0, 7, 0, 18, 3, 1], D=5, T=4, seed=46)
    assert chosen == [True], chosen


@pytest.mark.parametrize("method,variant", [("badmm-e", "exact"), ("badmm-q", "paper")])
def test_ragged_rebuild_on_triton36_tiles(method, variant, monkeypatch):
    """With triton 3.6 (``FRUGAL_REGISTERS`` false) the Z̄'-rebuilding backward runs tiles
    halved once more than the forward's (:func:`launch.rebuild_block_sizes`: BD 64 -> 32
    here, so D = 40 spans two column blocks in the backward and one in the forward); with empty
    sets, priors and a plan gradient, against the reference."""
    monkeypatch.setattr(launch, "FRUGAL_REGISTERS", False)
    bv = 16 if not ON_CUDA else 128
    monkeypatch.setattr(launch, "block_sizes", lambda n, d: (16, 64, bv, 2))
    _schedule(monkeypatch, "replay")
    monkeypatch.setattr(launch, "backward_fuses", lambda *a: False)
    picked = _returns_of(monkeypatch, "rebuild_block_sizes")
    _check_ragged_with_empty_sets(method, variant, [0, 7, 0, 18, 3, 1], D=40, T=3, seed=47)
    assert picked == [(16, 32, bv, 2)], picked


@pytest.mark.parametrize("channels_last", [False, True])
def test_strided_image_without_copy(channels_last, monkeypatch):
    """A (B, C, H, W) image read as x = img.flatten(2).transpose(1, 2) (sets of H·W samples,
    D = C), NCHW or channels-last: the launcher receives img's own storage (no copy) and matches
    the reference on the same values."""
    gen = torch.Generator().manual_seed(5)
    B, C, H, W, T = 2, 6, 3, 3, 2
    img = torch.randn(B, C, H, W, generator=gen)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    seen, images = [], []
    real = op.badmm_forward

    def spy(x, *args, **kw):  # the launcher hands x itself to the kernel
        seen.append(x)
        return real(x, *args, **kw)

    monkeypatch.setattr(op, "badmm_forward", spy)
    w = _weights(T, gen)
    cy = torch.randn(B, C, generator=gen)

    def as_sets(t):
        images.append(t.contiguous(memory_format=fmt))  # the caller's image, in its format
        return images[-1].flatten(2).transpose(1, 2)

    k = _run_kernel(img, None, "badmm-e", "exact", w, None, None, cy, None, x_view=as_sets)
    assert len(seen) == 1 and seen[0].is_contiguous() == channels_last
    assert seen[0].untyped_storage().data_ptr() == images[0].untyped_storage().data_ptr()
    assert seen[0].stride()[2] == (1 if channels_last else H * W)
    r = _run_reference(img, None, "badmm-e", "exact", w, None, None, cy, None,
                       x_view=lambda t: t.flatten(2).transpose(1, 2))
    _compare(k, r, RTOL[torch.float32])


@pytest.mark.parametrize("a23", [1e-5, 1e4])
@pytest.mark.parametrize("a1", [1e-5, 1e4])
@pytest.mark.parametrize("method", ["badmm-e", "badmm-q"])
def test_fig7_extremes(method, a1, a23):
    """The corners of the paper's Fig. 7 grid (α1, α2 = α3 ∈ {1e-5, 1e4}), ρ = 1, exact
    variant. y is finite and within 1e-4 of the reference. The gradients are ill-conditioned
    in fp32 at these corners (B-Q with α1 = 1e4: α1 S ~ 1e3 cancels against X - Z; the fp32
    torch path itself is up to ~1e-2 off float64 in ∂/∂ρ), so each gradient must be finite and
    within max(1e-4, 25 × the fp32 torch path's own error) of the float64 reference: a wrong
    term gives O(1) errors, rounding does not."""
    gen = torch.Generator().manual_seed(6)
    B, N, D, T = 2, 6, 4, 2
    x = torch.randn(B, N, D, generator=gen)
    w = dict(a1=torch.full((T,), a1), a2=torch.full((T,), a23), a3=torch.full((T,), a23),
             rho=torch.ones(T))
    cy = torch.randn(B, D, generator=gen)
    args = (x, None, method, "exact", w, None, None, cy, None)
    k, r = _run_kernel(*args), _run_reference(*args)
    # the torch path in fp32 on the same inputs: the yardstick of fp32 rounding here
    xt = x.clone().requires_grad_()
    wt = {key: v.clone().requires_grad_() for key, v in w.items()}
    yt = rt.rot_pool(xt, method=method, num_iters=T, backend="torch", **wt)
    _loss(yt, None, cy, None).backward()
    t = dict(y=yt.detach(), x=xt.grad, **{key: v.grad for key, v in wt.items()})
    assert _err(k["y"], r["y"], 1e-30) <= RTOL[torch.float32]
    for key in ("x",) + WEIGHTS:
        e_k, e_t = _err(k[key], r[key], GRAD_FLOOR), _err(t[key], r[key], GRAD_FLOOR)
        assert e_k <= max(RTOL[torch.float32], 25 * e_t), (key, e_k, e_t)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_bq_exact_large_a1_over_rho(schedule, monkeypatch):
    """B-Q exact at α1 = 1e3, ρ = 1, T = 8: the step divided by ρ alone (DESIGN §3.1) has
    elementwise gain 1 - α1 S/ρ < -1 here (chaotic); the majorised step of reference/rot.py
    (weight ρ + α1, issue 16) is a non-expansion. Kernel = float64 reference (y, plan and every
    gradient, fp32 tolerance) and finite."""
    _schedule(monkeypatch, schedule)
    gen = torch.Generator().manual_seed(16)
    B, N, D, T = 2, 6, 4, 8
    x, _, lp, lq, cy, cp = _case(B, N, D, T, gen)
    w = dict(a1=torch.full((T,), 1e3), a2=0.3 + 2 * torch.rand(T, generator=gen),
             a3=0.3 + 2 * torch.rand(T, generator=gen), rho=torch.ones(T))
    args = (x, None, "badmm-q", "exact", w, lp, lq, cy, cp)
    k = _run_kernel(*args)
    assert all(bool(torch.isfinite(v).all()) for v in k.values())
    _compare(k, _run_reference(*args), RTOL[torch.float32])


@pytest.mark.parametrize("one_program", [False, True], ids=["launcher's-pick", "one-program"])
@pytest.mark.parametrize("variant", ["exact", "paper"])
@pytest.mark.parametrize("method", ["badmm-e", "badmm-q"])
def test_huge_inputs_stay_finite(method, variant, one_program, monkeypatch):
    """x = randn(2, 8, 8) · 1e30 (issue 17: the B-E kernel returned NaN, the running maxima
    started at a finite -1e30 sentinel): where the fp32 torch path gives a finite y and
    x-gradient, so does the kernel, and y agrees with it. ``one_program``: the
    one-program-per-set forward (the interpreter's few 'SMs' pick the split one for 2 sets),
    whose B-E iterations run as one sweep (launch.forward_one_pass) up to FUSED_MAGNITUDE."""
    if one_program:
        monkeypatch.setattr(launch, "forward_splits", lambda *a: (1, 1))
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(2, 8, 8, generator=gen) * 1e30
    outs = []
    for backend in ("torch", "triton"):
        xl = x.to(DEVICE).requires_grad_()
        y = rt.rot_pool(xl, method=method, variant=variant, num_iters=3, backend=backend)
        (g,) = torch.autograd.grad(y.sum(), xl)
        outs.append((y.detach().cpu(), g.cpu()))
    (yt, gt), (yk, gk) = outs
    assert bool(torch.isfinite(yt).all()) and bool(torch.isfinite(gt).all())
    assert bool(torch.isfinite(yk).all()) and bool(torch.isfinite(gk).all())
    assert float((yk - yt).norm() / yt.norm()) <= RTOL[torch.float32]


FOLD_PATHS = {   # path: (forward split (NS, DS), forward replays, backward fuses, ragged)
    "fused": ((1, 1), True, True, False), "unfused": ((1, 1), True, False, False),
    "stream": ((1, 1), False, True, False), "split": ((2, 2), True, True, False),
    "ragged": ((1, 1), True, True, True), "split-ragged": ((2, 2), False, True, True),
    "ragged-unfused": ((1, 1), True, False, True)}


@pytest.mark.parametrize("path,method,variant", [
    (path, *mv) for path in FOLD_PATHS for mv in (("badmm-e", "exact"), ("badmm-q", "paper"))
] + [(path, *mv) for path in ("fused", "split")
     for mv in (("badmm-q", "exact"), ("badmm-e", "paper"))])
def test_feature_scale_folded_in(path, method, variant, monkeypatch):
    """``spread=True`` (the layers' scale="auto"): y = σ · pool(x / σ) with σ each set's
    spread (formed by the one-program-per-set kernel itself), 1/σ folded into the kernels'
    reads of x and σ into the stored output; backward
    d loss / d(x / σ) and ∂/∂σ from the last reverse step (Σ X̄ · x / σ, per program in the
    split backward), then one spread pass. == the oracle on x / σ times σ in float64, autograd
    through ``dense_spread`` / ``ragged_spread`` (x and the (T,) weights), on both backward
    schedules, the streamed forward, the split forward and backward, and ragged sets with an
    empty one and a constant one (σ = 1). Launches: no x / σ pass, no dot pass."""
    from launch_counter import count_launches
    from rotp_triton.ops.rot.params import A1, A2, A3, RHO
    from rotp_triton.ops.rot.spread import dense_spread, ragged_spread
    splits, replays, fuses, ragged = FOLD_PATHS[path]
    _small_blocks(monkeypatch)
    _schedule(monkeypatch, "replay" if replays else "stream")
    monkeypatch.setattr(launch, "forward_splits", lambda *a: splits)
    monkeypatch.setattr(launch, "backward_splits", lambda *a: splits)
    monkeypatch.setattr(launch, "backward_fuses", lambda T, xb: fuses)
    gen = torch.Generator().manual_seed(43)
    T = 3
    w = _weights(T, gen)
    if ragged:
        lengths = [3, 0, 20, 2]
        ptr = torch.tensor([0] + lengths).cumsum(0)
        x = torch.randn(int(ptr[-1]), 19, generator=gen, dtype=torch.float64) * 3 + 2
        x[-2:] = 1.5                                    # a constant set: spread 0 -> σ = 1
        index = torch.repeat_interleave(torch.arange(len(lengths)), ptr.diff())
    else:
        ptr = None
        x = torch.randn(2, 21, 19, generator=gen, dtype=torch.float64) * 3 + 2
    B = len(lengths) if ragged else x.shape[0]
    table = torch.zeros(6, T)
    table[A1], table[A2], table[A3], table[RHO] = w["a1"], w["a2"], w["a3"], w["rho"]
    table = table.to(DEVICE).requires_grad_()
    xk = x.float().to(DEVICE).requires_grad_()
    with count_launches() as fwd:
        y, plan = badmm_pkg.badmm_pool(xk, None if ptr is None else ptr.to(DEVICE), table,
                                       None, None, quadratic=method == "badmm-q",
                                       variant=variant, return_plan=False, spread=True)
    assert plan is None and y.dtype == torch.float32
    # σ: formed by the one-program-per-set kernel itself (STATS), else by the spread launches
    assert ("badmm_fwd_kernel" in fwd) == (splits == (1, 1))
    if splits == (1, 1):
        assert "spread_stats_kernel" not in fwd and "spread_normalize_kernel" not in fwd
        assert fwd.constexprs[fwd.index("badmm_fwd_kernel")]["STATS"]
    else:
        assert fwd[:2] == ["spread_stats_kernel", "spread_normalize_kernel"]
        assert not fwd.constexprs[1]["NORMALIZE"]
    cy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    with count_launches() as bwd:
        gx, gw = torch.autograd.grad((y * cy.to(DEVICE, torch.float32)).sum(), [xk, table])
    assert bwd[-1] == "spread_grad_kernel" and "spread_grad_dot_kernel" not in bwd
    assert ("badmm_bwd_kernel" in bwd) == (splits == (1, 1))
    x64 = x.clone().requires_grad_()
    w64 = {k: v.double().requires_grad_() for k, v in w.items()}
    if ragged:
        s = ragged_spread(x64, index, B)
        xn = x64 / s[index][:, None]
        sets = [xn[ptr[i]:ptr[i + 1]] for i in range(B)]
    else:
        s = dense_spread(x64)
        sets = list(x64 / s[:, None, None])
    yr, _plans = ref.rot_pool_sets(sets, method=method, variant=variant, num_iters=T, **w64)
    yr = yr * s[:, None]
    assert rel_err(y, yr) <= RTOL[torch.float32]
    if ragged:
        assert bool((y[1] == 0).all())
    gr = torch.autograd.grad((yr * cy).sum(), [x64] + [w64[k] for k in WEIGHTS])
    rows = [A1, A2, A3, RHO]
    for name, a, b in zip(["x"] + list(WEIGHTS), [gx] + [gw[r] for r in rows], gr):
        a = a.detach().double().cpu()
        assert bool(torch.isfinite(a).all()), name
        assert (a - b).norm() <= RTOL[torch.float32] * b.norm() + (name != "x") * 1e-6, name


# --------------------------------------------------------------------------------------------
# memory, routing, reduced precision, GPU compilation
@pytest.mark.parametrize("quadratic,paper", [(False, False), (True, False), (True, True)])
def test_weight_table_records(quadratic, paper):
    """The kernels' weight table (``launch._fill_weight_table``): the (6, T) weights, then one
    record per iteration at RECORDS · T - α1, ρ, 1 / w_P, 1 / (α1 + ρ) - the reciprocals
    bit-equal to fp32 division as the passes divide (w_P = ρ + α1 for B-Q exact, else ρ): the
    replay's hot loops read an iteration's scalars from its record."""
    from rotp_triton.ops.rot.triton.badmm import kernels
    gen = torch.Generator().manual_seed(3)
    T = 5
    w = (torch.rand(6, T, generator=gen) * 3 + 0.01).to(DEVICE)
    wc = torch.full((launch.WEIGHT_ROWS * T,), float("nan"), device=DEVICE)
    launch._fill_weight_table(w, wc, kernels.quad_flag(quadratic, paper), None)
    assert torch.equal(wc[:6 * T].view(6, T), w)
    rec = wc[kernels.RECORDS.value * T:].view(T, kernels.RECORD.value)
    a1, rho = w[1], w[4]
    wp = rho + a1 if quadratic and not paper else rho
    fields = {kernels.REC_A1: a1, kernels.REC_RHO: rho, kernels.REC_INV_WP: 1.0 / wp,
              kernels.REC_INV_W: 1.0 / (a1 + rho)}
    assert sorted(f.value for f in fields) == list(range(kernels.RECORD.value))
    for field, want in fields.items():
        assert torch.equal(rec[:, field.value], want), field


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("variant", ["exact", "paper"])
def test_saved_bytes_are_x_plus_vectors(variant, schedule, monkeypatch):
    """What autograd keeps for the backward at T = 16 is x, the (B, D) output, the (6, T)
    weights and one flat history: the kernels' (WEIGHT_ROWS, T) table and the per-iteration
    vectors (R, log μ [, z1, unused] per set and C, log η [, z2, unused] per row:
    O(T · (N + D)) per set), each segment padded to 128 bytes - nothing of size N × D per
    iteration. The scratch the launchers allocate (per-program state and adjoint tiles,
    working vectors) does not depend on T (for a given forward schedule: replaying needs no
    state scratch, streaming an N × D pair per program), except the backward's (B, T, 4)
    weight partials, which the kernel writes whole (no zero fill). Launches stubbed: the sizes
    are the host's."""
    _schedule(monkeypatch, schedule)
    monkeypatch.setattr(launch, "launcher", lambda kernel, wrap=None: _NoLaunch())
    gen = torch.Generator().manual_seed(7)
    B, N, D = 2, 9, 6
    KV = 4 if variant == "paper" else 2     # (the replay's shifts come from R, log μ pairs)
    x = torch.randn(B, N, D, generator=gen).to(DEVICE).requires_grad_()
    scratch = []
    real_scratch = launch.fp32_scratch

    def spy(device, zeroed=(), empty=()):
        zs, es = real_scratch(device, zeroed=zeroed, empty=empty)
        scratch.append((sum(t.numel() * 4 for t in zs), sum(t.numel() * 4 for t in es)))
        return zs, es

    monkeypatch.setattr(launch, "fp32_scratch", spy)

    def saved_bytes(T):
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        w = {k: v.to(DEVICE).requires_grad_() for k, v in _weights(T, gen).items()}
        scratch.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y, _ = rot_pool_badmm_triton(x, None, method="badmm-e", variant=variant, **w,
                                         log_p0=None, log_q0=None, return_plan=False)
        y.sum().backward()
        return sum(sizes), list(scratch)

    def history(T):                             # table + vectors, then the 128-byte padding
        table, hd, hn = launch.WEIGHT_ROWS * T, T * KV * B * D, T * KV * B * N
        padded = sum(-(-n // 32) * 32 for n in (table, hd, hn))
        assert padded - (table + hd + hn) < 3 * 32
        return 4 * padded

    (s2, sc2), (s16, sc16) = saved_bytes(2), saved_bytes(16)
    x_bytes = x.numel() * x.element_size()
    for T, saved in ((2, s2), (16, s16)):
        assert saved == x_bytes + 4 * B * D + 4 * 6 * T + history(T), (T, saved)
    assert len(sc2) == len(sc16) == 2, (sc2, sc16)      # one scratch in each direction
    assert [z for z, _ in sc2 + sc16] == [0] * 4, (sc2, sc16)   # nothing zero-filled
    partials = [4 * B * T * 4 for T in (2, 16)]           # the backward's (B, T, 4)
    assert sc2[0][1] == sc16[0][1], (sc2, sc16)
    assert sc16[1][1] - partials[1] == sc2[1][1] - partials[0], (sc2, sc16)


def test_feature_scale_memory(monkeypatch):
    """The folded scale (``spread=True``) saves x itself, the table, the vector history, y and
    B·(2 + D) statistics (no x / σ); with the replayed forward no x-sized buffer is allocated
    in the forward, and the backward allocates two: the adjoint scratch (one program per set
    here: B ≤ the grid) and d loss / d(x / σ), over which x̄ is written (no third for x̄)."""
    from harness import allocation_counter
    _schedule(monkeypatch, "replay")
    monkeypatch.setattr(launch, "forward_splits", lambda *a: (1, 1))
    monkeypatch.setattr(launch, "backward_splits", lambda *a: (1, 1))
    gen = torch.Generator().manual_seed(44)
    B, N, D, T = 2, 40, 32, 3                  # N·D above the O(T·(N + D)) vectors
    x = (torch.randn(B, N, D, generator=gen) * 2 + 1).to(DEVICE).requires_grad_()
    table = torch.zeros(6, T)
    for row, v in zip((1, 2, 3, 4), _weights(T, gen).values()):
        table[row] = v
    table = table.to(DEVICE).requires_grad_()
    with allocation_counter() as allocs:
        y, _ = badmm_pkg.badmm_pool(x, None, table, None, None, quadratic=False,
                                    variant="exact", return_plan=False, spread=True)
    assert sum(n >= x.numel() for n in allocs.sizes) == 0, allocs.sizes
    x_ptr, _ptr, w, h, y32, stats = y.grad_fn.saved_tensors
    assert x_ptr.data_ptr() == x.data_ptr() and w.shape == (6, T) and y32.shape == (B, D)
    assert stats.numel() == statistics_numel(B, D) and h.numel() < x.numel()
    with allocation_counter() as allocs:
        gx, gw = torch.autograd.grad((y * torch.arange(D, device=DEVICE)).sum(), [x, table])
    assert sum(n >= x.numel() for n in allocs.sizes) == 2, allocs.sizes
    assert gx.shape == x.shape and bool(torch.isfinite(gx).all()) and bool(gx.abs().sum() > 0)


@pytest.mark.skipif(not ON_CUDA, reason="peak memory is measured on CUDA")
def test_cuda_peak_memory_grows_only_by_the_vectors():
    """Peak CUDA memory of forward + backward grows from T = 2 to T = 8 by no more than the
    O(T·(N + D)) vector history and the backward's (B, T, 4) weight partials of the six extra
    iterations (+ 64 KiB of allocator rounding): the backward rebuilds the states instead of
    storing one (N, D) state per iteration, which would add 6 · 3.2 MB here. (The earlier
    bound, peak(8) ≤ 1.05 peak(2) + 64 KiB, failed on the H200 of 2026-11-29: the history
    alone grows by 1.4 MB.)"""
    gen = torch.Generator().manual_seed(13)
    B, N, D = 64, 49, 256
    x = torch.randn(B, N, D, generator=gen).to(DEVICE).requires_grad_()

    def peak(T):
        w = {k: v.to(DEVICE).requires_grad_() for k, v in _weights(T, gen).items()}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        y, _ = rot_pool_badmm_triton(x, None, method="badmm-q", variant="exact", **w,
                                     log_p0=None, log_q0=None, return_plan=False)
        y.sum().backward()
        torch.cuda.synchronize()
        x.grad = None
        return torch.cuda.max_memory_allocated() - base

    def vectors(T):                  # the flat history and the backward's (B, T, 4) partials
        return 4 * launch._history_layout(x, None, T, False)[1] + 4 * B * T * 4

    p2, p8 = peak(2), peak(8)
    assert p8 - p2 <= vectors(8) - vectors(2) + 65536, (p2, p8, vectors(2), vectors(8))


def test_rot_pool_routes_here(monkeypatch):
    """rt.rot_pool(..., backend="triton") with method badmm-q reaches this kernel and agrees
    with backend="torch"."""
    calls = []
    real = badmm_pkg.op.badmm_pool

    def spy(*a, **kw):
        calls.append("badmm-q" if kw["quadratic"] else "badmm-e")
        return real(*a, **kw)

    monkeypatch.setattr(badmm_pkg.op, "badmm_pool", spy)  # the router calls op.badmm_pool
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(6, 4, generator=gen).to(DEVICE)
    ptr = torch.tensor([0, 2, 6], device=DEVICE)
    q0 = torch.rand(6, generator=gen).to(DEVICE) + 0.1
    kw = dict(ptr=ptr, method="badmm-q", num_iters=2, a1=0.8, a2=math.inf, a3=2.0, rho=1.3, q0=q0,
              return_plan=True)
    y, plan = rt.rot_pool(x, backend="triton", **kw)
    assert calls == ["badmm-q"]
    yt, plant = rt.rot_pool(x, backend="torch", **kw)
    assert float((y - yt).norm() / yt.norm()) <= RTOL[torch.float32]
    assert float((plan - plant).norm() / plant.norm()) <= RTOL[torch.float32]


@pytest.mark.skipif(not ON_CUDA, reason="fp16/bf16 kernels are tested on CUDA only")
@pytest.mark.parametrize("dtype", [d for d in KERNEL_DTYPES if d != torch.float32])
@pytest.mark.parametrize("method", ["badmm-e", "badmm-q"])
def test_reduced_precision(method, dtype):
    """fp16/bf16 input, fp32 state: y in the input dtype; y, plan and gradients within
    RTOL[dtype] (fp16 2e-2, bf16 5e-2) of the float64 reference on the rounded input."""
    gen = torch.Generator().manual_seed(9)
    x, w, lp, lq, cy, cp = _case(3, 37, 70, 3, gen)
    x = x.to(dtype).float()                            # the reference sees the rounded input
    args = (x, None, method, "exact", w, lp, lq, cy, cp)
    k = _run_kernel(*args, dtype=dtype)
    assert k["y"].dtype == dtype and k["x"].dtype == dtype
    _compare(k, _run_reference(*args), RTOL[dtype])


@pytest.mark.skipif(not ON_CUDA, reason="realistic sizes need a GPU")
@pytest.mark.parametrize("method", ["badmm-e", "badmm-q"])
def test_cuda_realistic_size(method):
    """A ResNet-like head (49 × 2048) and a W1-like set (500 × 100), T = 4: forward and
    gradients match the reference."""
    gen = torch.Generator().manual_seed(10)
    for B, N, D in [(2, 49, 2048), (2, 500, 100)]:
        x, w, lp, lq, cy, cp = _case(B, N, D, 4, gen)
        args = (x, None, method, "exact", w, lp, lq, cy, cp)
        _compare(_run_kernel(*args), _run_reference(*args), RTOL[torch.float32])


AOT_CODE = r"""
import os, subprocess, tempfile, types
import triton
from aot import compile_sm90, ptxas_usage
from rotp_triton.ops.rot.triton.badmm import kernels as m, launch

PTR = {"x_ptr": "*fp16", "ptr_ptr": "*i64", "order_ptr": "*i64"}

def signature(kernel, consts):
    return {n: "constexpr" if n in consts else PTR.get(n, "*fp32") if n.endswith("_ptr")
            else "fp32" if n == "u_p0" else "i32" for n in kernel.arg_names}

cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                         "cuobjdump")
for kernel, D, N, quad, paper, ragged, flag, replay in [
        (m.badmm_fwd_kernel, 128, 500, False, False, False, "PLAN", True),
        (m.badmm_fwd_kernel, 2048, 49, True, True, True, "PLAN", True),
        (m.badmm_fwd_kernel, 2048, 49, False, False, False, "PLAN", False),
        (m.badmm_fwd_kernel, 128, 500, True, False, True, "PLAN", False),
        (m.badmm_fwd_kernel, 2048, 49, False, False, False, "SCALED", True),
        (m.badmm_fwd_kernel, 2048, 49, True, False, False, "SCALED", True),
        (m.badmm_fwd_kernel, 2048, 49, True, True, False, "PLAN", True),
        (m.badmm_bwd_kernel, 128, 500, False, False, True, "PLAN_GRAD", True),
        (m.badmm_bwd_kernel, 2048, 49, True, True, False, "DEFER", True),
        (m.badmm_bwd_kernel, 2048, 49, False, False, False, "DEFER", True),
        (m.badmm_bwd_kernel, 128, 500, True, True, True, "PLAN_GRAD", True),
        (m.badmm_bwd_kernel, 2048, 49, False, False, False, "PLAN_GRAD", False),
        (m.badmm_bwd_kernel, 2048, 49, True, False, False, "PLAN_GRAD", False),
        (m.badmm_bwd_kernel, 2048, 49, False, False, False, "SCALED", True),
        (m.badmm_bwd_kernel, 2048, 49, True, False, False, "SCALED", True),
        # the shipped W2 backward (launch.backward_fuses: unfused; 2 fp32 per thread at 16
        # warps, launch.unfused_backward_block_sizes)
        (m.badmm_bwd_kernel, 2048, 49, False, False, False, "SCALED", False),
        (m.badmm_bwd_kernel, 2048, 49, True, False, False, "SCALED", False),
        # ragged, unfused: Z̄' rebuilt (launch.backward_rebuilds_zbar)
        (m.badmm_bwd_kernel, 128, 500, False, False, True, "PLAN_GRAD", False),
        (m.badmm_bwd_kernel, 128, 500, False, True, True, "SCALED", False),
        (m.badmm_bwd_kernel, 128, 500, True, False, True, "PLAN_GRAD", False),
        (m.badmm_bwd_kernel, 128, 500, True, True, True, "PLAN_GRAD", False),
        (m.badmm_bwd_kernel, 128, 500, True, True, True, "SCALED", False)]:
    # the backward's flag: PLAN_GRAD, DEFER (W2 has no plan gradient) or SCALED (W2 under
    # the layers' scale="auto": with DEFER), last field: FUSE (its half tiles:
    # launch.backward_block_sizes); the forward's: PLAN or SCALED, last field REPLAY (with
    # one sweep per iteration where launch.forward_one_pass allows: W2 B-E, W2 B-Q paper)
    fused = kernel is m.badmm_bwd_kernel and replay
    rebuild = kernel is m.badmm_bwd_kernel and launch.backward_rebuilds_zbar(ragged, replay)
    sizes = launch.block_sizes
    if kernel is m.badmm_bwd_kernel:     # as the launcher: 16 warps unfused (triton >= 3.9)
        sizes = (launch.rebuild_block_sizes if rebuild else
                 launch.backward_block_sizes if fused else
                 lambda n, d: launch.unfused_backward_block_sizes(n, d, flag == "PLAN_GRAD"))
    if kernel is m.badmm_fwd_kernel:
        sizes = launch.forward_block_sizes          # (16 warps on a 2,048 tile)
    BN, BD, BV, num_warps = sizes(0 if ragged else N, D)
    one_pass = None
    if kernel is m.badmm_fwd_kernel:
        geo = types.SimpleNamespace(ragged=ragged, N=0 if ragged else N, D=D,
                                    blocks=(BN, BD, BV, num_warps))
        one_pass = launch.forward_one_pass(geo, m.quad_flag(quad, paper), paper) if replay \
            else None
        BN, BD, BV, num_warps = one_pass or (BN, BD, BV, num_warps)
    consts = dict(RAGGED=ragged, HAS_P0=True, HAS_Q0=True, QUAD=m.quad_flag(quad, paper),
                  PAPER=paper, BN=BN, BD=BD, BV=BV, **{flag: True})
    consts["KV"] = 4 if paper else 2
    consts.setdefault("SCALED", False)
    if kernel is m.badmm_fwd_kernel:
        consts["REPLAY"] = replay
        consts.setdefault("PLAN", False)
        consts["STATS"] = consts["SCALED"]   # (W2: one program per set forms σ itself)
        consts["ONE_PASS"] = one_pass is not None
        consts["SNAKE"] = launch.SNAKE_ORDER
    else:
        consts["FUSE"] = replay
        consts.setdefault("PLAN_GRAD", False)
        consts.setdefault("DEFER", flag == "SCALED" and replay)
        consts["ZREBUILD"] = rebuild                    # (as the launcher: half tiles)
        consts["SNAKE"] = launch.SNAKE_ORDER
        # W2's x is an NCHW feature map's view: its adjoints column-major, as x
        consts["NMAJOR"] = not ragged and D == 2048
    c = compile_sm90(kernel, signature(kernel, consts), consts,
                     num_warps=num_warps)
    assert ".target sm_90" in c.asm["ptx"]
    regs = spill = "?"
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
            f.write(c.asm["cubin"])
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
        line = [l for l in out.splitlines() if "REG:" in l][0]
        regs = int(line.split("REG:")[1].split()[0])
        spill = int(line.split("LOCAL:")[1].split()[0])
    # cuobjdump's LOCAL misses spills to the stack; ptxas -v counts both
    stack = ptxas_usage(c)["spill_bytes"]
    print(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, D, N, quad, paper,
          replay, flag, "one-pass" if one_pass else "",
          "zbar rebuilt" if consts.get("ZREBUILD") else "", (BN, BD, BV, num_warps), "spill",
          stack, "regs", regs, "local", spill)
for quad, paper in [(False, False), (True, True), (True, False)]:
    consts = dict(QUAD=m.quad_flag(quad, paper), PAPER=paper, BT=16, BI=128)
    sig = {"w_ptr": "*fp32", "gw_ptr": "*fp32", "gwt_ptr": "*fp32", "dw_ptr": "*fp32",
           "B": "i32", "T": "i32", "NPART": "i32",
           "QUAD": "constexpr", "PAPER": "constexpr", "BT": "constexpr", "BI": "constexpr"}
    c = compile_sm90(m.badmm_dw_kernel, sig, consts, num_warps=4)
    assert ".target sm_90" in c.asm["ptx"]
    print("badmm_dw_kernel", quad, paper, "compiled")
"""


def test_aot_compile_sm90():
    """Every kernel compiles for sm_90 (H100) with the GPU compiler at realistic sizes
    (D = 128 and 2048, both methods and variants, dense and ragged, both forward and both
    backward schedules, the fused one with a plan gradient and deferring without, and W2 with
    the layers' feature scale folded in: SCALED; the forward at 16 warps on 2,048 tiles,
    launch.forward_block_sizes; the dense unfused backward at 16 warps on half tiles,
    launch.unfused_backward_block_sizes; ragged B-E and B-Q unfused rebuilding Z̄':
    ZREBUILD, launch.rebuild_block_sizes); register use is printed and nothing spills (ptxas
    -v, stack included), with triton 3.9 and 3.6 (the H200 image's) alike."""
    out = run_without_interpreter(AOT_CODE, timeout=900)
    lines = [l for l in out.splitlines() if "regs" in l]
    print("\n".join(lines))
    assert len(lines) == 22
    assert sum("zbar rebuilt" in l for l in lines) == 5
    assert sum("one-pass" in l for l in lines) == 2
    for l in lines:
        if "local ?" not in l:
            assert l.endswith("local 0"), l
        assert " spill 0 " in l, l                # ptxas -v: no spills, stack included
    assert sum(l.startswith("badmm_fwd_kernel") and ", 16) spill" in l for l in lines) == 7
    # the dense unfused backwards (W2's four, PLAN_GRAD and SCALED) at 16 warps from 3.9 on
    assert sum(l.startswith("badmm_bwd_kernel") and ", 16) spill" in l
               for l in lines) == (4 if launch.FRUGAL_REGISTERS else 0)


SPLIT_AOT_CODE = r"""
import os, subprocess, tempfile, collections, re
import triton
from aot import compile_sm90
from rotp_triton.ops.rot.triton.badmm import split_kernels as s, launch
from rotp_triton.ops.rot.triton.badmm import split_backward_kernels as sb

FP32 = ("u_p0", "u_q0")
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

def signature(kernel, consts):
    ptrs = {"x_ptr": "*fp16", "ptr_ptr": "*i64"}
    return {n: "constexpr" if n in consts else ptrs.get(n, "*fp32") if n.endswith("_ptr")
            else "fp32" if n in FP32 else "i32" for n in kernel.arg_names}

for name, D, N, quad, paper, ragged in [("W1", 100, 500, False, False, False),
                                        ("W5", 128, 0, True, True, True),
                                        ("W5", 128, 0, False, True, True)]:
    BN, BD, BV, num_warps = launch.block_sizes(N, D)
    common = dict(RAGGED=ragged, HAS_P0=True, HAS_Q0=True, QUAD=quad, KV=4 if paper else 2,
                  SCALED=ragged)     # W5 with the layers' feature scale folded in
    zr = launch.backward_rebuilds_zbar(True)   # Z̄' rebuilt (pass 3; pass 2 unfused)
    fz = launch.split_backward_fuses(zr)       # pass 3 sums pass 2's L̄', Z̄' part
    # the backward on half tiles where it rebuilds (as the launcher)
    BNb, BDb = launch.backward_block_sizes(N, D)[:2] if zr else (BN, BD)
    bwd = dict(common, PAPER=paper, FUSE=fz, ZREBUILD=zr, BN=BNb, BD=BDb)
    # with a plan gradient, the rebuild reads P̄ in every step (pass 2 unfused: the other
    # schedule, bench/gpu_tune.py)
    plan_rebuilds = [(sb.badmm_split_bwd_pass2_kernel, dict(bwd, PLAN=False, GPLAN=True,
                                                             FUSE=False)),
                     (sb.badmm_split_bwd_pass3_kernel, dict(bwd, ADJ=1, PLAN=True))] if zr \
        else []
    for kernel, consts in [
            (s.badmm_split_column_lse_kernel, dict(common, PAPER=paper, REPLAY=True,
                                                   POOL=True, BN=BN, BD=BD)),
            (s.badmm_split_column_lse_kernel, dict(common, PAPER=paper, REPLAY=False,
                                                   POOL=False, BN=BN, BD=BD)),
            (s.badmm_split_init_state_kernel, dict(RAGGED=ragged, HAS_P0=True, HAS_Q0=True,
                                                   BN=BN, BD=BD)),
            (s.badmm_split_column_step_kernel, dict(RAGGED=ragged, HAS_P0=True, QUAD=quad,
                                                    PAPER=paper, KV=common["KV"], POOL=True,
                                                    SCALED=ragged, BV=BV)),
            (s.badmm_split_row_lse_kernel, dict(common, PAPER=paper, REPLAY=True, BN=BN,
                                                BD=BD)),
            (s.badmm_split_row_lse_kernel, dict(common, PAPER=paper, REPLAY=False, BN=BN,
                                                BD=BD)),
            (s.badmm_split_plan_kernel, dict(common, REPLAY=True, BN=BN, BD=BD)),
            (s.badmm_split_plan_kernel, dict(common, REPLAY=False, BN=BN, BD=BD)),
            (sb.badmm_split_bwd_rows_step_kernel, dict(RAGGED=ragged, HAS_P0=True,
                                                       HAS_Q0=True, QUAD=quad, KV=common["KV"],
                                                       PAPER=paper, ZREBUILD=zr, BV=BV)),
            (sb.badmm_split_bwd_cols_step_kernel, dict(RAGGED=ragged, HAS_P0=True, QUAD=quad,
                                                       PAPER=paper, ZREBUILD=zr, BV=BV)),
            (sb.badmm_split_bwd_pass2_kernel, dict(bwd, PLAN=False, GPLAN=False)),
            (sb.badmm_split_bwd_pass2_kernel, dict(bwd, PLAN=True, GPLAN=True)),
            (sb.badmm_split_bwd_pass3_kernel, dict(bwd, ADJ=1, PLAN=False)),
            (sb.badmm_split_bwd_pass3_kernel, dict(bwd, ADJ=0, PLAN=True)),
            (sb.badmm_split_bwd_init_kernel, dict(RAGGED=ragged, HAS_P0=True, HAS_Q0=True,
                                                  PAPER=paper, SCALED=ragged, BN=BNb, BD=BDb,
                                                  BV=BV))] + plan_rebuilds:
        c = compile_sm90(kernel, signature(kernel, consts), consts, num_warps=num_warps)
        assert ".target sm_90" in c.asm["ptx"]
        regs = spill = nins = "?"
        cuobjdump = os.path.join(BIN, "cuobjdump")
        if os.path.exists(cuobjdump):
            with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
                f.write(c.asm["cubin"])
            out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name],
                                 capture_output=True, text=True).stdout
            line = [l for l in out.splitlines() if "REG:" in l][0]
            regs = int(line.split("REG:")[1].split()[0])
            spill = int(line.split("LOCAL:")[1].split()[0])
            sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", f.name],
                                  capture_output=True, text=True).stdout
            nins = len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+[^;]*;", sass))
        kname = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        print("split", name, kname, consts.get("PLAN", ""), consts.get("REPLAY", ""),
              "zbar rebuilt" if consts.get("ZREBUILD") else "",
              (consts.get("BN"), consts.get("BD"), BV, num_warps), "sass",
              nins, "regs", regs, "local", spill)
"""


def test_aot_compile_split_sm90():
    """The split forward's eight and backward's seven kernel configurations compile for sm_90 at
    W1 (dense B-E exact, D = 100) and W5 (ragged B-Q and B-E paper, D = 128, with the feature
    scale folded in: SCALED) configurations - the backward rebuilding Z̄' (ZREBUILD), also
    with a plan gradient (two more) - no spills; SASS size and registers are printed
    (bench/results/badmm_v2_*.md)."""
    out = run_without_interpreter(SPLIT_AOT_CODE, timeout=900)
    lines = [l for l in out.splitlines() if l.startswith("split")]
    print("\n".join(lines))
    assert len(lines) == 51
    assert sum("zbar rebuilt" in l for l in lines) == 3 * 8
    for l in lines:
        if "local ?" not in l:
            assert l.endswith("local 0"), l


# --------------------------------------------------------------------------------------------
# custom operator and torch.compile
# --------------------------------------------------------------------------------------------
def test_opcheck_custom_op():
    """torch.library.opcheck of the forward op: schema, autograd registration, fake tensor."""
    if op.badmm_fwd_op is None:
        pytest.skip("torch has no torch.library.triton_op")
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 4, generator=gen).to(DEVICE).requires_grad_()
    w = torch.tensor([[0.0, 0.0], [0.9, 1.1], [2.0, math.inf], [0.5, 3.0], [1.0, 1.3],
                      [0.0, 0.0]], device=DEVICE, requires_grad=True)
    lp0 = torch.log_softmax(torch.randn(2, 4, generator=gen), -1).to(DEVICE)
    torch.library.opcheck(op.badmm_fwd_op, (x, None, w, lp0, None, True, False, True),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


@pytest.mark.parametrize("ragged,split", [(False, False), (True, False), (False, True)],
                         ids=["dense", "ragged", "dense-split"])
def test_torch_compile_fullgraph(ragged, split, monkeypatch):
    """torch.compile(fullgraph=True) of rt.rot_pool(method="badmm-e", backend="triton")
    traces without graph breaks and reproduces the eager y and gradients (x, a (T,) ρ). Under
    the interpreter the graph runs on the "eager" backend, on CUDA on inductor."""
    if op.badmm_fwd_op is None:
        pytest.skip("torch has no torch.library.triton_op")
    gen = torch.Generator().manual_seed(12)
    if ragged:
        x = torch.randn(7, 3, generator=gen).to(DEVICE)
        ptr = torch.tensor([0, 3, 3, 7]).to(DEVICE)
    else:  # the split case: 2 x 2 slices of [16, 16] tiles per set, in eager and compiled
        x = torch.randn(2, *((20, 18) if split else (4, 3)), generator=gen).to(DEVICE)
        ptr = None
    rho = torch.tensor([0.7, 1.2], device=DEVICE)
    if split:
        calls = _split(monkeypatch, 2, 2)
        _small_blocks(monkeypatch)

    def f(x, rho):
        return rt.rot_pool(x, ptr=ptr, method="badmm-e", num_iters=2, a1=0.8, a2=2.0,
                           a3=math.inf, rho=rho, backend="triton")

    def run(fn):
        xl, rl = x.clone().requires_grad_(), rho.clone().requires_grad_()
        y = fn(xl, rl)
        cot = torch.arange(y.numel(), device=DEVICE, dtype=y.dtype).reshape(y.shape)
        return (y,) + torch.autograd.grad((y * cot).sum(), [xl, rl])

    eager = run(f)
    torch._dynamo.reset()
    compiled = run(torch.compile(f, fullgraph=True, backend="inductor" if ON_CUDA else "eager"))
    for a, b in zip(compiled, eager):
        assert float((a - b).norm() / b.norm()) <= 1e-6
    if split:
        assert set(calls) >= {"_forward_split", "_backward_split"}, calls
