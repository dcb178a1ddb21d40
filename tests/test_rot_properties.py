"""Properties of rot_pool: the defects of the published algorithms (DESIGN §3.3), the special
cases of Prop. 1, invariances, and the stability of the exact solvers on the Fig. 7 grid."""
import itertools

import pytest
import torch

import rotp_triton as rt
from kernel_utils import rel_err

METHODS = ("sinkhorn", "badmm-e", "badmm-q")
INF = float("inf")
GRID = [10.0 ** k for k in range(-5, 5)]  # the paper's Fig. 7 axes: 1e-5 ... 1e4


def fig7_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 50, 16, generator=g)  # 8 sets, N = 50, D = 16, float32


def count_nonfinite(method, variant):
    x = fig7_data()
    bad = 0
    for a1, a23 in itertools.product(GRID, GRID):
        y = rt.rot_pool(x, method=method, variant=variant, a1=a1, a2=a23, a3=a23,
                        num_iters=16, backend="torch")
        bad += int(not torch.isfinite(y).all())
    return bad


# Measured on this grid (float32, T = 16; the same count on other random data and shapes: it is
# set by how fast (1/α1)^t overflows, 9 configurations at T = 8, 18 at T = 10, none at T <= 6).
# DESIGN §3.3 reports 28 of 100; the README quotes this test.
PAPER_SINKHORN_NONFINITE = 28


@pytest.mark.parametrize("method", METHODS)
def test_exact_variant_is_finite_on_the_fig7_grid(method):
    assert count_nonfinite(method, "exact") == 0


def test_paper_sinkhorn_breaks_on_the_fig7_grid():
    """Defect 1: eq. (18)'s a/α1' term grows like (1/α1)^t and overflows for small α1."""
    bad = count_nonfinite("sinkhorn", "paper")
    print(f"paper-variant Sinkhorn: {bad} of 100 Fig. 7 configurations non-finite")
    assert bad == PAPER_SINKHORN_NONFINITE


def test_paper_sinkhorn_fixed_point_is_not_the_optimum():
    """Defect 1 (α1 != 1): run both variants to convergence; the exact one reaches the optimum
    (tested against POT in test_reference.py), the paper one settles elsewhere."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 9, 6, generator=g, dtype=torch.float64)
    kw = dict(method="sinkhorn", a1=0.5, a2=1.0, a3=1.0, num_iters=500, return_plan=True)
    _, P_exact = rt.rot_pool(x, variant="exact", **kw)
    _, P_paper = rt.rot_pool(x, variant="paper", **kw)
    _, P_exact2 = rt.rot_pool(x, variant="exact", **{**kw, "num_iters": 1000})
    assert rel_err(P_exact, P_exact2) < 1e-10          # converged
    assert rel_err(P_paper, P_exact) > 1e-2            # different fixed point
    # with α1 = 1 the a/α1' factor is 1 and the Jacobi fixed point coincides with the optimum
    kw1 = {**kw, "a1": 1.0}
    _, Pe1 = rt.rot_pool(x, variant="exact", **kw1)
    _, Pp1 = rt.rot_pool(x, variant="paper", **kw1)
    assert rel_err(Pp1, Pe1) < 1e-8


@pytest.mark.parametrize("method", ("badmm-e", "badmm-q"))
def test_paper_badmm_ignores_marginal_weights(method):
    """Defect 2: in Alg. 2, μ never leaves p0 and η never leaves q0, so α2, α3 do nothing."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    q0 = torch.rand(3, 7, generator=g, dtype=torch.float64) + 0.1
    outs = {}
    for variant, a23 in itertools.product(("paper", "exact"), (1e-4, 1e4)):
        outs[variant, a23] = rt.rot_pool(x, method=method, variant=variant, a2=a23, a3=a23,
                                         q0=q0, num_iters=8, backend="torch")
    paper_change = float((outs["paper", 1e-4] - outs["paper", 1e4]).abs().max())
    exact_change = float((outs["exact", 1e-4] - outs["exact", 1e4]).abs().max())
    print(f"{method}: max change of y, a2=a3 1e-4 -> 1e4: paper {paper_change:.2e}, "
          f"exact {exact_change:.2e}")
    assert paper_change < 1e-12
    assert exact_change > 1e-2


# ---------------------------------------------------------------------------------------------
# Prop. 1 special cases
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_mean_pooling_limit(method):
    x = torch.randn(4, 11, 6, dtype=torch.float64)
    kw = dict(a1=1e6, rho=1e6) if method != "sinkhorn" else dict(a1=1e6)
    y = rt.rot_pool(x, method=method, a2=INF, a3=INF, num_iters=4, **kw)
    # deviation from the mean is O(Var(x) / α1) (or / ρ)
    assert (y - x.mean(1)).abs().max() < 1e-4


def test_max_pooling_limit():
    x = torch.randn(4, 11, 6, dtype=torch.float64)
    y = rt.rot_pool(x, method="sinkhorn", a1=1e-3, a2=INF, a3=0.0, num_iters=4)
    # softmax over n at temperature 1e-3: within a few ε of the max for gaps >> ε
    assert (y - x.amax(1)).abs().max() < 1e-2


@pytest.mark.parametrize("method", METHODS)
def test_attention_pooling_limit(method):
    x = torch.randn(3, 9, 5, dtype=torch.float64)
    a = torch.rand(3, 9, dtype=torch.float64) + 0.05
    a = a / a.sum(1, keepdim=True)
    # B-Q's linearized quadratic step drifts from p0 q0ᵀ by O(α1/ρ · P): it needs ρ >> α1, and
    # stays ~5e-4 from X a after 4 modules (measured; S and B-E ~2e-6)
    kw = dict(sinkhorn=dict(a1=1e6), **{"badmm-e": dict(a1=1e6, rho=1e6),
                                        "badmm-q": dict(a1=1e6, rho=1e7)})[method]
    tol = 1e-3 if method == "badmm-q" else 1e-4
    y = rt.rot_pool(x, method=method, a2=INF, a3=INF, q0=a, num_iters=4, **kw)
    assert (y - torch.einsum("bn,bnd->bd", a, x)).abs().max() < tol


# ---------------------------------------------------------------------------------------------
# invariances
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,a0", list(itertools.product(METHODS, (0.0, 0.5))))
def test_permutation_of_samples(method, a0):
    x = torch.randn(2, 8, 5, dtype=torch.float64)
    q0 = torch.rand(2, 8, dtype=torch.float64) + 0.1
    perm = torch.randperm(8)
    y = rt.rot_pool(x, method=method, a0=a0, q0=q0)
    yp = rt.rot_pool(x[:, perm], method=method, a0=a0, q0=q0[:, perm])
    assert rel_err(yp, y) < 1e-12


@pytest.mark.parametrize("method,a0", list(itertools.product(METHODS, (0.0, 0.5))))
def test_a_set_pools_the_same_alone_or_in_any_batch(method, a0):
    g = torch.Generator().manual_seed(4)
    sizes = [5, 1, 8, 0, 3]
    x = torch.randn(sum(sizes), 6, generator=g, dtype=torch.float64)
    index = torch.repeat_interleave(torch.arange(5), torch.tensor(sizes))
    ptr = torch.tensor([0] + list(itertools.accumulate(sizes)))
    kw = dict(method=method, a0=a0, a1=torch.tensor([0.7, 1.3, 1.1]), num_iters=3)
    y_index = rt.rot_pool(x, index, dim_size=5, **kw)
    y_ptr = rt.rot_pool(x, ptr=ptr, **kw)
    y_both = rt.rot_pool(x, index, ptr, **kw)
    perm = torch.randperm(x.shape[0], generator=g)
    y_perm = rt.rot_pool(x[perm], index[perm], dim_size=5, **kw)
    # relabel the sets: set b becomes set relabel[b]
    relabel = torch.tensor([3, 0, 4, 1, 2])
    y_relabel = rt.rot_pool(x, relabel[index], dim_size=5, **kw)
    for other in (y_ptr, y_both, y_perm, y_relabel[relabel]):
        assert rel_err(other, y_index) < 1e-12
    for b, n in enumerate(sizes):
        xb = x[index == b]
        alone = rt.rot_pool(xb[None], **kw)[0] if n else torch.zeros(6, dtype=x.dtype)
        assert rel_err(y_index[b], alone) < 1e-12 or (n == 0 and torch.equal(y_index[b], alone))
    # a dense batch of equal-size sets agrees with the ragged one
    dense = x[:5][None].expand(3, 5, 6)
    yd = rt.rot_pool(dense, **kw)
    assert rel_err(yd[1], y_index[0]) < 1e-12


def test_set_output_does_not_depend_on_other_sets_scale():
    """Σ1, Σ2 are normalized per set, never across the batch."""
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    y1 = rt.rot_pool(x, a0=0.7)
    x2 = x.clone()
    x2[1] *= 100.0
    y2 = rt.rot_pool(x2, a0=0.7)
    assert rel_err(y2[0], y1[0]) < 1e-14


def test_structure_term_changes_the_output():
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    for method in METHODS:
        y0 = rt.rot_pool(x, method=method, a0=0.0)
        y1 = rt.rot_pool(x, method=method, a0=2.0)
        assert (y1 - y0).abs().max() > 1e-3


def test_per_iteration_weights_are_used_per_module():
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    ones = torch.ones(4, dtype=torch.float64)
    y = rt.rot_pool(x, method="badmm-e", rho=ones)
    first = ones.clone()
    first[0] = 0.2
    assert (rt.rot_pool(x, method="badmm-e", rho=first) - y).abs().max() > 1e-3
    # a (1,) tensor is shared by all modules
    assert rel_err(rt.rot_pool(x, method="badmm-e", rho=torch.tensor([1.0])), y) < 1e-14
