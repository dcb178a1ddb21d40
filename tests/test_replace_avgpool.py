"""replace_avgpool: put ROT pooling in place of the pool that feeds a model's head (issues 4, 15).

torchvision and timm do not import on the CPU machines, so each pattern of theirs is reproduced
by a small local model (ResNet head + auxiliary head, squeeze-excitation blocks, functional
pooling, a subclass of AdaptiveAvgPool2d, a swin-like NHWC head, a timm-like
SelectAdaptivePool2d with reset_classifier); the real models run where they import.
"""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

from rotp_triton.nn.image import AdaptiveROTPool2d
from rotp_triton.nn.surgery import ROTSelectAdaptivePool2d, replace_avgpool

# Bound on max |Δlogit| / max |logit| right after replacement (default weights a1 = ρ = 100,
# relative to each image's feature spread: scale="auto") for the model below in eval mode (both
# heads): measured over 3 seeds at most 0.0166 (Sinkhorn), 0.0312 (B-E), 0.0675 (B-Q). (With
# scale=None the absolute a1 = 100 is ~700 spreads here - this untrained model's head features
# vary little over the 4×4 map - and the logits moved ~6× less; "auto" keeps the start at ~1% /
# 2% / 4% of a feature's spread whatever the features' scale, tests/test_feature_scale.py.)
LOGIT_BOUND = {"sinkhorn": 0.025, "badmm-e": 0.05, "badmm-q": 0.10}


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
    out = replace_avgpool(model, include="*", method=method, backend="torch")
    assert out is model and sorted(model.rotp_replaced) == ["aux.0", "avgpool"]
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


def test_default_replaces_only_the_head_pool():
    """The (2, 2) auxiliary pool is not global, and it is not the head: only avgpool changes."""
    model = make_model()
    replace_avgpool(model)
    assert model.rotp_replaced == ["avgpool"]
    assert isinstance(model.avgpool, AdaptiveROTPool2d)
    assert type(model.aux[0]) is nn.AdaptiveAvgPool2d
    # include / exclude: patterns and predicates
    model = make_model()
    replace_avgpool(model, include=lambda name, m: m.output_size == (2, 2))
    assert model.rotp_replaced == ["aux.0"]
    model = make_model()
    replace_avgpool(model, include=["aux.*", "avgpool"], exclude="avgpool")
    assert model.rotp_replaced == ["aux.0"] and type(model.avgpool) is nn.AdaptiveAvgPool2d
    with pytest.raises(TypeError, match="include"):
        replace_avgpool(make_model(), include=3)


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
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="dry run"):  # default input (1, 3, 224, 224)... works
        replace_avgpool(model, example_input="not a tensor")
    replace_avgpool(model, input_size=(1, 7, 5, 5))
    assert isinstance(model[0], AdaptiveROTPool2d) and model[0].channels == 7
    assert model(torch.randn(2, 7, 5, 5)).shape == (2, 7)
    # the model itself is the pool
    new = replace_avgpool(nn.AdaptiveAvgPool2d(1), example_input=torch.randn(1, 3, 4, 4))
    assert isinstance(new, AdaptiveROTPool2d) and new.channels == 3
    with pytest.raises(TypeError, match="model"):
        replace_avgpool("resnet")
    # nothing to replace: a clear error, or the model unchanged with strict=False
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(ValueError, match="no average pool"):
        replace_avgpool(m)
    assert replace_avgpool(m, strict=False) is m and m.rotp_replaced == []


# --------------------------------------------------------------------------------------------
# the patterns of torchvision / timm models, reproduced small
# --------------------------------------------------------------------------------------------
class SqueezeExcite(nn.Module):
    """efficientnet / mobilenet_v3: a global pool inside every block, scaling the channels."""

    def __init__(self, c):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(self.avgpool(x)))))


class SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), SqueezeExcite(8),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), SqueezeExcite(16),
            nn.Conv2d(16, 24, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(24, 5)

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def test_squeeze_excitation_pools_are_kept():
    torch.manual_seed(0)
    model = SENet().eval()
    replace_avgpool(model, input_size=(1, 3, 16, 16))
    assert model.rotp_replaced == ["avgpool"] and model.avgpool.channels == 24
    se = [m for m in model.modules() if isinstance(m, SqueezeExcite)]
    assert all(type(m.avgpool) is nn.AdaptiveAvgPool2d for m in se)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    # and every pool on request
    model = SENet().eval()
    replace_avgpool(model, include="*", input_size=(1, 3, 16, 16))
    assert len(model.rotp_replaced) == 3


class MyAvgPool(nn.AdaptiveAvgPool2d):
    pass


def test_subclasses_match():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), MyAvgPool(1), nn.Flatten(), nn.Linear(6, 2))
    replace_avgpool(model, input_size=(1, 3, 8, 8))
    assert isinstance(model[1], AdaptiveROTPool2d) and model[1].channels == 6


class FunctionalPoolNet(nn.Module):
    """densenet / mobilenet_v2: the head pools with F.adaptive_avg_pool2d (or x.mean)."""

    def __init__(self, use_mean=False):
        super().__init__()
        self.use_mean = use_mean
        self.features = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU())
        self.classifier = nn.Linear(12, 4)

    def forward(self, x):
        f = self.features(x)
        if self.use_mean:
            f = f.mean((2, 3))
        else:
            f = nn.functional.adaptive_avg_pool2d(f, (1, 1)).flatten(1)
        return self.classifier(f)


@pytest.mark.parametrize("use_mean", [False, True], ids=["adaptive_avg_pool2d", "mean"])
def test_functional_pooling_is_named_and_rewritten(use_mean):
    torch.manual_seed(0)
    model = FunctionalPoolNet(use_mean).eval()
    what = "mean over dims" if use_mean else "adaptive_avg_pool2d"
    with pytest.raises(ValueError, match=f"{what}.*functional=True"):
        replace_avgpool(model, input_size=(1, 3, 8, 8))
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    gm = replace_avgpool(model, input_size=(1, 3, 8, 8), functional=True)
    assert gm is not model and gm.rotp_replaced == ["rot_pool"]
    assert isinstance(gm.rot_pool, AdaptiveROTPool2d) and gm.rot_pool.channels == 12
    out = gm(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() / ref.abs().max() <= LOGIT_BOUND["badmm-e"]
    out.sum().backward()
    assert gm.rot_pool.weights.raw_a1.grad is not None


class SwinLikeHead(nn.Module):
    """torchvision swin_t: NHWC features, LayerNorm over C last, permute to NCHW, then the pool;
    the last Conv2d has fewer channels (the patch embedding), so module order would guess wrong."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 2, stride=2))
        self.mlp = nn.Linear(8, 20)
        self.norm = nn.LayerNorm(20)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(20, 3)

    def forward(self, x):
        f = self.features(x).permute(0, 2, 3, 1)                         # NHWC
        f = self.norm(self.mlp(f)).permute(0, 3, 1, 2)                    # NCHW, C = 20
        return self.head(self.avgpool(f).flatten(1))


def test_nhwc_transformer_head_channels():
    model = SwinLikeHead().eval()
    replace_avgpool(model, input_size=(1, 3, 8, 8))
    assert model.avgpool.channels == 20
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3)


class FastAdaptiveAvgPool(nn.Module):
    """timm's fast pool: a mean over the spatial dims, flattening itself."""

    def __init__(self, flatten, dim):
        super().__init__()
        self.flatten, self.dim = flatten, dim

    def forward(self, x):
        return x.mean(self.dim, keepdim=not self.flatten)


class SelectAdaptivePool2d(nn.Module):
    """timm's pooling module, as far as replace_avgpool relies on it: pool_type, flatten, and
    the input format only in the fast pool's spatial dims ((1, 2): NHWC, as for swin /
    convnext)."""

    def __init__(self, pool_type="avg", flatten=False, input_fmt="NCHW"):
        super().__init__()
        self.pool_type = pool_type
        if input_fmt == "NCHW":
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten(1) if flatten else nn.Identity()
        else:
            self.pool = FastAdaptiveAvgPool(flatten, (1, 2))
            self.flatten = nn.Identity()

    def forward(self, x):
        return self.flatten(self.pool(x))


class TimmLikeNet(nn.Module):
    """timm ResNet: global_pool + fc, and reset_classifier rebuilds both."""

    def __init__(self, num_classes=5, input_fmt="NCHW"):
        super().__init__()
        self.input_fmt = input_fmt
        self.conv = nn.Conv2d(3, 10, 3, padding=1)
        self.num_features = 10
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes, global_pool="avg"):
        self.global_pool = SelectAdaptivePool2d(global_pool, flatten=True,
                                                input_fmt=self.input_fmt)
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward(self, x):
        f = torch.relu(self.conv(x))
        if self.input_fmt == "NHWC":
            f = f.permute(0, 2, 3, 1)
        return self.fc(self.global_pool(f))


@pytest.mark.parametrize("input_fmt", ["NCHW", "NHWC"])
def test_timm_like_select_adaptive_pool_survives_reset_classifier(input_fmt):
    torch.manual_seed(0)
    model = TimmLikeNet(input_fmt=input_fmt).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    replace_avgpool(model, input_size=(1, 3, 8, 8), method="sinkhorn")
    pool = model.global_pool
    assert model.rotp_replaced == ["global_pool"] and isinstance(pool, ROTSelectAdaptivePool2d)
    assert pool.pool.channels == 10 and pool.input_fmt == input_fmt
    assert not pool.is_identity() and pool.feat_mult() == 1
    out = model(x)
    assert (out - ref).abs().max() / ref.abs().max() <= LOGIT_BOUND["sinkhorn"]
    with torch.no_grad():  # a learned weight must survive the reset
        pool.pool.weights.raw_a1.add_(0.5)
    model.reset_classifier(7)
    assert model.global_pool is pool and model.fc.out_features == 7
    assert model(x).shape == (2, 7)
    # the model (keeper included) pickles and deep-copies; the state dict holds the ROT weights
    clone = pickle.loads(pickle.dumps(model))
    assert torch.equal(clone(x), model(x))
    clone.reset_classifier(3)
    assert isinstance(clone.global_pool, ROTSelectAdaptivePool2d) and clone.fc.out_features == 3
    assert isinstance(copy.deepcopy(model).global_pool, ROTSelectAdaptivePool2d)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert "global_pool.pool.weights.raw_a1" in model.state_dict()
    # another pool type asked for explicitly is left as asked
    model.reset_classifier(7, global_pool="max")
    assert isinstance(model.global_pool, SelectAdaptivePool2d)


# --------------------------------------------------------------------------------------------
# the real models, where they import
# --------------------------------------------------------------------------------------------
def _warm(model, size=64):
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, size, size))
    return model.eval()


def test_torchvision_resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _warm(torchvision.models.resnet18(weights=None))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    replace_avgpool(model)
    assert isinstance(model.avgpool, AdaptiveROTPool2d) and model.avgpool.channels == 512
    out = model(x)
    dev = (out - ref).abs().max() / ref.abs().max()
    assert dev <= LOGIT_BOUND["badmm-e"], float(dev)


def test_torchvision_efficientnet_and_mobilenet_v3_keep_se_pools():
    torchvision = pytest.importorskip("torchvision")
    for make in (torchvision.models.efficientnet_b0, torchvision.models.mobilenet_v3_small):
        model = make(weights=None).eval()
        n_before = sum(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())
        replace_avgpool(model, input_size=(1, 3, 64, 64))
        assert model.rotp_replaced == ["avgpool"]
        n_after = sum(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())
        assert n_after == n_before - 1


def test_torchvision_functional_and_swin():
    torchvision = pytest.importorskip("torchvision")
    for make in (torchvision.models.mobilenet_v2, torchvision.models.densenet121):
        model = make(weights=None).eval()
        with pytest.raises(ValueError, match="adaptive_avg_pool2d.*functional=True"):
            replace_avgpool(model, input_size=(1, 3, 64, 64))
        gm = replace_avgpool(model, input_size=(1, 3, 64, 64), functional=True)
        assert gm(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    model = torchvision.models.swin_t(weights=None).eval()
    replace_avgpool(model, input_size=(1, 3, 64, 64))
    assert model.avgpool.channels == 768


def test_timm_resnet_reset_classifier():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False).eval()
    replace_avgpool(model, input_size=(1, 3, 64, 64))
    assert isinstance(model.global_pool, ROTSelectAdaptivePool2d)
    model.reset_classifier(10)
    assert isinstance(model.global_pool, ROTSelectAdaptivePool2d)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
