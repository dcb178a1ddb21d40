"""``replace_avgpool``: put ROT pooling into a trained CNN / vision transformer in place of the
global average pooling that feeds its head (README "Vision models" has tested recipes for
torchvision and timm models).

Which pools: a dry run (eval mode, no_grad) records, in execution order, every average pool
module - ``nn.AdaptiveAvgPool2d`` and its subclasses, and timm's ``SelectAdaptivePool2d``
recognised by its attributes (``pool_type``, ``flatten``), NCHW or NHWC - with the shape of its
input. By default only the *head* pool is replaced: the last *global* one (output 1×1) to run,
i.e. the one whose output goes to the classifier; pools inside blocks (squeeze-excitation)
run before it and are kept. ``include`` / ``exclude`` choose others. Channel counts come from
the same dry run. Models that pool with a function call (``F.adaptive_avg_pool2d``,
``x.mean((2, 3))``) have no module to swap: the dry run names the call, and
``functional=True`` rewrites it with torch.fx instead.
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .image import AdaptiveROTPool2d
from .select_pool import ROTSelectAdaptivePool2d

log = logging.getLogger("rotp_triton")

Selector = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]
DEFAULT_SIZE = 224


def _is_select_adaptive(m: nn.Module) -> bool:
    """timm's SelectAdaptivePool2d, by duck typing: an average pool_type and a flatten member."""
    pool_type = getattr(m, "pool_type", None)
    return (isinstance(pool_type, str) and pool_type in ("avg", "fast", "fastavg")
            and isinstance(getattr(m, "flatten", None), (nn.Module, bool))
            and not isinstance(m, ROTSelectAdaptivePool2d))


def _output_size(m: nn.Module):
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return m.output_size
    return 1


def _is_global(m: nn.Module) -> bool:
    out = _output_size(m)
    out = out if isinstance(out, (tuple, list)) else (out, out)
    return tuple(out) == (1, 1)


def _is_candidate(m: nn.Module) -> bool:
    return ((isinstance(m, nn.AdaptiveAvgPool2d) or _is_select_adaptive(m))
            and not isinstance(m, AdaptiveROTPool2d))


def _matches(sel: Selector, name: str, mod: nn.Module) -> bool:
    if callable(sel):
        return bool(sel(name, mod))
    patterns = [sel] if isinstance(sel, str) else list(sel)
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class _FunctionalPoolSpy(TorchFunctionMode):
    """Records global average pooling done by function calls during the dry run."""

    def __init__(self, stack: List[str], pool_names: set):
        super().__init__()
        self.stack, self.pool_names, self.calls = stack, pool_names, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = None
        x = args[0] if args else None
        if isinstance(x, Tensor) and x.dim() == 4:
            out = args[1] if len(args) > 1 else kwargs.get("output_size")
            if func is F.adaptive_avg_pool2d and out in (1, (1, 1), [1, 1]):
                what = "torch.nn.functional.adaptive_avg_pool2d"
            elif func in (torch.mean, Tensor.mean):
                dims = args[1] if len(args) > 1 else kwargs.get("dim")
                dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
                if sorted(d % 4 for d in dims) in ([2, 3], [1, 2]):
                    what = f"mean over dims {dims}"
        if what is not None and not (self.stack and self.stack[-1] in self.pool_names):
            where = self.stack[-1] if self.stack else ""
            self.calls.append(f"{what} in the forward of {where or 'the model itself'!r} "
                              f"({type(x).__name__} {tuple(x.shape)})")
        return func(*args, **kwargs)


def _dry_run(model: nn.Module, example_input, cands, who: str = "replace_avgpool") -> tuple:
    """Run ``model`` once; returns ({name: input shape}, [names in execution order],
    [functional pooling calls]). ``who``: the public function, for the error message."""
    shapes, order, stack = {}, [], []
    handles = []
    cand_ids = {id(m) for _, m in cands}
    for name, mod in model.named_modules():
        def pre(_m, args, name=name):
            stack.append(name)
            if id(_m) in cand_ids and args and isinstance(args[0], Tensor):
                shapes.setdefault(name, tuple(args[0].shape))
                order.append(name)

        def post(_m, args, out):
            stack.pop()
        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    was_training = model.training
    model.eval()
    spy = _FunctionalPoolSpy(stack, {n for n, _ in cands})
    try:
        with torch.no_grad(), spy:
            if isinstance(example_input, (tuple, list)):
                model(*example_input)
            else:
                model(example_input)
    except Exception as e:
        raise ValueError(f"{who}: the dry run of the model failed ({type(e).__name__}: {e}); "
                         f"pass example_input= (or input_size=) that the model accepts") from e
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes, order, spy.calls


def _check_model_and_selectors(model, include, exclude) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, sel in (("include", include), ("exclude", exclude)):
        if sel is not None and not (callable(sel) or isinstance(sel, str) or (
                isinstance(sel, (list, tuple)) and all(isinstance(p, str) for p in sel))):
            raise TypeError(f"{name} must be a name pattern, a list of patterns or a predicate "
                            f"(name, module) -> bool, got {type(sel).__name__}")


def _example(model: nn.Module, example_input, input_size):
    if example_input is not None:
        return example_input
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else "cpu"
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    if input_size is None:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        cin = first.in_channels if first is not None else 3
        input_size = (1, cin, DEFAULT_SIZE, DEFAULT_SIZE)
    g = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn(tuple(input_size), generator=g).to(device=device, dtype=dtype)


def _input_fmt(mod: nn.Module) -> str:
    """"NHWC" or "NCHW": timm stores it on SelectAdaptivePool2d (some versions) or as the
    spatial dims ``pool.dim`` of its fast pools ((1, 2) for NHWC)."""
    fmt = getattr(mod, "input_fmt", None)
    if fmt is None:
        fmt = "NHWC" if tuple(getattr(getattr(mod, "pool", None), "dim", ()) or ()) == (1, 2) \
            else "NCHW"
    return str(getattr(fmt, "value", fmt))


def _channels(mod: nn.Module, shape: tuple) -> int:
    return shape[-1] if _input_fmt(mod) == "NHWC" else shape[1]


def _new_pool(mod: nn.Module, channels: int, rot_kwargs: dict) -> nn.Module:
    if isinstance(mod, nn.AdaptiveAvgPool2d):
        return AdaptiveROTPool2d(channels, output_size=mod.output_size, **rot_kwargs)
    return ROTSelectAdaptivePool2d(channels, flatten=_flattens(mod), input_fmt=_input_fmt(mod),
                                   **rot_kwargs)


def _flattens(mod: nn.Module) -> bool:
    """Whether a SelectAdaptivePool2d returns (B, C): its flatten member, or (timm's "fast"
    pools) the ``flatten`` flag of its inner pool."""
    flatten = mod.flatten if isinstance(mod.flatten, bool) else not isinstance(mod.flatten,
                                                                                nn.Identity)
    return flatten or getattr(getattr(mod, "pool", None), "flatten", False) is True


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _nothing_to_replace(model: nn.Module, strict: bool, message: str) -> nn.Module:
    """``strict``: ValueError(message); otherwise the model, unchanged (``rotp_replaced`` [])."""
    if strict:
        raise ValueError(f"{message}. strict=False allows this.")
    model.rotp_replaced = []
    return model


def _put(model: nn.Module, name: str, new: nn.Module, param) -> bool:
    """Moves ``new`` to the device and floating dtype of ``param`` (the model's first
    parameter, taken before any replacement; None: left as built) and installs it at ``name``;
    True when ``name`` is the model itself (then ``new`` replaces it: the caller returns it)."""
    if param is not None:
        new.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)
    if name == "":
        new.rotp_replaced = [""]
        return True
    _set(model, name, new)
    return False


def replace_avgpool(model: nn.Module, example_input=None, *, input_size: Optional[Sequence[int]] = None,
                    include: Selector = None, exclude: Selector = None, strict: bool = True,
                    functional: bool = False, **rot_kwargs) -> nn.Module:
    """Replace the global average pooling that feeds ``model``'s head by ROT pooling, in place.

    Args:
        model: any nn.Module (a torchvision / timm classifier, a CNN of your own).
        example_input: input for the dry run (a tensor or a tuple of arguments); default a
            ``randn(input_size)`` on the model's device and dtype.
        input_size: shape of the dry run's input; default ``(1, C_in, 224, 224)`` with C_in the
            first Conv2d's input channels.
        include: which pools to replace instead of the head pool: a name pattern
            (``fnmatch``, e.g. ``"*"`` for every average pool, ``"features.*.se.*"``), a list of
            them, or a predicate ``(name, module) -> bool``. Candidates are
            ``nn.AdaptiveAvgPool2d`` (subclasses included) and timm-style
            ``SelectAdaptivePool2d`` average pools that ran in the dry run.
        exclude: pools never to replace (same forms).
        strict: raise ValueError when nothing is replaced (default); ``False`` returns the
            model unchanged.
        functional: for models that pool with a function call (``F.adaptive_avg_pool2d(x, 1)``,
            ``x.mean((2, 3))``: torchvision's densenet, mobilenet_v2): trace the model with
            torch.fx and replace the last such call by a ROT pooling module. Returns the traced
            ``torch.fx.GraphModule``; ``model`` is left unchanged.
        **rot_kwargs: passed to every new :class:`AdaptiveROTPool2d` (method, num_iters, a1,
            scale, ...). The defaults (α1 = ρ = 100 relative to the features' spread) pool
            close to the mean, so a trained model's predictions barely move.

    Returns:
        ``model`` (or the new layer when ``model`` itself is the pool, or the GraphModule with
        ``functional=True``). The replaced module names are in ``returned.rotp_replaced``
        (a list, also logged at INFO level by the ``rotp_triton`` logger). For timm models,
        ``model.reset_classifier(...)`` keeps the ROT pool (and its learned weights) whenever
        it would rebuild an average pool.
    """
    _check_model_and_selectors(model, include, exclude)
    example = _example(model, example_input, input_size)
    if functional:
        from .surgery_fx import replace_functional_avgpool
        return replace_functional_avgpool(model, example, strict=strict, **rot_kwargs)
    cands = [(n, m) for n, m in model.named_modules() if _is_candidate(m)]
    # the pool inside a SelectAdaptivePool2d goes with it
    outer = [n + "." for n, m in cands if _is_select_adaptive(m)]
    cands = [(n, m) for n, m in cands if not any(n.startswith(o) for o in outer)]
    shapes, order, calls = _dry_run(model, example, cands)
    ran = {n: m for n, m in cands if n in shapes}
    if include is None:
        heads = [n for n in order if _is_global(ran[n])]
        chosen = heads[-1:]
    else:
        chosen = [n for n in ran if _matches(include, n, ran[n])]
    if exclude is not None:
        chosen = [n for n in chosen if not _matches(exclude, n, ran[n])]
    if not chosen:
        seen = ", ".join(f"{n!r} ({type(m).__name__})" for n, m in ran.items()) or "none"
        hint = ""
        if calls:
            hint = (f"; the model pools with function calls: {calls[-1]} - pass "
                    f"functional=True to rewrite it with torch.fx")
        return _nothing_to_replace(model, strict, f"replace_avgpool found no average pool to "
                                   f"replace (pools that ran: {seen}; include={include!r}, "
                                   f"exclude={exclude!r}){hint}")
    param = next(iter(model.parameters()), None)
    replaced = []
    for name in chosen:
        mod = ran[name]
        new = _new_pool(mod, _channels(mod, shapes[name]), rot_kwargs)
        log.info("replace_avgpool: %s (%s, input %s) -> %r", name or "<model>",
                 type(mod).__name__, shapes[name], new)
        replaced.append(name)
        if _put(model, name, new, param):
            return new
    model.rotp_replaced = replaced
    if callable(getattr(type(model), "reset_classifier", None)):
        keeper = KeepROTPoolOnReset(model, type(model).reset_classifier,
                                    {n: model.get_submodule(n) for n in replaced})
        object.__setattr__(model, "reset_classifier", keeper)
    return model


class KeepROTPoolOnReset:
    """Installed as ``model.reset_classifier`` by :func:`replace_avgpool` on models that have
    one (timm): runs the original, then puts the ROT pool (same object, learned weights kept)
    back wherever it rebuilt an average pool (``global_pool="avg"``); another pool type asked
    for explicitly (``"max"``, ``""``) is left as asked. Picklable."""

    def __init__(self, model: nn.Module, original, pools: dict):
        self.model, self.original, self.pools = model, original, pools

    def __call__(self, *args, **kwargs):
        out = self.original(self.model, *args, **kwargs)
        for name, pool in self.pools.items():
            try:
                now = self.model.get_submodule(name)
            except AttributeError:
                continue
            if now is pool or not _is_candidate(now):
                continue
            if isinstance(pool, ROTSelectAdaptivePool2d) and _is_select_adaptive(now):
                flatten = _flattens(now)
                pool.pool.flatten = flatten
                pool.flatten = nn.Flatten(1) if flatten else nn.Identity()
            _set(self.model, name, pool)
        return out
