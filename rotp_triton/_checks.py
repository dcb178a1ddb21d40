"""Value checks of ``rot_pool``'s inputs that every ROT layer runs (issue #16).

One function, :func:`check_rot_values`, so that the global switch (``set_value_checks``,
``ops/rot/params.py``) gates it in one place. It reads the data (host synchronisation), so it runs only
when value checks are on for x (``rotp_triton.set_value_checks``: CPU tensors by default) and
never while torch.compile traces.

Stated limits (float32 compute; float64 limits in brackets):

* α1 and ρ must be >= ``MIN_WEIGHT`` = 1e-12 (a subnormal weight turns x/α1 into inf).
* max|x| / min(α1, ρ) <= 1e36 [1e300]: the solvers divide x by α1 (S, B-E) or ρ (B-ADMM steps),
  so beyond this the exponents overflow. When α1 or ρ requires grad, also
  max|x| / min(α1, ρ)² <= 1e36 [1e300]: d/dα1 of x/α1 is -x/α1², which would be ±inf.
  E.g. |x| up to 1e30 with fixed α1, ρ >= 1e-6, or learnable ones >= 1e-3.
Violations raise ValueError naming the argument, instead of a silent NaN.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .ops.rot.params import value_checks_enabled

MIN_WEIGHT = 1e-12
_MAX_RATIO = {torch.float32: 1e36, torch.float64: 1e300}


def check_rot_values(x: Tensor, a1: Tensor, rho: Tensor, *, name: str = "x") -> None:
    """Raise ValueError if x is non-finite or too large for the weights (module docstring).

    ``a1``, ``rho``: the (T,) weight tensors in the compute dtype.
    """
    if x.numel() == 0 or not value_checks_enabled(x):
        return
    a1, rho = torch.as_tensor(a1, dtype=x.dtype if x.is_floating_point() else None), \
        torch.as_tensor(rho, dtype=x.dtype if x.is_floating_point() else None)
    xmax = x.detach().abs().max()
    if not bool(torch.isfinite(xmax)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    for wname, w in (("a1", a1), ("rho", rho)):
        wmin = float(w.detach().min())
        if wmin < MIN_WEIGHT:
            raise ValueError(f"{wname} must be >= {MIN_WEIGHT:g} (smaller weights overflow the "
                             f"solver's x/{wname}), got {wmin:g}")
    limit = _MAX_RATIO.get(a1.dtype, 1e36)
    wmin = min(float(a1.detach().min()), float(rho.detach().min()))
    ratio = float(xmax) / wmin
    learn = a1.requires_grad or rho.requires_grad
    if ratio > limit or (learn and ratio / wmin > limit):
        power = "²" if ratio <= limit else ""
        raise ValueError(
            f"{name} has entries up to {float(xmax):.3g} while min(a1, rho) = {wmin:.3g}: "
            f"max|{name}| / min(a1, rho){power} exceeds {limit:g}, beyond which the solver"
            f"{' gradient' if power else ''} overflows {a1.dtype}; rescale {name} or raise "
            f"a1/rho")
