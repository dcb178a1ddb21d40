"""torch.fx symbolic tracing (``rotp_triton/_fx.py``): each layer is one ``call_module`` node
and ``rot_pool`` / ``otk_pool`` / ``gsp_pool`` one ``call_function`` node, as torch's pooling
layers and functions are, so that FX tools (torchvision's ``create_feature_extractor``, timm's
FX features, FX quantization) take a model that holds them. The traced graph computes what the
model computes."""
import io
import operator

import pytest
import torch
import torch.fx as fx
from torch import nn

import rotp_triton as rt
from rotp_triton.nn.hierarchical import MixedROTPool, SetFusionROTPool


class _Net(nn.Module):
    """A small CNN: local ROT pooling after a conv, a ROT head pool inside a Sequential."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = rt.ROTPool2d(8, 2, method="sinkhorn", num_iters=2)
        self.head = nn.Sequential(rt.AdaptiveROTPool2d(8, 1, flatten=True, num_iters=2),
                                  nn.Linear(8, 4))

    def forward(self, x):
        return self.head(torch.relu(self.pool(self.conv(x))))


def _call_targets(gm, op):
    return [n.target for n in gm.graph.nodes if n.op == op]


def test_image_layers_are_call_module_nodes():
    net = _Net()
    gm = fx.symbolic_trace(net)
    assert _call_targets(gm, "call_module") == ["conv", "pool", "head.0", "head.1"]
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y_ref = net(x)
    g_ref = torch.autograd.grad(y_ref.square().sum(), [x, *net.parameters()])
    y = gm(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    g = torch.autograd.grad(y.square().sum(), [x, *gm.parameters()])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    buf = io.BytesIO()  # a GraphModule that holds the layers saves and loads whole
    torch.save(gm, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x), y_ref, rtol=0, atol=0)


class _QualnameTracer(fx.Tracer):
    """The part of torchvision's ``NodePathTracer`` (feature_extraction.py) that names each node
    by the qualified name of the module it was created in."""

    def __init__(self):
        super().__init__()
        self.current, self.names = "", {}

    def call_module(self, m, forward, args, kwargs):
        old, self.current = self.current, self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.current = old

    def create_proxy(self, kind, target, args, kwargs, *a, **k):
        proxy = super().create_proxy(kind, target, args, kwargs, *a, **k)
        name = self.current if kind == "call_module" else f"{self.current}.{target}"
        self.names[proxy.node] = name.lstrip(".")
        return proxy


def test_feature_extraction_by_node_name():
    """What create_feature_extractor does: trace, then return the node named "pool"."""
    net = _Net()
    tracer = _QualnameTracer()
    graph = tracer.trace(net)
    by_name = {tracer.names.get(n): n for n in graph.nodes}
    assert by_name["pool"].op == "call_module" and by_name["head.0"].op == "call_module"
    out = next(n for n in graph.nodes if n.op == "output")
    out.args = ((by_name["pool"], by_name["head.0"]),)
    features = fx.GraphModule(net, graph)
    features.graph.eliminate_dead_code()
    features.recompile()
    assert "head.1" not in features.code                # the Linear after it is cut off
    x = torch.randn(2, 3, 8, 8)
    pooled, head = features(x)
    torch.testing.assert_close(pooled, net.pool(net.conv(x)), rtol=0, atol=0)
    torch.testing.assert_close(head, net.head[0](torch.relu(pooled)), rtol=0, atol=0)


class _Sets(nn.Module):
    def __init__(self):
        super().__init__()
        self.rot = rt.ROTPool(4, num_iters=2, q0="attention")
        self.otk = rt.OTKPool(4, num_supports=2)
        self.gsp = rt.GSPool(4, num_prototypes=3)
        self.mixed = MixedROTPool(4, num_iters=2)
        self.fusion = SetFusionROTPool(4, num_iters=2)

    def forward(self, x, index, dense):
        return (self.rot(x, index, dim_size=4), self.otk(x, index=index, dim_size=4),
                self.gsp(x, index, dim_size=4), self.mixed(dense),
                self.fusion(dense.unsqueeze(0)))


def test_set_layers_are_call_module_nodes_with_their_arguments():
    net = _Sets()
    gm = fx.symbolic_trace(net)
    assert _call_targets(gm, "call_module") == ["rot", "otk", "gsp", "mixed", "fusion"]
    rot = next(n for n in gm.graph.nodes if n.target == "rot")
    assert rot.kwargs == {"dim_size": 4}          # the arguments as the model passed them
    x, index = torch.randn(9, 4), torch.tensor([0, 0, 1, 1, 1, 1, 3, 3, 3])  # set 2 empty
    dense = torch.randn(3, 5, 4)
    for a, b in zip(gm(x, index, dense), net(x, index, dense)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a1 = nn.Parameter(torch.tensor([0.5, 2.0]))
        self.supports = nn.Parameter(torch.randn(1, 2, 4))
        self.prototypes = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return (rt.rot_pool(x, method="sinkhorn", num_iters=2, a1=self.a1) * 2,
                rt.otk_pool(x, self.supports), rt.gsp_pool(x, self.prototypes))


def test_functions_are_call_function_nodes():
    net = _Functional()
    gm = fx.symbolic_trace(net)
    targets = _call_targets(gm, "call_function")
    assert [t for t in targets if t is not operator.mul] == [rt.rot_pool, rt.otk_pool, rt.gsp_pool]
    node = gm.graph.find_nodes(op="call_function", target=rt.rot_pool)[0]
    assert node.kwargs["a1"].op == "get_attr"   # the learned weight stays a graph input
    x = torch.randn(3, 5, 4)
    for a, b in zip(gm(x), net(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_tracing_the_layer_itself_says_what_to_trace():
    with pytest.raises(TypeError, match="cannot trace into ROTPool2d"):
        fx.symbolic_trace(rt.ROTPool2d(8, 2))


def test_torchvision_feature_extractor():
    fe = pytest.importorskip("torchvision.models.feature_extraction")
    torchvision = pytest.importorskip("torchvision")
    model = rt.replace_avgpool(torchvision.models.resnet18(weights=None), num_iters=2).eval()
    extractor = fe.create_feature_extractor(model, {"avgpool": "pooled", "fc": "logits"})
    x = torch.randn(2, 3, 64, 64)
    out = extractor(x)
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], model(x), rtol=0, atol=0)
    assert out["pooled"].shape == (2, 512, 1, 1)
