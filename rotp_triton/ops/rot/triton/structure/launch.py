"""Host side of the α0 > 0 kernels: block sizes, the launches of one forward iteration
(``run_iterations``), the pooling launch, the reverse steps of the backward (recompute the
state entering iteration t, then its adjoint kernels) and the explicit adjoints of the torch
pieces (pooling / plan, factors -> x). Kernels: ``kernels.py``; autograd and custom ops:
``op.py``; derivations and the memory/recompute scheme: ../../../../../docs/adjoints.md.

Every per-row state is a zero-padded fp32 ``(B, N_max, D)`` tensor plus the set lengths; an
empty set is solved on one zero dummy sample and its output zeroed, like the torch path.
Launches per iteration (each step kernel computes its structure product in-program first):
B-E/B-Q 2 (P-step, S-step), S 1; backward: ⌈√T⌉-spaced checkpoints, adjoints fused likewise.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
from torch import Tensor

from ...params import kappa
from ..common import interpreter_enabled, launcher
from .kernels import (badmm_p_step_bwd_kernel, badmm_p_step_kernel, badmm_s_step_bwd_kernel,
                      badmm_s_step_kernel, pool_from_log_plan_kernel, sigma_adjoint_kernel,
                      sigma_product_kernel,
                      sinkhorn_prox_step_bwd_kernel, sinkhorn_prox_step_kernel,
                      structure_factors_kernel)

# The structure product's dots: "ieee" (fp32 FMA, the default: kernels == reference to 1e-4),
# "tf32" (tensor cores, 10-bit mantissa: expected ~1e-3 relative error of y, not yet measured
# on a GPU) or "tensor-core" (tf32 for fp32/fp16 inputs, bf16 dots for bf16 inputs: expected
# ~1e-2). Set here or with ROTP_STRUCTURE_DOT; docs/adjoints.md states the accuracy.
DOT_PRECISION = os.environ.get("ROTP_STRUCTURE_DOT", "ieee")
DOT_PRECISIONS = ("ieee", "tf32", "tensor-core")


def dot_precision(dtype: torch.dtype) -> str:
    """The ``tl.dot`` precision constexpr for inputs of ``dtype`` under DOT_PRECISION."""
    if DOT_PRECISION not in DOT_PRECISIONS:
        raise ValueError(f"ROTP_STRUCTURE_DOT / DOT_PRECISION must be one of {DOT_PRECISIONS}, "
                         f"got {DOT_PRECISION!r}")
    if DOT_PRECISION == "tensor-core":
        return "bf16" if dtype == torch.bfloat16 else "tf32"
    return DOT_PRECISION

# How kernels are launched: directly, or through torch.library.wrap_triton while the body of
# one of the custom operators of op.py runs (so torch.compile can trace the launches).
_LAUNCH_WRAP = [None]


def _wrap(kernel):
    return launcher(kernel, _LAUNCH_WRAP[0])


# ============================================================================================
# host launchers
# ============================================================================================
# one program per set streams [BN, BD] tiles with several live fp32 tensors: 8 warps keep it
# under 255 registers per thread at BN·BD = 4096 (ptxas, W1 sizes; see test_aot_sm90)
PER_SET_WARPS = 8


def row_block(BD: int) -> int:
    """Rows per chunk of the per-set kernels: about 4096 fp32 values per [BN, BD] tile."""
    return max(1, min(64, 4096 // BD))


def mm_tile() -> int:
    """Output tile of the in-program GEMMs (``_program_mm``): 64 on a GPU (a [64, 64] fp32
    accumulator over 8 warps), 16 under the interpreter (the smallest ``tl.dot`` tile: the test
    shapes are a few rows)."""
    return 16 if interpreter_enabled() else 64


class Factors:
    """The per-set structure factors of a padded batch and the smaller Gram matrix.

    xc, xt: (B, N_pad, D) fp32 (DESIGN §2, scaled so Σ1 = xcᵀxc, Σ2 = xt xtᵀ);
    gram: Σ1 (B, D, D) when ``d_order`` (D <= N_pad) else Σ2 (B, N_pad, N_pad), written by
    ``structure_factors_kernel`` in the same launch as the factors.
    """

    def __init__(self, xc: Tensor, xt: Tensor, gram: Tensor, lens: Tensor,
                 precision: str = "ieee"):
        self.xc, self.xt, self.gram, self.lens = xc, xt, gram, lens
        self.precision = precision          # tl.dot precision, see dot_precision
        B, N, D = xc.shape
        self.D = D
        self.d_order = D <= N
        self.S = gram.shape[-1]

    def apply(self, m: Tensor, *, exp: bool = False, out: Optional[Tensor] = None) -> Tensor:
        """Σ2 m Σ1 (paper Σ1 M Σ2) for m (B, N_pad, D); with ``exp`` m holds log M.
        One launch."""
        out = torch.empty_like(m) if out is None else out
        B, N, D = m.shape
        if B == 0:
            return out
        scratch = m.new_empty(B, 2, self.S, self.S)
        _wrap(sigma_product_kernel)[(B,)](
            m, self.xc, self.xt, self.gram, scratch, out, self.lens, N, self.S, D,
            D_ORDER=self.d_order, EXP_M=exp, PRECISION=self.precision, BT=mm_tile(),
            num_warps=PER_SET_WARPS)
        return out

    def step_args(self, B: int) -> tuple:
        """The trailing tensor arguments of a step kernel whose prologue computes its
        structure product in-program: (xc, xt, gram, scratch (B, 2, S, S), S)."""
        return (self.xc, self.xt, self.gram, self.xc.new_empty(B, 2, self.S, self.S), self.S)

    def adjoint_args(self, B: int, dxc: Tensor, dxt: Tensor) -> tuple:
        """Same for an adjoint kernel whose epilogue is the structure product's adjoint:
        (xc, xt, gram, scratch (B, 5, S, S), dxc, dxt, S)."""
        return (self.xc, self.xt, self.gram, self.xc.new_empty(B, 5, self.S, self.S), dxc, dxt,
                self.S)

    def meta(self) -> dict:
        """The constexprs of the in-program structure product."""
        return dict(D_ORDER=self.d_order, PRECISION=self.precision, BT=mm_tile())

    def adjoint(self, log_m: Tensor, g: Tensor, dxc: Tensor, dxt: Tensor, dm: Tensor) -> None:
        """Adjoint of out = Σ2 exp(log_m) Σ1 for the upstream gradient g (B, N_pad, D):
        dm += exp(log_m) ⊙ ∂L/∂M (= ∂L/∂log_m), dxc / dxt += ∂L/∂xc, ∂L/∂xt.
        One launch."""
        B, N, D = log_m.shape
        if B == 0:
            return
        scratch = log_m.new_empty(B, 5, self.S, self.S)
        _wrap(sigma_adjoint_kernel)[(B,)](
            log_m.contiguous(), g.contiguous(), self.xc, self.xt, self.gram, scratch, dxc, dxt,
            dm, self.lens, N, self.S, D, D_ORDER=self.d_order, PRECISION=self.precision,
            BT=mm_tile(), num_warps=PER_SET_WARPS)


def _launch_factors(x: Tensor, row_start: Tensor, lens: Tensor, B: int, N_pad: int, D: int,
                    dense: bool, precision: str):
    """(x32, xc, xt, gram) in one launch; the Gram matrix's order as in :class:`Factors`."""
    x32 = x.new_zeros(B, N_pad, D, dtype=torch.float32)
    xc = torch.zeros_like(x32)
    xt = torch.zeros_like(x32)
    d_order = D <= N_pad
    S = D if d_order else N_pad
    gram = x32.new_zeros(B, S, S)
    BD = triton.next_power_of_2(D)
    if dense:
        s_xb, s_xn, s_xd = x.stride()
    else:
        s_xb, (s_xn, s_xd) = 0, x.stride()
    if B > 0:
        _wrap(structure_factors_kernel)[(B,)](
            x, row_start, lens, x32, xc, xt, gram, s_xb, s_xn, s_xd, N_pad, D, S,
            D_ORDER=d_order, PRECISION=precision, BT=mm_tile(), BN=row_block(BD), BD=BD,
            num_warps=PER_SET_WARPS)
    return x32, xc, xt, gram


class _Problem:
    """Everything a forward needs, on the padded fp32 layout."""

    def __init__(self, x32, lens, real_lens, log_p0, log_q0, w, method, variant, T, K):
        self.x32, self.lens, self.real_lens = x32, lens, real_lens
        self.log_p0, self.log_q0 = log_p0, log_q0
        self.w = w                                  # dict of contiguous fp32 (T,) tensors
        self.method, self.variant, self.T, self.K = method, variant, T, K
        B, N, D = x32.shape
        self.B, self.N, self.D = B, N, D
        self.BD = triton.next_power_of_2(D)
        self.BN = row_block(self.BD)


def init_state(pb: _Problem) -> dict:
    """State before iteration 0: log S = log P = log(p0 q0ᵀ) (padding 0), Z = 0 (+ paper duals)."""
    mask = torch.arange(pb.N, device=pb.x32.device)[None, :] < pb.lens[:, None]
    log_s = ((pb.log_p0[:, None, :] + pb.log_q0[:, :, None]) * mask[..., None]).contiguous()
    st = {"log_s": log_s}
    if pb.method != "sinkhorn":
        st["z"] = torch.zeros_like(log_s)
        if pb.variant == "paper":
            st["log_mu"] = pb.log_p0.clone()
            st["log_eta"] = pb.log_q0.clone()
            st["z1"] = torch.zeros_like(pb.log_p0)
            st["z2"] = torch.zeros_like(pb.log_q0)
    return st


def run_iterations(pb: _Problem, fac: Factors, st: dict, t0: int, t1: int) -> dict:
    """Iterations t0..t1-1 with the Triton kernels, in place on (a copy of) ``st``.

    For B-E/B-Q the key ``log_p`` holds the P of the last iteration run; for S ``log_s``
    holds log P (the proximal state).
    """
    st = {k: v.clone() for k, v in st.items()}
    w = pb.w
    B, N, D = pb.B, pb.N, pb.D
    sig = torch.empty_like(pb.x32)
    sigma = fac.step_args(B)      # each step kernel computes its Σ2 exp(·) Σ1 into sig first
    paper = pb.variant == "paper"
    if pb.method == "sinkhorn":
        y0 = torch.empty_like(pb.x32)
        bvec = torch.empty_like(pb.log_q0)
        cbuf = torch.empty_like(pb.log_q0)
        for t in range(t0, t1):
            _wrap(sinkhorn_prox_step_kernel)[(B,)](
                pb.x32, st["log_s"], sig, y0, bvec, cbuf, pb.log_p0, pb.log_q0, bvec, bvec,
                bvec, bvec, pb.lens, w["a0"], w["a1"], w["a2"], w["a3"], w["tau"], t, pb.K, N,
                D, *sigma, PAPER=paper, SAVE=False, BN=pb.BN, BD=pb.BD,
                num_warps=PER_SET_WARPS, **fac.meta())
        return st
    quad = pb.method == "badmm-q"
    log_p = st.get("log_p")
    if log_p is None:
        log_p = torch.zeros_like(pb.x32)
    cbuf = torch.empty_like(pb.log_q0)
    dummy = pb.log_p0
    for t in range(t0, t1):
        _wrap(badmm_p_step_kernel)[(B,)](
            pb.x32, st["log_s"], st["z"], sig, log_p, pb.log_p0, st.get("log_mu", dummy),
            dummy, dummy, pb.lens, w["a0"], w["a1"], w["a2"], w["rho"], t, N, D, *sigma,
            QUADRATIC=quad, PAPER=paper, SAVE=False, BN=pb.BN, BD=pb.BD,
            num_warps=PER_SET_WARPS, **fac.meta())
        _wrap(badmm_s_step_kernel)[(B,)](
            log_p, st["z"], sig, st["log_s"], cbuf, pb.log_q0, st.get("log_eta", dummy),
            st.get("z2", dummy), pb.log_p0, st.get("log_mu", dummy), st.get("z1", dummy),
            dummy, pb.lens, w["a0"], w["a1"], w["a2"], w["a3"], w["rho"], t, N, D, *sigma,
            QUADRATIC=quad, PAPER=paper, SAVE=False, BN=pb.BN, BD=pb.BD,
            num_warps=PER_SET_WARPS, **fac.meta())
    st["log_p"] = log_p
    return st


def final_log_p(pb: _Problem, st: dict) -> Tensor:
    return st["log_s"] if pb.method == "sinkhorn" else st["log_p"]


def pool_launch(pb: _Problem, log_p: Tensor, out_dtype, plan: Optional[Tensor],
                row_start: Tensor, dense: bool) -> Tensor:
    y = torch.empty(pb.B, pb.D, device=log_p.device, dtype=out_dtype)
    if pb.B == 0:
        return y
    if plan is not None:
        if dense:
            s_pb, s_pn = plan.stride(0), plan.stride(1)
        else:
            s_pb, s_pn = 0, plan.stride(0)
    else:
        s_pb = s_pn = 0
    _wrap(pool_from_log_plan_kernel)[(pb.B,)](
        log_p, pb.x32, y, plan if plan is not None else y, pb.lens, pb.real_lens, row_start,
        pb.N, pb.D, s_pn, s_pb, WRITE_PLAN=plan is not None, BN=pb.BN, BD=pb.BD,
        num_warps=PER_SET_WARPS)
    return y


# ============================================================================================
# backward: Triton structure product with its exact adjoint, torch replay of one iteration
# ============================================================================================
class SigmaProduct(torch.autograd.Function):
    """out = Σ2 exp(log_m) Σ1 with Σ1 = xcᵀxc, Σ2 = xt xtᵀ (per set), forward and backward
    in Triton (the torch-replay backward's building block). The Gram matrix is not
    differentiated directly: its gradient reaches xc / xt through the factor formulas."""

    @staticmethod
    def forward(ctx, log_m, xc, xt, fac):
        ctx.save_for_backward(log_m, xc, xt)
        ctx.fac = fac
        return fac.apply(log_m.contiguous(), exp=True)

    @staticmethod
    def backward(ctx, g):
        log_m, xc, xt = ctx.saved_tensors
        dxc = torch.zeros_like(xc)
        dxt = torch.zeros_like(xt)
        dm = torch.zeros_like(log_m)
        fac = Factors(xc, xt, ctx.fac.gram, ctx.fac.lens, ctx.fac.precision)
        fac.adjoint(log_m, g, dxc, dxt, dm)
        return dm, dxc, dxt, None


def _dkappa(alpha: Tensor, w: Tensor):
    """(∂κ/∂α, ∂κ/∂w) of κ(α, w) = α/(α + w); both 0 at α = +inf."""
    inf = torch.isinf(alpha)
    a = torch.where(inf, torch.zeros_like(alpha), alpha)
    den = (a + w) ** 2
    return (torch.where(inf, torch.zeros_like(alpha), w / den),
            torch.where(inf, torch.zeros_like(alpha), -a / den))


def badmm_reverse_step(pb: _Problem, fac: Factors, st: dict, t: int, mask: Tensor, g: dict,
                       g_lp_ext: Optional[Tensor], acc: dict) -> dict:
    """Pull the gradient of the state after B-E/B-Q iteration t (``g``: log_s, z and, paper,
    log_mu, log_eta, z1, z2) and ∂L/∂log P_{t+1} (``g_lp_ext``, last iteration only) back to the
    state entering t, in Triton: re-run iteration t saving R, log μ, C, log η, Σ(S), Σ(P), then
    the two adjoint kernels and the two structure-product adjoints. The paper variant's
    eq. (26)-(28) updates are O(N + D) vectors, differentiated here with torch.
    Accumulates into acc["x"], acc["xc"], acc["xt"], acc["lp0"], acc["lq0"], acc[weight][t].
    """
    B, N, D = pb.B, pb.N, pb.D
    w = pb.w
    quad = pb.method == "badmm-q"
    paper = pb.variant == "paper"
    kw = dict(QUADRATIC=quad, PAPER=paper, BN=pb.BN, BD=pb.BD, num_warps=PER_SET_WARPS,
              **fac.meta())
    dummy = pb.log_p0
    sigma = fac.step_args(B)
    adj = fac.adjoint_args(B, acc["xc"], acc["xt"])
    # re-run iteration t, keeping what the adjoint needs (Σ(S), Σ(P) too)
    sig_s = torch.empty_like(pb.x32)
    log_p = torch.zeros_like(pb.x32)
    r = torch.empty_like(pb.log_p0)
    mu = torch.empty_like(pb.log_p0)
    _wrap(badmm_p_step_kernel)[(B,)](pb.x32, st["log_s"], st["z"], sig_s, log_p, pb.log_p0,
                              st.get("log_mu", dummy), r, mu, pb.lens, w["a0"], w["a1"],
                              w["a2"], w["rho"], t, N, D, *sigma, SAVE=True, **kw)
    sig_p = torch.empty_like(pb.x32)
    ls_new = torch.zeros_like(pb.x32)
    z_new = st["z"].clone()
    new = {k: st[k].clone() for k in ("log_mu", "log_eta", "z1", "z2")} if paper else {}
    cbuf = torch.empty_like(pb.log_q0)
    eta = torch.empty_like(pb.log_q0)
    _wrap(badmm_s_step_kernel)[(B,)](log_p, z_new, sig_p, ls_new, cbuf, pb.log_q0,
                              new.get("log_eta", dummy), new.get("z2", dummy), pb.log_p0,
                              new.get("log_mu", dummy), new.get("z1", dummy), eta, pb.lens,
                              w["a0"], w["a1"], w["a2"], w["a3"], w["rho"], t, N, D, *sigma,
                              SAVE=True, **kw)
    rho, a1 = w["rho"][t], w["a1"][t]
    # the steps' weights (kernels' _p_step_weight, _s_step_weight): B-Q exact divides both by
    # ρ + α1 (stable majorized step), so ∂/∂w counts for α1 as well as ρ there
    p_has_a1 = quad and not paper
    s_has_a1 = not (quad and paper)
    wgt_p = rho + a1 if p_has_a1 else rho
    wgt = a1 + rho if s_has_a1 else rho
    k2_a, k2_w = _dkappa(w["a2"][t], wgt_p)
    row_x = col_x = dummy
    if paper:
        # eqs. (26)-(28): log μ' = lognorm((1-κ2)(log μ - z1/ρ) + κ2 log p0),
        # z1' = z1 + ρ(μ' - Σ_n P), and the same over n for log η', z2' with S'
        k2 = kappa(w["a2"][t], rho)
        k3 = kappa(w["a3"][t], rho)
        k3_a, k3_w = _dkappa(w["a3"][t], rho)
        m2 = mask.to(torch.float32)
        mu_n, eta_n = torch.exp(new["log_mu"]), torch.exp(new["log_eta"]) * m2
        g_mu_tot = g["log_mu"] + rho * g["z1"] * mu_n
        g_u = g_mu_tot - mu_n * g_mu_tot.sum(1, keepdim=True)
        g_eta_tot = (g["log_eta"] + rho * g["z2"] * eta_n) * m2
        g_v = (g_eta_tot - eta_n * g_eta_tot.sum(1, keepdim=True)) * m2
        g_rho = ((g["z1"] * (new["z1"] - st["z1"])).sum() + (g["z2"] * (new["z2"] - st["z2"])
                                                              * m2).sum()) / rho
        g_rho = g_rho + ((1 - k2) * g_u * st["z1"]).sum() / rho ** 2 \
            + ((1 - k3) * g_v * st["z2"]).sum() / rho ** 2
        g_k2 = (g_u * (pb.log_p0 - (st["log_mu"] - st["z1"] / rho))).sum()
        g_k3 = (g_v * (pb.log_q0 - (st["log_eta"] - st["z2"] / rho))).sum()
        acc["lp0"] += k2 * g_u
        acc["lq0"] += k3 * g_v
        g_out = {"log_mu": (1 - k2) * g_u, "log_eta": (1 - k3) * g_v,
                 "z1": g["z1"] - (1 - k2) * g_u / rho, "z2": (g["z2"] - (1 - k3) * g_v / rho) * m2}
        acc["rho"][t] += g_rho + g_k2 * k2_w + g_k3 * k3_w
        acc["a2"][t] += g_k2 * k2_a
        acc["a3"][t] += g_k3 * k3_a
        row_x = (-rho * g["z2"] * m2).contiguous()     # ∂/∂S'_nd of z2' = ... - ρ Σ_d S'_nd
        col_x = (-rho * g["z1"]).contiguous()          # ∂/∂P_nd of z1' = ... - ρ Σ_n P_nd
    # adjoint of the S-step and the dual update
    g_z_out = torch.zeros_like(pb.x32)
    g_sig = torch.zeros_like(pb.x32)
    g_lp = torch.zeros_like(pb.x32)
    g_p = torch.zeros_like(pb.x32)
    g_lq0 = torch.zeros_like(pb.log_q0)
    gvec = torch.zeros_like(pb.log_q0)
    wp_s = torch.zeros(B, 8, device=pb.x32.device, dtype=torch.float32)
    _wrap(badmm_s_step_bwd_kernel)[(B,)](g["log_s"].contiguous(), g["z"].contiguous(), log_p, st["z"],
                                  sig_p, ls_new, cbuf, eta, pb.log_q0, g_z_out, g_sig, g_lp, g_p,
                                  g_lq0, gvec, row_x, col_x, wp_s, pb.lens, w["a0"], w["a1"],
                                  w["a3"], w["rho"], t, N, D, *adj, **kw)   # + the Σ(P) path
    if g_lp_ext is not None:
        g_lp += g_lp_ext
    # adjoint of the P-step
    g_l = torch.zeros_like(pb.x32)
    g_sig_s = torch.zeros_like(pb.x32)
    g_lp0 = torch.zeros_like(pb.log_p0)
    wp_p = torch.zeros(B, 8, device=pb.x32.device, dtype=torch.float32)
    _wrap(badmm_p_step_bwd_kernel)[(B,)](g_lp, g_p, log_p, st["log_s"], st["z"], pb.x32, sig_s, r, mu,
                                  pb.log_p0, g_l, acc["x"], g_z_out, g_sig_s, g_lp0, wp_p,
                                  pb.lens, w["a0"], w["a1"], w["a2"], w["rho"], t, N, D, *adj,
                                  **kw)                                       # + the Σ(S) path
    # the scalar weights of iteration t from the per-set partial sums
    ps, pp = wp_s.sum(0), wp_p.sum(0)
    g_wp = pp[2]                                  # ∂/∂(P-step weight)
    if paper:
        g_w = ps[4]
        g_out["log_mu"] = g_out["log_mu"] + g_lp0        # P-step: log P = Y + log μ - R
        g_out["log_eta"] = g_out["log_eta"] + gvec       # S-step: log S' = Y' + log η - C
    else:
        k3_a, k3_w = _dkappa(w["a3"][t], wgt)
        g_w = ps[4] + ps[3] * k3_w
        acc["lp0"] += g_lp0
        acc["lq0"] += g_lq0
        acc["a3"][t] += ps[3] * k3_a
        acc["a2"][t] += pp[3] * k2_a
        g_wp = g_wp + pp[3] * k2_w
        g_out = {}
    acc["a0"][t] += ps[0] + pp[0]
    acc["a1"][t] += ps[1] + pp[1] + (g_wp if p_has_a1 else 0) + (g_w if s_has_a1 else 0)
    acc["rho"][t] += ps[2] + g_wp + g_w
    g_out["log_s"] = g_l
    g_out["z"] = g_z_out
    return g_out


def _replay_step(pb: _Problem, st: dict, x: Tensor, xc: Tensor, xt: Tensor, fac: Factors,
                 mask: Tensor, lp0: Tensor, lq0: Tensor, w: dict, t: int) -> dict:
    """One iteration t in differentiable torch ops (the math of solvers.py) on the padded
    layout, the structure products through :class:`SigmaProduct`."""
    neg = float("-inf")
    m3 = mask[..., None]
    lp0 = lp0[:, None, :]
    lq0 = lq0[:, :, None]

    def sig(log_m):
        return SigmaProduct.apply(log_m, xc, xt, fac)

    def lse_n(y):
        return torch.logsumexp(y.masked_fill(~m3, neg), dim=1, keepdim=True)

    def lognorm_d(v):
        return v - torch.logsumexp(v, dim=2, keepdim=True)

    def lognorm_n(v):
        return (v - torch.logsumexp(v.masked_fill(~m3, neg), dim=1, keepdim=True)).masked_fill(
            ~m3, 0.0)

    def zp(v):
        return v.masked_fill(~m3, 0.0)

    a0, a1, a2, a3 = w["a0"][t], w["a1"][t], w["a2"][t], w["a3"][t]
    if pb.method == "sinkhorn":
        log_p = st["log_s"]
        tau = w["tau"][t]
        eps = a1 + tau
        k2, k3 = kappa(a2, eps), kappa(a3, eps)
        y0 = zp((x + a0 * sig(log_p) + tau * log_p) / eps)
        a = torch.zeros_like(lp0)
        b = torch.zeros_like(lq0)
        if pb.variant == "exact":
            for _ in range(pb.K):
                r = lse_n(y0 + b)
                a = lognorm_d(k2 * lp0 + (1 - k2) * r) - r
                c = zp(torch.logsumexp(y0 + a, dim=2, keepdim=True))
                b = zp(lognorm_n(k3 * lq0 + (1 - k3) * c) - c)
            return {"log_s": zp(y0 + a + b)}
        y = y0
        for _ in range(pb.K):
            r = lse_n(y)
            c = zp(torch.logsumexp(y, dim=2, keepdim=True))
            a = k2 * (a / eps + lp0 - r)
            b = zp(k3 * (b / eps + lq0 - c))
            y = y0 + a + b
        return {"log_s": zp(y)}
    rho = w["rho"][t]
    quad = pb.method == "badmm-q"
    log_s, z = st["log_s"], st["z"]
    s = torch.exp(log_s.masked_fill(~m3, neg))
    g = x - z + a0 * sig(log_s)
    wgt_p = rho
    if quad:
        g = g - a1 * s
        if pb.variant == "exact":
            wgt_p = rho + a1     # stable majorized B-Q step (reference/rot.py _exact_badmm)
    y = log_s + g / wgt_p
    r = lse_n(y)
    if pb.variant == "exact":
        k2 = kappa(a2, wgt_p)
        log_mu = lognorm_d(k2 * lp0 + (1 - k2) * r)
    else:
        log_mu = st["log_mu"][:, None, :]
    log_p = zp(y + (log_mu - r))
    p = torch.exp(log_p.masked_fill(~m3, neg))
    h = z + a0 * sig(log_p)
    if quad:
        wgt = rho + a1 if pb.variant == "exact" else rho
        y = log_p + (h - a1 * p) / wgt
    else:
        wgt = a1 + rho
        y = (h + rho * log_p) / wgt
    c = zp(torch.logsumexp(y, dim=2, keepdim=True))
    if pb.variant == "exact":
        k3 = kappa(a3, wgt)
        log_eta = lognorm_n(k3 * lq0 + (1 - k3) * c)
    else:
        log_eta = st["log_eta"][:, :, None]
    log_s = zp(y + (log_eta - c))
    s = torch.exp(log_s.masked_fill(~m3, neg))
    out = {"log_s": log_s, "z": zp(z + rho * (p - s)), "log_p": log_p}
    if pb.variant == "paper":
        k2 = kappa(a2, rho)
        k3 = kappa(a3, rho)
        lmu = lognorm_d((1 - k2) * (log_mu - st["z1"][:, None, :] / rho) + k2 * lp0)
        leta = lognorm_n((1 - k3) * (log_eta - st["z2"][:, :, None] / rho) + k3 * lq0)
        out["z1"] = (st["z1"][:, None, :] + rho * (torch.exp(lmu) - p.sum(1, keepdim=True)))[:, 0]
        out["z2"] = zp(st["z2"][:, :, None] + rho * (torch.exp(leta) - s.sum(2, keepdim=True)))[
            ..., 0]
        out["log_mu"] = lmu[:, 0]
        out["log_eta"] = leta[..., 0]
    return out


def sinkhorn_reverse_step(pb: _Problem, fac: Factors, st: dict, t: int, mask: Tensor,
                                g_out: Tensor, acc: dict) -> Tensor:
    """Pull ∂L/∂log P_{t+1} back through the proximal S step t (K inner iterations), in
    Triton: re-run step t saving Y0 and the inner history, then the adjoint kernel and the
    structure-product adjoint. Returns ∂L/∂log P_t; accumulates like badmm_exact_reverse_step.
    """
    B, N, D, K = pb.B, pb.N, pb.D, pb.K
    w = pb.w
    kw = dict(BN=pb.BN, BD=pb.BD, num_warps=PER_SET_WARPS, **fac.meta())
    log_p = st["log_s"]
    sig = torch.empty_like(pb.x32)         # Σ(P_t), computed by the step kernel's prologue
    y0 = torch.zeros_like(pb.x32)
    bvec = torch.empty_like(pb.log_q0)
    cbuf = torch.empty_like(pb.log_q0)
    h_r = torch.zeros(B, K, D, device=pb.x32.device, dtype=torch.float32)
    h_a = torch.zeros_like(h_r)
    h_c = torch.zeros(B, K, N, device=pb.x32.device, dtype=torch.float32)
    h_b = torch.zeros_like(h_c)
    out = log_p.clone()
    _wrap(sinkhorn_prox_step_kernel)[(B,)](pb.x32, out, sig, y0, bvec, cbuf, pb.log_p0, pb.log_q0, h_r,
                                    h_a, h_c, h_b, pb.lens, w["a0"], w["a1"], w["a2"], w["a3"],
                                    w["tau"], t, K, N, D, *fac.step_args(B),
                                    PAPER=pb.variant == "paper", SAVE=True, **kw)
    gy0 = torch.zeros_like(pb.x32)
    gb = torch.zeros_like(pb.log_q0)
    gc = torch.zeros_like(pb.log_q0)
    g_lp = torch.zeros_like(pb.x32)
    g_sig = torch.zeros_like(pb.x32)
    g_lp0 = torch.zeros_like(pb.log_p0)
    g_lq0 = torch.zeros_like(pb.log_q0)
    wp = torch.zeros(B, 8, device=pb.x32.device, dtype=torch.float32)
    _wrap(sinkhorn_prox_step_bwd_kernel)[(B,)](g_out.contiguous(), pb.x32, log_p, sig, y0, gy0, h_r, h_a,
                                        h_c, h_b, gb, gc, pb.log_p0, pb.log_q0, g_lp, acc["x"],
                                        g_sig, g_lp0, g_lq0, wp, pb.lens, w["a0"], w["a1"],
                                        w["a2"], w["a3"], w["tau"], t, K, N, D,
                                        *fac.adjoint_args(B, acc["xc"], acc["xt"]),
                                        PAPER=pb.variant == "paper", **kw)   # + the Σ path
    acc["lp0"] += g_lp0
    acc["lq0"] += g_lq0
    ps = wp.sum(0)
    eps = w["a1"][t] + w["tau"][t]
    k2_a, k2_w = _dkappa(w["a2"][t], eps)
    k3_a, k3_w = _dkappa(w["a3"][t], eps)
    g_eps = ps[2] + ps[3] * k2_w + ps[4] * k3_w
    acc["a0"][t] += ps[0]
    acc["tau"][t] += ps[1] + g_eps
    acc["a1"][t] += g_eps
    acc["a2"][t] += ps[3] * k2_a
    acc["a3"][t] += ps[4] * k3_a
    return g_lp


_WEIGHTS = ("a0", "a1", "a2", "a3", "rho", "tau")


def _initial_state_grads(g_state: dict, mask: Tensor, grads: list) -> None:
    """Pull the gradient of the initial state to the priors: log S⁰ = log p0 + log q0
    (padding 0); paper B-ADMM also starts from log μ⁰ = log p0, log η⁰ = log q0."""
    g0 = g_state["log_s"].masked_fill(~mask[..., None], 0.0)
    grads[3] += g0.sum(1)
    grads[4] += g0.sum(2)
    if "log_mu" in g_state:
        grads[3] += g_state["log_mu"]
        grads[4] += g_state["log_eta"].masked_fill(~mask, 0.0)


def _add_sqrt_checkpoints(pb: _Problem, fac: Factors, ckpts: dict) -> None:
    """States entering iterations k, 2k, ... (k = ⌈√T⌉) from one forward sweep, so that the
    reverse pass recomputes at most k - 1 iterations per step: T (sweep) + T(k - 1)/2
    iterations in all instead of T(T - 1)/2, for ⌈√T⌉ - 1 transient states."""
    k = math.ceil(math.sqrt(pb.T))
    t_prev = max(ckpts)
    for t1 in range(k, pb.T, k):
        if t1 > t_prev:
            ckpts[t1] = run_iterations(pb, fac, ckpts[t_prev], t_prev, t1)
            t_prev = t1


def reverse_iterations(pb: _Problem, fac: Factors, ckpts: dict, mask: Tensor, g_lp_T: Tensor,
                       grads: list) -> None:
    """The T iterations in reverse with the adjoint kernels (no torch autograd).

    g_lp_T: ∂L/∂log P_T (B, N_pad, D). Accumulates into ``grads`` = [x (B, N_pad, D),
    xc, xt (B, N_pad, D), log p0 (B, D), log q0 (B, N_pad), a0, a1, a2, a3, rho, tau (T,)]
    (x: the direct dependence only; xc, xt: the factors, chained to x by the caller).
    """
    acc = {"x": grads[0], "xc": grads[1], "xt": grads[2], "lp0": grads[3], "lq0": grads[4]}
    acc.update({k: grads[5 + i] for i, k in enumerate(_WEIGHTS)})

    ckpts = dict(ckpts)
    if len(ckpts) == 1:
        _add_sqrt_checkpoints(pb, fac, ckpts)

    def state_entering(t):
        t_ck = max(k for k in ckpts if k <= t)
        st = run_iterations(pb, fac, ckpts[t_ck], t_ck, t) if t > t_ck else ckpts[t_ck]
        if t == t_ck and t > 0:
            del ckpts[t_ck]       # its segment is done: free the state
        return st

    if pb.method == "sinkhorn":
        g_lp = g_lp_T
        for t in reversed(range(pb.T)):
            g_lp = sinkhorn_reverse_step(pb, fac, state_entering(t), t, mask, g_lp, acc)
        g_state = {"log_s": g_lp}
    else:
        g_state = {k: torch.zeros_like(v) for k, v in ckpts[0].items()}
        for t in reversed(range(pb.T)):
            g_state = badmm_reverse_step(pb, fac, state_entering(t), t, mask, g_state,
                                         g_lp_T if t == pb.T - 1 else None, acc)
    _initial_state_grads(g_state, mask, grads)


# ============================================================================================
# explicit adjoints of the torch pieces (the custom-op backward may not call torch autograd)
# ============================================================================================
def pool_plan_bwd(log_p: Tensor, x32: Tensor, mask: Tensor, empty: Tensor, gy: Tensor,
                  gplan: Optional[Tensor]):
    """Adjoint of y = pool_from_log_plan(log P, x) (zeroed for empty sets) and of
    plan = normalized_plan(log P).

    log_p, x32: (B, N_pad, D); mask: (B, N_pad); empty: (B, 1); gy: (B, D);
    gplan: (B, N_pad, D) or None. Returns (∂L/∂log P, ∂L/∂x), both (B, N_pad, D).
    """
    m3 = mask[..., None]
    lp = log_p.masked_fill(~m3, float("-inf"))
    w = torch.softmax(lp, dim=1)                                   # [B, N, D] column softmax
    gyw = w * gy.to(torch.float32).masked_fill(empty, 0.0)[:, None, :]
    y = (w * x32).sum(1, keepdim=True)
    g_lp = gyw * (x32 - y)                                         # softmax adjoint
    if gplan is not None:
        plan = torch.exp(lp - torch.logsumexp(lp.flatten(1), dim=1)[:, None, None])
        g_lp = g_lp + plan * (gplan - (plan * gplan).sum((1, 2), keepdim=True))
    return g_lp, gyw


def _amax_onehot(v: Tensor, dim: int) -> Tensor:
    """∂ amax(v, dim) / ∂v as torch defines it: the gradient split evenly between ties."""
    hit = (v == v.amax(dim, keepdim=True)).to(v.dtype)
    return hit / hit.sum(dim, keepdim=True)


def structure_factors_bwd(x32: Tensor, mask: Tensor, g_xc: Tensor, g_xt: Tensor) -> Tensor:
    """Adjoint of structure.structure_factors (centring + normalization) for a padded batch.

    x32, g_xc, g_xt: (B, N_pad, D); mask: (B, N_pad). Returns ∂L/∂x (B, N_pad, D).
    """
    m = mask.unsqueeze(-1).to(x32.dtype)                          # [B, N, 1]
    n = mask.sum(1).clamp_min(1).to(x32.dtype)[:, None, None]     # [B, 1, 1]
    D = x32.shape[-1]
    tiny = torch.finfo(x32.dtype).tiny
    # xc = xc0 / sqrt(n s1), xc0 = (x - μ1) m, s1 = max_d Σ_n xc0² / n
    xc0 = (x32 - (x32 * m).sum(1, keepdim=True) / n) * m
    diag1 = (xc0 * xc0).sum(1) / n[:, 0]                           # [B, D]
    s1r = diag1.amax(-1)
    s1 = s1r.clamp_min(tiny)[:, None, None]
    c1 = 1.0 / torch.sqrt(n * s1)
    g_c1 = (g_xc * xc0).sum((1, 2), keepdim=True)
    g_s1 = (g_c1 * (-0.5) * c1 / s1) * (s1r >= tiny)[:, None, None]
    g_d1 = g_s1[:, 0] * _amax_onehot(diag1, -1)                     # [B, D]
    g0 = g_xc * c1 + g_d1[:, None, :] * 2.0 * xc0 / n
    g0 = g0 * m
    gx = g0 - m * g0.sum(1, keepdim=True) / n
    # xt = xt0 / sqrt(D s2), xt0 = (x - μ2) m, s2 = max_n Σ_d xt0² / D
    xt0 = (x32 - x32.mean(-1, keepdim=True)) * m
    diag2 = (xt0 * xt0).sum(-1) / D                                # [B, N]
    s2r = diag2.amax(-1)
    s2 = s2r.clamp_min(tiny)[:, None, None]
    c2 = 1.0 / torch.sqrt(D * s2)
    g_c2 = (g_xt * xt0).sum((1, 2), keepdim=True)
    g_s2 = (g_c2 * (-0.5) * c2 / s2) * (s2r >= tiny)[:, None, None]
    g_d2 = g_s2[:, 0] * _amax_onehot(diag2, -1)                     # [B, N]
    g0 = g_xt * c2 + g_d2[..., None] * 2.0 * xt0 / D
    g0 = g0 * m
    return gx + g0 - g0.sum(-1, keepdim=True) / D


def _pad_rows(v: Tensor, B: int, N_pad: int, meta: dict, dense: bool) -> Tensor:
    """Caller-layout per-row tensor -> padded (B, N_pad, ...)."""
    if dense:
        return v
    index, pos = meta["index"], meta["pos"]
    out = v.new_zeros((B, N_pad) + tuple(v.shape[1:]))
    return out.index_put((index, pos), v)


def _unpad_rows(v: Tensor, pb: _Problem, meta: dict, dense: bool) -> Tensor:
    if dense:
        return v
    return v[meta["index"], meta["pos"]]


def _unpad_q(v: Tensor, pb: _Problem, meta: dict, dense: bool) -> Tensor:
    return _unpad_rows(v, pb, meta, dense)


def _forward_setup(x, log_p0, log_q0, weights, meta):
    dense = x.dim() == 3
    dev = x.device
    D = x.shape[-1]
    if dense:
        B, N = x.shape[0], x.shape[1]
        real_lens = torch.full((B,), N, dtype=torch.int64, device=dev)
        row_start = torch.zeros(B, dtype=torch.int64, device=dev)
    else:
        ptr = meta["ptr"]
        B = ptr.numel() - 1
        real_lens = ptr[1:] - ptr[:-1]
        row_start = ptr[:-1].contiguous()
    N_pad = max(meta["n_max"], 1)
    lens = real_lens.clamp_min(1)          # empty set: one zero dummy sample
    precision = dot_precision(x.dtype)
    x32, xc, xt, gram = _launch_factors(x, row_start, real_lens, B, N_pad, D, dense, precision)
    mask = torch.arange(N_pad, device=dev)[None, :] < lens[:, None]
    if log_p0 is None:
        lp0 = torch.full((B, D), -math.log(max(D, 1)), device=dev, dtype=torch.float32)
    else:
        lp0 = log_p0.detach().to(torch.float32).contiguous()
    if log_q0 is None:
        lq0 = (-torch.log(lens.to(torch.float32)))[:, None] * mask
    else:
        lq0 = _pad_rows(log_q0.detach().to(torch.float32), B, N_pad, meta, dense) * mask
    w = {k: v.detach().to(device=dev, dtype=torch.float32).contiguous()
         for k, v in weights.items()}
    pb = _Problem(x32, lens, real_lens, lp0, lq0.contiguous(), w, meta["method"],
                  meta["variant"], meta["T"], meta["K"])
    fac = Factors(xc, xt, gram, lens, precision)
    return pb, fac, row_start, dense, meta["return_plan"]
