"""Bad input to rot_pool gets a clear ValueError/TypeError that names the argument."""
import pytest
import torch

import rotp_triton as rt

X = torch.randn(6, 4)
INDEX = torch.tensor([0, 0, 1, 1, 1, 2])


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(x=torch.randn(4)), ValueError, "x must have 2 or 3 dimensions"),
    (dict(x=torch.randn(2, 3, 4, 5)), ValueError, "x must have 2 or 3 dimensions"),
    (dict(x=torch.randn(2, 3, 0)), ValueError, "x has no features"),
    (dict(x=torch.randn(6, 0), index=INDEX), ValueError, "x has no features"),
    (dict(x=torch.ones(6, 4, dtype=torch.long), index=INDEX), TypeError, "x must be a floating"),
    (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (dict(x=X), ValueError, "needs index or ptr"),
    (dict(x=X, index=INDEX[:5]), ValueError, "index must have one entry per row"),
    (dict(x=X, index=INDEX.float()), TypeError, "index must be an integer"),
    (dict(x=X, index=-INDEX), ValueError, "index must be non-negative"),
    (dict(x=X, index=INDEX, dim_size=2), ValueError, "dim_size is 2"),
    (dict(x=X, ptr=torch.tensor([0, 2, 5])), ValueError, "ptr must start at 0 and end"),
    (dict(x=X, ptr=torch.tensor([0, 4, 2, 6])), ValueError, "ptr must be non-decreasing"),
    (dict(x=X, ptr=torch.tensor([0, 2, 5, 6]), dim_size=4), ValueError, "dim_size"),
    (dict(x=X, index=torch.tensor([0, 1, 1, 1, 1, 2]), ptr=torch.tensor([0, 2, 5, 6])),
     ValueError, "index and ptr disagree"),
    (dict(x=X[None], index=INDEX), ValueError, "index/ptr are only used"),
    (dict(x=torch.tensor([[1.0, float("nan")]]), index=torch.tensor([0])), ValueError,
     "x contains non-finite"),
    (dict(x=X, index=INDEX, method="sinkhorn2"), ValueError, "method must be one of"),
    (dict(x=X, index=INDEX, variant="official"), ValueError, "variant must be one of"),
    (dict(x=X, index=INDEX, backend="cuda"), ValueError, "backend must be one of"),
    (dict(x=X, index=INDEX, num_iters=0), ValueError, "num_iters must be a positive int"),
    (dict(x=X, index=INDEX, inner_iters=2.5), ValueError, "inner_iters"),
    (dict(x=X, index=INDEX, a1=0.0), ValueError, "a1 must be positive"),
    (dict(x=X, index=INDEX, a1=float("inf")), ValueError, "a1 must be finite"),
    (dict(x=X, index=INDEX, rho=-1.0), ValueError, "rho must be non-negative"),
    (dict(x=X, index=INDEX, a0=-0.1), ValueError, "a0 must be non-negative"),
    (dict(x=X, index=INDEX, a2=float("nan")), ValueError, "a2 must not be NaN"),
    (dict(x=X, index=INDEX, a3=-float("inf")), ValueError, "a3 must be non-negative"),
    (dict(x=X, index=INDEX, tau=float("inf")), ValueError, "tau must be finite"),
    (dict(x=X, index=INDEX, a1=torch.ones(3)), ValueError, r"a1 must be a scalar or a tensor of shape \(4,\)"),
    (dict(x=X, index=INDEX, a1="1"), TypeError, "a1 must be a float or a tensor"),
    (dict(x=X, index=INDEX, p0=torch.ones(3, 5)), ValueError, "p0 must have shape"),
    (dict(x=X, index=INDEX, p0=-torch.ones(3, 4)), ValueError, "p0 must be strictly positive"),
    (dict(x=X, index=INDEX, q0=torch.ones(5)), ValueError, "q0 must have shape"),
    (dict(x=X, index=INDEX, q0=torch.zeros(6)), ValueError, "q0 must be strictly positive"),
    (dict(x=X, index=INDEX, q0=torch.full((6,), float("inf"))), ValueError, "q0 contains non-finite"),
    (dict(x=X, index=INDEX, q0=torch.ones(6), log_q0=torch.zeros(6)), ValueError, "q0 or log_q0"),
    (dict(x=X, index=INDEX, log_p0=torch.full((3, 4), float("nan"))), ValueError,
     "log_p0 contains non-finite"),
    (dict(x=X.double(), index=INDEX, backend="triton"), ValueError, "backend='triton'"),
])
def test_bad_input(kwargs, exc, match):
    kwargs = dict(kwargs)
    x = kwargs.pop("x")
    with pytest.raises(exc, match=match):
        rt.rot_pool(x, **kwargs)


def test_priors_are_normalized_per_set():
    p0 = torch.rand(3, 4) + 0.1
    q0 = torch.rand(6) + 0.1
    y = rt.rot_pool(X, INDEX, p0=p0, q0=q0, variant="paper")
    y_scaled = rt.rot_pool(X, INDEX, p0=p0 * 7.0, q0=q0 * torch.tensor([1, 1, 3, 3, 3, 9.0]),
                           variant="paper")
    assert torch.allclose(y, y_scaled, rtol=1e-5, atol=1e-6)
    # log-priors are logits: softmax'd per set
    y_log = rt.rot_pool(X, INDEX, log_p0=p0.log() + 2.0, log_q0=q0.log() - 1.0, variant="paper")
    assert torch.allclose(y, y_log, rtol=1e-5, atol=1e-6)
