"""The Gromov-Wasserstein structure term Σ1 M Σ2 of DESIGN §2, batched and factorized.

Σ1 = (1/N) Xc Xcᵀ / max diag (D×D, Xc centred over samples) and Σ2 = (1/D) X̃ᵀ X̃ / max diag
(N×N, X̃ centred over features). In the code layout a set is x (N, D) and a plan M is (N, D), so
Σ1 M Σ2 (paper, D×N) is Σ2 M Σ1 here. Only the smaller of the two matrices is ever
materialized: the larger is applied as two thin products through its factor, which keeps the
cost at O(min(D, N)·D·N).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class StructureFactors:
    """Per-set factors of Σ1 (features) and Σ2 (samples) for a padded batch.

    xc:  (B, N, D) samples centred over the set's samples (padding rows 0), scaled so that
         Σ1 = xcᵀ xc (code layout: (D, D)).
    xt:  (B, N, D) samples centred over features (padding rows 0), scaled so that Σ2 = xt xtᵀ.
    """
    xc: Tensor
    xt: Tensor

    def apply(self, m: Tensor) -> Tensor:
        """Σ2 m Σ1 for m (B, N, D) (paper: Σ1 M Σ2), never forming the larger Gram matrix."""
        xc, xt = self.xc, self.xt
        N, D = m.shape[1], m.shape[2]
        if D <= N:
            s1 = xc.transpose(1, 2) @ xc                       # [B, D, D]   Σ1
            t = xt @ (xt.transpose(1, 2) @ m)                  # [B, N, D]   Σ2 m, via (D, D) middle
            return t @ s1
        s2 = xt @ xt.transpose(1, 2)                           # [B, N, N]   Σ2
        t = s2 @ m                                             # [B, N, D]
        return (t @ xc.transpose(1, 2)) @ xc                   # [B, N, D]   (Σ2 m) Σ1 via (N, N)


def structure_factors(x: Tensor, mask: Tensor) -> StructureFactors:
    """Build the factors for a padded batch x (B, N, D) with mask (B, N)."""
    m = mask.unsqueeze(-1).to(x.dtype)                          # [B, N, 1]
    n = mask.sum(1).clamp_min(1).to(x.dtype)[:, None, None]     # [B, 1, 1]
    D = x.shape[-1]
    mu1 = (x * m).sum(1, keepdim=True) / n                      # [B, 1, D] mean over samples
    xc = (x - mu1) * m
    diag1 = (xc * xc).sum(1) / n[:, 0]                          # [B, D] diag of Σ1 (unscaled)
    s1 = diag1.amax(-1).clamp_min(torch.finfo(x.dtype).tiny)     # [B] largest diagonal entry
    xc = xc / torch.sqrt(n * s1[:, None, None])
    mu2 = x.mean(-1, keepdim=True)                               # [B, N, 1] mean over features
    xt = (x - mu2) * m
    diag2 = (xt * xt).sum(-1) / D                                # [B, N] diag of Σ2 (unscaled)
    s2 = diag2.amax(-1).clamp_min(torch.finfo(x.dtype).tiny)     # [B]
    xt = xt / torch.sqrt(D * s2[:, None, None])
    return StructureFactors(xc=xc, xt=xt)
