"""``replace_local_pools``: put ROT pooling into a CNN in place of its local pooling layers
(``nn.MaxPool2d``, ``nn.AvgPool2d``: VGG's 2×2 pools, the ResNet stem's 3×3/2), each by a
:class:`ROTPool2d` with the same windows and the channel count seen in a dry run, started near
the pool it replaces (README "Vision models")."""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .image import ROTPool2d
from .surgery import (Selector, _check_model_and_selectors, _dry_run, _example, _matches,
                      _nothing_to_replace, _put)
from .surgery_fx import traced_with_shapes

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
                        exclude: Selector = None, strict: bool = True, functional: bool = False,
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
        functional: for models that pool with function calls (``F.max_pool2d(x, 2)``,
            ``F.avg_pool2d``, ``torch.max_pool2d``): trace the model with torch.fx and replace
            those calls (``include`` / ``exclude`` match the graph's node names, e.g.
            ``"max_pool2d_1"``). Returns the traced ``torch.fx.GraphModule``; ``model`` is
            left unchanged.
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
    if functional:
        return _replace_pool_calls(model, example, include, exclude, strict, rot_kwargs)
    pools = [(n, m) for n, m in model.named_modules() if _kind(m) is not None]
    shapes, _, _ = _dry_run(model, example, pools, who="replace_local_pools")
    ran = {n: m for n, m in pools if n in shapes}
    chosen = [n for n in ran if (include is None or _matches(include, n, ran[n]))
              and (exclude is None or not _matches(exclude, n, ran[n]))]
    why = {n: _unsupported(m) for n, m in ran.items()}
    kept = {n: why[n] for n in chosen if why[n]}
    chosen = [n for n in chosen if n not in kept]
    if not chosen:
        seen = ", ".join(f"{n!r} ({type(m).__name__}{': ' + why[n] if why[n] else ''})"
                         for n, m in ran.items()) or "none"
        hint = "" if ran else "; for pooling by function calls (F.max_pool2d) functional=True"
        return _nothing_to_replace(model, strict, f"replace_local_pools found no local pool to "
                                   f"replace (pools that ran: {seen}; include={include!r}, "
                                   f"exclude={exclude!r}){hint}")
    param = next(iter(model.parameters()), None)
    replaced = []
    for name in chosen:
        mod, shape = ran[name], shapes[name]      # (B, C, H, W) or (C, H, W), as torch's pools
        new = _rot_pool(_kind(mod), shape[-3], mod.kernel_size, mod.stride, mod.padding,
                        mod.ceil_mode, rot_kwargs)
        log.info("replace_local_pools: %s (%r, input %s) -> %r", name or "<model>", mod, shape,
                 new)
        replaced.append(name)
        if _put(model, name, new, param):
            return new
    for name, why in kept.items():
        log.info("replace_local_pools: %s kept (%s)", name, why)
    model.rotp_replaced = replaced
    return model


def _rot_pool(kind: str, channels: int, kernel_size, stride, padding, ceil_mode,
              rot_kwargs: dict) -> ROTPool2d:
    """The ROTPool2d in place of a ``kind`` ("max" / "avg") pool of these windows."""
    kwargs = rot_kwargs
    if kind == "max" and not _solver_given(rot_kwargs):
        kwargs = {**MAX_POOL_INIT, **rot_kwargs}
    return ROTPool2d(channels, kernel_size, stride, padding, ceil_mode, **kwargs)


# the pooling functions a traced model may call, their kind and their positional parameters
_POOL_CALLS = {
    F.max_pool2d: "max", torch.max_pool2d: "max", F.avg_pool2d: "avg"}
_PARAMS = {
    "max": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
            "return_indices"),
    "avg": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
            "divisor_override")}


def _call_geometry(node) -> tuple:
    """(kind, kernel_size, stride, padding, ceil_mode, why it cannot be replaced or None) of a
    pooling call node."""
    kind = _POOL_CALLS[node.target]
    a = {**dict(zip(_PARAMS[kind], node.args)), **node.kwargs}
    k = a["kernel_size"]
    stride = a.get("stride") or k        # None (F) or [] (torch.max_pool2d): the kernel size
    why = None
    if a.get("dilation", 1) not in (1, (1, 1), [1, 1]):
        why = f"dilation={a['dilation']}"
    elif a.get("return_indices") or a.get("divisor_override"):
        why = "return_indices=True" if a.get("return_indices") else \
            f"divisor_override={a['divisor_override']}"
    return kind, k, stride, a.get("padding", 0), bool(a.get("ceil_mode", False)), why


def _replace_pool_calls(model, example, include, exclude, strict, rot_kwargs):
    """``functional=True``: the model traced by torch.fx, its pooling calls replaced."""
    gm = traced_with_shapes(model, example, "replace_local_pools", "nn.MaxPool2d / nn.AvgPool2d")
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _POOL_CALLS
             and "tensor_meta" in getattr(n.args[0], "meta", {})]
    chosen = [n for n in calls if (include is None or _matches(include, n.name, None))
              and (exclude is None or not _matches(exclude, n.name, None))]
    geometry = {n: _call_geometry(n) for n in calls}
    chosen = [n for n in chosen if geometry[n][-1] is None]
    if not chosen:
        why = {n: geometry[n][-1] for n in calls}
        seen = ", ".join(f"{n.name!r}{': ' + why[n] if why[n] else ''}" for n in calls) or "none"
        return _nothing_to_replace(gm, strict, f"replace_local_pools(functional=True) found no "
                                   f"pooling call to replace (calls: {seen}; "
                                   f"include={include!r}, exclude={exclude!r})")
    channels = {n: int(n.args[0].meta["tensor_meta"].shape[-3]) for n in chosen}  # (B, C, H, W)
    param = next(iter(model.parameters()), None)
    replaced = []
    for node in chosen:  # (a replaced call's input may be the new node of an earlier one)
        kind, k, stride, padding, ceil_mode, _ = geometry[node]
        new = _rot_pool(kind, channels[node], k, stride, padding, ceil_mode, rot_kwargs)
        name = f"rot_{node.name}"
        while hasattr(gm, name):
            name = "_" + name
        _put(gm, name, new, param)
        log.info("replace_local_pools: %s -> %s = %r", node.name, name, new)
        with gm.graph.inserting_after(node):
            new_node = gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new_node)
        gm.graph.erase_node(node)
        replaced.append(name)
    gm.recompile()
    gm.rotp_replaced = replaced
    return gm
