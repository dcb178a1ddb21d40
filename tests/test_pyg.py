"""The set layers as PyTorch Geometric aggregations (issue 15): SAGEConv(aggr=...),
MessagePassing(aggr=...), MultiAggregation, global readout, to_dense_batch + mask, PyG's dim /
leading-batch conventions, pickling. torch_geometric is the optional extra ``.[pyg]``."""
import inspect
import os
import pickle
import subprocess
import sys

import pytest
import torch

import rotp_triton as rt

pyg = pytest.importorskip("torch_geometric")
from torch_geometric.nn import MessagePassing, SAGEConv  # noqa: E402
from torch_geometric.nn.aggr import Aggregation, MultiAggregation  # noqa: E402
from torch_geometric.utils import to_dense_batch  # noqa: E402

D = 6
LAYERS = {
    "ROTPool": lambda: rt.ROTPool(D, num_iters=2),
    "MixedROTPool": lambda: rt.MixedROTPool(D, num_iters=2),
    "GSPool": lambda: rt.GSPool(D, num_prototypes=3),
    "OTKPool": lambda: rt.OTKPool(D, num_supports=2, flatten=True),
}


def _graph(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, D, generator=g, dtype=torch.float64)
    batch = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    edge_index = torch.randint(0, 9, (2, 20), generator=g)
    return x, batch, edge_index


def _make(name):
    torch.manual_seed(0)
    return LAYERS[name]().double()


@pytest.mark.parametrize("name", list(LAYERS))
def test_is_an_aggregation_and_pools_like_one(name):
    layer = _make(name)
    assert isinstance(layer, Aggregation)
    x, batch, _ = _graph()
    y = layer(x, batch)
    assert y.shape[0] == 3
    for b in range(3):  # global readout: each graph alone
        assert torch.allclose(y[b], layer(x[batch == b])[0], rtol=1e-10, atol=1e-12)
    ptr = torch.tensor([0, 3, 5, 9])
    assert torch.allclose(layer(x, ptr=ptr), y, rtol=1e-10, atol=1e-12)
    assert torch.allclose(layer(x, batch, dim_size=4)[:3], y, rtol=1e-10, atol=1e-12)
    assert torch.all(layer(x, batch, dim_size=4)[3] == 0)  # a set without rows
    # PyG's leading batch axes: (K, N, D) with index along dim -2, each k on its own
    xk = torch.stack([x, 2 * x + 1])
    yk = layer(xk, batch)
    assert yk.shape == (2,) + tuple(y.shape)
    assert torch.allclose(yk[1], layer(2 * x + 1, batch), rtol=1e-10, atol=1e-12)
    # ... and dim=0 on (N, K, D) (e.g. attention heads of a GATConv)
    assert torch.allclose(layer(xk.transpose(0, 1), batch, dim=0), yk.transpose(0, 1),
                          rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(LAYERS))
def test_in_multi_aggregation(name):
    layer = _make(name)
    x, batch, _ = _graph()
    multi = MultiAggregation(["mean", layer])
    y = multi(x, batch)
    mean = torch.zeros(3, D, dtype=x.dtype).index_add_(0, batch, x) / torch.bincount(batch)[:, None]
    assert torch.allclose(y, torch.cat([mean, layer(x, batch)], -1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["ROTPool", "MixedROTPool", "GSPool"])
def test_sage_conv_and_message_passing(name):
    layer = _make(name)
    x, _, edge_index = _graph()
    conv = SAGEConv(D, 4, aggr=layer).double()
    out = conv(x, edge_index)
    assert out.shape == (9, 4) and torch.isfinite(out).all()
    # the neighbourhood of node i is the set of messages x_j, j -> i
    src, dst = edge_index
    agg = layer(x[src], dst, dim_size=9)
    ref = conv.lin_l(agg) + conv.lin_r(x)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)
    out.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())

    class Neighbours(MessagePassing):
        def forward(self, x, edge_index):
            return self.propagate(edge_index, x=x)

    mp = Neighbours(aggr=layer)
    assert torch.allclose(mp(x, edge_index), agg, rtol=1e-10, atol=1e-12)
    # the conv pickles with its aggregation and state dict
    clone = pickle.loads(pickle.dumps(conv))
    assert torch.allclose(clone(x, edge_index), out, rtol=0, atol=0)
    assert set(conv.state_dict()) == set(clone.state_dict())


@pytest.mark.parametrize("name", ["ROTPool", "MixedROTPool", "GSPool", "OTKPool"])
def test_to_dense_batch_with_mask_equals_ragged(name):
    layer = _make(name)
    x, batch, _ = _graph()
    xd, mask = to_dense_batch(x, batch)
    xd = xd + 5.0 * (~mask)[..., None]  # padding must not matter
    assert torch.allclose(layer(xd, mask=mask), layer(x, batch), rtol=1e-10, atol=1e-12)


def test_rotpool_mask_plan_and_hierarchical():
    layer = _make("ROTPool")
    x, batch, _ = _graph()
    xd, mask = to_dense_batch(x, batch)
    y, plan = layer(xd, mask=mask, return_plan=True)
    y_r, plan_r = layer(x, batch, return_plan=True)
    assert torch.allclose(plan[mask], plan_r, rtol=1e-10, atol=1e-12)
    assert torch.all(plan[~mask] == 0)
    mixed = _make("MixedROTPool")
    y, plans = mixed(xd, mask=mask, return_plan=True)
    assert torch.allclose(y, mixed(x, batch), rtol=1e-10, atol=1e-12)
    assert len(plans.heads) == 3 and plans.final.shape == (3, 3, D)
    with pytest.raises(ValueError, match="mask"):
        layer(xd, mask=mask[:, :-1])
    with pytest.raises(TypeError, match="bool"):
        layer(xd, mask=mask.float())


ALL_MODULES = [rt.ROTPool, rt.MixedROTPool, rt.SetFusionROTPool, rt.GSPool, rt.OTKPool]


@pytest.mark.parametrize("cls", ALL_MODULES, ids=lambda c: c.__name__)
def test_return_plan_is_keyword_only(cls):
    params = inspect.signature(cls.forward).parameters
    assert params["return_plan"].kind is inspect.Parameter.KEYWORD_ONLY
    if "dim" in params:
        assert list(params)[:6] == ["self", "x", "index", "ptr", "dim_size", "dim"]


def test_reprs_and_reset_parameters():
    assert repr(rt.GSPool(6, num_prototypes=3)) == (
        "GSPool(6, 6, num_prototypes=3, mass=0.3, gamma=5.0, num_iters=100)")
    assert repr(rt.OTKPool(6, num_supports=2, flatten=True)) == (
        "OTKPool(6, num_supports=2, heads=1, eps=0.1, num_iters=10, log_domain=True, "
        "flatten=True)")
    assert repr(rt.MixedROTPool(6)) == (
        "MixedROTPool(6, methods=('sinkhorn', 'badmm-e', 'badmm-q'), final_method='badmm-e')")
    for name in LAYERS:
        layer = _make(name)
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(1.0)
        layer.reset_parameters()
        if name in ("ROTPool", "MixedROTPool"):  # deterministic init
            for k, v in layer.state_dict().items():
                assert torch.equal(v, before[k]), k


def test_without_pyg_the_layers_are_plain_modules():
    env = dict(os.environ, ROTP_TRITON_NO_PYG="1")
    code = ("import torch, rotp_triton as rt, sys; "
            "assert type(rt.ROTPool(4)).__mro__[1].__mro__[1] is torch.nn.Module; "
            "assert 'torch_geometric' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "ok", out.stderr


def test_set_fusion_mask_equals_ragged():
    torch.manual_seed(0)
    layer = rt.SetFusionROTPool(D, num_iters=2).double()
    x = torch.randn(2, 3, 4, D, dtype=torch.float64)
    rows = torch.tensor([[4, 2, 0], [1, 3, 4]])                     # member 2 of group 0: empty
    mask = torch.arange(4)[None, None, :] < rows[..., None]
    xr = x[mask]
    member_rows = rows.flatten()
    keep = member_rows > 0
    index = torch.repeat_interleave(torch.arange(int(keep.sum())), member_rows[keep])
    group_index = torch.tensor([0, 0, 1, 1, 1])
    y = layer(x + 7.0 * (~mask)[..., None], mask=mask)
    assert torch.allclose(y, layer(xr, index, group_index=group_index), rtol=1e-10, atol=1e-12)


def test_no_index_is_one_set_then_empty_ones_like_pyg():
    x, _, _ = _graph()
    for name in LAYERS:
        layer = _make(name)
        ref = _make(name)(x, torch.zeros(9, dtype=torch.long), dim_size=3)
        y = layer(x, dim_size=3)
        assert torch.allclose(y, ref, rtol=1e-10, atol=1e-12) and torch.all(y[1:] == 0)
