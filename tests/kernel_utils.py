"""Shared helpers of the kernel tests: the device switch, dtypes and tolerances."""
import os
import subprocess
import sys

import pytest
import torch

DEVICE = os.environ.get("ROTP_TEST_DEVICE", "cpu")
ON_CUDA = DEVICE == "cuda"
if ON_CUDA and not torch.cuda.is_available():  # pragma: no cover
    raise RuntimeError("ROTP_TEST_DEVICE=cuda but no CUDA device is available")

# The interpreter has no bf16 and runs fp16 through numpy slowly: reduced precision on GPU only.
KERNEL_DTYPES = [torch.float32] + ([torch.float16, torch.bfloat16] if ON_CUDA else [])
# relative-error tolerance of a kernel against the float64 reference, per input dtype
RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a - b‖ / max(‖b‖, tiny) in float64; NaN if either has a NaN."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


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
