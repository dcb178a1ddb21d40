"""``replace_local_pools`` (rotp_triton/nn/surgery_local.py): every nn.MaxPool2d / nn.AvgPool2d
that runs becomes a ROTPool2d with the same windows and the channel count of its input; a max
pool starts at ROT's max-pooling limit, an average pool near the mean. torchvision is tried
where it imports; otherwise its patterns are reproduced small (the ResNet stem's 3×3/2 max
pool, VGG's 2×2 pools)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rotp_triton as rt
from rotp_triton.nn.surgery_local import MAX_POOL_INIT


class _MyMaxPool(nn.MaxPool2d):
    """A subclass, as some model zoos define."""


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),             # the ResNet stem
        nn.Conv2d(16, 24, 3, padding=1),
        nn.AvgPool2d(2, ceil_mode=True),                  # odd sizes: a partial last window
        nn.Conv2d(24, 8, 1),
        _MyMaxPool(2),                                    # VGG's 2×2
        nn.MaxPool2d(2, dilation=2),                      # cannot be a ROTPool2d: kept
        nn.AdaptiveAvgPool2d(1), nn.Flatten())            # the head pool: replace_avgpool's


def _pool_inputs(model, x):
    """{name: input} of every pooling module in one run."""
    seen, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, rt.ROTPool2d)):
            hooks.append(m.register_forward_pre_hook(
                lambda _m, a, name=name: seen.setdefault(name, a[0].detach())))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_every_local_pool_with_the_same_windows():
    model = _net()
    before = {n: m for n, m in model.named_modules()}
    x = torch.randn(2, 3, 33, 29)
    shapes = {n: model[:int(n) + 1](x).shape for n in ("2", "4", "6")}
    assert rt.replace_local_pools(model, x) is model
    assert model.rotp_replaced == ["2", "4", "6"]
    assert isinstance(model[7], nn.MaxPool2d) and isinstance(model[8], nn.AdaptiveAvgPool2d)
    for name, channels in (("2", 16), ("4", 24), ("6", 8)):
        new, old = model.get_submodule(name), before[name]
        assert isinstance(new, rt.ROTPool2d) and new.channels == channels
        pair = (lambda v: (v, v) if isinstance(v, int) else tuple(v))
        assert new.kernel_size == pair(old.kernel_size) and new.stride == pair(old.stride)
        assert new.padding == pair(old.padding) and new.ceil_mode == old.ceil_mode
    for size in ((33, 29), (24, 24), (27, 31)):                # the same output shapes
        xs = torch.randn(2, 3, *size)
        for n in ("2", "4", "6"):
            want = _net()[:int(n) + 1](xs).shape if size != (33, 29) else shapes[n]
            assert model[:int(n) + 1](xs).shape == want
    y = model(x)
    y.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)


def test_max_pools_start_at_the_max_and_average_pools_near_the_mean():
    model = _net()
    x = torch.randn(2, 3, 32, 32)
    inputs = _pool_inputs(model, x)
    rt.replace_local_pools(model, x)
    for name in ("2", "6"):                                   # max pools
        new, z = model.get_submodule(name), inputs[name]
        assert (new.method, new.num_iters) == ("sinkhorn", 1)
        want = F.max_pool2d(z, new.kernel_size, new.stride, new.padding)
        with torch.no_grad():
            got = new(z)
        # α1 = 0.05 of the feature spread: measured 0.2-0.4 % relative RMS
        assert (got - want).norm() <= 1e-2 * want.norm(), name
    z = torch.randn(2, 24, 10, 10)                            # std 1, as tests/test_image.py
    new = model.get_submodule("4")
    with torch.no_grad():
        rms = (new(z) - F.avg_pool2d(z, 2, ceil_mode=True)).square().mean().sqrt()
    assert rms <= 0.03                                        # B-E defaults: test_image.py's bound


def test_selection_kwargs_and_errors():
    model = rt.replace_local_pools(_net(), input_size=(1, 3, 32, 32), include="[26]",
                                   exclude="6", method="badmm-q", num_iters=2)
    assert model.rotp_replaced == ["2"]
    assert model[2].method == "badmm-q" and model[2].num_iters == 2   # given kwargs: no max init
    assert isinstance(model[6], _MyMaxPool)
    model = rt.replace_local_pools(_net(), input_size=(1, 3, 32, 32), backend="torch")
    assert (model[2].method, model[2].backend) == ("sinkhorn", "torch")  # the rest: max init
    assert (model[4].method, model[4].backend) == ("badmm-e", "torch")
    with pytest.raises(ValueError, match=r"no local pool.*'7' \(MaxPool2d: dilation=2\)"):
        rt.replace_local_pools(_net(), input_size=(1, 3, 32, 32), include="7")
    kept = rt.replace_local_pools(_net(), input_size=(1, 3, 32, 32), include="7", strict=False)
    assert kept.rotp_replaced == [] and isinstance(kept[7], nn.MaxPool2d)
    with pytest.raises(TypeError, match="include"):
        rt.replace_local_pools(_net(), include=3)
    with pytest.raises(ValueError, match="dry run"):
        rt.replace_local_pools(_net(), input_size=(1, 5, 32, 32))  # 5 channels into a 3-ch conv
    indices = nn.Sequential(nn.Conv2d(3, 4, 1), nn.MaxPool2d(2, return_indices=True))
    with pytest.raises(ValueError, match="return_indices=True"):
        rt.replace_local_pools(indices, input_size=(1, 3, 8, 8))
    pool = rt.replace_local_pools(nn.MaxPool2d(2), input_size=(1, 4, 8, 8))  # the model is a pool
    assert isinstance(pool, rt.ROTPool2d) and pool.channels == 4 and pool.rotp_replaced == [""]
    assert MAX_POOL_INIT["a2"] == math.inf


class _FunctionalNet(nn.Module):
    """LeNet-style: pooling by function calls (no module to swap)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), (2, 2), stride=2, ceil_mode=True)
        x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
        x = torch.max_pool2d(x, 1)
        x = F.max_pool2d(x, 1, dilation=2)                   # kept: dilated
        return x.flatten(1)


def test_functional_pooling_calls():
    net = _FunctionalNet()
    x = torch.randn(2, 1, 29, 29)
    with pytest.raises(ValueError, match="functional=True"):
        rt.replace_local_pools(net, x)
    gm = rt.replace_local_pools(net, x, functional=True)
    assert gm.rotp_replaced == ["rot_max_pool2d", "rot_max_pool2d_1", "rot_avg_pool2d",
                                "rot_max_pool2d_2"]
    pools = [m for m in gm.modules() if isinstance(m, rt.ROTPool2d)]
    assert [(p.channels, p.kernel_size, p.stride, p.padding, p.ceil_mode, p.method)
            for p in pools] == [(6, (2, 2), (2, 2), (0, 0), False, "sinkhorn"),
                                (16, (2, 2), (2, 2), (0, 0), True, "sinkhorn"),
                                (16, (3, 3), (2, 2), (1, 1), False, "badmm-e"),
                                (16, (1, 1), (1, 1), (0, 0), False, "sinkhorn")]
    left = [n.kwargs.get("dilation") for n in gm.graph.nodes if n.op == "call_function"
            and n.target in (F.max_pool2d, torch.max_pool2d, F.avg_pool2d)]
    assert left == [2]
    with torch.no_grad():
        y, want = gm(x), net(x)
    assert y.shape == want.shape
    assert (y - want).norm() <= 2e-2 * want.norm()           # measured 0.45 %
    assert not any(isinstance(m, rt.ROTPool2d) for m in net.modules())   # net left as it was
    one = rt.replace_local_pools(net, x, functional=True, include="max_pool2d_1")
    assert one.rotp_replaced == ["rot_max_pool2d_1"]
    with pytest.raises(ValueError, match="'max_pool2d_3': dilation=2"):
        rt.replace_local_pools(net, x, functional=True, include="max_pool2d_3")


def test_torchvision_vgg_and_resnet():
    torchvision = pytest.importorskip("torchvision")
    for make, names in ((torchvision.models.vgg11, None), (torchvision.models.resnet18,
                                                            ["maxpool"])):
        model = make(weights=None).eval()
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            shape = model(x).shape
        rt.replace_local_pools(model, x)
        if names is None:   # VGG: the five 2×2 max pools of its features
            names = [n for n, m in model.named_modules() if isinstance(m, rt.ROTPool2d)]
            assert len(names) == 5
        assert model.rotp_replaced == names
        with torch.no_grad():
            assert model(x).shape == shape
