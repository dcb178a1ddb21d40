"""α0 > 0 (the structure term) as an autograd op: ``StructureROTFunction`` and the custom
operators ``rotp_triton::structure_fwd`` / ``structure_bwd`` (``torch.library.triton_op``,
launches through ``wrap_triton``, explicit fake kernels), and the family's entry point
``structure_pool`` (docs/kernels.md: the (6, T) weight table).

The backward is the exact gradient of the T unrolled iterations (x through Σ1, Σ2 and their
centring, every per-iteration weight, the prior logits), by recomputation from the initial
state (saved memory independent of T; the backward keeps ⌈√T⌉-spaced checkpoints, O(T^1.5)
recompute; ``CHECKPOINT_EVERY`` stores states in the forward instead).
torch.compile(fullgraph=True) traces a dense call; a ragged one reads max(ptr diff) on the host
to size the padding (one sync; the v2 kernels will drop it). Derivations and the launch plan:
../../../../../docs/adjoints.md; design: ../../../../../../shared/DESIGN.md §3, §7.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ...torch.sets import normalized_plan, pool_from_log_plan, structure_factors
from .launch import (_LAUNCH_WRAP, _WEIGHTS, _forward_setup, _initial_state_grads, _pad_rows,
                     _replay_step, _unpad_q, _unpad_rows, final_log_p, init_state, pool_launch,
                     pool_plan_bwd, reverse_iterations, run_iterations, structure_factors_bwd)

# States stored every CHECKPOINT_EVERY iterations in the forward for the backward's recompute;
# None: store none (the backward sweeps to ⌈√T⌉-spaced checkpoints itself, launch.py).
CHECKPOINT_EVERY: Optional[int] = None
# adjoint kernels in Triton (False: torch-autograd replay of each iteration, for cross-checks)
TRITON_BACKWARD = True


class StructureROTFunction(torch.autograd.Function):
    """(y, plan) of the α0 > 0 solvers; see the module docstring for the backward's design."""

    @staticmethod
    def forward(ctx, x, log_p0, log_q0, a0, a1, a2, a3, rho, tau, meta):
        pb, fac, row_start, dense, return_plan = _forward_setup(x, log_p0, log_q0,
                                                                dict(a0=a0, a1=a1, a2=a2, a3=a3,
                                                                     rho=rho, tau=tau), meta)
        st0 = init_state(pb)
        every = CHECKPOINT_EVERY if CHECKPOINT_EVERY else pb.T
        ckpts = {0: st0}
        st = st0
        for t0 in range(0, pb.T, every):
            t1 = min(pb.T, t0 + every)
            st = run_iterations(pb, fac, st, t0, t1)
            if t1 < pb.T:
                ckpts[t1] = st
        log_p = final_log_p(pb, st)
        plan = None
        if return_plan:
            plan = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        y = pool_launch(pb, log_p, x.dtype, plan, row_start, dense)
        ctx.meta = meta
        ctx.pb, ctx.fac, ctx.ckpts, ctx.dense = pb, fac, ckpts, dense
        ctx.has_p0, ctx.has_q0 = log_p0 is not None, log_q0 is not None
        ctx.save_for_backward(x, log_p)
        return y, plan

    @staticmethod
    def backward(ctx, gy, gplan):
        x, log_p_T = ctx.saved_tensors
        pb, fac, ckpts = ctx.pb, ctx.fac, ctx.ckpts
        dev = x.device
        mask = torch.arange(pb.N, device=dev)[None, :] < pb.lens[:, None]
        with torch.enable_grad():
            xl = pb.x32.detach().requires_grad_()
            sf = structure_factors(xl, mask)
            xc = sf.xc.detach().requires_grad_()
            xt = sf.xt.detach().requires_grad_()
            lp0 = pb.log_p0.detach().requires_grad_()
            lq0 = pb.log_q0.detach().requires_grad_()
            w = {k: pb.w[k].detach().requires_grad_() for k in _WEIGHTS}
            leaves = [xl, xc, xt, lp0, lq0] + [w[k] for k in _WEIGHTS]
            grads = [torch.zeros_like(v) for v in leaves]

            def pull(outputs: dict, gouts: dict, inputs: list):
                keys = [k for k in outputs if gouts.get(k) is not None]
                gs = torch.autograd.grad([outputs[k] for k in keys], inputs,
                                         [gouts[k] for k in keys], allow_unused=True)
                return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, gs)]

            # pooling and plan
            lpT = log_p_T.detach().requires_grad_()
            empty = (pb.real_lens == 0)[:, None]
            y = pool_from_log_plan(lpT, xl, mask).masked_fill(empty, 0.0)
            outs, gos = {"y": y}, {"y": gy.to(torch.float32)}
            if gplan is not None:
                outs["plan"] = normalized_plan(lpT, mask)
                gos["plan"] = _pad_rows(gplan.to(torch.float32), pb.B, pb.N, ctx.meta,
                                       ctx.dense)
            gs = pull(outs, gos, [lpT, xl])
            grads[0] += gs[1]
            key = "log_s" if pb.method == "sinkhorn" else "log_p"
            g_state = {key: gs[0]}
            if TRITON_BACKWARD:
                with torch.no_grad():
                    reverse_iterations(pb, fac, ckpts, mask, g_state[key], grads)
            else:
                for t in reversed(range(pb.T)):
                    t_ck = max(k for k in ckpts if k <= t)
                    st = (run_iterations(pb, fac, ckpts[t_ck], t_ck, t) if t > t_ck
                          else ckpts[t_ck])
                    st_in = {k: v.detach().requires_grad_() for k, v in st.items()
                             if k != "log_p"}
                    out = _replay_step(pb, st_in, xl, xc, xt, fac, mask, lp0, lq0, w, t)
                    ins = list(st_in.values()) + leaves
                    gs = pull(out, g_state, ins)
                    g_state = dict(zip(st_in.keys(), gs[:len(st_in)]))
                    for i, g in enumerate(gs[len(st_in):]):
                        grads[i] += g
                _initial_state_grads(g_state, mask, grads)
            # through the centring and normalization of the factors to x
            gx = torch.autograd.grad([sf.xc, sf.xt], [xl], [grads[1], grads[2]])[0] + grads[0]
        gx_user = _unpad_rows(gx, pb, ctx.meta, ctx.dense).to(x.dtype)
        g_lp0 = grads[3] if ctx.has_p0 else None
        g_lq0 = _unpad_q(grads[4], pb, ctx.meta, ctx.dense) if ctx.has_q0 else None
        gw = [grads[5 + i] for i in range(len(_WEIGHTS))]
        return (gx_user, g_lp0, g_lq0, *gw, None)


# ============================================================================================
# custom operators: torch.compile(fullgraph=True) sees one opaque node for the forward and one
# for the backward (as triton_set / triton_badmm); the torch pieces of the backward (pooling /
# plan adjoint, factors -> x chain) are explicit formulas around the backward operator.
# Used when torch has triton_op, TRITON_BACKWARD is set and CHECKPOINT_EVERY is None (only the
# initial state is needed, rebuilt from the inputs); otherwise StructureROTFunction.
# ============================================================================================
USE_CUSTOM_OP = True
_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
structure_fwd_op = None
structure_bwd_op = None


def _op_meta(ptr, index, pos, method, variant, T, K, n_max, return_plan) -> dict:
    meta = dict(method=method, variant=variant, T=T, K=K, n_max=n_max,
                return_plan=return_plan)
    if ptr is not None:
        meta.update(ptr=ptr, index=index, pos=pos)
    return meta


def _op_weights(a0, a1, a2, a3, rho, tau) -> dict:
    return dict(a0=a0, a1=a1, a2=a2, a3=a3, rho=rho, tau=tau)


def structure_forward(x, ptr, index, pos, log_p0, log_q0, a0, a1, a2, a3, rho, tau, method,
                      variant, K, n_max, return_plan):
    """(y (B, D) in x's dtype, plan in x's layout or an empty tensor, log P_T (B, N_pad, D))."""
    meta = _op_meta(ptr, index, pos, method, variant, int(a1.shape[0]), K, n_max, return_plan)
    pb, fac, row_start, dense, _ = _forward_setup(x, log_p0, log_q0,
                                                  _op_weights(a0, a1, a2, a3, rho, tau), meta)
    log_p = final_log_p(pb, run_iterations(pb, fac, init_state(pb), 0, pb.T))
    plan = torch.empty(x.shape, device=x.device, dtype=x.dtype) if return_plan else None
    y = pool_launch(pb, log_p, x.dtype, plan, row_start, dense)
    return y, (plan if plan is not None else x.new_empty(0)), log_p


def structure_backward(x, ptr, index, pos, log_p0, log_q0, a0, a1, a2, a3, rho, tau, g_lp_T,
                       method, variant, K, n_max):
    """Gradients of the T iterations given ∂L/∂log P_T (B, N_pad, D): (x direct, xc, xt
    (B, N_pad, D), log p0 (B, D), log q0 (B, N_pad), weights (6, T) in _WEIGHTS order)."""
    meta = _op_meta(ptr, index, pos, method, variant, int(a1.shape[0]), K, n_max, False)
    pb, fac, _, _, _ = _forward_setup(x, log_p0, log_q0, _op_weights(a0, a1, a2, a3, rho, tau),
                                      meta)
    mask = torch.arange(pb.N, device=x.device)[None, :] < pb.lens[:, None]
    grads = [torch.zeros_like(pb.x32) for _ in range(3)]
    grads += [torch.zeros_like(pb.log_p0), torch.zeros_like(pb.log_q0)]
    grads += [torch.zeros_like(pb.w[k]) for k in _WEIGHTS]
    reverse_iterations(pb, fac, {0: init_state(pb)}, mask, g_lp_T.contiguous(), grads)
    return (*grads[:5], torch.stack(grads[5:]))


def _op_shapes(x, ptr, n_max):
    B = x.shape[0] if ptr is None else ptr.shape[0] - 1
    return B, max(n_max, 1), x.shape[-1]


if _HAS_TRITON_OP:
    try:
        from torch.library import triton_op, wrap_triton

        def _wrapped(fn, *args):
            _LAUNCH_WRAP[0] = wrap_triton
            try:
                return fn(*args)
            finally:
                _LAUNCH_WRAP[0] = None

        @triton_op("rotp_triton::structure_fwd", mutates_args=())
        def structure_fwd_op(x: Tensor, ptr: Optional[Tensor], index: Optional[Tensor],
                             pos: Optional[Tensor], log_p0: Optional[Tensor],
                             log_q0: Optional[Tensor], a0: Tensor, a1: Tensor, a2: Tensor,
                             a3: Tensor, rho: Tensor, tau: Tensor, method: str, variant: str,
                             K: int, n_max: int, return_plan: bool
                             ) -> Tuple[Tensor, Tensor, Tensor]:
            """See :func:`structure_forward`."""
            return _wrapped(structure_forward, x, ptr, index, pos, log_p0, log_q0, a0, a1, a2,
                            a3, rho, tau, method, variant, K, n_max, return_plan)

        @triton_op("rotp_triton::structure_bwd", mutates_args=())
        def structure_bwd_op(x: Tensor, ptr: Optional[Tensor], index: Optional[Tensor],
                             pos: Optional[Tensor], log_p0: Optional[Tensor],
                             log_q0: Optional[Tensor], a0: Tensor, a1: Tensor, a2: Tensor,
                             a3: Tensor, rho: Tensor, tau: Tensor, g_lp_T: Tensor, method: str,
                             variant: str, K: int, n_max: int
                             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
            """See :func:`structure_backward`."""
            return _wrapped(structure_backward, x, ptr, index, pos, log_p0, log_q0, a0, a1, a2,
                            a3, rho, tau, g_lp_T, method, variant, K, n_max)

        def _setup_context(ctx, inputs, output):
            (x, ptr, index, pos, log_p0, log_q0, a0, a1, a2, a3, rho, tau, method, variant, K,
             n_max, return_plan) = inputs
            ctx.save_for_backward(x, ptr, index, pos, log_p0, log_q0, a0, a1, a2, a3, rho, tau,
                                  output[2])
            ctx.args = (method, variant, K, n_max, return_plan)

        def _backward(ctx, gy, gplan, g_lp_out):
            x, ptr, index, pos, log_p0, log_q0, *ws, log_p_T = ctx.saved_tensors
            method, variant, K, n_max, return_plan = ctx.args
            B, N_pad, D = _op_shapes(x, ptr, n_max)
            dense = ptr is None
            rows = dict(index=index, pos=pos)
            x32 = _pad_rows(x.to(torch.float32), B, N_pad, rows, dense)
            if dense:
                real_lens = torch.full((B,), N_pad, dtype=torch.int64, device=x.device)
            else:
                real_lens = ptr[1:] - ptr[:-1]
            mask = torch.arange(N_pad, device=x.device)[None, :] < real_lens.clamp_min(1)[:, None]
            gp = None
            if return_plan and gplan is not None:
                gp = _pad_rows(gplan.to(torch.float32), B, N_pad, rows, dense)
            if gy is None:
                gy = x.new_zeros(B, D, dtype=torch.float32)
            g_lp, gx_pool = pool_plan_bwd(log_p_T, x32, mask, (real_lens == 0)[:, None], gy, gp)
            if g_lp_out is not None:
                g_lp = g_lp + g_lp_out
            g_x, g_xc, g_xt, g_lp0, g_lq0, g_w = structure_bwd_op(
                x, ptr, index, pos, log_p0, log_q0, *ws, g_lp, method, variant, K, n_max)
            gx = structure_factors_bwd(x32, mask, g_xc, g_xt) + g_x + gx_pool
            gx = (gx if dense else gx[index, pos]).to(x.dtype)
            g_lp0 = g_lp0.to(log_p0.dtype) if log_p0 is not None else None
            if log_q0 is not None:
                g_lq0 = (g_lq0 if dense else g_lq0[index, pos]).to(log_q0.dtype)
            else:
                g_lq0 = None
            gws = [g_w[i].to(w.dtype) for i, w in enumerate(ws)]
            return (gx, None, None, None, g_lp0, g_lq0, *gws, None, None, None, None, None)

        structure_fwd_op.register_autograd(_backward, setup_context=_setup_context)

        # Explicit fake kernels: under TRITON_INTERPRET=1 wrap_triton hands back the raw
        # interpreted kernel, which cannot run on fake tensors, so tracing needs these.
        @structure_fwd_op.register_fake
        def _structure_fwd_fake(x, ptr, index, pos, log_p0, log_q0, a0, a1, a2, a3, rho, tau,
                                method, variant, K, n_max, return_plan):
            B, N_pad, D = _op_shapes(x, ptr, n_max)
            plan = torch.empty(x.shape, device=x.device, dtype=x.dtype) if return_plan \
                else x.new_empty(0)
            return (x.new_empty(B, D), plan, x.new_empty(B, N_pad, D, dtype=torch.float32))

        @structure_bwd_op.register_fake
        def _structure_bwd_fake(x, ptr, index, pos, log_p0, log_q0, a0, a1, a2, a3, rho, tau,
                                g_lp_T, method, variant, K, n_max):
            B, N_pad, D = _op_shapes(x, ptr, n_max)
            f = dict(dtype=torch.float32)
            return (x.new_empty(B, N_pad, D, **f), x.new_empty(B, N_pad, D, **f),
                    x.new_empty(B, N_pad, D, **f), x.new_empty(B, D, **f),
                    x.new_empty(B, N_pad, **f), x.new_empty(6, a1.shape[0], **f))
    except Exception:  # pragma: no cover - a torch whose triton_op rejects these ops
        _HAS_TRITON_OP = False
        structure_fwd_op = structure_bwd_op = None


# ============================================================================================
# entry points (structure_pool: called by route.pool_sets)
# ============================================================================================
def rot_pool_structure_triton(x: Tensor, ptr: Optional[Tensor], *, method: str, variant: str,
                              a0: Tensor, a1: Tensor, a2: Tensor, a3: Tensor, rho: Tensor,
                              tau: Tensor, inner_iters: int, log_p0: Optional[Tensor],
                              log_q0: Optional[Tensor], return_plan: bool):
    """ROT pooling with α0 > 0 on the Triton kernels.

    Args:
        x: (B, N, D) dense batch (any strides) or (N_total, D) ragged batch, rows grouped by set.
        ptr: (B + 1,) int64 CSR offsets for a ragged x, None for a dense one.
        method: "sinkhorn" | "badmm-e" | "badmm-q"; variant: "exact" | "paper".
        a0, a1, a2, a3, rho, tau: (T,) weights (a2, a3 may be +inf); differentiable.
        inner_iters: K, inner Sinkhorn iterations per proximal step (S only).
        log_p0: (B, D) normalized log prior over features, or None (uniform).
        log_q0: like x[..., 0] ((B, N) or (N_total,)), normalized log prior, or None (uniform).
        return_plan: also return P in x's layout, each set's P summing to 1.

    Returns:
        (y (B, D) in x's dtype, plan or None).
    """
    dense = x.dim() == 3  # options, dtype and shapes were checked by the caller (route.py)
    meta = dict(method=method, variant=variant, T=int(a1.shape[0]), K=int(inner_iters),
                return_plan=bool(return_plan))
    if dense:
        meta["n_max"] = x.shape[1]
    else:
        if ptr is None:
            raise ValueError("a ragged x needs ptr")
        ptr = ptr.to(device=x.device, dtype=torch.int64)
        lens = ptr[1:] - ptr[:-1]
        meta["ptr"] = ptr
        meta["n_max"] = int(lens.max()) if lens.numel() else 0
        index = torch.repeat_interleave(torch.arange(lens.numel(), device=x.device), lens)
        meta["index"] = index
        meta["pos"] = torch.arange(x.shape[0], device=x.device) - ptr[index]
    if (USE_CUSTOM_OP and structure_fwd_op is not None and TRITON_BACKWARD
            and not CHECKPOINT_EVERY and (x.shape[1] > 0 if dense else True)):
        y, plan, _ = structure_fwd_op(x, meta.get("ptr"), meta.get("index"), meta.get("pos"),
                                      log_p0, log_q0, a0, a1, a2, a3, rho, tau, method, variant,
                                      int(inner_iters), meta["n_max"], bool(return_plan))
        return y, (plan if return_plan else None)
    y, plan = StructureROTFunction.apply(x, log_p0, log_q0, a0, a1, a2, a3, rho, tau, meta)
    return y, plan


def structure_pool(x: Tensor, ptr: Optional[Tensor], w: Tensor, log_p0: Optional[Tensor],
                   log_q0: Optional[Tensor], *, method: str, variant: str, inner_iters: int,
                   return_plan: bool):
    """The family's entry point (docs/kernels.md): the (6, T) weight table ``w`` instead of six
    vectors; otherwise as :func:`rot_pool_structure_triton`."""
    a0, a1, a2, a3, rho, tau = w.unbind(0)
    return rot_pool_structure_triton(x, ptr, method=method, variant=variant, a0=a0, a1=a1,
                                     a2=a2, a3=a3, rho=rho, tau=tau, inner_iters=inner_iters,
                                     log_p0=log_p0, log_q0=log_q0, return_plan=return_plan)
