"""The pooling ops under ``torch.autocast`` (``rotp_triton/_autocast.py``): autocast is off inside
every op, so a call under autocast gives the same bits, forward and backward, as the same call
without it, and returns x's dtype (as ``nn.AvgPool2d`` does). Without that, autocast runs the
structure term's matmuls (α0 > 0), OTK's Sinkhorn products and GSP's projection and distances
in bf16 / fp16.

On the CPU autocast means bf16 (the kernels run under the interpreter); with
``ROTP_TEST_DEVICE=cuda``, fp16 on the GPU. Deterministic algorithms on, so that the kernels'
weight gradients are summed in a fixed order and "the same bits" holds on a GPU too.
"""
import pytest
import torch

import rotp_triton as rt
from harness import DEVICE, ON_CUDA, assert_close

LOW = torch.float16 if ON_CUDA else torch.bfloat16


def _run(call, leaves, autocast: bool):
    """Output and the gradients of ``leaves`` of ``(call() * w).sum()`` (w fixed, not 1: every
    output entry weighs differently in the gradient)."""
    if autocast:
        with torch.autocast(DEVICE, dtype=LOW):
            y = call()
    else:
        y = call()
    w = torch.linspace(-1.0, 2.0, y.numel(), device=y.device).view_as(y)
    grads = torch.autograd.grad((y.float() * w).sum(), leaves)
    return y, grads


def _same_under_autocast(call, leaves):
    y0, g0 = _run(call, leaves, autocast=False)
    y1, g1 = _run(call, leaves, autocast=True)
    assert y1.dtype == y0.dtype
    assert bool(torch.isfinite(y0).all())
    assert torch.equal(y1, y0), float((y1 - y0).abs().max())
    for a, b in zip(g1, g0):
        assert torch.equal(a, b), float((a - b).abs().max())


def _x(*shape, dtype=torch.float32):
    return (torch.randn(*shape, device=DEVICE) * 1.5).to(dtype).requires_grad_()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("method,a0", [("sinkhorn", 0.0), ("badmm-e", 0.0), ("badmm-q", 0.0),
                                       ("badmm-e", 0.5), ("sinkhorn", 0.5)])
def test_rot_pool_sets(method, a0, backend, deterministic):
    x = _x(3, 5, 4)
    a1 = torch.full((4,), 0.5, device=DEVICE, requires_grad=True)
    _same_under_autocast(lambda: rt.rot_pool(x, method=method, a0=a0, a1=a1, backend=backend),
                         [x, a1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("method", ["sinkhorn", "badmm-q"])
def test_image_layers(method, backend, deterministic):
    x = _x(2, 4, 4, 4)
    for layer in (rt.ROTPool2d(4, 2, method=method, backend=backend),
                  rt.AdaptiveROTPool2d(4, method=method, backend=backend),
                  rt.AdaptiveROTPool2d(4, 2, method=method, backend=backend)):
        layer = layer.to(DEVICE)
        _same_under_autocast(lambda: layer(x), [x, *layer.parameters()])


SET_LAYERS = {
    "ROTPool a0=0.5": lambda: rt.ROTPool(6, method="badmm-e", a0=0.5),
    "GSPool": lambda: rt.GSPool(6, num_prototypes=3),
    "OTKPool": lambda: rt.OTKPool(6, num_supports=3),
    "MixedROTPool": lambda: rt.MixedROTPool(6),
}


@pytest.mark.parametrize("name", list(SET_LAYERS))
def test_set_layers(name, deterministic):
    """ROTPool with α0 = 0.5 (the structure term), GSP, OTK and the mixture, on a ragged
    batch with PyG's ``index``."""
    x = _x(9, 6)
    index = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2], device=DEVICE)
    layer = SET_LAYERS[name]().to(DEVICE)
    _same_under_autocast(lambda: layer(x, index), [x, *layer.parameters()])


def test_half_input_keeps_its_dtype(deterministic):
    """An input already in the low dtype (a convolution's output under autocast) pools in fp32
    inside and comes back in that dtype, with or without autocast."""
    x = _x(2, 4, 4, 4, dtype=LOW)
    layer = rt.ROTPool2d(4, 2, method="badmm-e").to(DEVICE)
    y0, _ = _run(lambda: layer(x), [x], autocast=False)
    y1, _ = _run(lambda: layer(x), [x], autocast=True)
    assert y0.dtype == y1.dtype == LOW
    assert torch.equal(y0, y1)


@pytest.mark.skipif(ON_CUDA, reason="CPU compile test")
def test_compiled_layer_under_autocast():
    """``torch.compile(fullgraph=True)`` traces the switch (no graph break), and the compiled
    layer under autocast matches the eager layer without autocast (OTK: with its Sinkhorn
    products in bf16 the output moved by 0.8 %; GSP's solver stops on its data: no fullgraph)."""
    x = _x(9, 6)
    index = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    layer = SET_LAYERS["OTKPool"]()
    torch._dynamo.reset()
    f = torch.compile(lambda a: layer(a, index, dim_size=3), fullgraph=True,
                      backend="aot_eager")
    with torch.autocast("cpu", dtype=LOW):
        y1 = f(x)
    assert_close(y1, layer(x, index, dim_size=3), name="y")
