"""Host front end of the Triton path: aten ops and host syncs per call (PERF.md, "Measuring on
the CPU", step 1).

    python bench/frontend_report.py [--out DIR]

Counts, with a ``TorchDispatchMode``, the aten ops a call issues OUTSIDE kernel launches, and
the host synchronisations among them (``aten::_local_scalar_dense``: ``.item()``, ``bool(t)``,
``if t.any()``, ``.tolist()``; ``aten::nonzero`` / ``masked_select`` and the like are listed as
syncs too, because their output size is data dependent). Runs on the Triton path under
``TRITON_INTERPRET=1`` with tiny shapes: the interpreter runs a kernel with numpy, but it copies
the kernel's tensor arguments with aten ops, so launches are bracketed and the ops inside them
counted separately (``in_launch``, expected > 0: it shows the bracketing works) and left out of
the host count. Writes ``bench/results/frontend_report.{md,json}``.

``count_host_ops(fn)`` is importable (branch ``layout`` asserts on the same counts).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys

if __name__ == "__main__":  # the interpreter must be on before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.utils._pytree
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# aten ops that make the host wait for the device (value read back, or data-dependent size)
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2",
            "unique_consecutive", "item", "repeat_interleave_no_output_size", "equal",
            "is_nonzero"}
# ops that never reach a GPU (views, metadata): counted but also reported separately
VIEW_OPS = {"view", "_unsafe_view", "as_strided", "expand", "t", "transpose", "permute",
            "unsqueeze", "squeeze", "select", "slice", "detach", "alias", "reshape",
            "unbind", "split", "split_with_sizes", "diagonal", "narrow", "lift_fresh",
            "view_as", "expand_as"}


def _op_name(func) -> str:
    return func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)


# allocations: no memory traffic of their own (priced as one op, no bytes)
ALLOC_OPS = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}


def op_bytes(name: str, args, kwargs, out) -> int:
    """Bytes an aten op moves, as the kernel report prices every eager op: its tensor inputs
    plus its tensor outputs (0 for views and allocations)."""
    if name in VIEW_OPS or name in ALLOC_OPS:
        return 0
    leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


class _HostOpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.in_launch = collections.Counter()
        self.custom = collections.Counter()
        self.op_bytes = []              # (name, bytes) of every host op, in issue order
        self.launch_depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _op_name(func)
        impl = _custom_op_python_impl(func)
        if impl is not None:  # a Python custom op (triton_op): count the ops inside it instead
            self.custom[name] += 1
            with self:
                return impl(*args, **(kwargs or {}))
        (self.in_launch if self.launch_depth else self.ops)[name] += 1
        out = func(*args, **(kwargs or {}))
        if not self.launch_depth:
            self.op_bytes.append((name, op_bytes(name, args, kwargs, out)))
        return out


def _custom_op_python_impl(func):
    """The Python function behind a ``torch.library.custom_op`` / ``triton_op`` (whose inner
    ops a dispatch mode would not see otherwise), or None."""
    ns = getattr(func, "namespace", "aten")
    if ns in ("aten", "prims", "_c10d_functional"):
        return None
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # pragma: no cover
        return None
    opdef = OPDEFS.get(f"{ns}::{func._schema.name.split('::')[-1]}")
    return getattr(opdef, "_init_fn", None)


@contextlib.contextmanager
def _bracket_launches(counter: _HostOpCounter):
    """Mark the time spent inside a Triton launch (interpreted or compiled) so that its aten
    ops are not counted as host ops."""
    patches = []
    try:
        from triton.runtime.jit import JITFunction
        patches.append((JITFunction, "run"))
    except Exception:  # pragma: no cover
        pass
    try:
        from triton.runtime.interpreter import InterpretedFunction
        patches.append((InterpretedFunction, "run"))
    except Exception:  # pragma: no cover
        pass
    originals = [(cls, name, cls.__dict__[name]) for cls, name in patches if name in cls.__dict__]
    for cls, name, orig in originals:
        def wrapped(self, *a, _orig=orig, **k):
            counter.launch_depth += 1
            try:
                return _orig(self, *a, **k)
            finally:
                counter.launch_depth -= 1
        setattr(cls, name, wrapped)
    try:
        yield
    finally:
        for cls, name, orig in originals:
            setattr(cls, name, orig)


def count_host_ops(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` once and return ``(ops, syncs)``: a Counter of the aten ops
    issued outside kernel launches (by overload-packet name) and the number of them that are
    host syncs (``SYNC_OPS``). The Counter's ``in_launch`` attribute holds the ops seen inside
    launches (the interpreter's argument copies), ``custom`` the Python custom ops
    (``triton_op``) whose inner ops were counted in their place, ``op_bytes`` the (name, bytes
    moved) of every host op in issue order (:func:`op_bytes`: what the kernel report prices
    them by)."""
    counter = _HostOpCounter()
    with _bracket_launches(counter), counter:
        fn(*args, **kwargs)
    ops = counter.ops
    ops.in_launch = counter.in_launch
    ops.custom = counter.custom
    ops.op_bytes = counter.op_bytes
    return ops, sum(n for k, n in ops.items() if k in SYNC_OPS)


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------
def _cases():
    """(name, make) where make() returns (forward fn, leaves for the backward)."""
    import rotp_triton as rt
    g = torch.Generator().manual_seed(0)
    x_dense = torch.randn(3, 6, 5, generator=g)
    x_rag = torch.randn(9, 5, generator=g)
    ptr = torch.tensor([0, 2, 2, 9])
    index = torch.tensor([2, 0, 2, 1, 0, 2, 2, 1, 2])
    img = torch.randn(2, 4, 4, 4, generator=g)
    cases = []
    for method in ("sinkhorn", "badmm-e", "badmm-q"):
        def weights():
            return {k: torch.full((4,), 1.0, requires_grad=True) for k in ("a1", "a2", "a3")}

        def dense(method=method):
            x, w = x_dense.clone().requires_grad_(), weights()
            return (lambda: rt.rot_pool(x, method=method, backend="triton", **w)), \
                [x, *w.values()]

        def ragged_ptr(method=method):
            x, w = x_rag.clone().requires_grad_(), weights()
            return (lambda: rt.rot_pool(x, ptr=ptr, method=method, backend="triton", **w)), \
                [x, *w.values()]

        def ragged_index(method=method):
            x, w = x_rag.clone().requires_grad_(), weights()
            return (lambda: rt.rot_pool(x, index=index, dim_size=3, method=method,
                                        backend="triton", **w)), [x, *w.values()]

        def module_set(method=method):
            m = rt.ROTPool(5, method=method, backend="triton")
            x = x_rag.clone().requires_grad_()
            return (lambda: m(x, ptr=ptr)), [x, *m.parameters()]

        def adaptive(method=method):
            m = rt.AdaptiveROTPool2d(4, method=method, backend="triton")
            x = img.clone().requires_grad_()
            return (lambda: m(x)), [x, *m.parameters()]

        def window(method=method):
            m = rt.ROTPool2d(4, 2, method=method, backend="triton")
            x = img.clone().requires_grad_()
            return (lambda: m(x)), [x, *m.parameters()]

        def structure(method=method):
            x, w = x_dense.clone().requires_grad_(), weights()
            return (lambda: rt.rot_pool(x, method=method, backend="triton", a0=0.1, **w)), \
                [x, *w.values()]

        cases += [(f"rot_pool dense {method}", dense), (f"rot_pool ptr {method}", ragged_ptr),
                  (f"rot_pool index (unsorted) {method}", ragged_index),
                  (f"ROTPool ptr {method}", module_set),
                  (f"AdaptiveROTPool2d {method}", adaptive), (f"ROTPool2d 2x2 {method}", window),
                  (f"rot_pool dense a0=0.1 {method}", structure)]
    return cases


def measure_case(make) -> dict:
    """Host ops and syncs of the forward and of forward+backward of one case."""
    fwd, leaves = make()
    fwd()  # warm-up: first-call imports and registrations are not per-call costs
    ops_f, syncs_f = count_host_ops(fwd)
    leaves = [t for t in leaves if t.requires_grad]

    def fwd_bwd():
        y = fwd()
        torch.autograd.grad(y.float().sum(), leaves, allow_unused=True)
    fwd_bwd()
    ops_fb, syncs_fb = count_host_ops(fwd_bwd)
    real = lambda c: sum(n for k, n in c.items() if k not in VIEW_OPS)  # noqa: E731
    return dict(fwd_ops=sum(ops_f.values()), fwd_non_view_ops=real(ops_f), fwd_syncs=syncs_f,
                fwd_bwd_ops=sum(ops_fb.values()), fwd_bwd_non_view_ops=real(ops_fb),
                fwd_bwd_syncs=syncs_fb, fwd_in_launch_ops=sum(ops_f.in_launch.values()),
                fwd_top_ops=dict(ops_f.most_common(12)),
                fwd_sync_ops={k: n for k, n in ops_f.items() if k in SYNC_OPS})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--only", default="", help="substring filter on case names")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("frontend_report: needs TRITON_INTERPRET=1 (set when run as a script)")
        return 2
    torch.manual_seed(0)
    import contextlib

    import rotp_triton as rt
    # Value checks (finite x, weights in range) read tensors on the host; they are off by default
    # for CUDA tensors and on for CPU ones (rt.set_value_checks). The tiny CPU tensors here stand
    # in for CUDA ones, so they are counted with the CUDA default: off.
    checks = getattr(rt, "set_value_checks", None)
    rows = []
    for name, make in _cases():
        if args.only not in name:
            continue
        try:
            with (checks(False) if checks else contextlib.nullcontext()):
                r = dict(case=name, **measure_case(make))
        except Exception as e:  # a path that is not wired (reported, not hidden)
            r = dict(case=name, error=f"{type(e).__name__}: {str(e)[:200]}")
        rows.append(r)
        print(_fmt(r), flush=True)
    os.makedirs(args.out, exist_ok=True)
    import triton
    meta = dict(torch=torch.__version__, triton=triton.__version__,
                method="TorchDispatchMode on the Triton path under TRITON_INTERPRET=1, tiny "
                       "shapes, ops inside kernel launches excluded, value checks off (the "
                       "default for CUDA tensors)")
    with open(os.path.join(args.out, "frontend_report.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(os.path.join(args.out, "frontend_report.md"), "w") as f:
        f.write(_markdown(meta, rows))
    print(f"wrote {args.out}/frontend_report.{{md,json}}")
    return 0


def _fmt(r) -> str:
    if "error" in r:
        return f"{r['case']:40} ERROR {r['error']}"
    return (f"{r['case']:40} fwd {r['fwd_ops']:4} ops ({r['fwd_non_view_ops']:4} non-view) "
            f"{r['fwd_syncs']:3} syncs | fwd+bwd {r['fwd_bwd_ops']:4} ops "
            f"({r['fwd_bwd_non_view_ops']:4}) {r['fwd_bwd_syncs']:3} syncs "
            f"| in-launch {r['fwd_in_launch_ops']}")


def _markdown(meta, rows) -> str:
    lines = ["# Host front end of the Triton path (counted on CPU, not timed)", "",
             f"torch {meta['torch']}, triton {meta['triton']}. {meta['method']}. "
             "A sync is `aten::_local_scalar_dense` (`.item()`, `bool(t)`, `if t.any()`) or an op "
             "with a data-dependent output size. Non-view ops are the ones that launch work on "
             "a GPU. Predicted front-end cost on a GPU: ~5 µs per non-view op + ~10 µs per sync "
             "(PERF.md) - a PREDICTION. The interpreter copies each kernel's tensor arguments with aten "
             "ops; those run inside launches and are excluded (their count is shown, so the "
             "bracketing is seen to work); ops inside `triton_op` custom ops are counted.", "",
             "| case | fwd ops | fwd non-view | fwd syncs | fwd+bwd ops | fwd+bwd non-view | "
             "fwd+bwd syncs | predicted fwd front end µs | fwd ops inside launches (excluded) "
             "| top fwd ops |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error']} ||||||||")
            continue
        us = 5 * r["fwd_non_view_ops"] + 10 * r["fwd_syncs"]
        top = ", ".join(f"{k} {n}" for k, n in list(r["fwd_top_ops"].items())[:6])
        lines.append(f"| {r['case']} | {r['fwd_ops']} | {r['fwd_non_view_ops']} | "
                     f"{r['fwd_syncs']} | {r['fwd_bwd_ops']} | {r['fwd_bwd_non_view_ops']} | "
                     f"{r['fwd_bwd_syncs']} | {us} | {r['fwd_in_launch_ops']} | {top} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
