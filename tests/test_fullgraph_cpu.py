"""``torch.compile(fullgraph=True)`` traces the layers without a graph break, on CPU: the torch
path (ROTPool dense / ptr / index + dim_size, AdaptiveROTPool2d, ROTPool2d) through AOT
autograd, and the Triton path (custom ops; under TRITON_INTERPRET=1 the compiled graph runs on
the "eager" backend, as wrap_triton hands back the raw interpreted kernel). Output and input
gradient equal the uncompiled layer's."""
import pytest
import torch

import rotp_triton as rt
from harness import ON_CUDA, assert_close

pytestmark = pytest.mark.skipif(ON_CUDA, reason="CPU compile tests")


def _set_inputs(layout):
    g = torch.Generator().manual_seed(0)
    if layout == "dense":
        return torch.randn(3, 5, 4, generator=g), {}
    x = torch.randn(9, 4, generator=g)
    if layout == "ptr":
        return x, dict(ptr=torch.tensor([0, 2, 2, 9]))
    return x, dict(index=torch.tensor([2, 0, 0, 2, 1, 2, 0, 0, 2]), dim_size=4)


def _check(layer, x, kwargs, backend):
    torch._dynamo.reset()
    outs = []
    for f in (torch.compile(layer, fullgraph=True, backend=backend), layer):
        xi = x.detach().clone().requires_grad_()
        y = f(xi, **kwargs)
        (gx,) = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), xi)
        outs.append((y, gx))
    assert_close(outs[0][0], outs[1][0], name="y")
    assert_close(outs[0][1], outs[1][1], name="dx")


@pytest.mark.parametrize("layout", ["dense", "ptr", "index-dim_size"])
def test_rotpool_torch_path(layout):
    x, kw = _set_inputs(layout)
    _check(rt.ROTPool(4, method="badmm-e", num_iters=2, backend="torch"), x, kw, "aot_eager")


@pytest.mark.parametrize("layer", ["adaptive", "local"])
def test_image_layers_torch_path(layer):
    x = torch.randn(2, 4, 6, 6)
    m = (rt.AdaptiveROTPool2d(4, num_iters=2, method="sinkhorn") if layer == "adaptive"
         else rt.ROTPool2d(4, 2, num_iters=2))
    _check(m, x, {}, "aot_eager")


@pytest.mark.parametrize("layout", ["dense", "ptr", "index-dim_size"])
@pytest.mark.parametrize("method", ["sinkhorn", "badmm-e"])
def test_rotpool_triton_path(method, layout):
    x, kw = _set_inputs(layout)
    _check(rt.ROTPool(4, method=method, num_iters=2, backend="triton"), x, kw, "eager")


@pytest.mark.parametrize("layout", ["dense", "ptr"])
def test_rotpool_triton_structure_path(layout):
    """α0 > 0 (learn_a0: the structure kernels) on a ragged batch with an empty set as well as
    a dense one: the kernels read ptr on the device only, so nothing breaks the graph."""
    x, kw = _set_inputs(layout)
    _check(rt.ROTPool(4, method="badmm-e", num_iters=2, learn_a0=True, backend="triton"), x, kw,
           "eager")
