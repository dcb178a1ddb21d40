"""Hierarchical ROT pooling (DESIGN §5): mixed pooling (eq. 13) and set fusion (eq. 14)."""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from .._fx import traced_as_module
from .aggregation import SetAggregation
from .rot_pool import ROTPool


class MixedPlan(NamedTuple):
    """Plans of :class:`MixedROTPool`: one per head (in x's layout) and the final layer's
    ``(B, M, D)`` plan over the M head outputs."""
    heads: List[Tensor]
    final: Tensor


class FusionPlan(NamedTuple):
    """Plans of :class:`SetFusionROTPool`: the inner one (x's row layout) and the outer one
    (one row per member)."""
    inner: Tensor
    outer: Tensor


class MixedROTPool(SetAggregation):
    r"""Mixed ROT pooling, eq. (13) of Xu & Cheng:

    .. math::
        f(X) = f_{rot}\big([f_{rot}(X;\theta_1), \dots, f_{rot}(X;\theta_M)];\ \theta_{M+1}\big)

    M heads pool every set independently (each head has its own weights and may use its own
    method); their M pooled D-vectors form a D×M matrix - a set of M samples - pooled by a final
    ROT layer.

    Args:
        dim: D.
        methods: one method per head (``"sinkhorn"``, ``"badmm-e"``, ``"badmm-q"``); M = len.
        final_method: method of the final layer over the M heads.
        **rot_kwargs: every other :class:`ROTPool` argument, shared by heads and final layer.

    Shapes: forward(x, index=None, ptr=None, dim_size=None, dim=-2, *, mask=None,
    return_plan=False): like :class:`ROTPool` -> (B, D); with ``return_plan`` also a
    :class:`MixedPlan`.
    """

    def __init__(self, dim: int, methods: Sequence[str] = ("sinkhorn", "badmm-e", "badmm-q"),
                 final_method: str = "badmm-e", **rot_kwargs):
        super().__init__()
        if isinstance(methods, str) or len(methods) < 1:
            raise ValueError(f"methods must be a non-empty sequence of method names, got {methods!r}")
        self.dim = dim
        self.heads = nn.ModuleList(ROTPool(dim, method=m, **rot_kwargs) for m in methods)
        self.final = ROTPool(dim, method=final_method, **rot_kwargs)

    def reset_parameters(self) -> None:
        for m in list(self.heads) + [self.final]:
            m.reset_parameters()

    @traced_as_module
    def forward(self, x: Tensor, index: Optional[Tensor] = None, ptr: Optional[Tensor] = None,
                dim_size: Optional[int] = None, dim: int = -2, *, mask: Optional[Tensor] = None,
                return_plan: bool = False):
        outs = [h(x, index, ptr, dim_size, dim, mask=mask, return_plan=return_plan)
                for h in self.heads]
        ys = [o[0] for o in outs] if return_plan else outs
        heads = torch.stack(ys, dim=-2)                                  # [..., B, M, D]
        if not return_plan:
            return self.final(heads)
        y, final_plan = self.final(heads, return_plan=True)
        return y, MixedPlan([o[1] for o in outs], final_plan)

    def __repr__(self) -> str:
        methods = tuple(h.method for h in self.heads)
        return (f"{self.__class__.__name__}({self.dim}, methods={methods}, "
                f"final_method={self.final.method!r})")



class SetFusionROTPool(nn.Module):
    r"""Set fusion by ROT pooling, eq. (14) of Xu & Cheng:

    .. math::
        f(\{X_m\}_{m=1}^M) = f_{rot}\big(\Vert_{m=1}^M\, g(f_{rot}(X_m;\theta_1));\ \theta_2\big)

    For a set of sets (e.g. a drug combination, each drug a molecular graph): an inner ROT layer,
    shared by all member sets, pools each member X_m to a vector; an optional module ``g``
    (e.g. an MLP) maps it; an outer ROT layer pools the members of each group.

    Args:
        dim: D, the feature size of the rows.
        g: optional module applied to each member's pooled vector (``(M, D) -> (M, out_dim)``).
        out_dim: the output size of ``g`` (required with ``g``; default ``dim``).
        inner_kwargs, outer_kwargs: extra :class:`ROTPool` arguments for each level;
        **rot_kwargs: arguments shared by both levels.

    Shapes: forward(x, index=None, ptr=None, dim_size=None, *, group_index=None, group_ptr=None,
    num_groups=None, return_plan=False): x (N_total, D) rows, ``index``/``ptr`` assign rows to members (M of them),
    ``group_index`` (M,) / ``group_ptr`` assign members to groups -> (num_groups, out_dim).
    A dense x (G, M, N, D) (G groups of M members of N rows) needs no indices; its ``mask``
    (G, M, N) marks the real rows of a padded batch (a member without rows is left out of its
    group's outer pooling), equal to the ragged result. With ``return_plan`` also a
    :class:`FusionPlan`.
    """

    def __init__(self, dim: int, g: Optional[nn.Module] = None, out_dim: Optional[int] = None,
                 inner_kwargs: Optional[dict] = None, outer_kwargs: Optional[dict] = None,
                 **rot_kwargs):
        super().__init__()
        if g is not None and out_dim is None:
            raise ValueError("out_dim (the output size of g) is required when g is given")
        self.dim = dim
        self.out_dim = out_dim if out_dim is not None else dim
        self.inner = ROTPool(dim, **{**rot_kwargs, **(inner_kwargs or {})})
        self.g = g
        self.outer = ROTPool(self.out_dim, **{**rot_kwargs, **(outer_kwargs or {})})

    def reset_parameters(self) -> None:
        self.inner.reset_parameters()
        self.outer.reset_parameters()
        if self.g is not None and hasattr(self.g, "reset_parameters"):
            self.g.reset_parameters()

    @traced_as_module
    def forward(self, x: Tensor, index: Optional[Tensor] = None, ptr: Optional[Tensor] = None,
                dim_size: Optional[int] = None, *, group_index: Optional[Tensor] = None,
                group_ptr: Optional[Tensor] = None, num_groups: Optional[int] = None,
                mask: Optional[Tensor] = None, return_plan: bool = False):
        if x.dim() == 4:
            if any(v is not None for v in (index, ptr, group_index, group_ptr)):
                raise ValueError("a dense 4-D x (G, M, N, D) takes no index/ptr/group_index/"
                                 "group_ptr")
            G, M, N, D = x.shape
            if mask is not None and (not isinstance(mask, Tensor)
                                     or tuple(mask.shape) != (G, M, N)):
                raise ValueError(f"mask must be a (G, M, N) = {(G, M, N)} bool tensor for x of "
                                 f"shape {tuple(x.shape)}")
            inner_mask = None if mask is None else mask.reshape(G * M, N)
            members = self.inner(x.reshape(G * M, N, D), mask=inner_mask,
                                 return_plan=return_plan)                # [G*M, D]
            inner_plan = None
            if return_plan:
                members, inner_plan = members
                inner_plan = inner_plan.reshape(x.shape)
            if self.g is not None:
                members = self.g(members)
            outer_mask = None if mask is None else mask.any(-1)            # [G, M]
            out = self.outer(members.reshape(G, M, -1), mask=outer_mask,
                             return_plan=return_plan)
            return (out[0], FusionPlan(inner_plan, out[1])) if return_plan else out
        if mask is not None:
            raise ValueError("mask is for a dense (G, M, N, D) x; a ragged x takes index/ptr")
        if x.dim() != 2:
            raise ValueError(f"x must be (N_total, D) with index/ptr, or dense (G, M, N, D); got "
                             f"shape {tuple(x.shape)}")
        if group_index is None and group_ptr is None:
            raise ValueError("a ragged x needs group_index or group_ptr (member -> group)")
        members = self.inner(x, index, ptr, dim_size, return_plan=return_plan)  # [M, D]
        inner_plan = None
        if return_plan:
            members, inner_plan = members
        if isinstance(group_index, Tensor) and group_index.numel() != members.shape[0]:
            raise ValueError(f"group_index must have one entry per member set "
                             f"({members.shape[0]}), got {group_index.numel()}")
        if self.g is not None:
            members = self.g(members)
        out = self.outer(members, group_index, group_ptr, num_groups, return_plan=return_plan)
        return (out[0], FusionPlan(inner_plan, out[1])) if return_plan else out

    def __repr__(self) -> str:
        g = "None" if self.g is None else self.g.__class__.__name__
        return (f"{self.__class__.__name__}({self.dim}, out_dim={self.out_dim}, g={g}, "
                f"inner={self.inner.method!r}, outer={self.outer.method!r})")
