"""scale="auto" (the modules' default): the near-mean start holds whatever the features' scale
(issue 15; rotp_triton/ops/rot/spread.py)."""
import pytest
import torch

import rotp_triton as rt

METHODS = ("sinkhorn", "badmm-e", "badmm-q")
# the documented start (tests/test_modules.py::test_default_layer_pools_close_to_the_mean):
# mean |y - mean| / std within ~1% (S), 2% (B-E), 4% (B-Q)
BOUND = {"sinkhorn": 0.015, "badmm-e": 0.03, "badmm-q": 0.05}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0], ids=["x0.01", "x1", "x100"])
def test_default_start_is_near_the_mean_at_any_scale(method, scale):
    g = torch.Generator().manual_seed(0)
    x = scale * torch.randn(32, 49, 32, generator=g) + 3 * scale
    y = rt.ROTPool(32, method=method)(x)
    dev = ((y - x.mean(1)) / x.std(1)).abs().mean().item()
    assert 1e-3 < dev < BOUND[method], dev
    img = x.transpose(1, 2).reshape(32, 32, 7, 7)
    y2 = rt.AdaptiveROTPool2d(32, method=method, flatten=True)(img)
    dev2 = ((y2 - x.mean(1)) / x.std(1)).abs().mean().item()
    assert 1e-3 < dev2 < BOUND[method], dev2


@pytest.mark.parametrize("method", METHODS)
def test_auto_scale_is_scale_equivariant_and_none_is_not(method):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 9, 5, generator=g, dtype=torch.float64)
    layer = rt.ROTPool(5, method=method, num_iters=3).double()
    for c in (0.01, 100.0):
        assert torch.allclose(layer(c * x), c * layer(x), rtol=1e-10, atol=0)
    # without it, features ×100 pool far from the mean (the behaviour scale="auto" fixes)
    fixed = rt.ROTPool(5, method=method, num_iters=3, scale=None).double()
    dev = ((fixed(100 * x) - 100 * x.mean(1)) / (100 * x.std(1))).abs().mean().item()
    assert dev > 5 * BOUND[method], dev


def test_auto_scale_per_set_ragged_dense_and_masked_agree():
    g = torch.Generator().manual_seed(2)
    sizes = [4, 1, 6]
    unit = torch.tensor([0.1, 1.0, 50.0], dtype=torch.float64)[:, None, None]
    x = torch.randn(3, 6, 5, generator=g, dtype=torch.float64) * unit
    mask = torch.arange(6)[None, :] < torch.tensor(sizes)[:, None]
    layer = rt.ROTPool(5, num_iters=3).double()
    rows = x[mask]
    ptr = torch.tensor([0, 4, 5, 11])
    y_ragged = layer(rows, ptr=ptr)
    assert torch.allclose(layer(x, mask=mask), y_ragged, rtol=1e-12, atol=0)
    index = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    assert torch.allclose(layer(rows, index), y_ragged, rtol=1e-12, atol=0)
    # a set alone = in the batch (the spread is per set); one sample: its own value
    for b in range(3):
        assert torch.allclose(layer(x[b:b + 1, :sizes[b]])[0], y_ragged[b], rtol=1e-12, atol=0)
    assert torch.allclose(y_ragged[1], x[1, 0], rtol=1e-12, atol=1e-12)


def test_scale_argument_checks_and_fixed_unit():
    with pytest.raises(ValueError, match="scale"):
        rt.ROTPool(4, scale="std")
    with pytest.raises(ValueError, match="scale"):
        rt.AdaptiveROTPool2d(4, scale=0.0)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    # a fixed unit s: the weights are in units of s, so features × s pool like unit features
    a = rt.ROTPool(4, scale=10.0, num_iters=2).double()
    assert torch.allclose(a(x * 10.0), 10.0 * rt.ROTPool(4, scale=None, num_iters=2).double()(x),
                          rtol=1e-10)


def _layer_cases():
    """The three folded kernel families (window; Sinkhorn and B-ADMM sets, dense and ragged)."""
    g = torch.Generator().manual_seed(5)
    img = torch.randn(2, 6, 3, 4, generator=g) + 0.5
    sets = torch.randn(11, 6, generator=g) - 0.5
    ptr = torch.tensor([0, 4, 4, 11])
    for method in METHODS:
        yield f"AdaptiveROTPool2d {method}", (lambda m=method, **k: rt.AdaptiveROTPool2d(
            6, method=m, num_iters=2, **k)), img, {}
    yield "ROTPool ptr badmm-e", (lambda **k: rt.ROTPool(6, num_iters=2, **k)), sets, \
        {"ptr": ptr}
    yield "ROTPool2d badmm-e", (lambda **k: rt.ROTPool2d(6, 2, num_iters=2, **k)), img, {}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("c", [1e30, 1e-30], ids=["x1e30", "x1e-30"])
def test_auto_scale_at_extreme_magnitudes(c, backend):
    """fp32 features near the ends of the format (|x| ~ 1e30: squares overflow from ~1.8e19;
    ~1e-30: squares underflow): the spread is formed without squaring x itself (scaled sums of
    squares: ops/rot/spread.py, the spread kernels), and no kernel forms x² where the scale is
    folded in, so y(c·x) = c·y(x) and ∂/∂x at c·x = ∂/∂x at x (scale equivariance) hold
    there too, finite, on the kernels and the torch path alike."""
    if backend == "triton":
        pytest.importorskip("triton")
    for name, make, x, kw in _layer_cases():
        outs = []
        for xc in (x, c * x):
            torch.manual_seed(0)
            layer = make(backend=backend)
            xl = xc.clone().requires_grad_()
            y = layer(xl, **kw)
            w = torch.linspace(-1, 1, y.numel()).view(y.shape)
            (gx,) = torch.autograd.grad((y * w).sum(), xl)
            assert bool(torch.isfinite(y).all() and torch.isfinite(gx).all()), (name, c)
            outs.append((y.double(), gx.double()))
        (y1, g1), (yc, gc) = outs
        assert (yc / c - y1).norm() <= 1e-4 * y1.norm(), (name, c)
        assert (gc - g1).norm() <= 1e-4 * g1.norm() + 1e-6, (name, c)
