"""Compile a Triton kernel for a Hopper GPU (sm_90) on a machine without one.

The interpreter (TRITON_INTERPRET=1) accepts code the GPU compiler rejects (non-power-of-two
blocks, small ``tl.dot`` tiles, ...). Compiling ahead of time for ``cuda:90`` with the ptxas that
ships with triton catches those errors in CI, with no GPU. Run it in a subprocess or before
``TRITON_INTERPRET`` is set: under the interpreter ``@triton.jit`` functions are not compiled.
"""
from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget

HOPPER = GPUTarget("cuda", 90, 32)


def compile_sm90(kernel, signature: dict, constexprs: dict, num_warps: int = 4,
                 num_stages: int = 3):
    """``signature``: argument name -> type string (``"*fp32"``, ``"i32"``, ``"fp32"``,
    ``"constexpr"``); ``constexprs``: name -> value. Returns the compiled kernel (``.asm`` holds
    ``ptx`` / ``cubin``) or raises the compiler's error."""
    fn = kernel  # unwrap @triton.autotune / @triton.heuristics down to the JITFunction
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=HOPPER,
                          options={"num_warps": num_warps, "num_stages": num_stages})
