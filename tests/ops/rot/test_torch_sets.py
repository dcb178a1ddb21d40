"""The torch path of rot_pool against the reference oracle, forward and gradients.

Every method × variant × (α0 = 0, α0 > 0), per-iteration weights, given priors, awkward shapes
(N = 1, D = 1, non-powers of two) and ragged batches with an empty set. Tolerances: float64
relative error <= 1e-9; float32 (against the float64 reference on the same inputs) <= 1e-4.
"""
import itertools

import pytest
import torch

import rotp_triton as rt
from reference import rot as ref

from harness import rel_err

METHODS = ("sinkhorn", "badmm-e", "badmm-q")
VARIANTS = ("exact", "paper")
T = 3


def make_weights(T, dtype, seed, structure):
    """Per-iteration weights as leaf tensors; values chosen where both variants are stable."""
    g = torch.Generator().manual_seed(seed)

    def w(lo, hi):
        return (lo + (hi - lo) * torch.rand(T, generator=g, dtype=torch.float64)).to(dtype) \
            .requires_grad_()

    return dict(a0=w(0.2, 0.8) if structure else 0.0, a1=w(0.8, 1.6), a2=w(0.5, 2.0),
                a3=w(0.5, 2.0), rho=w(0.8, 1.6), tau=w(0.5, 1.0))


def grads(out, inputs):
    """Gradients of a fixed random linear functional of ``out`` w.r.t. ``inputs``."""
    g = torch.Generator().manual_seed(123)
    proj = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    inputs = [i for i in inputs if isinstance(i, torch.Tensor) and i.requires_grad]
    gs = torch.autograd.grad((out * proj).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(i) if gi is None else gi for i, gi in zip(inputs, gs)]


def run_reference(xs, p0s, q0s, weights, method, variant):
    """Reference on a list of (N_b, D) float64 sets; priors normalized inside the graph."""
    p0n = [p / p.sum() for p in p0s]
    q0n = [q / q.sum() if q.numel() else q for q in q0s]
    Y, _ = ref.rot_pool_sets(xs, p0s=p0n, q0s=q0n, method=method, variant=variant,
                             num_iters=T, inner_iters=2, **weights)
    return Y


def ragged_problem(sizes, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, D, generator=g, dtype=torch.float64).to(dtype)
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    p0 = (0.5 + torch.rand(len(sizes), D, generator=g, dtype=torch.float64)).to(dtype)
    q0 = (0.5 + torch.rand(n, generator=g, dtype=torch.float64)).to(dtype)
    return x, index, p0, q0


SHAPES = {
    "N1": ([1, 1], 3),
    "D1": ([4, 2], 1),
    "odd": ([5, 7, 3], 6),
    "empty": ([3, 0, 5], 4),
}


@pytest.mark.parametrize("method,variant,structure",
                         list(itertools.product(METHODS, VARIANTS, (False, True))))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_torch_path_matches_reference_float64(method, variant, structure, shape):
    sizes, D = SHAPES[shape]
    x, index, p0, q0 = ragged_problem(sizes, D, torch.float64, seed=hash(shape) % 1000)
    x.requires_grad_()
    p0.requires_grad_()
    q0.requires_grad_()
    w = make_weights(T, torch.float64, 7, structure)
    y = rt.rot_pool(x, index, dim_size=len(sizes), method=method, variant=variant, num_iters=T,
                    inner_iters=2, p0=p0, q0=q0, backend="torch", **w)
    xs = [x[index == b] for b in range(len(sizes))]
    q0s = [q0[index == b] for b in range(len(sizes))]
    y_ref = run_reference(xs, list(p0), q0s, w, method, variant)
    assert torch.isfinite(y).all()
    assert rel_err(y, y_ref) <= 1e-9
    if 0 in sizes:
        assert torch.equal(y[sizes.index(0)], torch.zeros(D, dtype=y.dtype))
    inputs = [x, p0, q0] + [v for v in w.values() if isinstance(v, torch.Tensor)]
    g_pkg = grads(y, inputs)
    g_ref = grads(y_ref, inputs)
    for name, a, b in zip(["x", "p0", "q0"] + [k for k, v in w.items()
                                                if isinstance(v, torch.Tensor)], g_pkg, g_ref):
        assert torch.isfinite(a).all(), name
        err = rel_err(a, b) if b.norm() > 1e-12 else float((a - b).abs().max())
        assert err <= 1e-9, f"grad {name}: {err}"


@pytest.mark.parametrize("method,variant,structure",
                         list(itertools.product(METHODS, VARIANTS, (False, True))))
def test_torch_path_float32_close_to_float64_reference(method, variant, structure):
    sizes, D = [6, 9, 1], 5
    x, index, p0, q0 = ragged_problem(sizes, D, torch.float32, seed=3)
    w32 = make_weights(T, torch.float32, 11, structure)
    w64 = {k: (v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v)
           for k, v in w32.items()}
    x32 = x.clone().requires_grad_()
    y32 = rt.rot_pool(x32, index, method=method, variant=variant, num_iters=T, inner_iters=2,
                      backend="torch", **w32)
    assert y32.dtype == torch.float32
    x64 = x.double().requires_grad_()
    y_ref = run_reference([x64[index == b] for b in range(3)],
                          [torch.full((D,), 1.0 / D, dtype=torch.float64)] * 3,
                          [torch.full((n,), 1.0 / n, dtype=torch.float64) for n in sizes],
                          w64, method, variant)
    assert rel_err(y32, y_ref) <= 1e-4
    g32 = grads(y32.double(), [x32] + [v for v in w32.values() if isinstance(v, torch.Tensor)])
    g64 = grads(y_ref, [x64] + [v for v in w64.values() if isinstance(v, torch.Tensor)])
    for a, b in zip(g32, g64):
        assert rel_err(a, b) <= 1e-4


def test_half_inputs_compute_in_float32():
    x = torch.randn(2, 6, 8)
    y16 = rt.rot_pool(x.to(torch.bfloat16), backend="torch")
    assert y16.dtype == torch.bfloat16
    y32 = rt.rot_pool(x.to(torch.bfloat16).float(), backend="torch")
    assert rel_err(y16.float(), y32) <= 1e-2  # bf16 output rounding only


@pytest.mark.parametrize("method", METHODS)
def test_return_plan_layout_and_mass(method):
    x, index, _, _ = ragged_problem([3, 0, 4], 5, torch.float64, seed=5)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    y, P = rt.rot_pool(x[perm], index[perm], dim_size=3, method=method, return_plan=True)
    assert P.shape == x.shape
    for b in range(3):
        m = index[perm] == b
        if m.any():
            assert abs(float(P[m].sum()) - 1.0) < 1e-12
    # the plan pools to y (eq. 5)
    for b in (0, 2):
        m = index[perm] == b
        Pb, xb = P[m], x[perm][m]
        yb = (Pb * xb).sum(0) / Pb.sum(0)
        assert rel_err(yb, y[b]) < 1e-12
    # dense layout too
    yd, Pd = rt.rot_pool(x[:3][None], method=method, return_plan=True)
    assert Pd.shape == (1, 3, 5) and abs(float(Pd.sum()) - 1) < 1e-12


def test_all_sets_empty_and_no_rows():
    x = torch.zeros(0, 4, requires_grad=True)
    y = rt.rot_pool(x, torch.zeros(0, dtype=torch.long), dim_size=3)
    assert y.shape == (3, 4) and torch.equal(y, torch.zeros(3, 4))
    y.sum().backward()


def test_does_not_mutate_inputs():
    x, index, p0, q0 = ragged_problem([4, 3], 5, torch.float32, seed=9)
    perm = torch.tensor([6, 0, 3, 1, 5, 2, 4])
    xs, ids, p0c, q0c = x[perm].clone(), index[perm].clone(), p0.clone(), q0[perm].clone()
    a1 = torch.tensor([1.0, 2.0, 3.0])
    a1c = a1.clone()
    for method, a0 in itertools.product(METHODS, (0.0, 0.3)):
        rt.rot_pool(xs, ids, p0=p0c, q0=q0c, method=method, a0=a0, a1=a1, num_iters=3,
                    return_plan=True)
    assert torch.equal(xs, x[perm]) and torch.equal(ids, index[perm])
    assert torch.equal(p0c, p0) and torch.equal(q0c, q0[perm]) and torch.equal(a1, a1c)
