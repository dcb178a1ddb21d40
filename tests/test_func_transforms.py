"""torch.func transforms (``grad``, ``jacrev``, ``jvp``, ``vmap``, per-sample gradients with
``functional_call``) and forward-mode AD (``torch.autograd.forward_ad``'s dual tensors) through
``rot_pool`` and the layers: ``rotp_triton/_transforms.py``.

While a transform is active the package runs plain torch ops (no custom autograd.Function, no
kernel, no value check). Oracle: the same call under plain autograd (float64, the torch path
that the rest of the suite checks against ``reference/``); a vmapped call equals the loop
over its batch. Before, every transform raised (the Functions have no ``setup_context``, and
``vmap`` met host reads).
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, jacrev, jvp, vmap

import rotp_triton as rt
from harness import DEVICE
from rotp_triton.nn.hierarchical import MixedROTPool, SetFusionROTPool

f64 = dict(dtype=torch.float64, device=DEVICE)


def _x(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64).to(DEVICE)


def _close(a, b, name):
    assert a.shape == b.shape, name
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), \
        f"{name}: max difference {(a - b).abs().max().item():.3g}"


def _autograd_grad(f, x):
    x = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(x), x)
    return g


LAYOUTS = {"dense": ((2, 5, 3), {}),
           "ptr": ((7, 3), dict(ptr=torch.tensor([0, 3, 3, 7]))),
           "index": ((7, 3), dict(index=torch.tensor([2, 0, 2, 0, 0, 2, 2]), dim_size=3))}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("method,variant", [("sinkhorn", "exact"), ("sinkhorn", "paper"),
                                            ("badmm-e", "exact"), ("badmm-q", "paper")])
def test_rot_pool_transforms_equal_autograd(method, variant, layout):
    shape, where = LAYOUTS[layout]
    where = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in where.items()}
    x = _x(0, *shape)

    def pool(x):
        return rt.rot_pool(x, **where, method=method, variant=variant, num_iters=3)
    _close(grad(lambda x: pool(x).square().sum())(x),
           _autograd_grad(lambda x: pool(x).square().sum(), x), "grad")
    jac = torch.autograd.functional.jacobian(pool, x)
    _close(jacrev(pool)(x), jac, "jacrev")
    t = _x(1, *shape)
    _close(jvp(pool, (x,), (t,))[1],
           (jac.reshape(-1, x.numel()) @ t.reshape(-1)).reshape(jac.shape[:2]), "jvp")
    _close(vmap(pool)(torch.stack([x, 2 * x - 1])), torch.stack([pool(x), pool(2 * x - 1)]),
           "vmap")


def test_rot_pool_transforms_structure_and_plan():
    """α0 > 0 (the structure solvers, checkpointed per module under plain autograd) and the
    plan output."""
    x = _x(2, 2, 5, 3)
    for method in ("sinkhorn", "badmm-e"):
        def structure(x):
            return rt.rot_pool(x, method=method, num_iters=2, a0=0.3, inner_iters=2)
        _close(jacrev(structure)(x), torch.autograd.functional.jacobian(structure, x),
               f"jacrev a0 {method}")
        _close(vmap(structure)(torch.stack([x, -x])), torch.stack([structure(x), structure(-x)]),
               f"vmap a0 {method}")

    def plan(x):
        return rt.rot_pool(x, num_iters=2, return_plan=True)[1]
    _close(jacrev(plan)(x), torch.autograd.functional.jacobian(plan, x), "jacrev plan")


@pytest.mark.parametrize("layout", ["ptr", "index"])
def test_ragged_layer_with_feature_scale(layout):
    """A ragged batch through ROTPool with ``scale="auto"`` (each set's spread, empty set
    included): jacrev and vmap."""
    shape, where = LAYOUTS[layout]
    where = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in where.items()}
    pool = rt.ROTPool(3, num_iters=2).to(**f64)
    x = _x(5, *shape)

    def f(x):
        return pool(x, **where)
    _close(jacrev(f)(x), torch.autograd.functional.jacobian(f, x), "jacrev")
    _close(vmap(f)(torch.stack([x, 3 * x])), torch.stack([f(x), f(3 * x)]), "vmap")


LAYERS = {
    "ROTPool": (lambda: rt.ROTPool(3, num_iters=2, learn_a2=True), (4, 3)),
    "ROTPool2d": (lambda: rt.ROTPool2d(3, 2, num_iters=2), (3, 4, 6)),
    "AdaptiveROTPool2d": (lambda: rt.AdaptiveROTPool2d(3, (3, 2), num_iters=2), (3, 5, 7)),
    "GSPool": (lambda: rt.GSPool(3, num_prototypes=4), (4, 3)),
    "OTKPool": (lambda: rt.OTKPool(3, 2), (4, 3)),
    "MixedROTPool": (lambda: MixedROTPool(3, num_iters=2), (4, 3)),
    "SetFusionROTPool": (lambda: SetFusionROTPool(3, num_iters=2), (2, 4, 3)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_per_sample_parameter_gradients(name):
    """vmap(grad(loss)) over a batch with the parameters shared (``functional_call``): each
    sample's parameter gradient equals autograd's on that sample alone (``scale="auto"``, the
    layers' default, included: the spread statistics)."""
    make, shape = LAYERS[name]
    layer = make().to(**f64)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    xs = _x(3, 3, *shape)

    def loss(p, sample):
        out = functional_call(layer, p, (sample[None],))
        return (out[0] if isinstance(out, tuple) else out).square().sum()
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for i in range(xs.shape[0]):
        layer.zero_grad()
        loss(dict(layer.named_parameters()), xs[i]).backward()
        for k, p in layer.named_parameters():
            _close(per_sample[k][i], p.grad, f"{name} {k} sample {i}")


def _forward_ad(f, x, t):
    """(f(x), its directional derivative along t) from a dual tensor."""
    with fwAD.dual_level():
        y = f(fwAD.make_dual(x, t))
        p = fwAD.unpack_dual(y)
        assert p.tangent is not None, "the output carries no tangent"
        return p.primal, p.tangent


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("method,a0", [("sinkhorn", 0.0), ("badmm-e", 0.0), ("badmm-q", 0.0),
                                       ("badmm-e", 0.3)])
def test_rot_pool_forward_ad_equals_the_jacobian(method, a0, layout):
    """A dual tensor through rot_pool (before, the torch path's out= ops raised): its tangent
    is the Jacobian (plain autograd) times the direction, the primal the plain call."""
    shape, where = LAYOUTS[layout]
    where = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in where.items()}
    x, t = _x(6, *shape), _x(7, *shape)

    def pool(x):
        return rt.rot_pool(x, **where, method=method, num_iters=3, a0=a0, inner_iters=2)
    y, ty = _forward_ad(pool, x, t)
    jac = torch.autograd.functional.jacobian(pool, x)
    _close(y, pool(x), "primal")
    _close(ty, (jac.reshape(-1, x.numel()) @ t.reshape(-1)).reshape(jac.shape[:2]), "tangent")


@pytest.mark.parametrize("name", list(LAYERS))
def test_layers_forward_ad_equals_the_jacobian(name):
    """The layers (``scale="auto"``, their default, included: before, its autograd.Function
    raised without a jvp) under forward-mode AD: the tangent is the Jacobian times the
    direction."""
    make, shape = LAYERS[name]
    layer = make().to(**f64)
    x, t = _x(8, 2, *shape), _x(9, 2, *shape)

    def f(x):
        out = layer(x)
        return out[0] if isinstance(out, tuple) else out
    y, ty = _forward_ad(f, x, t)
    jac = torch.autograd.functional.jacobian(f, x)
    _close(y, f(x), "primal")
    _close(ty, (jac.reshape(y.numel(), -1) @ t.reshape(-1)).reshape(y.shape), "tangent")


def test_backend_triton_under_a_transform_raises():
    x = _x(4, 2, 5, 3).float()
    with pytest.raises(ValueError, match="torch.func transform"):
        grad(lambda x: rt.rot_pool(x, backend="triton").sum())(x)
    with pytest.raises(ValueError, match="forward-mode AD"):
        _forward_ad(lambda x: rt.rot_pool(x, backend="triton"), x, torch.ones_like(x))
    # backend="auto" takes the torch path there, also for CUDA tensors
    g = grad(lambda x: rt.rot_pool(x).sum())(x)
    assert torch.isfinite(g).all()
