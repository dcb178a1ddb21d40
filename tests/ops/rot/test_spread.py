"""The feature-scale kernels (``ops/rot/triton/spread``) against the plain float64 formulas of
``ops/rot/spread.py`` (``image_spread`` / ``dense_spread``, then x / s), forward and gradients.

Runs under TRITON_INTERPRET=1 on CPU by default and on CUDA with ROTP_TEST_DEVICE=cuda (fp16 /
bf16 there). Comparisons: ``harness.assert_close`` (relative L2 error ≤ RTOL[dtype], fp32 1e-4,
against float64 evaluated on the rounded input).
"""
import pytest
import torch

import rotp_triton as rt
from harness import DEVICE, KERNEL_DTYPES, assert_close, dtype_id
from rotp_triton.ops.rot.spread import (dense_spread, image_spread, normalize_by_spread,
                                        ragged_spread)
from rotp_triton.ops.rot.triton.spread import (launch, op, spread_normalize,
                                               spread_normalize_ragged)

pytest.importorskip("triton")


def _reference(x64, dims, gxn, gs):
    """(x / s, s, d loss / dx) in float64 by autograd through the plain spread formulas."""
    x64 = x64.detach().clone().requires_grad_()
    s = (image_spread(x64) if dims == (2, 3) else dense_spread(x64))
    s = s.view((-1,) + (1,) * (x64.dim() - 1))
    xn = x64 / s
    (g,) = torch.autograd.grad((xn * gxn).sum() + (s.flatten() * gs).sum(), x64)
    return xn.detach(), s.detach(), g


def _check(x, dims, dtype=torch.float32, seed=0, view=None):
    """The kernels on x (float64 CPU master copy; ``view`` makes the strided tensor they read)
    against :func:`_reference` on the same rounded values: x / s, s and the gradient of x under
    random cotangents of both outputs."""
    g = torch.Generator().manual_seed(seed)
    xd = x.to(DEVICE, dtype)
    xk = (view(xd) if view else xd).detach().requires_grad_()
    gxn = torch.randn(xk.shape, generator=g, dtype=torch.float64)
    gs = torch.randn(xk.shape[0], generator=g, dtype=torch.float64)
    out = spread_normalize(xk, dims, dtype)
    assert out is not None, "the kernels should apply to this layout"
    xn, s = out
    assert xn.dtype == dtype and s.dtype == torch.float32 and xn.shape == xk.shape
    assert s.shape == (xk.shape[0],) + (1,) * (xk.dim() - 1)
    (gx,) = torch.autograd.grad((xn.double() * gxn.to(DEVICE)).sum()
                                + (s.flatten().double() * gs.to(DEVICE)).sum(), xk)
    assert gx.dtype == dtype and gx.shape == xk.shape
    rxn, rs, rgx = _reference(xk.detach().double().cpu(), dims, gxn, gs)
    assert_close(s, rs, dtype, name="s")
    assert_close(xn, rxn, dtype, name="x / s")
    assert_close(gx, rgx, dtype, name="grad x")
    return s, gx, gxn


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_image_matches_formula(layout, dtype):
    """Images (pixels are the samples), both memory formats read in place; one constant image
    (spread 0: s = 1, and s passes no gradient to x there) and features far from 0 (the
    statistics merge tiles without cancellation)."""
    g = torch.Generator().manual_seed(1)
    x = 2.0 * torch.randn(3, 5, 6, 7, generator=g, dtype=torch.float64) + 300.0
    x[1] = 0.5
    view = (lambda t: t.contiguous(memory_format=torch.channels_last)) \
        if layout == "channels_last" else None
    s, gx, gxn = _check(x, (2, 3), dtype, view=view)
    assert float(s[1].detach()) == 1.0
    torch.testing.assert_close(gx[1].double().cpu(), gxn[1], rtol=1e-6, atol=1e-6)


def test_sets_strided_and_several_blocks(monkeypatch):
    """Sets (rows are the samples) read through a transposed view, with 16 × 16 tiles forced so
    that the samples span several tiles and the features several blocks (the next launch adds
    the blocks' parts); one single-row set (spread 0)."""
    monkeypatch.setattr(launch, "block_sizes", lambda F, S: (16, 16, 4))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 37, 41, generator=g, dtype=torch.float64)      # (B, D, N) in memory
    _check(x, (1,), view=lambda t: t.transpose(1, 2))
    s, _, _ = _check(x[:, :1].clone(), (1,))                           # N = 1: s = 1
    assert bool((s == 1).all())


def test_one_pixel_and_layouts_it_cannot_read():
    """A 1 × 1 image has spread 0 (s = 1); a layout whose pixels do not collapse into one stride
    (a strided crop) or float64 is left to the torch path (None)."""
    g = torch.Generator().manual_seed(3)
    s, _, _ = _check(torch.randn(2, 4, 1, 1, generator=g, dtype=torch.float64), (2, 3))
    assert bool((s == 1).all())
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    assert spread_normalize(x[:, :, 1:5, 2:6], (2, 3), x.dtype) is None
    assert spread_normalize(x.double(), (2, 3), torch.float64) is None
    # the layer's entry falls back to the torch ops there, with the same values
    xn, s = normalize_by_spread(x[:, :, 1:5, 2:6], (2, 3), x.dtype, kernels=True)
    ref = image_spread(x[:, :, 1:5, 2:6].double()).view(-1, 1, 1, 1)
    assert_close(s, ref, name="s (torch path)")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=dtype_id)
def test_ragged_rows_match_formula(dtype, monkeypatch):
    """The rows of a ragged batch (sets grouped by ptr, read through transposed strides), with
    empty sets (s = 1), a one-row set (spread 0: s = 1, no gradient through s) and a set
    spanning several 16-row tiles, against ``ragged_spread`` in float64."""
    monkeypatch.setattr(launch, "block_sizes", lambda F, S: (16, 16, 4))
    g = torch.Generator().manual_seed(5)
    lengths = [0, 3, 0, 37, 1, 0]
    ptr = torch.tensor([0] + lengths).cumsum(0)
    rows, D = int(ptr[-1]), 19
    x = torch.randn(D, rows, generator=g, dtype=torch.float64).t() + 50.0    # (rows, D)
    index = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    gxn = torch.randn(rows, D, generator=g, dtype=torch.float64)
    gs = torch.randn(len(lengths), generator=g, dtype=torch.float64)
    xk = x.to(DEVICE, dtype).detach().requires_grad_()
    out = spread_normalize_ragged(xk, ptr.to(DEVICE), dtype)
    assert out is not None
    xn, s = out
    assert xn.dtype == dtype and s.shape == (len(lengths),)
    (gx,) = torch.autograd.grad((xn.double() * gxn.to(DEVICE)).sum()
                                + (s.double() * gs.to(DEVICE)).sum(), xk)
    x64 = xk.detach().double().cpu().requires_grad_()
    rs = ragged_spread(x64, index, len(lengths))
    rxn = x64 / rs[index][:, None]
    (rgx,) = torch.autograd.grad((rxn * gxn).sum() + (rs * gs).sum(), x64)
    assert_close(s, rs, dtype, name="s")
    assert_close(xn, rxn, dtype, name="x / s")
    assert_close(gx, rgx, dtype, name="grad x")
    assert bool((s.detach().cpu()[[0, 2, 4, 5]] == 1).all())
    torch.testing.assert_close(gx[40].double().cpu(), gxn[40], rtol=1e-6, atol=1e-6)  # set 4


def test_ragged_layer_uses_the_kernels_with_ptr(monkeypatch):
    """ROTPool on ragged rows where the scale is not folded into the set kernels (an attention
    prior q0) normalises through the kernels with ``ptr``, with ``index`` only through the
    torch ops; both give the torch backend's output and gradient."""
    calls = []
    real = launch.spread_forward
    monkeypatch.setattr(launch, "spread_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(op, "spread_forward", launch.spread_forward)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(9, 5, generator=g)
    ptr = torch.tensor([0, 2, 2, 9])
    index = torch.tensor([0, 0, 2, 2, 2, 2, 2, 2, 2])
    outs = {}
    for backend, kw in (("triton", dict(ptr=ptr)), ("triton", dict(index=index)),
                        ("torch", dict(ptr=ptr))):
        torch.manual_seed(0)
        m = rt.ROTPool(5, method="badmm-e", backend=backend, q0="attention").to(DEVICE)
        xb = x.to(DEVICE).requires_grad_()
        y = m(xb, **{k: v.to(DEVICE) for k, v in kw.items()})
        (gx,) = torch.autograd.grad((y * torch.arange(5.0, device=DEVICE)).sum(), xb)
        outs[backend, next(iter(kw))] = (y, gx)
    assert calls == [1]
    for key in (("triton", "ptr"), ("triton", "index")):
        assert_close(outs[key][0], outs["torch", "ptr"][0], name=f"y {key}")
        assert_close(outs[key][1], outs["torch", "ptr"][1], name=f"grad x {key}")


@pytest.mark.parametrize("method", ["sinkhorn", "badmm-e", "badmm-q"])
def test_layer_uses_the_kernels_and_matches_the_torch_backend(method):
    """AdaptiveROTPool2d with backend='triton' takes its scale from the kernels (counted:
    the set kernel folds 1/s in and forms s itself, the backward has no dot pass -
    Sinkhorn's no spread pass at all)
    and gives the torch backend's output and input gradient."""
    from launch_counter import count_launches
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 3, 4, generator=g)
    outs = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        m = rt.AdaptiveROTPool2d(6, method=method, backend=backend).to(DEVICE)
        xb = x.to(DEVICE).requires_grad_()
        with count_launches() as launches:
            y = m(xb)
        with count_launches() as bwd:
            (gx,) = torch.autograd.grad((y * torch.arange(6.0, device=DEVICE)).sum(), xb)
        outs[backend] = (y, gx)
        if backend == "triton":
            # the one-program-per-set kernel forms s itself (STATS)
            kernel = "sinkhorn_fwd_kernel" if method == "sinkhorn" else "badmm_fwd_kernel"
            assert "spread_stats_kernel" not in launches
            assert launches.constexprs[launches.index(kernel)]["STATS"]
            assert "spread_grad_dot_kernel" not in bwd
            # Sinkhorn (exact, one tile per set here) writes the whole x̄ itself (its SPREAD)
            fold = method == "sinkhorn"
            assert ("spread_grad_kernel" in bwd) != fold
            assert fold or bwd[-1] == "spread_grad_kernel"
    assert_close(outs["triton"][0], outs["torch"][0], name="y")
    assert_close(outs["triton"][1], outs["torch"][1], name="grad x")


AOT_CODE = r"""
from aot import compile_sm90, ptxas_usage
from rotp_triton.ops.rot.triton.spread import kernels as k, launch

def signature(kernel, consts, xt):
    return {n: "constexpr" if n in consts else "*i64" if n == "ptr_ptr" else
            (xt if n in ("x_ptr", "out_ptr", "gx_ptr") else "*fp32") if n.endswith("_ptr")
            else "i32" for n in kernel.arg_names}

# the strides the JIT specialises to 1: the samples' where pixels are contiguous (NCHW images,
# a head's (B, HW, C) view), the features' for (B, N, D) sets and ragged rows
UNIT = {"samples": ("ss", "gs", "xs", "os"), "features": ("sf", "gf", "xf", "of")}
for F, S, xt, ragged, unit in [(2048, 49, "*fp32", False, "samples"),
                               (256, 3136, "*bf16", False, "samples"),
                               (2048, 49, "*fp32", False, "features"),
                               (128, 0, "*fp16", True, "features")]:
    BS, BF, num_warps = launch.block_sizes(F, S)
    NFB = (F + BF - 1) // BF
    for kernel, extra in [(k.spread_stats_kernel, {}),
                          (k.spread_normalize_kernel, dict(BP=NFB, NORMALIZE=True)),
                          (k.spread_grad_dot_kernel, {}),
                          (k.spread_grad_kernel, dict(BP=NFB, DOT=True))]:
        consts = dict(RAGGED=ragged, BS=BS, BF=BF, **extra,
                      **{n: 1 for n in UNIT[unit] if n in kernel.arg_names})
        c = compile_sm90(kernel, signature(kernel, consts, xt), consts, num_warps=num_warps)
        assert ".target sm_90" in c.asm["ptx"]
        u = ptxas_usage(c)
        print("spread", kernel.fn.__name__, F, S, xt, ragged, unit, "regs", u["registers"],
              "spill", u["spill_bytes"])
"""


def test_aot_compile_sm90():
    """The four kernels compile for sm_90 at the head-pool (F = 2048, S = 49, fp32), window
    (256 channels, 56 × 56 pixels, bf16) and ragged-rows (D = 128, fp16) sizes, with the unit
    strides the JIT specialises (contiguous pixels or contiguous features), without spills
    (4,096-element tiles spilled up to 10 KB with contiguous pixels)."""
    from harness import run_without_interpreter
    out = run_without_interpreter(AOT_CODE, timeout=600)
    lines = [l for l in out.splitlines() if l.startswith("spread")]
    print("\n".join(lines))
    assert len(lines) == 16
    assert all(l.endswith("spill 0") for l in lines), lines
