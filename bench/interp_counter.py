"""Count what kernels really load, store and evaluate, under the Triton interpreter
(kernel_report.py; PERF.md "Measuring on the CPU", step 3).

``count_kernel_work()`` wraps the interpreter's builder ops: every masked-in element of a global
load or store (``tl.load`` / ``tl.store``, atomics) adds its element size to the launch's bytes,
and every element of ``exp2`` / ``exp`` / ``log2`` / ``log`` adds one transcendental (masked-off
lanes included, as on a GPU, where the whole tile is evaluated). One :class:`KernelWork` per
launch, in launch order. These are global-memory bytes: on a GPU some of them hit L2, so they
bound the HBM traffic from above. ``sites`` counts how often each source statement ran that
made builder ops (every ``create_*``: loads, stores, arithmetic, reductions, transcendentals;
consecutive ops of one statement once), keyed by its source call chain (:func:`site_key`, the
chain the sm_90 SASS line info gives each instruction: ``sass.dynamic_instructions`` weighs the
kernel's loops by these counts). Requires ``TRITON_INTERPRET=1`` before triton is imported.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import sys


@dataclasses.dataclass
class KernelWork:
    name: str
    programs: int = 0
    load_bytes: int = 0
    store_bytes: int = 0
    exp2: int = 0   # exp2 + exp element evaluations
    log2: int = 0   # log2 + log element evaluations
    sites: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    site_elems: dict = dataclasses.field(default_factory=dict)  # largest tile an op of it made

    @property
    def bytes(self) -> int:
        return self.load_bytes + self.store_bytes


def site_key(chain) -> str:
    """The key of a source call chain: (file, line) pairs, innermost first, as
    "file:line<file:line<..." (files as ``sass.source_name`` names them)."""
    from bench.sass import source_name
    return "<".join(f"{source_name(os.path.realpath(f))}:{n}" for f, n in chain)


def _call_chain(kernel, skip_dirs) -> str | None:
    """The calling op's source chain, from the innermost frame outside triton (and outside this
    file) out to the kernel function's frame; None outside a launch."""
    if kernel is None:
        return None
    name, fname = kernel
    chain = []
    f = sys._getframe(1)
    while f is not None:
        co = f.f_code
        if not co.co_filename.startswith(skip_dirs):
            chain.append((co.co_filename, f.f_lineno))
            if co.co_name == name and os.path.realpath(co.co_filename) == fname:
                return site_key(chain)
        f = f.f_back
    return None


@contextlib.contextmanager
def count_kernel_work(out: list | None = None):
    """Yield a list that receives a :class:`KernelWork` per interpreted launch."""
    import numpy as np
    from triton.runtime import interpreter as I

    from bench.sass import triton_dir
    import triton
    # frames of triton, numpy and this file are not kernel source (their paths as the frames
    # give them, and resolved, in case a symlink is in between)
    skip = tuple({triton_dir(), os.path.dirname(os.path.abspath(triton.__file__)),
                  os.path.abspath(__file__), os.path.realpath(__file__),
                  os.path.dirname(os.path.abspath(np.__file__))})

    out = [] if out is None else out
    B = I.InterpreterBuilder
    saved = {n: B.__dict__[n] for n in ("create_masked_load", "create_masked_store", "create_exp",
                                         "create_exp2", "create_log", "create_log2",
                                         "create_atomic_rmw", "create_atomic_cas",
                                         "set_grid_dim") if n in B.__dict__}
    saved_call = I.GridExecutor.__call__
    current = [None]
    kernel = [None]          # (function name, real path of its file) of the running launch

    last = [None]            # the site of the previous op: a line's several ops count once

    def site():
        k = _call_chain(kernel[0], skip)
        if k is not None and k != last[0]:
            cur().sites[k] += 1
        last[0] = k

    def cur():
        if current[0] is None:  # an op outside a launch we bracketed: still counted
            current[0] = KernelWork("?")
            out.append(current[0])
        return current[0]

    def nbytes(handle_dtype, n):
        try:
            return int(n) * np.dtype(I._get_np_dtype(handle_dtype)).itemsize
        except Exception:
            return int(n) * 4

    def masked_load(self, ptrs, mask, other, *a, **k):
        cur().load_bytes += nbytes(ptrs.get_element_ty(), np.count_nonzero(mask.data))
        return saved["create_masked_load"](self, ptrs, mask, other, *a, **k)

    def masked_store(self, ptrs, value, mask, *a, **k):
        cur().store_bytes += int(np.count_nonzero(mask.data)) * value.data.dtype.itemsize
        return saved["create_masked_store"](self, ptrs, value, mask, *a, **k)

    def transcendental(name, field):
        def f(self, arg):
            w = cur()
            setattr(w, field, getattr(w, field) + int(np.size(arg.data)))
            return saved[name](self, arg)
        return f

    def atomic(name):
        def f(self, *a, **k):
            v = saved[name](self, *a, **k)
            # create_atomic_rmw(op, ptr, val, mask, ...), create_atomic_cas(ptr, cmp, val, ...)
            if name == "create_atomic_rmw":
                ptr, mask = a[1], a[3]
                n = int(np.count_nonzero(mask.data))
            else:
                ptr = a[0]
                n = int(np.size(ptr.data))
            cur().load_bytes += nbytes(ptr.get_element_ty(), n)
            cur().store_bytes += nbytes(ptr.get_element_ty(), n)
            return v
        return f

    def grid_dim(self, nx, ny, nz):
        cur().programs = int(nx) * int(ny) * int(nz)
        return saved["set_grid_dim"](self, nx, ny, nz)

    def call(self, *args, **kwargs):
        current[0] = KernelWork(getattr(self.fn, "__name__", "?"))
        out.append(current[0])
        code = getattr(self.fn, "__code__", None)
        kernel[0] = None if code is None else (code.co_name, os.path.realpath(code.co_filename))
        last[0] = None
        try:
            return saved_call(self, *args, **kwargs)
        finally:
            current[0] = None
            kernel[0] = None

    B.create_masked_load = masked_load
    B.create_masked_store = masked_store
    for name, field in (("create_exp", "exp2"), ("create_exp2", "exp2"), ("create_log", "log2"),
                        ("create_log2", "log2")):
        if name in saved:
            setattr(B, name, transcendental(name, field))
    for name in ("create_atomic_rmw", "create_atomic_cas"):
        if name in saved:
            setattr(B, name, atomic(name))
    if "set_grid_dim" in saved:
        B.set_grid_dim = grid_dim
    # every builder op counts at its source site once (an op that calls another op of the
    # builder, e.g. create_load -> create_masked_load, counts as the outer one only)
    depth = [0]

    def counted(fn):
        def f(self, *a, **k):
            outer = depth[0] == 0
            if outer:
                site()
            depth[0] += 1
            try:
                v = fn(self, *a, **k)
            finally:
                depth[0] -= 1
            if outer and last[0] is not None:     # the largest tile among operands and result
                n = max([int(np.size(t.data)) for t in (v, *a) if hasattr(t, "data")],
                        default=1)
                w = cur().site_elems
                w[last[0]] = max(w.get(last[0], 1), n)
            return v
        return f

    for name in [n for n in dir(B) if n.startswith("create_")]:
        if name not in saved:
            saved[name] = B.__dict__.get(name, getattr(B, name))
        setattr(B, name, counted(getattr(B, name)))
    I.GridExecutor.__call__ = call
    try:
        yield out
    finally:
        for n, f in saved.items():
            setattr(B, n, f)
        I.GridExecutor.__call__ = saved_call


@contextlib.contextmanager
def interpreter_patched(methods: dict, grid_call):
    """For the block, the interpreter's builder with ``methods`` (InterpreterBuilder method
    name -> replacement) and ``grid_call`` as ``GridExecutor.__call__``; the originals after
    it. Yields the originals ({name: function}, and "__call__")."""
    from triton.runtime import interpreter as I
    B = I.InterpreterBuilder
    saved = {n: B.__dict__[n] for n in methods}
    saved["__call__"] = I.GridExecutor.__call__
    for n, f in methods.items():
        setattr(B, n, f)
    I.GridExecutor.__call__ = grid_call
    try:
        yield saved
    finally:
        for n in methods:
            setattr(B, n, saved[n])
        I.GridExecutor.__call__ = saved["__call__"]


# full-size batch of each workload (PERF.md) and the reduced batch kernel_report interprets
FULL_SETS = {"W1": 50, "W2": 256, "W3": 64, "W3a": 64, "W5": 128}
H100_SMS = 132


@contextlib.contextmanager
def same_launch_plan(full_sets: int, reduced_sets: int):
    """Make the launchers' grid heuristics choose for the reduced batch what they choose for the
    full one on an H100. They compare the number of sets with ``sm_count`` (e.g. B-ADMM splits
    a set over several programs only while B < #SMs), and the interpreter's stand-in of 4 SMs
    would send a 1-set W2 batch down the split path that its 256 sets never take. So
    ``sm_count`` answers 1 when the full batch fills the H100 (no split) and otherwise the SM
    count scaled by reduced/full sets (about the same programs per set as at full size). B-ADMM's
    ``host_bound_splits`` decides as for a CUDA device."""
    import importlib
    import pkgutil

    import torch

    import rotp_triton.ops.rot.triton as fam

    sms = 1 if full_sets >= H100_SMS else max(reduced_sets + 1,
                                              round(H100_SMS * reduced_sets / full_sets))
    patched = []
    for m in pkgutil.walk_packages(fam.__path__, fam.__name__ + "."):
        mod = importlib.import_module(m.name)
        if hasattr(mod, "sm_count"):
            patched.append((mod, "sm_count", mod.sm_count))
            mod.sm_count = lambda device, _v=sms: _v
        if hasattr(mod, "host_bound_splits"):
            # the schedule a CUDA device takes (B-ADMM: one program a set for W1-sized sets at
            # small T), not the interpreter's (CPU tensors keep the split)
            patched.append((mod, "host_bound_splits", mod.host_bound_splits))
            mod.host_bound_splits = lambda splits, *a, _f=mod.host_bound_splits: _f(
                splits, *a[:-1], torch.device("cuda"))
        if hasattr(mod, "num_warps_for"):
            # the warps (and so the tile) a CUDA tensor gets, not the interpreter's default:
            # the SASS that kernel_report weighs by these counts is that launch's
            patched.append((mod, "num_warps_for", mod.num_warps_for))
            mod.num_warps_for = lambda x, *a, _f=mod.num_warps_for: _f(
                _AsCuda(x) if hasattr(x, "is_cuda") else x, *a)
    try:
        yield sms
    finally:
        for mod, name, f in patched:
            setattr(mod, name, f)


class _AsCuda:
    """A tensor's stand-in that reports ``is_cuda`` (launchers' warp choices)."""
    is_cuda = True

    def __init__(self, x):
        self.device = x.device
