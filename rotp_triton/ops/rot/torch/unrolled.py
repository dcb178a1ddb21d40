"""The α0 = 0 solvers of the torch path with forward+backward memory independent of T.

The math is DESIGN §3 (and reference/rot.py, including the B-Q step weight ρ + α1 of the exact
variant), written once against a layout (:mod:`.layouts`: padded or segments) as one function
per unrolled iteration, ``step(t, state) -> (state', vectors)``.

:class:`UnrolledRot` runs the T iterations without autograd and saves, besides x, priors and
the (T,) weights, only small per-iteration vectors:

* Sinkhorn: the state itself is a pair of vectors (a, b); it is saved before every iteration
  and the backward differentiates one iteration at a time from it (O(T) time).
* Bregman ADMM: the state (log S, Z) is x-sized, but for α0 = 0 every entry evolves elementwise
  once the per-iteration LSE vectors (R over samples, C over features) are known. Those are
  saved; the backward rebuilds the state before iteration t by replaying iterations 0..t-1 with
  the saved vectors (elementwise only, no reductions), then differentiates iteration t.
  The replays start from the beginning or from one snapshot of the state at T // 2 (read,
  not copied): O(T²) elementwise replays, O(1) x-sized tensors whatever T.

Each differentiated iteration runs the same ops as the forward (the LSEs recomputed, not taken
from the saved vectors), so the gradients are exactly those of autograd through the unrolled
iterations (what the reference gives). A recorded backward (``create_graph=True``) runs the
plain loop instead, differentiable again (``..higher_order``).

On the CPU the exact variant runs these steps and the adjoints of :mod:`.adjoint` one chunk of
sets at a time instead (:mod:`.chunked`, the weights as Python floats), through
:func:`run_iterations` and :func:`exact_backward`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...._transforms import plain_ops
from ..higher_order import recomputed_vjp, recorded_backward
from .arena import Arena
from .vectors import A1, A2, A3, RHO, add_mul_, axpy, kappa, lognorm_feat  # noqa: F401

# --------------------------------------------------------------------------------------------
# one iteration of each solver; ``state`` is a tuple, ``given`` the saved LSE vectors (replay)
# --------------------------------------------------------------------------------------------
class SinkhornExact:
    """Gauss-Seidel unbalanced Sinkhorn, iteration t uses ε_t = α1[t] (DESIGN §3.1)."""
    replay = False                                     # the state is vectors: saved per iteration
    exact_vjp = True                                   # adjoint.py differentiates it by hand
    chunk_buffers = 6                                  # buffers in use at once (chunks.py)

    def init(self, L, x, lp0, lq0, arena=None):
        return (lp0.new_zeros(lp0.shape), L.zero(lq0.new_zeros(lq0.shape)))

    def step(self, L, t, x, lp0, lq0, w, state, given=None, arena=None):
        if arena is not None and not torch.is_grad_enabled():
            return self._step_no_grad(L, t, x, lp0, lq0, w, state, arena)
        a, b = state
        eps = w[A1][t]
        k2, k3 = kappa(w[A2][t], eps), kappa(w[A3][t], eps)
        y = x / eps
        r = L.lse_rows(y + b)                                              # R_d per set
        a = lognorm_feat(k2 * lp0 + (1 - k2) * r) - r
        c = L.lse_feat(y + L.rows(a))                                      # C_n per row
        b = L.zero(L.lognorm_rows(k3 * lq0 + (1 - k3) * c) - c)
        return (a, b), None

    def _step_no_grad(self, L, t, x, lp0, lq0, w, state, arena):
        """The same ops through arena buffers (no mask)."""
        _, b = state
        eps = w[A1][t]
        k2, k3 = kappa(w[A2][t], eps), kappa(w[A3][t], eps)
        yb, tmp = arena.take(), arena.take()
        r = L.lse_rows(axpy(b, x, 1 / eps, out=yb), tmp)                  # x/ε + b
        a = lognorm_feat(k2 * lp0 + (1 - k2) * r) - r
        c = L.lse_feat(axpy(L.rows_out(a, tmp), x, 1 / eps, out=yb), tmp)   # x/ε + a
        b = L.lognorm_rows(k3 * lq0 + (1 - k3) * c) - c
        arena.give(yb, tmp)
        return (a, b), (r, c)

    def output(self, L, x, w, state, arena=None):
        a, b = state
        if arena is not None and not torch.is_grad_enabled():          # into a reused buffer
            out = arena.take()
            return add_mul_(torch.add(L.rows_out(a, out), b, out=out), x, 1 / w[A1][-1])
        return L.zero(x / w[A1][-1] + L.rows(a) + b)


class SinkhornPaper(SinkhornExact):
    """Eq. (18) as printed, τ = 0: Jacobi updates from one Y (DESIGN §3.2)."""
    exact_vjp = False

    def step(self, L, t, x, lp0, lq0, w, state, given=None, arena=None):
        a, b = state
        eps = w[A1][t]
        k2, k3 = kappa(w[A2][t], eps), kappa(w[A3][t], eps)
        y = x / w[A1][max(t - 1, 0)] + L.rows(a) + b                       # Y of the last update
        r = L.lse_rows(y)
        c = L.lse_feat(y)
        a = k2 * (a / eps + lp0 - r)
        b = L.zero(k3 * (b / eps + lq0 - c))
        return (a, b), None


class Badmm:
    """Two-block Bregman ADMM, P = S with dual Z (DESIGN §3.1 exact / §3.2 paper Alg. 2).

    State: (log S, Z, log P) and, for the paper variant, (log μ, log η, z1, z2); B-Q exact
    without autograd (:meth:`_step_arena`) also carries S = exp(log S) as a 4th entry.
    """
    replay = True

    def __init__(self, quadratic: bool, variant: str, sf=None, a0: Optional[Tensor] = None):
        self.quadratic = quadratic
        self.paper = variant == "paper"
        self.sf, self.a0 = sf, a0          # α0 > 0 (padded layout, checkpointed by solvers.py)
        self.exact_vjp = not self.paper and sf is None
        self.chunk_buffers = 12 if quadratic else 11       # in use at once (chunks.py)

    def init(self, L, x, lp0, lq0, arena=None):
        if (arena is not None and self.exact_vjp and getattr(L, "mask", None) is None
                and not torch.is_grad_enabled()):                # into reused buffers
            log_s = arena.take()
            torch.add(L.rows_out(lp0, log_s), lq0, out=log_s)
            return (log_s, arena.take().zero_(), log_s)
        log_s = L.zero(L.rows(lp0) + lq0)                                 # log(p0 q0ᵀ)
        z = torch.zeros_like(x)
        state = (log_s, z, log_s)
        if self.paper:
            state += (lp0, lq0, torch.zeros_like(lp0), torch.zeros_like(lq0))
        return state

    def step(self, L, t, x, lp0, lq0, w, state, given=None, arena=None, borrowed=False):
        if self.exact_vjp and not torch.is_grad_enabled():
            if arena is not None and getattr(L, "mask", None) is None:
                return self._step_arena(L, t, x, lp0, lq0, w, state, given, arena, borrowed)
            return self._step_no_grad(L, t, x, lp0, lq0, w, state, given)
        log_s, z = state[0], state[1]
        a1, rho = w[A1][t], w[RHO][t]
        s = L.exp(log_s)
        # P-step; B-Q exact: step weight ρ + α1 (majorized linearisation, reference/rot.py)
        wp = rho + a1 if self.quadratic and not self.paper else rho
        g = x - z
        if self.sf is not None:
            g = g + self.a0[t] * self.sf.apply(s)
        if self.quadratic:
            g = g - a1 * s
        y = log_s + g / wp
        r = L.lse_rows(y) if given is None else given[0]                  # [set, D]
        if self.paper:
            log_mu, log_eta, z1, z2 = state[3:]
        else:
            k2 = kappa(w[A2][t], wp)
            log_mu = lognorm_feat(k2 * lp0 + (1 - k2) * r)
        log_p = L.zero(y + L.rows(log_mu - r))
        p = L.exp(log_p)
        # S-step
        h = z if self.sf is None else z + self.a0[t] * self.sf.apply(p)
        if self.quadratic:
            ws = wp
            y = log_p + (h - a1 * p) / ws
        else:
            ws = a1 + rho
            y = (h + rho * log_p) / ws
        c = L.lse_feat(y) if given is None else given[1]                  # [row, 1]
        if not self.paper:
            k3 = kappa(w[A3][t], ws)
            log_eta = L.lognorm_rows(k3 * lq0 + (1 - k3) * c)
        log_s = L.zero(y + (log_eta - c))
        s = L.exp(log_s)
        z = z + rho * (p - s)
        new = (log_s, z, log_p)
        if self.paper:                                                     # eqs. (26)-(28)
            k2 = kappa(w[A2][t], rho)
            k3 = kappa(w[A3][t], rho)
            log_mu = lognorm_feat((1 - k2) * (log_mu - z1 / rho) + k2 * lp0)
            log_eta = L.lognorm_rows((1 - k3) * (log_eta - z2 / rho) + k3 * lq0)
            z1 = z1 + rho * (torch.exp(log_mu) - L.sum_rows(p))
            z2 = L.zero(z2 + rho * (torch.exp(log_eta) - s.sum(-1, keepdim=True)))
            new += (log_mu, log_eta, z1, z2)
        return new, (r, c)

    def _step_no_grad(self, L, t, x, lp0, lq0, w, state, given):
        """The exact α0 = 0 step without autograd: the same ops, in place in few buffers."""
        log_s, z = state[0], state[1]
        a1, rho = w[A1][t], w[RHO][t]
        wp = rho + a1 if self.quadratic else rho
        ws = rho + a1
        y = torch.sub(x, z)
        if self.quadratic:
            y.sub_(a1 * L.exp(log_s))
        y.div_(wp).add_(log_s)
        r = L.lse_rows(y) if given is None else given[0]
        k2 = kappa(w[A2][t], wp)
        log_mu = lognorm_feat(k2 * lp0 + (1 - k2) * r)
        log_p = L.zero(y.add_(L.rows(log_mu - r)))                       # y's buffer
        p = L.exp(log_p)
        if self.quadratic:
            y2 = torch.mul(p, a1).neg_().add_(z).div_(ws).add_(log_p)
        else:
            y2 = torch.mul(log_p, rho).add_(z).div_(ws)
        c = L.lse_feat(y2) if given is None else given[1]
        k3 = kappa(w[A3][t], ws)
        log_eta = L.lognorm_rows(k3 * lq0 + (1 - k3) * c)
        log_s = L.zero(y2.add_(log_eta - c))                              # y2's buffer
        z = p.sub_(L.exp(log_s)).mul_(rho).add_(z)                        # p's buffer
        return (log_s, z, log_p), (r, c)

    def _step_arena(self, L, t, x, lp0, lq0, w, state, given, arena, borrowed=False):
        """:meth:`_step_no_grad` through arena buffers (no mask), fewer passes (a + s·b in one
        op); updates Z in place and gives back the rest of the old state (owned by the step),
        or, with ``borrowed`` (a snapshot the caller keeps), leaves the old state alone."""
        log_s, z = state[0], state[1]
        a1, rho = w[A1][t], w[RHO][t]
        wp = rho + a1 if self.quadratic else rho
        ws = rho + a1
        # y = log S + G/wp, G = X - Z [- α1 S]: the same ops as adjoint.badmm_exact_vjp's
        # recompute, so that both see the same floats (exp of y - R at |x| = 1e30 / α = 1e-6)
        G, tmp = torch.sub(x, z, out=arena.take()), arena.take()
        if self.quadratic:          # S = exp(log S): carried from the last step when it can be
            add_mul_(G, state[3] if len(state) > 3 else torch.exp(log_s, out=tmp), -a1)
        y = axpy(log_s, G, 1 / wp, out=G)
        k2 = kappa(w[A2][t], wp)
        k3 = kappa(w[A3][t], ws)
        p = arena.take()
        if given is None:
            # P = exp(y - m) · exp(m - R + log μ): the LSE's exponentials, rescaled (no 2nd exp)
            r, m = L.lse_rows(y, tmp, with_shift=True)                   # tmp = exp(y - m)
            log_mu = lognorm_feat(k2 * lp0 + (1 - k2) * r)
            log_p = y.add_(L.rows_out(log_mu - r, p))                    # y's buffer
            torch.mul(tmp, L.rows_out(torch.exp(m - r + log_mu), p), out=p)
        else:
            r = given[0]
            log_mu = lognorm_feat(k2 * lp0 + (1 - k2) * r)
            log_p = y.add_(L.rows_out(log_mu - r, p))                    # y's buffer
            torch.exp(log_p, out=p)
        y2 = arena.take()
        if self.quadratic:                                               # log P + (Z - α1 P)/ws
            add_mul_(axpy(log_p, z, 1 / ws, out=y2), p, -a1 / ws)
        else:                                                            # (Z + ρ log P)/ws
            add_mul_(torch.mul(z, 1 / ws, out=y2), log_p, rho / ws)
        if given is None:                                                # likewise S'
            c, mc = L.lse_feat(y2, tmp, with_shift=True)                 # tmp = exp(y2 - mc)
            log_eta = L.lognorm_rows(k3 * lq0 + (1 - k3) * c)
            s_new = tmp.mul_(torch.exp(mc - c + log_eta))
        else:
            c = given[1]
            log_eta = L.lognorm_rows(k3 * lq0 + (1 - k3) * c)
            s_new = None
        log_s_new = y2.add_(log_eta - c)                                  # y2's buffer
        if s_new is None:
            s_new = torch.exp(log_s_new, out=tmp)
        if borrowed:                                         # Z + ρ(P - S'), in P's buffer
            z_new = add_mul_(axpy(z, p, rho, out=p), s_new, -rho)
            spare = []
        else:                                                # Z + ρ(P - S'), in Z's buffer
            z_new = add_mul_(add_mul_(z, p, rho), s_new, -rho)
            spare = [p] + [v for v in state if v is not z]
        if self.quadratic:                                   # keep S' (tmp) for the next step
            arena.give(*spare)
            return (log_s_new, z_new, log_p, s_new), (r, c)
        arena.give(tmp, *spare)
        return (log_s_new, z_new, log_p), (r, c)

    def output(self, L, x, w, state, arena=None):
        return state[2]


def make_solver(method: str, variant: str):
    if method == "sinkhorn":
        return SinkhornExact() if variant == "exact" else SinkhornPaper()
    return Badmm(quadratic=method == "badmm-q", variant=variant)


# --------------------------------------------------------------------------------------------
# the autograd.Function
# --------------------------------------------------------------------------------------------
def run_iterations(solver, L, x, lp0, lq0, w, T, keep, vec_keep=None, arena=None):
    """Iterations 0..T-1 from the initial state; ``keep`` collects what the backward needs
    (states of a vector-state solver, else the LSE vectors), ``vec_keep`` the LSE vectors of a
    vector-state solver (its adjoint skips recomputing them). ``arena``: x-sized scratch to
    reuse (made here when autograd does not record and none is given)."""
    if arena is None and not torch.is_grad_enabled():
        arena = Arena(x)
    state = solver.init(L, x, lp0, lq0, arena)
    for t in range(T):
        if keep is not None and not solver.replay:
            keep.append(state)
        state, vecs = solver.step(L, t, x, lp0, lq0, w, state, arena=arena)
        if keep is not None and solver.replay:
            keep.append(vecs)
        if vec_keep is not None and not solver.replay:
            vec_keep.append(vecs)
    return state


class UnrolledRot(torch.autograd.Function):
    """log P of T unrolled iterations; saves x and per-iteration vectors only (module docstring)."""

    @staticmethod
    def forward(ctx, solver, L, T, x, lp0, lq0, a1, a2, a3, rho):
        w = (a1, a2, a3, rho)
        keep, vec_keep = [], []
        state = run_iterations(solver, L, x, lp0, lq0, w, T, keep, vec_keep)
        ctx.solver, ctx.L, ctx.T, ctx.keep, ctx.vec_keep = solver, L, T, keep, vec_keep
        ctx.final = state if not solver.replay else None
        ctx.save_for_backward(x, lp0, lq0, a1, a2, a3, rho)
        return solver.output(L, x, w, state)

    @staticmethod
    def backward(ctx, g_out):
        saved = ctx.saved_tensors  # once: checkpoint(use_reentrant=False) allows no more
        if recorded_backward():  # create_graph: the plain iterations, differentiable again
            return (None, None, None, *recomputed_vjp(
                lambda *s: plain_log_plan(ctx.solver, ctx.L, ctx.T, *s), saved,
                ctx.needs_input_grad[3:], (g_out,)))
        return UnrolledRot._first_order(ctx, g_out, saved)

    @staticmethod
    def _first_order(ctx, g_out, saved):
        solver, L, T, keep = ctx.solver, ctx.L, ctx.T, ctx.keep
        if getattr(solver, "exact_vjp", False) and getattr(L, "mask", None) is None:
            return (None, None, None, *exact_backward(ctx, g_out, saved=saved))
        leaves = [v.detach().requires_grad_() for v in saved]             # x, lp0, lq0, a1..rho
        x, lp0, lq0 = leaves[:3]
        w = tuple(leaves[3:])
        acc: list = [None] * len(leaves)

        def state_before(t: int):
            """The state entering iteration t (detached)."""
            if not solver.replay:
                return ctx.final if t == T else keep[t]
            with torch.no_grad():
                st = solver.init(L, saved[0], saved[1], saved[2])
                sw = tuple(saved[3:])
                for s in range(t):
                    st, _ = solver.step(L, s, saved[0], saved[1], saved[2], sw, st, given=keep[s])
            return st

        def backprop(outs, g_outs, state_leaves):
            pairs = [(o, g) for o, g in zip(outs, g_outs)
                     if g is not None and isinstance(o, Tensor) and o.requires_grad]
            if not pairs:
                return [None] * len(state_leaves)
            gs = torch.autograd.grad([o for o, _ in pairs], leaves + state_leaves,
                                     [g for _, g in pairs], allow_unused=True)
            for i in range(len(leaves)):
                if gs[i] is not None:
                    acc[i] = gs[i] if acc[i] is None else acc[i] + gs[i]
            return list(gs[len(leaves):])

        with torch.enable_grad():
            st = [v.detach().requires_grad_() for v in state_before(T)]
            g_state = backprop([solver.output(L, x, w, tuple(st))], [g_out], st)
            for t in reversed(range(T)):
                if t == 0:  # the initial state depends on the priors: build it in the graph
                    st0 = list(solver.init(L, x, lp0, lq0))
                    new, _ = solver.step(L, 0, x, lp0, lq0, w, tuple(st0))
                    backprop(list(new), g_state, [])
                else:
                    st = [v.detach().requires_grad_() for v in state_before(t)]
                    new, _ = solver.step(L, t, x, lp0, lq0, w, tuple(st))
                    g_state = backprop(list(new), g_state, st)
                del new
        grads = [g if need else None for g, need in zip(acc, ctx.needs_input_grad[3:])]
        return (None, None, None, *grads)


def _replayed_state(ctx, saved, t: int, arena=None, snapshot=None):
    """The (detached) state entering iteration t of a replay solver, rebuilt from x and the
    saved LSE vectors, from ``snapshot`` = (t0, state) when t0 <= t: the first step from it
    leaves it alone (``borrowed``); at t = t0 the snapshot itself is handed over (the caller
    goes down in t: it is not used again). ``saved``: ctx's saved tensors, as unpacked once."""
    solver, L, keep = ctx.solver, ctx.L, ctx.keep
    x, lp0, lq0, *w = saved
    w = getattr(ctx, "wf", None) or w
    with torch.no_grad():
        borrowed = snapshot is not None and snapshot[0] <= t
        if borrowed:
            t0 = snapshot[0]
            ls, z = snapshot[1][:2]
            st = (ls, z, ls)
        else:
            t0, st = 0, solver.init(L, x, lp0, lq0, arena)
        for s in range(t0, t):
            st, _ = solver.step(L, s, x, lp0, lq0, tuple(w), st, given=keep[s], arena=arena,
                                borrowed=borrowed and s == t0)
    return st


def exact_backward(ctx, g_out, gx: Optional[Tensor] = None, arena: Optional[Arena] = None,
                     pending: Optional[dict] = None, saved: Optional[tuple] = None):
    """Backward of the exact solvers with the hand-written adjoints of adjoint.py.

    ``ctx``: the UnrolledRot context or anything with its attributes (chunked.py's per-chunk
    records). ``g_out``: the gradient of log P, or a function ``(log P, arena) -> gradient``
    (an owned x-sized buffer), called once log P is rebuilt (chunked.py's pool adjoint).
    ``gx``: a zeroed buffer to accumulate the gradient of x into (default: a new one).
    ``ctx.wf``, when present: the weights to compute with (Python floats, chunked.py).
    ``pending``: a dict to record the weight gradients in (the caller applies them, once for
    all chunks); default: applied here, and returned as the weights' gradients.)
    ``saved``: ``ctx.saved_tensors`` where the caller has unpacked them (a backward may unpack
    them once only under ``torch.utils.checkpoint(use_reentrant=False)``)."""
    from . import adjoint
    solver, L, T, keep = ctx.solver, ctx.L, ctx.T, ctx.keep
    if saved is None:
        saved = ctx.saved_tensors
    x, lp0, lq0, *w_tensors = saved
    w = getattr(ctx, "wf", None) or tuple(w_tensors)
    need = ctx.needs_input_grad[3:]
    acc = dict(x=torch.zeros_like(x) if gx is None else gx, lp0=torch.zeros_like(lp0),
               lq0=torch.zeros_like(lq0),
               w=[torch.zeros(T, dtype=wi.dtype, device=wi.device) if n else None
                  for wi, n in zip(w_tensors, need[3:])],
               w_pending={} if pending is None else pending)
    arena = Arena(x) if arena is None else arena
    with torch.no_grad():
        if isinstance(solver, Badmm):
            # one snapshot (log S, Z) at T // 2: 2 x-sized tensors whatever T, and about a
            # quarter of the O(T²) replay steps (none left at T <= 3)
            snapshot = None
            if T >= 3:
                mid = _replayed_state(ctx, saved, T // 2, arena)   # kept until t = T // 2
                arena.give(*mid[2:])                         # log P (and S)
                snapshot = (T // 2, mid[:2])
            g_ls, g_z, g_lp = None, None, g_out
            for t in reversed(range(T)):
                state = _replayed_state(ctx, saved, t, arena, snapshot)
                if snapshot is not None and t == snapshot[0]:
                    snapshot = mid = None                # handed over with the state
                g_ls, g_z = adjoint.badmm_exact_vjp(L, t, x, lp0, lq0, w, state, g_ls, g_z, g_lp,
                                                    acc, quadratic=solver.quadratic, arena=arena,
                                                    vecs=keep[t])
                del state
                g_lp = None
            adjoint.badmm_init_vjp(L, g_ls, acc)
        else:
            if callable(g_out):
                g_out = g_out(solver.output(L, x, w, ctx.final, arena), arena)
            g_a, g_b = adjoint.sinkhorn_exact_output_vjp(L, x, w, g_out, acc)
            for t in reversed(range(T)):
                g_a, g_b = adjoint.sinkhorn_exact_vjp(L, t, x, lp0, lq0, w, keep[t], g_a, g_b,
                                                      acc, arena=arena, vecs=ctx.vec_keep[t])
    if pending is None:
        adjoint.apply_weight_grads(acc["w_pending"], w_tensors, acc["w"])
    grads = [acc["x"], acc["lp0"], acc["lq0"], *acc["w"]]
    return [g if n else None for g, n in zip(grads, need)]


def unrolled_log_plan(L, x: Tensor, lp0: Tensor, lq0: Tensor, *, method: str, variant: str,
                      a1: Tensor, a2: Tensor, a3: Tensor, rho: Tensor, T: int) -> Tensor:
    """log P for α0 = 0 in layout ``L`` (lp0, lq0 already in the layout's vector shapes).

    With autograd recording, runs :class:`UnrolledRot` (memory independent of T); otherwise (or
    while torch.compile traces) the plain loop.
    """
    solver = make_solver(method, variant)
    w = (a1, a2, a3, rho)
    tensors = (x, lp0, lq0) + w
    if (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            and not plain_ops()):
        return UnrolledRot.apply(solver, L, T, *tensors)
    return plain_log_plan(solver, L, T, *tensors)


def plain_log_plan(solver, L, T: int, x: Tensor, lp0: Tensor, lq0: Tensor, a1: Tensor,
                   a2: Tensor, a3: Tensor, rho: Tensor) -> Tensor:
    """log P by the plain loop: autograd (when it records) keeps every iteration's graph."""
    w = (a1, a2, a3, rho)
    return solver.output(L, x, w, run_iterations(solver, L, x, lp0, lq0, w, T, None))
