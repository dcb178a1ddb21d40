"""Record every Triton kernel launch of a call without running it (kernel_report.py, PERF.md).

``record_launches()`` patches ``triton.runtime.jit.JITFunction.run``, the method that
``kernel[grid](...)``, ``@triton.autotune`` / ``@triton.heuristics`` and
``torch.library.wrap_triton`` launches all end in. The patched method binds the arguments and
derives the specialisation with triton's own binder for an sm_90 backend (pointer % 16,
int % 16, int == 1, exactly as a real launch on an H100), evaluates the grid, records
:class:`Launch` and returns without executing anything: outputs stay uninitialised, which is
fine because host code must not branch on kernel results.

``h100_host()`` makes the host side of the launchers believe it runs on an H100 while the tensors
are CPU tensors: ``Tensor.is_cuda`` is True, ``torch.cuda.get_device_properties`` describes 132
SMs, and every ``sm_count`` function of ``rotp_triton`` (the one shared by the kernel families,
wherever it was imported) returns 132. Use it without TRITON_INTERPRET (the ``@triton.jit``
functions must be real JITFunctions).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
from typing import Any

import torch

H100_SMS = 132


@dataclasses.dataclass
class Launch:
    """One recorded launch: what ``triton.compile`` needs (signature, constexprs, attrs,
    options) and what the report prints (grid, argument summary)."""
    fn: Any                      # the JITFunction
    name: str
    grid: tuple                  # 3 ints
    signature: dict              # name -> "*fp32" | "i32" | "constexpr" | ...
    constexprs: dict             # path tuple -> value (triton's own form)
    attrs: dict                  # path tuple -> [["tt.divisibility", 16]] | []
    options: Any                 # the backend's parsed options (num_warps, num_stages, ...)
    args: dict                   # name -> short description

    @property
    def programs(self) -> int:
        return int(self.grid[0]) * int(self.grid[1]) * int(self.grid[2])

    @property
    def num_warps(self) -> int:
        return self.options.num_warps

    @property
    def num_stages(self) -> int:
        return self.options.num_stages

    def key(self) -> tuple:
        """Launches with equal keys compile to the same binary."""
        return (id(self.fn), repr(sorted(self.signature.items())),
                repr(sorted(self.constexprs.items(), key=repr)),
                repr(sorted(self.attrs.items(), key=repr)), self.num_warps, self.num_stages,
                getattr(self.options, "maxnreg", None))


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).replace('torch.', '')}{tuple(v.shape)}"
    return repr(v)



_BACKEND = None


def sm90_backend():
    """triton's CUDA backend for sm_90 (created once; needs no GPU)."""
    global _BACKEND
    if _BACKEND is None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        _BACKEND = make_backend(GPUTarget("cuda", 90, 32))
    return _BACKEND


def _binder(fn):
    """triton's argument binder of ``fn`` built for the sm_90 backend (cached on ``fn``)."""
    b = fn.__dict__.get("_bench_sm90_binder")
    if b is None:
        from triton.runtime.jit import create_function_from_signature
        b = create_function_from_signature(fn.signature, fn.params, sm90_backend())
        fn.__dict__["_bench_sm90_binder"] = b
    return b


def describe_launch(fn, args, kwargs, grid) -> Launch:
    """What ``fn[grid](*args, **kwargs)`` would compile and launch on an H100."""
    backend = sm90_backend()
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", getattr(fn, "debug", None) or False)
    try:  # triton's own binder and packer (triton >= 3.4: what a real launch computes)
        bound, specialization, options = _binder(fn)(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                              specialization, options)
    except (ImportError, AttributeError, TypeError):  # older triton: the same rules by hand
        bound, signature, constexprs, attrs, options = _describe_by_hand(fn, args, kwargs,
                                                                         backend)
    g = grid(bound) if callable(grid) else grid
    g = tuple(int(v) for v in g) + (1,) * (3 - len(g))
    return Launch(fn=fn, name=fn.fn.__name__, grid=g, signature=signature,
                  constexprs=constexprs, attrs=attrs, options=options,
                  args={k: _describe(v) for k, v in bound.items()})


_TORCH_TO_TRITON = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
                    "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8",
                    "bool": "i1"}


def _describe_by_hand(fn, args, kwargs, backend):
    """Fallback of ``describe_launch`` for a triton without ``create_function_from_signature``:
    triton's specialisation rules (pointer % 16, int % 16 -> divisibility 16, int == 1 ->
    constexpr, floats and bools never specialised), applied to the bound arguments."""
    sig = inspect.signature(fn.fn)
    names = set(sig.parameters)
    opts = {k: v for k, v in kwargs.items() if k not in names}
    ba = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    ba.apply_defaults()
    bound = dict(ba.arguments)
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, kp) in enumerate(zip(sig.parameters, fn.params)):
        v = bound[name]
        if kp.is_constexpr:
            signature[name] = "constexpr"
            constexprs[(i,)] = v
            attrs[(i,)] = []
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + _TORCH_TO_TRITON[str(v.dtype).replace("torch.", "")]
            aligned = v.data_ptr() % 16 == 0 and not kp.do_not_specialize_on_alignment
            attrs[(i,)] = [["tt.divisibility", 16]] if aligned else []
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            if v == 1 and not kp.do_not_specialize:
                signature[name] = "constexpr"
                constexprs[(i,)] = 1
                attrs[(i,)] = []
                continue
            signature[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            div = v % 16 == 0 and not kp.do_not_specialize
            attrs[(i,)] = [["tt.divisibility", 16]] if div else []
        elif isinstance(v, float):
            signature[name] = "fp32"
        elif v is None:
            signature[name] = "constexpr"
            constexprs[(i,)] = None
        else:
            signature[name] = "constexpr"
            constexprs[(i,)] = v
    return bound, signature, constexprs, attrs, backend.parse_options(opts)


@contextlib.contextmanager
def record_launches(launches: list | None = None, execute: bool = False):
    """Within the block every JITFunction launch appends a :class:`Launch` to the yielded list
    and is skipped (``execute=True``: also run it, e.g. under a real GPU)."""
    from triton.runtime.jit import JITFunction
    out = [] if launches is None else launches
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        out.append(describe_launch(self, args, kwargs, grid))
        if execute:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    JITFunction.run = run
    try:
        yield out
    finally:
        JITFunction.run = original


class _H100Properties:
    name = "NVIDIA H100 80GB HBM3 (recorded on CPU)"
    multi_processor_count = H100_SMS
    major, minor = 9, 0
    total_memory = 80 * 2 ** 30
    warp_size = 32
    max_shared_memory_per_block_optin = 232448
    shared_memory_per_block_optin = 232448
    regs_per_multiprocessor = 65536
    L2_cache_size = 50 * 2 ** 20


@contextlib.contextmanager
def h100_host():
    """CPU tensors pass the launchers' "is this CUDA" checks and every SM count is 132."""
    import importlib
    patched = []

    def patch(obj, name, value):
        patched.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, value)

    sm_fns = set()
    try:
        common = importlib.import_module("rotp_triton.ops.rot.triton.common")
        sm_fns.add(common.sm_count)
    except Exception:  # a tree without the shared helpers: nothing to patch
        pass
    patch(torch.Tensor, "is_cuda", property(lambda self: True))
    # device.type == "cuda" checks: tensors report cuda:0, and tensor factories asked for a
    # CUDA device (device=x.device) get the CPU one
    real_device = torch._C.TensorBase.device
    patch(torch.Tensor, "device", property(
        lambda self: _CUDA0 if real_device.__get__(self).type == "cpu"
        else real_device.__get__(self)))
    patch(torch.cuda, "get_device_properties", lambda *a, **k: _H100Properties())
    patch(torch.cuda, "current_device", lambda: 0)
    patch(torch.cuda, "device_count", lambda: 1)
    for mname, mod in list(sys.modules.items()):
        if not mname.startswith("rotp_triton") or mod is None:
            continue
        for attr, val in list(vars(mod).items()):
            if inspect.isfunction(val) and (val in sm_fns or attr in ("sm_count", "_sm_count")):
                patch(mod, attr, lambda *a, **k: H100_SMS)
            if hasattr(val, "cache_clear") and attr in ("_sm_count_of", "_sm_count"):
                val.cache_clear()
    for fname in _FACTORIES:
        if hasattr(torch, fname):
            patch(torch, fname, _cpu_device_kwarg(getattr(torch, fname)))
    for fname in ("to", "new_empty", "new_zeros", "new_full", "new_ones", "new_tensor"):
        patch(torch.Tensor, fname, _cpu_device_kwarg(getattr(torch.Tensor, fname)))
    try:
        yield
    finally:
        for obj, name, old in reversed(patched):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


_MISSING = object()
_CUDA0 = torch.device("cuda", 0)


def _to_cpu(v):
    if isinstance(v, torch.device) and v.type == "cuda":
        return torch.device("cpu")
    if isinstance(v, str) and v.startswith("cuda"):
        return "cpu"
    return v


_FACTORIES = ("empty", "zeros", "ones", "full", "arange", "tensor", "as_tensor", "empty_like",
              "zeros_like", "ones_like", "full_like", "rand", "randn", "randint", "linspace",
              "empty_strided", "eye", "scalar_tensor")


def _cpu_device_kwarg(f):
    """``f`` with a CUDA ``device`` (keyword, or positional for ``Tensor.to``) replaced by CPU."""
    def g(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu(kwargs["device"])
        args = tuple(_to_cpu(a) for a in args)
        return f(*args, **kwargs)
    return g
