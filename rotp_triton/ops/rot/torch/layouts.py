"""The two memory layouts of the torch path and the reductions the solvers need on them.

The solvers of :mod:`.unrolled` are written once against this small interface:

* :class:`Padded` - a batch ``(B, N, D)`` with an optional boolean ``mask`` ``(B, N)`` (``None``:
  every row is real, the dense case, no masking cost). Per-set vectors over features are
  ``(B, 1, D)``, per-row vectors ``(B, N, 1)``.
* :class:`Segments` - a ragged batch ``(N_total, D)`` with the set id of every row; per-set
  vectors are ``(B, D)``, per-row vectors ``(N_total, 1)``. Reductions over a set's rows are
  segment reductions (``scatter_reduce`` / ``index_add``), so memory is O(N_total × D), never
  B × N_max × D (the padding blow-up of issue #16).

"LSE over samples" (paper: per row d of P) reduces over a set's rows; "LSE over features" over
the last dimension. An empty set (segments) gets LSE 0 instead of -inf: its vectors stay finite
and its output is zeroed by the caller.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_NEG_INF = float("-inf")


def lse_last(y: Tensor, tmp: Tensor, with_shift: bool = False):
    """LSE over the last dimension through the scratch buffer ``tmp``, which is left holding
    exp(y - m) (m: the per-row max); returns the LSE, or (LSE, m) with ``with_shift``."""
    m = y.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    lse = torch.sub(y, m, out=tmp).exp_().sum(-1, keepdim=True).log_().add_(m)
    return (lse, m) if with_shift else lse


class Padded:
    row_buffer = False            # rows()/rows_out() broadcast: no scratch buffer needed

    def __init__(self, mask: Optional[Tensor]):
        self.mask = mask                                                 # [B, N] or None

    def set_vector(self, v: Tensor) -> Tensor:
        """(B, D) -> the layout's per-set vector (B, 1, D)."""
        return v.unsqueeze(1)

    def row_vector(self, v: Tensor) -> Tensor:
        """(B, N) -> the layout's per-row vector (B, N, 1)."""
        return v.unsqueeze(2)

    def rows(self, v: Tensor) -> Tensor:
        """A per-set vector broadcast against rows (a no-op: it broadcasts)."""
        return v

    def rows_out(self, v: Tensor, out: Tensor) -> Tensor:
        """Like :meth:`rows`; a layout that must materialise it writes into ``out``."""
        return v

    def zero(self, t: Tensor) -> Tensor:
        """Zero the padding rows (no-op without a mask)."""
        return t if self.mask is None else t.masked_fill(~self.mask[..., None], 0.0)

    def exp(self, log_t: Tensor) -> Tensor:
        if self.mask is None:
            return torch.exp(log_t)
        return torch.exp(log_t.masked_fill(~self.mask[..., None], _NEG_INF))

    def lse_rows(self, y: Tensor, tmp: Optional[Tensor] = None, with_shift: bool = False):
        """LSE over each set's rows: (B, N, D) -> (B, 1, D). ``tmp``: an x-sized scratch
        buffer (no mask only), left holding exp(y - rows(m)); ``with_shift`` also returns m."""
        if tmp is not None and self.mask is None:
            m = y.amax(1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            lse = torch.sub(y, m, out=tmp).exp_().sum(1, keepdim=True).log_().add_(m)
            return (lse, m) if with_shift else lse
        if self.mask is not None:
            y = y.masked_fill(~self.mask[..., None], _NEG_INF)
        return torch.logsumexp(y, dim=1, keepdim=True)

    def lse_feat(self, y: Tensor, tmp: Optional[Tensor] = None, with_shift: bool = False):
        """LSE over features: (B, N, D) -> (B, N, 1), padding 0."""
        if tmp is not None and self.mask is None:
            return lse_last(y, tmp, with_shift)
        if tmp is not None:
            return self.zero(lse_last(y, tmp))
        return self.zero(torch.logsumexp(y, dim=2, keepdim=True))

    def sum_rows(self, t: Tensor) -> Tensor:
        """Sum over each set's rows of a tensor whose padding is 0: -> (B, 1, D)."""
        return t.sum(1, keepdim=True)

    def lognorm_rows(self, v: Tensor) -> Tensor:
        """log-softmax over each set's rows of a per-row vector (B, N, 1); padding 0."""
        if self.mask is None:
            return torch.log_softmax(v, dim=1)                           # one fused op
        return self.zero(v - self.lse_rows(v))

    def pool(self, log_p: Tensor, x: Tensor) -> Tensor:
        """Eq. (5): y_d = Σ_n softmax_n(log P[:, d]) x_nd -> (B, D)."""
        if self.mask is not None:
            log_p = log_p.masked_fill(~self.mask[..., None], _NEG_INF)
        return (torch.softmax(log_p, dim=1) * x).sum(1)

    def normalized_plan(self, log_p: Tensor) -> Tensor:
        """Each set's P scaled to total mass 1 (padding 0), in this layout."""
        if self.mask is not None:
            log_p = log_p.masked_fill(~self.mask[..., None], _NEG_INF)
        return torch.exp(log_p - torch.logsumexp(log_p.flatten(1), dim=1)[:, None, None])


class Segments:
    row_buffer = True             # rows_out() materialises a per-set vector into a buffer

    def __init__(self, index: Tensor, num_sets: int, lengths: Tensor):
        self.index = index                                               # [N_total] int64
        self.B = num_sets
        # 1.0 for an empty set: added under the log of its (zero) sum so its LSE is 0, not -inf
        self.empty = (lengths == 0)

    def set_vector(self, v: Tensor) -> Tensor:
        return v                                                         # (B, D)

    def row_vector(self, v: Tensor) -> Tensor:
        return v.unsqueeze(1)                                            # (N_total, 1)

    def rows(self, v: Tensor) -> Tensor:
        return v.index_select(0, self.index)                             # [N_total, D]

    def rows_out(self, v: Tensor, out: Tensor) -> Tensor:
        return torch.index_select(v, 0, self.index, out=out)

    def zero(self, t: Tensor) -> Tensor:
        return t

    def exp(self, log_t: Tensor) -> Tensor:
        return torch.exp(log_t)

    def _segment_max(self, y: Tensor) -> Tensor:
        idx = self.index[:, None].expand_as(y)
        m = y.new_full((self.B, y.shape[1]), _NEG_INF).scatter_reduce(0, idx, y, "amax")
        # a shift only (it cancels exactly): no gradient through it; 0 for empty sets
        return torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()

    def lse_rows(self, y: Tensor, tmp: Optional[Tensor] = None, with_shift: bool = False):
        """LSE over each set's rows: (N_total, K) -> (B, K); 0 for an empty set. ``tmp``: an
        x-sized scratch buffer, left holding exp(y - rows(m)); ``with_shift`` also returns m."""
        m = self._segment_max(y)                                         # [B, K]
        if tmp is not None:
            e = torch.index_select(m, 0, self.index, out=tmp)
            e = torch.sub(y, e, out=tmp).exp_()
        else:
            e = torch.exp(y - m.index_select(0, self.index))             # [N_total, K]
        s = y.new_zeros(self.B, y.shape[1]).index_add_(0, self.index, e)
        lse = torch.log(s + self.empty[:, None].to(y.dtype)) + m
        return (lse, m) if with_shift else lse

    def lse_feat(self, y: Tensor, tmp: Optional[Tensor] = None, with_shift: bool = False):
        if tmp is not None:
            return lse_last(y, tmp, with_shift)
        return torch.logsumexp(y, dim=1, keepdim=True)                   # [N_total, 1]

    def sum_rows(self, t: Tensor) -> Tensor:
        return t.new_zeros(self.B, t.shape[1]).index_add_(0, self.index, t)

    def lognorm_rows(self, v: Tensor) -> Tensor:
        return v - self.rows(self.lse_rows(v))

    def pool(self, log_p: Tensor, x: Tensor) -> Tensor:
        w = torch.exp(log_p - self.rows(self.lse_rows(log_p)))           # [N_total, D]
        return self.sum_rows(w * x)

    def normalized_plan(self, log_p: Tensor) -> Tensor:
        per_row = torch.logsumexp(log_p, dim=1, keepdim=True)            # [N_total, 1]
        total = self.lse_rows(per_row)                                   # [B, 1]
        return torch.exp(log_p - self.rows(total))
