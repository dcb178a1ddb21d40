"""Iterations share binaries: within one call, the launches of a kernel compile to one sm_90
binary per configuration the launcher chose (its declared ``tl.constexpr`` values, warps and
stages), never to more because triton specialised an argument's value - an iteration index
passed as a plain int made three binaries of each step kernel (t == 0 divisible by 16, t == 1
a constexpr, the rest), doubling a first call's compile (bench/compile_time.py).

The launches are recorded as an H100 would see them (``bench/launch_recorder.py``: nothing
runs, nothing compiles), in a subprocess without TRITON_INTERPRET (recording needs real
JITFunctions).
"""
import json

import pytest

from harness import run_without_interpreter

# (case, call): dense and ragged α0 > 0 for every method (the structure kernels; odd set
# sizes: the per-iteration rows of their gradient sums must start aligned), the split
# B-ADMM at T = 8 (few sets, T past ONE_PROGRAM_MAX_ITERS), the set and window kernels
CALLS = {
    "a0 B-E dense": "rt.rot_pool(x, method='badmm-e', a0=0.2, **kw)",
    "a0 B-E one odd set": "rt.rot_pool(xo, method='badmm-e', a0=0.2, **kw)",
    "a0 B-Q ragged": "rt.rot_pool(xr, ptr=ptr, method='badmm-q', a0=0.2, **kw)",
    "a0 S dense": "rt.rot_pool(x, method='sinkhorn', a0=0.2, **kw)",
    "a0 S ragged": "rt.rot_pool(xr, ptr=ptr, method='sinkhorn', a0=0.2, **kw)",
    "split B-E T=8": "rt.rot_pool(xs, method='badmm-e', **kw8)",
    "split B-Q T=8 ragged": "rt.rot_pool(xsr, ptr=ptrs, method='badmm-q', **kw8)",
    "S T=8": "rt.rot_pool(xs, method='sinkhorn', **kw8)",
    "windows B-E": "rt.ROTPool2d(8, 2, method='badmm-e', num_iters=4, backend='triton')(img)",
}

_RECORD = """
import json
import torch
import rotp_triton as rt
from bench.compile_time import binaries
from bench.launch_recorder import h100_host, record_launches

torch.manual_seed(0)
w = lambda T: {k: torch.full((T,), 1.0, requires_grad=True) for k in ('a1', 'a2', 'a3')}
kw = dict(num_iters=4, backend='triton', **w(4))
kw8 = dict(num_iters=8, backend='triton', **w(8))
x = torch.randn(3, 40, 24, requires_grad=True)
xo = torch.randn(1, 37, 25, requires_grad=True)
xr = torch.randn(45, 24, requires_grad=True)
ptr = torch.tensor([0, 20, 20, 45])
xs = torch.randn(2, 300, 64, requires_grad=True)
xsr = torch.randn(700, 64, requires_grad=True)
ptrs = torch.tensor([0, 300, 700])
img = torch.randn(2, 8, 8, 8, requires_grad=True)
out = {}
for case, call in CALLS.items():
    with h100_host(), record_launches() as L:
        eval(call).sum().backward()
    out[case] = {n: [k['launches'], len(k['configs']), len(k['keys'])]
                 for n, k in binaries(L).items()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def recorded():
    code = f"CALLS = {CALLS!r}\n" + _RECORD
    return json.loads(run_without_interpreter(code).strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CALLS))
def test_launches_of_a_kernel_share_one_binary_per_configuration(recorded, case):
    kernels = recorded[case]
    assert kernels, f"{case}: no Triton launch recorded"
    extra = {n: f"{b} binaries for {c} configurations over {n_l} launches"
             for n, (n_l, c, b) in kernels.items() if b > c}
    assert not extra, f"{case}: triton specialised an argument's value: {extra}"
