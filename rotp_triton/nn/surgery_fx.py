"""``replace_avgpool(model, functional=True)``: for models that pool with a function call
instead of a module (torchvision's densenet, mobilenet_v2: ``F.adaptive_avg_pool2d(x, 1)``;
others: ``x.mean((2, 3))``), trace the model with torch.fx and replace the last such call, the
one feeding the head, by a ROT pooling module."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .image import AdaptiveROTPool2d
from .select_pool import ROTSelectAdaptivePool2d


def _global_pool_call(node):
    """``(fmt, keepdim)`` if ``node`` is a global average pool of a 4-D tensor, else None."""
    meta = getattr(node.args[0], "meta", {}).get("tensor_meta") if node.args else None
    if meta is None or len(meta.shape) != 4:
        return None
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        out = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return ("NCHW", True) if out in (1, (1, 1), [1, 1]) else None
    if (node.op == "call_method" and node.target == "mean") or (
            node.op == "call_function" and node.target is torch.mean):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None:
            return None
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        keepdim = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
        axes = sorted(d % 4 for d in dims)
        if axes == [2, 3]:
            return "NCHW", keepdim
        if axes == [1, 2] and not keepdim:
            return "NHWC", False
    return None


def traced_with_shapes(model: nn.Module, example, who: str, instead: str):
    """``model`` traced by torch.fx, every node's ``meta["tensor_meta"]`` filled by one run on
    ``example`` (eval mode, no_grad). ``who``: the caller for the error; ``instead``: the module
    to use where tracing fails."""
    import torch.fx as fx
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:
        raise ValueError(f"{who}(functional=True): torch.fx cannot trace "
                         f"{type(model).__name__} ({type(e).__name__}: {e}); replace its "
                         f"pooling call by an {instead} module instead") from e
    args = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    was_training = gm.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(*args)
    gm.train(was_training)
    return gm


def replace_functional_avgpool(model: nn.Module, example, *, strict: bool = True, **rot_kwargs):
    gm = traced_with_shapes(model, example, "replace_avgpool", "nn.AdaptiveAvgPool2d")
    found = [(n, _global_pool_call(n)) for n in gm.graph.nodes]
    found = [(n, k) for n, k in found if k is not None]
    if not found:
        if strict:
            raise ValueError("replace_avgpool(functional=True) found no global average pooling "
                             "call (F.adaptive_avg_pool2d(x, 1), x.mean((2, 3))) in the traced "
                             "model. strict=False allows this.")
        gm.rotp_replaced = []
        return gm
    node, (fmt, keepdim) = found[-1]
    shape = node.args[0].meta["tensor_meta"].shape
    if fmt == "NHWC":
        new = ROTSelectAdaptivePool2d(int(shape[-1]), flatten=True, input_fmt="NHWC",
                                      **rot_kwargs)
    else:
        new = AdaptiveROTPool2d(int(shape[1]), 1, flatten=not keepdim, **rot_kwargs)
    param = next(iter(model.parameters()), None)
    if param is not None and param.is_floating_point():
        new = new.to(device=param.device, dtype=param.dtype)
    name = "rot_pool"
    while hasattr(gm, name):
        name = "_" + name
    gm.add_submodule(name, new)
    with gm.graph.inserting_after(node):
        new_node = gm.graph.call_module(name, (node.args[0],))
    node.replace_all_uses_with(new_node)
    gm.graph.erase_node(node)
    gm.recompile()
    gm.rotp_replaced = [name]
    return gm
