"""Today's routing glue for the window kernels: ``rot_pool2d_triton`` validates its
arguments, builds the (6, T) weight table and calls
:func:`rotp_triton.ops.rot.triton.window.window_pool`. The router of branch ``layout``
(``ops/rot/route.py``) replaces it; then this module goes.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .params import METHODS
from .triton.window import window_pool


def _as_pair(v, name: str) -> Tuple[int, int]:
    vals = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if len(vals) != 2 or any(isinstance(e, bool) or not isinstance(e, int) for e in vals):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    return vals


def _as_vec(w, T: Optional[int], name: str, device) -> Tensor:
    t = w if isinstance(w, Tensor) else torch.tensor([float(w)])
    t = t.to(device=device, dtype=torch.float32).reshape(-1)
    if T is not None and t.numel() == 1 and T > 1:
        t = t.expand(T)
    return t


def rot_pool2d_triton(x: Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                      *, method: str = "badmm-e", variant: str = "exact",
                      a1=100.0, a2=1.0, a3=1.0, rho=100.0,
                      num_iters: Optional[int] = None) -> Tensor:
    """Local ROT pooling of every k×k window of ``x`` with the Triton kernels (α0 = 0).

    Args:
        x: (B, C, H, W) float32/float16/bfloat16 on CUDA (or CPU under TRITON_INTERPRET=1), any
            strides (NCHW, channels_last, non-contiguous views are read in place).
        kernel_size, stride, padding: int or pair (as nn.MaxPool2d; stride None = kernel_size).
        ceil_mode: as nn.MaxPool2d.
        method: "sinkhorn" | "badmm-e" | "badmm-q"; variant: "exact" | "paper".
        a1, a2, a3, rho: floats or (T,) / (1,) tensors (a2, a3 may be inf); differentiable.
        num_iters: T (default: the longest weight tensor's length; 4 if all are floats).
    Returns:
        (B, C, Ho, Wo) in x's dtype, channels_last if x is.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if variant not in ("exact", "paper"):
        raise ValueError(f"variant must be 'exact' or 'paper', got {variant!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32/float16/bfloat16 for the kernels, got {x.dtype}")
    k = _as_pair(kernel_size, "kernel_size")
    s = k if stride is None else _as_pair(stride, "stride")
    p = _as_pair(padding, "padding")
    if num_iters is None:
        lens = [w.numel() for w in (a1, a2, a3, rho) if isinstance(w, Tensor)]
        num_iters = max(lens) if lens else 4
    vec = [_as_vec(w, num_iters, n, x.device) for n, w in
           (("a1", a1), ("a2", a2), ("a3", a3), ("rho", rho))]
    for n, v in zip(("a1", "a2", "a3", "rho"), vec):
        if v.numel() != num_iters:
            raise ValueError(f"{n} must have 1 or num_iters = {num_iters} entries, got "
                             f"{v.numel()}")
    a1v, a2v, a3v, rhov = vec
    w = torch.stack([torch.zeros_like(a1v), a1v, a2v, a3v, rhov, torch.ones_like(a1v)])
    return window_pool(x, w, kernel_size=k, stride=s, padding=p, ceil_mode=ceil_mode,
                       method=method, variant=variant)
