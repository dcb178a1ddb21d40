"""What the torch solvers of ``unrolled.py`` and their hand-written adjoints (``adjoint.py``)
share: the rows of their (4, T) weight stack and the per-set vector operations."""
from __future__ import annotations

from torch import Tensor
import torch

from ..params import kappa  # noqa: F401  (the one torch definition of κ, re-exported)

# rows of the (4, T) stack [α1, α2, α3, ρ] the unrolled solvers take (α0 = τ = 0 there)
A1, A2, A3, RHO = range(4)


def lognorm_feat(v: Tensor) -> Tensor:
    """log-softmax over features of a per-set vector (last dimension in both layouts)."""
    return v - torch.logsumexp(v, dim=-1, keepdim=True)
