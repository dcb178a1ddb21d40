"""ROT pooling of images: global / adaptive (``AdaptiveROTPool2d``), local k×k (``ROTPool2d``),
and ``replace_avgpool`` to drop ROT pooling into a CNN (DESIGN §1, §7, §9).

An image ``x (B, C, H, W)`` is pooled window by window; each window is one set in the code layout
of DESIGN §1: its N valid pixel positions are the samples (rows) and the C channels the features
(D = C). Every window is solved on its own, exactly as :func:`rotp_triton.rot_pool` solves one set;
the column LogSumExp over features couples all channels of a window.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._batching import compute_dtype
from .._checks import check_rot_values
from ..functional import check_rot_options, rot_pool
from ..ops.rot.solvers import pool_from_log_plan, rot_log_plan, wants_structure
from .weights import ROTWeights

IntPair = Union[int, Tuple[int, int]]

# Default initialisation (ROTWeights: a1 = rho = 100, a2 = a3 = 1, T = 4) against the mean of
# each window, on standard Gaussian inputs (C = 64; a feature has std 1): the RMS deviation and
# the max over all outputs of |y - mean|. Measured (fixed seed, 8 images) by
# tests/test_image.py::test_default_init_close_to_mean, which asserts these bounds; measured
# values: RMS 0.010 (S), 0.019 (B-E), 0.040 (B-Q) for both kinds; max 0.016 / 0.031 / 0.071
# (global 7×7) and 0.057 / 0.10 / 0.19 (2×2 windows of an 8×8 image).
CLOSE_TO_MEAN = {  # kind -> method -> (rms bound, max bound)
    "global": {"sinkhorn": (0.015, 0.03), "badmm-e": (0.03, 0.05), "badmm-q": (0.06, 0.10)},
    "local": {"sinkhorn": (0.015, 0.08), "badmm-e": (0.03, 0.15), "badmm-q": (0.06, 0.25)},
}


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------
def _pair(v, name: str, *, minimum: int, allow_none: bool = False) -> Tuple:
    if allow_none and v is None:
        return None
    vals = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if len(vals) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    for e in vals:
        if allow_none and e is None:
            continue
        if isinstance(e, bool) or not isinstance(e, int):
            raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
        if e < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
    return vals


def _check_image(x, channels: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be a (B, C, H, W) image batch, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[1] != channels:
        raise ValueError(f"x has {x.shape[1]} channels but the layer was built with "
                         f"channels={channels}")


def pool_output_size(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    """Output length of nn.MaxPool2d (dilation 1) along one axis."""
    num = size + 2 * p - k + (s - 1 if ceil_mode else 0)
    out = num // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def adaptive_bounds(size: int, out: int) -> list:
    """Window [start, end) of each output index, exactly nn.AdaptiveAvgPool2d's."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


# --------------------------------------------------------------------------------------------
# torch path: windows as a padded batch of sets
# --------------------------------------------------------------------------------------------
def _solve_sets(sets: Tensor, mask: Tensor, *, method, variant, num_iters, inner_iters,
                weights) -> Tensor:
    """Pool a padded batch of window sets: sets (M, N, C) (invalid samples 0), mask (M, N)
    -> (M, C) in the compute dtype. Uniform priors over the C features and each window's
    valid samples."""
    M, N, C = sets.shape
    cdt = sets.dtype
    # (1,) weights (per_iter_params=False) are shared by the T modules
    structure = wants_structure(weights["a0"])
    w = {k: torch.as_tensor(v, device=sets.device, dtype=cdt).reshape(-1).expand(num_iters)
         for k, v in weights.items()}
    log_p0 = sets.new_full((M, C), -math.log(C))
    count = mask.sum(1, keepdim=True).clamp_min(1).to(cdt)
    log_q0 = torch.where(mask, -torch.log(count), torch.zeros((), dtype=cdt, device=sets.device))
    log_p = rot_log_plan(sets, mask, log_p0, log_q0, method=method, variant=variant,
                         structure=structure, num_iters=num_iters,
                         inner_iters=inner_iters, **w)
    return pool_from_log_plan(log_p, sets, mask)


def rot_pool2d_torch(x: Tensor, kernel_size: IntPair, stride: IntPair, padding: IntPair,
                     ceil_mode: bool, *, method: str, variant: str, num_iters: int,
                     inner_iters: int, weights: dict) -> Tensor:
    """Local ROT pooling on the torch path (the CPU fallback and the kernels' reference).

    Args:
        x: (B, C, H, W), any strides.
        kernel_size, stride, padding: (kh, kw), (sh, sw), (ph, pw).
        weights: dict of (T,) tensors a0, a1, a2, a3, rho, tau.
    Returns:
        (B, C, Ho, Wo) in x's dtype (Ho, Wo as nn.MaxPool2d); channels_last strides if x is.
    """
    B, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    Ho = pool_output_size(H, kh, sh, ph, ceil_mode)
    Wo = pool_output_size(W, kw, sw, pw, ceil_mode)
    # right/bottom padding: enough for every window (ceil_mode may reach past the padding)
    pad_b = max(ph, (Ho - 1) * sh + kh - H - ph)
    pad_r = max(pw, (Wo - 1) * sw + kw - W - pw)
    cdt = compute_dtype(x.dtype)
    xp = F.pad(x.to(cdt), (pw, pad_r, ph, pad_b))                          # zeros: not samples
    valid = F.pad(x.new_ones(1, 1, H, W, dtype=cdt), (pw, pad_r, ph, pad_b))
    win = xp.unfold(2, kh, sh).unfold(3, kw, sw)[:, :, :Ho, :Wo]         # [B, C, Ho, Wo, kh, kw]
    sets = win.permute(0, 2, 3, 4, 5, 1).reshape(B * Ho * Wo, kh * kw, C)
    vm = valid.unfold(2, kh, sh).unfold(3, kw, sw)[0, 0, :Ho, :Wo].reshape(Ho * Wo, kh * kw) > 0
    mask = vm.unsqueeze(0).expand(B, -1, -1).reshape(B * Ho * Wo, kh * kw)
    y = _solve_sets(sets, mask, method=method, variant=variant, num_iters=num_iters,
                    inner_iters=inner_iters, weights=weights)
    return y.reshape(B, Ho, Wo, C).permute(0, 3, 1, 2).to(x.dtype)        # channels_last strides


def adaptive_rot_pool2d_torch(x: Tensor, output_size: Tuple[int, int], *, method: str,
                              variant: str, num_iters: int, inner_iters: int,
                              weights: dict) -> Tensor:
    """Adaptive-window ROT pooling on the torch path: (B, C, H, W) -> (B, C, oh, ow), windows
    exactly those of nn.AdaptiveAvgPool2d (they may overlap and differ in size)."""
    B, C, H, W = x.shape
    oh, ow = output_size
    rows, cols = adaptive_bounds(H, oh), adaptive_bounds(W, ow)
    nh = max(e - s for s, e in rows)
    nw = max(e - s for s, e in cols)
    idx = torch.zeros(oh * ow, nh * nw, dtype=torch.long)
    mask = torch.zeros(oh * ow, nh * nw, dtype=torch.bool)
    for i, (hs, he) in enumerate(rows):
        for j, (ws, we) in enumerate(cols):
            pos = [h * W + w for h in range(hs, he) for w in range(ws, we)]
            idx[i * ow + j, :len(pos)] = torch.tensor(pos)
            mask[i * ow + j, :len(pos)] = True
    idx, mask = idx.to(x.device), mask.to(x.device)
    cdt = compute_dtype(x.dtype)
    flat = x.to(cdt).flatten(2)                                           # [B, C, H*W]
    sets = flat[:, :, idx.reshape(-1)].reshape(B, C, oh * ow, nh * nw)
    sets = sets.permute(0, 2, 3, 1) * mask[None, :, :, None]             # [B, oh*ow, n, C]
    sets = sets.reshape(B * oh * ow, nh * nw, C)
    m = mask.unsqueeze(0).expand(B, -1, -1).reshape(B * oh * ow, nh * nw)
    y = _solve_sets(sets, m, method=method, variant=variant, num_iters=num_iters,
                    inner_iters=inner_iters, weights=weights)
    return y.reshape(B, oh, ow, C).permute(0, 3, 1, 2).to(x.dtype)


# The window kernels hold one window's next_pow2(kh·kw) × next_pow2(C) tile in registers; beyond
# this many elements backend="auto" uses the torch path (sm_90 AOT: 2×2 windows with C = 1024
# use 255 registers in the backward without spilling; larger tiles would spill).
MAX_WINDOW_TILE = 4096


def _next_pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def _use_window_kernel(x: Tensor, backend: str, weights: ROTWeights,
                       window: Tuple[int, int] = (2, 2)) -> bool:
    """The Triton window kernels apply to CUDA inputs (or the interpreter with backend="triton")
    when α0 = 0 (fixed at 0, not learned); "auto" also requires a window tile of at most
    MAX_WINDOW_TILE elements."""
    if backend == "torch":
        return False
    if backend == "auto" and (_next_pow2(window[0] * window[1]) * _next_pow2(x.shape[1])
                              > MAX_WINDOW_TILE):
        return False
    if x.dtype == torch.float64 or weights.structure:
        if backend == "triton":
            raise ValueError("backend='triton' needs a0 = 0 (not learned) and a "
                             "float32/float16/bfloat16 input")
        return False
    if x.is_cuda:
        return True
    if backend == "triton":
        from ..ops.rot.dispatch import interpreter_enabled
        if interpreter_enabled():
            return True
        raise ValueError("backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
    return False


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------
class _ImageROTBase(nn.Module):
    def __init__(self, channels: int, method: str = "badmm-e", variant: str = "exact",
                 num_iters: int = 4, inner_iters: int = 5, per_iter_params: bool = True,
                 backend: str = "auto", **weights):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        check_rot_options(method, variant, num_iters, inner_iters, backend)
        self.channels, self.method, self.variant = channels, method, variant
        self.num_iters, self.inner_iters, self.backend = num_iters, inner_iters, backend
        self.weights = ROTWeights(num_iters, per_iter_params, **weights)

    def reset_parameters(self) -> None:
        self.weights.reset_parameters()

    def _solver_kwargs(self) -> dict:
        return dict(method=self.method, variant=self.variant, num_iters=self.num_iters,
                    inner_iters=self.inner_iters)

    def _weights_for(self, x: Tensor) -> dict:
        return {k: v.to(x.device) if isinstance(v, Tensor) else v
                for k, v in self.weights().items()}

    def _rot_repr(self) -> str:
        return (f"method={self.method!r}, variant={self.variant!r}, num_iters={self.num_iters}, "
                f"{self.weights.describe()}")


class AdaptiveROTPool2d(_ImageROTBase):
    r"""ROT pooling to a fixed output size, a learnable drop-in for ``nn.AdaptiveAvgPool2d``.

    With ``output_size=1`` each image is one set X ∈ R^{C×HW} (D = C features, N = H·W samples)
    and the layer returns :math:`y_c = \sum_n P^*_{cn} X_{cn} / \sum_n P^*_{cn}` with P* the
    ROT plan of eq. (3) (``num_iters`` unrolled modules of ``method``; see
    :func:`rotp_triton.rot_pool`). Other output sizes pool each of nn.AdaptiveAvgPool2d's windows
    (rows ``floor(i·H/oh)`` to ``ceil((i+1)·H/oh)``, likewise columns) as its own set.

    Default initialisation (a1 = ρ = 100, a2 = a3 = 1, T = 4) pools close to the mean: on
    standard Gaussian 7×7 images with C = 64 (features of std 1) the output differs from the
    image mean by 0.010 (Sinkhorn), 0.019 (B-E), 0.040 (B-Q) RMS and at most 0.016 / 0.031 /
    0.071 (measured; ``tests/test_image.py`` asserts RMS ≤ 0.015 / 0.03 / 0.06 and
    max ≤ 0.03 / 0.05 / 0.10).

    Backend: ``output_size=1`` goes through :func:`rotp_triton.rot_pool` on the strided view
    ``x.flatten(2).transpose(1, 2)`` (no copy), i.e. the Triton set kernels for CUDA inputs.
    Adaptive windows that tile the image evenly (H % oh == 0 and W % ow == 0) use the local
    window kernels of :func:`rotp_triton.ops.rot.triton_window.rot_pool2d_triton` on CUDA when
    α0 = 0; other windows use the torch path.

    Args:
        channels: C.
        output_size: int or (oh, ow); ``None`` entries keep the input size (as in
            nn.AdaptiveAvgPool2d).
        flatten: return (B, C) instead of (B, C, 1, 1) (``output_size`` must be 1).
        method, variant, num_iters, inner_iters, per_iter_params, backend, a0, a1, a2, a3, rho,
            tau, learn_*: as in :class:`rotp_triton.ROTPool`.

    Shapes:
        (B, C, H, W) -> (B, C, oh, ow), or (B, C) with ``flatten=True``; output in x's dtype.
    """

    def __init__(self, channels: int, output_size=1, flatten: bool = False, **rot_kwargs):
        super().__init__(channels, **rot_kwargs)
        if output_size is None:
            raise ValueError("output_size must be an int or a pair (entries may be None), "
                             "got None")
        self.output_size = (output_size if isinstance(output_size, int)
                            else tuple(output_size))
        self._out = _pair(output_size, "output_size", minimum=1, allow_none=True)
        if not isinstance(flatten, bool):
            raise TypeError(f"flatten must be a bool, got {type(flatten).__name__}")
        if flatten and self._out != (1, 1):
            raise ValueError(f"flatten=True needs output_size=1, got {output_size!r}")
        self.flatten = flatten

    def forward(self, x: Tensor) -> Tensor:
        _check_image(x, self.channels)
        B, C, H, W = x.shape
        oh = H if self._out[0] is None else self._out[0]
        ow = W if self._out[1] is None else self._out[1]
        if H == 0 or W == 0:
            raise ValueError(f"x must have H, W >= 1, got shape {tuple(x.shape)}")
        w = self._weights_for(x)
        if (oh, ow) == (1, 1):
            y = rot_pool(x.flatten(2).transpose(1, 2), backend=self.backend,
                         **self._solver_kwargs(), **w)
            return y if self.flatten else y[:, :, None, None]
        check_rot_values(x, w["a1"], w["rho"])
        if (H % oh == 0 and W % ow == 0
                and _use_window_kernel(x, self.backend, self.weights, (H // oh, W // ow))):
            from ..ops.rot.triton_window import rot_pool2d_triton
            k = (H // oh, W // ow)
            return rot_pool2d_triton(x, k, k, (0, 0), False, method=self.method,
                                     variant=self.variant, a1=w["a1"], a2=w["a2"], a3=w["a3"],
                                     rho=w["rho"], num_iters=self.num_iters)
        return adaptive_rot_pool2d_torch(x, (oh, ow), weights=w, **self._solver_kwargs())

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.channels}, output_size={self.output_size!r}, "
                f"flatten={self.flatten}, {self._rot_repr()})")


class ROTPool2d(_ImageROTBase):
    r"""Local k×k ROT pooling, a learnable counterpart of ``nn.MaxPool2d`` / ``nn.AvgPool2d``.

    Window (i, j) covers rows ``i·sh − ph … i·sh − ph + kh − 1`` and the same for columns; its
    valid positions (inside the image: padding and, with ``ceil_mode``, positions past the border
    are not samples) form one set X ∈ R^{C×N}, N ≤ kh·kw, D = C, pooled by
    :math:`y_c = \sum_n P^*_{cn} X_{cn} / \sum_n P^*_{cn}` with the ROT plan P* of eq. (3).
    The column LogSumExp over features couples all C channels of a window. Output shapes are
    exactly nn.MaxPool2d's for the same arguments.

    Default initialisation (a1 = ρ = 100) pools close to the window mean: on standard Gaussian
    inputs (std 1) with 2×2 windows and C = 64 the output differs from nn.AvgPool2d's by
    0.010 (Sinkhorn), 0.019 (B-E), 0.040 (B-Q) RMS, at most 0.057 / 0.10 / 0.19 (measured;
    ``tests/test_image.py`` asserts RMS ≤ 0.015 / 0.03 / 0.06 and max ≤ 0.08 / 0.15 / 0.25).

    Backend: CUDA inputs with α0 = 0 (backend "auto" or "triton") use the fused Triton kernels of
    :mod:`rotp_triton.ops.rot.triton_window` (NCHW or channels_last read by strides, all T
    iterations in one launch, recomputing backward); "auto" only while one window's
    next_pow2(kh·kw) × next_pow2(C) tile has at most 4096 elements (e.g. 2×2 windows up to
    C = 1024), the kernels keeping it in registers. Otherwise the torch path (unfold).

    Args:
        channels: C.
        kernel_size: int or (kh, kw).
        stride: int or (sh, sw); default ``kernel_size``.
        padding: int or (ph, pw), at most half the kernel size (as nn.MaxPool2d).
        ceil_mode: ceil instead of floor in the output shape (as nn.MaxPool2d).
        method, variant, num_iters, inner_iters, per_iter_params, backend, a0, a1, a2, a3, rho,
            tau, learn_*: as in :class:`rotp_triton.ROTPool`.

    Shapes:
        (B, C, H, W) -> (B, C, Ho, Wo), Ho = floor((H + 2ph − kh)/sh) + 1 (ceil with
        ``ceil_mode``, dropping a last window that would start in the bottom padding); output in
        x's dtype, channels_last strides on the torch path and for channels_last input.
    """

    def __init__(self, channels: int, kernel_size: IntPair = 2, stride: Optional[IntPair] = None,
                 padding: IntPair = 0, ceil_mode: bool = False, **rot_kwargs):
        super().__init__(channels, **rot_kwargs)
        self.kernel_size = _pair(kernel_size, "kernel_size", minimum=1)
        self.stride = (self.kernel_size if stride is None
                       else _pair(stride, "stride", minimum=1))
        self.padding = _pair(padding, "padding", minimum=0)
        for p, k in zip(self.padding, self.kernel_size):
            if 2 * p > k:
                raise ValueError(f"padding must be at most half the kernel size, got "
                                 f"padding={padding!r}, kernel_size={kernel_size!r}")
        if not isinstance(ceil_mode, bool):
            raise TypeError(f"ceil_mode must be a bool, got {type(ceil_mode).__name__}")
        self.ceil_mode = ceil_mode

    def output_shape(self, H: int, W: int) -> Tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (pool_output_size(H, kh, sh, ph, self.ceil_mode),
                pool_output_size(W, kw, sw, pw, self.ceil_mode))

    def forward(self, x: Tensor) -> Tensor:
        _check_image(x, self.channels)
        Ho, Wo = self.output_shape(x.shape[2], x.shape[3])
        if Ho < 1 or Wo < 1:
            raise ValueError(f"input of spatial size {tuple(x.shape[2:])} is too small for "
                             f"kernel_size={self.kernel_size}, padding={self.padding} "
                             f"(output {Ho}×{Wo})")
        w = self._weights_for(x)
        check_rot_values(x, w["a1"], w["rho"])
        if _use_window_kernel(x, self.backend, self.weights, self.kernel_size):
            from ..ops.rot.triton_window import rot_pool2d_triton
            return rot_pool2d_triton(x, self.kernel_size, self.stride, self.padding,
                                     self.ceil_mode, method=self.method, variant=self.variant,
                                     a1=w["a1"], a2=w["a2"], a3=w["a3"], rho=w["rho"],
                                     num_iters=self.num_iters)
        return rot_pool2d_torch(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                                weights=w, **self._solver_kwargs())

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, ceil_mode={self.ceil_mode}, "
                f"{self._rot_repr()})")


# --------------------------------------------------------------------------------------------
# replace_avgpool
# --------------------------------------------------------------------------------------------
def _infer_channels(model: nn.Module, pools, example_input) -> dict:
    """Channel count of the input of every pool in ``pools`` (name -> C).

    With ``example_input`` it is read from a dry run (forward pre-hooks, no_grad, eval mode,
    restored afterwards). Without it, from the module registered just before the pool in
    ``model.named_modules()`` order: the last ``BatchNorm2d.num_features`` /
    ``Conv2d.out_channels`` / ``GroupNorm.num_channels`` seen (true for torchvision ResNets,
    VGG-style and most sequential CNNs)."""
    found = {}
    if example_input is not None:
        handles = []
        for name, mod in pools:
            def hook(_m, args, name=name):
                found[name] = int(args[0].shape[1])
            handles.append(mod.register_forward_pre_hook(hook))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if isinstance(example_input, (tuple, list)):
                    model(*example_input)
                else:
                    model(example_input)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        return found
    last = None
    pool_ids = {id(m): n for n, m in pools}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.BatchNorm2d):
            last = mod.num_features
        elif isinstance(mod, nn.Conv2d):
            last = mod.out_channels
        elif isinstance(mod, nn.GroupNorm):
            last = mod.num_channels
        if id(mod) in pool_ids and last is not None:
            found[pool_ids[id(mod)]] = last
    return found


def replace_avgpool(model: nn.Module, example_input=None, **rot_kwargs) -> nn.Module:
    """Swap every ``nn.AdaptiveAvgPool2d`` of ``model`` (recursively) for an
    :class:`AdaptiveROTPool2d` with the same ``output_size``, in place; returns ``model``.

    The channel count of each pool is inferred from ``example_input`` (a dry run with forward
    pre-hooks; give it for models whose pools are not preceded by the layer that sets their
    width) or, without it, from the last ``BatchNorm2d`` / ``Conv2d`` / ``GroupNorm`` registered
    before the pool (true for torchvision ResNets). A pool whose channels cannot be inferred (or
    that the dry run did not reach) raises ValueError. The new layers are put on the
    device/dtype of the model's first parameter. With the default weights (a1 = ρ = 100) the new
    model's outputs stay close to the original: for the small ResNet of
    ``tests/test_replace_avgpool.py`` (eval mode) max |Δlogit| / max |logit| is at most 0.0016
    (Sinkhorn), 0.0031 (B-E), 0.0066 (B-Q) over 3 seeds (the test asserts 0.004 / 0.008 / 0.015).

    Args:
        model: any nn.Module.
        example_input: optional input tensor (or tuple of inputs) for the dry run.
        **rot_kwargs: passed to every :class:`AdaptiveROTPool2d` (method, num_iters, a1, ...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    pools = [(n, m) for n, m in model.named_modules() if type(m) is nn.AdaptiveAvgPool2d]
    if not pools:
        return model
    channels = _infer_channels(model, pools, example_input)
    missing = [n for n, _ in pools if n not in channels]
    if missing:
        how = ("the dry run with example_input did not reach them" if example_input is not None
               else "no BatchNorm2d/Conv2d/GroupNorm precedes them; pass example_input=")
        raise ValueError(f"replace_avgpool cannot infer the channel count of {missing}: {how}")
    param = next(iter(model.parameters()), None)
    for name, mod in pools:
        new = AdaptiveROTPool2d(channels[name], output_size=mod.output_size, **rot_kwargs)
        if param is not None:
            new = new.to(device=param.device, dtype=param.dtype)
        if name == "":
            return new
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
    return model
