"""Generalized Sum Pooling: rotp_triton.ops.gsp / nn.gsp against reference/gsp.py and the
properties of DESIGN §6 (mass mu transported, weights averaging 1, histogram on the simplex,
global average pooling limits, alpha solving its scalar equation, implicit gradients)."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reference.gsp import gsp_reference  # noqa: E402
from rotp_triton.nn.gsp import GSPool  # noqa: E402
from rotp_triton.ops.gsp import gsp_pool  # noqa: E402

F64 = torch.float64


def ragged(lengths, d, dtype=F64, seed=0):
    """Random ragged batch: x (sum lengths, d), index, ptr, list of per-set tensors."""
    g = torch.Generator().manual_seed(seed)
    sets = [torch.randn(n, d, generator=g, dtype=dtype) for n in lengths]
    x = torch.cat(sets) if sets else torch.zeros(0, d, dtype=dtype)
    index = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(lengths)])
    ptr = torch.zeros(len(lengths) + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return x, index, ptr, sets


def params(d_in, d_out, K, dtype=F64, seed=1, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    W = scale * torch.randn(d_out, d_in, generator=g, dtype=dtype)
    Z = scale * torch.randn(K, d_out, generator=g, dtype=dtype)
    return W, Z


# ------------------------------------------------------------------------------------------
# against the reference (the paper's fixed point, run to convergence)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mass,gamma,K", [(0.3, 5.0, 6), (0.8, 2.0, 1), (0.05, 12.0, 3),
                                          (1.0, 5.0, 4), (0.5, 0.0, 2)])
def test_forward_matches_reference(mass, gamma, K):
    lengths = [7, 1, 0, 13, 2]
    x, index, ptr, sets = ragged(lengths, 5)
    W, Z = params(5, 3, K)
    out = gsp_pool(x, Z, index, weight=W, mass=mass, gamma=gamma, tol=1e-14, return_plan=True)
    for b, xs in enumerate(sets):
        ref = gsp_reference(xs, Z, W, mass=mass, gamma=gamma, num_iters=4000, tol=1e-16)
        rows = index == b
        torch.testing.assert_close(out.pooled[b], ref.pooled, rtol=0, atol=1e-12)
        torch.testing.assert_close(out.histogram[b], ref.histogram, rtol=0, atol=1e-12)
        torch.testing.assert_close(out.plan[rows], ref.plan.T, rtol=0, atol=1e-13)
        torch.testing.assert_close(out.rho[rows], ref.rho, rtol=0, atol=1e-13)
        if len(xs) and mass < 1:
            assert math.isclose(out.alpha[b].item(), ref.alpha.item(), rel_tol=1e-9)
    assert torch.isinf(out.alpha[lengths.index(7)]) == (mass == 1.0)


def test_gradients_match_reference_unrolled():
    """Implicit gradients (package) == autograd through the converged fixed point (reference)."""
    lengths = [6, 3, 9]
    x, index, ptr, sets = ragged(lengths, 4, seed=3)
    W, Z = params(4, 3, 5, seed=4)
    W.requires_grad_(True)
    Z.requires_grad_(True)
    g = torch.Generator().manual_seed(5)
    cy = torch.randn(len(lengths), 3, generator=g, dtype=F64)
    ch = torch.randn(len(lengths), 5, generator=g, dtype=F64)
    xs = x.clone().requires_grad_(True)
    y, h = gsp_pool(xs, Z, ptr=ptr, weight=W, mass=0.4, gamma=4.0, return_histogram=True)
    gx, gW, gZ = torch.autograd.grad((y * cy).sum() + (h * ch).sum(), (xs, W, Z))
    xr = x.clone().requires_grad_(True)
    loss = 0
    for b in range(len(lengths)):
        ref = gsp_reference(xr[ptr[b]:ptr[b + 1]], Z, W, mass=0.4, gamma=4.0, num_iters=600,
                            tol=1e-16)
        loss = loss + (ref.pooled * cy[b]).sum() + (ref.histogram * ch[b]).sum()
    rx, rW, rZ = torch.autograd.grad(loss, (xr, W, Z))
    for a, r in ((gx, rx), (gW, rW), (gZ, rZ)):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("mass,gamma", [(0.35, 3.0), (0.97, 8.0), (1.0, 3.0), (0.5, 0.0)])
def test_gradcheck_implicit_alpha(mass, gamma):
    """Finite differences in float64 (empty set and a 1-sample set included)."""
    x, index, ptr, _ = ragged([4, 0, 1, 3], 3, seed=7)
    W, Z = params(3, 2, 3, seed=8, scale=0.8)
    fn = lambda x_, W_, Z_: gsp_pool(x_, Z_, index, dim_size=4, weight=W_, mass=mass,
                                     gamma=gamma, return_histogram=True)
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, W, Z))
    # full Jacobian for the default case; random projections (fast_mode) for the limits
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=(mass, gamma) != (0.35, 3.0))


# ------------------------------------------------------------------------------------------
# properties of DESIGN §6
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-11), (torch.float32, 2e-5)])
@pytest.mark.parametrize("mass", [0.1, 0.3, 0.9, 0.999])
def test_transport_mass_weights_histogram(dtype, tol, mass):
    lengths = [5, 17, 1, 40]
    x, index, ptr, _ = ragged(lengths, 6, dtype=dtype, seed=11)
    W, Z = params(6, 6, 8, dtype=dtype, seed=12, scale=0.7)
    out = gsp_pool(x, Z, ptr=ptr, weight=W, mass=mass, gamma=5.0, return_plan=True)
    n = torch.tensor(lengths, dtype=dtype)
    plan_mass = torch.zeros(len(lengths), dtype=dtype).index_add_(0, index, out.plan.sum(1))
    rho_mass = torch.zeros(len(lengths), dtype=dtype).index_add_(0, index, out.rho)
    torch.testing.assert_close(plan_mass, torch.full_like(plan_mass, mass), rtol=0, atol=tol)
    torch.testing.assert_close(rho_mass, torch.full_like(rho_mass, 1 - mass), rtol=0, atol=tol)
    # pooling weights (1/n - rho_i) / mu: their mean is 1/n, i.e. n * mean = 1
    w = (1.0 / n[index] - out.rho) / mass
    mean_w = torch.zeros(len(lengths), dtype=dtype).index_add_(0, index, w) / n
    torch.testing.assert_close(n * mean_w, torch.ones_like(n), rtol=0, atol=10 * tol / mass)
    torch.testing.assert_close(out.histogram.sum(1), torch.ones_like(n), rtol=0, atol=tol)
    assert (out.histogram >= 0).all() and (out.plan >= 0).all() and (out.rho >= 0).all()
    # pooled = sum_i w_i h_i (the formula of the spec, with rho from the plan output)
    h = x @ W.T
    want = torch.zeros(len(lengths), 6, dtype=dtype).index_add_(0, index, w[:, None] * h)
    torch.testing.assert_close(out.pooled, want, rtol=0, atol=10 * tol / mass)


def test_alpha_agrees_with_brentq():
    """alpha solves sum_i alpha rho_i s_i = mu: an independent scipy bracketing solve."""
    brentq = pytest.importorskip("scipy.optimize").brentq
    np = pytest.importorskip("numpy")
    lengths = [9, 2, 30]
    x, index, ptr, sets = ragged(lengths, 4, seed=13)
    W, Z = params(4, 5, 7, seed=14, scale=1.0)
    for mass, gamma in ((0.3, 5.0), (0.9, 1.0), (0.02, 20.0)):
        out = gsp_pool(x, Z, index, weight=W, mass=mass, gamma=gamma, tol=1e-15,
                       return_plan=True)
        for b, xs in enumerate(sets):
            h = (xs @ W.T).numpy()
            ph = h / np.maximum(1, np.linalg.norm(h, axis=1, keepdims=True))
            z = Z.numpy()
            pz = z / np.maximum(1, np.linalg.norm(z, axis=1, keepdims=True))
            c = np.linalg.norm(pz[:, None, :] - ph[None, :, :], axis=-1)
            s = np.exp(-gamma * c).sum(0)
            n = len(xs)
            g = lambda a: (a * (1.0 / n) / (1 + a * s) * s).sum() - mass
            a_ref = brentq(g, 0.0, 1e12, xtol=1e-14, rtol=1e-14, maxiter=500)
            assert math.isclose(out.alpha[b].item(), a_ref, rel_tol=1e-10)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_global_average_pooling_limits(dtype):
    x, index, ptr, sets = ragged([5, 3, 11], 4, dtype=dtype, seed=21)
    W, Z = params(4, 3, 6, dtype=dtype, seed=22)
    h = x @ W.T
    gap = torch.stack([h[index == b].mean(0) for b in range(3)])
    atol = 1e-14 if dtype == F64 else 1e-6
    # gamma = 0: every s_i = K
    y = gsp_pool(x, Z, index, weight=W, mass=0.3, gamma=0.0)
    torch.testing.assert_close(y, gap, rtol=0, atol=atol)
    # mu = 1: alpha = inf, nothing is left behind
    y = gsp_pool(x, Z, index, weight=W, mass=1.0, gamma=5.0)
    torch.testing.assert_close(y, gap, rtol=0, atol=atol)
    # identical features (equal s_i); the unit-ball projection makes a common scale irrelevant
    xi = x[:1].expand(6, 4) * torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 2.0], dtype=dtype)[:, None] * 3
    y, hist = gsp_pool(xi, Z, ptr=torch.tensor([0, 3, 6]), weight=W, mass=0.3, gamma=5.0,
                       return_histogram=True)
    hi = xi @ W.T
    torch.testing.assert_close(y, torch.stack([hi[:3].mean(0), hi[3:].mean(0)]), rtol=0,
                               atol=atol)
    torch.testing.assert_close(hist[0], hist[1], rtol=0, atol=atol)


def test_large_gamma_is_finite_and_accurate():
    """gamma = 300 underflows exp(-gamma c) in float32; the log-domain solve does not care."""
    x, index, ptr, _ = ragged([8, 20], 5, dtype=torch.float32, seed=31)
    W, Z = params(5, 5, 4, dtype=torch.float32, seed=32, scale=1.0)
    xr = x.clone().requires_grad_(True)
    y, h = gsp_pool(xr, Z, ptr=ptr, weight=W, mass=0.3, gamma=300.0, return_histogram=True)
    (y.sum() + h.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(h).all() and torch.isfinite(xr.grad).all()
    y64 = gsp_pool(x.double(), Z.double(), ptr=ptr, weight=W.double(), mass=0.3, gamma=300.0)
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=1e-3)


# ------------------------------------------------------------------------------------------
# batching, layouts, images
# ------------------------------------------------------------------------------------------
def test_batch_invariance():
    lengths = [4, 0, 9, 1, 6]
    x, index, ptr, sets = ragged(lengths, 5, seed=41)
    W, Z = params(5, 4, 6, seed=42)
    kw = dict(weight=W, mass=0.3, gamma=5.0, return_histogram=True)
    y_idx, h_idx = gsp_pool(x, Z, index, **kw)
    y_ptr, h_ptr = gsp_pool(x, Z, ptr=ptr, **kw)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    y_perm, h_perm = gsp_pool(x[perm], Z, index[perm], **kw)
    for y, h in ((y_ptr, h_ptr), (y_perm, h_perm)):
        torch.testing.assert_close(y, y_idx, rtol=0, atol=1e-13)
        torch.testing.assert_close(h, h_idx, rtol=0, atol=1e-13)
    for b, xs in enumerate(sets):
        if len(xs):
            y1, h1 = gsp_pool(xs[None], Z, **kw)                     # dense, alone
            torch.testing.assert_close(y1[0], y_idx[b], rtol=0, atol=1e-13)
            torch.testing.assert_close(h1[0], h_idx[b], rtol=0, atol=1e-13)
    # dense with a mask == ragged
    N = max(lengths)
    dense = torch.randn(len(lengths), N, 5, dtype=F64)              # garbage in the padding
    mask = torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]
    dense[mask] = x
    y_m, h_m = gsp_pool(dense, Z, mask=mask, **kw)
    torch.testing.assert_close(y_m, y_idx, rtol=0, atol=1e-13)
    # a dense batch of equal sizes == the same sets given ragged
    xd = torch.randn(3, 7, 5, dtype=F64)
    yd = gsp_pool(xd, Z, weight=W)
    yr = gsp_pool(xd.reshape(21, 5), Z, ptr=torch.tensor([0, 7, 14, 21]), weight=W)
    torch.testing.assert_close(yd, yr, rtol=0, atol=1e-13)


def test_empty_sets_zero_output_and_gradient():
    x, index, ptr, _ = ragged([0, 3, 0], 4, seed=51)
    W, Z = params(4, 4, 5, seed=52)
    W.requires_grad_(True)
    Z.requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    out = gsp_pool(xr, Z, ptr=ptr, weight=W, return_plan=True)
    assert (out.pooled[[0, 2]] == 0).all() and (out.histogram[[0, 2]] == 0).all()
    assert (out.alpha[[0, 2]] == 0).all()
    (out.pooled.sum() + out.histogram.sum()).backward()
    for t in (xr, W, Z):
        assert torch.isfinite(t.grad).all()
    # all sets empty
    y, h = gsp_pool(torch.zeros(0, 4, dtype=F64), Z, ptr=torch.tensor([0, 0, 0]), weight=W,
                    return_histogram=True)
    assert y.shape == (2, 4) and h.shape == (2, 5) and (y == 0).all() and (h == 0).all()
    # an empty set's gradient contribution is exactly zero
    Z.grad = None
    gsp_pool(torch.zeros(0, 4, dtype=F64), Z, ptr=torch.tensor([0, 0]), weight=W,
             return_histogram=True)[1].sum().backward()
    assert Z.grad is None or (Z.grad == 0).all()


def test_image_input_equals_set_path():
    pool = GSPool(6, 5, num_prototypes=7).double()
    x = torch.randn(3, 6, 4, 5, dtype=F64)
    y_img, h_img = pool(x, return_histogram=True)
    y_set, h_set = pool(x.flatten(2).transpose(1, 2), return_histogram=True)
    torch.testing.assert_close(y_img, y_set, rtol=0, atol=1e-14)
    torch.testing.assert_close(h_img, h_set, rtol=0, atol=1e-14)
    assert y_img.shape == (3, 5) and h_img.shape == (3, 7)


# ------------------------------------------------------------------------------------------
# module, dtypes, errors
# ------------------------------------------------------------------------------------------
def test_module_api():
    pool = GSPool(256, 128)
    assert repr(pool) == "GSPool(256, 128, num_prototypes=64, mass=0.3, gamma=5.0, num_iters=100)"
    assert repr(GSPool(16, num_prototypes=8, mass=0.5, gamma=2.0)) == \
        "GSPool(16, 16, num_prototypes=8, mass=0.5, gamma=2.0, num_iters=100)"
    assert pool.weight.shape == (128, 256) and pool.prototypes.shape == (64, 128)
    before = pool.prototypes.detach().clone()
    pool.reset_parameters()
    assert not torch.equal(before, pool.prototypes)
    assert {n for n, _ in pool.named_parameters()} == {"weight", "prototypes"}
    x = torch.randn(2, 256, 3, 3)
    x0 = x.clone()
    y = pool(x)
    assert torch.equal(x, x0)                                       # caller's tensor untouched
    assert y.shape == (2, 128) and y.dtype == torch.float32
    y.sum().backward()
    assert pool.weight.grad is not None and pool.prototypes.grad is not None
    out = pool(x, return_plan=True)
    assert out.plan.shape == (2, 9, 64) and out.rho.shape == (2, 9) and out.alpha.shape == (2,)


def test_kmeans_init_of_prototypes():
    g = torch.Generator().manual_seed(61)
    pool = GSPool(3, 3, num_prototypes=2)
    with torch.no_grad():
        pool.weight.copy_(torch.eye(3))
    centers = torch.tensor([[0.5, 0.0, 0.0], [0.0, -0.5, 0.0]])
    x = (centers[:, None, :] + 0.01 * torch.randn(2, 30, 3, generator=g)).reshape(60, 3)
    assert pool.init_kmeans(x, ptr=torch.tensor([0, 25, 60]), generator=g) is pool
    dist = torch.cdist(pool.prototypes.detach(), centers)
    assert (dist.min(0).values < 0.02).all() and (dist.min(1).values < 0.02).all()
    with pytest.raises(ValueError, match="num_prototypes"):
        GSPool(3, num_prototypes=8).init_kmeans(x[:5], ptr=torch.tensor([0, 5]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_keep_dtype(dtype):
    pool = GSPool(8, 8, num_prototypes=4)
    x = torch.randn(2, 10, 8)
    y = pool(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), pool(x.to(dtype).float()), rtol=1e-2, atol=1e-2)


def test_bad_inputs():
    pool = GSPool(4, 3, num_prototypes=2)
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="in_channels"):
        pool(torch.randn(5, 3), ptr=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="in_channels"):
        pool(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="x"):
        pool(torch.randn(4))
    with pytest.raises(TypeError, match="x"):
        pool(torch.ones(2, 3, 4, dtype=torch.long))
    # the layer (a PyG Aggregation) takes a 2-D x without index as one set, as PyG does
    assert torch.allclose(pool(x), pool(x, ptr=torch.tensor([0, 5])))
    with pytest.raises(ValueError, match="ptr"):
        pool(x, ptr=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="index"):
        pool(x, index=torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="non-finite"):
        pool(torch.tensor([[float("nan")] * 4]), ptr=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="index/ptr"):
        pool(torch.randn(1, 4, 2, 2), index=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="mask"):
        pool(torch.randn(2, 3, 4), mask=torch.ones(2, 4, dtype=torch.bool))
    for bad in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="mass"):
            GSPool(4, mass=bad)
    with pytest.raises(ValueError, match="gamma"):
        GSPool(4, gamma=-1.0)
    with pytest.raises(ValueError, match="num_iters"):
        GSPool(4, num_iters=0)
    with pytest.raises(TypeError, match="num_prototypes"):
        GSPool(4, num_prototypes=2.5)
    with pytest.raises(ValueError, match="in_channels"):
        GSPool(0)
    with pytest.raises(ValueError, match="prototypes"):
        gsp_pool(x, torch.randn(2, 5), ptr=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="weight"):
        gsp_pool(x, torch.randn(2, 3), ptr=torch.tensor([0, 5]), weight=torch.randn(3, 5))
    with pytest.raises(ValueError, match="tol"):
        gsp_pool(x, torch.randn(2, 4), ptr=torch.tensor([0, 5]), tol=0.0)
