"""ROTPool, MixedROTPool, SetFusionROTPool: reference agreement, gradcheck, initialisation."""
import itertools

import pytest
import torch
from torch import nn

import rotp_triton as rt
from rotp_triton.nn.hierarchical import MixedROTPool, SetFusionROTPool
from reference import hierarchical as ref_h
from reference import rot as ref

from kernel_utils import rel_err

METHODS = ("sinkhorn", "badmm-e", "badmm-q")


def theta(layer):
    """The reference's keyword arguments for the weights a ROTPool layer currently has."""
    w = layer.weights()
    return dict(method=layer.method, variant=layer.variant, num_iters=layer.num_iters,
                inner_iters=layer.inner_iters, **w)


@pytest.mark.parametrize("method,learn_a0", list(itertools.product(METHODS, (False, True))))
def test_gradcheck_through_rotpool(method, learn_a0):
    layer = rt.ROTPool(3, method=method, num_iters=2, inner_iters=2, a1=1.0, rho=1.0,
                       learn_a0=learn_a0, q0="attention", p0="attention").double()
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([0, 0, 2, 2, 2, 1, 2])
    assert torch.autograd.gradcheck(lambda x: layer(x, index), (x,))
    # gradients w.r.t. every parameter (softplus weights, attention) by finite differences
    for name, p in layer.named_parameters():
        def fp(v, name=name):
            params = {n: (v if n == name else q) for n, q in layer.named_parameters()}
            return torch.func.functional_call(layer, params, (x.detach(), index))
        assert torch.autograd.gradcheck(fp, (p.detach().clone().requires_grad_(),)), name


@pytest.mark.parametrize("method", METHODS)
def test_rotpool_matches_reference_with_attention_priors(method):
    layer = rt.ROTPool(4, method=method, num_iters=3, a1=0.9, rho=1.2, learn_a0=True,
                       p0="attention", q0="attention", scale=None).double()
    sizes = [3, 5, 1]
    x = torch.randn(sum(sizes), 4, dtype=torch.float64)
    index = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    y = layer(x, index)
    log_p0, log_q0 = layer.prior_logits(x, index)
    for b in range(3):
        xb = x[index == b]
        p0 = torch.softmax(log_p0[b], 0)
        q0 = torch.softmax(log_q0[index == b], 0)
        yb, _ = ref.rot_pool_set(xb.T, p0=p0, q0=q0, **theta(layer))
        assert rel_err(y[b], yb) < 1e-10
    # attention p0 uses U X 1_N: the set sum, so it is per set
    assert rel_err(log_p0[0], layer.p0_proj(x[index == 0].sum(0))) < 1e-14


@pytest.mark.parametrize("method", METHODS)
def test_default_layer_pools_close_to_the_mean(method):
    """The documented initialisation: within ~1% (S), 2% (B-E), 4% (B-Q) of a feature's std."""
    bound = {"sinkhorn": 0.015, "badmm-e": 0.03, "badmm-q": 0.05}[method]
    x = torch.randn(64, 49, 32)
    y = rt.ROTPool(32, method=method)(x)
    dev = ((y - x.mean(1)) / x.std(1)).abs().mean().item()
    print(f"{method}: mean |y - mean| / std = {dev:.4f}")
    assert dev < bound
    # and it is not the mean: the layer pools by transport, with room to learn
    assert dev > 1e-3


def test_per_iter_params_shapes_and_training_moves_weights():
    layer = rt.ROTPool(5, num_iters=3, a1=1.0, rho=1.0)
    assert layer.weights.raw_a1.shape == (3,)
    shared = rt.ROTPool(5, num_iters=3, per_iter_params=False)
    assert shared.weights.raw_a1.shape == (1,)
    x = torch.randn(4, 6, 5)
    before = {k: v.detach().clone() for k, v in layer.weights().items() if k != "a0"}
    # a fixed α0 is a Python number: the α0 = 0 algorithm is chosen statically
    assert layer.weights()["a0"] == 0.0 and isinstance(layer.weights()["a0"], float)
    assert not layer.weights.structure and rt.ROTPool(5, learn_a0=True).weights.structure
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).pow(2).sum().backward()
    opt.step()
    after = layer.weights()
    for k in ("a1", "a2", "a3", "rho"):
        assert not torch.equal(before[k], after[k]), k
    assert torch.equal(before["tau"], after["tau"]) and after["a0"] == 0.0  # not learned
    layer.reset_parameters()
    for k, v in layer.weights().items():
        if k != "a0":
            assert torch.allclose(v, before[k]), k


def test_repr_is_exact():
    layer = rt.ROTPool(16, method="sinkhorn", num_iters=2, a2=float("inf"), learn_a2=False)
    # only the weights the method reads (Sinkhorn, α0 = 0: α1, α2, α3), learnable ones with *
    assert repr(layer) == ("ROTPool(16, method='sinkhorn', variant='exact', num_iters=2, "
                           "p0='uniform', q0='uniform', a1=100*, a2=inf, a3=1*)")
    assert repr(rt.ROTPool(8, learn_a0=True, scale=None)) == (
        "ROTPool(8, method='badmm-e', variant='exact', num_iters=4, p0='uniform', q0='uniform', "
        "scale=None, a0=0.1*, a1=100*, a2=1*, a3=1*, rho=100*)")


def test_rotpool_errors():
    with pytest.raises(ValueError, match="dim"):
        rt.ROTPool(0)
    with pytest.raises(ValueError, match="method"):
        rt.ROTPool(4, method="sinkhorn2")
    with pytest.raises(ValueError, match="variant"):
        rt.ROTPool(4, variant="published")
    with pytest.raises(ValueError, match="q0"):
        rt.ROTPool(4, q0="learned")
    with pytest.raises(ValueError, match="a2"):
        rt.ROTPool(4, a2=float("inf"))  # learnable and infinite
    with pytest.raises(ValueError, match="a1"):
        rt.ROTPool(4, a1=-1.0)
    with pytest.raises(TypeError, match="unexpected"):
        rt.ROTPool(4, alpha1=1.0)
    layer = rt.ROTPool(4)
    with pytest.raises(ValueError, match="features"):
        layer(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="dimensions"):
        layer(torch.randn(4))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="non-finite"):
        layer(torch.full((2, 3, 4), float("nan")))


# ---------------------------------------------------------------------------------------------
# hierarchical pooling (eqs. 13, 14)
# ---------------------------------------------------------------------------------------------
def test_mixed_pool_matches_reference():
    layer = MixedROTPool(4, methods=("sinkhorn", "badmm-q"), final_method="badmm-e",
                         num_iters=2, a1=0.8, rho=1.5, scale=None).double()
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    y = layer(x)
    for b in range(2):
        yb = ref_h.mixed_pool(x[b].T, [theta(h) for h in layer.heads], theta(layer.final))
        assert rel_err(y[b], yb) < 1e-10
    assert repr(layer) == ("MixedROTPool(4, methods=('sinkhorn', 'badmm-q'), "
                           "final_method='badmm-e')")


def test_set_fusion_matches_reference_ragged_and_dense():
    g = nn.Sequential(nn.Linear(4, 3), nn.Tanh()).double()
    layer = SetFusionROTPool(4, g=g, out_dim=3, num_iters=2, a1=0.7, rho=1.1,
                             scale=None).double()
    # 2 groups: members (graphs) of sizes [3, 2, 4] and [1, 5]
    member_sizes = [3, 2, 4, 1, 5]
    x = torch.randn(sum(member_sizes), 4, dtype=torch.float64)
    index = torch.repeat_interleave(torch.arange(5), torch.tensor(member_sizes))
    group_index = torch.tensor([0, 0, 0, 1, 1])
    y = layer(x, index, group_index=group_index)
    assert y.shape == (2, 3)
    groups = [[0, 1, 2], [3, 4]]
    for gi, members in enumerate(groups):
        Xs = [x[index == m].T for m in members]
        yg = ref_h.set_fusion_pool(Xs, theta(layer.inner), theta(layer.outer), g=g)
        assert rel_err(y[gi], yg) < 1e-10
    # dense (G, M, N, D)
    xd = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    yd = layer(xd)
    yr = layer(xd.reshape(-1, 4), torch.arange(6).repeat_interleave(4),
               group_ptr=torch.tensor([0, 3, 6]))
    assert rel_err(yd, yr) < 1e-12
    with pytest.raises(ValueError, match="group"):
        layer(x, index)


@pytest.mark.parametrize("method,variant,T,learned", [
    ("sinkhorn", "exact", 4, ["a1", "a2", "a3"]),
    ("badmm-e", "exact", 4, ["a1", "a2", "a3", "rho"]),
    ("badmm-e", "exact", 1, ["a2", "rho"]),         # α1, α3 only enter the S-step
    ("badmm-q", "exact", 1, ["a1", "a2", "rho"]),
    ("badmm-q", "paper", 2, ["a1", "a2", "rho"]),   # paper: η (α3) is updated for module t + 2
], ids=lambda v: str(v))
def test_parameters_only_for_the_weights_the_method_reads(method, variant, T, learned):
    layer = rt.ROTPool(4, method=method, variant=variant, num_iters=T)
    assert [n for n, _ in layer.named_parameters()] == [f"weights.raw_{n}" for n in learned]
    with pytest.raises(ValueError, match="rho"):
        rt.ROTPool(4, method="sinkhorn", learn_rho=True)
    with pytest.raises(ValueError, match="tau"):
        rt.ROTPool(4, method="badmm-e", learn_a0=True, learn_tau=True)
    # a value for an unused weight is accepted (kwargs shared by heads of different methods)
    assert not rt.ROTPool(4, method="sinkhorn", rho=5.0).weights.learn["rho"]


# every public layer that holds parameters or buffers, with an input it takes
_LAYERS = {
    "ROTPool2d": (lambda: rt.ROTPool2d(8, 2, num_iters=2), (2, 8, 6, 6)),
    "AdaptiveROTPool2d": (lambda: rt.AdaptiveROTPool2d(8, (1, 2), method="sinkhorn",
                                                      a2=float("inf"), learn_a2=False,
                                                      num_iters=2), (2, 8, 6, 6)),
    "ROTSelectAdaptivePool2d": (lambda: rt.nn.ROTSelectAdaptivePool2d(8, num_iters=2),
                                (2, 8, 6, 6)),
    "ROTPool": (lambda: rt.ROTPool(6, p0="attention", q0="attention", learn_a0=True,
                                   per_iter_params=False, num_iters=2), (3, 5, 6)),
    "OTKPool": (lambda: rt.OTKPool(6, num_supports=2), (3, 5, 6)),
    "GSPool": (lambda: rt.GSPool(6), (3, 5, 6)),
    "MixedROTPool": (lambda: MixedROTPool(6, num_iters=2), (3, 5, 6)),
    "SetFusionROTPool": (lambda: SetFusionROTPool(6, num_iters=2), (2, 3, 5, 6)),
}


@pytest.mark.parametrize("name", list(_LAYERS))
def test_built_on_the_meta_device_then_materialized(name):
    """Deferred initialisation (large models, FSDP): build under ``torch.device("meta")``, then
    ``to_empty()`` (uninitialised memory: NaN here) and every module's ``reset_parameters()``.
    The layer must then equal one built directly: its buffers too, which are not in the state
    dict (so ``load_state_dict`` cannot restore them)."""
    make, shape = _LAYERS[name]
    direct = make()
    with torch.device("meta"):
        layer = make()
    assert all(t.is_meta for t in [*layer.parameters(), *layer.buffers()])
    layer = layer.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*layer.parameters(), *layer.buffers()]:
            t.fill_(float("nan"))
    for m in layer.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    buffers = dict(direct.named_buffers())
    assert buffers.keys() == dict(layer.named_buffers()).keys()
    for key, t in layer.named_buffers():
        torch.testing.assert_close(t, buffers[key], rtol=0, atol=0, msg=key)
    assert all(torch.isfinite(p).all() for p in layer.parameters())
    layer.load_state_dict(direct.state_dict())
    x = torch.randn(*shape)
    torch.testing.assert_close(layer(x), direct(x), rtol=0, atol=0)
