"""``GSPool``: Generalized Sum Pooling as an ``nn.Module`` (DESIGN §6, §9)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from rotp_triton._fx import traced_as_module
from rotp_triton.nn.aggregation import SetAggregation, native_layout, pool_sets
from rotp_triton.ops.gsp import _check_int, _unit_ball, as_set_input, check_gsp_hparams, gsp_pool
from rotp_triton.ops.otk import kmeans

__all__ = ["GSPool"]


class GSPool(SetAggregation):
    r"""Generalized Sum Pooling (Gurbuz, Sener, Alatan, ICCV 2023) of each set or image.

    Each sample x_i of a set (n samples; an image is the set of its H·W pixels) is projected by
    a 1×1 convolution, h_i = W x_i. With K learnable prototypes z_k and
    :math:`\pi(v) = v / \max(1, \|v\|)` the projection onto the unit ball, a partial transport
    of mass :math:`\mu` from the samples (mass 1/n each) to the prototypes, entropy
    :math:`1/\gamma`, has the closed form

    .. math::
        c_{ki} = \|\pi(z_k) - \pi(h_i)\|,\quad s_i = \sum_k e^{-\gamma c_{ki}},\quad
        \rho_i = \frac{1/n}{1 + \alpha s_i},\quad \pi_{ki} = \alpha \rho_i e^{-\gamma c_{ki}},

    with the scalar :math:`\alpha` solving :math:`\sum_i \alpha \rho_i s_i = \mu` (per set, by
    safeguarded Newton in :math:`\log\alpha` to :math:`|\sum_{ki}\pi_{ki} - \mu| \le` ``tol``).
    :math:`\rho_i` is the mass of sample i that is not transported: samples far from every
    prototype keep theirs and are ignored. The layer returns

    .. math::
        \bar x = \sum_i \frac{1/n - \rho_i}{\mu} h_i \quad (\text{weights sum to } 1), \qquad
        a_k = \frac{1}{\mu}\sum_i \pi_{ki} \quad (\text{attribute histogram}, \sum_k a_k = 1).

    :math:`\gamma = 0`, :math:`\mu = 1` or equal :math:`s_i` give global average pooling of the
    h_i. Gradients through :math:`\alpha` are implicit (implicit-function theorem on the scalar
    equation), not unrolled: see :mod:`rotp_triton.ops.gsp`.

    Args:
        in_channels: C, the input feature size.
        out_channels: the projected feature size (default ``in_channels``).
        num_prototypes: K. mass: :math:`\mu \in (0, 1]`. gamma: :math:`\gamma \ge 0`.
        num_iters: at most this many Newton/bisection steps for :math:`\alpha` (a handful are
            used in practice; in a model exported by torch.export all of them run, as no host
            check can stop the loop there: ~20 suffice). Under torch.compile the check is a
            graph break, so ``fullgraph=True`` does not capture this layer.
        tol: solve tolerance on the transported mass (default 1e-12 in float64, 1e-6 otherwise).

    Shapes:
        forward(x, index=None, ptr=None, dim_size=None): x ``(N_total, C)`` ragged with
        ``index``/``ptr``, ``(B, N, C)`` dense (optionally with ``mask`` ``(B, N)``), or images
        ``(B, C, H, W)`` -> ``(B, out_channels)``; with ``return_histogram=True`` also
        ``(B, num_prototypes)``. Empty sets give zeros.
    """

    def __init__(self, in_channels: int, out_channels: Optional[int] = None,
                 num_prototypes: int = 64, mass: float = 0.3, gamma: float = 5.0,
                 num_iters: int = 100, *, tol: Optional[float] = None):
        super().__init__()
        self.in_channels = _check_int(in_channels, "in_channels", 1)
        self.out_channels = in_channels if out_channels is None else \
            _check_int(out_channels, "out_channels", 1)
        self.num_prototypes = _check_int(num_prototypes, "num_prototypes", 1)
        self.mass, self.gamma, self.num_iters, self.tol = check_gsp_hparams(mass, gamma, num_iters,
                                                                            tol)
        # the 1x1 convolution, stored as a Linear weight (out_channels, in_channels)
        self.weight = nn.Parameter(torch.empty(self.out_channels, self.in_channels))
        self.prototypes = nn.Parameter(torch.empty(self.num_prototypes, self.out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Glorot-uniform for both, as the official code: the projected features and the
        # prototypes then have norms of order 1, where the unit-ball projection is informative.
        nn.init.xavier_uniform_(self.weight)
        nn.init.xavier_uniform_(self.prototypes)

    def _check_features(self, x) -> None:
        if isinstance(x, Tensor) and x.dim() in (2, 3, 4):
            c = x.shape[1] if x.dim() == 4 else x.shape[-1]
            if c != self.in_channels:
                where = "x.shape[1] (channels)" if x.dim() == 4 else "x.shape[-1]"
                raise ValueError(f"x has {c} features ({where}) but GSPool expects in_channels = "
                                 f"{self.in_channels}")

    @traced_as_module
    def forward(self, x: Tensor, index: Optional[Tensor] = None, ptr: Optional[Tensor] = None,
                dim_size: Optional[int] = None, dim: int = -2, *, mask: Optional[Tensor] = None,
                return_histogram: bool = False, return_plan: bool = False):
        """Pool each set (or image) of the batch.

        Args:
            x: ``(N_total, C)`` ragged, ``(B, N, C)`` dense, or ``(B, C, H, W)`` images.
            index: ``(N_total,)`` set id per row. ptr: ``(B + 1,)`` CSR offsets.
            dim_size: number of sets B. mask: ``(B, N)`` bool for a dense x.
            dim: the rows axis (PyG's convention; other layouts, e.g. a 2-D x without index =
                one set, or leading batch axes, are mapped by
                :func:`~rotp_triton.nn.aggregation.pool_sets`, pooled output only).
            return_histogram: also return the attribute histogram ``(B, num_prototypes)``.
            return_plan: return a :class:`~rotp_triton.ops.gsp.GSPOutput` (pooled, histogram,
                plan, rho, alpha).
        Returns:
            ``(B, out_channels)``, or ``(pooled, histogram)``, or a ``GSPOutput``.
        """
        self._check_features(x)
        kw = dict(weight=self.weight, mass=self.mass, gamma=self.gamma, num_iters=self.num_iters,
                  tol=self.tol)
        if native_layout(x, index, ptr, dim, images=True):
            return gsp_pool(x, self.prototypes, index, ptr, dim_size, **kw, mask=mask,
                            return_histogram=return_histogram, return_plan=return_plan)
        if return_histogram or return_plan:
            raise ValueError("return_histogram/return_plan need x (N_total, C) with index/ptr, "
                             "(B, N, C) or (B, C, H, W)")
        return pool_sets(lambda *a: (gsp_pool(*a[:1], self.prototypes, *a[1:], **kw), None),
                         x, index, ptr, dim_size, dim, mask)

    @torch.no_grad()
    def init_kmeans(self, x: Tensor, index: Optional[Tensor] = None, ptr: Optional[Tensor] = None,
                    dim_size: Optional[int] = None, *, mask: Optional[Tensor] = None,
                    num_iters: int = 20, generator: Optional[torch.Generator] = None) -> "GSPool":
        """Initialise the prototypes by k-means (k = num_prototypes) on the projected samples.

        The samples of all sets are projected (1x1 convolution, then onto the unit ball, where
        the costs are measured) and clustered together. Inputs as in :meth:`forward`. Returns
        ``self``.
        """
        self._check_features(x)
        _, batch = as_set_input(x, index, ptr, dim_size, mask)
        points = batch.x[batch.mask].to(self.weight.dtype)
        if points.shape[0] < self.num_prototypes:
            raise ValueError(f"x holds {points.shape[0]} samples; k-means needs at least "
                             f"num_prototypes = {self.num_prototypes}")
        points = _unit_ball(points @ self.weight.T)
        C = kmeans(points, self.num_prototypes, num_iters=num_iters, generator=generator)
        self.prototypes.copy_(C)
        return self

    def __repr__(self) -> str:
        tol = "" if self.tol is None else f", tol={self.tol}"
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"num_prototypes={self.num_prototypes}, mass={self.mass}, gamma={self.gamma}, "
                f"num_iters={self.num_iters}{tol})")
