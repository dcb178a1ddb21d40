"""torch.func transforms (``grad``, ``vmap``, ``jacrev``, ``jvp``, ``functional_call`` under
them) and forward-mode AD (``torch.autograd.forward_ad``): while one is active the package runs
plain torch ops - no custom autograd.Function (torch.func needs ``setup_context`` and vmap
rules, forward AD a ``jvp``, which they do not have), no Triton kernel (the router takes the
torch path; ``backend="triton"`` raises), no value check (a check reads values on the host,
which ``vmap`` forbids) - as while torch.compile traces."""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad

_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def transforms_active() -> bool:
    """Whether a torch.func transform is active (over any tensor), or a forward-mode AD level
    (``with torch.autograd.forward_ad.dual_level():``, whatever the inputs)."""
    return _forward_ad._current_level >= 0 or bool(_active())


def plain_ops() -> bool:
    """Whether the package must run plain torch ops (the torch path's plain loop, no chunks, no
    per-module checkpoint, no value check): while torch.compile traces, as before, or while a
    transform is active (:func:`transforms_active`)."""
    return torch.compiler.is_compiling() or transforms_active()
