"""``torch.use_deterministic_algorithms(True)`` on the Triton path (README, "Reproducibility").

Every family runs under the switch with the results it gives without. Under the switch torch
also fills every ``torch.empty`` with NaN (``torch.utils.deterministic.fill_uninitialized_memory``),
so a kernel that read memory nobody wrote would show here. The Sinkhorn backward's fixed-order
sums of its weight-gradient shares are checked against the oracle in
``tests/ops/rot/test_sinkhorn.py`` (``test_deterministic_algorithms_*``), the overlapping
windows' shares of x̄ in ``tests/ops/rot/test_window.py``
(``test_overlap_under_deterministic_algorithms``).
"""
import pytest
import torch

import rotp_triton as rt
from kernel_utils import DEVICE, RTOL, rel_err

pytest.importorskip("triton")


def _sets(method, variant="exact", ragged=False, a0=0.0):
    def make(gen):
        T = 3
        w = {k: (torch.rand(T, generator=gen) + 0.5).to(DEVICE).requires_grad_()
             for k in ("a1", "a2", "a3")}
        if ragged:
            x, ptr = torch.randn(9, 6, generator=gen), torch.tensor([0, 4, 4, 9])
        else:
            x, ptr = torch.randn(3, 5, 6, generator=gen), None
        x = x.to(DEVICE).requires_grad_()
        extra = dict(a0=a0) if a0 else {}

        def run():
            return rt.rot_pool(x, ptr=None if ptr is None else ptr.to(DEVICE), method=method,
                               variant=variant, num_iters=T, backend="triton", **w, **extra)
        return run, [x, *w.values()]
    return make


def _image(cls, method):
    def make(gen):
        m = cls(4, method=method, num_iters=3, backend="triton").to(DEVICE)
        x = torch.randn(2, 4, 4, 4, generator=gen).to(DEVICE).requires_grad_()
        return (lambda: m(x)), [x, *m.parameters()]
    return make


CASES = {"sinkhorn dense": _sets("sinkhorn"),
         "sinkhorn ragged paper": _sets("sinkhorn", "paper", ragged=True),
         "badmm-e ragged": _sets("badmm-e", ragged=True),
         "badmm-q dense paper": _sets("badmm-q", "paper"),
         "badmm-e a0": _sets("badmm-e", a0=0.3),
         "ROTPool2d sinkhorn": _image(lambda c, **k: rt.ROTPool2d(c, 2, **k), "sinkhorn"),
         # overlapping windows: their shares of x̄ summed in a fixed order, no atomics
         "ROTPool2d 3x3/2 badmm-q": _image(
             lambda c, **k: rt.ROTPool2d(c, 3, stride=2, padding=1, **k), "badmm-q"),
         "AdaptiveROTPool2d badmm-e": _image(rt.AdaptiveROTPool2d, "badmm-e")}


@pytest.mark.parametrize("case", list(CASES))
def test_same_results_under_deterministic_algorithms(case, deterministic):
    """y and every gradient under the switch == without it (fp32 tolerance: the Sinkhorn
    weight-gradient sums run in another order), all finite with NaN-filled allocations."""
    out = {}
    for fixed in (False, True):
        torch.use_deterministic_algorithms(fixed)
        run, leaves = CASES[case](torch.Generator().manual_seed(5))
        y = run()
        cy = torch.randn(y.shape, generator=torch.Generator().manual_seed(6)).to(y)
        grads = torch.autograd.grad((y * cy).sum(), leaves)
        out[fixed] = [y.detach(), *grads]
    assert torch.utils.deterministic.fill_uninitialized_memory
    for i, (a, b) in enumerate(zip(out[True], out[False])):
        assert torch.isfinite(a).all(), f"output {i}: not finite"
        assert rel_err(a, b) <= RTOL[torch.float32], f"output {i}: {rel_err(a, b):.3g}"
