"""OTK embedding: rotp_triton.ops.otk / nn.otk against reference/otk.py, POT, and the
properties of DESIGN §6 (mean-pooling limits, column sums, log/scaling agreement, permutations)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reference.otk import otk_reference  # noqa: E402
from rotp_triton.nn.otk import OTKPool  # noqa: E402
from rotp_triton.ops.otk import kmeans, otk_pool  # noqa: E402

F64 = torch.float64


def ragged(lengths, d, dtype=F64, seed=0):
    """Random ragged batch: x (sum lengths, d), index, ptr, list of per-set tensors."""
    g = torch.Generator().manual_seed(seed)
    sets = [torch.randn(n, d, generator=g, dtype=dtype) for n in lengths]
    x = torch.cat(sets)
    index = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(lengths)])
    ptr = torch.zeros(len(lengths) + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return x, index, ptr, sets


def supports(h, p, d, dtype=F64, seed=1, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(h, p, d, generator=g, dtype=dtype)


def seg_sum(v, index, B):
    return torch.zeros((B,) + tuple(v.shape[1:]), dtype=v.dtype).index_add_(0, index, v)


# ------------------------------------------------------------------------------------------
# against the reference and POT
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("log_domain", [True, False])
@pytest.mark.parametrize("h,p,d,eps", [(1, 10, 5, 0.1), (2, 3, 1, 0.5), (3, 1, 4, 0.05),
                                       (2, 7, 6, 1.0)])
def test_forward_matches_reference(log_domain, h, p, d, eps):
    lengths = [6, 1, 0, 13, 2]
    x, index, ptr, sets = ragged(lengths, d, seed=h * 10 + p)
    W = supports(h, p, d, seed=p)
    y, A = otk_pool(x, W, index, eps=eps, num_iters=7, log_domain=log_domain, return_plan=True)
    assert y.shape == (len(lengths), p, h * d) and A.shape == (x.shape[0], h, p)
    for b, xs in enumerate(sets):
        ref, P = otk_reference(xs, W, eps=eps, num_iters=7, log_domain=log_domain,
                               return_plan=True)
        torch.testing.assert_close(y[b], ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(A[index == b], P.permute(1, 0, 2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("log_domain", [True, False])
def test_gradients_match_reference(log_domain):
    lengths = [5, 1, 8]
    x, index, ptr, sets = ragged(lengths, 3, seed=2)
    W = supports(2, 4, 3, seed=3).requires_grad_(True)
    c = torch.randn(3, 4, 6, dtype=F64, generator=torch.Generator().manual_seed(4))
    xs = x.clone().requires_grad_(True)
    y = otk_pool(xs, W, ptr=ptr, eps=0.3, num_iters=6, log_domain=log_domain)
    gx, gW = torch.autograd.grad((y * c).sum(), (xs, W))
    xr = x.clone().requires_grad_(True)
    loss = sum((otk_reference(xr[ptr[b]:ptr[b + 1]], W, eps=0.3, num_iters=6,
                              log_domain=log_domain) * c[b]).sum() for b in range(3))
    rx, rW = torch.autograd.grad(loss, (xr, W))
    torch.testing.assert_close(gx, rx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gW, rW, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("log_domain", [True, False])
def test_gradcheck(log_domain):
    x, index, ptr, _ = ragged([3, 1, 4], 2, seed=5)
    W = supports(2, 3, 2, seed=6)
    fn = lambda x_, W_: otk_pool(x_, W_, index, dim_size=4, eps=0.5, num_iters=4,
                                 log_domain=log_domain)
    assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(True),
                                         W.clone().requires_grad_(True)), atol=1e-7, rtol=1e-5)


def test_converged_plan_matches_pot():
    """With many iterations the plan is POT's entropic OT plan for cost -S (an independent solver)."""
    ot = pytest.importorskip("ot")
    x, index, ptr, sets = ragged([9, 4], 3, seed=7)
    W = supports(1, 5, 3, seed=8, scale=1.0)
    eps = 0.2
    _, A = otk_pool(x, W, ptr=ptr, eps=eps, num_iters=400, return_plan=True)
    for b, xs in enumerate(sets):
        n, p = xs.shape[0], W.shape[1]
        M = -(xs @ W[0].T)
        P = ot.sinkhorn(torch.full((n,), 1.0 / n, dtype=F64), torch.full((p,), 1.0 / p, dtype=F64),
                        M, eps, method="sinkhorn_log", numItermax=100000, stopThr=1e-15)
        torch.testing.assert_close(A[index == b, 0], p * P, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------
# properties of DESIGN §6
# ------------------------------------------------------------------------------------------
# (the scaling domain underflows for eps = 1e-3: see test_log_domain_is_stable)
@pytest.mark.parametrize("eps,log_domain", [(1e-3, True), (0.1, True), (10.0, True),
                                            (0.1, False), (10.0, False)])
def test_single_support_is_mean_pooling(eps, log_domain):
    x, index, ptr, sets = ragged([7, 1, 12], 4, seed=9)
    W = supports(3, 1, 4, seed=10, scale=3.0)                      # p = 1, h = 3, large W
    y = otk_pool(x, W, index, eps=eps, log_domain=log_domain)
    mean = torch.stack([s.mean(0) for s in sets])
    # softmax_i(S_i/eps + f_i) cancels terms of size |S|/eps (~3e4 at eps = 1e-3): rounding
    # error ~ 1e-16 |S|/eps
    atol = max(1e-13, 1e-14 * 30.0 / eps)
    torch.testing.assert_close(y, mean.repeat(1, 3)[:, None, :], rtol=0, atol=atol)


@pytest.mark.parametrize("log_domain", [True, False])
def test_zero_supports_are_mean_pooling(log_domain):
    x, index, ptr, sets = ragged([5, 2, 9], 3, seed=11)
    y = otk_pool(x, torch.zeros(2, 6, 3, dtype=F64), ptr=ptr, eps=0.1, log_domain=log_domain)
    mean = torch.stack([s.mean(0) for s in sets])
    torch.testing.assert_close(y, mean.repeat(1, 2)[:, None, :].expand(3, 6, 6), rtol=0,
                               atol=1e-14)


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-13), (torch.float32, 1e-5)])
def test_columns_sum_to_one_rows_to_p_over_n(dtype, tol):
    lengths = [6, 1, 20]
    x, index, ptr, sets = ragged(lengths, 5, dtype=dtype, seed=12)
    W = supports(2, 4, 5, dtype=dtype, seed=13)
    y, A = otk_pool(x, W, index, eps=0.5, num_iters=10, return_plan=True)
    cols = seg_sum(A, index, 3)                                    # (B, h, p)
    torch.testing.assert_close(cols, torch.ones_like(cols), rtol=0, atol=tol)
    assert (A >= 0).all()
    # each output row is the convex combination sum_i A_ij x_i
    want = torch.einsum("nhp,nd->nphd", A, x)
    torch.testing.assert_close(y, seg_sum(want, index, 3).reshape(3, 4, 10), rtol=0, atol=tol * 10)
    # converged: the sample marginal 1/n holds as well (A = p P, so rows sum to p/n)
    _, A = otk_pool(x, W, index, eps=0.5, num_iters=300, return_plan=True)
    n = torch.tensor(lengths, dtype=dtype)[index]
    torch.testing.assert_close(A.sum(-1), (4 / n)[:, None].expand(-1, 2), rtol=0, atol=tol * 10)


def test_log_and_scaling_domains_agree():
    x, index, ptr, _ = ragged([8, 3, 15], 4, seed=14)
    W = supports(2, 5, 4, seed=15)
    for eps in (0.05, 0.3, 2.0):
        y_log = otk_pool(x, W, index, eps=eps, num_iters=20, log_domain=True)
        y_exp = otk_pool(x, W, index, eps=eps, num_iters=20, log_domain=False)
        torch.testing.assert_close(y_log, y_exp, rtol=0, atol=1e-12)
    x32, W32 = x.float(), W.float()
    torch.testing.assert_close(otk_pool(x32, W32, index, eps=0.1, log_domain=True),
                               otk_pool(x32, W32, index, eps=0.1, log_domain=False),
                               rtol=0, atol=1e-5)


def test_log_domain_is_stable():
    """eps = 1e-3 in float32: exp(S/eps) spans far more than float32's range."""
    x, index, ptr, _ = ragged([10, 4], 3, dtype=torch.float32, seed=16)
    W = supports(1, 3, 3, dtype=torch.float32, seed=17, scale=2.0).requires_grad_(True)
    y, A = otk_pool(x, W, ptr=ptr, eps=1e-3, num_iters=10, return_plan=True)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(W.grad).all()
    torch.testing.assert_close(seg_sum(A, index, 2), torch.ones(2, 1, 3), rtol=0, atol=1e-5)


def test_permutations():
    g = torch.Generator().manual_seed(18)
    x = torch.randn(2, 9, 4, dtype=F64, generator=g)
    W = supports(3, 5, 4, seed=19)
    y = otk_pool(x, W, eps=0.2)
    # permuting a set's samples leaves the output unchanged
    perm = torch.randperm(9, generator=g)
    torch.testing.assert_close(otk_pool(x[:, perm], W, eps=0.2), y, rtol=0, atol=1e-13)
    # permuting the supports permutes the output rows
    sp = torch.randperm(5, generator=g)
    torch.testing.assert_close(otk_pool(x, W[:, sp], eps=0.2), y[:, sp], rtol=0, atol=1e-13)
    # permuting the heads permutes the feature blocks
    hp = torch.tensor([2, 0, 1])
    yh = otk_pool(x, W[hp], eps=0.2).reshape(2, 5, 3, 4)
    torch.testing.assert_close(yh, y.reshape(2, 5, 3, 4)[:, :, hp], rtol=0, atol=1e-13)


# ------------------------------------------------------------------------------------------
# batching, layouts, images
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("log_domain", [True, False])
def test_batch_invariance(log_domain):
    lengths = [4, 0, 9, 1, 6]
    x, index, ptr, sets = ragged(lengths, 5, seed=20)
    W = supports(2, 3, 5, seed=21)
    kw = dict(eps=0.2, log_domain=log_domain)
    y_idx = otk_pool(x, W, index, **kw)
    torch.testing.assert_close(otk_pool(x, W, ptr=ptr, **kw), y_idx, rtol=0, atol=1e-13)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(otk_pool(x[perm], W, index[perm], **kw), y_idx, rtol=0, atol=1e-13)
    for b, xs in enumerate(sets):
        if len(xs):
            torch.testing.assert_close(otk_pool(xs[None], W, **kw)[0], y_idx[b], rtol=0,
                                       atol=1e-13)
    N = max(lengths)
    dense = torch.randn(len(lengths), N, 5, dtype=F64)              # garbage in the padding
    mask = torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]
    dense[mask] = x
    torch.testing.assert_close(otk_pool(dense, W, mask=mask, **kw), y_idx, rtol=0, atol=1e-13)
    assert (y_idx[1] == 0).all()


def test_empty_sets_zero_output_and_gradient():
    x, index, ptr, _ = ragged([0, 3, 0], 4, seed=22)
    W = supports(2, 3, 4, seed=23).requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    for log_domain in (True, False):
        y = otk_pool(xr, W, ptr=ptr, log_domain=log_domain)
        assert (y[[0, 2]] == 0).all()
        y.sum().backward()
        assert torch.isfinite(xr.grad).all() and torch.isfinite(W.grad).all()
    W.grad = None
    y = otk_pool(torch.zeros(0, 4, dtype=F64), W, ptr=torch.tensor([0, 0, 0]))
    assert y.shape == (2, 3, 8) and (y == 0).all()
    y.sum().backward()
    assert (W.grad == 0).all()


def test_image_input_equals_set_path():
    pool = OTKPool(6, num_supports=4, heads=2).double()
    x = torch.randn(3, 6, 5, 4, dtype=F64)
    y_img, A_img = pool(x, return_plan=True)
    y_set, A_set = pool(x.flatten(2).transpose(1, 2), return_plan=True)
    torch.testing.assert_close(y_img, y_set, rtol=0, atol=1e-14)
    torch.testing.assert_close(A_img, A_set, rtol=0, atol=1e-14)
    assert y_img.shape == (3, 4, 12) and A_img.shape == (3, 20, 2, 4)


# ------------------------------------------------------------------------------------------
# module, k-means, dtypes, errors
# ------------------------------------------------------------------------------------------
def test_module_api():
    pool = OTKPool(32, num_supports=8, heads=2)
    assert repr(pool) == "OTKPool(32, num_supports=8, heads=2, eps=0.1, num_iters=10, log_domain=True)"
    assert repr(OTKPool(4)) == "OTKPool(4, num_supports=10, heads=1, eps=0.1, num_iters=10, log_domain=True)"
    assert pool.weight.shape == (2, 8, 32) and pool.out_channels == 64
    before = pool.weight.detach().clone()
    pool.reset_parameters()
    assert not torch.equal(before, pool.weight)
    x = torch.randn(20, 32)
    x0 = x.clone()
    y = pool(x, ptr=torch.tensor([0, 5, 20]))
    assert torch.equal(x, x0) and y.shape == (2, 8, 64) and y.dtype == torch.float32
    y.sum().backward()
    assert pool.weight.grad is not None


def test_kmeans_init_recovers_clusters():
    g = torch.Generator().manual_seed(24)
    centers = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0]])
    pts = (centers[:, None, :] + 0.1 * torch.randn(3, 40, 2, generator=g)).reshape(120, 2)
    C = kmeans(pts, 3, generator=g)
    dist = torch.cdist(C, centers)
    assert (dist.min(0).values < 0.1).all() and (dist.min(1).values < 0.1).all()
    pool = OTKPool(2, num_supports=3, heads=2)
    assert pool.init_kmeans(pts.reshape(4, 30, 2), generator=g) is pool
    for c in range(2):
        dist = torch.cdist(pool.weight[c].detach(), centers)
        assert (dist.min(0).values < 0.1).all()
    with pytest.raises(ValueError, match="num_supports"):
        OTKPool(2, num_supports=50).init_kmeans(pts[:10], ptr=torch.tensor([0, 10]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_keep_dtype(dtype):
    pool = OTKPool(8, num_supports=3)
    x = torch.randn(2, 10, 8)
    y = pool(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), pool(x.to(dtype).float()), rtol=1e-2, atol=1e-2)


def test_bad_inputs():
    pool = OTKPool(4, num_supports=3)
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="dim"):
        pool(torch.randn(5, 3), ptr=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="dim"):
        pool(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="x"):
        pool(torch.randn(4))
    with pytest.raises(TypeError, match="x"):
        pool(torch.ones(2, 3, 4, dtype=torch.long))
    # the layer (a PyG Aggregation) takes a 2-D x without index as one set, as PyG does
    assert torch.allclose(pool(x), pool(x, ptr=torch.tensor([0, 5])))
    with pytest.raises(ValueError, match="ptr"):
        pool(x, ptr=torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match="index"):
        pool(x, index=torch.tensor([0, -1, 0, 0, 0]))
    with pytest.raises(ValueError, match="non-finite"):
        pool(torch.tensor([[float("inf")] * 4]), ptr=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="mask"):
        pool(torch.randn(2, 3, 4), mask=torch.ones(2, 3))
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="eps"):
            OTKPool(4, eps=bad)
    with pytest.raises(ValueError, match="num_iters"):
        OTKPool(4, num_iters=0)
    with pytest.raises(ValueError, match="heads"):
        OTKPool(4, heads=0)
    with pytest.raises(TypeError, match="log_domain"):
        OTKPool(4, log_domain="yes")
    with pytest.raises(ValueError, match="weight"):
        otk_pool(x, torch.randn(2, 3, 5), ptr=torch.tensor([0, 5]))
