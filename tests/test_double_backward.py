"""Gradients that are differentiated again (``torch.autograd.grad(..., create_graph=True)``:
gradient penalties, meta-learning): ``rotp_triton/ops/rot/higher_order.py``.

The hand-written backwards are first order; a recorded backward recomputes the torch path with
autograd recording. Oracle: the torch path in float64 by ``gradgradcheck`` (finite differences
of its own gradients), and ``reference/`` (autograd through the literal iterations, float64)
for the kernels: Hessian-vector products ∂⟨v, ∂⟨c, y⟩/∂x⟩/∂(x, weights, priors) within the
kernels' tolerance. Before, the torch path and the kernels raised on a second backward, and the
spread statistics of ``scale="auto"`` returned wrong second derivatives without an error.
"""
import pytest
import torch
from torch.autograd import gradgradcheck

import rotp_triton as rt
from harness import DEVICE, assert_close
from reference.rot import rot_pool_sets
from reference.window import adaptive_positions, pool_windows as reference_windows
from rotp_triton.ops.rot.params import A1, A2, A3, RHO
from rotp_triton.ops.rot.triton.window import window_pool

METHODS = ("sinkhorn", "badmm-e", "badmm-q")
VARIANTS = ("exact", "paper")
f64 = dict(dtype=torch.float64)


def _x(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), **f64)


# --------------------------------------------------------------------------------------------
# the torch path, float64: gradgradcheck
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", ["dense", "ptr", "index"])
def test_torch_path_twice_differentiable(method, variant, layout):
    """x, per-iteration α1 and p0 (dense: 2 sets of 4; ragged: 3 and 4 rows, unsorted index)."""
    x = _x(0, 2, 4, 3).requires_grad_()
    a1 = torch.tensor([0.7, 1.3], **f64).requires_grad_()
    p0 = (torch.rand(2, 3, generator=torch.Generator().manual_seed(1), **f64) + 0.2)
    p0.requires_grad_()
    rows = dict(dense={}, ptr=dict(ptr=torch.tensor([0, 3, 7])),
                index=dict(index=torch.tensor([1, 0, 1, 1, 0, 1, 0])))[layout]

    def f(x, a1, p0):
        xs = x if layout == "dense" else x.reshape(8, 3)[:7]
        return rt.rot_pool(xs, **rows, method=method, variant=variant, num_iters=2, a1=a1,
                           p0=p0, backend="torch")
    assert gradgradcheck(f, (x, a1, p0))


@pytest.mark.parametrize("method", ["sinkhorn", "badmm-e"])
def test_torch_path_twice_differentiable_structure_and_plan(method):
    x = _x(2, 2, 4, 3).requires_grad_()
    a0 = torch.tensor(0.3, **f64).requires_grad_()
    assert gradgradcheck(lambda x, a0: rt.rot_pool(x, method=method, num_iters=2, a0=a0,
                                                   inner_iters=2, backend="torch"), (x, a0))
    assert gradgradcheck(lambda x: rt.rot_pool(x, method=method, num_iters=2, backend="torch",
                                               return_plan=True), (x,))


@pytest.mark.parametrize("scale", [None, "auto"])
def test_layers_twice_differentiable(scale):
    """The layers on the torch path, with ``scale="auto"``'s spread statistics (dense, ragged,
    images): before, their backward was not differentiated again (wrong second derivatives)."""
    x = _x(3, 2, 4, 3).requires_grad_()
    img = _x(4, 1, 2, 4, 5).requires_grad_()
    kw = dict(num_iters=2, backend="torch", scale=scale)
    pool = rt.ROTPool(3, **kw).double()
    assert gradgradcheck(lambda x: pool(x), (x,))
    assert gradgradcheck(lambda x: pool(x.reshape(8, 3)[:7], ptr=torch.tensor([0, 3, 7])), (x,))
    assert gradgradcheck(lambda x: pool(x.reshape(8, 3)[:7],
                                        index=torch.tensor([1, 0, 1, 1, 0, 1, 0])), (x,))
    for layer in (rt.ROTPool2d(2, 2, **kw), rt.AdaptiveROTPool2d(2, (3, 2), **kw),
                  rt.AdaptiveROTPool2d(2, 1, **kw)):
        layer = layer.double()
        assert gradgradcheck(lambda x: layer(x), (img,))


@pytest.mark.parametrize("name", ["GSPool", "OTKPool", "MixedROTPool"])
def test_other_set_layers_twice_differentiable(name):
    """GSP's implicit gradient (two Newton steps from the solved root make the second
    derivative exact; with one step, F' detached, it was silently wrong), OTK and the hierarchical mixture, dense and ragged (an empty set), parameters
    included."""
    from rotp_triton.nn.hierarchical import MixedROTPool
    make = dict(GSPool=lambda: rt.GSPool(3, num_prototypes=5, mass=0.7, gamma=2.0),
                OTKPool=lambda: rt.OTKPool(3, 2), MixedROTPool=lambda: MixedROTPool(3, num_iters=2))
    m = make[name]().double()
    names = [n for n, _ in m.named_parameters()]
    x = _x(20, 2, 4, 3).requires_grad_()

    def f(x, *params):
        out = torch.func.functional_call(m, dict(zip(names, params)), (x.reshape(8, 3)[:7],),
                                         dict(ptr=torch.tensor([0, 3, 3, 7])))
        return out[0] if isinstance(out, tuple) else out
    assert gradgradcheck(f, (x, *[p.detach().clone().requires_grad_() for p in m.parameters()]))
    assert gradgradcheck(lambda x: m(x) if not isinstance(m(x), tuple) else m(x)[0], (x,))


def test_set_fusion_twice_differentiable():
    """SetFusionROTPool on a dense batch of groups of sets (G, M, N, D)."""
    from rotp_triton.nn.hierarchical import SetFusionROTPool
    m = SetFusionROTPool(3, num_iters=2).double()
    assert gradgradcheck(lambda x: m(x), (_x(21, 2, 2, 4, 3).requires_grad_(),))


def test_learned_weights_penalty_matches_autograd_through_the_loop():
    """An R1-style penalty ‖∂D/∂x‖² differentiated in the layer's learned weights: the torch
    path (CPU: chunked, hand-written adjoints) equals autograd through the plain loop, which
    torch.compile tracing would run (``unrolled.plain_log_plan``)."""
    from rotp_triton.ops.rot.torch import unpadded
    pool = rt.ROTPool(3, num_iters=3, backend="torch", scale=None, a1=0.8).double()
    x = _x(5, 6, 3).requires_grad_()
    grads = []
    for chunked in (True, False):
        unpadded.CHUNKED = chunked
        try:
            y = pool(x, ptr=torch.tensor([0, 2, 6]))
            (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
            grads.append(torch.autograd.grad(gx.square().sum(), list(pool.parameters())))
        finally:
            unpadded.CHUNKED = True
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-10 * max(1.0, b.abs().max())


# --------------------------------------------------------------------------------------------
# the kernels (interpreter fp32 on CPU; CUDA with ROTP_TEST_DEVICE=cuda) == reference
# --------------------------------------------------------------------------------------------
@pytest.fixture(params=["function", "operator"])
def autograd_path(request, monkeypatch):
    """The kernels' autograd: their families' torch.autograd.Function (eager mode's) or the
    custom operators' registered autograd (what torch.compile traces)."""
    from rotp_triton.ops.rot.triton import common
    monkeypatch.setattr(common, "EAGER_FUNCTION", request.param == "function")
    return request.param


def _hvp(run, x, extra):
    """∂⟨v, ∂⟨c, y⟩/∂x⟩/∂(x, *extra), y = run(x, *extra); c, v fixed random (float64)."""
    y = run(x, *extra)
    y = y[0] if isinstance(y, tuple) else y
    g = torch.Generator().manual_seed(7)
    c = torch.randn(y.shape, generator=g, **f64).to(y.device, y.dtype)
    (gx,) = torch.autograd.grad((y * c).sum(), x, create_graph=True)
    v = torch.randn(gx.shape, generator=g, **f64).to(gx.device, gx.dtype)
    return torch.autograd.grad((gx * v).sum(), [x, *extra], allow_unused=True,
                               materialize_grads=True)


def _check(kernel, reference, name):
    """Second-order gradients of the kernel path within RTOL of the reference's; the floor for
    small weight derivatives is 1e-3 × the x part (as ``check_against_reference``)."""
    floor = 1e-3 * float(reference[0].norm())
    for i, (a, b) in enumerate(zip(kernel, reference)):
        assert_close(a.cpu(), b, torch.float32, name=f"{name} [{i}]", floor=floor if i else 0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method", METHODS)
def test_kernels_second_order_match_reference(method, variant, autograd_path):
    """Ragged batch (sets of 3, 0 and 5 rows), per-iteration α1, α2, p0 and the plan output:
    the kernels' recorded backward (custom operator or Function) == the reference."""
    T, D = 3, 4
    x64 = _x(8, 8, D)
    w64 = dict(a1=torch.tensor([0.6, 1.1, 0.9], **f64), a2=torch.tensor([0.8, 1.5, 2.0], **f64))
    p64 = torch.softmax(_x(9, 3, D), -1)
    ptr = torch.tensor([0, 3, 3, 8])

    nodes = []

    def run(x, a1, a2, p0):
        y, plan = rt.rot_pool(x, ptr=ptr.to(x.device), method=method, variant=variant,
                              num_iters=T, a1=a1, a2=a2, p0=p0, backend="triton",
                              return_plan=True)
        nodes.append(type(y.grad_fn).__name__)
        return y, plan

    def ref(x, a1, a2, p0):
        sets = [x[0:3], x[3:3], x[3:8]]
        pn = p0 / p0.sum(-1, keepdim=True)
        return rot_pool_sets(sets, p0s=list(pn), method=method, variant=variant,
                             num_iters=T, a1=a1, a2=a2)[0]

    ins = [x64, w64["a1"], w64["a2"], p64]
    kernel = _hvp(run, *_leaves([t.float().to(DEVICE) for t in ins]))
    assert ("Function" if autograd_path == "function" else "rotp_triton") in nodes[0], nodes
    _check(kernel, _hvp(ref, *_leaves(ins)), f"{method} {variant}")


def _leaves(ts):
    ts = [t.clone().requires_grad_() for t in ts]
    return ts[0], ts[1:]


@pytest.mark.parametrize("method", ["sinkhorn", "badmm-e"])
def test_structure_kernels_second_order_match_reference(method, autograd_path):
    """α0 > 0 (the structure kernels), dense, α0 learned."""
    T = 2
    x64 = _x(15, 2, 4, 3)
    a0 = torch.tensor(0.3, **f64)

    def run(x, a0):
        return rt.rot_pool(x, method=method, num_iters=T, a0=a0, inner_iters=2,
                           backend="triton")

    def ref(x, a0):
        return rot_pool_sets(list(x), method=method, num_iters=T, a0=a0, inner_iters=2)[0]

    kernel = _hvp(run, *_leaves([x64.float().to(DEVICE), a0.float().to(DEVICE)]))
    _check(kernel, _hvp(ref, *_leaves([x64, a0])), method)


def test_spread_statistics_kernels_second_order():
    """``scale="auto"`` with the plan output: the spread statistics' kernels (not folded into
    the pooling), ragged and dense, == the torch path in float64."""
    pool = rt.ROTPool(3, method="sinkhorn", num_iters=2, a1=1.0)
    for x64, kw in ((_x(16, 7, 3), dict(ptr=torch.tensor([0, 3, 7]))), (_x(17, 2, 4, 3), {})):
        got = []
        for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
            pool.backend = backend
            m = pool.to(DEVICE if backend == "triton" else "cpu", dtype)

            def run(x):
                return m(x, **{k: v.to(x.device) for k, v in kw.items()}, return_plan=True)
            got.append(_hvp(run, x64.to(m_device(m), dtype).requires_grad_(), []))
        _check(got[0], got[1], f"spread {tuple(x64.shape)}")


@pytest.mark.parametrize("method", METHODS)
def test_window_kernels_second_order_match_reference(method, autograd_path):
    """Uneven adaptive windows (5 × 7 → 3 × 2) on the window kernels, gradients in x and the
    weight table."""
    T = 2
    x64 = _x(10, 1, 3, 5, 7)
    w64 = dict(a1=torch.tensor([0.7, 1.2], **f64), a2=torch.tensor([1.0, 0.6], **f64),
               a3=torch.tensor([0.9, 1.4], **f64), rho=torch.tensor([1.1, 0.8], **f64))
    table64 = torch.stack([torch.zeros(T, **f64), w64["a1"], w64["a2"], w64["a3"], w64["rho"],
                           torch.ones(T, **f64)])
    wins = adaptive_positions(5, 7, 3, 2)

    def run(x, table):
        return window_pool(x, table, output_size=(3, 2), method=method, variant="exact")

    def ref(x, table):
        w = dict(a1=table[A1], a2=table[A2], a3=table[A3], rho=table[RHO])
        return reference_windows(x, wins, (3, 2), method=method, variant="exact",
                                 num_iters=T, **w)

    kernel = _hvp(run, *_leaves([x64.float().to(DEVICE), table64.float().to(DEVICE)]))
    reference = _hvp(ref, *_leaves([x64, table64]))
    _check(kernel, reference, method)


def _layer_kernels_vs_torch(layer, x64, kw, first_in: str):
    """∂‖g‖²/∂(x, parameters) with g = ∂⟨c, y⟩/∂(x or the parameters, ``first_in``), y the
    layer's output: the kernels (fp32) == the torch path (float64)."""
    got = []
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        layer.backend = backend
        m = layer.to(DEVICE if backend == "triton" else "cpu", dtype)
        x = x64.to(m_device(m), dtype).requires_grad_()
        y = m(x, **{k: v.to(x.device) for k, v in kw.items()})
        c = torch.linspace(-1, 1, y.numel(), device=x.device, dtype=dtype).view_as(y)
        params = list(m.parameters())
        g = torch.autograd.grad((y * c).sum(), [x] if first_in == "x" else params,
                                create_graph=True)
        got.append(torch.autograd.grad(sum(gi.square().sum() for gi in g), [x, *params]))
    floor = 1e-3 * float(got[1][0].norm())
    for i, (a, b) in enumerate(zip(*got)):
        assert_close(a.cpu(), b, torch.float32, name=f"{type(layer).__name__} [{i}]",
                     floor=floor if i else 0)


@pytest.mark.parametrize("scale", [None, "auto"])
def test_kernel_layers_penalty_matches_torch_path(scale, autograd_path):
    """An R1-style penalty through the layers with learned weights (the weight-table kernel)
    and ``scale="auto"`` (folded into the kernels): ∂‖∂⟨c, y⟩/∂x‖²/∂(x, parameters) on the
    kernels == the torch path's (float64)."""
    # α1 = ρ = 1: at the layers' near-mean start (100) ∂²/∂x² cancels to 1.8e-3 in fp32 on
    # both paths (the kernels' recorded backward is the fp32 torch path's, bit for bit)
    torch.manual_seed(0)
    w = dict(num_iters=2, scale=scale, a1=1.0, rho=1.0)
    layers = [rt.ROTPool(4, method="sinkhorn", learn_a2=True, **w),
              rt.ROTPool(4, method="badmm-e", **w), rt.ROTPool2d(4, 2, method="badmm-q", **w)]
    inputs = [(_x(11, 7, 4), dict(ptr=torch.tensor([0, 2, 7]))), (_x(12, 2, 5, 4), {}),
              (_x(13, 1, 4, 4, 6), {})]
    for layer, (x64, kw) in zip(layers, inputs):
        _layer_kernels_vs_torch(layer, x64, kw, "x")


def test_kernel_layers_meta_gradient_matches_torch_path(autograd_path):
    """A MAML-style meta-gradient: ∂‖∂L/∂θ‖²/∂(θ, x) with θ the layer's learned weights (the
    weight-table kernel's backward differentiated again), kernels == the torch path (float64)."""
    _layer_kernels_vs_torch(rt.ROTPool(4, method="badmm-e", num_iters=2, a1=1.0, rho=1.0,
                                       learn_a2=True),
                            _x(18, 7, 4), dict(ptr=torch.tensor([0, 2, 7])), "parameters")
    _layer_kernels_vs_torch(rt.ROTPool2d(4, 2, method="sinkhorn", num_iters=2, a1=1.0,
                                         learn_a3=True), _x(19, 1, 4, 4, 6), {}, "parameters")


def m_device(module):
    return next(module.parameters()).device


def test_first_order_unchanged_without_create_graph(monkeypatch):
    """Without create_graph the kernels' own first-order backward runs (no recomputation);
    with it, the torch path is recomputed once."""
    from rotp_triton.ops.rot.triton import recompute
    calls = []
    real = recompute.pool_sets
    monkeypatch.setattr(recompute, "pool_sets", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = _x(14, 2, 5, 3).float().to(DEVICE).requires_grad_()
    rt.rot_pool(x, method="sinkhorn", num_iters=2, backend="triton").sum().backward()
    assert calls == [] and x.grad is not None
    y = rt.rot_pool(x, method="sinkhorn", num_iters=2, backend="triton")
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    assert calls == [1] and gx.requires_grad
