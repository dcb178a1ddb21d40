"""The layers' host front end on the Triton path (issue 12): the weight table in one launch
each way (``ROTWeights.table``, ``ops/rot/triton/weights``), the feature scale in one autograd
node (``ops/rot/spread.py``), and the number of non-view aten ops a layer call issues outside the
kernels (counted with ``bench/frontend_report.count_host_ops``, not timed: each is a ~5 µs
launch on a GPU, PERF.md "Host front end"). The bounds are the counts of this tree; a change
that adds host ops to a layer's call fails here and has to say why.
"""
import os
import sys

import pytest
import torch

import rotp_triton as rt
from harness import DEVICE, ON_CUDA
from rotp_triton.ops.rot.spread import (dense_spread, image_spread, normalize_by_spread,
                                  normalize_ragged_by_spread, ragged_spread)
from rotp_triton.ops.rot.triton.common import interpreter_enabled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from bench.frontend_report import VIEW_OPS, count_host_ops  # noqa: E402

KERNELS = ON_CUDA or interpreter_enabled()
needs_kernels = pytest.mark.skipif(not KERNELS, reason="needs CUDA or TRITON_INTERPRET=1")


# --------------------------------------------------------------------------------------------
# the weight table in one launch
# --------------------------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("per_iter", [True, False], ids=["per-iter", "shared"])
def test_weight_table_kernel_matches_torch_ops(per_iter):
    """The one-launch table and its gradient equal the torch ops' (softplus, scale, floor;
    raw values across softplus's regimes: far negative, near 0, above the threshold 20)."""
    w = rt.ROTWeights(5, per_iter_params=per_iter, a1=0.7, a2=float("inf"), learn_a2=False,
                      learn_a0=True, learn_tau=True, rho=3.0).to(DEVICE)
    raws = [-30.0, -9.0, -0.3, 0.0, 2.5, 25.0]
    with torch.no_grad():
        for k, p in enumerate(w.parameters()):
            p.copy_(torch.tensor(raws[k:] + raws[:k])[:p.numel()])
    fast = w.table(DEVICE, torch.float32, kernels=True)
    ref = w.table(DEVICE, torch.float32, kernels=False)
    assert fast.shape == (6, 5)
    assert torch.isinf(fast[2]).all() and torch.isinf(ref[2]).all()
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=0)
    g = torch.randn(5, 6, device=DEVICE).t()  # a strided cotangent
    g[2] = 0
    gf = torch.autograd.grad(fast, list(w.parameters()), g)
    gr = torch.autograd.grad(ref, list(w.parameters()), g)
    for a, b in zip(gf, gr):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)


@needs_kernels
def test_weight_table_is_one_op_each_way():
    w = rt.ROTWeights(4).to(DEVICE)

    def fwd_bwd():
        t = w.table(DEVICE, torch.float32, kernels=True)
        torch.autograd.grad(t, list(w.parameters()), torch.ones_like(t))
    with rt.set_value_checks(False):  # (on: a range check of the values, reading them)
        fwd_bwd()  # warm-up
        ops, syncs = count_host_ops(lambda: w.table(DEVICE, torch.float32, kernels=True))
        assert syncs == 0 and sum(n for k, n in ops.items() if k not in VIEW_OPS) == 1, ops
        ops, syncs = count_host_ops(fwd_bwd)
    # table, ones_like (the cotangent), gradient
    assert syncs == 0 and sum(n for k, n in ops.items() if k not in VIEW_OPS) == 3, ops


# --------------------------------------------------------------------------------------------
# the feature scale in one node
# --------------------------------------------------------------------------------------------
def test_spread_normalization_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(3, 4, 2, 3, generator=g, dtype=torch.float64)
    xn, s = normalize_by_spread(img, (2, 3), torch.float64)
    torch.testing.assert_close(s.flatten(), image_spread(img), rtol=0, atol=0)
    torch.testing.assert_close(xn, img / s, rtol=0, atol=0)
    sets = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(normalize_by_spread(sets, (1,), torch.float64)[1].flatten(),
                               dense_spread(sets), rtol=0, atol=0)
    rows = torch.randn(9, 5, generator=g, dtype=torch.float64)
    index = torch.tensor([0, 0, 2, 2, 2, 2, 2, 3, 2])  # set 1 and 4 empty, set 3 one row
    lengths = torch.bincount(index, minlength=5)
    torch.testing.assert_close(normalize_ragged_by_spread(rows, index, lengths, 5,
                                                          torch.float64)[1],
                               ragged_spread(rows, index, 5), rtol=0, atol=0)

    def image_fn(x):
        xn, s = normalize_by_spread(x, (2, 3), x.dtype)
        return xn, s ** 3

    def set_fn(x):
        xn, s = normalize_by_spread(x, (1,), x.dtype)
        return xn, s ** 3

    def ragged_fn(x):
        xn, s = normalize_ragged_by_spread(x, index, lengths, 5, x.dtype)
        return xn, s ** 3
    for fn, x in ((image_fn, img), (set_fn, sets), (ragged_fn, rows)):
        assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(),))


def test_constant_set_has_spread_one_and_no_scale_gradient():
    """A constant image (spread 0) uses s = 1, and s passes no gradient to x there (as
    autograd through image_spread's where)."""
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    x[1] = 0.25
    x.requires_grad_()
    xn, s = normalize_by_spread(x, (2, 3), x.dtype)
    assert s[1].item() == 1.0
    (gx,) = torch.autograd.grad((s ** 2).sum(), x)
    assert gx[1].abs().max() == 0 and gx[0].abs().max() > 0
    ref = image_spread(x)
    (gr,) = torch.autograd.grad((ref ** 2).sum(), x)
    torch.testing.assert_close(gx, gr)


@pytest.mark.parametrize("dims", [(2, 3), (1,)], ids=["image", "set"])
@pytest.mark.parametrize("out_dtype", [torch.float64, torch.float32], ids=["same", "narrower"])
def test_spread_normalization_gradient_matches_autograd(dims, out_dtype):
    """The written-out backward (x / s saved when it is the output; x otherwise) equals
    autograd through image_spread / dense_spread and the division, with constant entries
    (spread 0: s = 1, no gradient through s) among the others."""
    g = torch.Generator().manual_seed(1)
    shape = (4, 3, 2, 5) if dims == (2, 3) else (4, 6, 3)
    x = (3.0 * torch.randn(shape, generator=g, dtype=torch.float64) + 1.5).requires_grad_()
    with torch.no_grad():
        x[2] = -0.75
    gxn = torch.randn(shape, generator=g, dtype=torch.float64)
    gs = torch.randn(4, generator=g, dtype=torch.float64)
    xn, s = normalize_by_spread(x, dims, out_dtype)
    assert xn.dtype == out_dtype and s[2].item() == 1.0
    (gx,) = torch.autograd.grad(((xn.double() * gxn).sum() + (s.flatten() * gs).sum()), x)
    ref_s = (image_spread(x) if dims == (2, 3) else dense_spread(x)).view(s.shape)
    (gr,) = torch.autograd.grad((((x / ref_s).to(out_dtype).double() * gxn).sum()
                                 + (ref_s.flatten() * gs).sum()), x)
    torch.testing.assert_close(gx, gr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx[2], gxn[2])  # s = 1 and no gradient through s there


@pytest.mark.parametrize("out_dtype", [torch.float64, torch.float32], ids=["same", "narrower"])
def test_ragged_spread_normalization_gradient_matches_autograd(out_dtype):
    """As above for the ragged rows (empty sets, a one-row set: spread 0, s = 1)."""
    g = torch.Generator().manual_seed(2)
    x = (2.0 * torch.randn(9, 5, generator=g, dtype=torch.float64) + 1.0).requires_grad_()
    index = torch.tensor([0, 0, 2, 2, 2, 2, 2, 3, 2])
    lengths = torch.bincount(index, minlength=5)
    gxn = torch.randn(9, 5, generator=g, dtype=torch.float64)
    gs = torch.randn(5, generator=g, dtype=torch.float64)
    xn, s = normalize_ragged_by_spread(x, index, lengths, 5, out_dtype)
    (gx,) = torch.autograd.grad((xn.double() * gxn).sum() + (s * gs).sum(), x)
    ref_s = ragged_spread(x, index, 5)
    (gr,) = torch.autograd.grad((((x / ref_s[index][:, None]).to(out_dtype).double() * gxn).sum()
                                 + (ref_s * gs).sum()), x)
    torch.testing.assert_close(gx, gr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx[7], gxn[7])  # the one-row set: s = 1, nothing through s


# --------------------------------------------------------------------------------------------
# non-view host ops of a layer call (value checks off: the CUDA default)
# --------------------------------------------------------------------------------------------
def _layer_case(kind, method):
    g = torch.Generator().manual_seed(0)
    if kind == "adaptive":
        m, x, kw = rt.AdaptiveROTPool2d(4, method=method, backend="triton"), \
            torch.randn(2, 4, 4, 4, generator=g), {}
    elif kind == "window":
        m, x, kw = rt.ROTPool2d(4, 2, method=method, backend="triton"), \
            torch.randn(2, 4, 4, 4, generator=g), {}
    elif kind == "set-ptr":
        m, x, kw = rt.ROTPool(5, method=method, backend="triton"), torch.randn(9, 5, generator=g), \
            dict(ptr=torch.tensor([0, 2, 2, 9], device=DEVICE))
    else:
        m, x, kw = rt.ROTPool(5, method=method, backend="triton"), \
            torch.randn(3, 6, 5, generator=g), {}
    m = m.to(DEVICE)
    x = x.to(DEVICE).requires_grad_()
    return (lambda: m(x, **kw)), [x, *m.parameters()]


# (forward, forward+backward) non-view host ops of this tree (before issue 12: adaptive S
# 22 / 54, window S 20 / 52, set-ptr S 41 / 84; before the feature scale's 8-op backward and
# the Sinkhorn launcher's as_f32: adaptive S 10 / 30, window S 8 / 28, set-ptr S 24 / 49,
# set-dense S 10 / 31; before the B-ADMM launchers' single scratch allocation: adaptive B-E
# 16 / 50, window 8 / 28, set-ptr B-E 30 / 69, set-dense B-E 16 / 51; before the feature
# scale's kernels, ops/rot/triton/spread: adaptive S 10 / 27, B-E 11 / 29, window 8 / 25,
# set-dense S 10 / 28, B-E 11 / 30, set-ptr S 24 / 46, B-E 25 / 48; before the scale folded
# into the window and Sinkhorn kernels: adaptive S 7 / 18, window 5 / 16, set-ptr S 9 / 22,
# set-dense S 7 / 19, B-E 8 / 21; before it was folded into the B-ADMM kernels: adaptive B-E
# 8 / 20, set-ptr B-E 10 / 24, set-dense B-E 8 / 20; before ds joined the parameter gradients'
# allocation and the B-ADMM kernel wrote its weight partials whole: 5 / 15, 7 / 18, 5 / 14);
# kernel launchers' own allocations included
OP_BOUNDS = {
    ("adaptive", "sinkhorn"): (5, 13), ("adaptive", "badmm-e"): (5, 13),
    ("window", "sinkhorn"): (3, 11), ("window", "badmm-e"): (3, 11),
    ("set-ptr", "sinkhorn"): (7, 17), ("set-ptr", "badmm-e"): (7, 16),
    ("set-dense", "sinkhorn"): (5, 13), ("set-dense", "badmm-e"): (5, 12),
}


@needs_kernels
@pytest.mark.parametrize("kind,method", list(OP_BOUNDS), ids=lambda v: str(v))
def test_layer_call_host_ops(kind, method):
    fwd, leaves = _layer_case(kind, method)

    def fwd_bwd():
        y = fwd()
        torch.autograd.grad(y.sum(), leaves)
    with rt.set_value_checks(False):
        fwd_bwd()  # warm-up
        ops_f, syncs_f = count_host_ops(fwd)
        ops_fb, syncs_fb = count_host_ops(fwd_bwd)
    real = lambda c: sum(n for k, n in c.items() if k not in VIEW_OPS)  # noqa: E731
    bound_f, bound_fb = OP_BOUNDS[kind, method]
    assert syncs_f == 0 and syncs_fb == 0
    assert real(ops_f) <= bound_f, dict(ops_f)
    assert real(ops_fb) <= bound_fb, dict(ops_fb)
    # every parameter the layer owns got its gradient (through the one-launch table)
    grads = torch.autograd.grad(fwd().sum(), leaves[1:])
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
