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
                 num_stages: int = 3, maxnreg=None):
    """``signature``: argument name -> type string (``"*fp32"``, ``"i32"``, ``"fp32"``,
    ``"constexpr"``); ``constexprs``: name -> value. Returns the compiled kernel (``.asm`` holds
    ``ptx`` / ``cubin``) or raises the compiler's error."""
    fn = kernel  # unwrap @triton.autotune / @triton.heuristics down to the JITFunction
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:  # the launcher's register cap (a launch option like num_warps)
        options["maxnreg"] = maxnreg
    # keep the log of triton's own ptxas -v run (it prints it with dump_ptxas_log) so that
    # ptxas_usage need not run ptxas a second time (a sixth of an AOT test's time)
    nv = getattr(getattr(triton, "knobs", None), "nvidia", None)
    if nv is None or not hasattr(nv, "dump_ptxas_log"):
        return triton.compile(src, target=HOPPER, options=options)
    import contextlib
    import io
    old, out = nv.dump_ptxas_log, io.StringIO()
    nv.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(out):
            compiled = triton.compile(src, target=HOPPER, options=options)
    finally:
        nv.dump_ptxas_log = old
    if "Used " in out.getvalue():   # empty when triton's cache had the kernel: no ptxas ran
        compiled.ptxas_log = out.getvalue()
    return compiled


def ptxas_usage(compiled) -> dict:
    """Registers and spill bytes of a compiled kernel from ``ptxas -v``: the log of triton's own
    ptxas run where :func:`compile_sm90` kept it, else ptxas run again on the PTX with the
    options triton passes. (``cuobjdump -res-usage`` prints LOCAL:0 even when registers spill:
    spills land in STACK, which also counts call frames.)"""
    import os
    import re
    import subprocess
    import tempfile

    log = getattr(compiled, "ptxas_log", None)
    if log is not None:
        return _usage_from_log(log)
    from triton.backends.nvidia.compiler import get_ptxas
    try:
        ptxas = get_ptxas(HOPPER.arch).path
    except TypeError:  # older triton: get_ptxas() without the architecture
        ptxas = get_ptxas().path
    ptx = compiled.asm["ptx"]
    arch = re.search(r"\.target\s+(\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # the options triton's make_cubin passes (register allocation differs without them)
        err = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    return _usage_from_log(err.stdout + err.stderr)


def _usage_from_log(out: str) -> dict:
    import re
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    if regs is None or spill is None:
        raise RuntimeError(f"ptxas -v gave no usage:\n{out[-2000:]}")
    return dict(registers=int(regs.group(1)),
                spill_bytes=int(spill.group(1)) + int(spill.group(2)))
