"""Input checking and the dense <-> ragged conversions shared by every pooling layer.

A batch of sets arrives either dense, ``x: (B, N, D)`` (every set has N samples), or ragged,
``x: (N_total, D)`` with ``index`` (the set of each row, any order) and/or ``ptr`` (CSR offsets,
rows already grouped by set), as in ``torch_geometric.nn.aggr``. The torch path works on a padded
view ``(B, N_max, D)`` with a boolean ``mask``; :class:`SetBatch` holds that view and knows how to
put per-row results (the plan P) back into the caller's layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

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


def check_finite(t: Tensor, name: str) -> None:
    """Raise ValueError if ``t`` holds NaN or +-inf (skipped while torch.compile traces)."""
    if _is_compiling() or t.numel() == 0:
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """State and accumulation dtype: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_weight(value, name: str, T: int, *, device, dtype, allow_inf: bool = False,
              allow_zero: bool = True) -> Tensor:
    """A solver weight as a ``(T,)`` tensor (one entry per unrolled module).

    ``value`` is a Python number, a 0-d / 1-element tensor (shared by all modules) or a tensor of
    shape ``(T,)``. Tensors keep their autograd graph. ``allow_inf`` admits ``+inf`` (a hard
    marginal); ``allow_zero`` admits 0. Negative and NaN values are rejected.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if isinstance(value, Tensor):
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a real tensor, got dtype {value.dtype}")
        if value.dim() > 1 or value.numel() not in (1, T):
            raise ValueError(f"{name} must be a scalar or a tensor of shape ({T},) (one entry per "
                             f"iteration), got shape {tuple(value.shape)}")
        w = value.reshape(-1).to(device=device, dtype=dtype)
        if w.numel() == 1 and T != 1:
            w = w.expand(T)
        check_vals = w.detach()
    else:
        w = torch.full((T,), float(value), device=device, dtype=dtype)
        check_vals = w
    if not _is_compiling():
        if bool(torch.isnan(check_vals).any()):
            raise ValueError(f"{name} must not be NaN")
        if bool((check_vals < 0).any()):
            raise ValueError(f"{name} must be non-negative, got {check_vals.tolist()}")
        if not allow_zero and bool((check_vals == 0).any()):
            raise ValueError(f"{name} must be positive, got {check_vals.tolist()}")
        if not allow_inf and bool(torch.isinf(check_vals).any()):
            raise ValueError(f"{name} must be finite, got {check_vals.tolist()}")
    return w


# --------------------------------------------------------------------------------------------
# ragged batches
# --------------------------------------------------------------------------------------------
def check_index_ptr(n_rows: int, index: Optional[Tensor], ptr: Optional[Tensor],
                    dim_size: Optional[int], device) -> tuple:
    """Validate index/ptr/dim_size for ``n_rows`` rows; returns ``(index, ptr_or_None, B)``.

    ``index`` is always returned (built from ``ptr`` if needed); ``ptr`` only when rows are grouped
    by set (given, or ``index`` sorted).
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
        if not _is_compiling():
            if int(ptr[0]) != 0 or int(ptr[-1]) != n_rows:
                raise ValueError(f"ptr must start at 0 and end at x.size(0) = {n_rows}, "
                                 f"got ptr[0] = {int(ptr[0])}, ptr[-1] = {int(ptr[-1])}")
            if B > 0 and bool((ptr[1:] < ptr[:-1]).any()):
                raise ValueError("ptr must be non-decreasing")
        counts = ptr[1:] - ptr[:-1]
        index_from_ptr = torch.repeat_interleave(torch.arange(B, device=device), counts,
                                                 output_size=n_rows)
        if index is not None:
            _check_index(index, n_rows, B)
            if not _is_compiling() and not torch.equal(index.to(device=device, dtype=torch.int64),
                                                       index_from_ptr):
                raise ValueError("index and ptr disagree: ptr says rows ptr[b]:ptr[b+1] belong to set "
                                 "b, index says otherwise")
        return index_from_ptr, ptr, B
    if index is None:
        raise ValueError("a 2-D x (ragged batch) needs index or ptr; pass a 3-D (B, N, D) tensor for "
                         "a dense batch")
    _check_index(index, n_rows, None)
    index = index.to(device=device, dtype=torch.int64)
    max_idx = int(index.max()) if index.numel() > 0 else -1
    if dim_size is None:
        B = max_idx + 1
    else:
        B = dim_size
        if max_idx >= B:
            raise ValueError(f"index holds set id {max_idx} but dim_size is {B}")
    # (while torch.compile traces, the rows are taken as unsorted: reading the check's result
    # would break the graph; the cost is one gather of x)
    sorted_ = (not _is_compiling()
               and (index.numel() < 2 or bool((index[1:] >= index[:-1]).all())))
    if sorted_:
        counts = torch.bincount(index, minlength=B)
        ptr = torch.zeros(B + 1, dtype=torch.int64, device=device)
        ptr[1:] = torch.cumsum(counts, 0)
        return index, ptr, B
    return index, None, B


def _check_index(index, n_rows: int, B: Optional[int]) -> None:
    check_tensor(index, "index", ndim=(1,), floating=False)
    if index.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"index must be an integer tensor, got dtype {index.dtype}")
    if index.numel() != n_rows:
        raise ValueError(f"index must have one entry per row of x ({n_rows}), got {index.numel()}")
    if index.numel() and not _is_compiling():
        if int(index.min()) < 0:
            raise ValueError("index must be non-negative")
        if B is not None and int(index.max()) >= B:
            raise ValueError(f"index holds set id {int(index.max())} but ptr describes {B} sets")


@dataclass
class SetBatch:
    """A batch of sets: the bookkeeping to pad it and to map results back to the caller's layout.

    Attributes:
        x: ``(B, N_max, D)`` padded samples (padding rows are zero); ``None`` when built with
            ``pad=False`` (the kernels read the caller's tensor directly).
        lengths: ``(B,)`` int64 number of samples per set.
        index, pos: for ragged input, ``(N_total,)`` set id and position inside the set of every
            row of the caller's ``x`` (``None`` for dense input).
        ptr: ``(B + 1,)`` CSR offsets when the caller's rows are grouped by set, else ``None``.
        dense_n: N of a dense batch (``None`` for ragged input).
    """
    x: Optional[Tensor]
    lengths: Tensor
    index: Optional[Tensor] = None
    pos: Optional[Tensor] = None
    ptr: Optional[Tensor] = None
    dense_n: Optional[int] = None
    _mask: Optional[Tensor] = None

    @property
    def dense(self) -> bool:
        return self.index is None

    @property
    def num_sets(self) -> int:
        return self.lengths.shape[0]

    @property
    def mask(self) -> Tensor:
        """``(B, N_max)`` bool, True for real samples (set b fills positions 0..len_b - 1).

        Built on first use: N_max is read from the data, which the kernels never need."""
        if self._mask is None:
            if self.dense:
                n_max = self.dense_n
            else:
                n_max = int(self.lengths.max()) if self.num_sets > 0 else 0
            ar = torch.arange(n_max, device=self.lengths.device)
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
    (``pad=False``: only the bookkeeping, no copy of ``x``)."""
    check_tensor(x, name, ndim=(2, 3))
    if x.dim() == 3:
        if index is not None or ptr is not None:
            raise ValueError(f"index/ptr are only used with a 2-D (N_total, D) {name}; got a 3-D "
                             f"dense batch of shape {tuple(x.shape)}")
        if dim_size is not None and dim_size != x.shape[0]:
            raise ValueError(f"dim_size ({dim_size}) disagrees with the dense batch size {x.shape[0]}")
        B, N, _ = x.shape
        lengths = torch.full((B,), N, dtype=torch.int64, device=x.device)
        return SetBatch(x=x, lengths=lengths, dense_n=N)
    n_rows = x.shape[0]
    index, ptr, B = check_index_ptr(n_rows, index, ptr, dim_size, x.device)
    if ptr is not None:
        lengths = ptr[1:] - ptr[:-1]
        pos = torch.arange(n_rows, device=x.device) - ptr[index]
    else:
        lengths = torch.bincount(index, minlength=B)
        order = torch.argsort(index, stable=True)
        starts = torch.zeros(B + 1, dtype=torch.int64, device=x.device)
        starts[1:] = torch.cumsum(lengths, 0)
        pos_sorted = torch.arange(n_rows, device=x.device) - starts[index[order]]
        pos = torch.empty_like(pos_sorted)
        pos[order] = pos_sorted
    batch = SetBatch(x=None, lengths=lengths, index=index, pos=pos, ptr=ptr)
    if pad:
        B, n_max = batch.mask.shape
        batch.x = x.new_zeros(B, n_max, x.shape[1]).index_put((index, pos), x)
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
    B, N = batch.mask.shape
    dev = batch.mask.device
    if p0 is not None and log_p0 is not None:
        raise ValueError("give p0 or log_p0, not both")
    if q0 is not None and log_q0 is not None:
        raise ValueError("give q0 or log_q0, not both")
    if p0 is None and log_p0 is None:
        lp0 = torch.full((B, D), -math.log(max(D, 1)), device=dev, dtype=dtype)
    else:
        name = "p0" if p0 is not None else "log_p0"
        t = p0 if p0 is not None else log_p0
        check_tensor(t, name, ndim=(1, 2))
        if t.shape[-1] != D or (t.dim() == 2 and t.shape[0] != B):
            raise ValueError(f"{name} must have shape ({B}, {D}) or ({D},), got {tuple(t.shape)}")
        if p0 is not None:
            _check_positive(p0, "p0")
            t = torch.log(p0.to(dtype))
        else:
            check_finite(log_p0, "log_p0")
            t = log_p0.to(dtype)
        t = t.expand(B, D)
        lp0 = t - torch.logsumexp(t, dim=-1, keepdim=True)
    if q0 is None and log_q0 is None:
        lq0 = (-torch.log(batch.lengths.clamp_min(1).to(dtype)))[:, None].expand(B, N)  # a view
    else:
        name = "q0" if q0 is not None else "log_q0"
        t = q0 if q0 is not None else log_q0
        check_tensor(t, name, ndim=(1, 2))
        want = (B, N) if batch.dense else (batch.index.numel(),)
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want} (like x[..., 0]), got {tuple(t.shape)}")
        if q0 is not None:
            _check_positive(q0, "q0")
            t = torch.log(q0.to(dtype))
        else:
            check_finite(log_q0, "log_q0")
            t = log_q0.to(dtype)
        lq = batch.pad_rows(t, fill=0.0).masked_fill(~batch.mask, float("-inf"))
        lse = torch.logsumexp(lq, dim=1, keepdim=True)
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # empty sets
        lq0 = (lq - lse).masked_fill(~batch.mask, 0.0)
    return lp0, lq0


def _check_positive(t: Tensor, name: str) -> None:
    if _is_compiling() or t.numel() == 0:
        return
    td = t.detach()
    if not bool(torch.isfinite(td).all()):
        raise ValueError(f"{name} contains non-finite values")
    if bool((td <= 0).any()):
        raise ValueError(f"{name} must be strictly positive (a probability vector per set)")
