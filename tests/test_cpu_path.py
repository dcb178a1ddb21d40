"""Issue #16 reproductions on the torch (CPU) path: memory (profiler allocator events, as
bench/test_bench_cpu.py measures it), B-Q stability on the Fig. 7 grid, no silent NaN at the
edges, and the error messages of the layers."""
import itertools
import os
import sys

import pytest
import torch

import rotp_triton as rt
from rotp_triton.nn.weights import FLOOR_REL, ROTWeights

from kernel_utils import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from test_bench_cpu import peak_bytes  # noqa: E402

METHODS = ("sinkhorn", "badmm-e", "badmm-q")
GRID = [10.0 ** k for k in range(-5, 5)]  # the paper's Fig. 7 axes


def fwd_bwd(x, T, method, variant="exact", **kw):
    w = {k: torch.full((T,), 1.0, dtype=x.dtype).requires_grad_() for k in ("a1", "a2", "a3", "rho")}
    y = rt.rot_pool(x, method=method, variant=variant, num_iters=T, backend="torch", **kw, **w)
    y.sum().backward()


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,variant", list(itertools.product(METHODS, ("exact", "paper"))))
def test_fwd_bwd_memory_does_not_grow_with_T(method, variant):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 200, 40, generator=g)
    peaks = {}
    for T in (4, 6, 16):
        def call():
            fwd_bwd(x.clone().requires_grad_(), T, method, variant)
        peaks[T] = peak_bytes(call)
    # only per-iteration vectors are kept: at most two (B, D) and two (B, N) per iteration
    # (15 KiB here; S keeps a, b, R, C), where the old path kept ~2 x-sized tensors (500 KiB)
    # per iteration; the scratch pool's fill at the moment of the peak varies by up to one x.
    # Compared from T = 6: at T <= 5 the B-ADMM backward hands its T/2 snapshot over before
    # any full adjoint runs beside it, so T = 4 peaks lower still (asserted below).
    B, N, D = x.shape
    vectors = (16 - 6) * 2 * (B * D + B * N) * 4 + 4096                  # + (T,) weights
    assert peaks[16] - peaks[6] <= vectors + 1.5 * x.numel() * 4, peaks
    assert peaks[4] <= peaks[16], peaks


@pytest.mark.parametrize("method", METHODS)
def test_fwd_bwd_peak_at_T16_is_within_3x_input(monkeypatch, method):
    # the chunked CPU path (ops/rot/torch/chunked.py): x and its gradient (2× x) plus the
    # solver's working set of chunk-sized buffers plus the per-iteration vectors. The working
    # set is scaled down with x (3.2 MB here, W1 10 MB: 2 of the default 6 MiB) so that the
    # ratio is W1's.
    from rotp_triton.ops.rot.torch import chunks
    monkeypatch.setattr(chunks, "WORKING_SET_BYTES", 2 << 20)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 250, 100, generator=g)

    def call():
        fwd_bwd(x.clone().requires_grad_(), 16, method)    # x's copy counts (as the bench's x)

    peak = peak_bytes(call)
    assert peak <= 3 * x.numel() * 4, f"{peak / (x.numel() * 4):.2f}× x"


@pytest.mark.parametrize("small", [199, 999])
def test_skewed_ragged_batch_is_not_padded(small):
    # one 20,000-row set + 199 (999) one-row sets, D = 15 (x: 1.2 MB), B-E, T = 4: the padded
    # view is 200 × 20,000 × 15 floats = 240 MB per tensor (issue #16: 6.9 GB peak; 999 sets:
    # killed at 23.7 GB)
    sizes = torch.tensor([20000] + [1] * small)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(int(sizes.sum()), 15, generator=g)
    index = torch.repeat_interleave(torch.arange(small + 1), sizes)

    def call():
        fwd_bwd(x.clone().requires_grad_(), 4, "badmm-e", index=index)

    peak = peak_bytes(call)
    assert peak <= 0.5 * 2**30, f"{peak / 2**20:.0f} MiB"
    # O(N_total × D), plus the (B, N_max) bool mask of the batch bookkeeping (_batching.py)
    assert peak <= 40 * x.numel() * 4 + (small + 1) * 20000, f"{peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("method,variant", list(itertools.product(METHODS, ("exact", "paper"))))
def test_segments_match_dense_per_set(method, variant):
    # a ragged batch in shuffled row order, solved on segments, against each set solved alone
    sizes = [5, 1, 0, 8]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(sizes), 6, generator=g, dtype=torch.float64)
    index = torch.repeat_interleave(torch.arange(4), torch.tensor(sizes))
    perm = torch.randperm(len(index), generator=g)
    xr, ir = x[perm].requires_grad_(), index[perm]
    q0 = torch.rand(len(index), generator=g, dtype=torch.float64)[perm] + 0.5
    kw = dict(method=method, variant=variant, num_iters=3, backend="torch", a1=0.7, rho=1.3)
    y, plan = rt.rot_pool(xr, ir, dim_size=4, q0=q0, return_plan=True, **kw)
    for b, n in enumerate(sizes):
        rows = ir == b
        if n == 0:
            assert torch.equal(y[b], torch.zeros(6, dtype=y.dtype))
            continue
        yb, pb = rt.rot_pool(xr[rows][None], q0=q0[rows][None], return_plan=True, **kw)
        assert rel_err(y[b], yb[0]) <= 1e-12
        assert rel_err(plan[rows], pb[0]) <= 1e-12
    y.sum().backward()
    assert torch.isfinite(xr.grad).all()


# ----------------------------------------------------------------------------------------------
# B-Q stability
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_fp32_matches_fp64_on_the_fig7_grid_at_T16(method):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 6, generator=g)
    worst = 0.0
    for a1, a23 in itertools.product(GRID, GRID):
        kw = dict(method=method, num_iters=16, a1=a1, a2=a23, a3=a23, backend="torch")
        y32 = rt.rot_pool(x, **kw)
        y64 = rt.rot_pool(x.double(), **kw)
        worst = max(worst, rel_err(y32, y64))
    assert worst <= 1e-3


def test_badmm_q_issue_example_is_stable():
    # issue #16: fp32 and fp64 differed by 3.9, |dL/dx| up to 3.8e14 with the spec's B-Q step
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, 16, generator=g)
    kw = dict(method="badmm-q", num_iters=16, a1=1e4, a2=1e-4, a3=1e-4, backend="torch")
    x64 = x.double().requires_grad_()
    y64 = rt.rot_pool(x64, **kw)
    y64.sum().backward()
    assert (rt.rot_pool(x, **kw).double() - y64).abs().max() <= 1e-5
    assert x64.grad.abs().max() <= 10.0


# ----------------------------------------------------------------------------------------------
# edges: finite, or a ValueError naming the argument
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("learn", [False, True], ids=["fixed", "learnable"])
def test_large_x_is_finite(method, learn):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 7, 5, generator=g) * 1e30 / 4).requires_grad_()   # |x| <= 1e30
    a = 1e-3 if learn else 1e-6                     # at the stated limits of rotp_triton._checks
    w = {k: torch.full((4,), a).requires_grad_(learn) for k in ("a1", "rho")}
    y = rt.rot_pool(x, method=method, num_iters=4, backend="torch", **w)
    assert torch.isfinite(y).all()
    grads = torch.autograd.grad(y.sum(), [x] + ([*w.values()] if learn else []),
                                allow_unused=True)          # S does not use rho
    assert all(gr is None or torch.isfinite(gr).all() for gr in grads)


@pytest.mark.parametrize("kw,match", [
    (dict(a1=1e-40), "a1 must be >= 1e-12"),
    (dict(rho=1e-40), "rho must be >= 1e-12"),
    (dict(a1=1e-6, scale=1e34), r"x has entries up to .* min\(a1, rho\)"),
    (dict(scale=3e38), "x has entries up to"),
], ids=["subnormal-a1", "subnormal-rho", "x-over-a1", "x-near-max"])
def test_out_of_range_values_raise(kw, match):
    scale = kw.pop("scale", 1.0)
    x = torch.randn(2, 5, 3).clamp(-1, 1) * scale
    with pytest.raises(ValueError, match=match):
        rt.rot_pool(x, backend="torch", **kw)


def test_learnable_weights_have_a_floor():
    w = ROTWeights(4, a1=2.0, rho=100.0)
    with torch.no_grad():
        w.raw_a1.fill_(-1e4)                        # what Adam at a large lr can do
        w.raw_rho.fill_(-1e30)
    out = w()
    assert torch.all(out["a1"] >= FLOOR_REL * 2.0) and torch.all(out["rho"] >= FLOOR_REL * 100.0)
    assert out["a1"].min() > 0
    with torch.no_grad():
        w.raw_a1.zero_()
    assert torch.allclose(w()["a1"], torch.full((4,), 2.0))  # the initial value is kept


def test_fixed_weight_below_minimum_is_rejected():
    with pytest.raises(ValueError, match="a1 must be >= 1e-12"):
        ROTWeights(4, a1=1e-40, learn_a1=False)
    with pytest.raises(ValueError, match="rho must be >= 1e-12"):
        rt.ROTPool(8, rho=1e-20, learn_rho=False)


@pytest.mark.parametrize("layer", ["ROTPool2d", "AdaptiveROTPool2d-2"])
def test_image_layers_check_values(layer):
    m = rt.ROTPool2d(4, 2) if layer == "ROTPool2d" else rt.AdaptiveROTPool2d(4, output_size=2)
    x = torch.randn(2, 4, 4, 4)
    x[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="x contains non-finite"):
        m(x)


def test_set_fusion_names_group_index():
    m = rt.SetFusionROTPool(6)
    x = torch.randn(10, 6)
    index = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    with pytest.raises(ValueError, match="group_index"):
        m(x, index, group_index=torch.tensor([0, 0, 1]))   # 4 member sets


def test_gsp_huge_gamma_is_rejected_not_mean_pooling():
    from rotp_triton.ops.gsp import GAMMA_MAX, gsp_pool
    g = torch.Generator().manual_seed(0)
    x, protos = torch.randn(2, 49, 8, generator=g), torch.randn(16, 8, generator=g)
    out = gsp_pool(x, protos, gamma=GAMMA_MAX, return_plan=True)
    assert torch.allclose(out.plan.sum((1, 2)), torch.full((2,), 0.3), rtol=1e-3)
    with pytest.raises(ValueError, match="gamma"):
        gsp_pool(x, protos, gamma=5e37)
