"""The test harness's interpreter shim (``tests/interpreter_patch_once.py``): one language patch
per launch (and one for triton's own helpers), helpers still run interpreted, ``tl`` restored
after the launch (``tl.core`` stays patched after tl.sum's patch, as without the shim)."""
import os

import pytest
import torch
import triton
import triton.language as tl

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the shim is installed under the interpreter only")


@triton.jit
def _twice(v):
    return v * 2.0


@triton.jit
def _plus_one(v):
    return _twice(v) + 1.0 - v + tl.sum(v * 0.0, axis=0)    # tl.sum: a helper of tl.core's


@triton.jit
def _helpers_kernel(x_ptr, y_ptr, n, B: tl.constexpr):
    o = tl.program_id(0) * B + tl.arange(0, B)
    m = o < n
    v = tl.load(x_ptr + o, mask=m)
    for _ in range(3):
        v = _plus_one(v)
    tl.store(y_ptr + o, tl.exp2(v) * 0.0 + v, mask=m)


def test_one_patch_per_launch_and_the_same_results(monkeypatch):
    from triton.runtime import interpreter as interp
    shim = interp._patch_lang
    assert getattr(shim, "patch_once", False)                   # installed by conftest
    calls = []
    real = shim.real
    monkeypatch.setattr(shim, "real", lambda fn: calls.append(fn.__name__) or real(fn))
    x = torch.randn(37)
    y = torch.empty_like(x)
    _helpers_kernel[(3,)](x, y, 37, B=16)
    want = x.clone()
    for _ in range(3):
        want = want * 2.0 + 1.0 - want
    assert torch.equal(y, want)
    # 3 programs x 3 iterations x 2 helpers + tl.sum: no patch but the first tl.sum's (it sees
    # tl.core, which the launch did not patch) in each launch
    assert calls == ["_helpers_kernel", "sum"]
    assert tl.core.is_builtin(tl.load) and tl.core.is_builtin(tl.exp2)     # restored
