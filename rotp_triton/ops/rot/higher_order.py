"""Gradients that are differentiated again: ``torch.autograd.grad(..., create_graph=True)``
(gradient penalties such as R1 or WGAN-GP, meta-learning, Hessian-vector products).

The hand-written backwards - the torch path's adjoints, the spread statistics' and every
kernel's - are first order. Autograd runs a backward with grad mode on exactly when the
gradient it computes is recorded (``create_graph=True``); there each of them instead recomputes
its forward with autograd recording (the torch path: the plain unrolled iterations) and returns
the vector-Jacobian product of that graph, which autograd can differentiate again. Exact
higher-order gradients, at the memory of autograd through the unrolled iterations (O(T)
x-sized tensors); a first-order backward is unchanged.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor


def recorded_backward() -> bool:
    """Inside a backward: whether autograd records what it computes (``create_graph=True``)."""
    return torch.is_grad_enabled()


def recomputed_vjp(forward: Callable, inputs: Sequence[Optional[Tensor]],
                   needs: Sequence[bool], grad_outputs: Sequence[Optional[Tensor]]) -> list:
    """The gradients of ``forward(*inputs)`` (a tensor or a sequence of tensors / None) under
    the cotangents ``grad_outputs`` (None: no gradient), for the inputs whose ``needs`` is
    true (None for the others and for inputs the outputs do not depend on), recorded by
    autograd (``create_graph=True``). ``inputs`` are a Function's saved tensors as a recording
    backward unpacks them: the caller's tensors, so the result's graph reaches back to them."""
    with torch.enable_grad():
        outs = forward(*inputs)
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, grad_outputs)
             if o is not None and g is not None and o.requires_grad]
    wanted = [i for i, (t, n) in enumerate(zip(inputs, needs))
              if n and t is not None and t.requires_grad]
    grads: list = [None] * len(inputs)
    if pairs and wanted:
        got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted],
                                  [g for _, g in pairs], create_graph=True, allow_unused=True)
        for i, g in zip(wanted, got):
            grads[i] = g
    return grads
