"""Image pooling: AdaptiveROTPool2d, ROTPool2d and the Triton window kernels (issue 4).

Oracle: reference/ with every window (or image) pooled as its own set in float64. The torch path
must match it to 1e-9 (float64); the kernels (fp32, under TRITON_INTERPRET=1 on CPU, or on CUDA
with ROTP_TEST_DEVICE=cuda) to a relative error of 1e-4, forward and gradients (x and every
per-iteration weight).
"""
import math

import pytest
import torch
from torch import nn

from kernel_utils import DEVICE, KERNEL_DTYPES, ON_CUDA, RTOL, rel_err, run_without_interpreter
from reference.window import pool_windows as reference_pool
from reference.window import adaptive_positions, window_positions
from rotp_triton.nn.image import (CLOSE_TO_MEAN, AdaptiveROTPool2d, ROTPool2d, adaptive_bounds,
                                  pool_output_size, rot_pool2d_torch)

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
    (lambda: ROTPool2d(4), torch.randn(4, 4, 4), ValueError, "B, C, H, W"),
    (lambda: ROTPool2d(4), torch.randn(1, 3, 4, 4), ValueError, "channels=4"),
    (lambda: ROTPool2d(4), torch.ones(1, 4, 4, 4, dtype=torch.long), TypeError, "floating"),
    (lambda: ROTPool2d(4), [1.0], TypeError, "torch.Tensor"),
    (lambda: AdaptiveROTPool2d(4), torch.randn(2, 5, 3, 3), ValueError, "channels=4"),
    (lambda: AdaptiveROTPool2d(4), torch.randn(2, 4, 3), ValueError, "B, C, H, W"),
    (lambda: ROTPool2d(2, 3, padding=0), torch.randn(1, 2, 2, 2), ValueError, "too small"),
])
def test_bad_inputs(make, x, err, match):
    with pytest.raises(err, match=match):
        make()(x)


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
# Triton window kernels == reference (fp32; interpreter on CPU, or CUDA)
# --------------------------------------------------------------------------------------------
KERNEL_CASES = {  # name: (B, C, H, W, k, s, p, ceil_mode, layout)
    "2x2-odd": (2, 3, 5, 7, (2, 2), (2, 2), (0, 0), False, "nchw"),
    "3x3-pad-ceil-overlap-cl": (1, 5, 5, 6, (3, 3), (2, 2), (1, 1), True, "channels_last"),
    "2x3-noncontig": (2, 6, 4, 5, (2, 3), (1, 2), (1, 1), True, "noncontig"),
}


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


def check_kernel(method, variant, case, dtype=torch.float32, T=3, inf_a2=False):
    from rotp_triton.ops.rot.triton_window import rot_pool2d_triton
    B, C, H, W, k, s, p, cm, layout = KERNEL_CASES[case]
    x = make_input(B, C, H, W, layout, dtype, seed=len(case)).requires_grad_()
    w64 = random_weights(T, torch.float64, seed=3, inf_a2=inf_a2)
    learn = [n for n in w64 if not (inf_a2 and n == "a2")]
    wk = {n: v.float().to(DEVICE).requires_grad_(n in learn) for n, v in w64.items()}
    y = rot_pool2d_triton(x, k, s, p, cm, method=method, variant=variant, **wk)
    Ho, Wo, wins = window_positions(H, W, k, s, p, cm)
    assert y.shape == (B, C, Ho, Wo) and y.dtype == dtype
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    x64 = x.detach().double().cpu().requires_grad_()
    wr = {n: v.clone().requires_grad_(n in learn) for n, v in w64.items()}
    yr = reference_pool(x64, wins, (Ho, Wo), method=method, variant=variant, num_iters=T, **wr)
    tol = RTOL[dtype]
    assert rel_err(y, yr) <= tol
    g = torch.randn(yr.shape, dtype=torch.float64)
    ins = [x] + [wk[n] for n in learn]
    gk = torch.autograd.grad((y * g.to(DEVICE, dtype)).sum(), ins, allow_unused=True,
                             materialize_grads=True)
    gr = torch.autograd.grad((yr * g).sum(), [x64] + [wr[n] for n in learn], allow_unused=True,
                             materialize_grads=True)
    for name, a, b in zip(["x"] + learn, gk, gr):
        assert a.shape == b.shape
        if b.abs().max() <= 1e-12:  # α2, α3 of the paper B-ADMM (defect 2): no effect
            assert a.abs().max() <= 1e-6, name
        else:
            assert rel_err(a, b) <= (tol if dtype == torch.float32 else 2 * tol), name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_matches_reference_every_method(method, variant):
    check_kernel(method, variant, "2x2-odd")


@pytest.mark.parametrize("case", ["3x3-pad-ceil-overlap-cl", "2x3-noncontig"])
@pytest.mark.parametrize("method,variant", [("badmm-e", "exact"), ("sinkhorn", "paper"),
                                            ("badmm-q", "paper")])
def test_kernel_layouts_padding_ceil(case, method, variant):
    check_kernel(method, variant, case)


def test_kernel_hard_marginal_and_single_iteration():
    check_kernel("sinkhorn", "exact", "2x2-odd", inf_a2=True)
    check_kernel("badmm-q", "exact", "2x2-odd", T=1)


def test_kernel_random_configs():
    """Random window geometries (k, stride > k, padding, ceil_mode, C = 1, H = 1, T = 1...),
    layouts, methods and variants: kernel (fp32) vs the float64 torch path (== reference above).
    Criterion ‖a − b‖ ≤ 1e-4 ‖b‖ + 1e-6: gradients that are exactly 0 in exact arithmetic (α2 of
    the paper variants, α1 of B-Q at T = 1) come out at float32 rounding level."""
    import random

    from rotp_triton.ops.rot.triton_window import rot_pool2d_triton
    rng = random.Random(1)
    done = 0
    while done < 8:
        k = (rng.randint(1, 3), rng.randint(1, 3))
        s = (rng.randint(1, 3), rng.randint(1, 3))
        p = (rng.randint(0, k[0] // 2), rng.randint(0, k[1] // 2))
        cm = rng.random() < 0.5
        B, C, H, W = rng.randint(1, 2), rng.choice([1, 2, 3, 5]), rng.randint(1, 5), rng.randint(1, 5)
        if min(pool_output_size(H, k[0], s[0], p[0], cm), pool_output_size(W, k[1], s[1], p[1], cm)) < 1:
            continue
        done += 1
        method, variant = rng.choice(METHODS), rng.choice(VARIANTS)
        T = rng.randint(1, 3)
        x = make_input(B, C, H, W, rng.choice(["nchw", "channels_last"]), torch.float32,
                       seed=done).requires_grad_()
        w = {n: (torch.rand(T, generator=torch.Generator().manual_seed(done)) + 0.3)
             for n in ("a1", "a2", "a3", "rho")}
        wk = {n: v.to(DEVICE).requires_grad_() for n, v in w.items()}
        wt = {n: v.double().requires_grad_() for n, v in w.items()}
        y = rot_pool2d_triton(x, k, s, p, cm, method=method, variant=variant, **wk)
        x64 = x.detach().double().cpu().requires_grad_()
        yr = rot_pool2d_torch(x64, k, s, p, cm, method=method, variant=variant, num_iters=T,
                              inner_iters=1, weights=all_weights(wt, T, torch.float64))
        what = f"k={k} s={s} p={p} ceil={cm} {(B, C, H, W)} {method} {variant} T={T}"
        assert rel_err(y, yr) <= 1e-4, what
        g = torch.randn(yr.shape, dtype=torch.float64)
        gk = torch.autograd.grad((y * g.to(DEVICE, torch.float32)).sum(), [x] + list(wk.values()),
                                 allow_unused=True, materialize_grads=True)
        gr = torch.autograd.grad((yr * g).sum(), [x64] + list(wt.values()), allow_unused=True,
                                 materialize_grads=True)
        for name, a, b in zip(["x", "a1", "a2", "a3", "rho"], gk, gr):
            a, b = a.double().cpu(), b.double()
            assert (a - b).norm() <= 1e-4 * b.norm() + 1e-6, f"{name}: {what}"


@pytest.mark.skipif(not ON_CUDA, reason="fp16/bf16 kernels run on CUDA only")
@pytest.mark.parametrize("dtype", [d for d in KERNEL_DTYPES if d != torch.float32])
def test_kernel_low_precision(dtype):
    check_kernel("badmm-e", "exact", "3x3-pad-ceil-overlap-cl", dtype=dtype)


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


def test_kernel_saves_only_input_and_weight_table():
    """The autograd graph of the kernel path holds x and the (T, 6) weight table, nothing per
    iteration: memory does not grow with T (the backward recomputes)."""
    from rotp_triton.ops.rot.triton_window import rot_pool2d_triton
    x = make_input(1, 3, 4, 4, "nchw", torch.float32, seed=1).requires_grad_()
    for T in (1, 3):
        a1 = torch.full((T,), 0.5, device=DEVICE, requires_grad=True)
        y = rot_pool2d_triton(x, 2, method="badmm-e", a1=a1, a2=1.0, a3=1.0, rho=1.0)
        saved = y.grad_fn.saved_tensors
        assert len(saved) == 2 and saved[0].data_ptr() == x.data_ptr()
        assert saved[1].shape == (T, 6)


@pytest.mark.skipif(not ON_CUDA, reason="peak memory is measured on CUDA")
def test_kernel_peak_memory_independent_of_T():
    from rotp_triton.ops.rot.triton_window import rot_pool2d_triton
    x = torch.randn(8, 64, 56, 56, device="cuda", requires_grad=True)
    peaks = []
    for T in (2, 16):
        a1 = torch.full((T,), 1.0, device="cuda", requires_grad=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        y = rot_pool2d_triton(x, 2, method="badmm-e", a1=a1, a2=1.0, a3=1.0, rho=1.0)
        torch.autograd.grad(y.sum(), [x, a1])
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    # x.grad (fp32) + y + per-program partials: the same for T = 2 and 16 up to the (T, 6) table
    # and the partial sums (grid × next_pow2(6T) floats)
    assert abs(peaks[1] - peaks[0]) <= 2 * 2**20, peaks


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


# --------------------------------------------------------------------------------------------
# AOT compile for sm_90: catches what the interpreter accepts and the GPU compiler rejects
# --------------------------------------------------------------------------------------------
AOT_CODE = r"""
import os, subprocess, tempfile
import triton
from aot import compile_sm90
from rotp_triton.ops.rot import triton_window as tw

FWD = ["x_ptr", "y_ptr", "prm_ptr", "C", "H", "W", "Ho", "Wo", "n_windows", "lp0",
       "sxb", "sxc", "sxh", "sxw", "syb", "syc", "syh", "syw"]
BWD = ["x_ptr", "gy_ptr", "prm_ptr", "gx_ptr", "gprm_ptr", "C", "H", "W", "Ho", "Wo",
       "n_windows", "n_tiles", "lp0", "sxb", "sxc", "sxh", "sxw", "sgb", "sgc", "sgh", "sgw",
       "sdb", "sdc", "sdh", "sdw"]
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                         "cuobjdump")
CASES = [(64, 1, False, "fwd", False, "fp32"), (256, 1, False, "fwd", False, "fp32"),
         (64, 1, False, "bwd", True, "fp32"), (256, 1, False, "bwd", False, "fp32"),
         (256, 0, True, "bwd", False, "fp32"), (256, 2, True, "bwd", True, "fp32"),
         (64, 1, False, "fwd", False, "bf16"), (64, 0, False, "bwd", True, "bf16")]
for C, method, paper, kind, overlap, dt in CASES:
    names, kern = (FWD, tw.rot_window_pool_fwd_kernel) if kind == "fwd" else \
        (BWD, tw.rot_window_pool_bwd_kernel)
    BW, BN, BC = tw._block_sizes(4, C, tw.FWD_TILE if kind == "fwd" else tw.BWD_TILE)
    ce = dict(T=4, KH=2, KW=2, SH=1 if overlap else 2, SW=1 if overlap else 2, PH=0, PW=0,
              BW=BW, BN=BN, BC=BC, METHOD=method, PAPER=paper)
    if kind == "bwd":
        ce.update(OVERLAP=overlap, TP=32)
    # x, y, gy in the input dtype; the weight tables and gx (accumulated) in fp32
    low = ("x_ptr", "y_ptr", "gy_ptr")
    sig = {n: (f"*{dt}" if n in low else "*fp32" if n.endswith("_ptr") else
               "fp32" if n == "lp0" else "i32") for n in names}
    sig.update({n: "constexpr" for n in ce})
    c = compile_sm90(kern, sig, ce, num_warps=4 if BC <= 256 else 8)
    assert "cubin" in c.asm
    usage = ""
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(c.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True,
                               text=True).stdout
        os.unlink(f.name)
        usage = " ".join(t for t in usage.split() if t.startswith(("REG:", "LOCAL:")))
    print(f"RESULT C={C} method={method} paper={paper} {kind} {dt} tile={BW}x{BN}x{BC} {usage}")
"""


def test_aot_compile_sm90():
    out = run_without_interpreter(AOT_CODE, timeout=900)
    lines = [l for l in out.splitlines() if l.startswith("RESULT")]
    print("\n".join(lines))
    assert len(lines) == 8
    for line in lines:
        if "LOCAL:" in line:  # no register spills to local memory
            assert "LOCAL:0" in line, line
