"""Options, value checks and the weight table (ops/rot/params.py): what is checked when, the
(6, T) table's rows and gradient, and the cached constant table of Python-number weights."""
import pytest
import torch

import rotp_triton as rt
from rotp_triton.ops.rot import params


def test_value_checks_default_on_cpu_off_elsewhere():
    assert params.value_checks_enabled(torch.empty(1))
    meta = torch.empty(1, device="meta")  # stands for a CUDA tensor: not CPU
    assert not params.value_checks_enabled(meta)
    with rt.set_value_checks(True):
        assert params.value_checks_enabled(meta)
        with rt.set_value_checks(False):
            assert not params.value_checks_enabled(torch.empty(1))
        assert params.value_checks_enabled(torch.empty(1))
    assert not params.value_checks_enabled(meta)  # back to "auto"


def test_set_value_checks_takes_effect_without_with():
    rt.set_value_checks(False)
    try:
        assert not params.value_checks_enabled(torch.empty(1))
    finally:
        rt.set_value_checks("auto")
    assert params.value_checks_enabled(torch.empty(1))
    with pytest.raises(ValueError, match="mode"):
        rt.set_value_checks("sometimes")


@pytest.mark.parametrize("kwargs,match", [
    (dict(a1=torch.tensor([1.0, 0.0])), "a1 must be positive"),
    (dict(a2=torch.tensor([1.0, float("nan")])), "a2 must not be NaN"),
    (dict(rho=torch.tensor(-1.0)), "rho must be non-negative"),
    (dict(tau=torch.tensor([float("inf"), 1.0])), "tau must be finite"),
], ids=["a1-zero", "a2-nan", "rho-negative", "tau-inf"])
def test_tensor_weight_values_are_checked_when_on(kwargs, match):
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=match):
        rt.rot_pool(x, num_iters=2, **kwargs)
    with rt.set_value_checks(False):  # off: no host read, the caller's responsibility
        rt.rot_pool(x, num_iters=2, backend="torch", **kwargs)


def test_value_checks_off_skips_finite_and_ptr_checks():
    x = torch.randn(6, 4)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        rt.rot_pool(x, ptr=torch.tensor([0, 2, 6]))
    with rt.set_value_checks(False):
        y = rt.rot_pool(x, ptr=torch.tensor([0, 2, 6]))
    assert torch.isnan(y[0]).any() and torch.isfinite(y[1]).all()


def test_shape_checks_always_run():
    with rt.set_value_checks(False):
        with pytest.raises(ValueError, match="ptr"):
            rt.rot_pool(torch.randn(6, 4), ptr=torch.tensor([0, 2, 5]), dim_size=3)
        with pytest.raises(ValueError, match=r"a1 must be a scalar or a tensor of shape \(4,\)"):
            rt.rot_pool(torch.randn(2, 3, 4), a1=torch.ones(3))


def test_weight_table_rows_and_gradient():
    a1 = torch.tensor([0.5, 2.0], requires_grad=True)
    t = params.weight_table(0.0, a1, float("inf"), torch.tensor(3.0), 1.0, 0.5, 2, "cpu")
    assert t.shape == (params.NUM_WEIGHTS, 2) and t.dtype == torch.float32
    assert t[params.A1].tolist() == [0.5, 2.0] and t[params.A2].tolist() == [float("inf")] * 2
    assert t[params.A3].tolist() == [3.0, 3.0] and t[params.TAU].tolist() == [0.5, 0.5]
    (g,) = torch.autograd.grad(t[params.A1].sum() * 2, a1)
    assert g.tolist() == [2.0, 2.0]
    floats = params.weight_table(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 3, "cpu")
    assert floats[:, 2].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_constant_table_is_cached_and_not_an_inference_tensor():
    with torch.inference_mode():
        t1 = params.weight_table(0.0, 1.37, 1.0, float("inf"), 1.0, 1.0, 3, "cpu")
    t2 = params.weight_table(0.0, 1.37, 1.0, float("inf"), 1.0, 1.0, 3, "cpu")
    assert t1 is t2 and not t2.is_inference() and not t2.requires_grad
    x = torch.randn(2, 3, 4, requires_grad=True)  # a training call after an inference call
    with torch.inference_mode():
        rt.rot_pool(x.detach(), a1=1.37, a3=float("inf"), num_iters=3)
    rt.rot_pool(x, a1=1.37, a3=float("inf"), num_iters=3).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_weight_table_gradient_of_every_weight_shape():
    """A (T,) weight in the table's dtype enters the stack as it is, the others reshaped, cast
    and expanded: each gets its own row's gradient, summed for a scalar, in its own dtype."""
    T = 3
    a1 = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)    # ()
    a2 = torch.tensor([1.5], requires_grad=True)                        # (1,)
    a3 = torch.tensor([2.0, 3.0, 4.0], requires_grad=True)              # (T,), the table's
    rho = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64, requires_grad=True)
    t = params.weight_table(0.0, a1, a2, a3, rho, 0.5, T, "cpu")
    assert t.dtype == torch.float32 and t.shape == (params.NUM_WEIGHTS, T)
    assert t[params.A3].tolist() == [2.0, 3.0, 4.0] and t[params.A2].tolist() == [1.5] * 3
    coef = torch.arange(1.0, 1.0 + params.NUM_WEIGHTS * T).view(params.NUM_WEIGHTS, T)
    grads = torch.autograd.grad((t * coef).sum(), (a1, a2, a3, rho))
    assert [g.shape for g in grads] == [(), (1,), (T,), (T,)]
    assert [g.dtype for g in grads] == [torch.float64, torch.float32, torch.float32,
                                         torch.float64]
    assert grads[0].item() == coef[params.A1].sum().item()
    assert grads[1].tolist() == [coef[params.A2].sum().item()]
    assert grads[2].tolist() == coef[params.A3].tolist()
    assert grads[3].tolist() == coef[params.RHO].tolist()
