"""Activation checkpointing (``torch.utils.checkpoint``, both modes; FSDP and most large-model
training wrap blocks in it): a layer under checkpoint gives the same output and the same
gradients, bit for bit, as without. The non-reentrant mode lets a backward unpack
``ctx.saved_tensors`` once only."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import rotp_triton as rt

from kernel_utils import DEVICE

METHODS = ("sinkhorn", "badmm-e", "badmm-q")


def _check(layer, x):
    leaves = [x, *layer.parameters()]
    y = layer(x)
    ref = torch.autograd.grad(y.square().sum(), leaves)
    for reentrant in (False, True):
        for t in leaves:
            t.grad = None
        y2 = checkpoint(layer, x, use_reentrant=reentrant)
        y2.square().sum().backward()  # (the reentrant mode does not support autograd.grad)
        torch.testing.assert_close(y2, y, rtol=0, atol=0)
        for t, g in zip(leaves, ref):
            torch.testing.assert_close(t.grad, g, rtol=0, atol=0)


@pytest.mark.parametrize("method,variant", [(m, v) for m in METHODS for v in ("exact", "paper")])
def test_torch_path_under_checkpoint(method, variant):
    kw = dict(method=method, variant=variant, num_iters=3, backend="torch")
    _check(rt.ROTPool2d(8, 2, **kw), torch.randn(2, 8, 6, 6, requires_grad=True))
    _check(rt.AdaptiveROTPool2d(8, 1, **kw), torch.randn(2, 8, 5, 5, requires_grad=True))
    _check(rt.ROTPool(8, q0="attention", **kw), torch.randn(3, 5, 8, requires_grad=True))
    _check(rt.ROTPool(8, learn_a0=True, **kw), torch.randn(3, 5, 8, requires_grad=True))


@pytest.mark.parametrize("case", ["window", "sets-sinkhorn", "sets-badmm", "structure"])
def test_kernels_under_checkpoint(case):
    """One layer per kernel family (under the interpreter on CPU)."""
    kw = dict(num_iters=2, backend="triton")
    layer, shape = {
        "window": (rt.ROTPool2d(4, 2, **kw), (2, 4, 4, 4)),
        "sets-sinkhorn": (rt.ROTPool(4, method="sinkhorn", **kw), (2, 5, 4)),
        "sets-badmm": (rt.ROTPool(4, method="badmm-q", **kw), (2, 5, 4)),
        "structure": (rt.ROTPool(4, learn_a0=True, **kw), (2, 5, 4)),
    }[case]
    _check(layer.to(DEVICE), torch.randn(*shape, device=DEVICE, requires_grad=True))
