"""What the torch solvers of ``unrolled.py`` and their hand-written adjoints (``adjoint.py``)
share: the rows of their (4, T) weight stack and the per-set vector operations."""
from __future__ import annotations

import math

from torch import Tensor
import torch

from ..params import kappa as _kappa_tensor

# rows of the (4, T) stack [α1, α2, α3, ρ] the unrolled solvers take (α0 = τ = 0 there)
A1, A2, A3, RHO = range(4)


def lognorm_feat(v: Tensor) -> Tensor:
    """log-softmax over features of a per-set vector (last dimension in both layouts); one
    fused op (``v - logsumexp`` is ~10 small ops, paid per chunk and iteration)."""
    return torch.log_softmax(v, dim=-1)


# The chunked CPU path (chunked.py) runs the solvers with the weights as Python floats: every
# weight formula is then host arithmetic instead of a few 0-d tensor ops per set-chunk and
# iteration. Everything below takes either kind of scalar.
def kappa(alpha, w):
    """κ(α, w) = α / (α + w), 1 at α = +inf (params.kappa for tensors)."""
    if isinstance(alpha, float):
        return 1.0 if math.isinf(alpha) else alpha / (alpha + w)
    return _kappa_tensor(alpha, w)


def add_mul_(y: Tensor, t: Tensor, s) -> Tensor:
    """y += s · t in place (s: a float or a 0-d tensor)."""
    return y.add_(t, alpha=s) if isinstance(s, float) else y.addcmul_(t, s)


def add_div_(y: Tensor, t: Tensor, s) -> Tensor:
    """y += t / s in place (s: a float or a 0-d tensor)."""
    return y.add_(t, alpha=1.0 / s) if isinstance(s, float) else y.addcdiv_(t, s)


def axpy(y: Tensor, t: Tensor, s, out: Tensor) -> Tensor:
    """out = y + s · t in one pass (y broadcast against t; s: a float or a 0-d tensor)."""
    if isinstance(s, float):
        return torch.add(y, t, alpha=s, out=out)
    return torch.addcmul(y, t, s, out=out)
