"""Image pooling: AdaptiveROTPool2d, ROTPool2d (issue 4); the window kernels themselves are
tested in tests/ops/rot/test_window.py against the oracle below.

Oracle: reference/ with every window (or image) pooled as its own set in float64. The torch path
must match it to 1e-9 (float64); the kernels (fp32, under TRITON_INTERPRET=1 on CPU, or on CUDA
with ROTP_TEST_DEVICE=cuda) to a relative error of 1e-4, forward and gradients (x and every
per-iteration weight).
"""
import math

import pytest
import torch
from torch import nn

from kernel_utils import DEVICE, RTOL, rel_err
from reference.window import pool_windows as reference_pool
from reference.window import adaptive_positions, window_positions
from rotp_triton.nn.image import CLOSE_TO_MEAN, AdaptiveROTPool2d, ROTPool2d
from rotp_triton.ops.rot.torch.windows import rot_pool2d_torch
from rotp_triton.ops.rot.window_geometry import adaptive_bounds

METHODS = ("sinkhorn", "badmm-e", "badmm-q")
VARIANTS = ("exact", "paper")


# --------------------------------------------------------------------------------------------
# helpers: the reference, window by window
# --------------------------------------------------------------------------------------------
def random_weights(T, dtype, seed=0, inf_a2=False):
    g = torch.Generator().manual_seed(seed)
    w = dict(a1=torch.rand(T, generator=g) * 1.5 + 0.3, a2=torch.rand(T, generator=g) + 0.5,
             a3=torch.rand(T, generator=g) + 0.5, rho=torch.rand(T, generator=g) + 0.5)
    w = {k: v.to(dtype) for k, v in w.items()}
    if inf_a2:
        w["a2"] = torch.full((T,), math.inf, dtype=dtype)
    return w


def all_weights(w, T, dtype):
    return dict(a0=torch.zeros(T, dtype=dtype), tau=torch.ones(T, dtype=dtype), **w)


# --------------------------------------------------------------------------------------------
# shapes and windows
# --------------------------------------------------------------------------------------------
SHAPE_CASES = [(H, W, k, s, p, cm)
               for H, W in ((1, 1), (2, 3), (5, 7), (8, 8), (9, 4))
               for k, s, p in ((1, None, 0), (2, None, 0), (2, 1, 1), (3, 2, 1), (3, 3, 1),
                               ((2, 3), (1, 2), (1, 0)), (3, 1, 0))
               for cm in (False, True)]


@pytest.mark.parametrize("H,W,k,s,p,cm", SHAPE_CASES)
def test_output_shape_equals_maxpool(H, W, k, s, p, cm):
    x = torch.randn(1, 2, H, W)
    mp = nn.MaxPool2d(k, s, p, ceil_mode=cm)
    try:
        want = mp(x).shape
    except RuntimeError:
        with pytest.raises(ValueError, match="too small"):
            ROTPool2d(2, k, s, p, cm, num_iters=1, backend="torch")(x)
        return
    y = ROTPool2d(2, k, s, p, cm, num_iters=1, backend="torch")(x)
    assert y.shape == want


@pytest.mark.parametrize("size,out", [(7, 3), (5, 2), (4, 4), (1, 1), (10, 4), (3, 5)])
def test_adaptive_bounds_equal_adaptive_avgpool(size, out):
    # nn.AdaptiveAvgPool2d of one-hot images reveals which positions each window averages
    eye = torch.eye(size).reshape(size, 1, size, 1)                      # image i: row i hot
    pooled = nn.AdaptiveAvgPool2d((out, 1))(eye)[:, 0, :, 0]            # [size, out]
    for i, (s, e) in enumerate(adaptive_bounds(size, out)):
        members = torch.nonzero(pooled[:, i] > 0).flatten().tolist()
        assert members == list(range(s, e))


# --------------------------------------------------------------------------------------------
# torch path == reference (float64)
# --------------------------------------------------------------------------------------------
TORCH_CASES = [  # (B, C, H, W, k, s, p, ceil_mode)
    (2, 3, 5, 7, (2, 2), (2, 2), (1, 1), True),
    (1, 4, 5, 4, (3, 3), (2, 2), (1, 1), False),
    (2, 1, 3, 5, (2, 3), (1, 2), (1, 0), True),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", range(len(TORCH_CASES)))
def test_torch_path_matches_reference(method, variant, case):
    B, C, H, W, k, s, p, cm = TORCH_CASES[case]
    T = 3
    torch.manual_seed(case)
    x = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    w = {n: v.requires_grad_() for n, v in random_weights(T, torch.float64, case).items()}
    y = rot_pool2d_torch(x, k, s, p, cm, method=method, variant=variant, num_iters=T,
                         inner_iters=1, weights=all_weights(w, T, torch.float64))
    Ho, Wo, wins = window_positions(H, W, k, s, p, cm)
    yr = reference_pool(x, wins, (Ho, Wo), method=method, variant=variant, num_iters=T, **w)
    assert y.shape == yr.shape == (B, C, Ho, Wo)
    assert rel_err(y, yr) <= 1e-9
    g = torch.randn_like(y)
    ins = [x] + list(w.values())
    g1 = torch.autograd.grad((y * g).sum(), ins, allow_unused=True, materialize_grads=True)
    g2 = torch.autograd.grad((yr * g).sum(), ins, allow_unused=True, materialize_grads=True)
    for name, a, b in zip(["x"] + list(w), g1, g2):
        assert (a - b).abs().max() <= 1e-9 * max(1.0, b.abs().max()), name


@pytest.mark.parametrize("method", METHODS)
def test_torch_path_structure_term_matches_reference(method):
    """α0 > 0 (torch path only): each window's Σ1, Σ2 are its own (padding excluded)."""
    B, C, H, W, k, s, p, cm = TORCH_CASES[0]
    T = 2
    torch.manual_seed(7)
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    w = random_weights(T, torch.float64, 1)
    full = dict(w, a0=torch.full((T,), 0.3, dtype=torch.float64),
                tau=torch.ones(T, dtype=torch.float64))
    y = rot_pool2d_torch(x, k, s, p, cm, method=method, variant="exact", num_iters=T,
                         inner_iters=2, weights=full)
    Ho, Wo, wins = window_positions(H, W, k, s, p, cm)
    yr = reference_pool(x, wins, (Ho, Wo), method=method, variant="exact", num_iters=T,
                        inner_iters=2, **full)
    assert rel_err(y, yr) <= 1e-9
    y0 = rot_pool2d_torch(x, k, s, p, cm, method=method, variant="exact", num_iters=T,
                          inner_iters=2, weights=all_weights(w, T, torch.float64))
    assert rel_err(y, y0) > 1e-6  # the structure term changes the output


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("output_size", [1, (2, 3), (None, 2)])
def test_adaptive_matches_reference(method, output_size):
    torch.manual_seed(1)
    B, C, H, W = 2, 3, 5, 7
    x = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    layer = AdaptiveROTPool2d(C, output_size, method=method, num_iters=3, a1=0.7, rho=0.8,
                              backend="torch", scale=None).double()
    y = layer(x)
    oh, ow = (1, 1) if output_size == 1 else (output_size[0] or H, output_size[1])
    wins = adaptive_positions(H, W, oh, ow)
    kw = {n: v.double() for n, v in layer.weights().items() if n not in ("a0", "tau")}
    yr = reference_pool(x, wins, (oh, ow), method=method, num_iters=3, **kw)
    assert y.shape == (B, C, oh, ow)
    assert rel_err(y, yr) <= 1e-9
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad((y * g).sum(), x)
    (gr,) = torch.autograd.grad((yr * g).sum(), x)
    assert rel_err(gx, gr) <= 1e-9


def test_global_flatten_and_channels_last():
    torch.manual_seed(2)
    x = torch.randn(3, 6, 4, 5)
    layer = AdaptiveROTPool2d(6, flatten=True, a1=0.5, backend="torch")
    y = layer(x)
    assert y.shape == (3, 6)
    y_cl = layer(x.contiguous(memory_format=torch.channels_last))
    assert rel_err(y_cl, y) <= 1e-6
    # each image alone = in the batch
    assert rel_err(layer(x[1:2])[0], y[1]) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_torch_path(dtype):
    torch.manual_seed(3)
    x = torch.randn(2, 5, 6, 6)
    for layer in (ROTPool2d(5, 2, a1=0.5, backend="torch"),
                  AdaptiveROTPool2d(5, a1=0.5, backend="torch")):
        y32 = layer(x)
        y = layer(x.to(dtype))
        assert y.dtype == dtype
        assert rel_err(y, y32) <= RTOL[dtype]


def test_default_init_close_to_mean():
    torch.manual_seed(0)
    for method in METHODS:
        x = torch.randn(8, 64, 7, 7)
        d = AdaptiveROTPool2d(64, method=method, backend="torch")(x).flatten(1) - x.mean((2, 3))
        rms, mx = CLOSE_TO_MEAN["global"][method]
        assert d.pow(2).mean().sqrt() <= rms and d.abs().max() <= mx, method
        x = torch.randn(8, 64, 8, 8)
        d = ROTPool2d(64, 2, method=method, backend="torch")(x) - nn.functional.avg_pool2d(x, 2)
        rms, mx = CLOSE_TO_MEAN["local"][method]
        assert d.pow(2).mean().sqrt() <= rms and d.abs().max() <= mx, method


# --------------------------------------------------------------------------------------------
# module API
# --------------------------------------------------------------------------------------------
def test_repr_and_reset():
    m = ROTPool2d(8, 3, 2, 1, ceil_mode=True, method="sinkhorn", num_iters=2, a1=5.0)
    assert repr(m) == ("ROTPool2d(8, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), "
                       "ceil_mode=True, method='sinkhorn', variant='exact', num_iters=2, "
                       "a1=5*, a2=1*, a3=1*)")
    a = AdaptiveROTPool2d(16, (2, None), num_iters=3)
    assert repr(a) == ("AdaptiveROTPool2d(16, output_size=(2, None), flatten=False, "
                       "method='badmm-e', variant='exact', num_iters=3, "
                       "a1=100*, a2=1*, a3=1*, rho=100*)")
    w0 = m.weights()["a1"].detach().clone()
    with torch.no_grad():
        m.weights.raw_a1.add_(1.0)
    m.reset_parameters()
    assert torch.equal(m.weights()["a1"].detach(), w0)
    assert sum(p.numel() for p in m.parameters()) == 2 * 3  # a1, a2, a3 per iteration (S: no ρ)


@pytest.mark.parametrize("make,x,err,match", [
    (lambda: ROTPool2d(4), torch.randn(4, 4), ValueError, "B, C, H, W"),
    (lambda: ROTPool2d(4), torch.randn(1, 1, 4, 4, 4), ValueError, "C, H, W"),
    (lambda: ROTPool2d(4), torch.randn(1, 3, 4, 4), ValueError, "channels=4"),
    (lambda: ROTPool2d(4), torch.randn(3, 4, 4), ValueError, "channels=4"),
    (lambda: ROTPool2d(4), torch.ones(1, 4, 4, 4, dtype=torch.long), TypeError, "floating"),
    (lambda: ROTPool2d(4), [1.0], TypeError, "torch.Tensor"),
    (lambda: AdaptiveROTPool2d(4), torch.randn(2, 5, 3, 3), ValueError, "channels=4"),
    (lambda: AdaptiveROTPool2d(4), torch.randn(2, 4), ValueError, "B, C, H, W"),
    (lambda: ROTPool2d(2, 3, padding=0), torch.randn(1, 2, 2, 2), ValueError, "too small"),
])
def test_bad_inputs(make, x, err, match):
    with pytest.raises(err, match=match):
        make()(x)


@pytest.mark.parametrize("make,out_shape", [
    (lambda: ROTPool2d(3, 3, 2, 1), (3, 3, 4)),
    (lambda: AdaptiveROTPool2d(3, method="sinkhorn"), (3, 1, 1)),
    (lambda: AdaptiveROTPool2d(3, (2, 3)), (3, 2, 3)),
    (lambda: AdaptiveROTPool2d(3, flatten=True), (3,)),
], ids=["window", "adaptive-1", "adaptive-2x3", "flatten"])
def test_unbatched_image(make, out_shape):
    """An unbatched (C, H, W) image, as torch's pooling layers take it: the output and the
    gradients of the image and the weights are those of the batch of that one image."""
    torch.manual_seed(0)
    m = make()
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    y = m(x)
    assert y.shape == out_shape
    y1 = m(x.unsqueeze(0))
    assert torch.equal(y, y1.squeeze(0))
    g = torch.randn(out_shape, dtype=torch.float64)
    grads = torch.autograd.grad((y * g).sum(), [x, *m.parameters()])
    grads1 = torch.autograd.grad((y1.squeeze(0) * g).sum(), [x, *m.parameters()])
    for a, b in zip(grads, grads1):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(kernel_size=0), ValueError, "kernel_size"),
    (dict(kernel_size=(2, 2, 2)), ValueError, "kernel_size"),
    (dict(kernel_size=2.0), TypeError, "kernel_size"),
    (dict(stride=0), ValueError, "stride"),
    (dict(kernel_size=2, padding=2), ValueError, "padding"),
    (dict(kernel_size=3, padding=-1), ValueError, "padding"),
    (dict(ceil_mode=1), TypeError, "ceil_mode"),
    (dict(method="max"), ValueError, "method"),
    (dict(variant="x"), ValueError, "variant"),
    (dict(num_iters=0), ValueError, "num_iters"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(a1=-1.0), ValueError, "a1"),
])
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        ROTPool2d(4, **kwargs)


def test_bad_adaptive_arguments():
    with pytest.raises(ValueError, match="channels"):
        AdaptiveROTPool2d(0)
    with pytest.raises(ValueError, match="output_size"):
        AdaptiveROTPool2d(4, output_size=0)
    with pytest.raises(ValueError, match="flatten"):
        AdaptiveROTPool2d(4, output_size=2, flatten=True)
    with pytest.raises(ValueError, match="output_size"):
        AdaptiveROTPool2d(4, output_size=None)


# --------------------------------------------------------------------------------------------
# The modules on the Triton kernels (the window kernels themselves: tests/ops/rot/test_window.py)
# --------------------------------------------------------------------------------------------


def make_input(B, C, H, W, layout, dtype, seed):
    """A (B, C, H, W) input on DEVICE in the given layout (built there: .to() would densify)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "noncontig":  # every other channel of a wider tensor, H and W transposed
        base = torch.randn(B, 2 * C, W, H, generator=g).to(DEVICE, dtype)
        x = base[:, ::2].transpose(2, 3)
        assert not x.is_contiguous() and x.shape == (B, C, H, W)
        assert not x.is_contiguous(memory_format=torch.channels_last)
        return x
    x = torch.randn(B, C, H, W, generator=g).to(DEVICE, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def test_module_dispatches_to_kernel():
    """ROTPool2d(backend="triton") on the kernel == backend="torch", weights included."""
    torch.manual_seed(4)
    x = make_input(2, 3, 5, 5, "nchw", torch.float32, seed=9)
    for per_iter in (True, False):
        outs = []
        for backend in ("triton", "torch"):
            layer = ROTPool2d(3, 2, padding=1, num_iters=2, a1=0.5, rho=0.5, backend=backend,
                              per_iter_params=per_iter).to(DEVICE)
            y = layer(x)
            (g,) = torch.autograd.grad(y.sum(), layer.weights.raw_rho)
            assert g.shape == ((2,) if per_iter else (1,))
            outs.append((y, g))
        assert rel_err(outs[0][0], outs[1][0]) <= 1e-4
        assert rel_err(outs[0][1], outs[1][1]) <= 1e-4
    with pytest.raises(ValueError, match="a0"):
        ROTPool2d(3, a0=0.5, backend="triton").to(DEVICE)(x)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_global_pool_uses_set_kernels_on_the_strided_view(layout, monkeypatch):
    """output_size=1 goes through rot_pool's set kernels on x.flatten(2).transpose(1, 2), a view
    of the image (same storage, no copy; with scale=None - "auto" pools x / s); result == the
    torch path."""
    from rotp_triton.ops.rot.triton.badmm import op as badmm_op
    seen = []
    real = badmm_op.badmm_pool
    monkeypatch.setattr(badmm_op, "badmm_pool",
                        lambda x, *a, **k: seen.append(x) or real(x, *a, **k))
    x = make_input(2, 5, 3, 4, layout, torch.float32, seed=2).requires_grad_()
    res = []
    for backend in ("triton", "torch"):
        m = AdaptiveROTPool2d(5, method="badmm-e", num_iters=2, a1=0.5, rho=0.5,
                              backend=backend, scale=None).to(DEVICE)
        y = m(x)
        res.append((y,) + torch.autograd.grad(y.sum(), [x, m.weights.raw_a1]))
    assert len(seen) == 1 and seen[0].data_ptr() == x.data_ptr() and seen[0].shape == (2, 12, 5)
    for a, b in zip(*res):
        assert rel_err(a, b) <= 1e-4


def test_adaptive_even_windows_use_kernel(monkeypatch):
    """AdaptiveROTPool2d with windows that tile the image evenly runs the window kernel."""
    from rotp_triton.ops.rot.triton.window import op as window_op
    calls = []
    real = window_op.window_pool
    monkeypatch.setattr(window_op, "window_pool",
                        lambda x, w, **k: calls.append(k["kernel_size"]) or real(x, w, **k))
    x = make_input(2, 3, 4, 6, "channels_last", torch.float32, seed=5)
    outs = [AdaptiveROTPool2d(3, (2, 3), num_iters=2, a1=0.5, rho=0.5, backend=b).to(DEVICE)(x)
            for b in ("triton", "torch")]
    assert calls == [(2, 2)]
    assert outs[0].shape == (2, 3, 2, 3)
    assert rel_err(outs[0], outs[1]) <= 1e-4


@pytest.mark.parametrize("scale", [None, "auto"])
def test_adaptive_uneven_windows_use_kernel(monkeypatch, scale):
    """AdaptiveROTPool2d with windows that differ in size and overlap (7 × 5 -> 3 × 2) runs the
    window kernel with nn.AdaptiveAvgPool2d's windows (with the feature scale folded in or
    not) and matches the torch path, forward and gradients."""
    from rotp_triton.ops.rot.triton.window import op as window_op
    calls = []
    real = window_op.window_pool
    monkeypatch.setattr(window_op, "window_pool",
                        lambda x, w, **k: calls.append(k.get("output_size")) or real(x, w, **k))
    x = make_input(2, 3, 7, 5, "channels_last", torch.float32, seed=6)
    res = []
    for backend in ("triton", "torch"):
        xl = x.clone().requires_grad_()
        m = AdaptiveROTPool2d(3, (3, 2), num_iters=2, a1=0.5, rho=0.5, backend=backend,
                              scale=scale).to(DEVICE)
        y = m(xl)
        res.append((y,) + torch.autograd.grad((y * y).sum(), [xl, m.weights.raw_a1]))
    assert calls == [(3, 2)]
    assert res[0][0].shape == (2, 3, 3, 2)
    for a, b in zip(*res):
        assert rel_err(a, b) <= 1e-4
