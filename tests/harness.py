"""The shared test harness: where kernel tests run, per-dtype tolerances, one ``assert_close``
and one kernel-versus-reference check (outputs and every gradient).

Kernel tests compare against the float64 oracle in ``reference/`` (DESIGN §8). Tolerances are
relative L2 errors per input dtype (``RTOL``), never loosened per test.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable, Dict, Optional

import pytest
import torch

DEVICE = os.environ.get("ROTP_TEST_DEVICE", "cpu")
ON_CUDA = DEVICE == "cuda"
if ON_CUDA and not torch.cuda.is_available():  # pragma: no cover
    raise RuntimeError("ROTP_TEST_DEVICE=cuda but no CUDA device is available")

# The interpreter has no bf16 and runs fp16 through numpy slowly: reduced precision on GPU only.
KERNEL_DTYPES = [torch.float32] + ([torch.float16, torch.bfloat16] if ON_CUDA else [])
# relative-error tolerance of a kernel against the float64 reference, per input dtype
RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float64: 1e-9}


def dtype_id(dtype: torch.dtype) -> str:
    """Short test id of a dtype (``fp32``, ``bf16``, ...)."""
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
            torch.float64: "fp64"}[dtype]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a - b‖ / max(‖b‖, tiny) in float64; NaN if either has a NaN."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32,
                 *, name: str = "", floor: float = 0.0) -> None:
    """Relative L2 error of ``actual`` against ``expected`` at most ``RTOL[dtype]``; ``floor``:
    an absolute norm below which ``expected`` counts as zero (gradients that vanish exactly)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != " \
                                           f"{tuple(expected.shape)}"
    a, b = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    err = float((a - b).norm() / max(float(b.norm()), floor, 1e-30))
    assert err <= RTOL[dtype], f"{name}: relative error {err:.3g} > {RTOL[dtype]:g}"


def check_against_reference(run: Callable, reference: Callable, inputs: Dict[str, torch.Tensor],
                            *, dtype: torch.dtype = torch.float32, grads: bool = True,
                            seed: int = 0, floor: Optional[float] = None) -> None:
    """``run(**inputs)`` on ``DEVICE`` in ``dtype`` against ``reference(**inputs)`` in float64:
    every output and, with ``grads``, the gradient of every floating input under a random
    cotangent. ``inputs`` hold float64 CPU tensors (integer ones, e.g. ``ptr``, pass as they
    are); outputs may be a tensor or a tuple (``None`` entries are skipped)."""
    def prepare(cast: bool) -> dict:
        out = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                v = v.detach().clone()
                if cast:
                    v = v.to(DEVICE, dtype)
                v.requires_grad_(grads)
            elif isinstance(v, torch.Tensor) and cast:
                v = v.to(DEVICE)
            out[k] = v
        return out

    def as_tuple(y):
        return tuple(t for t in (y if isinstance(y, (tuple, list)) else (y,)) if t is not None)

    ins_k, ins_r = prepare(True), prepare(False)
    out_k, out_r = as_tuple(run(**ins_k)), as_tuple(reference(**ins_r))
    assert len(out_k) == len(out_r)
    for i, (a, b) in enumerate(zip(out_k, out_r)):
        assert_close(a, b, dtype, name=f"output {i}")
    if not grads:
        return
    g = torch.Generator().manual_seed(seed)
    cots = [torch.randn(b.shape, generator=g, dtype=torch.float64) for b in out_r]
    names = [k for k, v in ins_r.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    gk = torch.autograd.grad([(a.double().cpu() * c).sum() for a, c in zip(out_k, cots)],
                             [ins_k[k] for k in names], allow_unused=True,
                             materialize_grads=True)
    gr = torch.autograd.grad([(b * c).sum() for b, c in zip(out_r, cots)],
                             [ins_r[k] for k in names], allow_unused=True, materialize_grads=True)
    gx_norm = max(float(v.norm()) for v in gr) if gr else 0.0
    for name, a, b in zip(names, gk, gr):
        assert_close(a, b, dtype, name=f"d/d{name}",
                     floor=(1e-3 * gx_norm) if floor is None else floor)


def run_without_interpreter(code: str, timeout: int = 600) -> str:
    """Run python ``code`` in a subprocess without TRITON_INTERPRET (for AOT compilation)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "tests"),
                                         env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        pytest.fail(f"subprocess failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r.stdout


def allocation_counter():
    """A ``TorchDispatchMode`` recording the numel of every tensor allocation (empty, zeros and
    their _like / new_ / _strided forms) made while it is active, in ``.sizes``: ``with
    allocation_counter() as a: ...`` then e.g. ``sum(n >= x.numel() for n in a.sizes)``."""
    from torch.utils._python_dispatch import TorchDispatchMode
    aten = torch.ops.aten
    kinds = (aten.empty, aten.empty_like, aten.empty_strided, aten.zeros, aten.zeros_like,
             aten.new_zeros, aten.new_empty)

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in kinds:
                self.sizes.append(out.numel())
            return out

    return Allocations()
