"""Autograd and custom-op plumbing of the window kernels, and the family's entry point
:func:`window_pool` (interface: docs/kernels.md).

Where torch has ``torch.library.triton_op`` the forward and backward are the custom ops
``rotp_triton::window_fwd`` / ``window_bwd`` (one opaque node each for ``torch.compile``, with
fake kernels); otherwise :class:`WindowPoolFunction`. Either way the graph saves only x and the
(6, T) weight table: the backward recomputes the iterations on chip.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from ...higher_order import recomputed_vjp, recorded_backward
from ..common import HAS_TRITON_OP, direct_launch, eager_function
from ..recompute import pool_windows
from ..spread.launch import bfs_strides, spread_backward, spread_forward
from .launch import empty_like_layout, geometry, window_backward, window_forward


def _recorded_grads(ctx, gy, args, spread: bool = False) -> list:
    """Gradients of (x, w) that autograd records (create_graph): the torch path recomputed
    (``..recompute``); ``args``: ``window_pool``'s windows, method and variant as ``recompute.
    pool_windows`` takes them."""
    def forward(x, w):
        return pool_windows(x, w, *args, spread=spread)
    return recomputed_vjp(forward, ctx.saved_tensors[:2], ctx.needs_input_grad[:2], (gy,))


class WindowPoolFunction(torch.autograd.Function):
    """y = local ROT pooling of x's windows (α0 = 0) from x and the (6, T) weight table."""

    @staticmethod
    def forward(ctx, x, w, kernel_size, stride, padding, ceil_mode, method, variant,
                output_size=None):
        g = geometry(x.shape, kernel_size, stride, padding, ceil_mode, output_size)
        ctx.save_for_backward(x, w)
        ctx.args = (g, method, variant)
        ctx.windows = (kernel_size, stride, padding, ceil_mode, method, variant, output_size)
        return window_forward(x, w, g, method, variant)

    @staticmethod
    def backward(ctx, gy):
        if recorded_backward():  # the kernels' backward is first order: the torch path's
            return (*_recorded_grads(ctx, gy, ctx.windows), *[None] * 7)
        x, w = ctx.saved_tensors
        gx, gw = window_backward(x, w, gy, *ctx.args)
        return (gx if ctx.needs_input_grad[0] else None,
                gw if ctx.needs_input_grad[1] else None, None, None, None, None, None, None,
                None)


class SpreadWindowPoolFunction(torch.autograd.Function):
    """y = s · (local ROT pooling of x / s) with s (B,) each image's feature spread
    (``ops/rot/spread.py``, ``scale="auto"``), the scale folded into the window kernels: forward
    one statistics pass over x and the window kernel reading x (no x / s pass, no output
    multiply); backward the window kernel (the cotangent of x / s and each window's share of
    ds) and one spread pass (x̄ = ḡ / s + ds·∂s/∂x: no dot pass, written over ḡ). Saves x, the
    table and (B, 2 + C) statistics."""

    @staticmethod
    def forward(ctx, x, w, kernel_size, stride, padding, ceil_mode, method, variant,
                output_size=None):
        g = geometry(x.shape, kernel_size, stride, padding, ceil_mode, output_size)
        _none, saved = spread_forward(x, (2, 3), None)
        y = window_forward(x, w, g, method, variant, scale=saved[:g.B])
        ctx.save_for_backward(x, w, saved)
        ctx.args = (g, method, variant)
        ctx.windows = (kernel_size, stride, padding, ceil_mode, method, variant, output_size)
        return y

    @staticmethod
    def backward(ctx, gy):
        if recorded_backward():  # the kernels' backward is first order: the torch path's
            return (*_recorded_grads(ctx, gy, ctx.windows, spread=True), *[None] * 7)
        x, w, saved = ctx.saved_tensors
        g = ctx.args[0]
        g_xs, gw, ds = window_backward(x, w, gy, *ctx.args, scale=saved[:g.B])
        # x̄ overwrites d(x / s) where the two match (x's dtype and strides): one x-sized
        # buffer in the backward
        same = g_xs.dtype == x.dtype and g_xs.stride() == x.stride()
        gx = (spread_backward(x, (2, 3), saved, g_xs, ds, g_s_total=True,
                              out=g_xs if same else None)
              if ctx.needs_input_grad[0] else None)
        return (gx, gw if ctx.needs_input_grad[1] else None, None, None, None, None, None,
                None, None)


window_fwd_op = None
if HAS_TRITON_OP:
    try:
        from torch.library import triton_op, wrap_triton

        @triton_op("rotp_triton::window_fwd", mutates_args=())
        def window_fwd_op(x: Tensor, w: Tensor, kernel_size: List[int], stride: List[int],
                          padding: List[int], ceil_mode: bool, method: str, variant: str,
                          output_size: List[int]) -> Tensor:
            g = geometry(x.shape, kernel_size, stride, padding, ceil_mode, output_size)
            return window_forward(x, w, g, method, variant, wrap=wrap_triton)

        @triton_op("rotp_triton::window_bwd", mutates_args=())
        def window_bwd_op(x: Tensor, w: Tensor, gy: Tensor, kernel_size: List[int],
                          stride: List[int], padding: List[int], ceil_mode: bool, method: str,
                          variant: str, output_size: List[int]) -> Tuple[Tensor, Tensor]:
            g = geometry(x.shape, kernel_size, stride, padding, ceil_mode, output_size)
            return window_backward(x, w, gy, g, method, variant, wrap=wrap_triton)

        def _setup_context(ctx, inputs, output):
            x, w, *rest = inputs
            ctx.save_for_backward(x, w)
            ctx.args = rest

        def _backward(ctx, gy):
            if recorded_backward():  # the kernels' backward is first order: the torch path's
                return (*_recorded_grads(ctx, gy, ctx.args), *[None] * 7)
            x, w = ctx.saved_tensors
            gx, gw = window_bwd_op(x, w, gy, *ctx.args)
            return (gx if ctx.needs_input_grad[0] else None,
                    gw if ctx.needs_input_grad[1] else None, None, None, None, None, None, None,
                    None)

        window_fwd_op.register_autograd(_backward, setup_context=_setup_context)

        # Explicit fake kernels: under TRITON_INTERPRET=1 wrap_triton hands back the raw
        # interpreted kernel, which cannot run on fake tensors.
        @window_fwd_op.register_fake
        def _window_fwd_fake(x, w, kernel_size, stride, padding, ceil_mode, method, variant,
                             output_size):
            g = geometry(x.shape, kernel_size, stride, padding, ceil_mode, output_size)
            return empty_like_layout(x, (g.B, g.C, g.Ho, g.Wo), x.dtype)

        @window_bwd_op.register_fake
        def _window_bwd_fake(x, w, gy, kernel_size, stride, padding, ceil_mode, method,
                             variant, output_size):
            return (empty_like_layout(x, x.shape, x.dtype),
                    w.new_empty(w.shape, dtype=torch.float32))
    except Exception:  # pragma: no cover - a torch whose triton_op rejects these ops
        window_fwd_op = None


def window_pool(x: Tensor, w: Tensor, *, kernel_size=None, stride=None, padding=None,
                ceil_mode: bool = False, method: str, variant: str, spread: bool = False,
                output_size=None) -> Tensor:
    """Local ROT pooling (α0 = 0) of every window of ``x (B, C, H, W)`` (any strides) with the
    (6, T) float32 weight table ``w`` (rows of ``params.py``; may require grad). The windows:
    ``kernel_size``, ``stride``, ``padding`` (validated (int, int) pairs) and ``ceil_mode`` as
    nn.MaxPool2d's, or, with ``output_size`` (oh, ow) instead, nn.AdaptiveAvgPool2d's (they may
    differ in size and overlap). Returns (B, C, Ho, Wo) in x's dtype and memory format; the
    backward gives dx and dw (6, T) (zeros in the unused rows a0, τ).
    ``spread``: pool x / s and return s · y, s each image's feature spread (the layers'
    ``scale="auto"``), folded into the kernels (eager only: ``torch.compile`` traces the
    separate ops)."""
    if output_size is not None:
        k, s, p, ceil_mode, out = [0, 0], [0, 0], [0, 0], False, list(output_size)
    else:
        k, s, p, out = list(kernel_size), list(stride), list(padding), []
    spread = spread and x.numel() > 0
    if spread and bfs_strides(x, (2, 3)) is None:  # pixels not on one stride: the statistics
        x = x.contiguous()                          # need it
    if direct_launch(x, w):                         # nothing to record: the launchers themselves
        g = geometry(x.shape, k, s, p, bool(ceil_mode), out)
        scale = spread_forward(x, (2, 3), None)[1][:g.B] if spread else None
        return window_forward(x, w, g, method, variant, scale=scale)
    if spread:
        return SpreadWindowPoolFunction.apply(x, w, tuple(k), tuple(s), tuple(p),
                                              bool(ceil_mode), method, variant, tuple(out))
    if window_fwd_op is not None and not eager_function(x, w):
        return window_fwd_op(x, w, k, s, p, bool(ceil_mode), method, variant, out)
    return WindowPoolFunction.apply(x, w, tuple(k), tuple(s), tuple(p), bool(ceil_mode), method,
                                    variant, tuple(out))
