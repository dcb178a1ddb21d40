"""Test configuration: where kernel tests run.

``ROTP_TEST_DEVICE=cuda`` runs every kernel test on the GPU (plus fp16/bf16 cases); by default
(``cpu``) the Triton kernels run under the interpreter, which must be switched on before triton
is first imported - hence here, in the first file pytest loads.
"""
import os
import sys

DEVICE = os.environ.get("ROTP_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/ helpers (aot, kernel_utils)
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # reference/ from the repo root


import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    import interpreter_patch_once  # noqa: E402

    interpreter_patch_once.install()   # half the interpreter time, the same semantics


@pytest.fixture(autouse=True)
def _seed():
    """Every test draws its random inputs from a fixed seed: failures reproduce."""
    torch.manual_seed(0)


@pytest.fixture
def deterministic():
    """``torch.use_deterministic_algorithms(True)`` for the test (which may switch it again);
    the previous setting after."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
