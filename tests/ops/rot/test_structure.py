"""Triton kernels of ROT pooling with α0 > 0 (rotp_triton/ops/rot/triton/structure/).

Every kernel result is compared with the float64 per-set oracle ``reference.rot`` (forward and
gradients of every input: x, the six weights as per-iteration (T,) vectors, and the prior
logits). Tolerance: relative L2 error 1e-4 in fp32 (kernel_utils.RTOL), measured against the
norm of the reference, floored at 1e-3 × the norm of the x-gradient for gradients that are
(nearly) zero in exact arithmetic (α2, α3 have no effect in the paper's B-ADMM, DESIGN §3.3).

By default the kernels run under TRITON_INTERPRET=1 on CPU (tiny shapes, T = 2); with
ROTP_TEST_DEVICE=cuda on the GPU, plus fp16/bf16 forward. ``test_aot_sm90`` compiles every
kernel for sm_90 with the realistic W1 constexprs (N = 500, D = 100) in a subprocess without the
interpreter.
"""
import math

import pytest
import torch

import rotp_triton as rt
from rotp_triton.ops.rot.triton import common
from harness import DEVICE, KERNEL_DTYPES, ON_CUDA, RTOL, rel_err, run_without_interpreter
from reference import rot as ref

METHODS = ("badmm-e", "badmm-q", "sinkhorn")
VARIANTS = ("exact", "paper")
T = 2
K = 2


def _weights(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(T, generator=g, dtype=torch.float64)
    a3 = u(0.5, 2.0)
    a3[-1] = float("inf")                               # a hard marginal in the last module
    return dict(a0=u(0.5, 2.0), a1=u(0.5, 1.5), a2=u(0.5, 3.0), a3=a3, rho=u(0.8, 1.5),
                tau=u(0.3, 1.2))


def _sets(sizes, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, D, generator=g, dtype=torch.float64) for n in sizes]


def _reference(xs, lp0, lq0s, ws, method, variant, Tn=T, Kn=K):
    """(Y (B, D), plans) of the float64 oracle; priors as softmax of the logits."""
    p0s = [torch.softmax(lp0[i], 0) for i in range(len(xs))]
    q0s = [torch.softmax(q, 0) if q.numel() else None for q in lq0s]
    return ref.rot_pool_sets(xs, p0s=p0s, q0s=q0s, method=method, variant=variant,
                             num_iters=Tn, inner_iters=Kn, **ws)


def _kernel(x, ptr, lp0, lq0, ws, method, variant, dtype=torch.float32, Tn=T, Kn=K):
    return rt.rot_pool(x.to(DEVICE, dtype), ptr=None if ptr is None else ptr.to(DEVICE),
                       method=method, variant=variant, num_iters=Tn, inner_iters=Kn,
                       log_p0=lp0.to(DEVICE, dtype), log_q0=lq0.to(DEVICE, dtype),
                       backend="triton", return_plan=True,
                       **{k: v.to(DEVICE, dtype) for k, v in ws.items()})


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _check_case(sizes, D, method, variant, *, dense, grads, seed=0, Tn=T, overrides=None):
    """Forward (y and plan) and, with ``grads``, every gradient against the reference.
    ``overrides``: weight name -> value for all Tn modules (instead of the random draw)."""
    xs = _sets(sizes, D, seed)
    B = len(sizes)
    g = torch.Generator().manual_seed(seed + 1)
    lp0 = torch.randn(B, D, generator=g, dtype=torch.float64)
    lq_rows = torch.randn(sum(sizes), generator=g, dtype=torch.float64)
    ws = _weights(Tn, seed)
    for k, v in (overrides or {}).items():
        ws[k] = torch.full((Tn,), float(v), dtype=torch.float64)
    gy = torch.randn(B, D, generator=g, dtype=torch.float64)
    gplan = torch.randn(sum(sizes), D, generator=g, dtype=torch.float64)

    # oracle, float64
    r_xs = [_leaf(x) for x in xs]
    r_lp0, r_lq = _leaf(lp0), _leaf(lq_rows)
    r_ws = {k: _leaf(v) for k, v in ws.items()}
    y_ref, plans_ref = _reference(r_xs, r_lp0, list(torch.split(r_lq, sizes)), r_ws, method,
                                  variant, Tn=Tn)
    plan_ref = torch.cat(plans_ref, 0)
    # kernels, fp32
    if dense:
        k_x = _leaf(torch.stack(xs).to(DEVICE, torch.float32))
        ptr = None
        k_lq = _leaf(lq_rows.view(B, sizes[0]).to(DEVICE, torch.float32))
    else:
        k_x = _leaf(torch.cat(xs).to(DEVICE, torch.float32))
        ptr = torch.zeros(B + 1, dtype=torch.int64)
        ptr[1:] = torch.cumsum(torch.tensor(sizes), 0)
        k_lq = _leaf(lq_rows.to(DEVICE, torch.float32))
    k_lp0 = _leaf(lp0.to(DEVICE, torch.float32))
    k_ws = {k: _leaf(v.to(DEVICE, torch.float32)) for k, v in ws.items()}
    y, plan = rt.rot_pool(k_x, ptr=None if ptr is None else ptr.to(DEVICE), method=method,
                          variant=variant, num_iters=Tn, inner_iters=K, log_p0=k_lp0,
                          log_q0=k_lq, backend="triton", return_plan=True, **k_ws)
    tol = RTOL[torch.float32]
    assert y.dtype == torch.float32 and y.shape == (B, D)
    assert torch.isfinite(y).all() and torch.isfinite(plan).all()
    assert rel_err(y, y_ref) <= tol, rel_err(y, y_ref)
    assert rel_err(plan.reshape(-1, D), plan_ref) <= tol
    if not grads:
        return
    ((y_ref * gy).sum() + (plan_ref * gplan).sum()).backward()
    ((y * gy.to(y)).sum() + (plan * gplan.to(plan).view(plan.shape)).sum()).backward()
    gx_ref = torch.cat([x.grad if x.grad is not None else torch.zeros_like(x) for x in r_xs])
    floor = 1e-3 * float(gx_ref.norm())
    pairs = [("x", k_x.grad.reshape(-1, D), gx_ref), ("log_p0", k_lp0.grad, r_lp0.grad),
             ("log_q0", k_lq.grad.reshape(-1), r_lq.grad)]
    for k in ws:
        ref_g = r_ws[k].grad if r_ws[k].grad is not None else torch.zeros(Tn, dtype=torch.float64)
        pairs.append((k, k_ws[k].grad, ref_g))
    for name, got, want in pairs:
        assert got is not None, name
        err = float((got.double().cpu() - want).norm()) / max(float(want.norm()), floor)
        assert math.isfinite(err) and err <= tol, (name, err, got, want)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method", METHODS)
def test_forward_and_gradients_n_greater_than_d(method, variant):
    """N > D: Σ1 (D×D) materialized, Σ2 applied through its factor."""
    _check_case([6, 6], 3, method, variant, dense=True, grads=True)


@pytest.mark.parametrize("method", METHODS)
def test_forward_and_gradients_d_greater_than_n(method):
    """N < D: Σ2 (N×N) materialized, Σ1 through its factor; ragged with an empty set (its
    y must be 0 like the reference's and every gradient finite)."""
    _check_case([3, 0, 4], 7, method, "exact", dense=False, grads=True, seed=3)


@pytest.mark.parametrize("method,variant", [("badmm-e", "exact"), ("badmm-q", "paper"),
                                            ("sinkhorn", "exact"), ("sinkhorn", "paper"),
                                            ("badmm-e", "paper"), ("badmm-q", "exact")])
def test_forward_and_gradients_ragged_mixed_orders(method, variant):
    """A ragged batch whose sets take both Gram orders in one launch (n_b >= D: Σ1; n_b < D:
    Σ2, chosen per set on the device) with an empty set, every method and variant (the paper
    B-ADMM's dual updates are segment sums over the rows)."""
    _check_case([5, 0, 2, 3], 3, method, variant, dense=False, grads=True, seed=19)


@pytest.mark.parametrize("method", METHODS)
def test_forward_and_gradients_ragged_gram_slots(method):
    """A ragged batch whose sets average more rows than D keeps each set's Gram matrix and
    product scratch in a slot of D² elements (launch.gram_slot; the batches above use the row
    layout, bounds[b]·D), with sets of both orders (n_b < D: Σ2 in part of its slot) and an
    empty one (x is fp32 and contiguous: the kernels read it in place, no row copy)."""
    from rotp_triton.ops.rot.triton.structure.launch import gram_slot
    sizes, D = [30, 2, 0, 25], 4
    assert gram_slot(len(sizes), sum(sizes), D, None) == D * D
    assert gram_slot(4, 10, 3, None) == 0          # test_..._ragged_mixed_orders' batch
    _check_case(sizes, D, method, "exact", dense=False, grads=True, seed=37)


@pytest.mark.parametrize("method,variant", [("badmm-e", "exact"), ("badmm-q", "paper"),
                                            ("sinkhorn", "exact"), ("sinkhorn", "paper")])
def test_forward_and_gradients_split_adjoint_rows(monkeypatch, method, variant):
    """The Σ adjoint's (n_b, D) stage on J programs per set (sigma_adjoint_rows_kernel, the
    W1 path: fewer sets than SMs), forced at small shapes: sets of 1-3 row tiles (D = 3: 16-row
    tiles) and an empty one with J = 2 (every other tile), then n_b < D sets with J = 3
    (programs with no tile): every gradient against the reference."""
    from rotp_triton.ops.rot.triton.structure import launch
    monkeypatch.setattr(launch, "ADJOINT_ROW_PROGRAMS", 2)
    _check_case([40, 0, 20, 5], 3, method, variant, dense=False, grads=True, seed=29)
    monkeypatch.setattr(launch, "ADJOINT_ROW_PROGRAMS", 3)
    _check_case([3, 0, 4], 7, method, variant, dense=False, grads=True, seed=31)


def test_autograd_function_fallback(monkeypatch):
    """The autograd.Function used where torch has no triton_op gives the reference gradients
    (in eager mode it is taken anyway: common.eager_function; here as the fallback)."""
    from rotp_triton.ops.rot.triton.structure import op as ts
    monkeypatch.setattr(ts, "structure_fwd_op", None)
    monkeypatch.setattr(common, "EAGER_FUNCTION", False)
    _check_case([4, 0, 2], 3, "badmm-q", "paper", dense=False, grads=True, seed=17)


@pytest.mark.parametrize("method,variant", [("badmm-e", "paper"), ("badmm-e", "exact"),
                                            ("sinkhorn", "exact")])
def test_gradients_checkpoint_segments(method, variant):
    """T = 5 (checkpoints every ⌈√5⌉ = 3 iterations): the backward's re-runs from a checkpoint
    with plain iterations before the kept pair (segment [0, 3): iteration 0 run, then 1 and 2
    kept) and a segment of two (B-ADMM keeps both re-runs for two reverse steps)."""
    _check_case([4, 0, 3], 3, method, variant, dense=False, grads=True, seed=23, Tn=5)


@pytest.mark.parametrize("Tn", [1, 3])
@pytest.mark.parametrize("method", ["badmm-e", "sinkhorn"])
def test_gradients_odd_t(method, Tn):
    """T = 1 (one re-run, no checkpoint) and T = 3 (a checkpoint at 2, a lone re-run last):
    every gradient against the reference with the reverse pass's buffers shared as
    launch._scratch_layout plans them (∂L/∂log P_T and the zero gradient of the final state
    wait in gradient buffers that later reverse steps overwrite)."""
    _check_case([4, 0, 3], 3, method, "exact", dense=False, grads=True, seed=41, Tn=Tn)


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "ragged"])
def test_badmm_q_exact_large_a1(dense):
    """B-Q exact at α1/ρ = 1e3 (T = 8), where the spec's step weight ρ made the P/S updates
    chaotic (1 - α1 S/ρ < -1): the stable step weight ρ + α1 gives finite outputs and gradients
    equal to the reference's."""
    sizes, D = ([5, 5], 3) if dense else ([4, 6], 3)
    _check_case(sizes, D, "badmm-q", "exact", dense=dense, grads=True, seed=5, Tn=8,
                overrides=dict(a1=1e3, rho=1.0))


@pytest.mark.parametrize("custom_op", [False, True], ids=["function", "custom-op"])
def test_saved_state_does_not_grow_with_t(monkeypatch, custom_op):
    """The forward keeps the same tensors for the backward whatever T (DESIGN §7): its inputs
    and log P_T, nothing per iteration (the backward rebuilds the states from the inputs)."""
    from rotp_triton.ops.rot.triton.structure import op as ts
    if custom_op and ts.structure_fwd_op is None:
        pytest.skip("torch has no torch.library.triton_op")
    monkeypatch.setattr(common, "EAGER_FUNCTION", not custom_op)   # the operator in eager mode
    x = torch.randn(2, 6, 3, device=DEVICE, requires_grad=True)
    kept = []
    for Tn in (1, 3):
        y = rt.rot_pool(x, method="badmm-e", num_iters=Tn, a0=0.5, backend="triton")
        kept.append(tuple(None if t is None else tuple(t.shape)
                          for t in y.grad_fn.saved_tensors))
    # x, 6 weights of (T,) elements, log P_T (R, D): only the weights' length changes
    for k in kept:
        big = [s for s in k if s is not None and len(s) > 1]
        assert big == [(2, 6, 3), (12, 3)], kept


@pytest.mark.parametrize("sizes,D", [([1, 1], 4), ([5, 2], 1), ([17, 1, 0, 9], 20)])
def test_forward_awkward_shapes(sizes, D):
    """N = 1, D = 1, and a ragged batch mixing sizes across a 16-row tile, one set empty."""
    _check_case(sizes, D, "badmm-e", "exact", dense=False, grads=False, seed=5)


def test_set_independent_of_batch():
    """A set's output does not depend on the other sets (per-set normalization of Σ1, Σ2)."""
    xs = _sets([5, 3], 6, seed=9)
    ws = {k: v.float() for k, v in _weights(T).items()}
    ptr = torch.tensor([0, 5, 8], device=DEVICE)
    both = rt.rot_pool(torch.cat(xs).float().to(DEVICE), ptr=ptr, method="sinkhorn",
                       num_iters=T, inner_iters=K, backend="triton",
                       **{k: v.to(DEVICE) for k, v in ws.items()})
    alone = rt.rot_pool(xs[1].float().to(DEVICE)[None] * 1, method="sinkhorn", num_iters=T,
                        inner_iters=K, backend="triton",
                        **{k: v.to(DEVICE) for k, v in ws.items()})
    assert rel_err(both[1], alone[0]) <= 1e-5


def test_strided_dense_input():
    """A non-contiguous dense batch (features strided) is read in place."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(2, 5, 8, generator=g)
    x = base.transpose(1, 2).contiguous().transpose(1, 2).to(DEVICE)   # (2, 5, 8), stride_d = 5
    assert not x.is_contiguous()
    kw = dict(method="badmm-e", num_iters=T, a0=0.7, backend="triton")
    assert rel_err(rt.rot_pool(x, **kw), rt.rot_pool(x.contiguous(), **kw)) <= 1e-6


@pytest.mark.skipif(not ON_CUDA, reason="fp16/bf16 kernels are checked on the GPU only")
@pytest.mark.parametrize("dtype", [d for d in KERNEL_DTYPES if d != torch.float32])
@pytest.mark.parametrize("method", METHODS)
def test_reduced_precision_forward(method, dtype):
    xs = _sets([40, 33], 24, seed=13)
    ws = _weights(4)
    y_ref, _ = ref.rot_pool_sets([x.to(dtype).double() for x in xs], method=method, num_iters=4,
                                 inner_iters=3, **ws)
    y = rt.rot_pool(torch.cat(xs).to(DEVICE, dtype), ptr=torch.tensor([0, 40, 73], device=DEVICE),
                    method=method, num_iters=4, inner_iters=3, backend="triton",
                    **{k: v.to(DEVICE, torch.float32) for k, v in ws.items()})
    assert y.dtype == dtype
    assert rel_err(y, y_ref) <= RTOL[dtype]


def _custom_op():
    from rotp_triton.ops.rot.triton.structure import op as ts
    if ts.structure_fwd_op is None:
        pytest.skip("torch has no torch.library.triton_op")
    return ts


def test_custom_op_matches_autograd_function(monkeypatch):
    """The custom-operator path (explicit pooling / factor adjoints around the backward op)
    gives the forward and gradients of the autograd.Function path, to fp32 rounding."""
    _custom_op()          # (skips where torch has no triton_op)
    g = torch.Generator().manual_seed(21)
    x0 = torch.randn(7, 5, generator=g).to(DEVICE)
    ptr = torch.tensor([0, 4, 4, 7], device=DEVICE)
    lq = torch.randn(7, generator=g).to(DEVICE)
    ws = {k: v.float().to(DEVICE) for k, v in _weights(T, seed=4).items()}
    gy = torch.randn(3, 5, generator=g).to(DEVICE)
    gpl = torch.randn(7, 5, generator=g).to(DEVICE)

    def run(use_op):
        monkeypatch.setattr(common, "EAGER_FUNCTION", not use_op)
        x, q = _leaf(x0), _leaf(lq)
        w = {k: _leaf(v) for k, v in ws.items()}
        y, plan = rt.rot_pool(x, ptr=ptr, method="badmm-q", num_iters=T, log_q0=q,
                              backend="triton", return_plan=True, **w)
        leaves = [x, q] + list(w.values())
        return [y, plan] + list(torch.autograd.grad((y * gy).sum() + (plan * gpl).sum(),
                                                    leaves))

    for a, b in zip(run(True), run(False)):
        assert rel_err(a, b) <= 1e-5, rel_err(a, b)


def test_opcheck_custom_op():
    """torch.library.opcheck of the forward op (schema, autograd registration, fake tensor)
    on a dense batch."""
    ts = _custom_op()
    g = torch.Generator().manual_seed(22)
    x = torch.randn(2, 4, 3, generator=g).to(DEVICE).requires_grad_()
    ws = [v.float().to(DEVICE).requires_grad_() for v in _weights(T, seed=2).values()]
    lp0 = torch.log_softmax(torch.randn(2, 3, generator=g), -1).to(DEVICE)
    torch.library.opcheck(ts.structure_fwd_op,
                          (x, None, lp0, None, *ws, "sinkhorn", "exact", K, True),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


def test_opcheck_custom_op_ragged():
    """opcheck of the forward and backward ops on a ragged batch with an empty set (ptr only:
    the kernels find each set's rows on the device)."""
    ts = _custom_op()
    g = torch.Generator().manual_seed(24)
    ptr = torch.tensor([0, 3, 3, 7], device=DEVICE)
    x = torch.randn(7, 5, generator=g).to(DEVICE).requires_grad_()
    lq0 = torch.randn(7, generator=g).to(DEVICE)
    ws = [v.float().to(DEVICE).requires_grad_() for v in _weights(T, seed=5).values()]
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ts.structure_fwd_op,
                          (x, ptr, None, lq0, *ws, "badmm-e", "exact", K, True),
                          test_utils=utils)
    _, _, log_p = ts.structure_fwd_op(x, ptr, None, lq0, *ws, "badmm-e", "exact", K, True)
    gy = torch.randn(3, 5, generator=g).to(DEVICE)
    torch.library.opcheck(ts.structure_bwd_op,
                          (x.detach(), ptr, None, lq0, *[w.detach() for w in ws], log_p, gy,
                           None, "badmm-e", "exact", K),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("layout", ["dense", "ragged"])
@pytest.mark.parametrize("a0_tensor", [False, True], ids=["a0-float", "a0-tensor"])
def test_torch_compile_fullgraph(a0_tensor, layout):
    """torch.compile(fullgraph=True) of rt.rot_pool(x, a0=0.3, backend="triton") on a dense
    batch and on a ragged one with an empty set (no host read of ptr) traces without graph
    breaks and gives the eager y and gradients (x and the (T,) α0). Under the interpreter the
    compiled graph runs on the "eager" backend (wrap_triton returns the raw interpreted kernel,
    which AOT tracing cannot enter); on CUDA on inductor."""
    _custom_op()
    g = torch.Generator().manual_seed(23)
    if layout == "dense":
        x, ptr = torch.randn(2, 5, 3, generator=g).to(DEVICE), None
    else:
        x, ptr = torch.randn(9, 3, generator=g).to(DEVICE), torch.tensor([0, 5, 5, 9],
                                                                          device=DEVICE)
    a0 = torch.tensor([0.3, 0.3], device=DEVICE)

    def f(x, a0, ptr):
        return rt.rot_pool(x, ptr=ptr, a0=a0 if a0_tensor else 0.3, num_iters=2,
                           backend="triton")

    def run(fn):
        xl, al = x.clone().requires_grad_(), a0.clone().requires_grad_()
        y = fn(xl, al, ptr)
        wgt = torch.arange(y.numel(), device=DEVICE, dtype=y.dtype).reshape(y.shape)
        return (y,) + torch.autograd.grad((y * wgt).sum(), [xl, al] if a0_tensor else [xl])

    eager = run(f)
    torch._dynamo.reset()
    compiled = run(torch.compile(f, fullgraph=True, backend="inductor" if ON_CUDA else "eager"))
    for a, b in zip(compiled, eager):
        assert rel_err(a, b) <= 1e-6, rel_err(a, b)


_AOT = r"""
import triton
from aot import compile_sm90, ptxas_usage
from rotp_triton.ops.rot.triton.structure import kernels as ts
from rotp_triton.ops.rot.triton.structure.launch import PER_SET_WARPS, mm_meta, row_block
N, D = 500, 100          # W1
BD = triton.next_power_of_2(D)
BN = row_block(BD)
P, I = "*fp32", "i32"
SIGMA = dict(xc_ptr=P, xt_ptr=P, gram_ptr=P, scratch_ptr=P, gram_slot=I)   # Σ prologue
SIGMA_ADJ = dict(xc_ptr=P, xt_ptr=P, gram_ptr=P, scratch_ptr=P, gram_slot=I, dxc_ptr=P,
                 dxt_ptr=P)
SIGMA_CONST = dict(PRECISION="ieee", **mm_meta(D))
B64 = "*i64"
def ck(kernel, sig, const, name, sigma=None):
    sig = dict(sig)
    if sigma is not None:     # a step kernel with the structure product fused in
        sig.update(sigma)
        const = dict(SIGMA_CONST, **const)
    sig.update({k: "constexpr" for k in const})
    c = compile_sm90(kernel, sig, const, num_warps=PER_SET_WARPS)   # as the launchers
    u = ptxas_usage(c)   # ptxas -v: cuobjdump's LOCAL stays 0 when registers spill
    print(f"RESULT {name} REG:{u['registers']} SPILL:{u['spill_bytes']}")
"""

# the kernels in four groups, one subprocess each (each fits the timeout on a loaded machine)
_AOT_GROUPS = {
    "factors-and-products": r"""
for dense, dtype in ((True, "*fp16"), (False, "*fp32")):
    ck(ts.structure_factors_kernel,
       dict(x_ptr=dtype, bounds_ptr=B64, log_p0_ptr=P, log_q0_ptr=dtype, x32_ptr=P, xc_ptr=P,
            xt_ptr=P, gram_ptr=P, gram_slot=I, lq0_ptr=P, log_s0_ptr=P, s_xb=I, s_xn=I,
            s_xd=I, D=I, log_p_T_ptr=P, gy_ptr=P, gplan_ptr=dtype, g_lp_T_ptr=P, g_x_ptr=P),
       dict(DENSE_X=dense, WRITE_X32=dense, HAS_Q0=not dense, PRECISION="ieee", **mm_meta(D),
            BN=BN, BD=BD, POOL_BWD=not dense, HAS_GPLAN=not dense),
       f"factors[dense={dense},with_pool_grad={not dense}]")
for prec in ("ieee", "tf32", "bf16"):
    ck(ts.sigma_product_kernel,
       dict(m_ptr=P, xc_ptr=P, xt_ptr=P, gram_ptr=P, scratch_ptr=P, gram_slot=I, out_ptr=P,
            bounds_ptr=B64, D=I), dict(EXP_M=True, PRECISION=prec, **mm_meta(D, prec)),
       f"sigma_product[{prec}]")
for prec in ("ieee", "tf32"):
    ck(ts.sigma_adjoint_kernel,
       dict(m_ptr=P, g_ptr=P, xc_ptr=P, xt_ptr=P, gram_ptr=P, scratch_ptr=P, gram_slot=I,
            dxc_ptr=P, dxt_ptr=P, dm_ptr=P, bounds_ptr=B64, D=I),
       dict(PRECISION=prec, **mm_meta(D, prec), ROWS_HERE=True), f"sigma_adjoint[{prec}]")
ck(ts.sigma_adjoint_rows_kernel,
   dict(m_ptr=P, g_ptr=P, xc_ptr=P, xt_ptr=P, scratch_ptr=P, gram_slot=I, dxc_ptr=P, dxt_ptr=P,
        dm_ptr=P, bounds_ptr=B64, D=I), dict(PRECISION="ieee", **mm_meta(D)), "sigma_adjoint_rows")
""",
    "badmm-steps": r"""
for quad, paper in ((True, False), (False, True)):
    ck(ts.badmm_p_step_kernel,
       dict(x_ptr=P, log_s_ptr=P, z_ptr=P, sig_ptr=P, log_p_ptr=P, log_p0_ptr=P,
            log_mu_ptr=P, r_out_ptr=P, mu_out_ptr=P, bounds_ptr=B64, a0_ptr=P, a1_ptr=P,
            a2_ptr=P, rho_ptr=P, t=I, D=I),
       dict(QUADRATIC=quad, PAPER=paper, SAVE=not paper, BN=BN, BD=BD),
       f"p_step[quad={quad},paper={paper}]", SIGMA)
    ck(ts.badmm_s_step_kernel,
       dict(log_p_ptr=P, z_ptr=P, sig_ptr=P, log_s_ptr=P, c_ptr=P, log_q0_ptr=P,
            log_eta_ptr=P, z2_ptr=P, log_p0_ptr=P, log_mu_ptr=P, z1_ptr=P, eta_out_ptr=P,
            bounds_ptr=B64, a0_ptr=P, a1_ptr=P, a2_ptr=P, a3_ptr=P, rho_ptr=P, t=I, D=I),
       dict(QUADRATIC=quad, PAPER=paper, SAVE=not paper, BN=BN, BD=BD),
       f"s_step[quad={quad},paper={paper}]", SIGMA)
""",
    "badmm-adjoints": r"""
for quad, paper in ((False, True), (True, False)):
    ck(ts.badmm_s_step_bwd_kernel,
       dict(g_ls_ptr=P, g_z_ptr=P, log_p_ptr=P, z_ptr=P, sig_p_ptr=P, log_s_new_ptr=P, c_ptr=P,
            eta_ptr=P, log_q0_ptr=P, g_z_out_ptr=P, g_sig_ptr=P, g_lp_ptr=P, g_p_ptr=P,
            g_lq0_ptr=P, gvec_ptr=P, row_x_ptr=P, col_x_ptr=P, wpart_ptr=P, bounds_ptr=B64,
            a0_ptr=P, a1_ptr=P, a3_ptr=P, rho_ptr=P, t=I, D=I),
       dict(QUADRATIC=quad, PAPER=paper, BN=BN, BD=BD, ROWS_HERE=paper),
       f"s_step_bwd[quad={quad},paper={paper},rows_here={paper}]", SIGMA_ADJ)
    ck(ts.badmm_p_step_bwd_kernel,
       dict(g_lp_ptr=P, g_p_ptr=P, log_p_ptr=P, log_s_ptr=P, z_ptr=P, x_ptr=P, sig_s_ptr=P,
            r_ptr=P, mu_ptr=P, log_p0_ptr=P, g_l_ptr=P, g_x_ptr=P, g_z_ptr=P, g_sig_ptr=P,
            g_lp0_ptr=P, wpart_ptr=P, bounds_ptr=B64, a0_ptr=P, a1_ptr=P, a2_ptr=P,
            rho_ptr=P, t=I, D=I), dict(QUADRATIC=quad, PAPER=paper, BN=BN, BD=BD,
                                       ROWS_HERE=quad),
       f"p_step_bwd[quad={quad},paper={paper},rows_here={quad}]", SIGMA_ADJ)
""",
    "sinkhorn-and-pooling": r"""
for paper in (False, True):
    ck(ts.sinkhorn_prox_step_kernel,
       dict(x_ptr=P, log_p_ptr=P, sig_ptr=P, y0_ptr=P, bvec_ptr=P, c_ptr=P, log_p0_ptr=P,
            log_q0_ptr=P, hist_r_ptr=P, hist_a_ptr=P, hist_c_ptr=P, hist_b_ptr=P,
            bounds_ptr=B64, a0_ptr=P, a1_ptr=P, a2_ptr=P, a3_ptr=P, tau_ptr=P,
            t=I, K=I, n_rows=I, D=I), dict(PAPER=paper, SAVE=not paper, BN=BN, BD=BD),
       f"sinkhorn_prox[paper={paper}]", SIGMA)
for paper in (False, True):
    ck(ts.sinkhorn_prox_step_bwd_kernel,
       dict(g_out_ptr=P, x_ptr=P, log_p_ptr=P, sig_ptr=P, y0_ptr=P, gy0_ptr=P, hist_r_ptr=P,
            hist_a_ptr=P, hist_c_ptr=P, hist_b_ptr=P, gb_ptr=P, gc_ptr=P, log_p0_ptr=P,
            log_q0_ptr=P, g_lp_ptr=P, g_x_ptr=P, g_sig_ptr=P, g_lp0_ptr=P, g_lq0_ptr=P,
            wpart_ptr=P, bounds_ptr=B64, a0_ptr=P, a1_ptr=P, a2_ptr=P, a3_ptr=P, tau_ptr=P, t=I,
            K=I, n_rows=I, D=I), dict(PAPER=paper, BN=BN, BD=BD, ROWS_HERE=paper),
       f"sinkhorn_prox_bwd[paper={paper},rows_here={paper}]", SIGMA_ADJ)
ck(ts.pool_from_log_plan_kernel,
   dict(log_p_ptr=P, x_ptr=P, y_ptr="*bf16", plan_ptr="*bf16", bounds_ptr=B64, D=I),
   dict(WRITE_PLAN=True, BN=BN, BD=BD), "pool")
ck(ts.structure_factors_bwd_kernel,
   dict(x32_ptr=P, g_xc_ptr=P, g_xt_ptr=P, g_x_ptr=P, bounds_ptr=B64, D=I),
   dict(BN=BN, BD=BD), "factors_bwd")
""",
}


@pytest.mark.parametrize("group,n_kernels", [("factors-and-products", 8), ("badmm-steps", 4),
                                             ("badmm-adjoints", 4), ("sinkhorn-and-pooling", 6)])
def test_aot_sm90(group, n_kernels):
    """Every kernel (each constexpr branch at least once; both Gram orders are in every binary,
    chosen per set at run time) compiles for sm_90 at the W1 sizes (N = 500, D = 100), and
    ptxas -v reports no register spills, except the adjoint kernels (many live [BN, BD] tiles
    in their passes): at most ADJOINT_SPILL_BYTES each (9.5 KiB with BK = 64 at 8 warps; at
    PER_SET_WARPS = 16 with square GEMM tiles one adjoint spills 32 B, the rest none)."""
    out = run_without_interpreter(_AOT + _AOT_GROUPS[group], timeout=1200)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT")]
    print("\n".join(lines))
    assert len(lines) == n_kernels
    for line in lines:
        name, spill = line.split()[1], int(line.rsplit("SPILL:", 1)[1])
        adjoint = "bwd" in name or "adjoint" in name
        assert spill <= (ADJOINT_SPILL_BYTES if adjoint else 0), line


ADJOINT_SPILL_BYTES = 640


# ============================================================================================
# launches and saved memory (issue #13)
# ============================================================================================
def _expected_launches(method, Tn, split_rows=False):
    """The launch plan of docs/adjoints.md: forward = factors (+ Gram) · L per iteration ·
    pool; backward = factors with the pooling adjoint · the factors' adjoint · one sweep to the
    √T checkpoints · the re-runs inside each segment · per iteration the adjoints (L, Σ
    adjoints fused; with ``split_rows`` each followed by the Σ adjoint's (n_b, D) stage on
    several programs per set). S re-runs each iteration t from its checkpoint (t - ck + 1
    runs); B-ADMM re-runs two iterations at a time, keeping both (j + 1 runs for the pair
    ending at the segment's j-th iteration, j = m - 1, m - 3, ...)."""
    L = 1 if method == "sinkhorn" else 2
    k = math.ceil(math.sqrt(Tn))
    sweep = k * ((Tn - 1) // k)
    rerun = 0
    for a in range(0, Tn, k):
        m = min(k, Tn - a)
        if method == "sinkhorn":
            rerun += sum(j + 1 for j in range(m))
        else:
            rerun += sum(j + 1 for j in range(m - 1, -1, -2))
    fwd = 1 + L * Tn + 1
    bwd = 2 + L * (sweep + rerun) + L * Tn * (2 if split_rows else 1)   # 2: factors, adjoint
    return fwd, bwd


@pytest.mark.parametrize("split_rows", [False, True], ids=["rows-in-step", "rows-split"])
@pytest.mark.parametrize("method,Tn", [(m, 4) for m in METHODS] + [("badmm-e", 16)],
                         ids=lambda v: str(v))
def test_launch_count(monkeypatch, method, Tn, split_rows):
    """Launches per call, counted: at most 3 per iteration forward (B-ADMM 2: P-step and
    S-step with their structure products fused; S 1), forward+backward at T = 4 at most 40
    (it was 213 for B-ADMM) also with the Σ adjoint's (n_b, D) stage in its own launch (W1:
    fewer sets than SMs), and the backward's recompute O(T^1.5), not O(T²). Counted without
    running the kernels (their values are tested above)."""
    from launch_counter import count_launches
    from rotp_triton.ops.rot.triton.structure import launch
    monkeypatch.setattr(launch, "ADJOINT_ROW_PROGRAMS", 2 if split_rows else 1)
    x = torch.randn(2, 5, 3, device=DEVICE, requires_grad=True)
    with count_launches(execute=False) as fwd:
        y = rt.rot_pool(x, method=method, num_iters=Tn, inner_iters=2, a0=0.5,
                        backend="triton")
    with count_launches(execute=False) as bwd:
        y.sum().backward()
    assert (len(fwd), len(bwd)) == _expected_launches(method, Tn, split_rows), (fwd, bwd)
    assert len(fwd) <= 3 * Tn + 2
    if Tn == 4:
        assert len(fwd) + len(bwd) <= 40


def test_saved_bytes_at_t16():
    """What the forward keeps for the backward at T = 16 (saved-tensor hooks): x, log P_T (fp32,
    the input's size) and the six (T,) weight vectors, nothing per iteration (the backward
    rebuilds the states from the inputs, DESIGN §7): at most 3× the input's bytes once the
    weights (6·T·4 bytes) are set aside."""
    x = torch.randn(3, 7, 4, device=DEVICE, requires_grad=True)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = rt.rot_pool(x, method="badmm-e", num_iters=16, a0=0.5, backend="triton")
    x_bytes = x.numel() * x.element_size()
    weight_bytes = 6 * 16 * 4
    assert 0 < sum(saved.values()) - weight_bytes <= 3 * x_bytes, (saved, x_bytes)
    assert y.grad_fn is not None


@pytest.mark.parametrize("setting,dtype,expect", [("ieee", torch.float32, "ieee"),
                                                  ("tf32", torch.float32, "tf32"),
                                                  ("tensor-core", torch.float32, "tf32"),
                                                  ("tensor-core", torch.bfloat16, "bf16")],
                         ids=["ieee", "tf32", "tensor-core-fp32", "tensor-core-bf16"])
def test_dot_precision_option(monkeypatch, setting, dtype, expect):
    """The tensor-core option reaches every launch that has a dot (fp32 "ieee" by default).
    Its accuracy is a GPU matter (the interpreter computes every dot in fp32): see
    test_tensor_core_accuracy; the sm_90 compile of tf32 / bf16 dots is in test_aot_sm90."""
    from launch_counter import count_launches
    from rotp_triton.ops.rot.triton.structure import launch
    monkeypatch.setattr(launch, "DOT_PRECISION", setting)
    assert launch.dot_precision(dtype) == expect
    if dtype != torch.float32 and not ON_CUDA:
        return   # the interpreter has no bf16
    x = torch.randn(2, 5, 3, device=DEVICE, dtype=dtype, requires_grad=True)
    with count_launches() as launches:
        rt.rot_pool(x, method="badmm-e", num_iters=1, a0=0.5, backend="triton").sum().backward()
    precisions = {c["PRECISION"] for c in launches.constexprs if "PRECISION" in c}
    assert precisions == {expect}, launches.constexprs


def test_dot_precision_rejects_unknown(monkeypatch):
    from rotp_triton.ops.rot.triton.structure import launch
    monkeypatch.setattr(launch, "DOT_PRECISION", "fp8")
    with pytest.raises(ValueError, match="DOT_PRECISION"):
        launch.dot_precision(torch.float32)


@pytest.mark.skipif(not ON_CUDA, reason="tensor-core dots exist on the GPU only")
@pytest.mark.parametrize("method", METHODS)
def test_tensor_core_accuracy(monkeypatch, method):
    """The stated accuracy of the tf32 option (docs/adjoints.md): y within 2e-3 relative of
    the float64 reference at W1-like shapes (N > D and D > N)."""
    from rotp_triton.ops.rot.triton.structure import launch
    monkeypatch.setattr(launch, "DOT_PRECISION", "tf32")
    for sizes, D in (([40, 33], 24), ([6, 9], 40)):
        xs = _sets(sizes, D, seed=31)
        ws = _weights(4)
        y_ref, _ = ref.rot_pool_sets(xs, method=method, num_iters=4, inner_iters=3, **ws)
        y = rt.rot_pool(torch.cat(xs).to(DEVICE, torch.float32),
                        ptr=torch.tensor([0, sizes[0], sum(sizes)], device=DEVICE),
                        method=method, num_iters=4, inner_iters=3, backend="triton",
                        **{k: v.to(DEVICE, torch.float32) for k, v in ws.items()})
        assert rel_err(y, y_ref) <= 2e-3, rel_err(y, y_ref)


@pytest.mark.parametrize("row_programs", [1, 3], ids=["rows-in-program", "rows-split"])
@pytest.mark.parametrize("wide", [True, False], ids=["wide", "square"])
@pytest.mark.parametrize("sizes,D", [([6, 2, 0, 3], 3), ([3, 1], 7), ([70, 5, 0], 66),
                                     ([40, 0, 17, 33], 3)],
                         ids=["mixed-orders", "n-order", "wide-tiles", "row-tiles"])
def test_structure_product_kernels(monkeypatch, sizes, D, wide, row_programs):
    """sigma_product_kernel / sigma_adjoint_kernel (the in-program GEMM sequences that the step
    kernels inline) against torch autograd of Σ2 exp(m) Σ1 per set, Σ1 = xcᵀxc, Σ2 = xt xtᵀ,
    sets of different lengths in one ragged batch (n_b >= D: Σ1 materialized, n_b < D: Σ2;
    D = 66: [64, 128] tiles, the wide side BW != BT), with the default wide tiles and without;
    the adjoint's (n_b, D) stage in the same program or on 3 programs per set
    (sigma_adjoint_rows_kernel: D = 3, BT = 16, sets of 1-3 row tiles, programs with none)."""
    from rotp_triton.ops.rot.triton.structure import launch
    monkeypatch.setattr(launch, "WIDE_GEMM_TILES", wide)
    monkeypatch.setattr(launch, "ADJOINT_ROW_PROGRAMS", row_programs)
    setup = launch.setup
    g = torch.Generator().manual_seed(41)
    ptr = torch.tensor([0] + sizes, device=DEVICE).cumsum(0)
    R = sum(sizes)
    x = torch.randn(R, D, generator=g).to(DEVICE)
    ws = {k: torch.ones(1, device=DEVICE) for k in ("a0", "a1", "a2", "a3", "rho", "tau")}
    pb, fac = setup(x, ptr, None, None, ws, "badmm-e", "exact", 1)
    log_m = torch.randn(R, D, generator=g).to(DEVICE)
    up = torch.randn(R, D, generator=g).to(DEVICE)
    out = fac.apply(log_m, exp=True)
    dxc, dxt, dm = (torch.zeros_like(x) for _ in range(3))
    fac.adjoint(log_m, up, dxc, dxt, dm)
    lm, c, t = (v.double().requires_grad_() for v in (log_m, fac.xc, fac.xt))
    want = torch.cat([(ti @ ti.T) @ torch.exp(mi) @ (ci.T @ ci) for mi, ci, ti in
                      zip(lm.split(sizes), c.split(sizes), t.split(sizes))])
    want.backward(up.double())
    assert rel_err(out, want) <= RTOL[torch.float32]
    for got, ref_g in ((dm, lm.grad), (dxc, c.grad), (dxt, t.grad)):
        assert rel_err(got, ref_g) <= RTOL[torch.float32], rel_err(got, ref_g)
