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


def _record(calls: dict, script: str) -> dict:
    """case -> kernel -> [launches, configurations, binaries], from ``script`` run without the
    interpreter on ``calls``."""
    code = f"CALLS = {calls!r}\n" + script
    return json.loads(run_without_interpreter(code).strip().splitlines()[-1])


def _assert_one_binary_per_configuration(kernels: dict, case: str, what: str):
    assert kernels, f"{case}: no Triton launch recorded"
    extra = {n: f"{b} binaries for {c} configurations over {n_l} launches"
             for n, (n_l, c, b) in kernels.items() if b > c}
    assert not extra, f"{case}: {what}: {extra}"


# Training batches of another composition: a PyG loader's ragged batches (the number of sets
# and of rows change every batch, multiples of 16 among them) and a dense loader's last, smaller
# batch - through the layers with their defaults (scale="auto": the spread statistics' views
# too). Each used to compile new binaries as the batch's sizes moved the scratch views off a
# 16-byte boundary or flipped an int's divisibility by 16.
LAYER_CALLS = {
    "ROTPool S ragged": "rt.ROTPool(16, method='sinkhorn', num_iters=4, backend='triton')",
    "ROTPool B-E ragged": "rt.ROTPool(16, method='badmm-e', num_iters=4, backend='triton')",
    "ROTPool B-Q ragged": "rt.ROTPool(16, method='badmm-q', num_iters=4, backend='triton')",
    "AdaptiveROTPool2d S dense": "rt.AdaptiveROTPool2d(16, method='sinkhorn', num_iters=4, "
                                 "backend='triton')",
    "AdaptiveROTPool2d B-E dense": "rt.AdaptiveROTPool2d(16, method='badmm-e', num_iters=4, "
                                   "backend='triton')",
}

_BATCHES = """
import json
import torch
import rotp_triton as rt
from bench.compile_time import binaries
from bench.launch_recorder import h100_host, record_launches

g = torch.Generator().manual_seed(0)
ragged = [torch.randint(3, 30, (b,), generator=g) for b in (16, 17, 32, 5, 48)]
ragged[0][:] = 2                     # 32 rows: a multiple of 16
ragged[2][:] = 4                     # 128 rows
out = {}
for case, make in CALLS.items():
    layer = eval(make)
    launches = []
    for i in range(5):
        if "ragged" in case:
            sizes = ragged[i]
            ptr = torch.zeros(sizes.numel() + 1, dtype=torch.long)
            ptr[1:] = sizes.cumsum(0)
            x = torch.randn(int(ptr[-1]), 16, generator=g).requires_grad_()
            kw = dict(ptr=ptr)
        else:
            x = torch.randn((16, 16, 16, 5, 7)[i], 16, 3, 3, generator=g).requires_grad_()
            kw = {}
        with h100_host(), record_launches() as L:
            layer(x, **kw).sum().backward()
        launches += L
    out[case] = {n: [k['launches'], len(k['configs']), len(k['keys'])]
                 for n, k in binaries(launches).items()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def recorded():
    return {**_record(CALLS, _RECORD), **_record(LAYER_CALLS, _BATCHES)}


@pytest.mark.parametrize("case", list(CALLS))
def test_launches_of_a_kernel_share_one_binary_per_configuration(recorded, case):
    _assert_one_binary_per_configuration(recorded[case], case,
                                         "triton specialised an argument's value")


@pytest.mark.parametrize("case", list(LAYER_CALLS))
def test_batches_of_other_sizes_reuse_the_binaries(recorded, case):
    _assert_one_binary_per_configuration(recorded[case], case, "new batches compiled again")
