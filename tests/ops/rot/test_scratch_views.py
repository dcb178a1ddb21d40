"""The launchers' views of one allocation (ops/rot/triton/common.py): ``split_flat`` (1-D
segments by one split, each on a 128-byte line: the Sinkhorn and spread launchers) and
``fp32_scratch`` (128-byte aligned buffers, some cleared). Kernels find each buffer by its address alone, so what matters is where
each view starts, how long it is, and that it writes into the one allocation."""
import pytest
import torch

from rotp_triton.ops.rot.triton.common import flat_numel, fp32_scratch, split_flat


def test_split_flat_starts_every_segment_on_a_128_byte_line():
    buf = torch.arange(140.0)[3:]                 # a view with a storage offset: 137 elements
    sizes = [5, 0, 12, 33, 7]
    assert flat_numel(sizes) == 32 + 0 + 32 + 64 + 32    # whole lines, the last one too
    a, b, c, d, e = split_flat(buf, sizes)        # the last ends at 135: 2 left over
    assert [v.shape for v in (a, b, c, d, e)] == [(5,), (0,), (12,), (33,), (7,)]
    # offsets from the buffer's start: multiples of 32 fp32, in order, no overlap
    assert [v.storage_offset() - 3 for v in (a, c, d, e)] == [0, 32, 64, 128]
    assert torch.equal(d, torch.arange(67.0, 100.0))
    e.fill_(-1.0)                                  # a view: the write lands in the allocation
    assert torch.equal(buf[128:135], torch.full((7,), -1.0))
    (f,) = split_flat(buf[:32], [32])             # exactly the buffer: no remainder
    assert f.shape == (32,) and f.data_ptr() == buf.data_ptr()
    with pytest.raises(ValueError, match="need"):
        split_flat(buf, [100, 10])                # 128 + 10 > 137: more than the buffer holds


def test_split_flat_offsets_do_not_follow_the_sizes_modulo_a_line():
    """The Sinkhorn state's segments of two ragged batches whose row counts differ start at
    the same alignment (triton specialises pointers on it: a new one compiled the kernels
    again for each batch)."""
    B, T, D = 3, 4, 5
    for NR in (11, 12, 13, 16, 29):
        sizes = [B * (T + 1) * D, B * T * D, (T + 1) * NR, T * NR, B * D, B]
        state = torch.empty(flat_numel(sizes))
        views = split_flat(state, sizes)
        assert [v.numel() for v in views] == sizes
        assert all(v.storage_offset() % 32 == 0 for v in views), NR


def test_fp32_scratch_aligns_every_buffer_and_clears_the_zeroed_ones():
    zeroed, empty = fp32_scratch("cpu", zeroed=[5, (2, 3)], empty=[(4,), (2, 2, 2), 0, 7])
    views = [*zeroed, *empty]
    assert [tuple(v.shape) for v in views] == [(5,), (2, 3), (4,), (2, 2, 2), (0,), (7,)]
    base = views[0].storage_offset()
    # each starts on a multiple of 32 fp32 (128 bytes) from the first, one after another
    assert [v.storage_offset() - base for v in views] == [0, 32, 64, 96, 128, 128]
    assert all(v.untyped_storage().data_ptr() == views[0].untyped_storage().data_ptr()
               for v in views)
    assert all(float(v.abs().sum()) == 0.0 for v in zeroed)
    for v in views:                               # contiguous, so a kernel may index it flat
        assert v.is_contiguous()
