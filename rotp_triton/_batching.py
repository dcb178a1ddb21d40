"""Input checking and the dense <-> ragged conversions shared by every pooling layer.

A batch of sets arrives either dense, ``x: (B, N, D)`` (every set has N samples), or ragged,
``x: (N_total, D)`` with ``index`` (the set of each row, any order) and/or ``ptr`` (CSR offsets,
rows already grouped by set), as in ``torch_geometric.nn.aggr``. The torch path works on a padded
view ``(B, N_max, D)`` with a boolean ``mask``; :class:`SetBatch` holds that view and knows how to
put per-row results (the plan P) back into the caller's layout. It is built lazily: the Triton
path reads the caller's tensor and ``ptr`` directly and costs no op here.

Value checks (index in range, ptr monotone, finite priors) read tensors on the host and run
only where ``ops/rot/params.py`` enables them (CPU tensors by default). Layout conventions:
../../shared/DESIGN.md §1.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .ops.rot.params import check_finite, value_checks_enabled

Number = Union[int, float]


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


# --------------------------------------------------------------------------------------------
# generic checks
# --------------------------------------------------------------------------------------------
def check_tensor(t, name: str, *, ndim: Optional[Sequence[int]] = None, floating: bool = True) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in ndim:
        want = " or ".join(str(n) for n in ndim)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """State and accumulation dtype: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# ragged batches
# --------------------------------------------------------------------------------------------
def check_index_ptr(n_rows: int, index: Optional[Tensor], ptr: Optional[Tensor],
                    dim_size: Optional[int], device) -> tuple:
    """Validate index/ptr/dim_size for ``n_rows`` rows; returns ``(index_or_None, ptr_or_None,
    B)`` with ``ptr`` int64 on ``device``.

    Shapes and dtypes are always checked; the values (ptr from 0 to n_rows and non-decreasing,
    index in [0, B), index agreeing with ptr) when value checks are on (params.py). B is read
    from ``index`` (one host sync) only when neither ``ptr`` nor ``dim_size`` gives it.
    """
    if dim_size is not None:
        if isinstance(dim_size, bool) or not isinstance(dim_size, int):
            raise TypeError(f"dim_size must be an int, got {type(dim_size).__name__}")
        if dim_size < 0:
            raise ValueError(f"dim_size must be >= 0, got {dim_size}")
    if ptr is not None:
        check_tensor(ptr, "ptr", ndim=(1,), floating=False)
        if ptr.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"ptr must be an int32/int64 tensor, got dtype {ptr.dtype}")
        if ptr.numel() < 1:
            raise ValueError("ptr must hold at least one entry (ptr[0] = 0)")
        ptr = ptr.to(device=device, dtype=torch.int64)
        B = ptr.numel() - 1
        if dim_size is not None and dim_size != B:
            raise ValueError(f"dim_size ({dim_size}) disagrees with ptr, which describes {B} sets")
        if index is not None:
            _check_index(index, n_rows, B, "ptr describes {} sets")
        if value_checks_enabled(ptr):
            if int(ptr[0]) != 0 or int(ptr[-1]) != n_rows:
                raise ValueError(f"ptr must start at 0 and end at x.size(0) = {n_rows}, "
                                 f"got ptr[0] = {int(ptr[0])}, ptr[-1] = {int(ptr[-1])}")
            if B > 0 and bool((ptr[1:] < ptr[:-1]).any()):
                raise ValueError("ptr must be non-decreasing")
            if index is not None:
                counts = ptr[1:] - ptr[:-1]
                from_ptr = torch.repeat_interleave(torch.arange(B, device=device), counts,
                                                   output_size=n_rows)
                if not torch.equal(index.to(device=device, dtype=torch.int64), from_ptr):
                    raise ValueError("index and ptr disagree: ptr says rows ptr[b]:ptr[b+1] "
                                     "belong to set b, index says otherwise")
        return None, ptr, B
    if index is None:
        raise ValueError("a 2-D x (ragged batch) needs index or ptr; pass a 3-D (B, N, D) tensor for "
                         "a dense batch")
    _check_index(index, n_rows, dim_size, "dim_size is {}")
    index = index.to(device=device, dtype=torch.int64)
    if dim_size is None:  # the number of sets is in the data: one host sync (pass dim_size)
        B = int(index.max()) + 1 if index.numel() > 0 else 0
    else:
        B = dim_size
    return index, None, B


def _check_index(index, n_rows: int, B: Optional[int], bound: str = "dim_size is {}") -> None:
    check_tensor(index, "index", ndim=(1,), floating=False)
    if index.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"index must be an integer tensor, got dtype {index.dtype}")
    if index.numel() != n_rows:
        raise ValueError(f"index must have one entry per row of x ({n_rows}), got {index.numel()}")
    if index.numel() and value_checks_enabled(index):
        if int(index.min()) < 0:
            raise ValueError("index must be non-negative")
        if B is not None and int(index.max()) >= B:
            raise ValueError(f"index holds set id {int(index.max())} but " + bound.format(B))


class SetBatch:
    """A batch of sets: the bookkeeping to pad it and to map results back to the caller's layout.

    Everything is built on first use, so that the Triton path (which reads the caller's tensor
    and ``ptr`` directly) runs no op for it.

    Attributes:
        x: ``(B, N_max, D)`` padded samples (padding rows are zero), or ``None`` (``pad=False``).
        num_sets: B. dense_n: N of a dense batch (``None`` for ragged input).
        ptr: ``(B + 1,)`` CSR offsets when the caller gave them (rows grouped by set), else None.
        lengths: ``(B,)`` int64 number of samples per set.
        index, pos: for ragged input, ``(N_total,)`` set id and position inside the set of every
            row of the caller's ``x`` (``None`` for dense input).
    """

    def __init__(self, *, num_sets: int, n_rows: int, device, dense_n: Optional[int] = None,
                 ptr: Optional[Tensor] = None, index: Optional[Tensor] = None):
        self.num_sets, self.n_rows, self.device = num_sets, n_rows, device
        self.dense_n, self.ptr = dense_n, ptr
        self.x: Optional[Tensor] = None
        self._index, self._lengths, self._pos, self._mask = index, None, None, None

    @property
    def dense(self) -> bool:
        return self.dense_n is not None

    @property
    def lengths(self) -> Tensor:
        if self._lengths is None:
            B = self.num_sets
            if self.dense:
                self._lengths = torch.full((B,), self.dense_n, dtype=torch.int64,
                                           device=self.device)
            elif self.ptr is not None:
                self._lengths = self.ptr[1:] - self.ptr[:-1]
            else:  # a scatter, not bincount: static shape, no host sync on CUDA
                self._lengths = torch.zeros(B, dtype=torch.int64, device=self.device).index_add_(
                    0, self._index, torch.ones_like(self._index))
        return self._lengths

    @property
    def index(self) -> Optional[Tensor]:
        if self._index is None and self.ptr is not None:
            # repeat_interleave of the counts alone is [0]*len_0 + [1]*len_1 + ...: one op
            self._index = torch.repeat_interleave(self.lengths, output_size=self.n_rows)
        return self._index

    @property
    def pos(self) -> Optional[Tensor]:
        if self._pos is None and not self.dense:
            index = self.index
            ar = torch.arange(self.n_rows, device=self.device)
            if self.ptr is not None:
                self._pos = ar - self.ptr[index]
            else:
                order, ptr = self.set_order()
                pos = torch.empty_like(ar)
                self._pos = pos.index_put_((order,), ar - ptr[index[order]])
        return self._pos

    def set_order(self) -> tuple:
        """``(order, ptr)`` of an unsorted ragged batch: ``x[order]`` has its rows grouped by
        set (stable), with CSR offsets ``ptr``."""
        order = torch.argsort(self._index, stable=True)
        ptr = torch.cat([self.lengths.new_zeros(1), torch.cumsum(self.lengths, 0)])
        return order, ptr

    @property
    def mask(self) -> Tensor:
        """``(B, N_max)`` bool, True for real samples (set b fills positions 0..len_b - 1).

        N_max of a ragged batch is read from the data (a host sync), except while torch.compile
        traces: then the static bound N_total is used (more padding, same results)."""
        if self._mask is None:
            if self.dense:
                n_max = self.dense_n
            elif _is_compiling():
                n_max = self.n_rows
            else:
                n_max = int(self.lengths.max()) if self.num_sets > 0 else 0
            ar = torch.arange(n_max, device=self.device)
            self._mask = ar[None, :] < self.lengths[:, None]
        return self._mask

    def pad_rows(self, v: Tensor, fill: float = 0.0) -> Tensor:
        """Per-row values in the caller's layout (``(N_total, ...)`` ragged, ``(B, N, ...)`` dense)
        -> padded ``(B, N_max, ...)``."""
        if self.dense:
            return v
        B, N = self.mask.shape
        out = v.new_full((B, N) + tuple(v.shape[1:]), fill)
        return out.index_put((self.index, self.pos), v)

    def unpad_rows(self, v: Tensor) -> Tensor:
        """Inverse of :meth:`pad_rows`: padded ``(B, N_max, ...)`` -> the caller's layout."""
        if self.dense:
            return v
        return v[self.index, self.pos]


def make_set_batch(x: Tensor, index: Optional[Tensor] = None, ptr: Optional[Tensor] = None,
                   dim_size: Optional[int] = None, *, name: str = "x", pad: bool = True) -> SetBatch:
    """Validate ``x`` (+ ``index`` / ``ptr`` / ``dim_size``) and build the padded view
    (``pad=False``: only the bookkeeping, built lazily, no op on ``x``)."""
    check_tensor(x, name, ndim=(2, 3))
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has no features (shape {tuple(x.shape)}): pooling needs at "
                         f"least one (a last dimension >= 1)")
    if x.dim() == 3:
        if index is not None or ptr is not None:
            raise ValueError(f"index/ptr are only used with a 2-D (N_total, D) {name}; got a 3-D "
                             f"dense batch of shape {tuple(x.shape)}")
        if dim_size is not None and dim_size != x.shape[0]:
            raise ValueError(f"dim_size ({dim_size}) disagrees with the dense batch size {x.shape[0]}")
        batch = SetBatch(num_sets=x.shape[0], n_rows=x.shape[0] * x.shape[1], device=x.device,
                         dense_n=x.shape[1])
        if pad:
            batch.x = x
        return batch
    n_rows = x.shape[0]
    index, ptr, B = check_index_ptr(n_rows, index, ptr, dim_size, x.device)
    batch = SetBatch(num_sets=B, n_rows=n_rows, device=x.device, ptr=ptr, index=index)
    if pad:
        B, n_max = batch.mask.shape
        batch.x = x.new_zeros(B, n_max, x.shape[1]).index_put((batch.index, batch.pos), x)
    return batch


def check_priors(p0: Optional[Tensor], q0: Optional[Tensor], batch: SetBatch, D: int,
                 dtype: torch.dtype, log_p0: Optional[Tensor] = None,
                 log_q0: Optional[Tensor] = None) -> tuple:
    """Validate and normalise the priors; returns padded ``(log_p0 (B, D), log_q0 (B, N_max))``.

    ``p0``: ``(B, D)`` per set, or ``(D,)`` shared by all sets. ``q0``: like ``x[..., 0]`` -
    ``(N_total,)`` for a ragged batch, ``(B, N)`` for a dense one. Entries must be positive and
    finite; each set's prior is normalised to sum 1. ``None`` means uniform. Alternatively the
    priors can be given as (unnormalised, finite) logits ``log_p0`` / ``log_q0`` of the same
    shapes, which avoids underflow for attention scores. Padding entries of the returned
    ``log_q0`` are 0 (they are masked wherever they are used).
    """
    check_prior_args(p0, q0, batch, D, log_p0, log_q0)
    lp0 = normalized_log_p0(p0, log_p0, batch.num_sets, D, dtype, batch.device)
    B, N = batch.mask.shape
    if q0 is None and log_q0 is None:
        lq0 = (-torch.log(batch.lengths.clamp_min(1).to(dtype)))[:, None].expand(B, N)  # a view
    else:
        lq0 = normalized_log_q0(q0, log_q0, batch, dtype, padded=True)
    return lp0, lq0


def check_prior_args(p0, q0, batch: SetBatch, D: int, log_p0=None, log_q0=None) -> None:
    """Shapes of the priors (no value is read)."""
    if p0 is not None and log_p0 is not None:
        raise ValueError("give p0 or log_p0, not both")
    if q0 is not None and log_q0 is not None:
        raise ValueError("give q0 or log_q0, not both")
    B = batch.num_sets
    if p0 is not None or log_p0 is not None:
        name = "p0" if p0 is not None else "log_p0"
        t = p0 if p0 is not None else log_p0
        check_tensor(t, name, ndim=(1, 2))
        if t.shape[-1] != D or (t.dim() == 2 and t.shape[0] != B):
            raise ValueError(f"{name} must have shape ({B}, {D}) or ({D},), got {tuple(t.shape)}")
    if q0 is not None or log_q0 is not None:
        name = "q0" if q0 is not None else "log_q0"
        t = q0 if q0 is not None else log_q0
        check_tensor(t, name, ndim=(1, 2))
        want = (B, batch.dense_n) if batch.dense else (batch.n_rows,)
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want} (like x[..., 0]), got {tuple(t.shape)}")


def normalized_log_p0(p0, log_p0, B: int, D: int, dtype, device) -> Tensor:
    """(B, D) log prior over features, each row normalised (uniform when both are None)."""
    if p0 is None and log_p0 is None:
        return torch.full((B, D), -math.log(max(D, 1)), device=device, dtype=dtype)
    t = _log_prior(p0, log_p0, "p0", dtype).expand(B, D)
    return t - torch.logsumexp(t, dim=-1, keepdim=True)


def normalized_log_q0(q0, log_q0, batch: SetBatch, dtype, *, padded: bool) -> Tensor:
    """Log prior over each set's samples, normalised per set: padded ``(B, N_max)`` (padding
    0) or in the caller's layout (``padded=False``: ``(B, N)`` dense, ``(N_total,)`` ragged)."""
    t = _log_prior(q0, log_q0, "q0", dtype)
    if batch.dense:
        return t - torch.logsumexp(t, dim=1, keepdim=True)
    lq = batch.pad_rows(t, fill=0.0).masked_fill(~batch.mask, float("-inf"))
    lse = torch.logsumexp(lq, dim=1, keepdim=True)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # empty sets
    lq0 = (lq - lse).masked_fill(~batch.mask, 0.0)
    return lq0 if padded else batch.unpad_rows(lq0)


def _log_prior(prob, logits, name: str, dtype) -> Tensor:
    """log of a prior given as probabilities (``name``) or as logits (``log_<name>``), checked
    (when value checks are on) and in ``dtype``; not yet normalised."""
    if prob is not None:
        _check_positive(prob, name)
        return torch.log(prob.to(dtype))
    check_finite(logits, f"log_{name}")
    return logits.to(dtype)


def _check_positive(t: Tensor, name: str) -> None:
    if t.numel() == 0 or not value_checks_enabled(t):
        return
    td = t.detach()
    if not bool(torch.isfinite(td).all()):
        raise ValueError(f"{name} contains non-finite values")
    if bool((td <= 0).any()):
        raise ValueError(f"{name} must be strictly positive (a probability vector per set)")
