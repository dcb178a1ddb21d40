"""ROT pooling of images: global / adaptive (``AdaptiveROTPool2d``) and local k×k
(``ROTPool2d``) (DESIGN §1, §7, §9); ``replace_avgpool`` is in :mod:`rotp_triton.nn.surgery`.

An image ``x (B, C, H, W)`` is pooled window by window; each window is one set in the code layout
of DESIGN §1: its N valid pixel positions are the samples (rows) and the C channels the features
(D = C). Every window is solved on its own, exactly as :func:`rotp_triton.rot_pool` solves one set;
the column LogSumExp over features couples all channels of a window.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

from torch import Tensor, nn

from .._batching import compute_dtype, make_set_batch
from .._checks import check_rot_values
from .._fx import traced_as_module
from ..functional import check_rot_options, rot_pool_table
from ..ops.rot import route
from ..ops.rot.params import A1, RHO
from ..ops.rot.window_geometry import pool_output_size
from .scale import check_scale
from .weight_use import describe_used, restrict_learning
from .weights import ROTWeights, kernels_may_run

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
        raise ValueError(f"x must be a (B, C, H, W) image batch or an unbatched (C, H, W) "
                         f"image, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[1] != channels:
        raise ValueError(f"x has {x.shape[1]} channels but the layer was built with "
                         f"channels={channels}")


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------
class _ImageROTBase(nn.Module):
    def __init__(self, channels: int, method: str = "badmm-e", variant: str = "exact",
                 num_iters: int = 4, inner_iters: int = 5, per_iter_params: bool = True,
                 backend: str = "auto", scale="auto", **weights):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        check_rot_options(method, variant, num_iters, inner_iters, backend)
        self.channels, self.method, self.variant = channels, method, variant
        self.num_iters, self.inner_iters, self.backend = num_iters, inner_iters, backend
        self.scale = check_scale(scale)  # per image: rotp_triton/ops/rot/spread.py
        weights = restrict_learning(method, weights, variant, num_iters)
        self.weights = ROTWeights(num_iters, per_iter_params, **weights)

    @traced_as_module
    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and x.dim() == 3:  # unbatched (C, H, W), as torch's pooling
            return self.forward(x.unsqueeze(0)).squeeze(0)
        _check_image(x, self.channels)
        if self.scale is None:
            return self._forward(x)
        if self.scale == "auto":  # y = s · pool(x / s), s each image's feature unit
            return self._forward(x, spread=True)
        return (self._forward((x / self.scale).to(x.dtype)) * self.scale).to(x.dtype)

    def reset_parameters(self) -> None:
        self.weights.reset_parameters()

    def _solver_kwargs(self) -> dict:
        return dict(method=self.method, variant=self.variant, num_iters=self.num_iters,
                    inner_iters=self.inner_iters)

    def _table(self, x: Tensor) -> Tensor:
        """The (6, T) weight table on x's device in x's compute dtype (ROTWeights.table)."""
        return self.weights.table(x.device, compute_dtype(x.dtype),
                                  kernels=kernels_may_run(x, self.backend))

    def _route_kwargs(self) -> dict:
        return dict(self._solver_kwargs(), structure=self.weights.structure,
                    backend=self.backend)

    def _rot_repr(self) -> str:
        scale = "" if self.scale == "auto" else f"scale={self.scale!r}, "
        return (f"method={self.method!r}, variant={self.variant!r}, num_iters={self.num_iters}, "
                f"{scale}{describe_used(self.weights, self.method, self.variant)}")


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
    Other output sizes run the window kernels (``rotp_triton.ops.rot.triton.window``, routed by
    ``ops/rot/route.py``) on CUDA when α0 = 0: windows that tile the image evenly (H % oh == 0
    and W % ow == 0) as local windows, the others (of different sizes, overlapping) as
    nn.AdaptiveAvgPool2d's windows; with α0 > 0 (or beyond the kernels' tile) the torch path.

    Args:
        channels: C.
        output_size: int or (oh, ow); ``None`` entries keep the input size (as in
            nn.AdaptiveAvgPool2d).
        flatten: return (B, C) instead of (B, C, 1, 1) (``output_size`` must be 1).
        method, variant, num_iters, inner_iters, per_iter_params, backend, a0, a1, a2, a3, rho,
            tau, learn_*: as in :class:`rotp_triton.ROTPool`.
        scale: ``"auto"`` (default): the weights are relative to each image's feature spread
            (RMS over channels of the spatial standard deviation;
            :mod:`rotp_triton.ops.rot.spread`), so the near-mean start holds at any feature
            scale; ``None``: as given. "auto" costs one statistics pass over x (the window,
            Sinkhorn and B-ADMM kernels fold 1/s into their loads).

    Shapes:
        (B, C, H, W) -> (B, C, oh, ow), or (B, C) with ``flatten=True``; output in x's dtype.
        An unbatched (C, H, W) image gives (C, oh, ow) (or (C,)), as nn.AdaptiveAvgPool2d.
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

    def _forward(self, x: Tensor, spread: bool = False) -> Tensor:
        B, C, H, W = x.shape
        oh = H if self._out[0] is None else self._out[0]
        ow = W if self._out[1] is None else self._out[1]
        if H == 0 or W == 0:
            raise ValueError(f"x must have H, W >= 1, got shape {tuple(x.shape)}")
        table = self._table(x)
        if (oh, ow) == (1, 1):  # each image one set (its spread: that of the set)
            sets = x.flatten(2).transpose(1, 2)                            # [B, HW, C] a view
            y = rot_pool_table(sets, make_set_batch(sets, pad=False), table,
                               structure=self.weights.structure, backend=self.backend,
                               spread=spread, **self._solver_kwargs())
            return y if self.flatten else y[:, :, None, None]
        check_rot_values(x, table[A1], table[RHO])
        return route.pool_adaptive(x, table, (oh, ow), spread=spread, **self._route_kwargs())

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
    ``rotp_triton.ops.rot.triton.window`` (NCHW or channels_last read by strides, all T
    iterations in one launch, recomputing backward); "auto" only while one window's
    next_pow2(kh·kw) × next_pow2(C) tile has at most ``route.MAX_WINDOW_TILE`` = 16384
    elements (e.g. 2×2 windows up to C = 4096). Otherwise the torch path (unfold).

    Args:
        channels: C.
        kernel_size: int or (kh, kw).
        stride: int or (sh, sw); default ``kernel_size``.
        padding: int or (ph, pw), at most half the kernel size (as nn.MaxPool2d).
        ceil_mode: ceil instead of floor in the output shape (as nn.MaxPool2d).
        method, variant, num_iters, inner_iters, per_iter_params, backend, a0, a1, a2, a3, rho,
            tau, learn_*: as in :class:`rotp_triton.ROTPool`.
        scale: ``"auto"`` (default): the weights are relative to each image's feature spread
            (RMS over channels of the spatial standard deviation;
            :mod:`rotp_triton.ops.rot.spread`), so the near-mean start holds at any feature
            scale; ``None``: as given. "auto" costs one statistics pass over x (the window,
            Sinkhorn and B-ADMM kernels fold 1/s into their loads).

    Shapes:
        (B, C, H, W) -> (B, C, Ho, Wo), Ho = floor((H + 2ph − kh)/sh) + 1 (ceil with
        ``ceil_mode``, dropping a last window that would start in the bottom padding); output in
        x's dtype, channels_last strides on the torch path and for channels_last input.
        An unbatched (C, H, W) image gives (C, Ho, Wo), as nn.MaxPool2d.
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

    def _forward(self, x: Tensor, spread: bool = False) -> Tensor:
        Ho, Wo = self.output_shape(x.shape[2], x.shape[3])
        if Ho < 1 or Wo < 1:
            raise ValueError(f"input of spatial size {tuple(x.shape[2:])} is too small for "
                             f"kernel_size={self.kernel_size}, padding={self.padding} "
                             f"(output {Ho}×{Wo})")
        table = self._table(x)
        check_rot_values(x, table[A1], table[RHO])
        return route.pool_windows(x, table, kernel_size=self.kernel_size,
                                  stride=self.stride, padding=self.padding,
                                  ceil_mode=self.ceil_mode, spread=spread,
                                  **self._route_kwargs())

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, ceil_mode={self.ceil_mode}, "
                f"{self._rot_repr()})")
