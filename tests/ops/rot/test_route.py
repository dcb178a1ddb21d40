"""The router and the host front end (ops/rot/route.py): which path runs, and what a call
costs outside the kernels (value checks and the weight table: test_params.py).

The op counts use a ``TorchDispatchMode`` under TRITON_INTERPRET=1 with value checks off, i.e.
the CUDA default (value checks are off for CUDA tensors; on CPU the test switches them off).
Budget (issues 11, 12, PERF.md "Host front end"): no host synchronisation per
forward+backward, the launchers included; outside the launchers, with number weights at most 4
aten ops per forward and 13 per forward+backward, dense and ptr (views included; the counts of
this tree: through the custom operator, before common.eager_function, 5-6 and 15-17); with
(T,) tensor weights the table is one ``stack`` (number rows come from a cached constant table)
and a call at most 16 / 40 ops. Ops inside a family's entry point and its launchers are
tagged, so a failure shows where they come from. The layers' counts:
tests/test_frontend_ops.py.
"""
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rotp_triton as rt
from harness import (DEVICE, KERNEL_DTYPES, ON_CUDA, assert_close, check_against_reference,
                     dtype_id)
from rotp_triton.ops.rot import route

SYNC_OPS = ("aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal")
ENTRY = {"sinkhorn": ("sinkhorn", "sinkhorn_pool"), "badmm-e": ("badmm", "badmm_pool"),
         "badmm-q": ("badmm", "badmm_pool")}


class OpLog(TorchDispatchMode):
    """Every aten op dispatched, tagged with whether it ran inside a kernel family's entry and
    inside its launchers (the host code that a custom operator hides from this mode, visible
    where the recorded forward takes the autograd.Function: common.eager_function)."""

    def __init__(self):
        super().__init__()
        self.ops, self.in_family, self.in_launcher = [], 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((str(func), self.in_family > 0, self.in_launcher > 0))
        return func(*args, **(kwargs or {}))

    def count(self, *, family=None):
        """Ops outside the launchers (the front end), those of the family's entry (True) or
        not (False) only if given."""
        return sum(1 for _, f, launcher in self.ops
                   if not launcher and (family is None or f == family))

    def syncs(self):
        """Host synchronisations anywhere, the launchers included."""
        return [name for name, *_ in self.ops if name.startswith(SYNC_OPS)]


def _tag(monkeypatch, mod, name, log, attr):
    real = getattr(mod, name)

    def wrapped(*a, **k):
        setattr(log, attr, getattr(log, attr) + 1)
        try:
            return real(*a, **k)
        finally:
            setattr(log, attr, getattr(log, attr) - 1)
    monkeypatch.setattr(mod, name, wrapped)


def _watch_entry(monkeypatch, log, method, bwd_log=None):
    """Tag the ops of the family's entry point and of its forward launcher in ``log``, those
    of its backward launcher in ``bwd_log``."""
    family, entry = ENTRY[method]
    mod = importlib.import_module(f"rotp_triton.ops.rot.triton.{family}.op")
    _tag(monkeypatch, mod, entry, log, "in_family")
    _tag(monkeypatch, mod, f"{family}_forward", log, "in_launcher")
    _tag(monkeypatch, mod, f"{family}_backward", bwd_log or OpLog(), "in_launcher")


def _inputs(layout):
    g = torch.Generator().manual_seed(0)
    if layout == "dense":
        return torch.randn(3, 5, 4, generator=g).to(DEVICE).requires_grad_(), {}
    x = torch.randn(9, 4, generator=g).to(DEVICE).requires_grad_()
    return x, dict(ptr=torch.tensor([0, 2, 2, 9], device=DEVICE))


@pytest.mark.parametrize("layout", ["dense", "ptr"])
@pytest.mark.parametrize("method", ["sinkhorn", "badmm-e", "badmm-q"])
def test_triton_path_front_end_has_no_sync_and_few_ops(monkeypatch, method, layout):
    x, kw = _inputs(layout)
    with rt.set_value_checks(False):
        rt.rot_pool(x, method=method, backend="triton", **kw).sum().backward()  # warm up
        fwd, bwd = OpLog(), OpLog()
        _watch_entry(monkeypatch, fwd, method, bwd)
        with fwd:
            y = rt.rot_pool(x, method=method, backend="triton", **kw)
        gy = torch.randn_like(y)
        with bwd:
            y.backward(gy)
    assert fwd.syncs() == [] and bwd.syncs() == []
    assert fwd.count() <= 4, fwd.ops
    assert fwd.count() + bwd.count() <= 13, (fwd.ops, bwd.ops)


@pytest.mark.parametrize("layout", ["dense", "ptr"])
@pytest.mark.parametrize("method", ["sinkhorn", "badmm-e"])
def test_tensor_weights_cost_one_stack(monkeypatch, method, layout):
    """Learnable (T,) weights (W1's call): the table is one stack of their rows and rows of a
    cached constant table for the number weights - no op per number weight."""
    x, kw = _inputs(layout)
    w = {k: torch.full((4,), 1.0, device=DEVICE, requires_grad=True) for k in ("a1", "a2", "a3")}
    with rt.set_value_checks(False):
        rt.rot_pool(x, method=method, backend="triton", **kw, **w).sum().backward()  # warm up
        fwd, bwd = OpLog(), OpLog()
        _watch_entry(monkeypatch, fwd, method, bwd)
        with fwd:
            y = rt.rot_pool(x, method=method, backend="triton", **kw, **w)
        with bwd:
            y.backward(torch.randn_like(y))
    outside = [name for name, inside, _ in fwd.ops if not inside]
    assert outside.count("aten.stack.default") == 1, outside
    assert not any(name.startswith(("aten.full", "aten.scalar_tensor")) for name in outside)
    assert fwd.syncs() == [] and bwd.syncs() == []
    assert fwd.count() <= 16, fwd.ops
    assert fwd.count() + bwd.count() <= 40, (fwd.ops, bwd.ops)
    assert all(v.grad is not None for v in w.values())


@pytest.mark.parametrize("method", ["sinkhorn", "badmm-e"])
def test_unsorted_index_with_dim_size_has_no_sync(method):
    """An unsorted index adds its sort and gather, still without reading a value on the host
    (dim_size given: the number of sets is not read from the data)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 4, generator=g).to(DEVICE).requires_grad_()
    index = torch.tensor([2, 0, 0, 2, 1, 2, 0], device=DEVICE)
    with rt.set_value_checks(False):
        log = OpLog()
        with log:
            y, plan = rt.rot_pool(x, index, dim_size=4, method=method, backend="triton",
                                  return_plan=True)
            (y.sum() + plan.sum()).backward()
    assert log.syncs() == []
    # the same result as the torch path, the plan in the caller's row order, set 3 empty -> 0
    y2, plan2 = rt.rot_pool(x.detach().double(), index, dim_size=4, method=method,
                            backend="torch", return_plan=True)
    assert_close(y, y2.float(), name="y")
    assert_close(plan, plan2.float(), name="plan")


def test_window_path_has_no_sync():
    x = torch.randn(2, 3, 4, 4, device=DEVICE, requires_grad=True)
    layer = rt.ROTPool2d(3, 2, num_iters=2, backend="triton").to(DEVICE)
    with rt.set_value_checks(False):
        log = OpLog()
        with log:
            layer(x).sum().backward()
    assert log.syncs() == []


# --------------------------------------------------------------------------------------------
# routing
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(ON_CUDA, reason="CPU routing")
def test_routing_on_cpu():
    x = torch.randn(2, 3, 4)
    assert not route.use_kernels(x, "auto")            # CPU tensors: the torch path
    assert route.use_kernels(x, "triton")              # the interpreter (conftest sets it)
    assert not route.use_kernels(x, "torch")
    with pytest.raises(ValueError, match="float64"):
        route.use_kernels(x.double(), "triton")
    with pytest.raises(ValueError, match="a0 = 0"):
        route.use_kernels(x, "triton", structure=True, window_tile=4)
    assert not route.use_kernels(x, "auto", window_tile=route.MAX_WINDOW_TILE * 2)


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("layer", ["rotpool-dense", "rotpool-ptr", "rotpool2d"])
def test_cuda_graph_capture_of_forward_and_backward(layer):
    """No host sync and no pageable copy on the hot path: a module's forward+backward can be
    captured in a CUDA graph and replayed with new data."""
    if layer == "rotpool2d":
        m = rt.ROTPool2d(8, 2, num_iters=2).cuda()
        x = torch.randn(2, 8, 6, 6, device="cuda", requires_grad=True)
        kw = {}
    else:
        m = rt.ROTPool(8, num_iters=2).cuda()
        dense = layer == "rotpool-dense"
        x = torch.randn(*((3, 5, 8) if dense else (9, 8)), device="cuda", requires_grad=True)
        kw = {} if dense else dict(ptr=torch.tensor([0, 2, 2, 9], device="cuda"))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up: compile kernels, fill caches
            m(x, **kw).sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(g):
        y = m(x, **kw)
        y.sum().backward()
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    xe = x.detach().clone().requires_grad_()
    ye = m(xe, **kw)
    ye.sum().backward()
    assert_close(y, ye, name="y")
    assert_close(x.grad, xe.grad, name="dx")


# --------------------------------------------------------------------------------------------
# end to end through the router: every family's entry point against the oracle
# --------------------------------------------------------------------------------------------
SIZES = [3, 0, 5, 1]  # a ragged batch with an empty set and a single-sample set


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["dense", "ptr", "index"])
@pytest.mark.parametrize("method,a0", [("sinkhorn", 0.0), ("badmm-e", 0.0), ("badmm-q", 0.0),
                                       ("badmm-e", 0.5)], ids=["S", "BE", "BQ", "BE-a0"])
def test_triton_route_matches_reference(method, a0, layout, dtype):
    """rot_pool(backend="triton") through route.py: y and the plan (caller's row order) and the
    gradients of x, the weights and the prior logits, against reference/rot.py in float64."""
    from reference.rot import rot_pool_sets
    T, D = 2, 3
    sizes = [4, 4, 4] if layout == "dense" else SIZES
    g = torch.Generator().manual_seed(3)
    n = sum(sizes)
    order = torch.randperm(n, generator=g) if layout == "index" else torch.arange(n)
    set_of_row = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    inputs = dict(x=torch.randn(n, D, generator=g, dtype=torch.float64),
                  a1=0.6 + torch.rand(T, generator=g, dtype=torch.float64),
                  rho=0.8 + torch.rand(T, generator=g, dtype=torch.float64),
                  lp0=torch.randn(len(sizes), D, generator=g, dtype=torch.float64),
                  lq0=torch.randn(n, generator=g, dtype=torch.float64))

    def kernel(x, a1, rho, lp0, lq0):
        kw = dict(method=method, num_iters=T, inner_iters=2, a0=a0, a1=a1, rho=rho,
                  log_p0=lp0, backend="triton", return_plan=True)
        if layout == "dense":
            y, plan = rt.rot_pool(x.view(len(sizes), -1, D), log_q0=lq0.view(len(sizes), -1),
                                  **kw)
            return y, plan.reshape(n, D)
        if layout == "ptr":
            ptr = torch.tensor([0] + sizes, device=x.device).cumsum(0)
            return rt.rot_pool(x, ptr=ptr, log_q0=lq0, **kw)
        idx = set_of_row[order].to(x.device)  # rows shuffled: an unsorted index
        inv = torch.argsort(order).to(x.device)
        y, plan = rt.rot_pool(x[order.to(x.device)], idx, dim_size=len(sizes),
                              log_q0=lq0[order.to(x.device)], **kw)
        return y, plan[inv]

    def reference(x, a1, rho, lp0, lq0):
        xs = list(torch.split(x, sizes))
        p0s = [torch.softmax(p, 0) for p in lp0]
        q0s = [torch.softmax(q, 0) if q.numel() else None for q in torch.split(lq0, sizes)]
        y, plans = rot_pool_sets(xs, p0s=p0s, q0s=q0s, method=method, variant="exact",
                                 num_iters=T, inner_iters=2, a0=torch.full((T,), a0).double(),
                                 a1=a1, a2=torch.ones(T).double(), a3=torch.ones(T).double(),
                                 rho=rho, tau=torch.ones(T).double())
        return y, torch.cat(plans)

    check_against_reference(kernel, reference, inputs, dtype=dtype)


def _spy_recorded_paths(monkeypatch):
    """Count calls of every family's recorded forward (custom operator or autograd.Function):
    what a forward goes through when it builds an autograd graph."""
    from rotp_triton.ops.rot.triton.badmm import op as badmm_op
    from rotp_triton.ops.rot.triton.sinkhorn import op as sinkhorn_op
    from rotp_triton.ops.rot.triton.structure import op as structure_op
    from rotp_triton.ops.rot.triton.window import op as window_op
    calls = []

    def spy(fn, name):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapped
    for mod, op_name, functions in (
            (sinkhorn_op, "sinkhorn_fwd_op", ("SinkhornFunction", "SpreadSinkhornFunction")),
            (badmm_op, "badmm_fwd_op", ("BadmmFunction", "SpreadBadmmFunction")),
            (window_op, "window_fwd_op", ("WindowPoolFunction", "SpreadWindowPoolFunction")),
            (structure_op, "structure_fwd_op", ("StructureROTFunction",))):
        if getattr(mod, op_name) is not None:
            monkeypatch.setattr(mod, op_name, spy(getattr(mod, op_name), op_name))
        for f in functions:
            cls = getattr(mod, f)
            monkeypatch.setattr(cls, "apply", staticmethod(spy(cls.apply, f)))
    return calls


@pytest.mark.parametrize("case", ["rot_pool-sinkhorn", "rot_pool-ptr-badmm-e",
                                  "AdaptiveROTPool2d-badmm-q", "ROTPool2d-sinkhorn",
                                  "ROTPool2d-badmm-e-unscaled"])
def test_forward_without_a_graph_calls_the_launchers_directly(monkeypatch, case):
    """A forward that records no autograd graph (torch.no_grad, or no input requiring grad)
    skips the custom operator / autograd.Function and calls the family's launcher itself
    (common.direct_launch: their dispatch is ~100 µs of host time per call) and returns
    exactly what the recorded forward returns; with an input requiring grad it records."""
    gen = torch.Generator().manual_seed(5)
    kw = dict(backend="triton", num_iters=2)
    if case.startswith("rot_pool"):
        method = case.split("-")[-1] if case.count("-") == 1 else "badmm-e"
        x = torch.randn(9, 4, generator=gen).to(DEVICE)
        extra = dict(ptr=torch.tensor([0, 2, 2, 9], device=DEVICE)) if "ptr" in case else {}
        if not extra:
            x = x[:8].view(2, 4, 4)

        def run(inp):
            return rt.rot_pool(inp, method=method, **extra, **kw)
    else:
        method = "-".join(case.split("-")[1:3]) if "badmm" in case else "sinkhorn"
        x = torch.randn(2, 4, 4, 4, generator=gen).to(DEVICE)
        scale = dict(scale=None) if case.endswith("unscaled") else {}
        m = (rt.AdaptiveROTPool2d(4, method=method, **kw, **scale) if "Adaptive" in case else
             rt.ROTPool2d(4, 2, method=method, **kw, **scale)).to(DEVICE)
        run = m
    calls = _spy_recorded_paths(monkeypatch)
    xg = x.clone().requires_grad_()
    recorded = run(xg)
    assert len(calls) == 1, calls                                # the graph path, once
    calls.clear()
    with torch.no_grad():
        y_no_grad = run(xg)
    if case.startswith("rot_pool"):                              # no input requires grad
        y_plain = run(x)
    else:
        y_plain = y_no_grad
    assert calls == [], calls
    assert torch.equal(y_no_grad, recorded.detach()) and torch.equal(y_plain, y_no_grad)


@pytest.mark.parametrize("layer,method,ragged,plan,a0", [
    ("rot_pool", "sinkhorn", False, False, 0.0), ("rot_pool", "badmm-q", True, True, 0.0),
    ("ROTPool2d", "badmm-e", False, False, 0.0), ("rot_pool", "badmm-e", True, False, 0.3)],
    ids=["rot_pool-sinkhorn", "rot_pool-ptr-badmm-q-plan", "ROTPool2d-badmm-e-unscaled",
         "rot_pool-ptr-badmm-e-a0"])
def test_recorded_forward_takes_the_function_in_eager_mode(monkeypatch, layer, method, ragged,
                                                           plan, a0):
    """In eager mode a forward that records a graph goes through its family's
    autograd.Function, not the custom operator (common.eager_function: ~25 % less host time
    per fwd+bwd, bench/results/host_overhead_eager_function.md), with exactly the operator's
    outputs and gradients (the same launchers), second derivatives included (both recompute
    the torch path: tests/test_double_backward.py). torch.compile traces the operator
    (test_compile_export.py, test_fullgraph_cpu.py)."""
    from rotp_triton.ops.rot.triton import common
    gen = torch.Generator().manual_seed(11)
    kw = dict(backend="triton", num_iters=2)
    if layer == "ROTPool2d":
        m = rt.ROTPool2d(4, 2, method=method, scale=None, **kw).to(DEVICE)
        x = torch.randn(2, 4, 4, 4, generator=gen).to(DEVICE)

        def run(inp):
            return m(inp), None
    else:
        x = torch.randn(9, 4, generator=gen).to(DEVICE)
        extra = dict(ptr=torch.tensor([0, 2, 2, 9], device=DEVICE)) if ragged else {}
        if not ragged:
            x = x[:8].view(2, 4, 4)
        if a0:
            extra["a0"] = a0

        def run(inp):
            out = rt.rot_pool(inp, method=method, return_plan=plan, **extra, **kw)
            return out if plan else (out, None)
    outs = []
    for eager_fn in (False, True):
        monkeypatch.setattr(common, "EAGER_FUNCTION", eager_fn)
        calls = _spy_recorded_paths(monkeypatch)
        xg = x.clone().requires_grad_()
        y, p = run(xg)
        assert len(calls) == 1 and calls[0].endswith("Function") == eager_fn, calls
        loss = (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)).sum()
        if p is not None:
            loss = loss + (p * p).sum()
        (g,) = torch.autograd.grad(loss, xg, create_graph=True)
        (h,) = torch.autograd.grad(g.square().sum(), xg)
        outs.append((y.detach(), None if p is None else p.detach(), g.detach(), h))
        monkeypatch.undo()
    for a, b in zip(*outs):
        assert (a is None and b is None) or torch.equal(a, b)
