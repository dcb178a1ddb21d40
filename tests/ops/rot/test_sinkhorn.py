"""The fused Sinkhorn (α0 = 0) Triton kernels (``ops/rot/triton/sinkhorn``) against the float64
reference oracle.

By default the kernels run under the Triton interpreter on CPU (conftest sets TRITON_INTERPRET);
``ROTP_TEST_DEVICE=cuda`` runs the same tests on the GPU and adds fp16/bf16. Every comparison is
with ``reference.rot.rot_pool_sets`` on float64 copies of the same inputs, forward and the
gradients for x, every (T,) weight, p0, q0 and (with ``return_plan``) the plan.

Tolerances (relative error ‖a - b‖ / ‖b‖): fp32 1e-4 (``kernel_utils.RTOL``), except at
α1 = 1e-5 of the Fig. 7 grid, where the problem itself amplifies the fp32 rounding of x/ε
(|x|/ε ≈ 1e5, so one ulp of x/ε is ≈ 1e-2 in the exponent of a near-argmax softmax): 3e-3.
fp16/bf16 (GPU only): ``RTOL`` (2e-2 / 5e-2) against the reference evaluated on the rounded input.
"""
import math

import pytest
import torch

import rotp_triton as rt
from kernel_utils import DEVICE, KERNEL_DTYPES, ON_CUDA, RTOL, rel_err
from reference.rot import rot_pool_sets

pytest.importorskip("triton")


def _weights(T, gen, inf_a2=False):
    a1 = (0.5 + torch.rand(T, generator=gen, dtype=torch.float64))
    a2 = (0.3 + 2 * torch.rand(T, generator=gen, dtype=torch.float64))
    a3 = (0.3 + 2 * torch.rand(T, generator=gen, dtype=torch.float64))
    if inf_a2:
        a2[0] = math.inf
    return a1, a2, a3


def _run_kernel(x, ptr, variant, T, a1, a2, a3, p0, q0, cy, cp, dtype=torch.float32,
                backend="triton"):
    """rot_pool on the Triton backend (or ``backend``); returns y, plan and the grads of
    <cy, y> + <cp, plan>."""
    xk = x.detach().to(DEVICE, dtype).requires_grad_()
    leaves = [xk]
    ws = []
    for w in (a1, a2, a3):
        wk = w.detach().to(DEVICE, torch.float32).requires_grad_()
        ws.append(wk)
        leaves.append(wk)
    pk = qk = None
    if p0 is not None:
        pk = p0.detach().to(DEVICE, torch.float32).requires_grad_()
        leaves.append(pk)
    if q0 is not None:
        qk = q0.detach().to(DEVICE, torch.float32).requires_grad_()
        leaves.append(qk)
    y, plan = rt.rot_pool(xk, ptr=None if ptr is None else ptr.to(DEVICE), method="sinkhorn",
                          variant=variant, num_iters=T, a1=ws[0], a2=ws[1], a3=ws[2], p0=pk,
                          q0=qk, backend=backend, return_plan=True)
    loss = (y.float() * cy.to(DEVICE)).sum()
    if cp is not None:
        loss = loss + (plan.float() * cp.to(DEVICE)).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return y, plan, grads


def _run_reference(x, ptr, variant, T, a1, a2, a3, p0, q0, cy, cp):
    """The oracle in float64 on the same inputs (x rounded to its dtype first)."""
    x64 = x.detach().double().cpu().requires_grad_()
    leaves = [x64]
    ws = [w.detach().double().cpu().requires_grad_() for w in (a1, a2, a3)]
    leaves += ws
    p64 = q64 = None
    if p0 is not None:
        p64 = p0.detach().double().cpu().requires_grad_()
        leaves.append(p64)
    if q0 is not None:
        q64 = q0.detach().double().cpu().requires_grad_()
        leaves.append(q64)
    if ptr is None:
        xs = list(x64)
        q0s = None if q64 is None else q64.reshape(-1)
    else:
        bounds = ptr.tolist()
        xs = [x64[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]
        q0s = q64
    y, plans = rot_pool_sets(xs, p0s=p64, q0s=q0s, method="sinkhorn", variant=variant,
                             num_iters=T, a1=ws[0], a2=ws[1], a3=ws[2])
    plan = torch.stack(plans) if ptr is None else torch.cat(plans)
    loss = (y * cy.double()).sum()
    if cp is not None:
        loss = loss + (plan * cp.double()).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return y, plan, grads


def _compare(k, r, tol, names):
    yk, pk, gk = k
    yk, pk = yk.detach(), pk.detach()
    yr, pr, gr = r
    assert rel_err(yk, yr) <= tol, f"y: {rel_err(yk, yr):.3g}"
    assert rel_err(pk, pr) <= tol, f"plan: {rel_err(pk, pr):.3g}"
    for name, a, b in zip(names, gk, gr):
        if b is None or float(b.norm()) == 0.0:
            assert a is None or float(a.detach().abs().max()) <= tol, name
            continue
        assert a is not None, name
        e = rel_err(a, b)
        assert e <= tol, f"grad {name}: {e:.3g}"


def _with_prior_and_cotangents(x, ptr, variant, T, weights, q0, B, D, gen):
    """The arguments of _run_kernel / _run_reference, with a random p0 (B, D) and random
    cotangents of y and of the plan drawn from ``gen``."""
    p0 = torch.rand(B, D, generator=gen) + 0.1
    cy = torch.randn(B, D, generator=gen)
    cp = torch.randn(x.shape, generator=gen)
    return (x, ptr, variant, T, *weights, p0, q0, cy, cp)


@pytest.fixture(params=["one_program", "split"])
def forward_iteration(request, monkeypatch):
    """Run the test with one program per set and with the split-set launches with blocks of 2
    rows (dense exact batches; ``launch.SPLIT_ROWS``, so that the cross-program combine runs on
    small shapes): both must give the reference's results."""
    from rotp_triton.ops.rot.triton.sinkhorn import launch
    monkeypatch.setattr(launch, "SPLIT_ROWS", 2 if request.param == "split" else None)
    return request.param


@pytest.fixture(params=["one_exp2", "two_exp2", "normalized"])
def reverse_form(request, monkeypatch):
    """Run the test with the exact reverse iterations in their one-exp2 form wherever its bound
    allows (the default, ``launch.ONE_EXP2_MAX_SHIFT``), with the two-exp2 form forced in every
    iteration, and with Q's rows and S's columns normalized in every iteration
    (``launch.NORM_MIN_KAPPA``, kernels._q_row_sums; by default only where κ3, κ2 > 0.75): all
    must give the reference's results."""
    _set_reverse_form(request.param, monkeypatch)
    return request.param


def _set_reverse_form(form, monkeypatch):
    """The launcher constants of ``reverse_form``'s form."""
    from rotp_triton.ops.rot.triton.sinkhorn import launch
    if form == "two_exp2":
        monkeypatch.setattr(launch, "ONE_EXP2_MAX_SHIFT", -1.0)
    if form == "normalized":
        monkeypatch.setattr(launch, "NORM_MIN_KAPPA", -1.0)


def _ragged_ptr(sizes):
    ptr = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(torch.tensor(sizes), 0)
    return ptr


# --------------------------------------------------------------------------------------------
# forward + gradients against the reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["exact", "paper"])
@pytest.mark.usefixtures("forward_iteration")
def test_dense_priors_plan_per_iteration_weights(variant):
    """Dense (B, N, D) = (2, 5, 3), T = 3 per-iteration weights (one a2 = inf), given p0, q0,
    a loss on y and on the plan: every gradient matches the reference."""
    gen = torch.Generator().manual_seed(1)
    B, N, D, T = 2, 5, 3, 3
    x = torch.randn(B, N, D, generator=gen)
    a1, a2, a3 = _weights(T, gen, inf_a2=True)
    p0 = torch.rand(B, D, generator=gen) + 0.1
    q0 = torch.rand(B, N, generator=gen) + 0.1
    cy = torch.randn(B, D, generator=gen)
    cp = torch.randn(B, N, D, generator=gen)
    args = (x, None, variant, T, a1, a2, a3, p0, q0, cy, cp)
    _compare(_run_kernel(*args), _run_reference(*args), RTOL[torch.float32],
             ["x", "a1", "a2", "a3", "p0", "q0"])


@pytest.mark.parametrize("variant", ["exact", "paper"])
def test_ragged_with_empty_and_singleton_sets(variant):
    """Ragged sets of sizes 3, 0, 1, 6 (D = 5): the empty set pools to 0 with zero gradient,
    no NaN anywhere; the others match the reference (uniform priors)."""
    gen = torch.Generator().manual_seed(2)
    sizes = [3, 0, 1, 6]
    D, T = 5, 2
    ptr = _ragged_ptr(sizes)
    x = torch.randn(sum(sizes), D, generator=gen)
    a1, a2, a3 = _weights(T, gen)
    cy = torch.randn(len(sizes), D, generator=gen)
    args = (x, ptr, variant, T, a1, a2, a3, None, None, cy, None)
    k = _run_kernel(*args)
    _compare(k, _run_reference(*args), RTOL[torch.float32], ["x", "a1", "a2", "a3"])
    y, plan, grads = k
    assert float(y[1].abs().max()) == 0.0
    assert all(torch.isfinite(g).all() for g in grads if g is not None)


def test_ragged_tile_choice(monkeypatch):
    """The ragged exact forward's tiles (``launch.ragged_tile``): the forward's tile budget over
    RAGGED_TILE_ROWS rows (W5: 128 features at 8 warps, 512 x 8, and the half tile); none for
    dense batches, the paper variant, or with RAGGED_TILE_ROWS = 0 (triton 3.6's default)."""
    from rotp_triton.ops.rot.triton.sinkhorn import launch
    monkeypatch.setattr(launch, "RAGGED_TILE_ROWS", 512)
    assert launch.ragged_tile(128, 8, True, False) == (512, 8, True)
    assert launch.ragged_tile(128, 4, True, False) == (512, 4, True)
    assert launch.ragged_tile(3, 8, True, False) == (512, 4, True)
    assert launch.ragged_tile(128, 8, False, False) == (0, 1, False)
    assert launch.ragged_tile(128, 8, True, True) == (0, 1, False)
    monkeypatch.setattr(launch, "RAGGED_HALF_TILE", False)
    assert launch.ragged_tile(128, 8, True, False) == (512, 8, False)
    monkeypatch.setattr(launch, "RAGGED_TILE_ROWS", 0)
    assert launch.ragged_tile(128, 8, True, False) == (0, 1, False)


@pytest.mark.parametrize("weights,form,few", [("per_iteration", "one_exp2", False),
                                              ("constant", "one_exp2", False),
                                              ("per_iteration", "two_exp2", False),
                                              ("constant", "normalized", False),
                                              ("per_iteration", "one_exp2", True)])
def test_ragged_sets_in_one_tile(weights, form, few, monkeypatch):
    """Ragged exact sets of RAGGED_TILE_ROWS / 2 < n <= RAGGED_TILE_ROWS rows run their
    iterations and reverse sweeps in one tile, those of RAGGED_TILE_ROWS / 4 < n <=
    RAGGED_TILE_ROWS / 2 in one half as tall (``launch.ragged_tile``; lowered to 8 here: sizes
    6, 8 and 5 take the first, 3 the second, 1 stays streamed, 0 is empty), in one launch each
    way; with priors, the plan and its gradient.
    Per-iteration weights (a2 = inf in one) run the tile's column-max branch; constant ones its
    fixed shifts from t = 1 on. The reverse sweeps in the one-exp2 form, the forced two-exp2
    form and with Q's rows and S's columns normalized (``reverse_form``). ``few``: fewer sets
    than SMs (64 stand in for the interpreter's 4), so both launches take
    launch.few_sets_launch's layout (16 warps, their own streamed tiles). All == the
    reference."""
    from launch_counter import count_launches
    from rotp_triton.ops.rot.triton.sinkhorn import launch
    monkeypatch.setattr(launch, "RAGGED_TILE_ROWS", 8)
    if few:
        monkeypatch.setattr(launch, "sm_count", lambda device: 64)
    _set_reverse_form(form, monkeypatch)
    gen = torch.Generator().manual_seed(29)
    sizes = [6, 0, 3, 8, 5, 1]
    D, T = 5, 4
    ptr = _ragged_ptr(sizes)
    x = torch.randn(sum(sizes), D, generator=gen)
    if weights == "constant":
        a1, a2, a3 = (torch.full((T,), v, dtype=torch.float64) for v in (0.8, 1.3, 0.6))
    else:
        a1, a2, a3 = _weights(T, gen, inf_a2=True)
    q0 = torch.rand(sum(sizes), generator=gen) + 0.1
    args = _with_prior_and_cotangents(x, ptr, "exact", T, (a1, a2, a3), q0, len(sizes), D, gen)
    with count_launches() as launches:
        k = _run_kernel(*args)
    warps = launch.FEW_SETS_WARPS if few else 4
    assert [(name, c.get("TILE_ROWS"), c.get("num_warps"))
            for name, c in zip(launches, launches.constexprs)
            if name.startswith("sinkhorn_")] == [("sinkhorn_fwd_kernel", 8, warps),
                                                  ("sinkhorn_bwd_kernel", 8, warps)]
    _compare(k, _run_reference(*args), RTOL[torch.float32], ["x", "a1", "a2", "a3", "p0", "q0"])
    assert float(k[0][1].abs().max()) == 0.0


def test_ragged_priors_exact():
    """Ragged with given p0 (B, D) and q0 (N_total,), exact variant, plan returned."""
    gen = torch.Generator().manual_seed(3)
    sizes = [4, 2, 7]
    D, T = 6, 3
    ptr = _ragged_ptr(sizes)
    x = torch.randn(sum(sizes), D, generator=gen)
    a1, a2, a3 = _weights(T, gen)
    p0 = torch.rand(len(sizes), D, generator=gen) + 0.1
    q0 = torch.rand(sum(sizes), generator=gen) + 0.1
    cy = torch.randn(len(sizes), D, generator=gen)
    cp = torch.randn(sum(sizes), D, generator=gen)
    args = (x, ptr, "exact", T, a1, a2, a3, p0, q0, cy, cp)
    _compare(_run_kernel(*args), _run_reference(*args), RTOL[torch.float32],
             ["x", "a1", "a2", "a3", "p0", "q0"])


@pytest.mark.parametrize("variant", ["exact", "paper"])
@pytest.mark.parametrize("ragged", [False, True], ids=["dense", "ragged_with_empty"])
@pytest.mark.parametrize("dx_by", ["pass", "split", "sweep"])
@pytest.mark.parametrize("layout", ["contiguous", "nchw_view"])
def test_backward_dx_tiles_with_edges(variant, ragged, dx_by, layout, reverse_form, monkeypatch):
    """The backward's dx on forced [2, 4] tiles (``launch.dx_tile``): several row blocks and
    feature chunks per set, a partial last block of each, no per-element mask (clamped reads,
    -inf exponents), written by the backward kernel's own pass, by the row-block launch
    (``split``, dense only: ``launch.split_dx``, ε terms by atomic adds) or by the last reverse
    sweep (``sweep``, dense exact only: ``launch.fuse_dx``). With priors and a plan. Ragged:
    sizes 3, 0, 5, so the empty set's prior gradient must come out zero (the parameter
    gradients start at zero, nothing is added for it). Exact: in the one-exp2 and the forced
    two-exp2 form (``reverse_form``). Dense: x contiguous and as the (B, HW, C) view of an
    NCHW map, whose exact backward packs the dx terms' row vectors (``launch.packed_rows``)."""
    from rotp_triton.ops.rot.triton.sinkhorn import launch
    if variant == "paper" and reverse_form != "one_exp2":
        pytest.skip("the paper variant has only the two-exp2 form, without normalization")
    if ragged and layout == "nchw_view":
        pytest.skip("a ragged batch has no NCHW view")
    if dx_by == "sweep" and (ragged or variant == "paper"):
        pytest.skip("dx is written by the reverse sweep only for dense exact batches")
    if dx_by == "split" and ragged:
        pytest.skip("the row-block dx launch is for dense batches")
    monkeypatch.setattr(launch, "dx_tile", lambda D_, N_, nw=4: (2, 4))
    monkeypatch.setattr(launch, "fuse_dx", lambda *args: dx_by == "sweep")
    monkeypatch.setattr(launch, "split_dx", lambda *args: dx_by == "split")
    gen = torch.Generator().manual_seed(16)
    D, T = 6, 3
    a1, a2, a3 = _weights(T, gen, inf_a2=True)
    if ragged:
        sizes = [3, 0, 5]
        ptr = _ragged_ptr(sizes)
        x = torch.randn(sum(sizes), D, generator=gen)
        q0 = torch.rand(sum(sizes), generator=gen) + 0.1
        B = len(sizes)
    else:
        ptr = None
        B, N = 2, 5
        if layout == "nchw_view":
            x = torch.randn(B, D, N, 1, generator=gen).flatten(2).transpose(1, 2)
            assert launch.packed_rows(N, 2, 0, variant == "paper", x.stride(1)) == 16 * (
                variant == "exact")
        else:
            x = torch.randn(B, N, D, generator=gen)
        q0 = torch.rand(B, N, generator=gen) + 0.1
    args = _with_prior_and_cotangents(x, ptr, variant, T, (a1, a2, a3), q0, B, D, gen)
    k = _run_kernel(*args)
    _compare(k, _run_reference(*args), RTOL[torch.float32], ["x", "a1", "a2", "a3", "p0", "q0"])
    if ragged:
        assert float(k[2][4][1].abs().max()) == 0.0  # dp0 of the empty set


def _fixed_order_launches(launches) -> list:
    """FIXED_ORDER of each backward / row-block dx launch recorded by count_launches."""
    return [c.get("FIXED_ORDER") for name, c in zip(launches, launches.constexprs)
            if name in ("sinkhorn_bwd_kernel", "sinkhorn_dx_kernel")]


@pytest.mark.parametrize("variant", ["exact", "paper"])
@pytest.mark.parametrize("path", ["split-dx", "ragged"])
def test_deterministic_algorithms_weight_grads_in_a_fixed_order(variant, path, deterministic,
                                                                 monkeypatch):
    """Under ``torch.use_deterministic_algorithms(True)`` the backward adds nothing atomically:
    its programs store their shares of the weight-table gradient and
    ``launch.sum_weight_grad_partials`` sums them in a fixed order (FIXED_ORDER). == the oracle
    where shares are added: the set kernel's (``kernels._add_weight_grad``; ragged, with an
    empty set, whose prior gradient stays zero) and the row-block dx launch's (three blocks a
    set; its final-log-P terms, and with the paper variant its x-scale terms, which belong to
    ε_{t-1})."""
    from launch_counter import count_launches
    from rotp_triton.ops.rot.triton.sinkhorn import launch
    monkeypatch.setattr(launch, "dx_tile", lambda D_, N_, nw=4: (2, 4))
    monkeypatch.setattr(launch, "fuse_dx", lambda *args: False)
    monkeypatch.setattr(launch, "split_dx", lambda *args: path == "split-dx")
    gen = torch.Generator().manual_seed(23)
    D, T = 6, 3
    a1, a2, a3 = _weights(T, gen)
    if path == "ragged":
        sizes = [3, 0, 5]
        ptr, B = _ragged_ptr(sizes), len(sizes)
        x = torch.randn(sum(sizes), D, generator=gen)
        q0 = torch.rand(sum(sizes), generator=gen) + 0.1
    else:
        ptr, B, N = None, 2, 5
        x = torch.randn(B, N, D, generator=gen)
        q0 = torch.rand(B, N, generator=gen) + 0.1
    args = _with_prior_and_cotangents(x, ptr, variant, T, (a1, a2, a3), q0, B, D, gen)
    with count_launches() as launches:
        k = _run_kernel(*args)
    assert _fixed_order_launches(launches) == [True] * (1 if path == "ragged" else 2)
    _compare(k, _run_reference(*args), RTOL[torch.float32], ["x", "a1", "a2", "a3", "p0", "q0"])
    if path == "ragged":
        assert float(k[2][4][1].abs().max()) == 0.0  # dp0 of the empty set


@pytest.mark.parametrize("variant", ["exact", "paper"])
def test_deterministic_algorithms_feature_scale(variant, deterministic, monkeypatch):
    """The layers' feature scale (``spread=True``) under deterministic algorithms, dx by the
    row-block launch: the paper variant's dx programs store their ∂/∂σ shares too (exact:
    σ's path is folded into the dx pass, ∂/∂σ complete in the set kernel, which stores it).
    Same gradients as the atomic path (itself == the oracle: test_feature_scale_folded_in)."""
    from launch_counter import count_launches
    from rotp_triton.ops.rot.params import A1, A2, A3
    from rotp_triton.ops.rot.triton.sinkhorn import launch
    from rotp_triton.ops.rot.triton.sinkhorn.op import sinkhorn_pool
    monkeypatch.setattr(launch, "dx_tile", lambda D_, N_, nw=4: (2, 4))
    monkeypatch.setattr(launch, "fuse_dx", lambda *args: False)
    monkeypatch.setattr(launch, "split_dx", lambda *args: True)
    gen = torch.Generator().manual_seed(29)
    T = 3
    a1, a2, a3 = _weights(T, gen)
    x = torch.randn(2, 5, 6, generator=gen) * 3 + 2
    table = torch.zeros(6, T)
    table[A1], table[A2], table[A3] = a1.float(), a2.float(), a3.float()
    cy = torch.randn(2, 6, generator=gen)
    grads = {}
    for fixed in (False, True):
        torch.use_deterministic_algorithms(fixed)
        xk, tk = x.to(DEVICE).requires_grad_(), table.to(DEVICE).requires_grad_()
        with count_launches() as launches:
            y, _ = sinkhorn_pool(xk, None, tk, None, None, variant=variant, return_plan=False,
                                 spread=True)
            grads[fixed] = torch.autograd.grad((y * cy.to(DEVICE)).sum(), [xk, tk])
        assert _fixed_order_launches(launches) == [fixed, fixed]
        dx_launch = launches.constexprs[launches.index("sinkhorn_dx_kernel")]
        assert dx_launch["SCALED"] and dx_launch["SPREAD"] == (variant == "exact")
    for name, a, b in zip(["x", "table"], grads[True], grads[False]):
        assert rel_err(a, b) <= RTOL[torch.float32], name


@pytest.mark.skipif(not ON_CUDA, reason="the order of atomic adds varies on a GPU only")
def test_deterministic_algorithms_bitwise_reproducible(deterministic):
    """On the GPU, two backward passes under deterministic algorithms give the same bits (many
    sets, each adding its share of the weight gradient)."""
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(300, 16, 32, generator=gen).to(DEVICE)
    w = {k: torch.rand(4, generator=gen).add(0.5).to(DEVICE) for k in ("a1", "a2", "a3")}
    runs = []
    for _ in range(2):
        xk = x.clone().requires_grad_()
        wk = {k: v.clone().requires_grad_() for k, v in w.items()}
        y = rt.rot_pool(xk, method="sinkhorn", num_iters=4, backend="triton", **wk)
        runs.append(torch.autograd.grad(y.square().sum(), [xk, *wk.values()]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(3, 1, 4), (2, 6, 1), (1, 1, 1)])
@pytest.mark.usefixtures("forward_iteration")
def test_degenerate_shapes(shape):
    """N = 1, D = 1 and a 1 × 1 set: forward and gradients (exact, T = 2)."""
    gen = torch.Generator().manual_seed(4)
    B, N, D = shape
    T = 2
    x = torch.randn(B, N, D, generator=gen)
    a1, a2, a3 = _weights(T, gen)
    cy = torch.randn(B, D, generator=gen)
    args = (x, None, "exact", T, a1, a2, a3, None, None, cy, None)
    _compare(_run_kernel(*args), _run_reference(*args), RTOL[torch.float32],
             ["x", "a1", "a2", "a3"])


@pytest.mark.parametrize("variant", ["exact", "paper"])
@pytest.mark.parametrize("one_tile", [True, False])
@pytest.mark.usefixtures("forward_iteration")
def test_strided_image_view_multi_tile(variant, one_tile):
    """(B, C, H, W) pooled over H·W through the (B, HW, C) strided view, with the tiles forced
    small: both kernel paths (all rows of a set in one tile with several feature chunks - one
    pass per iteration - and streamed [2, 2] tiles with the online LSE over tiles), forward and
    backward; the gradient comes back in the view's strides."""
    from rotp_triton.ops.rot.triton.sinkhorn import launch as tk
    gen = torch.Generator().manual_seed(5)
    B, C, H, W = 2, 5, 3, 3
    T = 2
    img = torch.randn(B, C, H, W, generator=gen)
    a1, a2, a3 = _weights(T, gen)
    cy = torch.randn(B, C, generator=gen)
    old_cfg = tk.fwd_config
    tk.fwd_config = lambda D, N, nw=4: (16, 2, True) if one_tile else (2, 2, False)
    old = tk.bwd_config
    tk.bwd_config = lambda D, N, nw=4, has_gp=False: (16, 2, True) if one_tile else (2, 2, False)
    try:
        imgk = img.to(DEVICE).requires_grad_()
        xv = imgk.flatten(2).transpose(1, 2)                                   # (B, HW, C)
        assert not xv.is_contiguous()
        y = rt.rot_pool(xv, method="sinkhorn", variant=variant, num_iters=T,
                        a1=a1.float().to(DEVICE), a2=a2.float().to(DEVICE),
                        a3=a3.float().to(DEVICE), backend="triton")
        (gimg,) = torch.autograd.grad((y * cy.to(DEVICE)).sum(), [imgk])
    finally:
        tk.bwd_config = old
        tk.fwd_config = old_cfg
    x = img.flatten(2).transpose(1, 2)
    yr, _, (gx_ref, *_rest) = _run_reference(x, None, variant, T, a1, a2, a3, None, None, cy,
                                             None)
    assert rel_err(y.detach(), yr) <= RTOL[torch.float32]
    assert rel_err(gimg.flatten(2).transpose(1, 2), gx_ref) <= RTOL[torch.float32]


@pytest.mark.parametrize("variant", ["exact", "paper"])
@pytest.mark.parametrize("N,D,BN,BD", [(8, 8, 8, 4), (8, 6, 8, 4), (5, 8, 8, 4)],
                         ids=["even", "edge_d", "edge_n"])
def test_lean_tile_edges(variant, N, D, BN, BD, monkeypatch):
    """The one-tile iteration's mask-free path (N == BN, D % BD == 0) and its edge paths (padded rows
    by a -inf bias, a last partial feature chunk) against the reference, forward and
    gradients, with a plan and priors."""
    from rotp_triton.ops.rot.triton.sinkhorn import launch
    monkeypatch.setattr(launch, "fwd_config", lambda D_, N_, nw=4: (BN, BD, True))
    monkeypatch.setattr(launch, "ROW_PIECES", False)  # the padded tile (row pieces: below)
    gen = torch.Generator().manual_seed(15)
    B, T = 2, 3
    x = torch.randn(B, N, D, generator=gen)
    a1, a2, a3 = _weights(T, gen, inf_a2=True)
    p0 = torch.rand(B, D, generator=gen) + 0.1
    q0 = torch.rand(B, N, generator=gen) + 0.1
    cy = torch.randn(B, D, generator=gen)
    cp = torch.randn(B, N, D, generator=gen)
    args = (x, None, variant, T, a1, a2, a3, p0, q0, cy, cp)
    _compare(_run_kernel(*args), _run_reference(*args), RTOL[torch.float32],
             ["x", "a1", "a2", "a3", "p0", "q0"])


def _pieces_problem(N, D, layout, seed):
    """_run_kernel / _run_reference arguments of two dense exact sets of N rows (contiguous,
    or the strided view of an NCHW map: rows contiguous), T = 3, priors, y and plan
    cotangents."""
    gen = torch.Generator().manual_seed(seed)
    B, T = 2, 3
    if layout == "nchw_view":
        x = torch.randn(B, D, N, 1, generator=gen).flatten(2).transpose(1, 2)  # (B, N, D)
    else:
        x = torch.randn(B, N, D, generator=gen)
    a1, a2, a3 = _weights(T, gen)
    p0 = torch.rand(B, D, generator=gen) + 0.1
    q0 = torch.rand(B, N, generator=gen) + 0.1
    cy = torch.randn(B, D, generator=gen)
    cp = torch.randn(B, N, D, generator=gen)
    return (x, None, "exact", T, a1, a2, a3, p0, q0, cy, cp)


@pytest.mark.parametrize("N,D,BD,pieces", [(7, 8, 4, (4, 2, 1)), (23, 6, 4, (16, 4, 4)),
                                           (13, 5, 2, (8, 4, 1))],
                         ids=["exact_rows", "padded_piece", "edge_d"])
@pytest.mark.parametrize("layout", ["contiguous", "nchw_view"])
@pytest.mark.parametrize("dx_by", ["pass", "sweep"])
def test_row_pieces(N, D, BD, pieces, layout, dx_by, reverse_form, monkeypatch):
    """The exact forward and reverse sweeps with a set's rows in three power-of-two pieces
    (launch.row_pieces, W2's 49 = 32 + 16 + 1): pieces that cover N exactly, a last piece with
    padded rows, a last partial feature chunk; contiguous and the strided NCHW view; dx by the
    backward's own pass or by the last reverse sweep; forward and gradients against the
    reference, with a plan and priors; the reverse iterations in both forms (``reverse_form``)."""
    from rotp_triton.ops.rot.triton.sinkhorn import launch
    BN = launch.next_pow2(N)
    monkeypatch.setattr(launch, "fwd_config", lambda D_, N_, nw=4: (BN, BD, True))
    monkeypatch.setattr(launch, "bwd_config",
                        lambda D_, N_, nw=4, has_gp=False: (BN, 2 * BD, True))
    monkeypatch.setattr(launch, "fuse_dx", lambda *args: dx_by == "sweep")
    monkeypatch.setattr(launch, "split_dx", lambda *args: False)
    assert launch.row_pieces(N, BN, True, False) == pieces
    args = _pieces_problem(N, D, layout, 16)
    _compare(_run_kernel(*args), _run_reference(*args), RTOL[torch.float32],
             ["x", "a1", "a2", "a3", "p0", "q0"])


# RL = 1 to 8 in the default form; the forced reverse forms (reverse_form) at RL = 4
@pytest.mark.parametrize("rl,form", [(1, "one_exp2"), (2, "one_exp2"), (4, "one_exp2"),
                                     (8, "one_exp2"), (4, "two_exp2"), (4, "normalized")])
@pytest.mark.parametrize("N,D,BD,pieces", [(7, 8, 4, (4, 2, 1)), (23, 6, 4, (16, 4, 4)),
                                           (13, 5, 2, (8, 4, 1))],
                         ids=["exact_rows", "padded_piece", "edge_d"])
@pytest.mark.parametrize("layout", ["contiguous", "nchw_view"])
def test_row_pieces_lanes(N, D, BD, pieces, layout, rl, form, monkeypatch):
    """The row-pieces forward and the reverse sweeps that do not write dx with each piece as
    [P / RL, BD, RL] tiles, RL lanes a column (kernels._lanes_layout, _lanes_bwd_sweep;
    launch.pieces_fwd_launch, pieces_bwd_lanes) at RL = 1 to 8: pieces narrower than RL (a
    middle one, whose extra lanes hold the next piece's rows, masked: (4, 2, 1) at RL = 4) and
    padded last pieces; the NCHW view's rows as immediates of the loads (UNIT_N), the
    contiguous sets' as row pointers; full and partial feature chunks; the reverse iterations
    in every form (``reverse_form``'s, at RL = 4: the lanes sweeps take the S form, the others
    the [P, BD] pieces; dx the S or the two-exp2 form); dx then by its own launch. The NCHW view without a plan cotangent (W2's case: the
    final adjoint and dx in lanes too, _lanes_pool_adjoint, _lanes_dx), the contiguous sets
    with one. Forward, plan and gradients against the reference."""
    from launch_counter import count_launches
    from rotp_triton.ops.rot.triton.sinkhorn import launch
    BN = launch.next_pow2(N)
    monkeypatch.setattr(launch, "fwd_config", lambda D_, N_, nw=4: (BN, BD, True))
    monkeypatch.setattr(launch, "PIECES_FWD_ROW_LANES", rl)
    monkeypatch.setattr(launch, "PIECES_FWD_BD", BD)
    monkeypatch.setattr(launch, "PIECES_BWD_ROW_LANES", rl)
    _set_reverse_form(form, monkeypatch)
    assert launch.row_pieces(N, BN, True, False) == pieces
    args = _pieces_problem(N, D, layout, 17)
    if layout == "nchw_view":
        args = args[:-1] + (None,)
    with count_launches() as launches:
        got = _run_kernel(*args)
    ce = launches.constexprs[launches.index("sinkhorn_fwd_kernel")]
    assert (ce["RL"], ce["BD"], ce["UNIT_N"]) == (rl, BD, layout == "nchw_view")
    ce = launches.constexprs[launches.index("sinkhorn_bwd_kernel")]
    assert (ce["RL"], ce["UNIT_N"], ce["FUSE_DX"], ce["SPLIT_DX"], ce["HAS_GP"]) == (
        rl, layout == "nchw_view", False, True, layout != "nchw_view")
    # dx by feature blocks in lanes where there is no plan gradient (kernels._lanes_dx)
    ce = launches.constexprs[launches.index("sinkhorn_dx_kernel")]
    assert ce["RL"] == (rl if layout == "nchw_view" else 0)
    _compare(got, _run_reference(*args), RTOL[torch.float32],
             ["x", "a1", "a2", "a3", "p0", "q0"])


@pytest.mark.parametrize("rl", [2, 4])
@pytest.mark.parametrize("hw", [(7, 1), (23, 1)], ids=["pieces", "padded_piece"])
def test_row_pieces_lanes_feature_spread(hw, rl, monkeypatch):
    """The layers' scale="auto" on an NCHW map with row pieces at RL > 1 lanes a column: the
    forward kernel forms each set's feature spread σ on the [P / RL, BD, RL] pieces
    (kernels._pieces_spread; the masked rows zeroed) and pools x / σ; the backward's sweeps
    in lanes too, and dx with the path through σ by its own launch (SPREAD, SPLIT_DX: W2's
    backward). One channel is 0 everywhere (a dead ReLU channel: the spread's fast pass adds
    it as 0, without the scaled fallback). y and ∂/∂x == the torch path's (float32, 1e-4)."""
    from launch_counter import count_launches
    from rotp_triton.ops.rot.triton.sinkhorn import launch
    monkeypatch.setattr(launch, "PIECES_FWD_ROW_LANES", rl)
    monkeypatch.setattr(launch, "PIECES_BWD_ROW_LANES", rl)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 12, *hw, generator=gen) * 2 + 1
    x[:, 3] = 0.0
    outs = []
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        layer = rt.AdaptiveROTPool2d(12, method="sinkhorn", num_iters=3, backend=backend)
        xl = x.clone().to(DEVICE).requires_grad_()
        with count_launches() as launches:
            y = layer(xl)
        if backend == "triton":
            ce = launches.constexprs[launches.index("sinkhorn_fwd_kernel")]
            assert ce["STATS"] and ce["UNIT_N"] and ce["RL"] == rl and ce["P0"] > 0
        w = torch.linspace(-1, 1, y.numel()).view(y.shape).to(y)
        with count_launches() as launches:
            (gx,) = torch.autograd.grad((y * w).sum(), xl)
        if backend == "triton":
            ce = launches.constexprs[launches.index("sinkhorn_bwd_kernel")]
            assert (ce["RL"], ce["SPREAD"], ce["SPLIT_DX"]) == (rl, True, True)
            assert launches.constexprs[launches.index("sinkhorn_dx_kernel")]["RL"] == rl
        outs.append((y.double().cpu(), gx.double().cpu()))
    (yk, gk), (yt, gt) = outs
    assert rel_err(yk, yt) <= RTOL[torch.float32], rel_err(yk, yt)
    assert rel_err(gk, gt) <= RTOL[torch.float32], rel_err(gk, gt)


def test_row_pieces_forward_layout_choice(monkeypatch):
    """The row-pieces forward's layout (launch.pieces_fwd_launch -> BD, RL, UNIT_N, warps,
    register cap): W2's 49 contiguous rows in lanes, RL = 4 (13 fp32 a thread, 64 features a
    chunk, 8 warps under the 128-register cap); strided rows, sets that would need more than 4
    lanes a column (81 rows) and triton 3.6 (PIECES_FWD_LANES off) one row a lane, 4 fp32 a
    thread; a narrow D fewer warps, uncapped."""
    from rotp_triton.ops.rot.triton.sinkhorn import launch
    monkeypatch.setattr(launch, "PIECES_FWD_LANES", True)
    w2 = (2048, (32, 16, 1), 32)
    assert launch.pieces_fwd_launch(*w2, True) == (64, 4, True, 8, 128)
    assert launch.pieces_fwd_launch(*w2, False) == (16, 1, False, 8, 128)
    assert launch.pieces_fwd_launch(2048, (16, 8, 1), 64, True) == (128, 2, True, 8, 128)
    assert launch.pieces_fwd_launch(2048, (64, 16, 1), 16, True) == (8, 1, False, 8, 128)
    assert launch.pieces_fwd_launch(16, (32, 16, 1), 32, True) == (16, 4, True, 2, 255)
    monkeypatch.setattr(launch, "PIECES_FWD_LANES", False)
    assert launch.pieces_fwd_launch(*w2, True) == (16, 1, False, 8, 128)


def test_row_pieces_backward_lanes_choice(monkeypatch):
    """The row-pieces backward's lanes (launch.pieces_bwd_lanes -> RL, UNIT_N, BDP): W2's 49
    contiguous rows without a plan gradient at RL = 4, 64 features a chunk of 8 warps (with
    any triton: 3.6 builds the sweeps uncapped, and the dx launch under 128 registers instead
    of 80); not with strided rows, a plan gradient, more than 64 rows or PIECES_BWD_LANES off;
    PIECES_BWD_ROW_LANES forces RL (a narrow D: a chunk of its features)."""
    from rotp_triton.ops.rot.triton.common import FRUGAL_REGISTERS
    from rotp_triton.ops.rot.triton.sinkhorn import launch
    assert launch.PIECES_BWD_LANES
    assert launch.PIECES_DX_MAX_REGISTERS == (80 if FRUGAL_REGISTERS else 128)
    w2 = (2048, (32, 16, 1), 8)
    assert launch.pieces_bwd_lanes(*w2, True, False) == (4, True, 64)
    assert launch.pieces_bwd_lanes(2048, (16, 8, 1), 8, True, False) == (2, True, 128)
    assert launch.pieces_bwd_lanes(*w2, False, False) == (0, False, 0)
    assert launch.pieces_bwd_lanes(*w2, True, True) == (0, False, 0)
    assert launch.pieces_bwd_lanes(2048, (64, 16, 1), 8, True, False) == (0, False, 0)
    monkeypatch.setattr(launch, "PIECES_BWD_ROW_LANES", 8)
    assert launch.pieces_bwd_lanes(6, (4, 2, 1), 8, False, True) == (8, False, 8)
    monkeypatch.setattr(launch, "PIECES_BWD_ROW_LANES", 0)
    monkeypatch.setattr(launch, "PIECES_BWD_LANES", False)
    assert launch.pieces_bwd_lanes(*w2, True, False) == (0, False, 0)


def test_row_pieces_choice():
    """W2's 49 rows take three pieces without padding, W1's 500 keep the padded tile (pieces
    would pad to 512 as well), a power of two and the paper variant never take pieces."""
    from rotp_triton.ops.rot.triton.sinkhorn import launch
    assert launch.row_pieces(49, 64, True, False) == (32, 16, 1)
    assert launch.row_pieces(500, 512, True, False) == (0, 0, 0)
    assert launch.row_pieces(64, 64, True, False) == (0, 0, 0)
    assert launch.row_pieces(49, 64, True, True) == (0, 0, 0)
    assert launch.row_pieces(None, 64, False, False) == (0, 0, 0)


def test_few_large_sets_choice(monkeypatch):
    """Fewer sets than SMs with at least FEW_SETS_MIN_ROWS rows in one tile run FEW_SETS_WARPS
    warps under the registers a CTA of that size may hold (W1: 500 x 100 on 132 SMs); many
    sets, small sets and row pieces keep the launcher's layout; ragged sets take it in the
    exact forward and backward where their one-tile classes are on (W5: 128 sets)."""
    from rotp_triton.ops.rot.triton.sinkhorn import launch
    w1 = (50, 132, 500, 100, True, (0, 0, 0))
    elems = launch.FEW_SETS_FWD_ELEMS
    assert launch.few_sets_launch(*w1, True) == (512, elems * 32 * 16 // 512, 16, 128)
    elems = launch.FEW_SETS_BWD_ELEMS
    assert launch.few_sets_launch(*w1, False) == (512, elems * 32 * 16 // 512, 16, 128)
    assert launch.few_sets_launch(*w1, False, True) == (512, elems // 2 * 32 * 16 // 512, 16,
                                                         128)
    assert launch.few_sets_launch(132, *w1[1:], True) is None
    assert launch.few_sets_launch(50, 132, 255, 100, True, (0, 0, 0), True) is None
    assert launch.few_sets_launch(50, 132, 300, 100, True, (256, 32, 16), True) is None
    # ragged: the exact forward and backward (their one-tile classes on) take the warps, the
    # streamed tiles at FEW_SETS_FWD_ELEMS / FEW_SETS_RAGGED_BWD_ELEMS fp32 a thread (with a
    # plan gradient too); not the paper variant
    monkeypatch.setattr(launch, "RAGGED_TILE_ROWS", 512)
    ragged = (128, 132, None, 100, False, (0, 0, 0))
    rows = launch.FEW_SETS_FWD_ELEMS * 32 * 16 // 128
    assert launch.few_sets_launch(*ragged, True) == (rows, 128, 16, 128)
    assert launch.few_sets_launch(*ragged, True, paper=True) is None
    rows = launch.FEW_SETS_RAGGED_BWD_ELEMS * 32 * 16 // 128
    assert launch.few_sets_launch(*ragged, False) == (rows, 128, 16, 128)
    assert launch.few_sets_launch(*ragged, False, True) == (rows, 128, 16, 128)
    assert launch.few_sets_launch(*ragged, False, paper=True) is None
    assert launch.few_sets_elems(False, True, True) == launch.FEW_SETS_RAGGED_BWD_ELEMS
    monkeypatch.setattr(launch, "RAGGED_TILE_ROWS", 0)
    assert launch.few_sets_launch(*ragged, True) is None
    assert launch.few_sets_launch(*ragged, False) is None


@pytest.mark.parametrize("variant", ["exact", "paper"])
def test_few_large_sets_layout_matches_reference(variant, monkeypatch):
    """Two sets of 480 rows (fewer than the SMs; under the interpreter 4; too many rows for
    row pieces): the forward and the backward take launch.few_sets_launch's layout (480 rows
    in a 512-row tile, 6 features in chunks: masked rows and a partial chunk) and match the
    reference, plan and its gradient included. The weights' gradients sum over N·D·T terms
    with cancellation: their fp32 rounding at 480 rows reaches 1.1e-4 (a2, paper, seed 17) and
    2.1e-4 (a3, seed 18) in this layout and in the launcher's other one alike (measured), so
    they are held to 1e-3; y, the plan, x and p0 to the fp32 tolerance."""
    from rotp_triton.ops.rot.triton.sinkhorn import launch
    seen = []
    real = launch.few_sets_launch

    def spy(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]
    monkeypatch.setattr(launch, "few_sets_launch", spy)
    gen = torch.Generator().manual_seed(17)
    B, N, D, T = 2, 480, 6, 2
    x = torch.randn(B, N, D, generator=gen)
    args = _with_prior_and_cotangents(x, None, variant, T, _weights(T, gen), None, B, D, gen)
    (yk, pk, gk), (yr, pr, gr) = _run_kernel(*args), _run_reference(*args)
    _compare((yk, pk, gk[::4]), (yr, pr, gr[::4]), RTOL[torch.float32], ["x", "p0"])
    for name, a, b in zip(["a1", "a2", "a3"], gk[1:4], gr[1:4]):
        assert rel_err(a, b) <= 1e-3, name
    assert len(seen) == 2 and all(f is not None and f[2] == launch.FEW_SETS_WARPS
                                  for f in seen), seen


@pytest.mark.parametrize("layout,unit", [("contiguous", True), ("nchw_view", True),
                                         ("every_other_feature", False)])
def test_row_pieces_backward_cap_needs_a_unit_stride(layout, unit, monkeypatch):
    """The row-pieces backward takes its register-capped layout (a quarter of the elements a
    thread, launch.PIECES_BWD_MAX_REGISTERS) only where the JIT specialises a stride of 1 of x:
    compiled without that specialisation it spills (32 B at W2, the AOT test's generic
    strides). W2's choices, and the launcher's reading of the strides on a real call."""
    from rotp_triton.ops.rot.triton.sinkhorn import launch
    monkeypatch.setattr(launch, "PIECES_BWD_CAPPED", True)
    w2 = (2048, (32, 16, 1), 64, 8)
    assert launch.pieces_bwd_launch(*w2, False, True) == (16, 8, 128)
    assert launch.pieces_bwd_launch(*w2, False, False) == (64, 8, launch.MAX_REGISTERS)
    assert launch.pieces_bwd_launch(2048, (32, 16, 1), 32, 8, True, True) == (8, 8, 128)
    monkeypatch.setattr(launch, "PIECES_BWD_CAPPED", False)
    assert launch.pieces_bwd_launch(*w2, False, True) == (64, 8, launch.MAX_REGISTERS)
    monkeypatch.setattr(launch, "PIECES_BWD_CAPPED", True)
    seen = []
    real = launch.pieces_bwd_launch

    def spy(D, pieces, BD, nw, has_gp, unit_stride):
        seen.append(unit_stride)
        return real(D, pieces, BD, nw, has_gp, unit_stride)
    monkeypatch.setattr(launch, "pieces_bwd_launch", spy)
    gen = torch.Generator().manual_seed(3)
    B, N, D, T = 2, 7, 8, 2
    # (views of a tensor on the device: _run_kernel's .to() would make a copy contiguous)
    if layout == "nchw_view":
        x = torch.randn(B, D, N, 1, generator=gen).to(DEVICE).flatten(2).transpose(1, 2)
    elif layout == "contiguous":
        x = torch.randn(B, N, D, generator=gen).to(DEVICE)
    else:
        x = torch.randn(B, N, 2 * D, generator=gen).to(DEVICE)[:, :, ::2]
    a1, a2, a3 = _weights(T, gen)
    args = (x, None, "exact", T, a1, a2, a3, None, None, torch.randn(B, D, generator=gen),
            torch.randn(B, N, D, generator=gen))
    _compare(_run_kernel(*args), _run_reference(*args), RTOL[torch.float32], ["x", "a1"])
    assert seen == [unit]


# --------------------------------------------------------------------------------------------
# Fig. 7 extremes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a1", [1e-5, 1e4])
@pytest.mark.parametrize("a23", [1e-5, 1e4])
@pytest.mark.parametrize("variant", ["exact", "paper"])
@pytest.mark.usefixtures("forward_iteration")
def test_fig7_extremes(variant, a1, a23):
    """α1, α2 = α3 ∈ {1e-5, 1e4}, T = 4: the exact variant is finite and matches; the paper
    variant is finite exactly where the reference is, and matches there."""
    gen = torch.Generator().manual_seed(6)
    B, N, D, T = 2, 5, 4, 4
    x = torch.randn(B, N, D, generator=gen)
    xk = x.to(DEVICE)
    y = rt.rot_pool(xk, method="sinkhorn", variant=variant, num_iters=T, a1=a1, a2=a23, a3=a23,
                    backend="triton")
    yr, _ = rot_pool_sets(list(x.double()), method="sinkhorn", variant=variant, num_iters=T,
                          a1=a1, a2=a23, a3=a23)
    tol = 3e-3 if a1 < 1 else RTOL[torch.float32]
    fin_k = torch.isfinite(y.cpu())
    fin_r = torch.isfinite(yr)
    if variant == "exact":
        assert bool(fin_k.all())
    assert torch.equal(fin_k, fin_r)
    if bool(fin_r.any()):
        assert rel_err(y.cpu()[fin_r], yr[fin_r]) <= tol


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "nchw_view"])
def test_near_uniform_plan_weight_gradient(strided):
    """α1 = 100 ≫ |x|, α2 = α3 = 1 (the layers' default start, near mean pooling): the plan is
    near uniform and ∂L/∂α2 a small difference of large terms (~1e-10 of ∂L/∂α1). The one-pass
    exact reverse sweep takes Σā from the identity Σā = ΣC̄, which fp32 rows of Q meet only to
    ~1e-7; uncorrected, that residue put ∂L/∂α2 11 % off (found by bench/gpu_check.py's smoke
    run on AdaptiveROTPool2d). Compared with the float64 torch path."""
    gen = torch.Generator().manual_seed(3)
    B, D, T = 2, 4, 3                                    # N = 36 positions
    img = torch.randn(B, D, 6, 6, generator=gen)
    x = img.flatten(2).transpose(1, 2)                   # (B, N, D), an NCHW view when strided
    if not strided:
        x = x.contiguous()
    w = dict(a1=torch.full((T,), 100.0), a2=torch.ones(T), a3=torch.ones(T))
    gy = torch.randn(B, D, generator=gen)

    def grads(xx, backend):
        ws = {k: v.to(xx.dtype).to(xx.device).requires_grad_() for k, v in w.items()}
        xx = xx.detach().requires_grad_()
        y = rt.rot_pool(xx, method="sinkhorn", num_iters=T, backend=backend, **ws)
        return torch.autograd.grad(y, [xx, *ws.values()], gy.to(y))

    got = grads(x.to(DEVICE), "triton")
    ref = grads(x.double(), "torch")
    for name, a, b in zip(("x", "a1", "a2", "a3"), got, ref):
        assert rel_err(a.cpu().double(), b) <= 1e-3, name


@pytest.mark.parametrize("dx_by", ["pass", "split", "sweep", "lanes"])
def test_max_pool_limit_eps_gradient(dx_by, monkeypatch):
    """ROT's max-pooling limit (DESIGN §4): α1 = 0.05 … 0.02, α2 = ∞, α3 = 0, so every column
    softmax of the final plan is near one-hot. The final log P's ε term, Σ z̄ ⊙ x with the
    pooling part of z̄ summing to 0 over each column, cancelled terms ~100× its value: ∂/∂α1
    was 4e-3 (lanes) to 5e-2 off in fp32 here until the kernels centred that part,
    Σ z̄_pool ⊙ (x - y). (The plan part, whose sum is 0 over the set only, stays Σ z̄_plan ⊙ x:
    with a plan cotangent ∂/∂α1 was still 1.2e-4 off on one draw.) On every path that
    forms the term: dx by the backward's own pass, by the row-block launch, by the last
    reverse sweep, and the final adjoint and dx in lanes (row pieces of an NCHW view). No
    priors: with α3 = 0 the output does not depend on them.

    ∂/∂α1 sits at fp32's own limit here: the fp32 torch path is 1.00e-4 off the oracle on this
    input, the kernels 0.96-1.03e-4 depending on the interpreter's exp2 / log2 (numpy's AVX-512
    code or not). So ∂/∂α1 must be as accurate as fp32 allows - within 1e-4, or within 1.25×
    the fp32 torch path's error measured on the same input - and y, the plan, x̄, ∂/∂α2,
    ∂/∂α3 within 1e-4."""
    from rotp_triton.ops.rot.triton.sinkhorn import launch
    gen = torch.Generator().manual_seed(11)
    B, N, D, T = 2, 7, 8, 3
    if dx_by == "lanes":
        monkeypatch.setattr(launch, "fwd_config", lambda D_, N_, nw=4: (8, 4, True))
        monkeypatch.setattr(launch, "PIECES_FWD_ROW_LANES", 2)
        monkeypatch.setattr(launch, "PIECES_FWD_BD", 4)
        monkeypatch.setattr(launch, "PIECES_BWD_ROW_LANES", 2)
        x = torch.randn(B, D, N, 1, generator=gen).flatten(2).transpose(1, 2)  # (B, N, D)
    else:
        monkeypatch.setattr(launch, "dx_tile", lambda D_, N_, nw=4: (2, 4))
        monkeypatch.setattr(launch, "fuse_dx", lambda *args: dx_by == "sweep")
        monkeypatch.setattr(launch, "split_dx", lambda *args: dx_by == "split")
        x = torch.randn(B, N, D, generator=gen)
    f64 = dict(dtype=torch.float64)
    weights = (torch.linspace(0.05, 0.02, T, **f64), torch.full((T,), math.inf, **f64),
               torch.zeros(T, **f64))
    args = (x, None, "exact", T, *weights, None, None, torch.randn(B, D, generator=gen), None)
    (yk, pk, gk), ref = _run_kernel(*args), _run_reference(*args)
    _compare((yk, pk, gk[:1] + gk[2:]), (ref[0], ref[1], ref[2][:1] + ref[2][2:]),
             RTOL[torch.float32], ["x", "a2", "a3"])
    fp32 = rel_err(_run_kernel(*args, backend="torch")[2][1], ref[2][1])
    e = rel_err(gk[1], ref[2][1])
    assert e <= max(RTOL[torch.float32], 1.25 * fp32), f"grad a1: {e:.3g} (fp32: {fp32:.3g})"


@pytest.mark.parametrize("lanes", [False, True], ids=["row_blocks", "lanes"])
def test_max_pool_limit_feature_spread(lanes, monkeypatch):
    """test_max_pool_limit_eps_gradient through the layers' scale="auto" (a learnable α1 at
    the max-pooling limit): the final ε term then comes from the backward's adjoint pass, in
    row blocks or in lanes (SPREAD), and feeds the scale's gradient too. y, ∂/∂x and ∂/∂α1
    == the float64 torch path's (1e-4; ∂/∂α1 was 1e-3 off before the centring)."""
    from launch_counter import count_launches
    from rotp_triton.ops.rot.triton.sinkhorn import launch
    monkeypatch.setattr(launch, "PIECES_BWD_ROW_LANES", 2 if lanes else 0)
    monkeypatch.setattr(launch, "PIECES_BWD_LANES", lanes)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 7, 1, generator=gen) * 2 + 1
    gy = torch.randn(2, 8, 1, 1, generator=gen)
    outs = []
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        layer = rt.AdaptiveROTPool2d(8, method="sinkhorn", num_iters=3, a1=0.05, a2=math.inf,
                                     learn_a2=False, a3=0.0, learn_a3=False,
                                     backend=backend).to(DEVICE, dtype)
        xl = x.to(DEVICE, dtype).requires_grad_()
        with count_launches() as launches:
            y = layer(xl)
            gx, ga1 = torch.autograd.grad((y * gy.to(y)).sum(), [xl, layer.weights.raw_a1])
        if backend == "triton":
            ce = launches.constexprs[launches.index("sinkhorn_bwd_kernel")]
            assert (ce["SPREAD"], ce["RL"] > 0) == (True, lanes)
        outs.append((y, gx, ga1))
    for name, a, b in zip(("y", "x", "a1"), *outs):
        assert rel_err(a.cpu(), b) <= RTOL[torch.float32], name


@pytest.mark.parametrize("a1,a23", [(1e-5, 1e-5), (1e-3, 1e4), (1e-1, 1e-5)])
@pytest.mark.usefixtures("forward_iteration")
def test_fig7_T16_paper_diverges_like_the_fp32_torch_path(a1, a23):
    """T = 16: eq. (18) with small α1 overflows float32 (defect 1 of DESIGN §3.3; the float64
    reference overflows later). The kernel is non-finite exactly where the float32 torch path
    is, and matches the reference where finite; the exact variant is finite and matches."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 4, generator=gen)
    kw = dict(method="sinkhorn", num_iters=16, a1=a1, a2=a23, a3=a23)
    yk = rt.rot_pool(x.to(DEVICE), variant="paper", backend="triton", **kw).cpu()
    yt = rt.rot_pool(x, variant="paper", backend="torch", **kw)
    assert torch.equal(torch.isfinite(yk), torch.isfinite(yt))
    yr, _ = rot_pool_sets(list(x.double()), variant="paper", **kw)
    fin = torch.isfinite(yk)
    if bool(fin.any()):
        assert rel_err(yk[fin], yr[fin]) <= (3e-3 if a1 < 1e-2 else RTOL[torch.float32])
    ye = rt.rot_pool(x.to(DEVICE), variant="exact", backend="triton", **kw).cpu()
    yre, _ = rot_pool_sets(list(x.double()), variant="exact", **kw)
    assert bool(torch.isfinite(ye).all())
    assert rel_err(ye, yre) <= (3e-3 if a1 < 1e-2 else RTOL[torch.float32])


@pytest.mark.usefixtures("forward_iteration")
def test_fig7_exact_gradients_small_eps():
    """Gradients stay finite at the small-ε corner of the grid (α1 = 1e-5, α2 = α3 = 1e4)."""
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    x.requires_grad_()
    a1 = torch.full((3,), 1e-5, device=DEVICE, requires_grad=True)
    y = rt.rot_pool(x, method="sinkhorn", variant="exact", num_iters=3, a1=a1, a2=1e4, a3=1e4,
                    backend="triton")
    gx, ga1 = torch.autograd.grad(y.sum(), [x, a1])
    assert bool(torch.isfinite(gx).all()) and bool(torch.isfinite(ga1).all())


@pytest.mark.parametrize("variant", ["exact", "paper"])
@pytest.mark.parametrize("N", [8, 7], ids=["one_tile", "row_pieces"])
@pytest.mark.usefixtures("forward_iteration")
def test_huge_x_over_eps_gradient_finite_like_torch_path(variant, N):
    """|x|/α1 ≈ 1e10 (x = randn * 1e5, α1 = 1e-5): one fp32 ulp of x/ε is ≈ 1e3 in an exponent,
    which once made every softmax recomputed in the backward overflow (all-NaN x.grad). The
    gradient is finite wherever the torch path's is, and y agrees with the torch path (N = 7:
    the exact variant's rows in pieces 4 + 2 + 1, launch.row_pieces)."""
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(2, N, 8, generator=gen) * 1e5
    cy = torch.randn(2, 8, generator=gen)
    out = []
    for backend in ("triton", "torch"):
        xl = (x.to(DEVICE) if backend == "triton" else x).clone().requires_grad_()
        y = rt.rot_pool(xl, method="sinkhorn", variant=variant, num_iters=3, a1=1e-5,
                        backend=backend)
        (gx,) = torch.autograd.grad((y * cy.to(y.device)).sum(), [xl])
        out.append((y.detach().cpu(), gx.cpu()))
    (yk, gk), (yt, gt) = out
    assert torch.equal(torch.isfinite(gk), torch.isfinite(gt))
    assert bool(torch.isfinite(gt).all())
    assert rel_err(yk, yt) <= RTOL[torch.float32]


def _hard_marginal_case(case):
    """(x, cy, T, a1, a2, a3) of test_hard_marginal_at_large_x_over_eps (float64)."""
    inf = math.inf
    if case == "one_feature":
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(4, 12, 1, generator=gen, dtype=torch.float64) * 5
        cy = torch.randn(4, 1, generator=gen, dtype=torch.float64)
        return x, cy, 1, [0.05], [0.5], [inf]
    if case == "both_hard":
        x = torch.randn(1, 12, 5, generator=torch.Generator().manual_seed(4),
                        dtype=torch.float64) * 300
        cy = torch.randn(1, 5, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
        return x, cy, 2, [1.0] * 2, [inf] * 2, [inf] * 2
    x = torch.randn(2, 12, 5, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64) * 300
    cy = torch.randn(2, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return x, cy, *{"hard": (1, [1.0], [0.5], [inf]),
                    "nearly_hard": (3, [1.0] * 3, [0.5] * 3, [100.0] * 3),
                    "mixed": (3, [1.0, 0.8, 1.2], [0.5] * 3, [inf, 0.5, inf])}[case]


@pytest.mark.parametrize("case", ["hard", "one_feature", "both_hard", "nearly_hard", "mixed"])
@pytest.mark.parametrize("path", ["row_pieces", "one_tile", "nchw_view", "dx_in_sweep",
                                  "ragged"])
def test_hard_marginal_at_large_x_over_eps(case, path, monkeypatch):
    """A hard sample marginal (α3 = ∞: each row of the plan is q0_n times a softmax over d,
    whatever x) at |x|/α1 ≈ 300 (one feature: ≈ 100, the plan then is q0 itself): the x̄
    through C_t cancels the next step's x̄ row by row, so the x̄ of the kernels, which recompute
    Q_t from x and saved vectors of size |x|/ε, was 1e-3 (one feature: 1e-3; α3 = 100 α1:
    8e-4; both marginals hard, as balanced OT: 1.6e-3) off the oracle where autograd through
    the eager fp32 path is ~1e-5 (both hard: 1.4e-4) off. With Q's rows normalized in the
    backward's own arithmetic (kernels._q_row_sums, where κ3 > launch.NORM_MIN_KAPPA), and
    S's columns where κ2 is (kernels._s_col_sums; both hard: 2.6e-4 off with the rows alone),
    the kernels are within fp32's 1e-4. On every path (row pieces; the padded one-tile; the
    NCHW view with packed dx vectors and the S form; dx written by the last sweep; ragged,
    streamed), and with per-iteration weights that switch the normalization on and off
    ("mixed")."""
    from rotp_triton.ops.rot.triton.sinkhorn import launch
    x, cy, T, a1, a2, a3 = _hard_marginal_case(case)
    B, N, D = x.shape
    ptr = None
    if path == "one_tile":
        monkeypatch.setattr(launch, "ROW_PIECES", False)
    elif path == "nchw_view":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)     # the same values, sxn = 1
    elif path == "dx_in_sweep":
        monkeypatch.setattr(launch, "fuse_dx", lambda *args: True)
    elif path == "ragged":
        ptr = _ragged_ptr([N] * B)
        x = x.reshape(B * N, D)
    w = [torch.tensor(v, dtype=torch.float64) for v in (a1, a2, a3)]
    args = (x, ptr, "exact", T, *w, None, None, cy, None)
    k, r = _run_kernel(*args), _run_reference(*args)
    assert rel_err(k[0].double(), r[0]) <= RTOL[torch.float32], "y"
    assert rel_err(k[2][0], r[2][0]) <= RTOL[torch.float32], "x"


@pytest.mark.parametrize("N", [8, 7], ids=["one_tile", "row_pieces"])
@pytest.mark.parametrize("eps", ["constant", "per_iteration"])
@pytest.mark.parametrize("p0", [False, True], ids=["uniform_p0", "p0"])
@pytest.mark.usefixtures("forward_iteration")
def test_exact_iterations_far_from_zero(N, eps, p0):
    """Features offset by 50 at ε ≈ 0.05 with soft feature marginals (α2 ≈ 0.01, κ2 ≈ 0.2):
    the column scalings u of the exact iterations are ~(1 - κ2) · 50 / ε · log2 e ≈ 1e3 (log2
    units), far outside 2^±127 of 0, so the row sums are only right under a reference near max
    u (kernels._scaling_from_lse: NaN under 0); and with ε changing across iterations the
    previous iteration's column shift no longer bounds x / ε_t + b (2^(50 · Δ(1/ε)) overflowed:
    NaN y before such an iteration took the column max). y, the plan and the x gradient
    against the oracle at 1e-3: |x| / ε ≈ 1e3 makes one fp32 ulp of x / ε ≈ 1e-4 in an
    exponent (errors up to 1e-4 here, the fp32 torch path's alike). The weights' gradients are
    not compared: the fp32 torch path itself misses the oracle's ∂/∂α1 by ~1e-3 to 3e-2 here
    (cancellation of terms ~|x| / ε²)."""
    gen = torch.Generator().manual_seed(31)
    T = 4
    x = torch.randn(2, N, 8, generator=gen) + 50.0
    if eps == "constant":
        a1 = torch.full((T,), 0.05, dtype=torch.float64)
    else:
        a1 = 0.05 + 0.01 * torch.rand(T, generator=gen, dtype=torch.float64)
    a2 = 0.01 * (1 + torch.rand(T, generator=gen, dtype=torch.float64))
    a3 = 0.5 + torch.rand(T, generator=gen, dtype=torch.float64)
    pr = torch.softmax(torch.randn(2, 8, generator=gen), -1) if p0 else None
    cy = torch.randn(2, 8, generator=gen)
    cp = torch.randn(2, N, 8, generator=gen)
    args = (x, None, "exact", T, a1, a2, a3, pr, None, cy, cp)
    (yk, pk, gk), (yr, pr_, gr) = _run_kernel(*args), _run_reference(*args)
    assert rel_err(yk.detach(), yr) <= 1e-3, "y"
    assert rel_err(pk.detach(), pr_) <= 1e-3, "plan"
    assert rel_err(gk[0], gr[0]) <= 1e-3, "grad x"
    assert all(bool(torch.isfinite(g).all()) for g in gk if g is not None)


@pytest.mark.parametrize("shift", ["set", "column", "set_redone"])
@pytest.mark.parametrize("path", ["one_tile", "row_pieces", "row_pieces_lanes"])
def test_exact_iteration_shifts(path, shift, monkeypatch):
    """The exact iterations from t = 1 on (and the row pieces' pooling) shift every column by
    the set's bound H = max_d -a_d (a bias b - H per row) where the span of -a is at most
    kernels._SET_SHIFT_SPAN, and each column by its own bound (the pooling: its max)
    otherwise; both forced here (the span limit at +inf and at -1), and the set shift's passes
    redone under the max (``set_redone``: every column sum counted above _COL_HUGE), on the
    one-tile iteration (8 rows), the row pieces one row a lane (7 rows, contiguous) and in
    lanes (the NCHW view, RL = 2). The same weights in every iteration (per-iteration ε takes
    the column max instead), feature scales 0.3-3, priors, y and plan cotangents: forward, plan
    and gradients against the reference."""
    from rotp_triton.ops.rot.triton.sinkhorn import kernels, launch
    import triton.language as tl
    monkeypatch.setattr(launch, "SET_SHIFT", True)          # (off by default under triton 3.6)
    monkeypatch.setattr(kernels, "_SET_SHIFT_SPAN",
                        tl.constexpr(-1.0 if shift == "column" else math.inf))
    if shift == "set_redone":
        monkeypatch.setattr(kernels, "_COL_HUGE", tl.constexpr(0.0))
    N = 8 if path == "one_tile" else 7
    if path != "one_tile":
        monkeypatch.setattr(launch, "fwd_config", lambda D_, N_, nw=4: (8, 4, True))
        monkeypatch.setattr(launch, "PIECES_FWD_BD", 4)
        monkeypatch.setattr(launch, "PIECES_FWD_ROW_LANES", 2 if path == "row_pieces_lanes" else 1)
        assert launch.row_pieces(N, 8, True, False) == (4, 2, 1)
    gen = torch.Generator().manual_seed(41)
    B, D, T = 2, 6, 4
    scale = torch.logspace(-0.5, 0.5, D, dtype=torch.float64).float()
    if path == "row_pieces_lanes":
        x = torch.randn(B, D, N, 1, generator=gen).flatten(2).transpose(1, 2)  # (B, N, D)
    else:
        x = torch.randn(B, N, D, generator=gen)
    x = x * scale
    a1, a2, a3 = (torch.full((T,), v, dtype=torch.float64) for v in (0.7, 1.5, 0.6))
    p0 = torch.rand(B, D, generator=gen) + 0.1
    q0 = torch.rand(B, N, generator=gen) + 0.1
    cy = torch.randn(B, D, generator=gen)
    cp = torch.randn(B, N, D, generator=gen)
    args = (x, None, "exact", T, a1, a2, a3, p0, q0, cy, cp)
    _compare(_run_kernel(*args), _run_reference(*args), RTOL[torch.float32],
             ["x", "a1", "a2", "a3", "p0", "q0"])


@pytest.mark.parametrize("N", [8, 7], ids=["one_tile", "row_pieces"])
@pytest.mark.usefixtures("forward_iteration")
def test_pooling_column_without_mass(N):
    """A feature whose prior mass is e^-100 (an fp32 subnormal) under a hard feature marginal
    (α2 = ∞): its column of the plan sums to ~1e-44, so a pooling under a bound instead of the
    column max (-a_T, tried: kept out for its spills) would see subnormal or flushed terms (it
    then had to redo the column under the max). y, the plan and the x gradient against the
    oracle (the p0 gradient, ∝ 1/p0 ~ 1e44, is beyond fp32: not compared)."""
    gen = torch.Generator().manual_seed(5)
    T = 3
    x = torch.randn(2, N, 8, generator=gen)
    logits = torch.randn(2, 8, generator=gen)
    logits[:, 3] = -100.0
    p0 = torch.softmax(logits.double(), -1).float()
    assert 0 < float(p0[:, 3].max()) < 1e-40
    a1 = torch.full((T,), 0.5, dtype=torch.float64)
    a2 = torch.full((T,), math.inf, dtype=torch.float64)
    a3 = torch.full((T,), 1.0, dtype=torch.float64)
    cy = torch.randn(2, 8, generator=gen)
    cp = torch.randn(2, N, 8, generator=gen)
    args = (x, None, "exact", T, a1, a2, a3, p0, None, cy, cp)
    (yk, pk, gk), (yr, pr, gr) = _run_kernel(*args), _run_reference(*args)
    tol = RTOL[torch.float32]
    assert rel_err(yk.detach(), yr) <= tol, "y"
    assert rel_err(pk.detach(), pr) <= tol, "plan"
    assert rel_err(gk[0], gr[0]) <= tol, "grad x"


# --------------------------------------------------------------------------------------------
# routing, memory, reduced precision, compile
# --------------------------------------------------------------------------------------------
def test_unsorted_index_through_rot_pool_matches_torch_path():
    """rot_pool with an unsorted ``index`` (dispatch sorts the rows and scatters the plan back)
    gives the torch path's y and plan."""
    gen = torch.Generator().manual_seed(8)
    index = torch.tensor([2, 0, 1, 2, 0, 2, 1])
    x = torch.randn(index.numel(), 3, generator=gen).to(DEVICE)
    kw = dict(index=index.to(DEVICE), method="sinkhorn", num_iters=2, a1=0.8, a2=2.0, a3=0.5,
              return_plan=True)
    y, plan = rt.rot_pool(x, backend="triton", **kw)
    yt, plant = rt.rot_pool(x, backend="torch", **kw)
    assert rel_err(y, yt) <= RTOL[torch.float32]
    assert rel_err(plan, plant) <= RTOL[torch.float32]


def _saved_bytes(T, B=2, N=32, D=32):
    """Bytes autograd keeps for the backward of one rot_pool call (weights as (T,) leaves)."""
    x = torch.randn(B, N, D, device=DEVICE, requires_grad=True)
    a1 = torch.ones(T, device=DEVICE, requires_grad=True)
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rt.rot_pool(x, method="sinkhorn", num_iters=T, a1=a1, backend="triton")
    return sum(seen.values()), x.numel() * x.element_size()


def test_saved_memory_is_linear_in_T_times_vectors_not_input():
    """Saved tensors grow by O(B·(N + D)) per iteration, not by the input size per iteration.
    With N = D = 32, B = 2 one iteration's vectors (a, R: D each; b, C: N each, fp32) are
    2·(2·32 + 2·32)·4 = 1 KiB; the input is 8 KiB."""
    s4, x_bytes = _saved_bytes(4)
    s16, _ = _saved_bytes(16)
    per_iter = (s16 - s4) / 12
    B, N, D = 2, 32, 32
    assert s4 >= x_bytes and per_iter > 0, (s4, s16)                # the hook saw the saves
    assert per_iter <= 2 * B * (N + D) * 4 + 64, per_iter     # the vectors + the (T,) weights
    assert s16 <= 2 * x_bytes + 16 * per_iter + 4096, (s16, x_bytes)


@pytest.mark.skipif(not ON_CUDA, reason="fp16/bf16 kernels are tested on CUDA only")
@pytest.mark.parametrize("dtype", [d for d in KERNEL_DTYPES if d != torch.float32])
@pytest.mark.parametrize("variant", ["exact", "paper"])
def test_reduced_precision(dtype, variant):
    """fp16/bf16 input, fp32 state: y and gradients within RTOL[dtype] of the reference on the
    rounded input."""
    gen = torch.Generator().manual_seed(9)
    B, N, D, T = 3, 37, 70, 3
    x = torch.randn(B, N, D, generator=gen).to(dtype)
    a1, a2, a3 = _weights(T, gen)
    cy = torch.randn(B, D, generator=gen)
    args = (x, None, variant, T, a1, a2, a3, None, None, cy, None)
    k = _run_kernel(*args, dtype=dtype)
    assert k[0].dtype == dtype
    _compare(k, _run_reference(*args), RTOL[dtype], ["x", "a1", "a2", "a3"])


def _table(a1, a2, a3):
    """The (6, T) weight table of α0 = 0 Sinkhorn (rows of params.py)."""
    z = torch.zeros_like(a1)
    return torch.stack([z, a1, a2, a3, z, z]).contiguous()


@pytest.mark.parametrize("variant", ["exact", "paper"])
def test_autograd_function_fallback_matches_custom_op(variant):
    """The plain torch.autograd.Function (used where torch has no triton_op) gives the custom
    op's y, plan and gradients (x, the weight table, log q0)."""
    from rotp_triton.ops.rot.triton.sinkhorn import op
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 4, 3, generator=gen).to(DEVICE)
    w = _table(torch.tensor([0.8, 1.3]), torch.tensor([0.3, math.inf]),
               torch.tensor([0.6, 0.2])).to(DEVICE)
    lq0 = torch.log_softmax(torch.randn(2, 4, generator=gen), -1).to(DEVICE)
    cp = torch.randn(2, 4, 3, generator=gen).to(DEVICE)

    def run(use_op):
        leaves = [t.clone().requires_grad_() for t in (x, w, lq0)]
        args = (leaves[0], None, leaves[1], None, leaves[2], variant == "paper", True)
        if use_op:
            y, plan, *_ = op.sinkhorn_fwd_op(*args)
        else:
            y, plan = op.SinkhornFunction.apply(*args)
        loss = (y.float() * torch.arange(6.0, device=DEVICE).reshape(2, 3)).sum() + \
            (plan * cp).sum()
        return [y, plan] + list(torch.autograd.grad(loss, leaves))

    if op.sinkhorn_fwd_op is None:
        pytest.skip("torch has no torch.library.triton_op")
    for a, b in zip(run(False), run(True)):
        assert rel_err(a.detach(), b.detach()) <= 1e-6


def test_weight_table_gradient_rows():
    """sinkhorn_pool's dw has the table's shape, zeros in the rows Sinkhorn does not read (α0,
    ρ, τ), zero for an α2 = inf entry, and matches the reference's α1, α2, α3 gradients."""
    from rotp_triton.ops.rot.params import A0, A1, A2, A3, RHO, TAU
    from rotp_triton.ops.rot.triton.sinkhorn import sinkhorn_pool
    gen = torch.Generator().manual_seed(13)
    B, N, D, T = 2, 5, 3, 3
    x = torch.randn(B, N, D, generator=gen)
    a1, a2, a3 = _weights(T, gen, inf_a2=True)
    cy = torch.randn(B, D, generator=gen)
    w = _table(a1.float(), a2.float(), a3.float()).to(DEVICE).requires_grad_()
    y, _ = sinkhorn_pool(x.to(DEVICE), None, w, None, None, variant="exact", return_plan=False)
    (dw,) = torch.autograd.grad((y * cy.to(DEVICE)).sum(), [w])
    assert dw.shape == (6, T)
    assert float(dw[[A0, RHO, TAU]].abs().max()) == 0.0
    assert float(dw[A2, 0]) == 0.0
    _, _, (_, g1, g2, g3) = _run_reference(x, None, "exact", T, a1, a2, a3, None, None, cy, None)
    for row, ref in ((A1, g1), (A2, g2), (A3, g3)):
        assert rel_err(dw[row], ref) <= RTOL[torch.float32], row


def test_opcheck_custom_op():
    """torch.library.opcheck of the forward op (schema, autograd registration, fake tensor)."""
    from rotp_triton.ops.rot.triton.sinkhorn import op
    if op.sinkhorn_fwd_op is None:
        pytest.skip("torch has no torch.library.triton_op")
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 4, generator=gen).to(DEVICE).requires_grad_()
    w = _table(torch.tensor([0.9, 1.1]), torch.tensor([0.7, 1.5]),
               torch.tensor([1.0, 0.4])).to(DEVICE).requires_grad_()
    lp0 = torch.log_softmax(torch.randn(2, 4, generator=gen), -1).to(DEVICE)
    torch.library.opcheck(op.sinkhorn_fwd_op, (x, None, w, lp0, None, False, True),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


@pytest.mark.parametrize("ragged", [False, True])
def test_torch_compile_fullgraph(ragged):
    """torch.compile(fullgraph=True) of rt.rot_pool on the Triton backend traces without graph
    breaks and gives the eager y and gradients (x and a (T,) weight). Under the interpreter the
    compiled graph runs on the "eager" backend (wrap_triton returns the raw interpreted kernel,
    which AOT tracing cannot enter); on CUDA on inductor."""
    from rotp_triton.ops.rot.triton.sinkhorn import op
    if op.sinkhorn_fwd_op is None:
        pytest.skip("torch has no torch.library.triton_op")
    gen = torch.Generator().manual_seed(11)
    if ragged:
        x = torch.randn(7, 3, generator=gen).to(DEVICE)
        ptr = torch.tensor([0, 3, 3, 7]).to(DEVICE)
    else:
        x = torch.randn(2, 4, 3, generator=gen).to(DEVICE)
        ptr = None
    a1 = torch.tensor([0.7, 1.2], device=DEVICE)
    a3 = torch.tensor([0.5, math.inf], device=DEVICE)

    def f(x, a1):
        return rt.rot_pool(x, ptr=ptr, method="sinkhorn", num_iters=2, a1=a1, a2=2.0, a3=a3,
                           backend="triton")

    def run(fn):
        xl, al = x.clone().requires_grad_(), a1.clone().requires_grad_()
        y = fn(xl, al)
        return (y,) + torch.autograd.grad((y * torch.arange(y.numel(), device=DEVICE)
                                           .reshape(y.shape)).sum(), [xl, al])

    eager = run(f)
    torch._dynamo.reset()
    compiled = run(torch.compile(f, fullgraph=True, backend="inductor" if ON_CUDA else "eager"))
    for a, b in zip(compiled, eager):
        assert rel_err(a.detach(), b.detach()) <= 1e-6


# --------------------------------------------------------------------------------------------
# ahead-of-time compilation for sm_90 (no GPU needed)
# --------------------------------------------------------------------------------------------
def _aot_usage(mode: str, configs: list) -> list:
    """Compile ``configs`` with ``sinkhorn_sass.py <mode>`` (without TRITON_INTERPRET) in two
    concurrent subprocesses (one per CI core: a process per configuration imported torch 26
    times and thrashed two cores, 195 s of CPU against 58); the failures: a configuration that
    did not compile, or a "USAGE ... regs spill-bytes" line over 255 registers or with spills
    (local memory or stack)."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sinkhorn_sass.py")
    halves = [configs[0::2], configs[1::2]]
    procs = [subprocess.Popen([sys.executable, script, mode]
                              + [str(a) for cfg in half for a in cfg],
                              env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for half in halves]
    failures = []
    for half, p in zip(halves, procs):
        out, err = p.communicate(timeout=900)
        lines = [ln for ln in out.splitlines() if ln.startswith("USAGE")]
        if p.returncode != 0 or len(lines) != len(half):   # the first config without a line
            failures.append(f"{half[min(len(lines), len(half) - 1)]}: compile failed\n"
                            f"{err[-3000:]}")
        for ln in lines:
            regs, local = map(int, ln.split()[-2:])
            print(ln)
            if regs > 255 or local != 0:
                failures.append(ln)
    return failures


def test_aot_sm90_compiles_without_spills():
    """Each kernel configuration the launchers use (``sinkhorn_sass.AOT_CONFIGS``: forward /
    backward, streamed / one-tile, both variants, fp32/fp16/bf16 pointers, 4 and 8 warps)
    compiles for sm_90 with the tile sizes picked for D = 2048, and ptxas reports no spills
    (neither local memory nor stack)."""
    import os
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from sinkhorn_sass import AOT_CONFIGS
    failures = _aot_usage("usage", AOT_CONFIGS)
    assert not failures, "\n".join(failures)


def test_aot_sm90_small_sets_without_spills():
    """Small dense sets of contiguous rows held in one tile (``sinkhorn_sass.SMALL_CONFIGS``:
    16-128 rows, 32-128 features, 4 and 8 warps, the exact forward and backward with and
    without a plan gradient; and row pieces of 25, 49 and 196 rows, the exact forward under its
    own cap, and of 25-81 rows the exact backward under its cap, contiguous and as W2's NCHW
    view, with the layers' feature scale too) compile for sm_90 as the launcher builds them
    (its tile, warps and register cap, the JIT's specialisation of a unit stride) without
    spills. Without the cap ptxas 12.9 keeps values on the stack at 128 registers (16 x 128 at
    8 warps: 136 B)."""
    import os
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from sinkhorn_sass import SMALL_CONFIGS
    failures = _aot_usage("small", SMALL_CONFIGS)
    assert not failures, "\n".join(failures)


def test_aot_sm90_fixed_order_has_no_atomics():
    """The backward and the row-block dx launch under deterministic algorithms (FIXED_ORDER)
    compile for sm_90 without a single atomic or reduction instruction in their SASS, where
    the default build has them (paper variant with the feature scale: every share they add -
    the three weight rows, the final log P's and x-scale terms, ∂/∂σ)."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sinkhorn_sass.py")
    cfgs = [(which, "paper", "fp32", 4, mode) for which in ("bwd1nogp+s", "dx+s")
            for mode in ("fixed", "atomic")]
    out = subprocess.run([sys.executable, script, "atomics"] + [str(a) for c in cfgs for a in c],
                         env=env, text=True, capture_output=True, timeout=600)
    lines = [ln.split() for ln in out.stdout.splitlines() if ln.startswith("ATOMICS")]
    assert len(lines) == len(cfgs), out.stderr[-3000:]
    for ln in lines:
        print(" ".join(ln))
        assert (int(ln[-1]) == 0) == (ln[-2] == "fixed"), ln


@pytest.mark.parametrize("rows", [7, 23], ids=["pieces", "padded_piece"])
@pytest.mark.parametrize("path", ["sweep", "pass", "split-dx", "split-rows", "ragged",
                                  "ragged-tiles"])
@pytest.mark.parametrize("variant_", ["exact", "paper"])
def test_feature_scale_folded_in(variant_, path, rows, monkeypatch):
    """``spread=True`` (the layers' scale="auto"): y = σ · pool(x / σ) with σ each set's
    spread (formed by the set kernel itself, or by the spread launches before split-set
    iterations), 1/σ folded into the kernels' x-scales (forward and backward; the paper's own 1/ε
    of the state untouched), ∂/∂σ from the x-scale terms of the ε cotangents; one spread
    pass adds the path through σ. == the oracle on x / σ times σ in float64, autograd through
    ``dense_spread`` / ``ragged_spread`` (x and the (T,) weights), on every dx path (the last
    reverse sweep, the backward's own pass, the row-block launch with its atomic ε and σ
    terms), the split-set forward and ragged sets with an empty one and a constant one
    (σ = 1); "ragged-tiles": the exact one-tile classes on (launch.RAGGED_TILE_ROWS lowered
    to 4: sets of 3 and 2 rows in one tile each way, 5 streamed). Launches: no x / σ pass, no
    dot pass. Dense sets of 7 rows (exact: row pieces 4 + 2 + 1) and 23 (16 + 4 + 4, the last
    piece padded: the spread's zeroed rows)."""
    from launch_counter import count_launches
    from rotp_triton.ops.rot.params import A1, A2, A3
    from rotp_triton.ops.rot.spread import dense_spread, ragged_spread
    from rotp_triton.ops.rot.triton.sinkhorn import launch
    from rotp_triton.ops.rot.triton.sinkhorn.op import sinkhorn_pool
    if variant_ == "paper" and path in ("sweep", "split-rows"):
        pytest.skip("the fused dx sweep and the split-set forward are exact-only")
    if rows != 7 and (path.startswith("ragged") or variant_ == "paper"):
        pytest.skip("row pieces: dense exact sets only")
    if path == "ragged-tiles" and variant_ == "paper":
        pytest.skip("the ragged one-tile classes are exact-only")
    monkeypatch.setattr(launch, "RAGGED_TILE_ROWS", 4 if path == "ragged-tiles" else 0)
    monkeypatch.setattr(launch, "fuse_dx", lambda *args: path == "sweep")
    monkeypatch.setattr(launch, "split_dx", lambda *args: path == "split-dx")
    monkeypatch.setattr(launch, "SPLIT_ROWS", 2 if path == "split-rows" else None)
    gen = torch.Generator().manual_seed(41)
    T = 3
    a1, a2, a3 = _weights(T, gen)
    if path.startswith("ragged"):
        ptr = _ragged_ptr([3, 0, 5, 2])
        x = torch.randn(10, 4, generator=gen, dtype=torch.float64) * 3 + 2
        x[8:] = 1.5                                    # a constant set: spread 0 -> σ = 1
        index = torch.repeat_interleave(torch.arange(4), ptr.diff())
    else:
        ptr = None
        x = torch.randn(3, rows, 5, generator=gen, dtype=torch.float64) * 3 + 2
    table = torch.zeros(6, T)
    table[A1], table[A2], table[A3] = a1.float(), a2.float(), a3.float()
    table = table.to(DEVICE).requires_grad_()
    xk = x.float().to(DEVICE).requires_grad_()
    with count_launches() as fwd:
        y, plan = sinkhorn_pool(xk, None if ptr is None else ptr.to(DEVICE), table, None, None,
                                variant=variant_, return_plan=False, spread=True)
    assert plan is None and y.dtype == torch.float32
    assert fwd[-1] == "sinkhorn_fwd_kernel"
    if path == "split-rows":   # σ before the split launches: the two statistics launches
        assert fwd[:2] == ["spread_stats_kernel", "spread_normalize_kernel"]
        assert not fwd.constexprs[1]["NORMALIZE"]
    else:                      # the set kernel forms σ itself (STATS)
        assert "spread_stats_kernel" not in fwd and fwd.constexprs[-1]["STATS"]
    cy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    with count_launches() as bwd:
        gx, gw = torch.autograd.grad((y * cy.to(DEVICE, torch.float32)).sum(), [xk, table])
    # exact, one tile per set: the kernels write the whole x̄ (σ's path too; dx never fused
    # into the last sweep); ragged sets (several tiles) keep the spread pass
    fold = variant_ == "exact" and bwd.constexprs[0]["ONE_TILE_N"]
    assert fold == (variant_ == "exact" and not path.startswith("ragged"))
    assert all(c.get("TILE_ROWS", 0) == (4 if path == "ragged-tiles" else 0)
               for c in fwd.constexprs[-1:] + bwd.constexprs[:1])
    assert ("spread_grad_kernel" in bwd) != fold and "spread_grad_dot_kernel" not in bwd
    assert bwd[-1] == ("spread_grad_kernel" if not fold else
                       "sinkhorn_dx_kernel" if path == "split-dx" else "sinkhorn_bwd_kernel")
    assert ("sinkhorn_dx_kernel" in bwd) == (path == "split-dx")
    assert not any(c.get("FUSE_DX") for c in bwd.constexprs) or not fold
    x64 = x.clone().requires_grad_()
    w64 = [a.clone().requires_grad_() for a in (a1, a2, a3)]
    if ptr is None:
        s = dense_spread(x64)
        sets = list(x64 / s[:, None, None])
    else:
        s = ragged_spread(x64, index, 4)
        xn = x64 / s[index][:, None]
        sets = [xn[ptr[i]:ptr[i + 1]] for i in range(4)]
    yr, _plans = rot_pool_sets(sets, method="sinkhorn", variant=variant_, num_iters=T,
                               a1=w64[0], a2=w64[1], a3=w64[2])
    yr = yr * s[:, None]
    assert rel_err(y, yr) <= RTOL[torch.float32]
    gr = torch.autograd.grad((yr * cy).sum(), [x64] + w64)
    # weight gradients: + 1e-6 absolute for sums of cancelling fp32 terms (the paper's α2
    # gradient here is ~2e-3 and the unfolded path, x / σ first, misses it by the same 3e-7)
    for name, a, b in zip(["x", "a1", "a2", "a3"], [gx, gw[A1], gw[A2], gw[A3]], gr):
        a = a.detach().double().cpu()
        assert (a - b).norm() <= RTOL[torch.float32] * b.norm() + (name != "x") * 1e-6, name
