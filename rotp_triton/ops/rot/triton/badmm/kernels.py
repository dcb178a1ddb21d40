"""``@triton.jit`` code of the B-ADMM set kernels (B-E entropic, B-Q quadratic), α0 = 0.

Computes exactly what :func:`rotp_triton.ops.rot.solvers.badmm` computes with ``sf=None``
(DESIGN §3.1 ``variant="exact"``, §3.2 ``variant="paper"``), fused: one launch for the forward,
one for the backward, one program per set. Dense batches with fewer sets than SMs instead
spread each set over several programs (:mod:`.split_kernels`, :mod:`.split_backward_kernels`,
built from the helpers here).

Layout and state. A set is ``x_b`` (N_b, D) (rows = samples), read in place through x's
strides (a dense (B, N, D) batch with any strides, e.g. an NCHW image viewed as
x.flatten(2).transpose(1, 2), or a ragged (rows, D) batch with ``ptr``). B-ADMM carries two
full (N_b, D) matrices, log S and Z, from one iteration to the next; but for α0 = 0 each of
their entries evolves on its own once the iteration's row and column vectors are known, so
the forward records those vectors (see "Backward schedule" below) and has two schedules
(``REPLAY``, chosen by the launcher from T and x's dtype): rebuild the state of each tile from
x and the vectors recorded so far in every pass (:func:`_replay_state`; no state scratch), or
stream it. Persistent grid: program ``pid`` handles sets ``pid, pid + G, ...`` (G = #SMs; ragged
sets largest first), one at a time; streaming keeps log S and Z in an fp32 scratch in global
memory (L2-resident when it fits), in [BN, BD] tiles with online LSEs. The scratch of a dense
batch is per program, O(G · N · D), not O(B · N · D); that of a ragged batch is the set's own
rows of a (rows, D) matrix (sizing a per-program scratch would need N_max, a host sync that
torch.compile cannot trace). One iteration is two passes:

  A  (column-wise) Y = log S + (X - Z [- α1 S]) / w_P,  R = LSE_n(Y)  (w_P = ρ; B-Q exact ρ + α1)
     then the D-vector log μ = lognorm(κ2 log p0 + (1 - κ2) R)          (exact) / state (paper)
  B  (row-wise)    log P = Y + (log μ - R), P-step done; S-step input Y2 (written over log S),
                   C = LSE_d(Y2), and Z += ρ P (written in place)
     then the N-vector log η = lognorm(κ3 log q0 + (1 - κ3) C)         (exact) / state (paper)
  (paper: then the μ/η/z1/z2 vector updates, eqs. 26-28)
When a set's rows fit one tile (dense, replay, B-E or paper: ``ONE_PASS``), A's R is complete
within each column block, and A and B run as one sweep (:func:`_one_pass_iteration`; the
exact variant's log μ needs Λ = LSE_d of its mix, known only at the end: the sweep shifts by
the mix and corrects log μ and C after it).
The S-step's normalisation log S = Y2 + (log η - C) and the dual's Z -= ρ S are not a pass of
their own: when streaming, the scratch keeps (Y2, Z + ρ P) and every pass that reads the state applies them on
the fly from the kept vectors C, log η and the scalar ρ (:func:`_load_state`), which saves a
read and a write of both matrices per iteration.

The last iteration only needs its P-step: pass A also accumulates the pooled output
y_d = Σ_n softmax_n(Y)_nd X_nd (softmax_n(log P) = softmax_n(Y): log μ - R is constant over
n), and with ``return_plan`` one more pass writes P = exp(Y + log μ - R), which already has
total mass 1 (Σ_d μ_d = 1).

Paper variant: Σ_n P = μ and Σ_d S = η hold by construction after the P- and S-steps, so the
z1/z2 updates use exp(log μ_t) / exp(log η_t) for P·1 / Sᵀ·1 (equal in exact arithmetic to the
sums the torch path forms; they differ by rounding only).

Backward: the exact reverse-mode gradient of the T unrolled iterations, for x, log p0, log q0
and the per-iteration scalars (α1, ρ directly; α2, α3 through κ2, κ3, whose chain rule
:func:`badmm_dw_kernel` applies on chip). Every per-iteration scalar (κ2, κ3, 1/ρ, 1/(α1 + ρ))
is derived on chip from the (6, T) weight table (rows as ``params.py``).

Backward schedule (issue 17): for α0 = 0 every entry of (log S, Z) evolves on its own once the
iteration's row and column shifts (log η - C)_n and (log μ - R)_d are known. The forward
therefore records R, log μ [, z1], log μ - R (per set, D each) and C, log η [, z2],
log η - C (per row) of every iteration - O(T · (N + D)) per set, saved with x - and the
backward's reverse step t rebuilds (log S_t, Z_t) of each tile from x and that history
(:func:`_replay_state`: t elementwise iterations, two exp2 each, no HBM traffic beyond x and
the vectors) instead of re-running the forward's passes from iteration 0. The adjoints L̄, Z̄
live in an fp32 scratch of the size above - except Z̄ where that scratch is per row (the
split backward, ragged batches): it follows the state and the per-step R̄ (B-Q: and C̄)
alone, and pass 3 (and pass 2 where unfused) rebuilds it (:func:`_rebuilt_zbar`; 1× the
input of memory less).
Each reverse step needs two reductions in sequence, τ = Σ_n log P̄ (for R̄) and then
σ = Σ_d (L̄ - ρ Z̄ S) (for the next step's C̄), so two
sweeps per step, of which only one touches L̄, Z̄:
  pass 2 (a sweep over x, :func:`_adjoint_s_step_tiles` CB_ONLY): the part of τ_t and of the
         S-step's scalar partials that comes from C̄_t, added to the rest, which pass 3 of
         step t + 1 summed (TAU0 slot)
  pass 3 (:func:`_adjoint_p_step_tiles`, column blocks outside): reads L̄', Z̄', X̄, writes
         L̄, Z̄, X̄ (in place) and σ_{t-1} (accumulated over the column blocks), and - FUSE -
         runs pass 2 of iteration t - 1 with C̄_{t-1} = 0 on the L̄, Z̄ it just formed: pass 2
         is linear in (L̄', Z̄', C̄), so its L̄', Z̄' part needs no second read of them. The
         state of t - 1 comes free on the way to t's (the replay stops one iteration early).
Per element and reverse step 4 + 28 bytes (x; x, L̄', Z̄', X̄ read, L̄, Z̄, X̄ written), was 12 +
28 when pass 2 read L̄', Z̄'; O(T) passes in all. The elementwise replay costs O(t) arithmetic
per element and pass (cost model: :func:`.cost.badmm_cost_model`); pass 3 holds two
iterations' states, the adjoints and x per element, so the launcher halves its 8-warp tiles
(:func:`.launch.backward_block_sizes`: no spills at sm_90). That costs instructions: the
smaller tiles amortise the replay's per-iteration loads over half the elements and pass 3 runs
two more exp2 per element; the calibrated model prices those instructions above the bytes
they save at every T, so the launcher runs the unfused schedule (``FUSE`` off: pass 2 reads
L̄', Z̄', 12 + 28 bytes; :func:`.launch.backward_fuses`), on the half tiles at 16 warps
(:func:`.launch.unfused_backward_block_sizes`). With FUSE and no plan
gradient the first reverse step stores no L̄, Z̄, X̄ either (``DEFER``,
:func:`.launch.backward_defers`): they depend only on iteration T - 1's state, R, y and ȳ
(log P̄ = 0 there, so R̄ = 0), and the second step's pass 3 recomputes them
(:func:`_last_step_adjoints`) - 24 bytes per element less. The split backward
(:mod:`.split_backward_kernels`) fuses where it rebuilds Z̄' (:func:`.launch.split_backward_fuses`:
pass 2 then needs no rebuild), across launches, without DEFER.

Launch shape and synchronisation: every pass that reads what another pass wrote is separated
from it by ``tl.debug_barrier()`` (the passes use different thread mappings); in-place updates
(load, then store the same lanes) only happen within one layout, with blocks that cover the CTA
(no replicated lanes; see :func:`.launch.block_sizes`).

Adjoint of one exact iteration (ā = adjoint of a; s' = exp(log S_{t+1})):
  L̄' ← L̄' - ρ Z̄' s'                       (Z' = Z + ρ(P - S'))
  σ_n = Σ_d L̄';  v̄ = σ - η Σσ;  C̄ = -σ + (1-κ3) v̄ ;  κ̄3 += Σ v̄ (log q0 - C); log q̄0 += κ3 v̄
  Ȳ2 = L̄' + C̄ exp(Y2 - C)
  E: Z̄ = Z̄' + Ȳ2/w,  log P̄ = ρ Ȳ2/w + ρ Z̄' P     (w = α1 + ρ)
  Q: Z̄ = Z̄' + Ȳ2/w_P,  log P̄ = Ȳ2 + P (ρ Z̄' - α1 Ȳ2/w_P)   (w_P = ρ + α1 exact, ρ paper)
  τ_d = Σ_n log P̄;  ū = τ - μ Στ;  R̄ = -τ + (1-κ2) ū;  κ̄2 += Σ ū (log p0 - R); log p̄0 += κ2 ū
  Ȳ = log P̄ + R̄ softmax_n(Y);  L̄ = Ȳ [- α1 S Ȳ/w_P];  Z̄ -= Ȳ/w_P;  X̄ += Ȳ/w_P  (E: w_P = ρ)
(plus the scalar partials of α1 and ρ; the paper variant replaces the lognorm lines by its
vector state's adjoints). Every reduction is a streamed pass like the forward's.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..common import (LOG2E, kappa, set_inv_scale, set_spread, snake_direction,
                      snake_start, store_reduced)

_LOG2E = tl.constexpr(LOG2E)   # jit code reads module constants as constexprs

# Vector scratch: 8 D-vectors per program (vd + j·D) - R, log μ, z1, τ (then R̄), log μ̄, z̄1,
# log p̄0, and the backward's τ of the next reverse step as far as its pass 3 forms it (slot 7,
# :func:`_adjoint_p_step_tiles` FUSE; the forward uses 7) - and 9 N-vectors per set (vn + j·ns)
# - C, log η, z2, σ (then C̄), log η̄, z̄2, log q̄0,
# and the previous iteration's C and log η (forward: the deferred S normalisation, _load_state;
# backward: slot 7 takes pass 3's σ while it still reads C̄ from slot 3).
# Running maxima start at -inf and every exponent subtracts _finite(max) (0 for -inf): with a
# finite sentinel (-1e30) inputs ~1e30 gave LSE = log(0) (issue 17).

# --------------------------------------------------------------------------------------------
# elementwise helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _exp(v):
    return tl.exp2(v * _LOG2E)


@triton.jit
def _log(v):
    return tl.log2(v) * 0.6931471805599453


@triton.jit
def _finite(m):
    """A running maximum usable as an exponent shift: 0 where it is still -inf."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _vzero(BV: tl.constexpr):
    # a 0-d fp32 zero usable as a loop-carried scalar accumulator
    return tl.sum(tl.zeros([BV], dtype=tl.float32), axis=0)


@triton.jit
def _sums_init(PER_TILE: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """A sweep's accumulator of a scalar sum over its [BN, BD] tiles: a tile that each one adds
    to elementwise, reduced once after the sweep (:func:`_sums_total`), or (PER_TILE) a 0-d
    sum that each tile adds its own full sum to - a cross-warp reduction per tile (~25
    instructions and 3 barriers a thread at W2's 2 elements a thread) for one tile of
    registers less."""
    if PER_TILE:
        acc = _vzero(BD)
    else:
        acc = tl.zeros([BN, BD], dtype=tl.float32)
    return acc


@triton.jit
def _sums_add(acc, v, PER_TILE: tl.constexpr):
    """:func:`_sums_init`'s accumulator plus the [BN, BD] tile ``v`` (masked lanes 0)."""
    if PER_TILE:
        acc += tl.sum(v)
    else:
        acc += v
    return acc


@triton.jit
def _sums_total(acc, PER_TILE: tl.constexpr):
    """The scalar sum of :func:`_sums_init`'s accumulator."""
    if not PER_TILE:
        acc = tl.sum(acc)
    return acc


@triton.jit
def _load_prior(prior_ptr, offs, length, uval, HAS: tl.constexpr):
    """log p0 / log q0 entries at ``offs`` (uniform ``uval`` when not given); 0 past ``length``."""
    m = offs < length
    if HAS:
        v = tl.load(prior_ptr + offs, mask=m, other=0.0).to(tl.float32)
    else:
        v = tl.where(m, uval, 0.0)
    return v


@triton.jit
def _tile_ptrs(offs_n, offs_d, stride_n, stride_d):
    return offs_n[:, None].to(tl.int64) * stride_n + offs_d[None, :] * stride_d   # [BN, BD]


@triton.jit
def _adjoint_tile(offs_n, offs_d, n_b, D, NMAJOR: tl.constexpr):
    """Offsets of a [BN, BD] tile in a set's (n_b, D) adjoint buffer (the backward's L̄, Z̄
    scratch and X̄): row-major, or (NMAJOR) column-major - x's own order when it is an NCHW
    view (W2) - so that these tiles load in x's register layout: in the other order ptxas
    moved each one through shared memory (pass 3 at W2: 7 tile exchanges, 14 barriers)."""
    if NMAJOR:
        return _tile_ptrs(offs_n, offs_d, 1, n_b)
    return _tile_ptrs(offs_n, offs_d, D, 1)


@triton.jit
def _load_x(xb, offs_n, offs_d, sxn, sxd, mask, isig):
    """A [BN, BD] tile of the set, through x's own strides, in fp32, times ``isig``: 1/σ_b of
    a folded feature scale (SCALED, :func:`..common.set_inv_scale`), else the constant 1."""
    X = tl.load(xb + _tile_ptrs(offs_n, offs_d, sxn, sxd), mask=mask, other=0.0)
    return X.to(tl.float32) * isig


@triton.jit
def _load_state(sl, sz, o, mask, offs_n, n_b, cp, ep, rp):
    """(log S, Z) of the current iteration from the deferred form the scratch holds: the
    previous S-step's Y2 and Z + ρ P, with log S = Y2 + (log η - C)_n and Z = (Z + ρ P) - ρ S
    (``cp`` = C, ``ep`` = log η, ``rp`` = ρ of the previous iteration; 0, 0, 0 at t = 0, where
    the scratch holds log S_0 and Z_0 = 0). Folding the S normalisation into the next read saves
    a full read-write pass of the state per iteration."""
    nm = offs_n < n_b
    shift = tl.load(ep + offs_n, mask=nm, other=0.0) - tl.load(cp + offs_n, mask=nm, other=0.0)
    L = tl.where(mask, tl.load(sl + o, mask=mask, other=0.0) + shift[:, None], 0.0)  # [BN, BD]
    Zt = tl.load(sz + o, mask=mask, other=0.0) - rp * _exp(L)
    return L, Zt


@triton.jit
def _iter_weights(w_ptr, T, t, QUAD: tl.constexpr, PAPER: tl.constexpr):
    """(α1, ρ, κ2, κ3) of iteration t from the (6, T) table: κ2 = κ(α2, w_P), κ3 = κ(α3, w) with
    w_P = :func:`_step_weight` and w = α1 + ρ (B-E exact) or w_P (B-Q, paper), as
    ``solvers.badmm``."""
    a1 = tl.load(w_ptr + 1 * T + t)
    a2 = tl.load(w_ptr + 2 * T + t)
    a3 = tl.load(w_ptr + 3 * T + t)
    rho = tl.load(w_ptr + 4 * T + t)
    wp = _step_weight(a1, rho, QUAD)
    if QUAD or PAPER:
        k3 = kappa(a3, wp)
    else:
        k3 = kappa(a3, a1 + rho)
    return a1, rho, kappa(a2, wp), k3


# QUAD constexpr: 0 B-E, 1 B-Q paper, 2 B-Q exact (whose steps divide by ρ + α1, below)
QUAD_EXACT = tl.constexpr(2)


def quad_flag(quadratic: bool, paper: bool) -> int:
    """The kernels' QUAD constexpr for (quadratic, paper): truthy for B-Q, QUAD_EXACT for the
    exact variant's majorised step (so that kernels without PAPER still pick its weight)."""
    return (1 if paper else QUAD_EXACT.value) if quadratic else 0


@triton.jit
def _step_weight(a1, rho, QUAD: tl.constexpr):
    """Weight w_P of the P-step (and of the B-Q S-step): ρ, or ρ + α1 for B-Q exact - the
    majorised linearisation of reference/rot.py ``_exact_badmm`` (non-expansive for every
    α1/ρ, same fixed point). The dual update keeps ρ."""
    if QUAD == QUAD_EXACT:
        wp = rho + a1
    else:
        wp = rho
    return wp


@triton.jit
def _rho_prev(rho_ptr, t):
    """ρ of iteration t - 1 (0 at t = 0: the initial state is not deferred)."""
    return tl.where(t > 0, tl.load(rho_ptr + t - 1 + (t == 0)), 0.0)


@triton.jit
def _p_step_y(X, L, Zt, a1, rho, QUAD: tl.constexpr):
    """Y = log S + G/w_P, G = X - Z [- α1 S] (w_P: :func:`_step_weight`); returns (Y, G, S)."""
    s = _exp(L)
    if QUAD:
        g = X - Zt - a1 * s
    else:
        g = X - Zt
    return L + g * (1.0 / _step_weight(a1, rho, QUAD)), g, s   # scalar reciprocal, no divides


@triton.jit
def _s_step_y(lp, p, Zt, a1, rho, QUAD: tl.constexpr):
    """S-step input Y2: B-E (Z + ρ log P)/(α1 + ρ); B-Q log P + (Z - α1 P)/w_P."""
    if QUAD:
        y2 = lp + (Zt - a1 * p) * (1.0 / _step_weight(a1, rho, QUAD))
    else:
        y2 = (Zt + rho * lp) * (1.0 / (a1 + rho))
    return y2


# --------------------------------------------------------------------------------------------
# streamed passes over one set (N_b, D); scratch matrices have row stride D
# --------------------------------------------------------------------------------------------
@triton.jit
def _init_state_pass(sl, sz, lp0_ptr, lq0_ptr, n_b, D, u_p0, u_q0,
                     HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr,
                     BN: tl.constexpr, BD: tl.constexpr):
    """log S = log p0 + log q0 (log of p0 q0ᵀ), Z = 0."""
    for n0 in range(0, n_b, BN):
        offs_n = n0 + tl.arange(0, BN)
        lq = _load_prior(lq0_ptr, offs_n, n_b, u_q0, HAS_Q0)                        # [BN]
        for d0 in range(0, D, BD):
            offs_d = d0 + tl.arange(0, BD)
            mask = (offs_n < n_b)[:, None] & (offs_d < D)[None, :]
            lp = _load_prior(lp0_ptr, offs_d, D, u_p0, HAS_P0)                      # [BD]
            o = _tile_ptrs(offs_n, offs_d, D, 1)
            tl.store(sl + o, lq[:, None] + lp[None, :], mask=mask)
            tl.store(sz + o, tl.zeros([BN, BD], dtype=tl.float32), mask=mask)


@triton.jit
def _row_lse_pass(xb, sxn, sxd, isig, sl, sz, cp, ep, rp, r_ptr, out_ptr, n_b, D, a1, rho,
                  lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b, NR, w_ptr, T, t, rev,
                  HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, KV: tl.constexpr,
                  REPLAY: tl.constexpr, QUAD: tl.constexpr, POOL: tl.constexpr,
                  BN: tl.constexpr, BD: tl.constexpr):
    """Pass A: R_d = LSE_n(Y_nd) by an online LSE over n tiles; with POOL also
    out_d = Σ_n softmax_n(Y)_nd X_nd (online-softmax weighted sum), / isig. Its column blocks
    in the direction ``rev`` (:func:`snake_start`)."""
    for i in range(0, D, BD):
        offs_d = snake_start(i, D, rev, BD) + tl.arange(0, BD)
        dm = offs_d < D
        m = tl.full([BD], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BD], dtype=tl.float32)
        acc = tl.zeros([BD], dtype=tl.float32)
        for n0 in range(0, n_b, BN):
            offs_n = n0 + tl.arange(0, BN)
            mask = (offs_n < n_b)[:, None] & dm[None, :]
            X = _load_x(xb, offs_n, offs_d, sxn, sxd, mask, isig)
            o = _tile_ptrs(offs_n, offs_d, D, 1)
            if REPLAY:                  # rebuilt from x and the vectors of iterations < t
                L, Zt = _replay_state(X, offs_n, offs_d, mask, t, lp0_b, lq0_b, n_b, D, u_p0,
                                      u_q0, hd_b, hn_b, NR, w_ptr, T, HAS_P0, HAS_Q0, QUAD,
                                      KV)
            else:                       # streamed from the scratch
                L, Zt = _load_state(sl, sz, o, mask, offs_n, n_b, cp, ep, rp)
            y, g, s = _p_step_y(X, L, Zt, a1, rho, QUAD)                             # [BN, BD]
            y = tl.where(mask, y, float("-inf"))
            m_new = tl.maximum(m, tl.max(y, axis=0))
            ms = _finite(m_new)
            alpha = _exp(m - ms)
            e = _exp(y - ms[None, :])
            l = l * alpha + tl.sum(e, axis=0)
            if POOL:
                acc = acc * alpha + tl.sum(e * X, axis=0)
            m = m_new
        l = tl.where(dm, l, 1.0)                        # columns past D: keep them finite
        store_reduced(r_ptr + offs_d, m + _log(l), dm)
        if POOL:       # σ_b · pool(x / σ_b) where a feature scale is folded in
            store_reduced(out_ptr + offs_d, acc / l / isig, dm)


@triton.jit
def _col_lse_pass(xb, sxn, sxd, isig, sl, sz, cp, ep, rp, r_ptr, lmu_ptr, c_ptr, n_b, D, a1, rho,
                  lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b, NR, w_ptr, T, t,
                  HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, KV: tl.constexpr,
                  REPLAY: tl.constexpr, QUAD: tl.constexpr, WRITE: tl.constexpr,
                  REV: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """Pass B: log P = Y + (log μ - R), P = exp(log P), the S-step input Y2 and
    C_n = LSE_d(Y2_n·). WRITE (streamed forward): log S ← Y2 and Z ← Z + ρ P in place.
    REV: row tiles and column blocks from the last, so that the pass starts on the tile pass A
    read last (:func:`snake_start`)."""
    for j0 in range(0, n_b, BN):
        n0 = j0
        if REV:
            n0 = snake_start(j0, n_b, 1, BN)
        offs_n = n0 + tl.arange(0, BN)
        nm = offs_n < n_b
        m = tl.full([BN], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BN], dtype=tl.float32)
        for i0 in range(0, D, BD):
            d0 = i0
            if REV:
                d0 = snake_start(i0, D, 1, BD)
            offs_d = d0 + tl.arange(0, BD)
            dm = offs_d < D
            mask = nm[:, None] & dm[None, :]
            X = _load_x(xb, offs_n, offs_d, sxn, sxd, mask, isig)
            o = _tile_ptrs(offs_n, offs_d, D, 1)
            if REPLAY:                  # rebuilt from x and the vectors of iterations < t
                L, Zt = _replay_state(X, offs_n, offs_d, mask, t, lp0_b, lq0_b, n_b, D, u_p0,
                                      u_q0, hd_b, hn_b, NR, w_ptr, T, HAS_P0, HAS_Q0, QUAD,
                                      KV)
            else:                       # streamed from the scratch
                L, Zt = _load_state(sl, sz, o, mask, offs_n, n_b, cp, ep, rp)
            r = tl.load(r_ptr + offs_d, mask=dm, other=0.0)
            lmu = tl.load(lmu_ptr + offs_d, mask=dm, other=0.0)
            y, g, s = _p_step_y(X, L, Zt, a1, rho, QUAD)
            lp = y + (lmu - r)[None, :]                                              # log P
            p = _exp(lp)
            y2 = _s_step_y(lp, p, Zt, a1, rho, QUAD)
            m, l = _row_lse_add(m, l, tl.where(mask, y2, float("-inf")))
            if WRITE and not REPLAY:
                tl.store(sl + o, y2, mask=mask)
                tl.store(sz + o, Zt + rho * p, mask=mask)
        store_reduced(c_ptr + offs_n, m + _log(tl.where(nm, l, 1.0)), nm)


# |R|, |κ2 log p0 + (1 - κ2) R| and |Λ| up to which the one-pass iteration's C (formed
# before Λ is known) is used: it matches the replay's Y2 to a few ulp of them (≤ ~5e-5 at
# 256); beyond, pass B re-forms C from the final log μ, bit-consistent with the replay
FUSED_MAGNITUDE = tl.constexpr(256.0)


@triton.jit
def _one_pass_iteration(xb, sxn, sxd, isig, vd, c_ptr, n_b, D, a1, rho, k2, lp0_b, lq0_b, u_p0,
                        u_q0, hd_b, hn_b, NR, w_ptr, T, t, rev, HAS_P0: tl.constexpr,
                        HAS_Q0: tl.constexpr, QUAD: tl.constexpr, PAPER: tl.constexpr,
                        KV: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """Passes A and B of iteration t in one sweep over x, for a set whose rows fit one tile
    (n_b <= BN; the replay forward, ``ONE_PASS``): R_d = LSE_n(Y) is then complete within each
    column block, so the block goes on to log P, the S-step input Y2 and the row LSE C at
    once. Paper: log μ is the vector state, known before the sweep: everything is formed as
    passes A and B form it. Exact (B-E only: its Y2 = (Z + ρ log P)/(α1 + ρ) does not involve
    P): log μ = m - Λ with m = κ2 log p0 + (1 - κ2) R and Λ = LSE_d(m), which needs every
    column, so the sweep uses m - R as the shift and returns Λ: its Y2 is Y2 + ρΛ/(α1 + ρ),
    a constant, and so its C (the caller subtracts it). Writes R (vd), m (exact) into the
    log μ slot (vd + D) and that C into ``c_ptr``. Returns (Λ, the largest of |R|, |m|),
    0 and 0 for the paper variant. Its column blocks in the direction ``rev``
    (:func:`snake_start`)."""
    offs_n = tl.arange(0, BN)
    nm = offs_n < n_b
    m_c = tl.full([BN], float("-inf"), dtype=tl.float32)          # the rows' online LSE of Y2
    l_c = tl.zeros([BN], dtype=tl.float32)
    m_l = tl.full([BD], float("-inf"), dtype=tl.float32)          # Λ's, lane-wise (exact)
    l_l = tl.zeros([BD], dtype=tl.float32)
    mag = tl.zeros([BD], dtype=tl.float32)
    for i in range(0, D, BD):
        offs_d = snake_start(i, D, rev, BD) + tl.arange(0, BD)
        dm = offs_d < D
        mask = nm[:, None] & dm[None, :]
        X = _load_x(xb, offs_n, offs_d, sxn, sxd, mask, isig)                        # [BN, BD]
        L, Zt = _replay_state(X, offs_n, offs_d, mask, t, lp0_b, lq0_b, n_b, D, u_p0, u_q0,
                              hd_b, hn_b, NR, w_ptr, T, HAS_P0, HAS_Q0, QUAD, KV)
        y, g, s = _p_step_y(X, L, Zt, a1, rho, QUAD)
        ym = tl.where(mask, y, float("-inf"))
        mx = tl.max(ym, axis=0)                                                          # [BD]
        ms = _finite(mx)
        r = tl.where(dm, mx + _log(tl.where(dm, tl.sum(_exp(ym - ms[None, :]), axis=0), 1.0)),
                     0.0)
        store_reduced(vd + offs_d, r, dm)
        if PAPER:
            shift = tl.load(vd + D + offs_d, mask=dm, other=0.0) - r        # log μ - R
        else:
            u = k2 * _load_prior(lp0_b, offs_d, D, u_p0, HAS_P0) + (1 - k2) * r
            store_reduced(vd + D + offs_d, u, dm)
            m_l, l_l = _lse_add(m_l, l_l, tl.where(dm, u, float("-inf")))
            mag = tl.maximum(mag, tl.where(dm, tl.maximum(tl.abs(r), tl.abs(u)), 0.0))
            shift = u - r
        lp = y + shift[None, :]                                       # log P (exact: + Λ)
        p = _exp(lp)                                                  # (B-Q paper only)
        y2 = _s_step_y(lp, p, Zt, a1, rho, QUAD)
        m_c, l_c = _row_lse_add(m_c, l_c, tl.where(mask, y2, float("-inf")))
    tl.store(c_ptr + offs_n, m_c + _log(tl.where(nm, l_c, 1.0)), mask=nm)
    if PAPER:
        lam = 0.0
        big = 0.0
    else:
        lam = _lse_total(m_l, l_l)
        big = tl.max(mag, axis=0)
    return lam, big


@triton.jit
def _plan_pass(xb, sxn, sxd, isig, sl, sz, cp, ep, rp, r_ptr, lmu_ptr, plan_b, n_b, D, a1, rho,
               lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b, NR, w_ptr, T, t,
               HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, KV: tl.constexpr, REPLAY: tl.constexpr,
                  QUAD: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """P = exp(Y + log μ - R) of the last iteration, written in the plan's (rows, D) layout."""
    for n0 in range(0, n_b, BN):
        offs_n = n0 + tl.arange(0, BN)
        for d0 in range(0, D, BD):
            offs_d = d0 + tl.arange(0, BD)
            dm = offs_d < D
            mask = (offs_n < n_b)[:, None] & dm[None, :]
            X = _load_x(xb, offs_n, offs_d, sxn, sxd, mask, isig)
            o = _tile_ptrs(offs_n, offs_d, D, 1)
            if REPLAY:                  # rebuilt from x and the vectors of iterations < t
                L, Zt = _replay_state(X, offs_n, offs_d, mask, t, lp0_b, lq0_b, n_b, D, u_p0,
                                      u_q0, hd_b, hn_b, NR, w_ptr, T, HAS_P0, HAS_Q0, QUAD,
                                      KV)
            else:                       # streamed from the scratch
                L, Zt = _load_state(sl, sz, o, mask, offs_n, n_b, cp, ep, rp)
            r = tl.load(r_ptr + offs_d, mask=dm, other=0.0)
            lmu = tl.load(lmu_ptr + offs_d, mask=dm, other=0.0)
            y, g, s = _p_step_y(X, L, Zt, a1, rho, QUAD)
            p = _exp(y + (lmu - r)[None, :])
            tl.store(plan_b + o, p.to(plan_b.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# vector steps (length D or N_b), BV-wide chunks
# --------------------------------------------------------------------------------------------
@triton.jit
def _lse_add(mv, lv, u):
    """One step of a lane-wise online LSE: (max, scaled sum) after adding the values u."""
    m_new = tl.maximum(mv, u)
    ms = _finite(m_new)
    return m_new, lv * _exp(mv - ms) + _exp(u - ms)


@triton.jit
def _lse_total(mv, lv):
    """LSE of everything the lanes of an online LSE (:func:`_lse_add`) have seen."""
    mx = tl.max(mv, axis=0)
    return mx + _log(tl.sum(lv * _exp(mv - _finite(mx)), axis=0))


@triton.jit
def _row_lse_add(m, l, v):
    """One column block of the rows' online LSE: (max, scaled sum) [BN] after the [BN, BD]
    values v (-inf where masked)."""
    m_new = tl.maximum(m, tl.max(v, axis=1))
    ms = _finite(m_new)
    return m_new, l * _exp(m - ms) + tl.sum(_exp(v - ms[:, None]), axis=1)


@triton.jit
def _vec_lognorm_mix(prior_ptr, HAS: tl.constexpr, uval, src_ptr, dst_ptr, k, length,
                     BV: tl.constexpr):
    """dst = lognorm(κ log prior + (1 - κ) src) (exact variant's log μ from R, log η from C)."""
    mv = tl.full([BV], float("-inf"), dtype=tl.float32)
    lv = tl.zeros([BV], dtype=tl.float32)
    for i0 in range(0, length, BV):
        offs = i0 + tl.arange(0, BV)
        msk = offs < length
        u = k * _load_prior(prior_ptr, offs, length, uval, HAS) \
            + (1 - k) * tl.load(src_ptr + offs, mask=msk, other=0.0)
        mv, lv = _lse_add(mv, lv, tl.where(msk, u, float("-inf")))
    lse = _lse_total(mv, lv)
    for i0 in range(0, length, BV):
        offs = i0 + tl.arange(0, BV)
        msk = offs < length
        u = k * _load_prior(prior_ptr, offs, length, uval, HAS) \
            + (1 - k) * tl.load(src_ptr + offs, mask=msk, other=0.0)
        tl.store(dst_ptr + offs, u - lse, mask=msk)


@triton.jit
def _vec_paper_update(prior_ptr, HAS: tl.constexpr, uval, lmu_ptr, z1_ptr, k, rho, length,
                      BV: tl.constexpr):
    """Eqs. (26)-(28) for one side: log μ' = lognorm((1-κ)(log μ - z1/ρ) + κ log p0),
    z1' = z1 + ρ(μ' - μ)   (μ = P·1 after the P-step)."""
    mv = tl.full([BV], float("-inf"), dtype=tl.float32)
    lv = tl.zeros([BV], dtype=tl.float32)
    for i0 in range(0, length, BV):
        offs = i0 + tl.arange(0, BV)
        msk = offs < length
        u = (1 - k) * (tl.load(lmu_ptr + offs, mask=msk, other=0.0)
                       - tl.load(z1_ptr + offs, mask=msk, other=0.0) / rho) \
            + k * _load_prior(prior_ptr, offs, length, uval, HAS)
        mv, lv = _lse_add(mv, lv, tl.where(msk, u, float("-inf")))
    lse = _lse_total(mv, lv)
    for i0 in range(0, length, BV):
        offs = i0 + tl.arange(0, BV)
        msk = offs < length
        lmu = tl.load(lmu_ptr + offs, mask=msk, other=0.0)
        z1 = tl.load(z1_ptr + offs, mask=msk, other=0.0)
        u = (1 - k) * (lmu - z1 / rho) + k * _load_prior(prior_ptr, offs, length, uval, HAS)
        lmu_new = u - lse
        tl.store(lmu_ptr + offs, lmu_new, mask=msk)
        tl.store(z1_ptr + offs, z1 + rho * (_exp(lmu_new) - _exp(lmu)), mask=msk)


@triton.jit
def _vec_copy_prior(prior_ptr, HAS: tl.constexpr, uval, dst_ptr, length, BV: tl.constexpr):
    for i0 in range(0, length, BV):
        offs = i0 + tl.arange(0, BV)
        tl.store(dst_ptr + offs, _load_prior(prior_ptr, offs, length, uval, HAS),
                 mask=offs < length)


@triton.jit
def _vec_copy(src_ptr, dst_ptr, length, BV: tl.constexpr):
    for i0 in range(0, length, BV):
        offs = i0 + tl.arange(0, BV)
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < length, other=0.0),
                 mask=offs < length)


@triton.jit
def _hist_put(src_ptr, h_t, s, length, KV: tl.constexpr, BV: tl.constexpr):
    """Slot ``s`` of entries [0, length) of a history block ``h_t`` (entry i's slots at
    h_t + i·KV + s) from the contiguous vector ``src_ptr``."""
    for i0 in range(0, length, BV):
        offs = i0 + tl.arange(0, BV)
        msk = offs < length
        tl.store(h_t + offs * KV + s, tl.load(src_ptr + offs, mask=msk, other=0.0), mask=msk)


@triton.jit
def _hist_get(h_t, s, dst_ptr, length, KV: tl.constexpr, BV: tl.constexpr):
    """The inverse of :func:`_hist_put`: slot ``s`` of entries [0, length) into ``dst_ptr``."""
    for i0 in range(0, length, BV):
        offs = i0 + tl.arange(0, BV)
        msk = offs < length
        tl.store(dst_ptr + offs, tl.load(h_t + offs * KV + s, mask=msk, other=0.0), mask=msk)


@triton.jit
def _pair_lo(v):
    """The first fp32 of a little-endian pair loaded as one int64."""
    return v.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _pair_hi(v):
    """The second fp32 of a little-endian pair loaded as one int64."""
    return (v >> 32).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _pair_ptr(h_t, offs, KV: tl.constexpr):
    """int64 pointers to the (slot 0, slot 1) pairs of the entries ``offs`` of a history block
    (8-byte aligned: KV is even and every block starts on 128 bytes)."""
    return h_t.to(tl.pointer_type(tl.int64)) + offs * (KV // 2)


@triton.jit
def _hist_shift(h_t, offs, mask, KV: tl.constexpr):
    """Slot 1 - slot 0 of the entries ``offs`` of a history block (log μ - R, log η - C), 0
    where ``mask`` is False: the two are adjacent, so one 64-bit load per entry, and the
    subtraction is the fp32 one the forward's vector step did (the same bits)."""
    v = tl.load(_pair_ptr(h_t, offs, KV), mask=mask, other=0)
    return _pair_hi(v) - _pair_lo(v)


@triton.jit
def _vec_dot(a_ptr, b_ptr, length, BV: tl.constexpr):
    """Σ_i a_i b_i over ``length`` entries."""
    acc = tl.zeros([BV], dtype=tl.float32)
    for i0 in range(0, length, BV):
        offs = i0 + tl.arange(0, BV)
        msk = offs < length
        acc += tl.load(a_ptr + offs, mask=msk, other=0.0) * tl.load(b_ptr + offs, mask=msk,
                                                                     other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _vec_add(dst_ptr, value, length, BV: tl.constexpr):
    """dst += value (a scalar), in place."""
    for i0 in range(0, length, BV):
        offs = i0 + tl.arange(0, BV)
        msk = offs < length
        tl.store(dst_ptr + offs, tl.load(dst_ptr + offs, mask=msk, other=0.0) + value, mask=msk)


@triton.jit
def _vec_fill(dst_ptr, value, length, BV: tl.constexpr):
    for i0 in range(0, length, BV):
        offs = i0 + tl.arange(0, BV)
        tl.store(dst_ptr + offs, tl.zeros([BV], dtype=tl.float32) + value, mask=offs < length)


# --------------------------------------------------------------------------------------------
# vector history: what the forward keeps for the backward (O(T · (N + D)) per set)
# --------------------------------------------------------------------------------------------
# hd (B, T, D, KV): R, log μ [, z1, unused]; hn (T, rows, KV): C, log η [, z2, unused] (KV = 2,
# paper 4), the values iteration t used (paper: before its vector update), an entry's slots
# adjacent: the replay's shifts log μ - R and log η - C come from one 64-bit load per entry
# (:func:`_hist_shift`) instead of a third stored slot (2026-11-30: 1/3 less history; W2
# T = 16 fwd+bwd peak 3.20 -> 2.87× the input). Given them, every entry of (log S_t, Z_t)
# follows from x_nd, the priors and the weights alone (:func:`_replay_state`).
@triton.jit
def _record(vd, vn, ns, hd_t, hn_t, n_b, D, NR, rows, PAPER: tl.constexpr, KV: tl.constexpr,
            BV: tl.constexpr):
    """Copy this iteration's vectors from the working slots into the history (``rows``: also
    the N-vectors; the last iteration has no S-step)."""
    _hist_put(vd, hd_t, 0, D, KV, BV)
    _hist_put(vd + D, hd_t, 1, D, KV, BV)
    if PAPER:
        _hist_put(vd + 2 * D, hd_t, 2, D, KV, BV)
    if rows:
        _hist_put(vn, hn_t, 0, n_b, KV, BV)
        _hist_put(vn + ns, hn_t, 1, n_b, KV, BV)
        if PAPER:
            _hist_put(vn + 2 * ns, hn_t, 2, n_b, KV, BV)


@triton.jit
def _restore(vd, vn, ns, hd_t, hn_t, n_b, D, NR, rows, PAPER: tl.constexpr, KV: tl.constexpr,
             BV: tl.constexpr):
    """The inverse of :func:`_record`: iteration t's vectors back into the working slots."""
    _hist_get(hd_t, 0, vd, D, KV, BV)
    _hist_get(hd_t, 1, vd + D, D, KV, BV)
    if PAPER:
        _hist_get(hd_t, 2, vd + 2 * D, D, KV, BV)
    if rows:
        _hist_get(hn_t, 0, vn, n_b, KV, BV)
        _hist_get(hn_t, 1, vn + ns, n_b, KV, BV)
        if PAPER:
            _hist_get(hn_t, 2, vn + 2 * ns, n_b, KV, BV)


@triton.jit
def _replay_state(X, offs_n, offs_d, mask, t, lp0_b, lq0_b, n_b, D, u_p0, u_q0, hd_b, hn_b, NR,
                  w_ptr, T, HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, QUAD: tl.constexpr,
                  KV: tl.constexpr):
    """(log S_t, Z_t) of a [BN, BD] tile rebuilt from x and the vector history: for α0 = 0
    each entry evolves on its own once the row shifts (log η - C)_s and column shifts
    (log μ - R)_s are known,
        log P = log S + (X - Z [- α1 S]) / w_P + (log μ - R)_d,  P = exp(log P),
        log S' = Y2(log P, P, Z) + (log η - C)_n,  Z' = Z + ρ (P - S'),
    two exp2 per element and replayed iteration, no HBM traffic beyond x and the vectors
    (:func:`_replay_start`, then :func:`_replay_iterations` over k < t)."""
    L, Zt = _replay_start(offs_n, offs_d, mask, lp0_b, lq0_b, n_b, D, u_p0, u_q0, HAS_P0,
                          HAS_Q0)
    L, Zt = _replay_iterations(X, L, Zt, offs_n, offs_d, 0, t, n_b, D, hd_b, hn_b, NR, w_ptr,
                               T, QUAD, KV)
    return tl.where(mask, L, 0.0), Zt


@triton.jit
def _replay_start(offs_n, offs_d, mask, lp0_b, lq0_b, n_b, D, u_p0, u_q0,
                  HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr):
    """The replay's state before iteration 0 in its raw form: log S_0 = log p0 + log q0 on the
    set and -inf outside it (which every replayed iteration keeps: P = S = 0, Z = 0), Z_0 = 0."""
    lq = _load_prior(lq0_b, offs_n, n_b, u_q0, HAS_Q0)
    lp = _load_prior(lp0_b, offs_d, D, u_p0, HAS_P0)
    L = tl.where(mask, lq[:, None] + lp[None, :], float("-inf"))                     # [BN, BD]
    return L, tl.zeros_like(L)


@triton.jit
def _replay_iterations(X, L, Zt, offs_n, offs_d, k0, k1, n_b, D, hd_b, hn_b, NR, w_ptr, T,
                       QUAD: tl.constexpr, KV: tl.constexpr):
    """Iterations k0 <= k < k1 of the replay on a raw state (log S = -inf outside the set; the
    caller applies ``tl.where(mask, L, 0.0)`` once at the end).

    The hot loop of the forward and the backward (issue 17), so an element costs FMAs and two
    MUFU.EX2: an iteration's weights and their reciprocals come from its record in the
    launcher's table (:data:`RECORDS`, formed once per call by :func:`badmm_coef_kernel`: one
    pointer, no division here), and lanes outside the set stay at log S = -inf (P = S = 0,
    Z = 0): no select per iteration.
    Y = log S + G/w_P is formed exactly as the passes form it (:func:`_p_step_y`, the same
    reciprocal), so that log P = Y + (log μ - R) cancels to the last bit like theirs: at
    |x| ~ 1e30 any other rounding of Y leaves log P ~ ±1e23 (issue 17's NaN). Splitting a
    replay into two calls gives the same bits as one (S = exp(log S) is recomputed the same way)."""
    if QUAD:
        S = _exp(L)
    # lanes past the set read the shifts of its last row / column instead of a masked load
    # (no predicate or zero fill per load in the hot loop): finite values, and those lanes
    # stay at log S = -inf, P = S = Z = 0 whatever shift they add (row 0 of an empty set
    # is in the history's bounds: k < t <= T - 1 leaves a later slot after it)
    # (R, log μ)_d and (C, log η)_n pairs of iteration 0 as int64 [BD], [BN] pointers
    hd_col = _pair_ptr(hd_b, tl.minimum(offs_d, D - 1), KV)                           # [BD]
    hn_row = _pair_ptr(hn_b, tl.maximum(tl.minimum(offs_n, n_b - 1), 0), KV)          # [BN]
    rec = w_ptr + RECORDS * T
    for k in range(k0, k1):
        rho = tl.load(rec + k * RECORD + REC_RHO)
        inv_wp = tl.load(rec + k * RECORD + REC_INV_WP)
        # the shifts (log μ - R)_k and (log η - C)_k, one 64-bit load per entry
        cv = tl.load(hd_col + k * (KV // 2) * D)                                      # [BD]
        rv = tl.load(hn_row + k * (KV // 2) * NR)                                     # [BN]
        col = _pair_hi(cv) - _pair_lo(cv)
        row = _pair_hi(rv) - _pair_lo(rv)
        if QUAD:
            a1 = tl.load(rec + k * RECORD + REC_A1)
            g = X - Zt - a1 * S
        else:
            g = X - Zt
        lpk = (L + g * inv_wp) + col[None, :]                                          # log P
        pk = _exp(lpk)
        if QUAD:       # Y2 = log P + (Z - α1 P)/w_P
            y2 = lpk + (Zt - a1 * pk) * inv_wp
        else:          # Y2 = (Z + ρ log P)/(α1 + ρ)
            y2 = (Zt + rho * lpk) * tl.load(rec + k * RECORD + REC_INV_W)
        L = y2 + row[:, None]
        S = _exp(L)
        Zt = Zt + rho * (pk - S)
    return L, Zt


# The kernels' weight table, WEIGHT_ROWS × T fp32 (:func:`badmm_coef_kernel`, once per call):
# the (6, T) table w (rows as ``params.py``), then at RECORDS · T one record of RECORD fp32 per
# iteration for the replay's hot loops - α1, ρ and the reciprocals 1 / w_P, 1 / (α1 + ρ) - so
# that they load an iteration's scalars through one pointer at constant offsets (with rows of
# a (·, T) table each load needed a 64-bit pointer of its own: 55 -> 45 SASS instructions a
# trip of W2's backward replay) and divide nothing.
RECORDS = tl.constexpr(6)
RECORD = tl.constexpr(4)
REC_A1 = tl.constexpr(0)
REC_RHO = tl.constexpr(1)
REC_INV_WP = tl.constexpr(2)     # 1 / w_P
REC_INV_W = tl.constexpr(3)      # 1 / (α1 + ρ)
WEIGHT_ROWS = RECORDS.value + RECORD.value     # (T records of RECORD fp32: RECORD rows of T)


@triton.jit
def _state_and_rebuilt_zbar(X, offs_n, offs_d, mask, o, tb, lp0_b, lq0_b, n_b, D, u_p0, u_q0,
                            hd_b, hn_b, NR, w_ptr, T, zr_b, zc_b, gy, out, gplan_b,
                            HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, KV: tl.constexpr,
                            QUAD: tl.constexpr, PLAN: tl.constexpr):
    """(log S_tb (0 off the set), Z_tb, Z̄') of a [BN, BD] tile: :func:`_replay_state`, then
    :func:`_rebuilt_zbar` from its raw state (P̄ read at ``gplan_b`` + ``o`` with PLAN)."""
    L, Zt = _replay_start(offs_n, offs_d, mask, lp0_b, lq0_b, n_b, D, u_p0, u_q0, HAS_P0,
                          HAS_Q0)
    L, Zt = _replay_iterations(X, L, Zt, offs_n, offs_d, 0, tb, n_b, D, hd_b, hn_b, NR, w_ptr,
                               T, QUAD, KV)
    if PLAN:
        gp = tl.load(gplan_b + o, mask=mask, other=0.0)
    else:
        gp = X
    Zb = _rebuilt_zbar(X, L, Zt, offs_n, offs_d, tb, n_b, D, hd_b, hn_b, NR, w_ptr, T, zr_b, zc_b,
                       gy, out, gp, KV, QUAD, PLAN)
    return tl.where(mask, L, 0.0), Zt, Zb


@triton.jit
def _rebuilt_zbar(X, L, Zt, offs_n, offs_d, tb, n_b, D, hd_b, hn_b, NR, w_ptr, T, zr_b, zc_b, gy,
                  out, gplan, KV: tl.constexpr, QUAD: tl.constexpr, PLAN: tl.constexpr):
    """Z̄' of reverse step tb < T - 1 (the adjoint of Z_{tb+1}) for a [BN, BD] tile, from the
    raw state (L, Zt) of iteration tb, instead of read from a (rows, D) scratch (``ZREBUILD``,
    :func:`.launch.backward_rebuilds_zbar`). Reverse step k maps the adjoints a = (L̄, Z̄)
    affinely, a_k = M_k a_{k+1} + b_k, M_k from iteration k's state and b_k linear in
    c1 = R̄_k e_k and c2 = C̄_k e2_k (e = softmax_n(Y), e2 = softmax_d(Y2); R̄_k, C̄_k from the
    histories ``zr_b`` (T, D) and ``zc_b`` (T, rows: stride NR), which the columns and rows
    steps of reverse step k filled); the first reverse step leaves a_{T-1} = (h Ȳ, -Ȳ/w_P),
    Ȳ = e (R̄ + (X - y) ȳ) [+ P̄ P]. So Z̄_{tb+1} = Σ_{k>tb} π_k b_k with the row vector
    π_{tb+1} = (0, 1), π_{k+1} = π_k M_k: a forward sum over the replay continued to iteration
    T - 1. With q = α1 P / w_P, h = 1 - α1 S / w_P (S entering k, s' leaving it):
        B-Q:  M = [[h (1 - q), h ρ (P - (1 - q) s')], [q / w_P, 1 - ρ (q s' + P) / w_P]],
              b = (h ((1 - q) c2 + c1), (q c2 - c1) / w_P)
        B-E:  (no α1 S in Y) Z̄_k = (1 - P_k) Z̄_{k+1} - c1 / ρ_k: π stays (0, ·), no C̄
    (B-E: one more exp2 per element-iteration, for e; B-Q two, e and e2). ``gy``, ``out``
    [BD]: ȳ and y as the last iteration's pass 3 scales them; ``gplan`` P̄'s tile (PLAN)."""
    L, Zt = _replay_iterations(X, L, Zt, offs_n, offs_d, tb, tb + 1, n_b, D, hd_b, hn_b, NR,
                               w_ptr, T, QUAD, KV)
    d_in = tl.minimum(offs_d, D - 1)        # lanes past the set: e = P = 0, any finite R̄, C̄
    n_in = tl.maximum(tl.minimum(offs_n, n_b - 1), 0)
    hd_col = _pair_ptr(hd_b, d_in, KV)                                                # [BD]
    hn_row = _pair_ptr(hn_b, n_in, KV)                                                # [BN]
    acc = tl.zeros_like(X)
    coef = acc + 1.0                                               # π's Z̄ entry
    if QUAD:
        coef_l = tl.zeros_like(X)                                  # π's L̄ entry
        S = _exp(L)
    rec = w_ptr + RECORDS * T
    for k in range(tb + 1, T - 1):
        rho = tl.load(rec + k * RECORD + REC_RHO)
        inv_w = tl.load(rec + k * RECORD + REC_INV_WP)
        cv = tl.load(hd_col + k * (KV // 2) * D)                                      # [BD]
        rv = tl.load(hn_row + k * (KV // 2) * NR)                                     # [BN]
        r = _pair_lo(cv)
        rb = tl.load(zr_b + k * D + d_in)                                             # [BD]
        row = _pair_hi(rv) - _pair_lo(rv)
        if QUAD:
            a1 = tl.load(rec + k * RECORD + REC_A1)
            y = L + (X - Zt - a1 * S) * inv_w        # as the replay and the passes form Y
            lpk = y + (_pair_hi(cv) - r)[None, :]
            pk = _exp(lpk)
            y2 = lpk + (Zt - a1 * pk) * inv_w
            L = y2 + row[:, None]
            s_new = _exp(L)
            c1 = _exp(y - r[None, :]) * rb[None, :]
            cb = tl.load(zc_b + k * NR + n_in)                                        # [BN]
            c2 = _exp(y2 - _pair_lo(rv)[:, None]) * cb[:, None]
            q = a1 * pk * inv_w
            h = 1.0 - a1 * S * inv_w
            acc += coef_l * (h * ((1.0 - q) * c2 + c1)) + coef * ((q * c2 - c1) * inv_w)
            m_lz = h * rho * (pk - (1.0 - q) * s_new)
            m_zz = 1.0 - rho * (q * s_new + pk) * inv_w
            coef_l, coef = (coef_l * (h * (1.0 - q)) + coef * (q * inv_w),
                            coef_l * m_lz + coef * m_zz)
            Zt = Zt + rho * (pk - s_new)
            S = s_new
        else:
            y = L + (X - Zt) * inv_w                 # as the replay and the passes form Y
            lpk = y + (_pair_hi(cv) - r)[None, :]
            pk = _exp(lpk)
            acc -= coef * _exp(y - r[None, :]) * (rb * inv_w)[None, :]
            coef -= coef * pk
            inv_wd = tl.load(rec + k * RECORD + REC_INV_W)
            L = (Zt + rho * lpk) * inv_wd + row[:, None]                 # as the replay forms it
            Zt = Zt + rho * (pk - _exp(L))
    inv_w = tl.load(rec + (T - 1) * RECORD + REC_INV_WP)
    cv = tl.load(hd_col + (T - 1) * (KV // 2) * D)
    r = _pair_lo(cv)
    if QUAD:
        a1 = tl.load(rec + (T - 1) * RECORD + REC_A1)
        y = L + (X - Zt - a1 * S) * inv_w
    else:
        y = L + (X - Zt) * inv_w
    yb = _exp(y - r[None, :]) * (tl.load(zr_b + (T - 1) * D + d_in)[None, :]
                                 + (X - out[None, :]) * gy[None, :])
    if PLAN:
        yb += gplan * _exp(y + (_pair_hi(cv) - r)[None, :])
    if QUAD:
        return acc + (coef_l * (1.0 - a1 * S * inv_w) - coef * inv_w) * yb
    else:
        return acc - coef * yb * inv_w


@triton.jit
def badmm_coef_kernel(w_ptr, wc_ptr, T, QUAD: tl.constexpr, BT: tl.constexpr):
    """wc (WEIGHT_ROWS · T): the (6, T) table w, then the per-iteration records (:data:`RECORDS`),
    their reciprocals divided as the passes divide (:func:`_p_step_y`, :func:`_s_step_y`: the
    same value to the last bit)."""
    offs = tl.program_id(0) * BT + tl.arange(0, BT)                                      # [BT]
    m = offs < T
    for r in tl.static_range(6):
        tl.store(wc_ptr + r * T + offs, tl.load(w_ptr + r * T + offs, mask=m, other=0.0),
                 mask=m)
    a1 = tl.load(w_ptr + 1 * T + offs, mask=m, other=1.0)
    rho = tl.load(w_ptr + 4 * T + offs, mask=m, other=1.0)
    rec = wc_ptr + RECORDS * T + offs * RECORD                                         # [BT]
    tl.store(rec + REC_A1, a1, mask=m)
    tl.store(rec + REC_RHO, rho, mask=m)
    tl.store(rec + REC_INV_WP, 1.0 / _step_weight(a1, rho, QUAD), mask=m)
    tl.store(rec + REC_INV_W, 1.0 / (a1 + rho), mask=m)


# --------------------------------------------------------------------------------------------
# one forward iteration and the forward kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _forward_iteration(xb, sxn, sxd, isig, sl, sz, vd, vn, ns, lp0_b, lq0_b, n_b, D, u_p0, u_q0,
                       a1, rho, k2, k3, rp, hd_b, hn_b, NR, w_ptr, T, t, rev,
                       HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, QUAD: tl.constexpr,
                       PAPER: tl.constexpr, REPLAY: tl.constexpr, KV: tl.constexpr,
                       ONE_PASS: tl.constexpr, SNAKE: tl.constexpr, BN: tl.constexpr,
                       BD: tl.constexpr, BV: tl.constexpr):
    """One full B-ADMM iteration (P-step, S-step, dual[, paper vector updates]) in place; the
    state stays in the deferred form of :func:`_load_state` (``rp``: ρ of the previous
    iteration). ONE_PASS (replay, the set's rows in one tile, B-E or paper): passes A and B
    in one sweep (:func:`_one_pass_iteration`); the exact variant then shifts its log μ and C
    by Λ, or, where |R|, |m| or |Λ| exceed :data:`FUSED_MAGNITUDE`, re-forms C by pass B.
    ``rev``: the one-pass sweep's direction; SNAKE (two passes): pass B goes against pass A,
    so each of the two starts on the tiles the other read last."""
    r_ptr = vd
    lmu_ptr = vd + D
    c_ptr = vn
    leta_ptr = vn + ns
    cp = vn + 7 * ns
    ep = vn + 8 * ns
    if ONE_PASS:
        lam, big = _one_pass_iteration(xb, sxn, sxd, isig, vd, c_ptr, n_b, D, a1, rho, k2,
                                       lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b, NR, w_ptr, T, t,
                                       rev, HAS_P0, HAS_Q0, QUAD, PAPER, KV, BN, BD)
        tl.debug_barrier()
        if not PAPER:
            _vec_add(lmu_ptr, -lam, D, BV)                         # log μ = m - Λ
            tl.debug_barrier()
            if tl.maximum(big, tl.abs(lam)) <= FUSED_MAGNITUDE:
                _vec_add(c_ptr, -rho * lam * (1.0 / (a1 + rho)), n_b, BV)
            else:
                _col_lse_pass(xb, sxn, sxd, isig, sl, sz, cp, ep, rp, r_ptr, lmu_ptr, c_ptr,
                              n_b, D, a1, rho, lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b, NR, w_ptr,
                              T, t, HAS_P0, HAS_Q0, KV, REPLAY, QUAD, False, False, BN, BD)
            tl.debug_barrier()
    else:
        _row_lse_pass(xb, sxn, sxd, isig, sl, sz, cp, ep, rp, r_ptr, r_ptr, n_b, D, a1, rho,
                      lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b, NR, w_ptr, T, t, 0,
                      HAS_P0, HAS_Q0, KV, REPLAY, QUAD, False, BN, BD)
        tl.debug_barrier()
        if not PAPER:
            _vec_lognorm_mix(lp0_b, HAS_P0, u_p0, r_ptr, lmu_ptr, k2, D, BV)
            tl.debug_barrier()
        _col_lse_pass(xb, sxn, sxd, isig, sl, sz, cp, ep, rp, r_ptr, lmu_ptr, c_ptr, n_b, D, a1,
                      rho, lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b, NR, w_ptr, T, t,
                      HAS_P0, HAS_Q0, KV, REPLAY, QUAD, True, SNAKE, BN, BD)
        tl.debug_barrier()
    if not PAPER:
        _vec_lognorm_mix(lq0_b, HAS_Q0, u_q0, c_ptr, leta_ptr, k3, n_b, BV)
        tl.debug_barrier()
    # the S normalisation is deferred to the next read: keep this iteration's C and log η
    _vec_copy(c_ptr, cp, n_b, BV)
    _vec_copy(leta_ptr, ep, n_b, BV)
    # the vectors of this iteration, for the backward's replay (before the paper updates)
    _record(vd, vn, ns, hd_b + t * KV * D, hn_b + t * KV * NR, n_b, D, NR, True, PAPER, KV,
            BV)
    tl.debug_barrier()
    if PAPER:
        _vec_paper_update(lp0_b, HAS_P0, u_p0, lmu_ptr, vd + 2 * D, k2, rho, D, BV)
        _vec_paper_update(lq0_b, HAS_Q0, u_q0, leta_ptr, vn + 2 * ns, k3, rho, n_b, BV)
        tl.debug_barrier()


@triton.jit
def _set_of(order_ptr, j, RAGGED: tl.constexpr):
    """The j-th set a persistent program takes: ragged sets largest first (``order``, set ids
    by descending N_b, so the round-robin over programs balances like LPT scheduling), dense
    sets in order (j is a tensor, also in the interpreter)."""
    if RAGGED:
        b = tl.load(order_ptr + j)
    else:
        b = j
    return b


@triton.jit
def _set_bounds(b, ptr_ptr, N, sxb, sxn, RAGGED: tl.constexpr):
    """(first row in the (rows, ·) layouts, N_b, offset of the set in x)."""
    if RAGGED:
        rs = tl.load(ptr_ptr + b)
        n_b = (tl.load(ptr_ptr + b + 1) - rs).to(tl.int32)
        xoff = rs * sxn
    else:
        rs = b.to(tl.int64) * N
        n_b = (b * 0 + N).to(tl.int32)  # a tensor even when N is specialized to a constant
        xoff = b.to(tl.int64) * sxb
    return rs, n_b, xoff


@triton.jit
def _scratch_bases(pid, rs, N, D, NR, RAGGED: tl.constexpr):
    """Offsets of this set's scratch: a dense batch uses a per-program [N, D] matrix and 7
    N-vectors (O(programs · N · D)); a ragged batch the set's own rows of a (rows, D) matrix and
    of 9 (rows,) vectors (no host sync for N_max). Returns (matrix offset, N-vector offset,
    N-vector slot stride)."""
    if RAGGED:
        sbase = rs * D
        vn = rs
        ns = NR
    else:
        sbase = pid.to(tl.int64) * N * D
        vn = pid.to(tl.int64) * 9 * N
        ns = N
    return sbase, vn, ns


@triton.jit
def _restart(xb, sxn, sxd, sl, sz, vd, vn, ns, lp0_b, lq0_b, n_b, D, u_p0, u_q0,
             HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, PAPER: tl.constexpr, REPLAY: tl.constexpr,
             BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr):
    """State of iteration 0: log S = log p0 q0ᵀ, Z = 0 (paper: log μ = log p0, log η = log q0,
    z1 = z2 = 0)."""
    if not REPLAY:
        _init_state_pass(sl, sz, lp0_b, lq0_b, n_b, D, u_p0, u_q0, HAS_P0, HAS_Q0, BN, BD)
    _vec_fill(vn + 7 * ns, 0.0, n_b, BV)
    _vec_fill(vn + 8 * ns, 0.0, n_b, BV)
    if PAPER:
        _vec_copy_prior(lp0_b, HAS_P0, u_p0, vd + D, D, BV)
        _vec_copy_prior(lq0_b, HAS_Q0, u_q0, vn + ns, n_b, BV)
        _vec_fill(vd + 2 * D, 0.0, D, BV)
        _vec_fill(vn + 2 * ns, 0.0, n_b, BV)
    tl.debug_barrier()


@triton.jit(do_not_specialize=["B", "NR"])
def badmm_fwd_kernel(
    x_ptr, sxb, sxn, sxd, ptr_ptr, order_ptr, lp0_ptr, lq0_ptr,
    w_ptr, sc_ptr, root_ptr, mean_ptr,
    y_ptr, plan_ptr, sl_ptr, sz_ptr, vd_ptr, vn_ptr, hd_ptr, hn_ptr,
    B, N, D, NR, T, u_p0,
    RAGGED: tl.constexpr, HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, QUAD: tl.constexpr,
    PAPER: tl.constexpr, PLAN: tl.constexpr, REPLAY: tl.constexpr, KV: tl.constexpr,
    SCALED: tl.constexpr, STATS: tl.constexpr, ONE_PASS: tl.constexpr, SNAKE: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr, BV: tl.constexpr,
):
    """Pooled output y (B, D) fp32 [and the plan] of T B-ADMM iterations, one set per program
    at a time (persistent grid); records every iteration's vectors in hd / hn (_record).
    REPLAY: each pass rebuilds the state from x and the vectors recorded so far (no N × D
    scratch, O(t) arithmetic per element); otherwise it is streamed through sl / sz.
    SCALED: the sets' feature scale σ (sc (B,) fp32) folded in, y = σ_b · pool(x / σ_b): every
    tile of x is read as x · (1/σ_b) (:func:`_load_x`; x enters the iterations only there) and
    the pooled output is stored times σ_b. The history then is that of x / σ_b.
    STATS (with SCALED): σ_b is the set's feature spread, formed here first
    (:func:`..common.set_spread`, one more read of x; sc, root (B,) and the feature means mean
    (B, D) written for the backward) instead of by the two spread launches.
    ONE_PASS (REPLAY, dense, N <= BN, B-E or paper): one sweep per iteration instead of two
    (:func:`_forward_iteration`); SNAKE: their directions alternate (:func:`snake_start`), or
    with two passes, pass B goes against pass A."""
    tl.static_assert(not ONE_PASS or (REPLAY and not RAGGED and (PAPER or not QUAD)))
    SNAKE_PASSES: tl.constexpr = ONE_PASS and SNAKE          # (one pass over x an iteration)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    rho_ptr = w_ptr + 4 * T                                              # row RHO of the table
    vd = vd_ptr + pid.to(tl.int64) * 7 * D
    # the program's sets pid, pid + nprog, ...: ONE_PASS steps through them by nprog, the other
    # schedules count them - the same sets; at the 128-register cap triton 3.6 spilled the
    # count and counter in the one-pass B-Q paper forward with a plan (20 B), and the stepped
    # form makes 3.9 spill in the streamed W2 forward with a plan (44 B): AOT test
    lo = pid if ONE_PASS else 0
    hi = B if ONE_PASS else tl.cdiv(B - pid, nprog)
    for j in range(lo, hi, nprog if ONE_PASS else 1):
        b = _set_of(order_ptr, j if ONE_PASS else pid + j * nprog, RAGGED)
        rs, n_b, xoff = _set_bounds(b, ptr_ptr, N, sxb, sxn, RAGGED)
        sbase, vn, ns = _scratch_bases(pid, rs, N, D, NR, RAGGED)
        sl = sl_ptr + sbase                                                          # [N_b, D]
        sz = sz_ptr + sbase
        vn = vn_ptr + vn
        xb = x_ptr + xoff
        if STATS:      # (an empty set too: mean 0, σ = 1)
            isig = set_spread(xb, sxn, sxd, n_b, D, sc_ptr + b, root_ptr + b,
                              mean_ptr + b.to(tl.int64) * D, BN, BD)
        else:
            isig = set_inv_scale(sc_ptr, b, SCALED)
        if n_b > 0:
            lp0_b = lp0_ptr + b.to(tl.int64) * D
            lq0_b = lq0_ptr + rs
            u_q0 = -_log(n_b.to(tl.float32))
            _restart(xb, sxn, sxd, sl, sz, vd, vn, ns, lp0_b, lq0_b, n_b, D, u_p0, u_q0,
                     HAS_P0, HAS_Q0, PAPER, REPLAY, BN, BD, BV)
            hd_b = hd_ptr + b.to(tl.int64) * T * KV * D
            hn_b = hn_ptr + rs * KV
            for t in range(0, T - 1):
                a1_t, rho_t, k2_t, k3_t = _iter_weights(w_ptr, T, t, QUAD, PAPER)
                # (one pass over x an iteration: iteration t's is pass t + 1 after the
                # spread's, its direction alternating, snake_start)
                _forward_iteration(xb, sxn, sxd, isig, sl, sz, vd, vn, ns, lp0_b, lq0_b, n_b, D,
                                   u_p0, u_q0, a1_t, rho_t, k2_t, k3_t,
                                   _rho_prev(rho_ptr, t), hd_b, hn_b, NR, w_ptr, T, t,
                                   snake_direction(t, SNAKE_PASSES, STATS), HAS_P0, HAS_Q0,
                                   QUAD, PAPER, REPLAY, KV, ONE_PASS, SNAKE, BN, BD, BV)
            # last iteration: its P-step only, pooling on the fly
            a1, rho, k2_last, _k3 = _iter_weights(w_ptr, T, T - 1, QUAD, PAPER)
            cp = vn + 7 * ns
            ep = vn + 8 * ns
            rp = _rho_prev(rho_ptr, T - 1)
            _row_lse_pass(xb, sxn, sxd, isig, sl, sz, cp, ep, rp, vd, y_ptr + b.to(tl.int64) * D,
                          n_b, D, a1, rho, lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b, NR, w_ptr, T,
                          T - 1, snake_direction(T - 1, SNAKE_PASSES, STATS), HAS_P0, HAS_Q0,
                          KV, REPLAY, QUAD, True, BN, BD)
            tl.debug_barrier()
            if not PAPER:
                _vec_lognorm_mix(lp0_b, HAS_P0, u_p0, vd, vd + D, k2_last, D, BV)
                tl.debug_barrier()
            _record(vd, vn, ns, hd_b + (T - 1) * KV * D, hn_b, n_b, D, NR, False, PAPER, KV, BV)
            if PLAN:
                _plan_pass(xb, sxn, sxd, isig, sl, sz, cp, ep, rp, vd, vd + D, plan_ptr + rs * D,
                           n_b, D, a1, rho, lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b, NR, w_ptr, T,
                           T - 1, HAS_P0, HAS_Q0, KV, REPLAY, QUAD, BN, BD)
        tl.debug_barrier()


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _s_step_adjoint(X, L, Zt, Lb, Zb, r, lmu, c, leta, cb, a1, rho, QUAD: tl.constexpr):
    """Adjoint of one iteration's S-step and dual update for a [BN, BD] tile, from the state
    (L, Zt), the adjoints (L̄', Z̄') of log S', Z' and the vectors R, log μ (columns), C,
    log η, C̄ (rows): returns (Y, G, S, log P̄, Z̄, ∂/∂α1, ∂/∂ρ) (elementwise partials).
    Shared by pass 2, which reduces τ and the partials, and pass 3, which recomputes log P̄, Z̄
    instead of reading them back (pass 2 stores no N × D tile: 8 bytes per element and
    reverse step less HBM traffic)."""
    y, g, s = _p_step_y(X, L, Zt, a1, rho, QUAD)
    lp = y + (lmu - r)[None, :]
    p = _exp(lp)
    y2 = _s_step_y(lp, p, Zt, a1, rho, QUAD)
    e2 = _exp(y2 - c[:, None])                                                   # softmax_d(Y2)
    s_new = e2 * _exp(leta)[:, None]
    y2b = Lb - rho * Zb * s_new + cb[:, None] * e2                               # Ȳ2
    if QUAD:
        inv_ws = 1.0 / _step_weight(a1, rho, QUAD)                               # B-Q step weight
        zb_new = Zb + y2b * inv_ws
        lpb = y2b + p * (rho * Zb - a1 * inv_ws * y2b)
        d_ws = -y2b * (Zt - a1 * p) * (inv_ws * inv_ws)                      # ∂/∂w_P
        d_rho = Zb * (p - s_new) + d_ws
        d_a1 = -y2b * p * inv_ws
        if QUAD == QUAD_EXACT:                                              # w_P = ρ + α1
            d_a1 += d_ws
    else:
        inv_w = 1.0 / (a1 + rho)
        zb_new = Zb + y2b * inv_w
        lpb = (rho * inv_w) * y2b + rho * Zb * p
        d_rho = Zb * (p - s_new) + y2b * (lp - y2) * inv_w
        d_a1 = -y2b * y2 * inv_w
    return y, g, s, lpb, zb_new, d_a1, d_rho


@triton.jit
def _adjoint_s_step_pass(xb, sxn, sxd, isig, lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b, NR, w_ptr, T, tb,
                         slb, szb, zcb, vd, vn, ns, n_b, D, a1, rho, n_lo, n_hi, d_lo, d_hi,
                         tau_ptr, gy_b, out_b, gplan_b, HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr,
                         KV: tl.constexpr, QUAD: tl.constexpr, ZREBUILD: tl.constexpr,
                         GPLAN: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """Backward pass 2: through log S' = Y2 + (log η - C), the S-step and the dual update
    (:func:`_s_step_adjoint`), reading L̄', Z̄' and writing nothing N × D; τ_d = Σ_n log P̄ over
    rows [n_lo, n_hi) into ``tau_ptr`` (the TAU slot, or a split program's partial), columns
    [d_lo, d_hi). Returns the scalar partials (∂/∂α1, ∂/∂ρ) of this iteration so far.
    ZREBUILD: Z̄' rebuilt (:func:`_rebuilt_zbar`, ``szb`` the (T, D) R̄ history, ``zcb`` the
    C̄ history (B-Q), ``gy_b``, ``out_b`` ȳ and y, ``gplan_b`` P̄ with GPLAN) instead of read."""
    return _adjoint_s_step_tiles(xb, sxn, sxd, isig, lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b, NR,
                                 w_ptr, T, tb, slb, szb, zcb, vd, vn, ns, n_b, D, a1, rho, n_lo,
                                 n_hi, d_lo, d_hi, tau_ptr, tau_ptr, gy_b, out_b, gplan_b, HAS_P0,
                                 HAS_Q0, KV, QUAD, False, ZREBUILD, GPLAN, False, False, BN, BD)


@triton.jit
def _adjoint_s_step_tiles(xb, sxn, sxd, isig, lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b, NR, w_ptr, T,
                          tb, slb, szb, zcb, vd, vn, ns, n_b, D, a1, rho, n_lo, n_hi, d_lo,
                          d_hi, tau_ptr, tau0_ptr, gy_b, out_b, gplan_b, HAS_P0: tl.constexpr,
                          HAS_Q0: tl.constexpr, KV: tl.constexpr, QUAD: tl.constexpr,
                          CB_ONLY: tl.constexpr, ZREBUILD: tl.constexpr, GPLAN: tl.constexpr,
                          NMAJOR: tl.constexpr, REV: tl.constexpr, BN: tl.constexpr,
                          BD: tl.constexpr):
    """Pass 2 (:func:`_adjoint_s_step_pass`), or with CB_ONLY its C̄ part alone: the sweep of
    the fused kernel, where pass 3 of the step before already summed the part of τ and of the
    partials that comes from L̄', Z̄' (:func:`_adjoint_p_step_tiles` ``FUSE``; everything here
    is linear in (L̄', Z̄', C̄)), so this sweep reads x only (L̄' = Z̄' = 0) and adds the part
    of C̄ to the τ in ``tau0_ptr``. ZREBUILD: :func:`_adjoint_s_step_pass`. NMAJOR: L̄', Z̄'
    column-major (:func:`_adjoint_tile`). REV: the column blocks from the last
    (:func:`badmm_bwd_kernel` SNAKE)."""
    tl.static_assert(not (ZREBUILD and CB_ONLY))
    tl.static_assert(not (ZREBUILD and NMAJOR))     # (ZREBUILD's P̄ shares the tile offsets)
    # the partials and τ sum elementwise into tiles, reduced after the sweep (τ: after the
    # column block); ZREBUILD holds the rebuild's state too and sums each tile (_sums_init)
    acc_a1 = _sums_init(ZREBUILD, BN, BD)
    acc_rho = _sums_init(ZREBUILD, BN, BD)
    for i0 in range(d_lo, d_hi, BD):
        d0 = i0
        if REV:
            d0 = d_lo + snake_start(i0 - d_lo, d_hi - d_lo, 1, BD)
        offs_d = d0 + tl.arange(0, BD)
        dm = offs_d < d_hi
        r = tl.load(vd + offs_d, mask=dm, other=0.0)
        lmu = tl.load(vd + D + offs_d, mask=dm, other=0.0)
        if ZREBUILD:   # the last iteration's ȳ and y, as its pass 3 scales them
            gy = tl.load(gy_b + offs_d, mask=dm, other=0.0) / isig
            out = tl.load(out_b + offs_d, mask=dm, other=0.0) * isig
        tau = tl.zeros([BD], dtype=tl.float32)
        tau_t = tl.zeros([BN, BD], dtype=tl.float32)     # τ over the row tiles, then its rows
        for n0 in range(n_lo, n_hi, BN):
            offs_n = n0 + tl.arange(0, BN)
            nm = offs_n < n_hi
            mask = nm[:, None] & dm[None, :]
            c = tl.load(vn + offs_n, mask=nm, other=0.0)
            leta = tl.load(vn + ns + offs_n, mask=nm, other=0.0)
            cb = tl.load(vn + 3 * ns + offs_n, mask=nm, other=0.0)
            X = _load_x(xb, offs_n, offs_d, sxn, sxd, mask, isig)
            o = _adjoint_tile(offs_n, offs_d, n_b, D, NMAJOR)
            if ZREBUILD:
                L, Zt, Zb = _state_and_rebuilt_zbar(X, offs_n, offs_d, mask, o, tb, lp0_b, lq0_b,
                                                    n_b, D, u_p0, u_q0, hd_b, hn_b, NR, w_ptr, T,
                                                    szb, zcb, gy, out, gplan_b, HAS_P0, HAS_Q0,
                                                    KV, QUAD, GPLAN)
                Lb = tl.load(slb + o, mask=mask, other=0.0)
            else:
                L, Zt = _replay_state(X, offs_n, offs_d, mask, tb, lp0_b, lq0_b, n_b, D, u_p0,
                                      u_q0, hd_b, hn_b, NR, w_ptr, T, HAS_P0, HAS_Q0, QUAD, KV)
                if CB_ONLY:
                    Lb = tl.zeros_like(X)
                    Zb = tl.zeros_like(X)
                else:
                    Lb = tl.load(slb + o, mask=mask, other=0.0)
                    Zb = tl.load(szb + o, mask=mask, other=0.0)
            _y, _g, _s, lpb, _zb, d_a1, d_rho = _s_step_adjoint(X, L, Zt, Lb, Zb, r, lmu, c,
                                                                leta, cb, a1, rho, QUAD)
            acc_rho = _sums_add(acc_rho, tl.where(mask, d_rho, 0.0), ZREBUILD)
            acc_a1 = _sums_add(acc_a1, tl.where(mask, d_a1, 0.0), ZREBUILD)
            if ZREBUILD:
                tau += tl.sum(tl.where(mask, lpb, 0.0), axis=0)
            else:
                tau_t += tl.where(mask, lpb, 0.0)
        if not ZREBUILD:
            tau = tl.sum(tau_t, axis=0)                                                 # [BD]
        if CB_ONLY:
            tau += tl.load(tau0_ptr + offs_d, mask=dm, other=0.0)
        store_reduced(tau_ptr + offs_d, tau, dm)
    return _sums_total(acc_a1, ZREBUILD), _sums_total(acc_rho, ZREBUILD)


@triton.jit
def _adjoint_plan_pass(xb, sxn, sxd, isig, lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b, NR, w_ptr, T, tb,
                       slb, vd, vn, ns, gplan_b, n_b, D, a1, rho, n_lo, n_hi, d_lo, d_hi,
                       tau_ptr, HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, KV: tl.constexpr,
                       QUAD: tl.constexpr, NMAJOR: tl.constexpr, BN: tl.constexpr,
                       BD: tl.constexpr):
    """Last iteration with a plan gradient: log P̄ = P̄ ⊙ P (over L̄, in its order: NMAJOR,
    :func:`_adjoint_tile`; P̄ row-major), τ_d = Σ_n log P̄ (rows [n_lo, n_hi), into
    ``tau_ptr``), columns [d_lo, d_hi)."""
    for d0 in range(d_lo, d_hi, BD):
        offs_d = d0 + tl.arange(0, BD)
        dm = offs_d < d_hi
        r = tl.load(vd + offs_d, mask=dm, other=0.0)
        lmu = tl.load(vd + D + offs_d, mask=dm, other=0.0)
        tau = tl.zeros([BD], dtype=tl.float32)
        for n0 in range(n_lo, n_hi, BN):
            offs_n = n0 + tl.arange(0, BN)
            mask = (offs_n < n_hi)[:, None] & dm[None, :]
            X = _load_x(xb, offs_n, offs_d, sxn, sxd, mask, isig)
            L, Zt = _replay_state(X, offs_n, offs_d, mask, tb, lp0_b, lq0_b, n_b, D, u_p0,
                                  u_q0, hd_b, hn_b, NR, w_ptr, T, HAS_P0, HAS_Q0, QUAD, KV)
            y, g, s = _p_step_y(X, L, Zt, a1, rho, QUAD)
            p = _exp(y + (lmu - r)[None, :])
            gp = tl.load(gplan_b + _tile_ptrs(offs_n, offs_d, D, 1), mask=mask, other=0.0)
            lpb = tl.where(mask, gp * p, 0.0)
            tl.store(slb + _adjoint_tile(offs_n, offs_d, n_b, D, NMAJOR), lpb, mask=mask)
            tau += tl.sum(lpb, axis=0)
        store_reduced(tau_ptr + offs_d, tau, dm)


# where pass 3 takes the adjoints of its iteration's outputs from (ADJ constexpr)
ADJ_FIRST = tl.constexpr(0)   # first reverse step: Z̄ = X̄ = 0 and log P̄ from the plan pass
#                               (PLAN) or 0 - nothing zeroed beforehand, nothing read back
ADJ_S_STEP = tl.constexpr(1)  # later steps: log P̄, Z̄ recomputed from L̄', Z̄' (pass 2's math)


@triton.jit
def _pooled_y_adjoint(X, y, r, rb, lpb, gy, out):
    """Ȳ of the last iteration, the one that pools: log P̄ + R̄ softmax_n(Y) plus the pooling's
    adjoint (y_d = Σ_n e_nd X_nd: Ȳ += e (X - y_d) ȳ_d), its direct X̄ = e ȳ, and that
    adjoint's part alone (each of its columns sums to 0)."""
    e = _exp(y - r[None, :])                                                     # softmax_n(Y)
    pb = e * (X - out[None, :]) * gy[None, :]
    yb = lpb + rb[None, :] * e + pb
    return yb, e * gy[None, :], pb


@triton.jit
def _through_p_step_y(yb, s, Zb, gx, a1, inv_ws, mask, QUAD: tl.constexpr):
    """Ȳ through Y = log S + G/w_P (G = X - Z [- α1 S]): (L̄, Z̄ - Ȳ/w_P, X̄ + Ȳ/w_P, Ȳ/w_P)."""
    yb = tl.where(mask, yb, 0.0)
    gb = yb * inv_ws
    lb = yb
    if QUAD:
        lb = yb - a1 * s * gb
    return lb, Zb - gb, gx + gb, gb


@triton.jit
def _load_adjoints(slb, szb, gx_b, o, mask):
    """(L̄', Z̄', X̄) of a tile as the previous reverse step's pass 3 stored them."""
    return (tl.load(slb + o, mask=mask, other=0.0), tl.load(szb + o, mask=mask, other=0.0),
            tl.load(gx_b + o, mask=mask, other=0.0))


@triton.jit
def _last_step_adjoints(X, L1, Z1, mask, r1, gy, out, a1_1, rho_1, QUAD: tl.constexpr):
    """(L̄, Z̄, X̄) that the first reverse step (iteration T - 1) forms from that iteration's
    state (L1, Z1) when there is no plan gradient - log P̄ = 0, hence τ = 0 and R̄ = 0 (the
    kernel's R̄ slot holds exactly 0 then) - by the same expressions as pass 3's ADJ_FIRST, so
    the same values: the second reverse step of a DEFER backward recomputes them."""
    y1, _g1, s1 = _p_step_y(X, L1, Z1, a1_1, rho_1, QUAD)
    zero = tl.zeros_like(X)
    yb1, gx1, _pb1 = _pooled_y_adjoint(X, y1, r1, tl.zeros_like(r1), zero, gy, out)
    lb1, zb1, gx1, _gb1 = _through_p_step_y(yb1, s1, zero, gx1, a1_1,
                                            1.0 / _step_weight(a1_1, rho_1, QUAD), mask, QUAD)
    return lb1, zb1, gx1


@triton.jit
def _adjoint_p_step_pass(xb, sxn, sxd, isig, lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b, NR, w_ptr, T, tb,
                         slb, szb, zcb, gx_b, vd, vn, ns, cb_ptr, gy_b, out_b, n_b, D, a1, rho,
                         last, rho_prev, n_lo, n_hi, d_lo, d_hi, sigma_ptr, tau0_ptr, gplan_b,
                         HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, KV: tl.constexpr,
                         QUAD: tl.constexpr, ADJ: tl.constexpr, PLAN: tl.constexpr,
                         FUSE: tl.constexpr, SCALED: tl.constexpr, ZREBUILD: tl.constexpr,
                         BN: tl.constexpr, BD: tl.constexpr):
    """Backward pass 3: log P̄ and Z̄ as ``ADJ`` says (ADJ_S_STEP: :func:`_s_step_adjoint` of
    L̄', Z̄' with C̄ from ``cb_ptr``, as pass 2 formed them), then Ȳ = log P̄ + R̄ softmax_n(Y)
    [+ the pooling's adjoint: last = 1.0 in the last iteration, 0.0 before], then through
    Y = log S + G/w_P: L̄ ← Ȳ [- α1 S Ȳ/w_P], Z̄ ← Z̄ - Ȳ/w_P, X̄ += Ȳ/w_P (all three written
    in place). With tb > 0 it also forms the previous reverse step's row sums
    σ_n = Σ_d (L̄ - ρ_{tb-1} Z̄ S) from the adjoints just formed and this iteration's S
    (the adjoint of C_{tb-1} and log η_{tb-1}; saves that step a pass), into ``sigma_ptr`` (a
    slot apart from C̄'s, or a split program's partial over columns [d_lo, d_hi)); rows
    [n_lo, n_hi). Returns the scalar partials (∂/∂α1, ∂/∂ρ), (FUSE) those of iteration tb - 1's
    pass 2 from L̄', Z̄' (its τ part into ``tau0_ptr``: :func:`_adjoint_p_step_tiles`) and
    (SCALED) Σ X̄ · x / σ_b over the tiles. ZREBUILD: Z̄' rebuilt (:func:`_rebuilt_zbar`;
    ``szb`` the (T, D) R̄ history, ``zcb`` the C̄ history (B-Q), ``gplan_b`` P̄ with PLAN), Z̄
    not stored."""
    return _adjoint_p_step_tiles(
        xb, sxn, sxd, isig, lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b, NR, w_ptr, T, tb, slb, szb, zcb,
        gx_b, vd, vn, ns, cb_ptr, gy_b, out_b, n_b, D, a1, rho, last, rho_prev, n_lo, n_hi, d_lo,
        d_hi, sigma_ptr, tau0_ptr, gplan_b, HAS_P0, HAS_Q0, KV, QUAD, ADJ, PLAN, FUSE, False,
        SCALED, ZREBUILD, False, False, BN, BD)


@triton.jit
def _adjoint_p_step_tiles(xb, sxn, sxd, isig, lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b, NR, w_ptr, T,
                          tb, slb, szb, zcb, gx_b, vd, vn, ns, cb_ptr, gy_b, out_b, n_b, D, a1, rho,
                          last, rho_prev, n_lo, n_hi, d_lo, d_hi, sigma_ptr, tau0_ptr, gplan_b,
                          HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, KV: tl.constexpr,
                          QUAD: tl.constexpr, ADJ: tl.constexpr, PLAN: tl.constexpr,
                          FUSE: tl.constexpr, DEFER: tl.constexpr, SCALED: tl.constexpr,
                          ZREBUILD: tl.constexpr, NMAJOR: tl.constexpr, REV: tl.constexpr,
                          BN: tl.constexpr, BD: tl.constexpr):
    """Pass 3 (:func:`_adjoint_p_step_pass`); with FUSE (tb > 0; the fused kernel, one program
    per set, and the split backward's pass 3 where it rebuilds Z̄', whose replay then runs on
    from iteration tb to T - 1) it also does the part of the NEXT reverse step's pass 2 that
    the adjoints just formed determine: pass 2 of iteration u = tb - 1 is linear in
    (L̄', Z̄', C̄_u), and L̄', Z̄' are this pass's outputs, still in registers, so it sums τ_u
    and the partials (∂/∂α1_u, ∂/∂ρ_u) of :func:`_s_step_adjoint` with C̄_u = 0 here (τ_u's
    part into ``tau0_ptr``, rows [n_lo, n_hi) accumulated over the row blocks) and the next
    step only adds the part of C̄_u in a sweep over x (:func:`_adjoint_s_step_tiles`
    ``CB_ONLY``) - no second read (or rebuild) of L̄', Z̄'.
    The state of iteration u comes free: the replay stops at u, then runs iteration u.
    DEFER (with FUSE, T >= 2, no plan gradient): the first reverse step (ADJ_FIRST, tb = T - 1)
    stores no L̄, Z̄, X̄ - it still forms them in registers for σ and iteration u's partials -
    and the second (tb = T - 2) recomputes them (:func:`_last_step_adjoints`) from the state of
    iteration T - 1 (one more replayed iteration), R_{T-1} (the history), ȳ and y instead of
    reading them: 24 bytes per element less.
    SCALED (a feature scale folded in, :func:`badmm_fwd_kernel`): X is x / σ_b, the pooled
    output and ȳ in HBM are σ_b · pool(x / σ_b) and d loss / dy, so y loads times 1/σ_b and ȳ
    times σ_b, and X̄ is d loss / d(x / σ_b); the last reverse step's Σ X̄ · X gives ∂/∂σ_b.
    Returns (∂/∂α1, ∂/∂ρ) of iteration tb, (FUSE) the parts of iteration u's, and (SCALED)
    Σ X̄ · X over the tiles (0 otherwise). ZREBUILD: :func:`_adjoint_p_step_pass`. NMAJOR:
    L̄, Z̄, X̄ column-major (:func:`_adjoint_tile`). REV: the column blocks from the last
    (:func:`badmm_bwd_kernel` SNAKE)."""
    tl.static_assert(FUSE or not DEFER)
    tl.static_assert(not (ZREBUILD and DEFER))
    tl.static_assert(not (ZREBUILD and NMAJOR))     # (ZREBUILD's P̄ shares the tile offsets)
    # ∂/∂w_P, (B-Q) ∂/∂α1's own part and (SCALED) X̄ · X sum elementwise into tiles, reduced
    # once after the sweep, as pass 2's partials (:func:`_sums_init`; ZREBUILD: per tile)
    acc_ws = _sums_init(ZREBUILD, BN, BD)
    acc_a1s = _sums_init(ZREBUILD, BN, BD)
    acc_gxx = _sums_init(ZREBUILD, BN, BD)
    acc_a1u = _vzero(BD)
    acc_rhou = _vzero(BD)
    if FUSE:       # iteration u = tb - 1 (u = 0 at tb = 0, whose results are not kept)
        tu = tl.maximum(tb - 1, 0)
        a1_u = tl.load(w_ptr + 1 * T + tu)
        rho_u = tl.load(w_ptr + 4 * T + tu)
        hd_u = hd_b + tu.to(tl.int64) * KV * D
        hn_u = hn_b + tu.to(tl.int64) * KV * NR
    inv_ws = 1.0 / _step_weight(a1, rho, QUAD)
    n_kept = tl.where(tb > 0, n_hi, n_lo)            # rows whose L̄, Z̄ a later pass reads
    if DEFER:      # the first reverse step's weights and R (iteration T - 1)
        a1_1 = tl.load(w_ptr + 1 * T + T - 1)
        rho_1 = tl.load(w_ptr + 4 * T + T - 1)
        hd_1 = hd_b + (T - 1).to(tl.int64) * KV * D
        # one more replayed iteration (T - 1's state) only where it is used: tb = T - 2
        k_1 = tl.where(tb == T - 2, tb + 1, tb)
    # column blocks outside, rows inside: the column vectors load once per column block and
    # τ_u sums in registers; σ (a row sum) accumulates over the column blocks in place
    for i0 in range(d_lo, d_hi, BD):
        d0 = i0
        if REV:
            d0 = d_lo + snake_start(i0 - d_lo, d_hi - d_lo, 1, BD)
        offs_d = d0 + tl.arange(0, BD)
        dm = offs_d < d_hi
        r = tl.load(vd + offs_d, mask=dm, other=0.0)
        rb = tl.load(vd + 3 * D + offs_d, mask=dm, other=0.0)
        if ADJ == ADJ_S_STEP:
            lmu = tl.load(vd + D + offs_d, mask=dm, other=0.0)
            if ZREBUILD:   # the last iteration's ȳ and y, as its pass 3 scales them
                gy = tl.load(gy_b + offs_d, mask=dm, other=0.0) / isig
                out = tl.load(out_b + offs_d, mask=dm, other=0.0) * isig
        else:          # the pooling's adjoint: only the last iteration pools (last = 1.0)
            gy = tl.load(gy_b + offs_d, mask=dm, other=0.0) * (last / isig)
            out = tl.load(out_b + offs_d, mask=dm, other=0.0) * isig
        if DEFER:
            if ADJ == ADJ_S_STEP:   # what the first reverse step's adjoints are formed from
                r_1 = tl.load(hd_1 + offs_d * KV, mask=dm, other=0.0)
                gy_1 = tl.load(gy_b + offs_d, mask=dm, other=0.0) / isig
                out_1 = tl.load(out_b + offs_d, mask=dm, other=0.0) * isig
        if FUSE:       # iteration u's log μ - R (R and log μ enter only as the difference)
            shift_u = _hist_shift(hd_u, offs_d, dm, KV)
            tau_u = tl.zeros([BD], dtype=tl.float32)
        for n0 in range(n_lo, n_hi, BN):
            offs_n = n0 + tl.arange(0, BN)
            nm = offs_n < n_hi
            mask = nm[:, None] & dm[None, :]
            X = _load_x(xb, offs_n, offs_d, sxn, sxd, mask, isig)
            o = _adjoint_tile(offs_n, offs_d, n_b, D, NMAJOR)
            if FUSE:   # the state of iteration u on the way to iteration tb's
                L, Zt = _replay_start(offs_n, offs_d, mask, lp0_b, lq0_b, n_b, D, u_p0, u_q0,
                                      HAS_P0, HAS_Q0)
                L, Zt = _replay_iterations(X, L, Zt, offs_n, offs_d, 0, tu, n_b, D, hd_b, hn_b,
                                           NR, w_ptr, T, QUAD, KV)
                L_u = tl.where(mask, L, 0.0)
                Z_u = Zt
                L, Zt = _replay_iterations(X, L, Zt, offs_n, offs_d, tu, tb, n_b, D, hd_b,
                                           hn_b, NR, w_ptr, T, QUAD, KV)
                if DEFER:
                    if ADJ == ADJ_S_STEP:  # iteration T - 1's state (tb = T - 2; else L, Zt)
                        L_1, Z_1 = _replay_iterations(X, L, Zt, offs_n, offs_d, tb, k_1, n_b, D,
                                                      hd_b, hn_b, NR, w_ptr, T, QUAD, KV)
                if ZREBUILD and ADJ == ADJ_S_STEP:     # the replay continued to T - 1
                    if PLAN:
                        gp = tl.load(gplan_b + o, mask=mask, other=0.0)
                    else:
                        gp = X
                    Zb_r = _rebuilt_zbar(X, L, Zt, offs_n, offs_d, tb, n_b, D, hd_b, hn_b, NR,
                                         w_ptr, T, szb, zcb, gy, out, gp, KV, QUAD, PLAN)
                L = tl.where(mask, L, 0.0)
            elif ZREBUILD and ADJ == ADJ_S_STEP:
                L, Zt, Zb_r = _state_and_rebuilt_zbar(X, offs_n, offs_d, mask, o, tb, lp0_b,
                                                      lq0_b, n_b, D, u_p0, u_q0, hd_b, hn_b, NR,
                                                      w_ptr, T, szb, zcb, gy, out, gplan_b,
                                                      HAS_P0, HAS_Q0, KV, QUAD, PLAN)
            else:
                L, Zt = _replay_state(X, offs_n, offs_d, mask, tb, lp0_b, lq0_b, n_b, D, u_p0,
                                      u_q0, hd_b, hn_b, NR, w_ptr, T, HAS_P0, HAS_Q0, QUAD, KV)
            if ADJ == ADJ_S_STEP:
                c = tl.load(vn + offs_n, mask=nm, other=0.0)
                leta = tl.load(vn + ns + offs_n, mask=nm, other=0.0)
                cb = tl.load(cb_ptr + offs_n, mask=nm, other=0.0)
                if DEFER:
                    if tb == T - 2:    # the first step's L̄, Z̄, X̄, recomputed (not stored)
                        Lb, Zb, gx = _last_step_adjoints(X, tl.where(mask, L_1, 0.0), Z_1, mask,
                                                         r_1, gy_1, out_1, a1_1, rho_1, QUAD)
                    else:
                        Lb, Zb, gx = _load_adjoints(slb, szb, gx_b, o, mask)
                elif ZREBUILD:
                    Lb = tl.load(slb + o, mask=mask, other=0.0)
                    gx = tl.load(gx_b + o, mask=mask, other=0.0)
                    Zb = Zb_r
                else:
                    Lb, Zb, gx = _load_adjoints(slb, szb, gx_b, o, mask)
                y, g, s, lpb, Zb, _da1, _drho = _s_step_adjoint(X, L, Zt, Lb, Zb, r, lmu, c,
                                                                leta, cb, a1, rho, QUAD)
                yb = lpb + rb[None, :] * _exp(y - r[None, :])              # + R̄ softmax_n(Y)
            else:
                y, g, s = _p_step_y(X, L, Zt, a1, rho, QUAD)
                if PLAN:
                    lpb = tl.load(slb + o, mask=mask, other=0.0)
                else:
                    lpb = tl.zeros_like(X)
                Zb = tl.zeros_like(X)
                yb, gx, pb = _pooled_y_adjoint(X, y, r, rb, lpb, gy, out)
            lb, zb_new, gx, gb = _through_p_step_y(yb, s, Zb, gx, a1, inv_ws, mask, QUAD)
            # ∂/∂w_P = -Σ Ȳ ⊙ G / w_P², with the pooling's part of Ȳ against G - y: near
            # one-hot softmaxes (small ρ, α1) Σ Ȳ_pool ⊙ X cancels terms ~100× its value
            # (∂/∂ρ was 1e-3 off float64), the centred sum does not: each element adds
            # Ȳ_pool · y (Σ 0 but for rounding: the pooling's columns sum to 0)
            if ADJ == ADJ_S_STEP:
                d_ws = tl.where(mask, -gb * g * inv_ws, 0.0)
            else:
                d_ws = tl.where(mask, (pb * out[None, :] * inv_ws - gb * g) * inv_ws, 0.0)
            acc_ws = _sums_add(acc_ws, d_ws, ZREBUILD)
            if QUAD:
                acc_a1s = _sums_add(acc_a1s, tl.where(mask, -gb * s, 0.0), ZREBUILD)
            # the first iteration's L̄ only feeds the priors' gradients, its Z̄ nothing (Z_0 = 0)
            kept = mask & (offs_n < n_kept)[:, None]
            if ADJ != ADJ_FIRST or not DEFER:  # DEFER: the next step recomputes them
                if HAS_P0 or HAS_Q0:
                    tl.store(slb + o, lb, mask=mask)
                else:
                    tl.store(slb + o, lb, mask=kept)
                if not ZREBUILD:
                    tl.store(szb + o, zb_new, mask=kept)
                tl.store(gx_b + o, gx, mask=mask)
            if SCALED:     # (used from the last reverse step, where X̄ is complete)
                acc_gxx = _sums_add(acc_gxx, tl.where(mask, gx * X, 0.0), ZREBUILD)
            # σ accumulates over the column blocks; the [BN] vector is replicated over the
            # columns' threads, so every replica loads before any stores (the barrier), and
            # all store the same sum (a replica's next load sees its own store)
            sigma = tl.sum(tl.where(mask, lb - rho_prev * zb_new * s, 0.0), axis=1)  # [BN]
            sig_old = tl.load(sigma_ptr + offs_n, mask=nm & ((offs_n * 0 + i0) > d_lo),
                              other=0.0)                     # (from the sweep's second block)
            tl.debug_barrier()
            tl.store(sigma_ptr + offs_n, sig_old + sigma, mask=nm & ((offs_n * 0 + tb) > 0))
            if FUSE:   # iteration u's pass 2 with C̄_u = 0, from the L̄, Z̄ just formed
                c_u = tl.load(hn_u + offs_n * KV, mask=nm, other=0.0)
                leta_u = tl.load(hn_u + offs_n * KV + 1, mask=nm, other=0.0)
                _y, _g, _s, lpb_u, _zb, d_a1u, d_rhou = _s_step_adjoint(
                    X, L_u, Z_u, lb, zb_new, tl.zeros([BD], dtype=tl.float32), shift_u, c_u,
                    leta_u, tl.zeros([BN], dtype=tl.float32), a1_u, rho_u, QUAD)
                live = mask & ((offs_n * 0 + tb) > 0)[:, None]
                acc_a1u += tl.sum(tl.where(live, d_a1u, 0.0))
                acc_rhou += tl.sum(tl.where(live, d_rhou, 0.0))
                tau_u += tl.sum(tl.where(live, lpb_u, 0.0), axis=0)                  # [BD]
        if FUSE:
            tl.store(tau0_ptr + offs_d, tau_u, mask=dm & ((offs_d * 0 + tb) > 0))
    d_ws = _sums_total(acc_ws, ZREBUILD)
    acc_a1 = _vzero(BD)
    if QUAD:
        acc_a1 += _sums_total(acc_a1s, ZREBUILD)
    if QUAD == QUAD_EXACT:                                                      # w_P = ρ + α1
        acc_a1 += d_ws
    gxx = _vzero(BD)
    if SCALED:
        gxx += _sums_total(acc_gxx, ZREBUILD)
    return acc_a1, d_ws, acc_a1u, acc_rhou, gxx


@triton.jit
def _vec_lognorm_mix_bwd(prior_ptr, HAS: tl.constexpr, uval, src_ptr, dst_ptr, gsum_ptr,
                         gprior_ptr, k, length, BV: tl.constexpr):
    """Adjoint of dst = lognorm(κ prior + (1-κ) src) for the exact variant, where the adjoint
    of dst equals the row/column sum g = gsum and src also enters as -src: on exit gsum holds
    src's total adjoint -g + (1-κ) ū, ū = g - exp(dst) Σg; gprior += κ ū. Returns ∂/∂κ."""
    sv = tl.zeros([BV], dtype=tl.float32)
    for i0 in range(0, length, BV):
        offs = i0 + tl.arange(0, BV)
        sv += tl.load(gsum_ptr + offs, mask=offs < length, other=0.0)
    gs = tl.sum(sv, axis=0)
    kacc = tl.zeros([BV], dtype=tl.float32)
    for i0 in range(0, length, BV):
        offs = i0 + tl.arange(0, BV)
        msk = offs < length
        gv = tl.load(gsum_ptr + offs, mask=msk, other=0.0)
        src = tl.load(src_ptr + offs, mask=msk, other=0.0)
        ub = gv - _exp(tl.load(dst_ptr + offs, mask=msk, other=0.0)) * gs
        ub = tl.where(msk, ub, 0.0)
        prior = _load_prior(prior_ptr, offs, length, uval, HAS)
        kacc += ub * (prior - src)
        tl.store(gsum_ptr + offs, -gv + (1 - k) * ub, mask=msk)
        tl.store(gprior_ptr + offs, tl.load(gprior_ptr + offs, mask=msk, other=0.0) + k * ub,
                 mask=msk)
    return tl.sum(kacc, axis=0)


@triton.jit
def _vec_paper_absorb(gsum_ptr, gstate_ptr, length, BV: tl.constexpr):
    """Paper variant: log μ (log η) is state, so its adjoint takes the sum g, and R̄ = -g."""
    for i0 in range(0, length, BV):
        offs = i0 + tl.arange(0, BV)
        msk = offs < length
        gv = tl.load(gsum_ptr + offs, mask=msk, other=0.0)
        tl.store(gstate_ptr + offs, tl.load(gstate_ptr + offs, mask=msk, other=0.0) + gv, mask=msk)
        tl.store(gsum_ptr + offs, -gv, mask=msk)


@triton.jit
def _vec_paper_update_bwd(prior_ptr, HAS: tl.constexpr, uval, lmu_ptr, z1_ptr, glmu_ptr,
                          gz1_ptr, gprior_ptr, k, rho, length, BV: tl.constexpr):
    """Adjoint of log μ' = lognorm(m), m = (1-κ)(log μ - z1/ρ) + κ log p0, z1' = z1 +
    ρ(μ' - μ): reads (log μ, z1) of iteration t and the adjoints of (log μ', z1'), overwrites
    them with the adjoints of (log μ, z1); returns (∂/∂κ, ∂/∂ρ)."""
    mv = tl.full([BV], float("-inf"), dtype=tl.float32)
    lv = tl.zeros([BV], dtype=tl.float32)
    for i0 in range(0, length, BV):
        offs = i0 + tl.arange(0, BV)
        msk = offs < length
        u = (1 - k) * (tl.load(lmu_ptr + offs, mask=msk, other=0.0)
                       - tl.load(z1_ptr + offs, mask=msk, other=0.0) / rho) \
            + k * _load_prior(prior_ptr, offs, length, uval, HAS)
        mv, lv = _lse_add(mv, lv, tl.where(msk, u, float("-inf")))
    lse = _lse_total(mv, lv)
    # A = adjoint of log μ' including z1' = ... + ρ μ'
    sv = tl.zeros([BV], dtype=tl.float32)
    for i0 in range(0, length, BV):
        offs = i0 + tl.arange(0, BV)
        msk = offs < length
        u = (1 - k) * (tl.load(lmu_ptr + offs, mask=msk, other=0.0)
                       - tl.load(z1_ptr + offs, mask=msk, other=0.0) / rho) \
            + k * _load_prior(prior_ptr, offs, length, uval, HAS)
        a = tl.load(glmu_ptr + offs, mask=msk, other=0.0) \
            + rho * tl.load(gz1_ptr + offs, mask=msk, other=0.0) * _exp(u - lse)
        sv += tl.where(msk, a, 0.0)
    sa = tl.sum(sv, axis=0)
    kacc = tl.zeros([BV], dtype=tl.float32)
    racc = tl.zeros([BV], dtype=tl.float32)
    for i0 in range(0, length, BV):
        offs = i0 + tl.arange(0, BV)
        msk = offs < length
        lmu = tl.load(lmu_ptr + offs, mask=msk, other=0.0)
        z1 = tl.load(z1_ptr + offs, mask=msk, other=0.0)
        prior = _load_prior(prior_ptr, offs, length, uval, HAS)
        u = (1 - k) * (lmu - z1 / rho) + k * prior
        mu_new = _exp(u - lse)
        gz1 = tl.load(gz1_ptr + offs, mask=msk, other=0.0)
        a = tl.load(glmu_ptr + offs, mask=msk, other=0.0) + rho * gz1 * mu_new
        mb = tl.where(msk, a - mu_new * sa, 0.0)
        kacc += mb * (prior - lmu + z1 / rho)
        racc += tl.where(msk, gz1 * (mu_new - _exp(lmu)) + (1 - k) * mb * z1 / (rho * rho), 0.0)
        tl.store(glmu_ptr + offs, (1 - k) * mb - rho * gz1 * _exp(lmu), mask=msk)
        tl.store(gz1_ptr + offs, gz1 - (1 - k) * mb / rho, mask=msk)
        tl.store(gprior_ptr + offs, tl.load(gprior_ptr + offs, mask=msk, other=0.0) + k * mb,
                 mask=msk)
    return tl.sum(kacc, axis=0), tl.sum(racc, axis=0)


@triton.jit
def _init_adjoint_pass(slb, vd, vn, ns, gp0_b, gq0_b, n_b, D,
                       HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, PAPER: tl.constexpr,
                       NMAJOR: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """Adjoint of log S_0 = log p0 + log q0 (and paper: log μ_0 = log p0, log η_0 = log q0):
    log p̄0 += Σ_n L̄, log q̄0 += Σ_d L̄ (L̄ in the order NMAJOR says: :func:`_adjoint_tile`);
    written to the gradient outputs."""
    if HAS_Q0:
        for n0 in range(0, n_b, BN):
            offs_n = n0 + tl.arange(0, BN)
            nm = offs_n < n_b
            acc = tl.zeros([BN], dtype=tl.float32)
            for d0 in range(0, D, BD):
                offs_d = d0 + tl.arange(0, BD)
                mask = nm[:, None] & (offs_d < D)[None, :]
                acc += tl.sum(tl.load(slb + _adjoint_tile(offs_n, offs_d, n_b, D, NMAJOR),
                                      mask=mask, other=0.0), axis=1)
            acc += tl.load(vn + 6 * ns + offs_n, mask=nm, other=0.0)
            if PAPER:
                acc += tl.load(vn + 4 * ns + offs_n, mask=nm, other=0.0)
            tl.store(gq0_b + offs_n, acc, mask=nm)
    if HAS_P0:
        for d0 in range(0, D, BD):
            offs_d = d0 + tl.arange(0, BD)
            dm = offs_d < D
            acc = tl.zeros([BD], dtype=tl.float32)
            for n0 in range(0, n_b, BN):
                offs_n = n0 + tl.arange(0, BN)
                mask = (offs_n < n_b)[:, None] & dm[None, :]
                acc += tl.sum(tl.load(slb + _adjoint_tile(offs_n, offs_d, n_b, D, NMAJOR),
                                      mask=mask, other=0.0), axis=0)
            acc += tl.load(vd + 6 * D + offs_d, mask=dm, other=0.0)
            if PAPER:
                acc += tl.load(vd + 4 * D + offs_d, mask=dm, other=0.0)
            tl.store(gp0_b + offs_d, acc, mask=dm)


@triton.jit(do_not_specialize=["B", "NR"])
def badmm_bwd_kernel(
    x_ptr, sxb, sxn, sxd, ptr_ptr, order_ptr, lp0_ptr, lq0_ptr,
    w_ptr, hd_ptr, hn_ptr, sc_ptr,
    out_ptr, gy_ptr, gplan_ptr,
    gx_ptr, gp0_ptr, gq0_ptr, gw_ptr, ds_ptr,
    slb_ptr, szb_ptr, zc_ptr, vd_ptr, vn_ptr,
    B, N, D, NR, T, u_p0,
    RAGGED: tl.constexpr, HAS_P0: tl.constexpr, HAS_Q0: tl.constexpr, QUAD: tl.constexpr,
    PAPER: tl.constexpr, PLAN_GRAD: tl.constexpr, KV: tl.constexpr, FUSE: tl.constexpr,
    DEFER: tl.constexpr, SCALED: tl.constexpr, ZREBUILD: tl.constexpr, SNAKE: tl.constexpr,
    NMAJOR: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
):
    """Exact gradient of the T unrolled iterations: one reverse step per iteration, whose
    passes rebuild the forward state of that iteration from x and the vector history hd / hn
    (:func:`_replay_state`) - O(T) passes, no recomputation of the forward's reductions.

    Writes gx (rows, D) fp32 (in x's row order), gp0 (B, D), gq0 (rows,), and gw (B, T, 4):
    per set and iteration the partials wrt (κ2, κ3, α1, ρ) (finished by badmm_dw_kernel;
    every entry written, zeros for an empty set).
    FUSE: pass 3 also sums the L̄', Z̄' part of the next step's pass 2, which then reads x only
    (module docstring, "Backward schedule"); without it pass 2 reads L̄', Z̄' (the launcher
    picks by T: :func:`.launch.backward_fuses`). DEFER (FUSE, T >= 2, no plan gradient): the
    first reverse step stores no L̄, Z̄, X̄, the second recomputes them
    (:func:`_adjoint_p_step_tiles`).
    SCALED (the forward's feature scale σ, sc (B,)): gx is d loss / d(x / σ) and ds (B,) gets
    ∂ loss/∂σ_b = (Σ_d ȳ_d y_d - Σ X̄ · x / σ_b) / σ_b: y = σ_b · pool(x / σ_b) is linear in
    σ_b at fixed x / σ_b, and x / σ_b moves by -(x / σ_b) / σ_b.
    ZREBUILD (unfused; :func:`.launch.backward_rebuilds_zbar`): passes 2 and 3 rebuild Z̄'
    (:func:`_rebuilt_zbar`) from each program's (T, D) slot of R̄ in ``szb_ptr`` and (B-Q) the
    (T, rows) C̄ history ``zc_ptr`` instead of keeping Z̄ in a scratch like L̄'s.
    SNAKE: pass 2 walks the column blocks from the last, pass 3 from the first, so each pass
    starts on the blocks the one before read last (still in L2 where a set is larger than its
    program's share: :func:`.common.snake_start`).
    NMAJOR (dense, x an NCHW view: :func:`.launch.adjoints_column_major`): the L̄, Z̄ scratch
    and gx (B, N, D) with strides (N·D, 1, N), x's order (:func:`_adjoint_tile`).
    """
    tl.static_assert(not (NMAJOR and RAGGED))
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    vd = vd_ptr + pid.to(tl.int64) * 8 * D
    for it in range(0, tl.cdiv(B - pid, nprog)):
        b = _set_of(order_ptr, pid + it * nprog, RAGGED)
        rs, n_b, xoff = _set_bounds(b, ptr_ptr, N, sxb, sxn, RAGGED)
        sbase, vn, ns = _scratch_bases(pid, rs, N, D, NR, RAGGED)
        slb = slb_ptr + sbase                                                        # [N_b, D]
        if ZREBUILD:
            szb = szb_ptr + pid.to(tl.int64) * T * D          # the set's R̄ of every step
        else:
            szb = szb_ptr + sbase
        vn = vn_ptr + vn
        if n_b > 0:
            xb = x_ptr + xoff
            isig = set_inv_scale(sc_ptr, b, SCALED)
            lp0_b = lp0_ptr + b.to(tl.int64) * D
            lq0_b = lq0_ptr + rs
            hd_b = hd_ptr + b.to(tl.int64) * T * KV * D
            hn_b = hn_ptr + rs * KV
            u_q0 = -_log(n_b.to(tl.float32))
            gx_b = gx_ptr + rs * D
            gy_b = gy_ptr + b.to(tl.int64) * D
            out_b = out_ptr + b.to(tl.int64) * D
            gplan_b = gplan_ptr + rs * D
            zcb = zc_ptr + rs                 # ZREBUILD, B-Q: the set's C̄ of every step
            # adjoint accumulators (L̄, Z̄ and X̄ need no zeroing: see ADJ_FIRST): log μ̄, z̄1, log p̄0 and log η̄, z̄2, log q̄0
            for j in range(4, 7):
                _vec_fill(vd + j * D, 0.0, D, BV)
                _vec_fill(vn + j * ns, 0.0, n_b, BV)
            tl.debug_barrier()
            # the parts of the next step's (∂/∂α1, ∂/∂ρ) that pass 3 sums (FUSE)
            ga1_next = _vzero(BV)
            grho_next = _vzero(BV)
            gxx = _vzero(BV)                # SCALED: Σ X̄ · x / σ_b (the last step's pass 3)
            for i in range(0, T):
                tb = T - 1 - i
                a1, rho, k2, k3 = _iter_weights(w_ptr, T, tb, QUAD, PAPER)
                gk2 = _vzero(BV)
                gk3 = _vzero(BV)
                ga1 = ga1_next
                grho = grho_next
                # iteration tb's vectors R, log μ [, z1] and C, log η [, z2] from the history
                _restore(vd, vn, ns, hd_b + tb * KV * D, hn_b + tb * KV * NR, n_b, D, NR,
                         tb < T - 1, PAPER, KV, BV)
                tl.debug_barrier()
                if tb == T - 1:
                    if PLAN_GRAD:
                        _adjoint_plan_pass(xb, sxn, sxd, isig, lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b,
                                           NR, w_ptr, T, tb, slb, vd, vn, ns, gplan_ptr + rs * D,
                                           n_b, D, a1, rho, 0, n_b, 0, D, vd + 3 * D, HAS_P0,
                                           HAS_Q0, KV, QUAD, NMAJOR, BN, BD)
                    else:
                        _vec_fill(vd + 3 * D, 0.0, D, BV)
                    tl.debug_barrier()
                else:
                    if PAPER:
                        dk, dr = _vec_paper_update_bwd(lp0_b, HAS_P0, u_p0, vd + D, vd + 2 * D,
                                                       vd + 4 * D, vd + 5 * D,
                                                       vd + 6 * D, k2, rho, D, BV)
                        gk2 += dk
                        grho += dr
                        dk, dr = _vec_paper_update_bwd(lq0_b, HAS_Q0, u_q0, vn + ns,
                                                       vn + 2 * ns, vn + 4 * ns,
                                                       vn + 5 * ns, vn + 6 * ns, k3, rho,
                                                       n_b, BV)
                        gk3 += dk
                        grho += dr
                        tl.debug_barrier()
                    # σ of this step: written by pass 3 of the step before (tb + 1) into
                    # slot 7 (slot 3 held that step's C̄, which its pass 3 read)
                    _vec_copy(vn + 7 * ns, vn + 3 * ns, n_b, BV)
                    tl.debug_barrier()
                    if PAPER:
                        _vec_paper_absorb(vn + 3 * ns, vn + 4 * ns, n_b, BV)
                    else:
                        gk3 += _vec_lognorm_mix_bwd(lq0_b, HAS_Q0, u_q0, vn,
                                                    vn + ns, vn + 3 * ns, vn + 6 * ns,
                                                    k3, n_b, BV)
                    tl.debug_barrier()
                    if ZREBUILD and QUAD:  # C̄ of this step, for the later steps' rebuilt Z̄'
                        _vec_copy(vn + 3 * ns, zcb + tb * NR, n_b, BV)
                    # pass 2's part of C̄ (pass 3 of step tb + 1 summed the rest into TAU0)
                    da1, dr = _adjoint_s_step_tiles(xb, sxn, sxd, isig, lp0_b, lq0_b, u_p0, u_q0,
                                                    hd_b, hn_b, NR, w_ptr, T, tb, slb, szb, zcb,
                                                    vd, vn, ns, n_b, D, a1, rho, 0, n_b, 0, D,
                                                    vd + 3 * D, vd + 7 * D, gy_b, out_b,
                                                    gplan_b, HAS_P0, HAS_Q0, KV, QUAD, FUSE,
                                                    ZREBUILD, PLAN_GRAD, NMAJOR, SNAKE, BN, BD)
                    ga1 += da1
                    grho += dr
                    tl.debug_barrier()
                if PAPER:
                    _vec_paper_absorb(vd + 3 * D, vd + 4 * D, D, BV)
                else:
                    gk2 += _vec_lognorm_mix_bwd(lp0_b, HAS_P0, u_p0, vd, vd + D, vd + 3 * D,
                                                vd + 6 * D, k2, D, BV)
                tl.debug_barrier()
                if ZREBUILD:   # R̄ of this step, which the later steps' passes rebuild Z̄' from
                    _vec_copy(vd + 3 * D, szb + tb * D, D, BV)
                    tl.debug_barrier()
                rho_p = _rho_prev(w_ptr + 4 * T, tb)
                if tb == T - 1:
                    da1, dr, ga1_next, grho_next, gxx = _adjoint_p_step_tiles(
                        xb, sxn, sxd, isig, lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b, NR, w_ptr, T, tb,
                        slb, szb, zcb, gx_b, vd, vn, ns, vn + 3 * ns, gy_b, out_b, n_b, D, a1,
                        rho, 1.0, rho_p, 0, n_b, 0, D, vn + 7 * ns, vd + 7 * D, gplan_b,
                        HAS_P0, HAS_Q0, KV, QUAD, ADJ_FIRST, PLAN_GRAD, FUSE, DEFER, SCALED,
                        ZREBUILD, NMAJOR, False, BN, BD)
                else:
                    da1, dr, ga1_next, grho_next, gxx = _adjoint_p_step_tiles(
                        xb, sxn, sxd, isig, lp0_b, lq0_b, u_p0, u_q0, hd_b, hn_b, NR, w_ptr, T, tb,
                        slb, szb, zcb, gx_b, vd, vn, ns, vn + 3 * ns, gy_b, out_b, n_b, D, a1,
                        rho, 0.0, rho_p, 0, n_b, 0, D, vn + 7 * ns, vd + 7 * D, gplan_b,
                        HAS_P0, HAS_Q0, KV, QUAD, ADJ_S_STEP, PLAN_GRAD, FUSE, DEFER, SCALED,
                        ZREBUILD, NMAJOR, False, BN, BD)
                ga1 += da1
                grho += dr
                tl.debug_barrier()
                gwb = gw_ptr + (b.to(tl.int64) * T + tb) * 4
                tl.store(gwb + 0, gk2)
                tl.store(gwb + 1, gk3)
                tl.store(gwb + 2, ga1)
                tl.store(gwb + 3, grho)
            _init_adjoint_pass(slb, vd, vn, ns, gp0_ptr + b.to(tl.int64) * D, gq0_ptr + rs,
                               n_b, D, HAS_P0, HAS_Q0, PAPER, NMAJOR, BN, BD)
            if SCALED:
                gyy = _vec_dot(gy_ptr + b.to(tl.int64) * D, out_ptr + b.to(tl.int64) * D, D, BV)
                tl.store(ds_ptr + b, (gyy - gxx) * isig)
        else:          # an empty set's partials are 0 (gw comes unzeroed: no fill launch)
            _vec_fill(gw_ptr + b.to(tl.int64) * T * 4, 0.0, T * 4, BV)
        tl.debug_barrier()


@triton.jit
def _dkappa(alpha, w):
    """(∂κ/∂α, ∂κ/∂w) of κ = α/(α + w); both 0 for α = +inf (κ ≡ 1)."""
    inf = alpha == float("inf")
    s = tl.where(inf, 1.0, alpha + w)
    return tl.where(inf, 0.0, w / (s * s)), tl.where(inf, 0.0, -alpha / (s * s))


@triton.jit(do_not_specialize=["B"])
def badmm_dw_kernel(w_ptr, gw_ptr, gwt_ptr, dw_ptr, B, T, NPART, QUAD: tl.constexpr,
                    PAPER: tl.constexpr, BT: tl.constexpr, BI: tl.constexpr):
    """dw (6, T) from the per-set partials gw (B, T, 4) = ∂/∂(κ2, κ3, α1, ρ) - plus, from the
    split backward, NPART more partials of (α1, ρ) per set and iteration, gwt (B, T, NPART, 2)
    (its passes' per-program sums; NPART = 0: none) -: sums over sets and applies the chain
    rule of κ2 = κ(α2, w_P), κ3 = κ(α3, w) on chip (:func:`_iter_weights`). Rows A0 and TAU
    are 0. The sums take BI sets (or (set, part) pairs) per step: one set per step made a
    chain of B · (1 + NPART) dependent loads (97 µs at W1 on the H200, 1,150 steps)."""
    offs = tl.program_id(0) * BT + tl.arange(0, BT)                                      # [BT]
    m = offs < T
    rows = tl.arange(0, BI)                                                              # [BI]
    acc_k2 = tl.zeros([BI, BT], dtype=tl.float32)
    acc_k3 = tl.zeros([BI, BT], dtype=tl.float32)
    acc_a1 = tl.zeros([BI, BT], dtype=tl.float32)
    acc_rho = tl.zeros([BI, BT], dtype=tl.float32)
    for b0 in range(0, B, BI):
        b = b0 + rows
        mk = (b < B)[:, None] & m[None, :]
        g = gw_ptr + (b[:, None] * T + offs[None, :]) * 4                           # [BI, BT]
        acc_k2 += tl.load(g, mask=mk, other=0.0)
        acc_k3 += tl.load(g + 1, mask=mk, other=0.0)
        acc_a1 += tl.load(g + 2, mask=mk, other=0.0)
        acc_rho += tl.load(g + 3, mask=mk, other=0.0)
    for i0 in range(0, B * NPART, BI):       # the (set, part) pairs of gwt, BI at a time
        i = i0 + rows
        b = i // NPART
        mk = (i < B * NPART)[:, None] & m[None, :]
        g = gwt_ptr + ((b[:, None] * T + offs[None, :]) * NPART + (i - b * NPART)[:, None]) * 2
        acc_a1 += tl.load(g, mask=mk, other=0.0)
        acc_rho += tl.load(g + 1, mask=mk, other=0.0)
    gk2 = tl.sum(acc_k2, axis=0)                                                         # [BT]
    gk3 = tl.sum(acc_k3, axis=0)
    ga1 = tl.sum(acc_a1, axis=0)
    grho = tl.sum(acc_rho, axis=0)
    a1 = tl.load(w_ptr + 1 * T + offs, mask=m, other=1.0)
    a2 = tl.load(w_ptr + 2 * T + offs, mask=m, other=1.0)
    a3 = tl.load(w_ptr + 3 * T + offs, mask=m, other=1.0)
    rho = tl.load(w_ptr + 4 * T + offs, mask=m, other=1.0)
    d2a, d2w = _dkappa(a2, _step_weight(a1, rho, QUAD))
    if QUAD or PAPER:
        d3a, d3w = _dkappa(a3, _step_weight(a1, rho, QUAD))
        da1 = ga1
    else:
        d3a, d3w = _dkappa(a3, a1 + rho)
        da1 = ga1 + gk3 * d3w
    if QUAD == QUAD_EXACT:                        # κ2, κ3 of w_P = ρ + α1
        da1 = ga1 + gk2 * d2w + gk3 * d3w
    zero = tl.zeros([BT], dtype=tl.float32)
    tl.store(dw_ptr + 0 * T + offs, zero, mask=m)
    tl.store(dw_ptr + 1 * T + offs, da1, mask=m)
    tl.store(dw_ptr + 2 * T + offs, gk2 * d2a, mask=m)
    tl.store(dw_ptr + 3 * T + offs, gk3 * d3a, mask=m)
    tl.store(dw_ptr + 4 * T + offs, grho + gk2 * d2w + gk3 * d3w, mask=m)
    tl.store(dw_ptr + 5 * T + offs, zero, mask=m)
