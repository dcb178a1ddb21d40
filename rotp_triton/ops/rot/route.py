"""The one router of ROT pooling: backend × device × dtype × α0 × set | window.

Callers (``rot_pool``, the image layers) have validated the options and built the (6, T)
weight table (``params.py``); this module only decides which implementation runs and adapts
the batch to it:

- Triton kernels (``triton/<family>/op.py``: ``sinkhorn_pool``, ``badmm_pool``,
  ``structure_pool`` for sets, ``window_pool`` for k×k windows) for CUDA tensors of dtype
  fp32/fp16/bf16 — or CPU tensors under ``TRITON_INTERPRET=1`` with ``backend="triton"``.
  Rows of a ragged batch must be grouped by set: ``ptr`` is passed through, an unsorted
  ``index`` is sorted once (stable) and the plan scattered back.
- the torch path (``torch/``) otherwise; ``backend="triton"`` where no kernel applies raises.

Nothing here reads a tensor value (no host sync) and no per-weight arithmetic happens here:
the kernels derive κ, 1/ρ, ... from the table on chip. Design: ../../../../shared/DESIGN.md §7;
front-end cost: ../../../../shared/PERF.md ("Host front end").
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..._autocast import without_autocast
from ..._batching import SetBatch, check_prior_args, normalized_log_p0, normalized_log_q0
from ..._transforms import transforms_active
from .spread import normalize_by_spread, normalize_sets_by_spread
from .torch.pool import rot_pool_padded
from .torch.windows import adaptive_rot_pool2d_torch, rot_pool2d_torch, table_weights
from .triton.common import interpreter_enabled, next_pow2
from .window_geometry import largest_adaptive_window

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The window kernels hold a tile of next_pow2(kh·kw) × next_pow2(C) per program in registers
# (triton/window, sm_90 AOT: up to 8,192 elements forward and 2,048 backward without spills);
# up to this many they still run on the kernels (spilling registers: slower, not yet timed on a
# GPU); beyond it backend="auto" uses the torch path.
MAX_WINDOW_TILE = 16384


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401  (only whether it imports)
    except Exception:  # pragma: no cover - triton missing
        return False
    return True


def use_kernels(x: Tensor, backend: str, *, structure: bool = False,
                window_tile: Optional[int] = None) -> bool:
    """Whether the Triton kernels run for ``x``; ``backend="triton"`` turns every "no kernel
    applies" into a ValueError. ``window_tile``: a window's tile size (windows: no α0 > 0 kernel,
    and "auto" keeps tiles of at most MAX_WINDOW_TILE elements)."""
    if backend == "torch":
        return False
    required = backend == "triton"

    def no(why: str) -> bool:
        if required:
            raise ValueError(f"backend='triton' is not available here: {why}")
        return False

    if transforms_active():
        return no("a torch.func transform (grad, vmap, jacrev, ...) or forward-mode AD is "
                  "active, which runs the torch path (the kernels' autograd has no rules for "
                  "them); use backend='auto' or 'torch'")

    if window_tile is not None:
        if structure:
            return no("the window kernels need a0 = 0 (not learned)")
        if not required and window_tile > MAX_WINDOW_TILE:
            return False
    if x.dtype not in KERNEL_DTYPES:
        return no(f"the kernels take float32/float16/bfloat16 inputs, got {x.dtype}; use "
                  f"backend='torch' for float64")
    if not (x.is_cuda or (required and interpreter_enabled())):
        return no("x must be a CUDA tensor (or set TRITON_INTERPRET=1 for CPU tensors)")
    if not _triton_importable():  # pragma: no cover
        return no("triton is not installed")
    return True


# --------------------------------------------------------------------------------------------
# sets
# --------------------------------------------------------------------------------------------
def _spread_kernels(x: Tensor, backend: str) -> bool:
    """Whether the feature scale's own kernels may run (``spread.normalize_by_spread``)."""
    return x.is_cuda or (backend == "triton" and interpreter_enabled())


@without_autocast
def pool_sets(x: Tensor, batch: SetBatch, table: Tensor, *, method: str, variant: str,
              structure: bool, num_iters: int, inner_iters: int, p0=None, q0=None,
              log_p0=None, log_q0=None, backend: str = "auto", return_plan: bool = False,
              spread: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """ROT pooling of a batch of sets: ``(y (B, D) in x's dtype, plan in x's layout or None)``.

    ``table``: (6, T) weights in x's compute dtype; priors as given to ``rot_pool``.
    ``spread``: pool x / s and return s · y, s each set's feature spread (``spread.py``, the
    layers' ``scale="auto"``): folded into the Sinkhorn and B-ADMM kernels where they run
    eagerly without priors or plan; otherwise x / s first (spread kernels or torch ops)."""
    D = x.shape[-1]
    check_prior_args(p0, q0, batch, D, log_p0, log_q0)
    kernels = use_kernels(x, backend, structure=structure)
    if spread:
        if not (kernels and not structure and x.numel() > 0
                and not return_plan and p0 is None and q0 is None and log_p0 is None
                and log_q0 is None and not torch.compiler.is_compiling()):
            xs, s = normalize_sets_by_spread(x, batch, kernels=_spread_kernels(x, backend))
            y, plan = pool_sets(xs, batch, table, method=method, variant=variant,
                                structure=structure, num_iters=num_iters,
                                inner_iters=inner_iters, p0=p0, q0=q0, log_p0=log_p0,
                                log_q0=log_q0, backend=backend, return_plan=return_plan)
            return (y * s).to(x.dtype), plan
        xk, ptr = x, batch.ptr
        if not batch.dense and ptr is None:  # unsorted index: rows grouped by set (y per set)
            order, ptr = batch.set_order()
            xk = x[order]
        if method == "sinkhorn":
            from .triton.sinkhorn.op import sinkhorn_pool
            return sinkhorn_pool(xk, ptr, table, None, None, variant=variant,
                                 return_plan=False, spread=True)
        from .triton.badmm.op import badmm_pool
        return badmm_pool(xk, ptr, table, None, None, quadratic=method == "badmm-q",
                          variant=variant, return_plan=False, spread=True)
    if not kernels:
        return rot_pool_padded(x, batch, table, method=method, variant=variant,
                               structure=structure, num_iters=num_iters,
                               inner_iters=inner_iters, p0=p0, q0=q0, log_p0=log_p0,
                               log_q0=log_q0, return_plan=return_plan)
    f32 = torch.float32
    lp0 = None if p0 is None and log_p0 is None else \
        normalized_log_p0(p0, log_p0, batch.num_sets, D, f32, x.device)
    lq0 = None if q0 is None and log_q0 is None else \
        normalized_log_q0(q0, log_q0, batch, f32, padded=False)
    xk, ptr, order = x, batch.ptr, None
    if not batch.dense and ptr is None:  # unsorted index: rows grouped by set for the kernels
        order, ptr = batch.set_order()
        xk = x[order]
        lq0 = None if lq0 is None else lq0[order]
    if structure:
        from .triton.structure.op import structure_pool
        y, plan = structure_pool(xk, ptr, table, lp0, lq0, method=method, variant=variant,
                                 inner_iters=inner_iters, return_plan=return_plan)
    elif method == "sinkhorn":
        from .triton.sinkhorn.op import sinkhorn_pool
        y, plan = sinkhorn_pool(xk, ptr, table, lp0, lq0, variant=variant,
                                return_plan=return_plan)
    else:
        from .triton.badmm.op import badmm_pool
        y, plan = badmm_pool(xk, ptr, table, lp0, lq0, quadratic=method == "badmm-q",
                             variant=variant, return_plan=return_plan)
    if plan is not None and order is not None:  # back to the caller's row order
        plan = torch.index_copy(torch.empty_like(plan), 0, order, plan)
    return y, plan


# --------------------------------------------------------------------------------------------
# windows
# --------------------------------------------------------------------------------------------
def _window_tile(kernel_size, channels: int) -> int:
    return next_pow2(kernel_size[0] * kernel_size[1]) * next_pow2(channels)


@without_autocast
def pool_windows(x: Tensor, table: Tensor, *, kernel_size, stride, padding, ceil_mode: bool,
                 method: str, variant: str, structure: bool, num_iters: int, inner_iters: int,
                 backend: str, spread: bool = False) -> Tensor:
    """Local ROT pooling of the k×k windows of ``x`` (B, C, H, W) -> (B, C, Ho, Wo).

    ``table``: the layer's (6, T) weights in x's compute dtype (``ROTWeights.table``).
    ``spread``: pool x / s and return s · y in x's dtype, s each image's feature spread
    (``spread.py``, the layers' ``scale="auto"``): folded into the window kernels where they
    run eagerly; otherwise the separate ops (spread kernels on CUDA, torch ops under
    ``torch.compile`` or on CPU)."""
    def torch_path(xs):
        return rot_pool2d_torch(xs, kernel_size, stride, padding, ceil_mode, method=method,
                                variant=variant, num_iters=num_iters, inner_iters=inner_iters,
                                weights=table_weights(table, structure))
    windows = dict(kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode)
    return _pool_image_windows(x, table, windows, kernel_size, torch_path, method=method,
                               variant=variant, structure=structure, backend=backend,
                               spread=spread)


@without_autocast
def pool_adaptive(x: Tensor, table: Tensor, output_size: Tuple[int, int], *,
                  method: str, variant: str, structure: bool, num_iters: int,
                  inner_iters: int, backend: str, spread: bool = False) -> Tensor:
    """Adaptive ROT pooling (nn.AdaptiveAvgPool2d's windows), output size other than 1×1:
    windows that tile the image evenly are local windows; others (they may differ in size and
    overlap) run on the window kernels too (``window_pool(output_size=...)``) where kernels
    apply, else on the torch path. ``spread``: as in ``pool_windows``."""
    B, C, H, W = x.shape
    oh, ow = output_size
    if H % oh == 0 and W % ow == 0:
        k = (H // oh, W // ow)
        return pool_windows(x, table, kernel_size=k, stride=k, padding=(0, 0),
                            ceil_mode=False, method=method, variant=variant,
                            structure=structure, num_iters=num_iters, inner_iters=inner_iters,
                            backend=backend, spread=spread)

    def torch_path(xs):
        return adaptive_rot_pool2d_torch(xs, output_size, method=method, variant=variant,
                                         num_iters=num_iters, inner_iters=inner_iters,
                                         weights=table_weights(table, structure))
    largest = (largest_adaptive_window(H, oh), largest_adaptive_window(W, ow))
    return _pool_image_windows(x, table, dict(output_size=(oh, ow)), largest, torch_path,
                               method=method, variant=variant, structure=structure,
                               backend=backend, spread=spread)


def _pool_image_windows(x: Tensor, table: Tensor, windows: dict, largest, torch_path, *,
                        method: str, variant: str, structure: bool, backend: str,
                        spread: bool) -> Tensor:
    """The window kernels (``window_pool(**windows)``) where they apply - ``largest``: the
    largest window (kh, kw), which sets the kernels' tile - else ``torch_path(x or x / s)``."""
    kernels = use_kernels(x, backend, structure=structure,
                          window_tile=_window_tile(largest, x.shape[1]))
    if kernels:
        from .triton.window.op import window_pool
        if spread and not torch.compiler.is_compiling():
            return window_pool(x, table, method=method, variant=variant, spread=True,
                               **windows)
    xs, s = (normalize_by_spread(x, (2, 3), x.dtype, kernels=_spread_kernels(x, backend))
             if spread else (x, None))
    if kernels:
        y = window_pool(xs, table, method=method, variant=variant, **windows)
    else:
        y = torch_path(xs)
    return y if s is None else (y * s).to(x.dtype)
