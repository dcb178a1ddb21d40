"""replace_avgpool: swap nn.AdaptiveAvgPool2d for AdaptiveROTPool2d in a CNN (issue 4).

The CPU machines have no torchvision, so the main tests build a small ResNet-like model here;
when torchvision is importable (GPU machine) the same checks run on its resnet18.
"""
import pytest
import torch
from torch import nn

from rotp_triton.nn.image import AdaptiveROTPool2d, replace_avgpool

# Bound on max |Δlogit| / max |logit| right after replacement (default weights a1 = ρ = 100) for
# the model below in eval mode (both heads): measured over 3 seeds at most 0.0016 (Sinkhorn),
# 0.0031 (B-E), 0.0066 (B-Q).
LOGIT_BOUND = {"sinkhorn": 0.004, "badmm-e": 0.008, "badmm-q": 0.015}


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class TinyResNet(nn.Module):
    """conv stem, two stages of basic blocks, AdaptiveAvgPool2d(1), linear head; plus a second
    AdaptiveAvgPool2d((2, 2)) auxiliary head nested in a Sequential (tests recursion and
    output_size)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.layer1 = BasicBlock(16, 16, 1)
        self.layer2 = BasicBlock(16, 32, 2)
        self.aux = nn.Sequential(nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.Linear(128, 4))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        f = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.avgpool(f), 1)), self.aux(f)


def make_model(seed=0):
    torch.manual_seed(seed)
    model = TinyResNet()
    model.train()
    with torch.no_grad():  # give BatchNorm realistic running statistics
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16))
    return model.eval()


@pytest.mark.parametrize("method", ["sinkhorn", "badmm-e", "badmm-q"])
def test_replace_resnet_like(method):
    model = make_model()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref_logits, ref_aux = model(x)
    out = replace_avgpool(model, method=method, backend="torch")
    assert out is model
    assert not any(type(m) is nn.AdaptiveAvgPool2d for m in model.modules())
    assert isinstance(model.avgpool, AdaptiveROTPool2d) and model.avgpool.channels == 32
    assert model.avgpool.output_size == 1
    assert isinstance(model.aux[0], AdaptiveROTPool2d) and model.aux[0].output_size == (2, 2)
    logits, aux = model(x)
    assert logits.shape == ref_logits.shape and aux.shape == ref_aux.shape
    dev = (logits - ref_logits).abs().max() / ref_logits.abs().max()
    assert dev <= LOGIT_BOUND[method], float(dev)
    dev_aux = (aux - ref_aux).abs().max() / ref_aux.abs().max()
    assert dev_aux <= LOGIT_BOUND[method], float(dev_aux)
    # the deviation is the ROT layer's doing: it is not zero
    assert dev > 1e-5
    # gradients reach the new weights
    (logits.sum() + aux.sum()).backward()
    for pool in (model.avgpool, model.aux[0]):
        g = pool.weights.raw_a1.grad  # α1 enters every method (ρ does not enter Sinkhorn)
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
        for p in pool.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all()


def test_replace_keeps_dtype_and_kwargs():
    model = make_model().double()
    replace_avgpool(model, method="sinkhorn", num_iters=2, a1=10.0)
    p = next(model.avgpool.parameters())
    assert p.dtype == torch.float64
    assert model.avgpool.method == "sinkhorn" and model.avgpool.num_iters == 2
    assert model.avgpool.weights.init["a1"] == 10.0
    logits, _ = model(torch.randn(2, 3, 16, 16, dtype=torch.float64))
    assert logits.dtype == torch.float64


def test_channels_from_dry_run_and_errors():
    # no conv/BN precedes the pool: inference from module order fails, a dry run works
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="cannot infer the channel count"):
        replace_avgpool(model)
    replace_avgpool(model, example_input=torch.randn(1, 7, 5, 5))
    assert isinstance(model[0], AdaptiveROTPool2d) and model[0].channels == 7
    assert model(torch.randn(2, 7, 5, 5)).shape == (2, 7)
    # the model itself is the pool
    new = replace_avgpool(nn.AdaptiveAvgPool2d(1), example_input=torch.randn(1, 3, 4, 4))
    assert isinstance(new, AdaptiveROTPool2d) and new.channels == 3
    with pytest.raises(TypeError, match="model"):
        replace_avgpool("resnet")
    # a model without AdaptiveAvgPool2d is returned unchanged
    m = nn.Linear(2, 2)
    assert replace_avgpool(m) is m


def test_torchvision_resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 64, 64))
    model.eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    x = torch.randn(2, 3, 64, 64, device=device)
    with torch.no_grad():
        ref = model(x)
    replace_avgpool(model)
    assert isinstance(model.avgpool, AdaptiveROTPool2d) and model.avgpool.channels == 512
    assert not any(type(m) is nn.AdaptiveAvgPool2d for m in model.modules())
    out = model(x)
    dev = (out - ref).abs().max() / ref.abs().max()
    assert dev <= LOGIT_BOUND["badmm-e"], float(dev)
    out.sum().backward()
    assert all(p.grad is not None for p in model.avgpool.parameters())
