"""Count Triton kernel launches of a call: ``with count_launches() as launches: ...`` then
``len(launches)`` (kernel names, in launch order; ``launches.constexprs`` holds each launch's
keyword arguments, e.g. to check which precision or block size a launcher chose).

Patches the ``run`` method that ``kernel[grid](...)`` ends in: ``InterpretedFunction.run``
under ``TRITON_INTERPRET=1``, ``JITFunction.run`` on a GPU. Launches through
``torch.library.wrap_triton`` are counted too (under the interpreter it hands back the
interpreted kernel; on a GPU it ends in ``JITFunction.run``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List

import triton


def _run_classes():
    classes = [triton.runtime.jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - a triton without the interpreter
        pass
    return classes


def _kernel_name(fn) -> str:
    inner = getattr(fn, "fn", fn)
    return getattr(inner, "__name__", type(fn).__name__)


class Launches(list):
    """Kernel names in launch order, plus ``constexprs``: the keyword arguments of each."""

    def __init__(self):
        super().__init__()
        self.constexprs: List[dict] = []


@contextlib.contextmanager
def count_launches(execute: bool = True) -> Iterator[Launches]:
    """Yields a list that receives one kernel name per launch while the block runs.
    ``execute=False``: record the launches without running the kernels (their outputs stay
    as allocated) - for counting only, which the launchers allow since they take no decision
    from tensor values (no host syncs: ``tests/test_frontend_ops.py``)."""
    launches = Launches()
    saved = []
    for cls in _run_classes():
        original = cls.run

        def run(self, *args, __original=original, **kwargs):
            launches.append(_kernel_name(self))
            launches.constexprs.append({k: v for k, v in kwargs.items()
                                        if isinstance(v, (bool, int, float, str))})
            if not execute:
                return None
            return __original(self, *args, **kwargs)

        saved.append((cls, original))
        cls.run = run
    try:
        yield launches
    finally:
        for cls, original in saved:
            cls.run = original
