"""Under ``TRITON_INTERPRET=1``: patch ``triton.language`` once per launch, not per helper call.

Triton's interpreter (3.6 to 3.9) patches the language's builtins (``_patch_lang``: an
``inspect.getmembers`` scan of tl, tl.math and tl.tensor) when a launch starts
(``GridExecutor.__call__``) and again on every call of a @triton.jit helper inside the kernel
(``InterpretedFunction.__call__``). By then the launch has patched them: the helper's patch
finds no builtin left to wrap and sets a few attributes to the values they already hold, at
~1 ms a call (7 of the 23 s of a B-ADMM split test, 6,934 helper calls). :func:`install` skips
a helper's patch when every language module in its globals is one the enclosing launch (or an
earlier helper of it) patched; anything else patches as before. Tests only: the package never
imports this.
"""
from __future__ import annotations

import inspect


class _NoChanges:
    """The scope of a skipped patch: nothing to restore."""

    def restore(self) -> None:
        pass


def install() -> bool:
    """Wrap the interpreter's ``_patch_lang`` and ``GridExecutor.__call__``; False (nothing
    changed) when this triton's interpreter does not have them or they are wrapped already."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except Exception:  # pragma: no cover - no triton
        return False
    real_patch = getattr(interp, "_patch_lang", None)
    executor = getattr(interp, "GridExecutor", None)
    real_call = getattr(executor, "__call__", None)
    if real_patch is None or real_call is None or getattr(real_patch, "patch_once", False):
        return False
    langs_cache: dict = {}
    launches: list = []     # per launch in progress: the language modules it patched (or None)

    def langs_of(fn) -> frozenset:
        key = id(fn)
        if key not in langs_cache:
            langs_cache[key] = (fn, frozenset(id(v) for v in fn.__globals__.values()
                                              if inspect.ismodule(v) and v in (tl, tl.core)))
        return langs_cache[key][1]

    def patch_lang(fn):
        if not launches:
            return patch_lang.real(fn)
        if launches[-1] is None:                        # the launch's own patch
            launches[-1] = langs_of(fn)
            return patch_lang.real(fn)
        if langs_of(fn) <= launches[-1]:
            return _NoChanges()                         # a helper: patched by its launch
        # a helper that sees another module (triton's own tl.sum, tl.max, ... see tl.core): its
        # patch is never restored (InterpretedFunction.__call__ drops the scope), so that module
        # stays patched for the rest of the launch
        scope = patch_lang.real(fn)
        launches[-1] = launches[-1] | langs_of(fn)
        return scope
    patch_lang.patch_once = True
    patch_lang.real = real_patch        # (an attribute: the shim's test counts its calls)

    def call(self, *args, **kwargs):
        launches.append(None)
        try:
            return real_call(self, *args, **kwargs)
        finally:
            launches.pop()

    interp._patch_lang = patch_lang
    executor.__call__ = call
    return True
