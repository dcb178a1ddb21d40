"""How the CPU path splits a batch into chunks of whole sets (for :mod:`.chunked`).

Sets are independent given the shared (T,) weights, so a batch can be solved a few sets at a
time. A chunk holds about :func:`chunk_bytes_for` bytes of x: small enough that the solver's x-sized
temporaries (about ten) stay in the core's L2/L3 instead of DRAM, and that they cost chunk-sized
memory instead of x-sized; large enough that the per-op overhead of eager torch (a few µs per
op, ~40 ops per set-iteration) stays small against the arithmetic.

A chunk is a contiguous run of whole sets: for a dense batch a slice of sets; for a ragged batch
whose rows are grouped by set a slice of rows; for an unsorted ``index`` the rows of those sets
in their order (gathered per chunk: memory chunk-sized, no sorted copy of x). A set larger than a
chunk is a chunk of its own. Chunk boundaries come from the set sizes, read on the host: the
chunked path runs only on the CPU, outside torch.compile, where that costs nothing.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .layouts import Padded, Segments

# The solvers' chunk-sized buffers in use at once (their backward's peak: measured on W1, S 6,
# B-E 11, B-Q 12) times the chunk size: about 6 MiB, L3-resident, and at W1 (10 MB of x) the
# peak memory stays under 3× x (bench/results/cpu_2026-11-28_chunked.md).
WORKING_SET_BYTES = 6 << 20
CHUNK_BYTES: Optional[int] = None    # fixed x bytes per chunk (tests), else from the solver


def chunk_bytes_for(solver) -> int:
    """x bytes per chunk for ``solver`` (which names its buffer count ``chunk_buffers``)."""
    return CHUNK_BYTES or WORKING_SET_BYTES // solver.chunk_buffers


class SetChunk:
    """Sets ``sets`` (a slice) of a batch, their rows ``rows`` (a slice, or an int64 index
    tensor for an unsorted ``index``) and the layout ``L`` of the chunk's own tensors."""

    def __init__(self, sets: slice, rows, L):
        self.sets, self.rows, self.L = sets, rows, L

    def gather_rows(self, t: Tensor) -> Tensor:
        """The chunk's rows of a per-row tensor (x, log q0) of the whole batch."""
        return t[self.rows] if isinstance(self.rows, slice) else t.index_select(0, self.rows)

    def scatter_rows(self, dst: Tensor, src: Tensor) -> None:
        """dst[chunk rows] = src (src: the chunk's rows, as :meth:`gather_rows` gives them)."""
        if isinstance(self.rows, slice):
            if dst[self.rows].data_ptr() != src.data_ptr():
                dst[self.rows] = src
        else:
            dst.index_copy_(0, self.rows, src)


def dense_chunks(x: Tensor, chunk_bytes: int) -> list:
    """Chunks of a dense batch x (B, N, D): slices of sets (sizes from the shape)."""
    B, N, D = x.shape
    per_set = max(1, N * D * x.element_size())
    k = max(1, chunk_bytes // per_set)
    return [SetChunk(slice(b, min(b + k, B)), slice(b, min(b + k, B)), Padded(None))
            for b in range(0, B, k)]


def segment_chunks(x: Tensor, index: Tensor, lengths: Tensor, chunk_bytes: int) -> list:
    """Chunks of a ragged batch x (N_total, D) with set ids ``index`` and set sizes ``lengths``.

    Chunks holding only empty sets are left out (their output is 0 and nothing flows back)."""
    row_bytes = max(1, x.shape[1] * x.element_size())
    rows_per_chunk = max(1, chunk_bytes // row_bytes)
    ends = torch.cumsum(lengths, 0)
    starts = ends - lengths
    # a set joins the chunk its first row falls in: every chunk starts at a set boundary
    key = torch.div(starts, rows_per_chunk, rounding_mode="floor")
    _, counts = torch.unique_consecutive(key, return_counts=True)
    first_set = [0] + torch.cumsum(counts, 0).tolist()
    row_at = [0] + ends.tolist()
    grouped = bool((index[1:] >= index[:-1]).all()) if index.numel() > 1 else True
    order = None if grouped else torch.argsort(index, stable=True)
    chunks = []
    for s0, s1 in zip(first_set[:-1], first_set[1:]):
        r0, r1 = row_at[s0], row_at[s1]
        if r0 == r1:
            continue
        rows = slice(r0, r1) if grouped else order[r0:r1]
        idx = (index[r0:r1] if grouped else index.index_select(0, rows)) - s0
        chunks.append(SetChunk(slice(s0, s1), rows, Segments(idx, s1 - s0, lengths[s0:s1])))
    return chunks
