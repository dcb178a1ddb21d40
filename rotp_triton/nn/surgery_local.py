"""``replace_local_pools``: put ROT pooling into a CNN in place of its local pooling layers
(``nn.MaxPool2d``, ``nn.AvgPool2d``: VGG's 2×2 pools, the ResNet stem's 3×3/2), each by a
:class:`ROTPool2d` with the same windows and the channel count seen in a dry run, started near
the pool it replaces (README "Vision models")."""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

from torch import nn

from .image import ROTPool2d
from .surgery import (Selector, _check_model_and_selectors, _dry_run, _example, _matches,
                      _nothing_to_replace, _put)

log = logging.getLogger("rotp_triton")

# A max pool becomes the max-pooling limit of ROT pooling (docs/design.md §4: α2 = ∞, α3 = 0,
# small α1): each channel's softmax over its window at temperature α1 (relative to the image's
# feature spread, scale="auto"). One Sinkhorn iteration is exact there (no column constraint).
# At α1 = 0.05 it differs from the max by 0.2-0.4 % (relative RMS, Gaussian features, C = 8-64,
# 2×2 and 3×3/2; measured); α1 learns.
MAX_POOL_INIT = dict(method="sinkhorn", num_iters=1, a1=0.05, a2=math.inf, learn_a2=False,
                     a3=0.0, learn_a3=False)
# keyword arguments that choose the solver or a weight: any of them replaces MAX_POOL_INIT
_SOLVER_KEYS = {"method", "variant", "num_iters", "a0", "a1", "a2", "a3", "rho", "tau"}


def _solver_given(rot_kwargs: dict) -> bool:
    return any(k in _SOLVER_KEYS or k.startswith("learn_") for k in rot_kwargs)


def _unsupported(m: nn.Module) -> Optional[str]:
    """Why a local pool cannot become a ROTPool2d (None: it can)."""
    if isinstance(m, nn.MaxPool2d):
        if m.dilation not in (1, (1, 1)):
            return f"dilation={m.dilation}"
        if m.return_indices:
            return "return_indices=True"
    elif getattr(m, "divisor_override", None):
        return f"divisor_override={m.divisor_override}"
    return None


def _kind(m: nn.Module) -> Optional[str]:
    if isinstance(m, nn.MaxPool2d):
        return "max"
    if isinstance(m, nn.AvgPool2d):
        return "avg"
    return None


def replace_local_pools(model: nn.Module, example_input=None, *,
                        input_size: Optional[Sequence[int]] = None, include: Selector = None,
                        exclude: Selector = None, strict: bool = True,
                        **rot_kwargs) -> nn.Module:
    """Replace ``model``'s local pooling layers by :class:`ROTPool2d`, in place.

    Every ``nn.MaxPool2d`` and ``nn.AvgPool2d`` (subclasses included) that runs in a dry run
    (eval mode, no_grad) becomes a ``ROTPool2d`` with its ``kernel_size``, ``stride``,
    ``padding``, ``ceil_mode`` and the channel count of its input, on the model's device and
    dtype; output shapes are unchanged. A window pools its valid positions, so at padded
    borders the near-mean start is the mean of the valid positions (``count_include_pad=False``).

    Args:
        model: any nn.Module on (B, C, H, W) images.
        example_input, input_size: the dry run's input, as in :func:`replace_avgpool`.
        include: which pools to replace (default: every one that can be): a name pattern
            (``fnmatch``), a list of them, or a predicate ``(name, module) -> bool``.
        exclude: pools never to replace (same forms).
        strict: raise ValueError when nothing is replaced (default); ``False`` returns the
            model unchanged.
        **rot_kwargs: passed to every new layer (method, num_iters, a1, backend, scale, ...).
            A max pool starts at ROT's max-pooling limit (``MAX_POOL_INIT``: Sinkhorn, α2 = ∞,
            α3 = 0, α1 = 0.05 learnable, one iteration) unless they choose the solver or a
            weight (method, variant, num_iters, a0 … tau, learn_*); an average pool starts at
            the layer's near-mean defaults.

    Pools with ``dilation`` ≠ 1, ``return_indices=True`` or a ``divisor_override`` are kept.

    Returns:
        ``model`` (or the new layer when ``model`` itself is the pool). The replaced module
        names are in ``returned.rotp_replaced`` (also logged at INFO level by the
        ``rotp_triton`` logger).
    """
    _check_model_and_selectors(model, include, exclude)
    example = _example(model, example_input, input_size)
    pools = [(n, m) for n, m in model.named_modules() if _kind(m) is not None]
    shapes, _, _ = _dry_run(model, example, pools, who="replace_local_pools")
    ran = {n: m for n, m in pools if n in shapes}
    chosen = [n for n in ran if (include is None or _matches(include, n, ran[n]))
              and (exclude is None or not _matches(exclude, n, ran[n]))]
    kept = {n: _unsupported(ran[n]) for n in chosen if _unsupported(ran[n])}
    chosen = [n for n in chosen if n not in kept]
    if not chosen:
        seen = ", ".join(f"{n!r} ({type(m).__name__}"
                         f"{': ' + _unsupported(m) if _unsupported(m) else ''})"
                         for n, m in ran.items()) or "none"
        return _nothing_to_replace(model, strict, f"replace_local_pools found no local pool to "
                                   f"replace (pools that ran: {seen}; include={include!r}, "
                                   f"exclude={exclude!r})")
    param = next(iter(model.parameters()), None)
    replaced = []
    for name in chosen:
        mod, shape = ran[name], shapes[name]      # (B, C, H, W) or (C, H, W), as torch's pools
        max_init = _kind(mod) == "max" and not _solver_given(rot_kwargs)
        kwargs = {**MAX_POOL_INIT, **rot_kwargs} if max_init else rot_kwargs
        new = ROTPool2d(shape[-3], mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode,
                        **kwargs)
        log.info("replace_local_pools: %s (%r, input %s) -> %r", name or "<model>", mod, shape,
                 new)
        replaced.append(name)
        if _put(model, name, new, param):
            return new
    for name, why in kept.items():
        log.info("replace_local_pools: %s kept (%s)", name, why)
    model.rotp_replaced = replaced
    return model
