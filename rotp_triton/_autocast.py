"""The pooling ops under ``torch.autocast`` (mixed precision): :func:`without_autocast`.

Autocast runs matmuls and convolutions in fp16/bf16 (and some reductions in fp32) whatever the
code around them asks for. The solvers here iterate in the log/exp domain - the structure
term's Σ1·M·Σ2 products, OTK's Sinkhorn matrix-vector products, GSP's projection and
distances - where a half-precision product loses the marginals' precision or overflows (fp16
tops out at 65,504). So every public op runs with autocast off on its input's device: it
computes exactly as it does without autocast (in x's compute dtype, fp32 for half inputs:
``_batching.compute_dtype``) and returns x's dtype, as ``nn.AvgPool2d`` and
``nn.AdaptiveAvgPool2d`` do under autocast. Layers' own projections outside the ops
(``ROTPool``'s attention prior: an ``nn.Linear``) still autocast.
"""
from __future__ import annotations

import functools

import torch


# one C call that says whether autocast is on for any device (as nn.RNN and dynamo ask it):
# a call without autocast costs 0.7-1.2 µs more than an undecorated one (~3 with the
# per-device checks first; measured on this CPU)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def without_autocast(fn):
    """Decorate an op whose first argument is the input tensor x: it runs with autocast off on
    x's device type (a no-op when autocast is off, or x is not a tensor - the op's own checks
    then name the bad argument)."""
    @functools.wraps(fn)
    def run(x, *args, **kwargs):
        if _any_autocast() and isinstance(x, torch.Tensor):
            device_type = x.device.type
            if (torch.amp.is_autocast_available(device_type)
                    and torch.is_autocast_enabled(device_type)):
                with torch.autocast(device_type, enabled=False):
                    return fn(x, *args, **kwargs)
        return fn(x, *args, **kwargs)
    return run
