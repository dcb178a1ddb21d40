"""The PyG side of the set layers: a base class that is ``torch_geometric.nn.aggr.Aggregation``
when PyG imports, and the mapping of PyG's calling conventions (``dim``, leading batch
dimensions, one set without ``index``) and of dense padded batches (``mask``) onto the layers'
canonical inputs, ``(N_total, D)`` with ``index``/``ptr`` or ``(B, N, D)``.

See README "PyTorch Geometric" for the recipes (tested by tests/test_readme_recipes.py).
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import Tensor, nn


def _pyg_aggregation():
    # ROTP_TRITON_NO_PYG=1 opts out (PyG's import costs ~1.5 s); any failure of a broken PyG
    # install must not break this package, hence the broad except.
    if os.environ.get("ROTP_TRITON_NO_PYG", "") not in ("", "0"):
        return None
    try:
        from torch_geometric.nn.aggr import Aggregation
    except Exception:  # noqa: BLE001
        return None
    return Aggregation


_Aggregation = _pyg_aggregation()
HAS_PYG = _Aggregation is not None


class SetAggregation(_Aggregation if HAS_PYG else nn.Module):
    """Base of the set layers (ROTPool, MixedROTPool, GSPool, OTKPool): a PyG ``Aggregation``
    when torch_geometric imports, else a plain ``nn.Module``; holds no parameter or buffer of
    its own, so state dicts and pickles are the same either way."""

    # PyG's Aggregation.__call__ turns "no index" into "one set" for every rank (a dense
    # (B, N, D) batch would become one set per b over dim -2) and reads index.max() on the host.
    # The layers' forward handles PyG's conventions itself (see pool_sets), so call it directly.
    __call__ = nn.Module.__call__

    def reset_parameters(self) -> None:  # pragma: no cover - every subclass overrides it
        pass


def _check_dim(x: Tensor, dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for x of shape {tuple(x.shape)}")
    return dim % x.dim()


def _check_mask(x: Tensor, mask, index, ptr) -> Tensor:
    if index is not None or ptr is not None:
        raise ValueError("mask is for a dense padded batch (B, N, D); it takes no index/ptr")
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if x.dim() < 3 or tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"mask must have shape x.shape[:-1] = {tuple(x.shape[:-1])} for a dense "
                         f"batch x (..., N, D), got mask {tuple(mask.shape)} and x "
                         f"{tuple(x.shape)}")
    return mask.to(x.device)


def pool_sets(pool: Callable, x: Tensor, index: Optional[Tensor], ptr: Optional[Tensor],
              dim_size: Optional[int], dim: int = -2, mask: Optional[Tensor] = None,
              return_plan: bool = False):
    """Call ``pool(x, index, ptr, dim_size) -> (y (B, *out), plan like x or None)`` on the
    canonical form of any PyG-style input and put the result back in the caller's layout.

    - ``x (N, D)`` without index/ptr: one set (PyG's convention), ``(1, *out)``.
    - ``x (..., N, D)`` (``dim`` the N axis) without index/ptr: a dense batch, ``(..., *out)``.
    - ``x (..., N, ..., D)`` with ``index``/``ptr`` along ``dim``: every position of the other
      leading axes is its own batch of sets (PyG's ``(*, N, F)``), ``(..., B, ..., *out)``.
    - ``mask (..., N)`` with a dense ``x``: the real rows only, equal to the ragged result; the
      plan is zero on padding rows.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions (rows, features), got shape "
                         f"{tuple(x.shape)}")
    d = _check_dim(x, dim)
    if d == x.dim() - 1:
        raise ValueError(f"dim={dim} is the feature axis of x {tuple(x.shape)}; it must be the "
                         f"axis of the set's rows (default -2)")
    if mask is not None:
        mask = _check_mask(x, mask, index, ptr)
        if d != x.dim() - 2:
            raise ValueError("with mask, dim must be the rows axis -2")
        lead = x.shape[:-2]
        m = mask.reshape(-1, mask.shape[-1])
        rows = x.reshape(-1, *x.shape[-2:])[m]                            # [N_real, D]
        lengths = m.sum(1)
        ptr_m = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
        y, plan = pool(rows, None, ptr_m, m.shape[0])
        y = y.reshape(*lead, *y.shape[1:])
        if not return_plan:
            return y
        full = plan.new_zeros(x.shape).reshape(-1, *x.shape[-2:])
        full = full.masked_scatter(m[..., None], plan)
        return y, full.reshape(x.shape)
    if index is None and ptr is None:
        if x.dim() == 2:  # one set (then dim_size - 1 empty ones), as torch_geometric does
            B = 1 if dim_size is None else dim_size
            if isinstance(B, bool) or not isinstance(B, int) or B < 1:
                raise ValueError(f"dim_size must be a positive int for x without index/ptr, "
                                 f"got {dim_size!r}")
            ptr1 = torch.full((B + 1,), x.shape[0], dtype=torch.long, device=x.device)
            ptr1[0] = 0
            y, plan = pool(x, None, ptr1, B)
            return (y, plan) if return_plan else y
        if dim_size is not None and x.dim() == 3 and dim_size != x.shape[0]:
            raise ValueError(f"dim_size ({dim_size}) disagrees with the dense batch size "
                             f"{x.shape[0]}")
        xm = x.movedim(d, -2)
        lead = xm.shape[:-2]
        y, plan = pool(xm.reshape(-1, *xm.shape[-2:]), None, None, None)
        y = y.reshape(*lead, *y.shape[1:])
        if not return_plan:
            return y
        return y, plan.reshape(xm.shape).movedim(-2, d)
    if x.dim() == 2:
        y, plan = pool(x, index, ptr, dim_size)
        return (y, plan) if return_plan else y
    if return_plan:
        raise ValueError("return_plan needs x (N_total, D) with index/ptr or a dense (B, N, D); "
                         f"got x of shape {tuple(x.shape)} with index/ptr")
    # leading batch axes: (N, K, D) rows -> K * B sets with index + k * B
    xm = x.movedim(d, 0)
    N, rest, D = xm.shape[0], xm.shape[1:-1], xm.shape[-1]
    K = xm[0, ..., 0].numel()
    if ptr is not None:
        ptr = ptr.to(device=x.device, dtype=torch.long)
        B = ptr.numel() - 1
        index = torch.repeat_interleave(torch.arange(B, device=x.device), ptr[1:] - ptr[:-1],
                                        output_size=N)
    else:
        index = index.to(device=x.device, dtype=torch.long)
        B = dim_size if dim_size is not None else (int(index.max()) + 1 if N else 0)
    flat = xm.reshape(N, K, D).transpose(0, 1).reshape(K * N, D)
    idx = (index[None, :] + B * torch.arange(K, device=x.device)[:, None]).reshape(-1)
    y, _ = pool(flat, idx, None, K * B)                                  # [K*B, *out]
    y = y.reshape(K, B, *y.shape[1:]).transpose(0, 1)                    # [B, K, *out]
    return y.reshape(B, *rest, *y.shape[2:]).movedim(0, d)


def native_layout(x, index, ptr, dim: int, *, images: bool) -> bool:
    """Whether ``x`` is already in a layout the functional op takes ((N_total, D) with
    index/ptr, (B, N, D), or with ``images`` a (B, C, H, W) batch), ``dim`` its rows axis."""
    if not isinstance(x, Tensor) or isinstance(dim, bool) or not isinstance(dim, int):
        return True  # let the op raise its own error
    ragged = index is not None or ptr is not None
    if x.dim() == 2:
        return ragged and dim in (0, -2)
    if x.dim() == 3:
        return not ragged and dim in (1, -2)
    # a 4-D x is an image batch for the image-capable layers (they reject index/ptr on it)
    return images and x.dim() == 4
