"""The launchers' views of one allocation (ops/rot/triton/common.py): ``split_flat`` (1-D
segments by one split, the Sinkhorn and spread launchers) and ``fp32_scratch`` (128-byte aligned
buffers, some cleared). Kernels find each buffer by its address alone, so what matters is where
each view starts, how long it is, and that it writes into the one allocation."""
import pytest
import torch

from rotp_triton.ops.rot.triton.common import flat_views, fp32_scratch, split_flat


def test_split_flat_gives_consecutive_segments_of_the_buffer():
    buf = torch.arange(40.0)[3:]                  # a view with a storage offset: 37 elements
    a, b, c, d = split_flat(buf, [5, 0, 12, 7])   # 13 elements left over
    assert [v.shape for v in (a, b, c, d)] == [(5,), (0,), (12,), (7,)]
    assert [v.storage_offset() for v in (a, c, d)] == [3, 8, 20]
    assert torch.equal(c, torch.arange(8.0, 20.0))
    d.fill_(-1.0)                                  # a view: the write lands in the allocation
    assert torch.equal(buf[17:24], torch.full((7,), -1.0))
    (e,) = split_flat(buf, [37])                  # exactly the buffer: no remainder
    assert e.shape == (37,) and e.data_ptr() == buf.data_ptr()
    with pytest.raises(RuntimeError):
        split_flat(buf, [30, 8])                  # more than the buffer holds


def test_split_flat_matches_the_row_major_views_it_replaces():
    B, T, D, NR = 3, 4, 5, 11
    state = torch.randn(B * (T + 1) * D + B * T * D + (T + 1) * NR + T * NR + B * D + B)
    shapes = [(B, T + 1, D), (B, T, D), (T + 1, NR), (T, NR), (B, D), (B,)]
    flat = split_flat(state, [B * (T + 1) * D, B * T * D, (T + 1) * NR, T * NR, B * D, B])
    for v, ref in zip(flat, flat_views(state, shapes)):
        assert v.data_ptr() == ref.data_ptr() and torch.equal(v, ref.reshape(-1))


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
