"""``OTKPool``: the trainable optimal-transport embedding as an ``nn.Module`` (DESIGN §6, §9)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from rotp_triton._fx import traced_as_module
from rotp_triton.nn.aggregation import SetAggregation, native_layout, pool_sets
from rotp_triton.ops.gsp import _check_int, as_set_input
from rotp_triton.ops.otk import check_otk_hparams, kmeans, otk_pool

__all__ = ["OTKPool"]


class OTKPool(SetAggregation):
    r"""Optimal-transport embedding (Mialon et al., ICLR 2021) of each set or image.

    ``heads`` = h references of ``num_supports`` = p learnable supports each,
    :math:`W^c \in \mathbb{R}^{p\times d}`. For a set :math:`x \in \mathbb{R}^{n\times d}` (an
    image is the set of its H·W pixels) and each head c,

    .. math::
        S^c = x W^{c\top},\qquad
        P^c = \arg\max_{P 1_p = 1_n/n,\ P^\top 1_n = 1_p/p} \langle S^c, P\rangle + \varepsilon H(P),
        \qquad y^c = p\, P^{c\top} x \in \mathbb{R}^{p\times d},

    :math:`P^c` from ``num_iters`` Sinkhorn iterations (log domain by default). The output is the
    heads concatenated along features, ``(B, p, h·d)``.

    Column scaling: the plan is multiplied by p, so each support's column sums to 1 and every
    output row is a convex combination of the set's samples (the paper scales by :math:`\sqrt p`;
    multiply this output by :math:`1/\sqrt p` to get it). p = 1 or W = 0 give mean pooling.

    Args:
        dim: d, the feature size. num_supports: p. heads: h.
        eps: entropic regularisation :math:`\varepsilon > 0`. num_iters: Sinkhorn iterations.
        log_domain: log-domain potentials (stable for any eps) or scaling vectors (faster, but
            underflows when a set's scores spread over more than ~80 eps in float32).

        flatten: return ``(B, p·h·d)`` instead of ``(B, p, h·d)`` (one vector per set, as
            PyG's aggregations and ``SAGEConv(aggr=...)`` expect).

    Shapes:
        forward(x, index=None, ptr=None, dim_size=None, dim=-2): x ``(N_total, d)`` ragged with
        ``index``/``ptr``, ``(B, N, d)`` dense (optionally with ``mask`` ``(B, N)``), or images
        ``(B, d, H, W)`` -> ``(B, p, h·d)`` (``(B, p·h·d)`` with ``flatten``). Empty sets give
        zeros.
    """

    def __init__(self, dim: int, num_supports: int = 10, heads: int = 1, eps: float = 0.1,
                 num_iters: int = 10, log_domain: bool = True, flatten: bool = False):
        super().__init__()
        if not isinstance(flatten, bool):
            raise TypeError(f"flatten must be a bool, got {type(flatten).__name__}")
        self.flatten = flatten
        self.dim = _check_int(dim, "dim", 1)
        self.num_supports = _check_int(num_supports, "num_supports", 1)
        self.heads = _check_int(heads, "heads", 1)
        self.eps, self.num_iters, self.log_domain = check_otk_hparams(eps, num_iters, log_domain)
        self.weight = nn.Parameter(torch.empty(self.heads, self.num_supports, self.dim))
        self.reset_parameters()

    @property
    def out_channels(self) -> int:
        """Features per output row: h·d."""
        return self.heads * self.dim

    def reset_parameters(self) -> None:
        # U(-1/sqrt(d), 1/sqrt(d)) as the official code: supports of norm ~ 1/sqrt(3), so the
        # scores x.w of standardised inputs are O(1) and the plan starts soft for eps ~ 0.1-1.
        bound = 1.0 / math.sqrt(self.dim)
        nn.init.uniform_(self.weight, -bound, bound)

    def _check_features(self, x) -> None:
        if isinstance(x, Tensor) and x.dim() in (2, 3, 4):
            c = x.shape[1] if x.dim() == 4 else x.shape[-1]
            if c != self.dim:
                where = "x.shape[1] (channels)" if x.dim() == 4 else "x.shape[-1]"
                raise ValueError(f"x has {c} features ({where}) but OTKPool expects dim = {self.dim}")

    @traced_as_module
    def forward(self, x: Tensor, index: Optional[Tensor] = None, ptr: Optional[Tensor] = None,
                dim_size: Optional[int] = None, dim: int = -2, *, mask: Optional[Tensor] = None,
                return_plan: bool = False):
        """Embed each set (or image) of the batch.

        Args:
            x: ``(N_total, d)`` ragged, ``(B, N, d)`` dense, or ``(B, d, H, W)`` images.
            index: ``(N_total,)`` set id per row. ptr: ``(B + 1,)`` CSR offsets.
            dim_size: number of sets B. mask: ``(B, N)`` bool for a dense x.
            dim: the rows axis (PyG's convention; other layouts, e.g. a 2-D x without index =
                one set, or leading batch axes, are mapped by
                :func:`~rotp_triton.nn.aggregation.pool_sets`, embedding only).
            return_plan: also return the column-normalised plans (see
                :func:`~rotp_triton.ops.otk.otk_pool`).
        Returns:
            ``(B, num_supports, heads * dim)`` (``(B, num_supports * heads * dim)`` with
            ``flatten``) [, plans].
        """
        self._check_features(x)
        kw = dict(eps=self.eps, num_iters=self.num_iters, log_domain=self.log_domain)

        def embed(*a, mask=None, return_plan=False):
            out = otk_pool(*a[:1], self.weight, *a[1:], **kw, mask=mask, return_plan=return_plan)
            y = out[0] if return_plan else out
            y = y.flatten(1) if self.flatten else y
            return (y, out[1]) if return_plan else (y, None)

        if native_layout(x, index, ptr, dim, images=True):
            y, plan = embed(x, index, ptr, dim_size, mask=mask, return_plan=return_plan)
            return (y, plan) if return_plan else y
        if return_plan:
            raise ValueError("return_plan needs x (N_total, d) with index/ptr, (B, N, d) or "
                             "(B, d, H, W)")
        return pool_sets(embed, x, index, ptr, dim_size, dim, mask)

    @torch.no_grad()
    def init_kmeans(self, x: Tensor, index: Optional[Tensor] = None, ptr: Optional[Tensor] = None,
                    dim_size: Optional[int] = None, *, mask: Optional[Tensor] = None,
                    num_iters: int = 20, generator: Optional[torch.Generator] = None) -> "OTKPool":
        """Initialise the supports by k-means (k = num_supports) on the samples of ``x``.

        All samples of all sets are pooled together; each head runs its own k-means++ seeding,
        so heads start from different (data-driven) references. Inputs as in :meth:`forward`.
        Returns ``self``.
        """
        self._check_features(x)
        _, batch = as_set_input(x, index, ptr, dim_size, mask)
        points = batch.x[batch.mask]                               # (M, d) every real sample
        if points.shape[0] < self.num_supports:
            raise ValueError(f"x holds {points.shape[0]} samples; k-means needs at least "
                             f"num_supports = {self.num_supports}")
        for c in range(self.heads):
            C = kmeans(points, self.num_supports, num_iters=num_iters, generator=generator)
            self.weight[c].copy_(C.to(self.weight.dtype))
        return self

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.dim}, num_supports={self.num_supports}, "
                f"heads={self.heads}, eps={self.eps}, num_iters={self.num_iters}, "
                f"log_domain={self.log_domain}{', flatten=True' if self.flatten else ''})")
