"""The chunked CPU path (ops/rot/torch/chunked.py) equals the unchunked one: forward and every
gradient (x, priors, per-iteration weights), float64 to 1e-10, with chunks forced tiny on small
shapes - dense, ragged grouped by set (ptr), unsorted index, empty sets (leading, inner,
trailing), a set larger than a chunk - and the forward without autograd."""
import pytest
import torch

import rotp_triton as rt
from rotp_triton.ops.rot.torch import chunks, unpadded

from harness import rel_err

METHODS = ("sinkhorn", "badmm-e", "badmm-q")
T = 3

RAGGED = {
    "grouped": ([3, 0, 5, 1, 4], False),
    "empty-ends": ([0, 2, 6, 0, 3, 0], False),
    "unsorted": ([3, 0, 5, 1, 4], True),
    "one": ([7], True),
}


def _weights(seed):
    g = torch.Generator().manual_seed(seed)
    return {k: (lo + (hi - lo) * torch.rand(T, generator=g, dtype=torch.float64))
            .requires_grad_() for k, lo, hi in
            (("a1", 0.8, 1.6), ("a2", 0.5, 2.0), ("a3", 0.5, 2.0), ("rho", 0.8, 1.6))}


def _run(monkeypatch, chunk_bytes, method, x, kw, leaves, w, grad=True, T=T):
    """(y, grads of a random projection of y w.r.t. leaves) with the given chunk size
    (None: the unchunked path)."""
    monkeypatch.setattr(unpadded, "CHUNKED", chunk_bytes is not None)
    monkeypatch.setattr(chunks, "CHUNK_BYTES", chunk_bytes)
    with torch.set_grad_enabled(grad):
        y = rt.rot_pool(x, method=method, num_iters=T, backend="torch", **kw, **w)
    if not grad:
        return y, []
    proj = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    return y, torch.autograd.grad((y * proj).sum(), leaves)


def _compare(monkeypatch, method, x, kw, leaves, w, chunk_bytes, T=T):
    y0, g0 = _run(monkeypatch, None, method, x, kw, leaves, w, T=T)
    y1, g1 = _run(monkeypatch, chunk_bytes, method, x, kw, leaves, w, T=T)
    assert type(y1.grad_fn).__name__ == "ChunkedRotPoolBackward"      # the path under test
    assert type(y0.grad_fn).__name__ != "ChunkedRotPoolBackward"
    assert rel_err(y1, y0) <= 1e-10
    for i, (a, b) in enumerate(zip(g1, g0)):
        assert torch.isfinite(a).all(), i
        err = rel_err(a, b) if b.norm() > 1e-12 else float((a - b).abs().max())
        assert err <= 1e-10, f"grad {i}: {err}"
    yn, _ = _run(monkeypatch, chunk_bytes, method, x, kw, leaves, w, grad=False, T=T)
    assert rel_err(yn, y0) <= 1e-10


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sets_per_chunk", [1, 2, 4], ids=lambda k: f"{k}sets")
def test_dense_chunked_equals_unchunked(monkeypatch, method, sets_per_chunk):
    g = torch.Generator().manual_seed(0)
    B, N, D = 5, 7, 6
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64).requires_grad_()
    p0 = (0.5 + torch.rand(B, D, generator=g, dtype=torch.float64)).requires_grad_()
    q0 = (0.5 + torch.rand(B, N, generator=g, dtype=torch.float64)).requires_grad_()
    w = _weights(2)
    _compare(monkeypatch, method, x, dict(p0=p0, q0=q0), [x, p0, q0, *w.values()], w,
             sets_per_chunk * N * D * 8)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("T_", [1, 2, 5], ids=lambda t: f"T{t}")
def test_dense_chunked_equals_unchunked_other_T_and_infinite_weights(monkeypatch, method, T_):
    # T < 3: no snapshot in the B-ADMM backward, T = 5: snapshot at 2; α2 = α3 = inf (κ = 1)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, 5, generator=g, dtype=torch.float64).requires_grad_()
    w = {k: (0.7 + torch.rand(T_, generator=g, dtype=torch.float64)).requires_grad_()
         for k in ("a1", "rho")}
    w.update(a2=float("inf"), a3=float("inf"))
    leaves = [x, w["a1"], w["rho"]]
    _compare(monkeypatch, method, x, {}, leaves, w, 6 * 5 * 8, T=T_)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", list(RAGGED))
@pytest.mark.parametrize("rows_per_chunk", [1, 4], ids=lambda k: f"{k}rows")
def test_ragged_chunked_equals_unchunked(monkeypatch, method, layout, rows_per_chunk):
    sizes, shuffle = RAGGED[layout]
    g = torch.Generator().manual_seed(3)
    D, n = 5, sum(sizes)
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    if shuffle:
        index = index[torch.randperm(n, generator=g)]
    x = torch.randn(n, D, generator=g, dtype=torch.float64).requires_grad_()
    p0 = (0.5 + torch.rand(len(sizes), D, generator=g, dtype=torch.float64)).requires_grad_()
    q0 = (0.5 + torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_()
    w = _weights(4)
    kw = dict(index=index, dim_size=len(sizes), p0=p0, q0=q0)
    if not shuffle:
        kw = dict(ptr=torch.cat([torch.zeros(1, dtype=torch.long),
                                 torch.tensor(sizes).cumsum(0)]), p0=p0, q0=q0)
    _compare(monkeypatch, method, x, kw, [x, p0, q0, *w.values()], w, rows_per_chunk * D * 8)


def test_chunks_are_runs_of_whole_sets():
    x = torch.zeros(13, 2)
    lengths = torch.tensor([0, 6, 1, 0, 2, 4, 0])
    index = torch.repeat_interleave(torch.arange(7), lengths)
    cs = chunks.segment_chunks(x, index, lengths, chunk_bytes=3 * 2 * 4)   # 3 rows a chunk
    # the 6-row set is one chunk; empty sets ride along; the trailing empty set is left out
    assert [(c.sets.start, c.sets.stop) for c in cs] == [(0, 2), (2, 5), (5, 6)]
    assert [(c.rows.start, c.rows.stop) for c in cs] == [(0, 6), (6, 9), (9, 13)]
    assert [c.L.B for c in cs] == [2, 3, 1]


@pytest.mark.parametrize("method", METHODS)
def test_backward_twice_with_retained_graph(monkeypatch, method):
    # gradcheck and create_graph-free double calls run the backward of one graph again
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 2 * 4 * 3 * 8)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 4, 3, generator=g, dtype=torch.float64).requires_grad_()
    y = rt.rot_pool(x, method=method, num_iters=T, backend="torch")
    assert type(y.grad_fn).__name__ == "ChunkedRotPoolBackward"
    (g1,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    (g2,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g1, g2)


def test_no_chunks_under_a_dispatch_mode():
    # fake tensors have no values to read on the host; op recorders (bench/kernel_report.py's
    # eager model) want the op stream of the device-independent path
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    x = torch.randn(3, 5, 4, requires_grad=True)
    with Passthrough():
        y = rt.rot_pool(x, method="badmm-e", backend="torch")
    assert type(y.grad_fn).__name__ != "ChunkedRotPoolBackward"
    assert type(rt.rot_pool(x, method="badmm-e", backend="torch").grad_fn).__name__ \
        == "ChunkedRotPoolBackward"
