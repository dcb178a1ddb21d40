"""Solver options and the per-iteration weight table (DESIGN §2-3).

The six weights of ROT pooling (α0, α1, α2, α3, ρ, τ), each a float, ``inf`` or a (T,) tensor,
reach every kernel as ONE float32 table of shape (6, T) — row ``A0`` … ``TAU`` below, column t
for unrolled module t. Kernels derive every per-iteration scalar (κ, 1/ρ, 1/ε, ...) from it
on chip, so the host does no per-weight arithmetic; its gradient (6, T) flows back to the
weights through the op that built it.
"""
from __future__ import annotations

METHODS = ("sinkhorn", "badmm-e", "badmm-q")
VARIANTS = ("exact", "paper")
BACKENDS = ("auto", "triton", "torch")

# rows of the (6, T) weight table
WEIGHT_NAMES = ("a0", "a1", "a2", "a3", "rho", "tau")
A0, A1, A2, A3, RHO, TAU = range(6)
NUM_WEIGHTS = 6
