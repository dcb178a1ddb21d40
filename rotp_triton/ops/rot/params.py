"""Solver options, value checks and the per-iteration weight table (DESIGN §2-3).

The six weights of ROT pooling (α0, α1, α2, α3, ρ, τ), each a float, ``inf`` or a (T,) tensor,
reach every kernel as ONE float32 table of shape (6, T) — row ``A0`` … ``TAU`` below, column t
for unrolled module t. Kernels derive every per-iteration scalar (κ, 1/ρ, 1/ε, ...) from it
on chip, so the host does no per-weight arithmetic; its gradient (6, T) flows back to the
weights through the op that built it (:func:`weight_table`: a cached constant for Python
floats, one ``stack`` for tensors).

Options are validated here ONCE, at the public boundary (``rot_pool``, the layers); routing and
kernels trust them. Checks of tensor *values* (finite x, weights in range) read the tensor on
the host, a synchronisation on a GPU: they run for CPU tensors and, for CUDA tensors, only when
switched on with :func:`set_value_checks` (README, "Value checks"). Shapes, dtypes and options
are always checked. Design: ../../../../shared/DESIGN.md §2, §9; cost: ../../../../shared/PERF.md.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor

from ..._transforms import plain_ops

METHODS = ("sinkhorn", "badmm-e", "badmm-q")
VARIANTS = ("exact", "paper")
BACKENDS = ("auto", "triton", "torch")

# rows of the (6, T) weight table
WEIGHT_NAMES = ("a0", "a1", "a2", "a3", "rho", "tau")
A0, A1, A2, A3, RHO, TAU = range(6)
NUM_WEIGHTS = 6
# per weight: (may be +inf, may be 0)
WEIGHT_RANGE = {"a0": (False, True), "a1": (False, False), "a2": (True, True),
                "a3": (True, True), "rho": (False, False), "tau": (False, True)}

Weight = Union[float, Tensor]


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------
def check_options(method: str, variant: str, num_iters: int, inner_iters: int,
                  backend: str) -> None:
    """Validate the solver options shared by ``rot_pool`` and every ROT layer."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, v in (("num_iters", num_iters), ("inner_iters", inner_iters)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def wants_structure(a0: Weight) -> bool:
    """The α0 > 0 algorithms run iff a0 is learnable (requires grad) or has a positive entry.

    Decided from the caller's ``a0``: a Python number (what the layers pass for a fixed α0) is
    static and free. A tensor without grad is read on the host (one sync); while torch.compile
    traces it counts as positive (only Sinkhorn differs between the two algorithms at α0 = 0).
    """
    if isinstance(a0, Tensor):
        if a0.requires_grad or torch.compiler.is_compiling():
            return True
        return bool((a0.detach() > 0).any())
    return float(a0) > 0


# --------------------------------------------------------------------------------------------
# value checks: on for CPU tensors, opt-in for CUDA tensors (they synchronise)
# --------------------------------------------------------------------------------------------
_VALUE_CHECKS = ["auto"]


class set_value_checks:
    """Switch the checks of tensor values (finite inputs, weights in range) on (True), off
    (False) or back to the default ("auto": on for CPU tensors, off for CUDA tensors, whose
    checks would synchronise the host with the GPU). Takes effect at once; also usable as a
    context manager, restoring the previous setting on exit::

        rotp_triton.set_value_checks(True)          # debugging a CUDA model
        with rotp_triton.set_value_checks(False):   # no value check, even on CPU
            y = rotp_triton.rot_pool(x)
    """

    def __init__(self, mode: Union[bool, str] = True):
        if mode not in (True, False, "auto"):
            raise ValueError(f"mode must be True, False or 'auto', got {mode!r}")
        self.previous = _VALUE_CHECKS[0]
        _VALUE_CHECKS[0] = mode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _VALUE_CHECKS[0] = self.previous
        return False


def value_checks_enabled(t: Tensor) -> bool:
    """Whether the values of ``t`` are checked now (never while torch.compile traces or a
    torch.func transform runs: ``_transforms.py``)."""
    if plain_ops():
        return False
    mode = _VALUE_CHECKS[0]
    return t.device.type == "cpu" if mode == "auto" else bool(mode)


def check_finite(t: Tensor, name: str) -> None:
    """ValueError if ``t`` holds NaN or ±inf — when value checks are on for ``t``."""
    if t.numel() == 0 or not value_checks_enabled(t):
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


# --------------------------------------------------------------------------------------------
# the weight table
# --------------------------------------------------------------------------------------------
def _check_float_weight(name: str, v: float) -> None:
    allow_inf, allow_zero = WEIGHT_RANGE[name]
    if math.isnan(v):
        raise ValueError(f"{name} must not be NaN")
    if v < 0:
        raise ValueError(f"{name} must be non-negative, got {v}")
    if not allow_zero and v == 0:
        raise ValueError(f"{name} must be positive, got {v}")
    if not allow_inf and math.isinf(v):
        raise ValueError(f"{name} must be finite, got {v}")


def _check_tensor_weight(name: str, v: Tensor, T: int) -> None:
    if not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must be a real tensor, got dtype {v.dtype}")
    if v.dim() > 1 or v.numel() not in (1, T):
        raise ValueError(f"{name} must be a scalar or a tensor of shape ({T},) (one entry per "
                         f"iteration), got shape {tuple(v.shape)}")


def check_weight_values(table: Tensor, names: Sequence[str] = WEIGHT_NAMES) -> None:
    """Range checks of a (6, T) table built from tensors (one host sync when all is well)."""
    t = table.detach()
    inf = torch.isinf(t)
    bad = torch.isnan(t) | (t < 0)
    for i, name in enumerate(names):
        allow_inf, allow_zero = WEIGHT_RANGE[name]
        if not allow_inf:
            bad[i] |= inf[i]
        if not allow_zero:
            bad[i] |= t[i] == 0
    if not bool(bad.any()):
        return
    i = int(bad.any(1).nonzero()[0, 0])
    for v in t[i].tolist():  # the first offending row: its message, as for a float
        _check_float_weight(names[i], v)


def weight_table(a0: Weight, a1: Weight, a2: Weight, a3: Weight, rho: Weight, tau: Weight,
                 T: int, device, dtype=torch.float32) -> Tensor:
    """The (6, T) table of per-iteration weights (rows A0 … TAU), differentiable in tensors.

    Each weight is a Python number (checked here, free) or a tensor of shape ``()``, ``(1,)``
    (shared by the T modules) or ``(T,)``. Python numbers only: a cached constant (no op per
    call). With tensors: one ``stack`` (numbers are rows of a cached constant table); their
    values are range-checked when value checks are on (:func:`value_checks_enabled`).
    """
    values = (a0, a1, a2, a3, rho, tau)
    tensors = False
    for name, v in zip(WEIGHT_NAMES, values):
        if isinstance(v, Tensor):
            _check_tensor_weight(name, v, T)
            tensors = True
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a float or a tensor, got {type(v).__name__}")
        else:
            _check_float_weight(name, float(v))
    if not tensors:
        return _constant_table(tuple(float(v) for v in values), T, torch.device(device), dtype)
    # the number rows: views of the cached constant table (no op per call; tensor slots 0)
    numbers = _constant_table(tuple(0.0 if isinstance(v, Tensor) else float(v) for v in values),
                              T, torch.device(device), dtype)
    rows = list(numbers.unbind(0))
    for i, v in enumerate(values):
        if isinstance(v, Tensor):
            # a (T,) row in the table's dtype and device as it is: every view op more is an
            # autograd node more, forward and backward (~8 µs of host time each, PERF.md)
            rows[i] = v if (v.shape == numbers.shape[1:] and v.dtype == dtype
                            and v.device == numbers.device) else \
                v.reshape(-1).to(device=device, dtype=dtype).expand(T)
    table = torch.stack(rows)
    if value_checks_enabled(table):
        check_weight_values(table)
    return table


_CONSTANT_TABLES: dict = {}


def _constant_table(values: tuple, T: int, device: torch.device, dtype) -> Tensor:
    """The table of Python-number weights, built once per (values, T, device, dtype) and reused
    (read-only everywhere): no op at all per call, and a CUDA-graph capture finds it on the
    device instead of copying it from pageable host memory. Fresh while torch.compile traces."""
    if torch.compiler.is_compiling():
        return torch.tensor([[v] * T for v in values], dtype=dtype, device=device)
    key = (values, T, str(device), dtype)
    table = _CONSTANT_TABLES.get(key)
    if table is None:
        if len(_CONSTANT_TABLES) >= 256:  # bounded: a sweep over weights must not leak memory
            _CONSTANT_TABLES.clear()
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, never inference
            table = torch.tensor([[v] * T for v in values], dtype=dtype, device=device)
        _CONSTANT_TABLES[key] = table
    return table


def weight_rows(table: Tensor) -> dict:
    """The table as a dict of (T,) rows ``a0 … tau`` (views; the torch path's arguments)."""
    return dict(zip(WEIGHT_NAMES, table.unbind(0)))


# --------------------------------------------------------------------------------------------
# κ, the one torch definition (kernels: triton/common.py ``kappa``)
# --------------------------------------------------------------------------------------------
def kappa(alpha: Tensor, w: Tensor) -> Tensor:
    """κ(α, w) = α / (α + w), with κ = 1 at α = +inf (no inf/inf, no NaN in the backward)."""
    inf = torch.isinf(alpha)
    a = torch.where(inf, torch.ones_like(alpha), alpha)
    return torch.where(inf, torch.ones_like(alpha), a / (a + w))


__all__ = ["METHODS", "VARIANTS", "BACKENDS", "WEIGHT_NAMES", "A0", "A1", "A2", "A3", "RHO",
           "TAU", "NUM_WEIGHTS", "check_options", "wants_structure", "set_value_checks",
           "value_checks_enabled", "check_finite", "check_weight_values", "weight_table",
           "weight_rows", "kappa"]
