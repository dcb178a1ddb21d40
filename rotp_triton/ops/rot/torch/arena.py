"""A pool of x-sized scratch tensors reused across the iterations of one forward or backward.

On the CPU a fresh large tensor is a fresh mmap: the first write to each page faults, and that
costs more than the arithmetic of an elementwise pass (measured on W1: ~8 ms for an
out-of-place op on 10 MB, ~0.5 ms in place). The unrolled solvers therefore write into buffers
taken from an :class:`Arena` and hand them back when they die. Only for code that runs without
autograd (the :class:`.unrolled.UnrolledRot` forward, its replays and the adjoints).
"""
from __future__ import annotations

from torch import Tensor
import torch


class Arena:
    def __init__(self, like: Tensor, max_free: int = 16):
        self.like = like
        # Buffers are only made when none is free, so the arena's footprint (in use + free)
        # never exceeds the most buffers in use at once, whatever max_free: a generous bound
        # costs no peak memory and spares re-allocating (page faults) between iterations.
        self.max_free = max_free
        self.free: list = []

    def take(self) -> Tensor:
        return self.free.pop() if self.free else torch.empty_like(self.like)

    def give(self, *ts) -> None:
        """Return buffers (x-sized, owned by the caller, never aliased by live data)."""
        for t in ts:
            if (t is not None and len(self.free) < self.max_free and t.shape == self.like.shape and t.dtype == self.like.dtype
                    and t.is_contiguous() and not any(t is f for f in self.free)):
                self.free.append(t)
