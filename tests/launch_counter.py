"""Count Triton kernel launches of a call: ``with count_launches() as launches: ...`` then
``len(launches)`` (kernel names, in launch order).

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


@contextlib.contextmanager
def count_launches() -> Iterator[List[str]]:
    """Yields a list that receives one kernel name per launch while the block runs."""
    launches: List[str] = []
    saved = []
    for cls in _run_classes():
        original = cls.run

        def run(self, *args, __original=original, **kwargs):
            launches.append(_kernel_name(self))
            return __original(self, *args, **kwargs)

        saved.append((cls, original))
        cls.run = run
    try:
        yield launches
    finally:
        for cls, original in saved:
            cls.run = original
