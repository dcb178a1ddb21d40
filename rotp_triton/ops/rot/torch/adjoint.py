"""Hand-written reverse mode of one exact α0 = 0 iteration (S, B-E, B-Q) for :mod:`.unrolled`.

Autograd through one iteration keeps every intermediate (about ten x-sized tensors) and runs
many small kernels; these functions recompute the forward of iteration t from its input state
and apply the chain rule by hand, keeping only what the next line needs (in-place where a
temporary dies). They differentiate exactly the ops of :mod:`.unrolled` (tests/test_rot_torch.py
compares with autograd through the reference to 1e-9 in float64). Only for layouts without
padding (dense ``Padded(None)`` and ``Segments``): padded rows would need the mask everywhere.

The (T,) weights enter an iteration through a few scalars (ε; ρ + α1; κ2, κ3; ρ, α1 directly),
as 0-d tensors or (the chunked CPU path) Python floats: their gradients are sums over the batch,
recorded per iteration and pushed through the weight formulas (κ at α = inf included) once, by
autograd on 0-d tensors (:func:`apply_weight_grads`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .vectors import A1, A2, A3, RHO, add_div_, add_mul_, axpy, kappa, lognorm_feat


def _weight_grads(t, acc, fn, g_scalars, direct=None):
    """Record, for iteration t, the gradient of Σ_k g_scalars[k] · fn(a1, a2, a3, ρ)[k] (plus
    ``direct[i]`` on weight i) in ``acc["w_pending"]``; :func:`apply_weight_grads` pushes the
    sums through ``fn`` once per (t, fn), however many chunks of sets added to them."""
    if all(g is None for g in acc["w"]):
        return
    rec = acc["w_pending"].setdefault((t, fn), [[None] * len(g_scalars), {}])
    rec[0] = [_add(a, b) for a, b in zip(rec[0], g_scalars)]
    for i, d in (direct or {}).items():
        rec[1][i] = _add(rec[1].get(i), d)


def _add(a, b):
    return b if a is None else a if b is None else a + b


def apply_weight_grads(pending: dict, w, gw) -> None:
    """gw[i][t] += the recorded weight gradients, through the weight formulas (κ at α = inf
    included) by autograd on the 0-d tensors w[i][t]."""
    for (t, fn), (g_scalars, direct) in pending.items():
        with torch.enable_grad():
            leaves = [w[i][t].detach().requires_grad_() for i in range(4)]
            outs = fn(*leaves)
            pairs = [(o, g) for o, g in zip(outs, g_scalars)
                     if g is not None and o.requires_grad]
            gs = (torch.autograd.grad([o for o, _ in pairs], leaves,
                                      [torch.as_tensor(g, dtype=o.dtype) for o, g in pairs],
                                      allow_unused=True) if pairs else [None] * 4)
        for i in range(4):
            if gw[i] is None:
                continue
            if gs[i] is not None:
                gw[i][t] += gs[i]
            if direct.get(i) is not None:
                gw[i][t] += direct[i]


def _sinkhorn_step_scalars(a1, a2, a3, rho):
    return a1, kappa(a2, a1), kappa(a3, a1)


def _sinkhorn_output_scalars(a1, a2, a3, rho):
    return (a1,)


def _badmm_scalars_e(a1, a2, a3, rho):
    return rho, rho + a1, kappa(a2, rho), kappa(a3, rho + a1)           # wp, ws, κ2, κ3


def _badmm_scalars_q(a1, a2, a3, rho):
    return rho + a1, rho + a1, kappa(a2, rho + a1), kappa(a3, rho + a1)


def _softmax_rows(L, v: Tensor) -> Tensor:
    """softmax over each set's rows of a per-row vector."""
    return torch.exp(L.lognorm_rows(v))


def _back_lognorm_rows(L, v: Tensor, g: Tensor) -> Tensor:
    """VJP of lognorm_rows at v."""
    return g - _softmax_rows(L, v) * L.rows(L.sum_rows(g))


def _back_lognorm_feat(u: Tensor, g: Tensor) -> Tensor:
    """VJP of lognorm_feat at u."""
    return g - torch.exp(lognorm_feat(u)) * g.sum(-1, keepdim=True)


# --------------------------------------------------------------------------------------------
# Sinkhorn, exact
# --------------------------------------------------------------------------------------------
def sinkhorn_exact_vjp(L, t, x, lp0, lq0, w, state, g_a, g_b, acc, *, arena, vecs):
    """Reverse of SinkhornExact.step at iteration t from ``state`` = (a, b) entering it.

    ``g_a``, ``g_b``: gradients of the state leaving it. Returns the gradients of the state
    entering it and adds the rest to ``acc`` (keys x, lp0, lq0, w).
    """
    _, b = state                        # the exact update does not read the incoming a
    eps = w[A1][t]
    k2, k3 = kappa(w[A2][t], eps), kappa(w[A3][t], eps)
    tmp = arena.take() if L.row_buffer else None                      # rows_out scratch
    yb = axpy(b, x, 1 / eps, out=arena.take())                         # x/ε + b  [rows, D]
    r, c = vecs                          # R [set, D], C [row, 1] saved by the forward
    u = k2 * lp0 + (1 - k2) * r
    a = lognorm_feat(u) - r
    ya = axpy(L.rows_out(a, tmp), x, 1 / eps, out=arena.take())        # x/ε + a
    v = k3 * lq0 + (1 - k3) * c
    # b' = lognorm_rows(v) - c
    g_v = _back_lognorm_rows(L, v, g_b)
    g_c = (1 - k3) * g_v - g_b
    acc["lq0"] += k3 * g_v
    g_k3 = (g_v * (lq0 - c)).sum()
    # c = LSE_feat(y + a')
    gy = ya.sub_(c).exp_().mul_(g_c)                                    # softmax_feat · g_c
    g_a = g_a + L.sum_rows(gy)
    # a' = lognorm_feat(u) - r
    g_u = _back_lognorm_feat(u, g_a)
    g_r = (1 - k2) * g_u - g_a
    acc["lp0"] += k2 * g_u
    g_k2 = (g_u * (lp0 - r)).sum()
    # r = LSE_rows(y + b)
    t_r = yb.sub_(L.rows_out(r, tmp)).exp_().mul_(L.rows_out(g_r, tmp))  # softmax_rows · g_r
    g_b_in = t_r.sum(-1, keepdim=True)
    gy.add_(t_r)
    # y = x / eps
    add_div_(acc["x"], gy, eps)
    g_eps = -_dot(gy, x) / (eps * eps)                                  # y = x/ε
    arena.give(yb, gy, tmp)
    _weight_grads(t, acc, _sinkhorn_step_scalars, (g_eps, g_k2, g_k3))
    return torch.zeros_like(g_a), g_b_in


def sinkhorn_exact_output_vjp(L, x, w, g_out, acc):
    """Reverse of log P = x/ε_T + a 1ᵀ + 1 bᵀ; returns (g_a, g_b) of the final state."""
    eps = w[A1][-1]
    add_div_(acc["x"], g_out, eps)
    g_eps = -_dot(g_out, x) / (eps * eps)
    T = len(w[A1])
    _weight_grads(T - 1, acc, _sinkhorn_output_scalars, (g_eps,))
    return L.sum_rows(g_out), g_out.sum(-1, keepdim=True)


# --------------------------------------------------------------------------------------------
# Bregman ADMM, exact (B-E, B-Q)
# --------------------------------------------------------------------------------------------
def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Σ a·b without an x-sized temporary (both contiguous, same shape)."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


def badmm_exact_vjp(L, t, x, lp0, lq0, w, state, g_ls, g_z, g_lp, acc, *, quadratic: bool,
                    arena, vecs):
    """Reverse of Badmm.step (exact variant, α0 = 0) at iteration t from ``state`` =
    (log S, Z, ·) entering it (owned: overwritten). ``g_ls``, ``g_z`` (owned, overwritten),
    ``g_lp`` (read only; at the last iteration also a function ``(log P, arena) -> owned
    gradient``): gradients of the state leaving it, None = 0. Returns
    (g_ls_in, g_z_in). Every x-sized buffer is reused in place where the math allows: on the
    CPU a fresh large tensor costs its page faults, more than the arithmetic."""
    ls, z = state[0], state[1]
    s_carried = state[3] if len(state) > 3 else None                  # S (B-Q replays)
    if state[2] is not ls:
        arena.give(state[2])             # the replayed log P: recomputed below, free it now
    state = None
    a1, rho = w[A1][t], w[RHO][t]
    wp = rho + a1 if quadratic else rho
    ws = rho + a1
    k2, k3 = kappa(w[A2][t], wp), kappa(w[A3][t], ws)
    # ---- recompute the forward of the iteration (the ops of Badmm.step)
    tmp = arena.take() if L.row_buffer else None                      # rows_out scratch
    G = torch.sub(x, z, out=arena.take())                 # X - Z [- α1 S]     [rows, D]
    s_in = None
    if quadratic:                        # S = exp(log S), carried in the state when replayed
        s_in = s_carried if s_carried is not None else torch.exp(ls, out=arena.take())
        add_mul_(G, s_in, -a1)
    y = axpy(ls, G, 1 / wp, out=arena.take())          # the ops of Badmm._step_arena
    arena.give(ls)
    del ls
    r, c = vecs                          # R [set, D], C [row, 1] saved by the forward
    u = k2 * lp0 + (1 - k2) * r
    lmu = lognorm_feat(u)
    pr = torch.sub(y, L.rows_out(r, tmp), out=arena.take()).exp_()     # ∂R/∂y = exp(y - R)
    lp = torch.add(y, L.rows_out(lmu - r, tmp), out=arena.take())
    arena.give(y)
    del y
    p = torch.mul(pr, L.rows_out(torch.exp(lmu), tmp), out=arena.take())  # exp(log P)
    y2 = arena.take()                                   # the ops of Badmm._step_arena
    if quadratic:
        add_mul_(axpy(lp, z, 1 / ws, out=y2), p, -a1 / ws)
    else:
        add_mul_(torch.mul(z, 1 / ws, out=y2), lp, rho / ws)
    arena.give(z)
    del z
    v = k3 * lq0 + (1 - k3) * c
    leta = L.lognorm_rows(v)
    d_rho = None
    d_a1 = None
    g_ws = g_k3 = None
    if g_ls is None and g_z is None:  # the last iteration: only log P is used
        g_lp_tot = g_lp(lp, arena) if callable(g_lp) else arena.take().copy_(g_lp)
        g_z_in = None
        arena.give(y2, lp, p)
        del y2, lp, p
    else:
        # ---- reverse. z' = z + ρ (p - s'), s' = exp(log S') = exp(y2 - C) η
        e_c = torch.sub(y2, c, out=arena.take()).exp_()                 # ∂C/∂y2
        if g_z is not None:
            so = torch.mul(e_c, torch.exp(leta), out=arena.take())
            d_rho = _dot(g_z, p) - _dot(g_z, so)
            so.mul_(g_z).mul_(rho)                                          # ρ g_z s'
            if g_ls is None:
                g_ls = so.neg_()
            else:
                g_ls.sub_(so)
                arena.give(so)
            del so
        # log S' = y2 + (log η - C)
        g_leta = g_ls.sum(-1, keepdim=True)
        g_v = _back_lognorm_rows(L, v, g_leta)
        g_c = (1 - k3) * g_v - g_leta
        acc["lq0"] += k3 * g_v
        g_k3 = (g_v * (lq0 - c)).sum()
        pc = e_c.mul_(g_c)                                              # ∂C/∂y2 · g_c
        if quadratic:
            y2.sub_(lp)                                                      # (Z - α1 P)/ws
            g_y2 = g_ls.add_(pc)
            arena.give(pc)
            del pc
            g_ws = -_dot(g_y2, y2) / ws
            d_a1 = -_dot(g_y2, p) / ws
        else:
            g_ws = -(_dot(g_ls, y2) + _dot(pc, y2)) / ws
            g_y2 = g_ls.add_(pc)
            arena.give(pc)
            del pc
            d_lp = _dot(g_y2, lp) / ws                                   # y2 = (Z + ρ log P)/ws
            d_rho = d_lp if d_rho is None else d_rho + d_lp
        arena.give(y2, lp)
        del y2, lp
        g_z_in = torch.div(g_y2, ws, out=arena.take())
        if g_z is not None:
            g_z_in.add_(g_z)
        # gradient of log P: the y2 path, ρ g_z P [- α1/ws g_y2 P] through P = exp(log P), g_lp
        g_lp_tot = g_y2 if quadratic else g_y2.mul_(rho / ws)
        if quadratic:
            g_pp = (torch.mul(g_y2, -a1 / ws, out=arena.take()) if g_z is None
                    else add_mul_(g_z.mul_(rho), g_y2, -a1 / ws))
        else:
            g_pp = None if g_z is None else g_z.mul_(rho)
        if g_pp is not None:
            g_lp_tot.addcmul_(g_pp, p)
        arena.give(g_pp, p)
        del g_pp, p, g_z
        if g_lp is not None:
            g_lp_tot.add_(g_lp)
    # log P = y + (log μ - R)
    g_lmu = L.sum_rows(g_lp_tot)
    g_u = _back_lognorm_feat(u, g_lmu)
    g_r = (1 - k2) * g_u - g_lmu
    acc["lp0"] += k2 * g_u
    g_k2 = (g_u * (lp0 - r)).sum()
    # R = LSE_rows(y)
    g_y = g_lp_tot.addcmul_(pr, L.rows_out(g_r, tmp))
    arena.give(pr)
    del pr
    # y = log S + G / wp
    add_div_(acc["x"], g_y, wp)
    g_wp = -_dot(g_y, G) / (wp * wp)
    arena.give(G)
    del G
    if g_z_in is None:
        g_z_in = torch.div(g_y, wp, out=arena.take()).neg_()
    else:
        add_div_(g_z_in, g_y, -wp)
    if quadratic:                                     # G holds -α1 S, S = exp(log S)
        s_in.mul_(g_y)
        d_s = -s_in.sum() / wp
        d_a1 = d_s if d_a1 is None else d_a1 + d_s
        add_mul_(g_y, s_in, -a1 / wp)
        arena.give(s_in)
        del s_in
    arena.give(tmp)

    _weight_grads(t, acc, _badmm_scalars_q if quadratic else _badmm_scalars_e,
                  (g_wp, g_ws, g_k2, g_k3), direct={A1: d_a1, RHO: d_rho})
    return g_y, g_z_in


def badmm_init_vjp(L, g_ls, acc):
    """Reverse of log S⁰ = log p0 + log q0 (Z⁰ = 0)."""
    acc["lp0"] += L.sum_rows(g_ls)
    acc["lq0"] += g_ls.sum(-1, keepdim=True)
