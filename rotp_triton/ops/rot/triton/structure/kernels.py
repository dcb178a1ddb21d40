"""``@triton.jit`` kernels of ROT pooling with α0 > 0 (the structure term): the factors of
Σ1, Σ2 with the smaller Gram matrix, the factorized Σ1 M Σ2 and its adjoint as in-program
GEMM sequences, the fused B-ADMM P-/S-steps and the proximal Sinkhorn step (each with its
structure product as a prologue), their adjoints (the product's adjoint as an epilogue), and
the final pooling.

One program per set owns all D features of a [BN, BD] tile stream (the normalizations over d
and over n need no second launch). The one exception: with fewer sets than SMs the (n_b, D)
stage of the structure product's adjoint (independent row tiles) runs on several programs
per set, sigma_adjoint_rows_kernel, after the step adjoint kernel (ROWS_HERE=False) left the
(S, S) matrices in scratch. What each kernel reads and writes is in its docstring;
launchers: ``launch.py``; the adjoints' derivations: ../../../../../docs/adjoints.md.
Design: ../../../../../../shared/DESIGN.md §2, §3, §7.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..common import kappa as _kappa  # κ(α, w), 1 at α = inf

_TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(float32).tiny, as structure.py
_NEG_BIG = tl.constexpr(-1.0e30)  # finite "-inf" for running maxima: no (-inf) - (-inf)


# ============================================================================================
# the structure product Σ2 m Σ1 and its adjoint inside one program per set (issue #13): a
# sequence of small GEMMs through per-set scratch, a barrier between dependent ones, so the
# whole product is one launch (or a prologue / epilogue of a step kernel) instead of 3 + 9
# ============================================================================================
@triton.jit
def _load_operand(ptr, offs_r, s_r, r_ok, offs_c, s_c, c_ok, EXP: tl.constexpr):
    """A [len(offs_r), len(offs_c)] GEMM operand tile by strides; EXP: the operand holds a log
    (loaded as exp, entries outside as exp(-inf) = 0)."""
    msk = r_ok[:, None] & c_ok[None, :]
    off = offs_r[:, None] * s_r + offs_c[None, :] * s_c
    if EXP:
        v = tl.exp(tl.load(ptr + off, mask=msk, other=float("-inf")))
    else:
        v = tl.load(ptr + off, mask=msk, other=0.0)
    return v


@triton.jit
def _tile_dot(a, b, acc, PRECISION: tl.constexpr):
    if PRECISION == "bf16":   # bf16 tensor cores (bf16 inputs), fp32 accumulate
        acc += tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:                     # "ieee" (fp32 FMA) or "tf32" (tensor cores)
        acc += tl.dot(a, b, input_precision=PRECISION)
    return acc


@triton.jit
def _program_mm(a_ptr, sa_m, sa_k, b_ptr, sb_k, sb_n, c_ptr, sc_m, sc_n, e_ptr, M, N, K,
                EXP_A: tl.constexpr, EXP_B: tl.constexpr, MODE: tl.constexpr,
                PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr):
    """C (M×N) = A (M×K) @ B (K×N) by this program alone, [BM, BN] output tiles, K in BK steps.
    A is read ⌈N/BN⌉ times, B ⌈M/BM⌉ times: the callers make the tile wide (BW, up to 128)
    along the small side so that an (n_b, D) operand, and its exp, is read once.

    Operands by strides (a transpose is a stride swap); EXP_A / EXP_B: the operand holds a log
    (loaded as exp, entries past K as exp(-inf) = 0). MODE 0: C = AB; 1: C += AB;
    2: C += exp(E) ⊙ AB (E has C's strides: the chain rule through m = exp(log m)).
    PRECISION: "ieee" | "tf32" | "bf16" (operands rounded to bf16); fp32 accumulation.
    Writes only the logical M×N block.
    """
    _program_mm2(a_ptr, sa_m, sa_k, b_ptr, sb_k, sb_n, a_ptr, sa_m, sa_k, b_ptr, sb_k, sb_n,
                 c_ptr, sc_m, sc_n, e_ptr, M, N, K, EXP_A, EXP_B, False, False, False, False,
                 False, MODE, PRECISION, BM, BN, BK, 0, 1)


@triton.jit
def _program_mm2(a_ptr, sa_m, sa_k, b_ptr, sb_k, sb_n, a2_ptr, sa2_m, sa2_k, b2_ptr, sb2_k,
                 sb2_n, c_ptr, sc_m, sc_n, e_ptr, M, N, K, EXP_A: tl.constexpr,
                 EXP_B: tl.constexpr, EXP_A2: tl.constexpr, EXP_B2: tl.constexpr,
                 HAS2: tl.constexpr, SYM_A: tl.constexpr, SYM_B: tl.constexpr,
                 MODE: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, M_LO, M_STEP):
    """_program_mm with, when HAS2, a second product of the same shape in the same output
    tiles: C (+)= A B + A2 B2; SYM_A / SYM_B: A (resp. B) square, used as A + Aᵀ (B + Bᵀ).
    The adjoints' two contributions to one (n_b, D) gradient then read and write it once
    instead of twice. M_LO, M_STEP: this program computes the output row tiles M_LO,
    M_LO + M_STEP, ... (in tiles of BM rows) only: the other programs of a set do the rest
    (sigma_adjoint_rows_kernel); 0, 1: every tile."""
    for m0 in range(M_LO * BM, M, M_STEP * BM):
        offs_m = m0 + tl.arange(0, BM)
        m_ok = offs_m < M
        for n0 in range(0, N, BN):
            offs_n = n0 + tl.arange(0, BN)
            n_ok = offs_n < N
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            for k0 in range(0, K, BK):
                offs_k = k0 + tl.arange(0, BK)
                k_ok = offs_k < K
                a = _load_operand(a_ptr, offs_m, sa_m, m_ok, offs_k, sa_k, k_ok, EXP_A)
                if SYM_A:
                    a += _load_operand(a_ptr, offs_m, sa_k, m_ok, offs_k, sa_m, k_ok, EXP_A)
                bv = _load_operand(b_ptr, offs_k, sb_k, k_ok, offs_n, sb_n, n_ok, EXP_B)
                if SYM_B:
                    bv += _load_operand(b_ptr, offs_k, sb_n, k_ok, offs_n, sb_k, n_ok, EXP_B)
                acc = _tile_dot(a, bv, acc, PRECISION)                        # [BM, BN]
            if HAS2:   # its own K loop: one pair of operand tiles live at a time
                for k0 in range(0, K, BK):
                    offs_k = k0 + tl.arange(0, BK)
                    k_ok = offs_k < K
                    a2 = _load_operand(a2_ptr, offs_m, sa2_m, m_ok, offs_k, sa2_k, k_ok,
                                       EXP_A2)
                    b2 = _load_operand(b2_ptr, offs_k, sb2_k, k_ok, offs_n, sb2_n, n_ok,
                                       EXP_B2)
                    acc = _tile_dot(a2, b2, acc, PRECISION)
            c_off = offs_m[:, None] * sc_m + offs_n[None, :] * sc_n
            c_msk = m_ok[:, None] & n_ok[None, :]
            if MODE == 1:
                acc += tl.load(c_ptr + c_off, mask=c_msk, other=0.0)
            if MODE == 2:
                e = tl.exp(tl.load(e_ptr + c_off, mask=c_msk, other=float("-inf")))
                acc = tl.load(c_ptr + c_off, mask=c_msk, other=0.0) + e * acc
            tl.store(c_ptr + c_off, acc, mask=c_msk)


@triton.jit
def _row_tile(n0, n_b, row0, D, offs_d, d_ok, BN: tl.constexpr):
    """The rows n0 .. n0 + BN of a set in the row layout: (rows [BN], row mask [BN], tile mask
    [BN, BD], element offsets [BN, BD] of the set's (n_b, D) rows starting at row0)."""
    rows = n0 + tl.arange(0, BN)
    r_ok = rows < n_b
    return rows, r_ok, r_ok[:, None] & d_ok[None, :], (row0 + rows)[:, None] * D + offs_d[None, :]


@triton.jit
def _set_rows(bounds_ptr, b):
    """(first row, number of rows) of set b: rows bounds[b] .. bounds[b+1] - 1 of the caller's
    row layout (ragged: bounds = ptr; dense (B, N, D): bounds = N·arange(B + 1)). Loaded on
    the device: the host never reads a set's length."""
    row0 = tl.load(bounds_ptr + b)
    n_b = (tl.load(bounds_ptr + b + 1) - row0).to(tl.int32)
    return row0, n_b


@triton.jit
def _gram_block(b, rows0, gram_slot):
    """Offset of set b's (S, S) matrices in gram (one) and in a scratch of k of them (times k):
    b·gram_slot when the launcher gives every set a slot of gram_slot >= S² elements
    (launch.gram_slot: a dense batch's S², or D² for a ragged one where that is smaller), else
    its first row's offset rows0 = bounds[b]·D (room for S² <= n_b·D)."""
    if gram_slot > 0:
        g0 = b.to(tl.int64) * gram_slot
    else:
        g0 = rows0.to(tl.int64)
    return g0


@triton.jit
def _sigma_product(m_ptr, xc_ptr, xt_ptr, gram_ptr, s_ptr, out_ptr, n_b, D,
                   EXP_M: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr,
                   BW: tl.constexpr, BK: tl.constexpr):
    """out = Σ2 m Σ1 (paper Σ1 M Σ2) for one set; m, xc, xt, out: (n_b, D) rows of stride D
    (m a log when EXP_M). The Gram matrix's order is chosen per set from its length, S =
    min(n_b, D): Σ1 = xcᵀxc given when n_b >= D (out = xt ((xtᵀ m) Σ1)), else Σ2 = xt xtᵀ
    (out = (Σ2 (m xcᵀ)) xc). gram, and the two scratch matrices at s: (S, S) row-major."""
    S = tl.minimum(n_b, D)
    w_ptr = s_ptr
    v_ptr = s_ptr + S * S
    if n_b >= D:
        _program_mm(xt_ptr, 1, D, m_ptr, D, 1, w_ptr, S, 1, w_ptr, D, D, n_b,
                    False, EXP_M, 0, PRECISION, BW, BT, BK)                          # W = xtᵀ m
        tl.debug_barrier()
        _program_mm(w_ptr, S, 1, gram_ptr, S, 1, v_ptr, S, 1, v_ptr, D, D, D,
                    False, False, 0, PRECISION, BT, BT, BK)                          # V = W Σ1
        tl.debug_barrier()
        _program_mm(xt_ptr, D, 1, v_ptr, S, 1, out_ptr, D, 1, out_ptr, n_b, D, D,
                    False, False, 0, PRECISION, BT, BW, BK)                          # out = xt V
    else:
        _program_mm(m_ptr, D, 1, xc_ptr, 1, D, w_ptr, S, 1, w_ptr, n_b, n_b, D,
                    EXP_M, False, 0, PRECISION, BT, BW, BK)                          # U = m xcᵀ
        tl.debug_barrier()
        _program_mm(gram_ptr, S, 1, w_ptr, S, 1, v_ptr, S, 1, v_ptr, n_b, n_b, n_b,
                    False, False, 0, PRECISION, BT, BT, BK)                          # Q = Σ2 U
        tl.debug_barrier()
        _program_mm(v_ptr, S, 1, xc_ptr, D, 1, out_ptr, D, 1, out_ptr, n_b, D, n_b,
                    False, False, 0, PRECISION, BW, BT, BK)                          # out = Q xc
    tl.debug_barrier()   # out is read by other threads of this program next


@triton.jit
def _sigma_adjoint(m_ptr, g_ptr, xc_ptr, xt_ptr, gram_ptr, s_ptr, dxc_ptr, dxt_ptr, dm_ptr,
                   n_b, D, PRECISION: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr,
                   BK: tl.constexpr, ROWS_HERE: tl.constexpr):
    """Adjoint of out = Σ2 exp(m) Σ1 (m a log) for one set and upstream g (n_b, D):
    dm += exp(m) ⊙ Σ2 g Σ1 (Σ1, Σ2 symmetric), dxc += ∂/∂xc, dxt += ∂/∂xt (the Gram matrix
    differentiated through its factor). The order as in _sigma_product (S = min(n_b, D));
    s: 5 (S, S) scratch matrices at stride S·S. Two stages: the (S, S) products
    (_sigma_adjoint_small, reductions over the whole set) and the (n_b, D) outputs
    (_sigma_adjoint_rows, independent row tiles); ROWS_HERE: both in this program, else the
    second is left to sigma_adjoint_rows_kernel (several programs per set, its own launch).
    Derivation: ../../../../../docs/adjoints.md ("structure product")."""
    _sigma_adjoint_small(m_ptr, g_ptr, xc_ptr, xt_ptr, gram_ptr, s_ptr, n_b, D, PRECISION,
                         BT, BW, BK)
    if ROWS_HERE:
        _sigma_adjoint_rows(m_ptr, g_ptr, xc_ptr, xt_ptr, s_ptr, dxc_ptr, dxt_ptr, dm_ptr,
                            n_b, D, 0, 1, PRECISION, BT, BW, BK)
        tl.debug_barrier()


@triton.jit
def _sigma_adjoint_small(m_ptr, g_ptr, xc_ptr, xt_ptr, gram_ptr, s_ptr, n_b, D,
                         PRECISION: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr,
                         BK: tl.constexpr):
    """The (S, S) stage of _sigma_adjoint: n_b >= D: W = xtᵀ M, dV = xtᵀ g, V = W Σ1,
    dW = dV Σ1, dΣ1 = Wᵀ dV; else U = M xcᵀ, dQ = g xcᵀ, Q = Σ2 U, dU = Σ2 dQ, dΣ2 = dQ Uᵀ;
    into the scratch s (slots 0..4, stride S·S), which _sigma_adjoint_rows reads."""
    S = tl.minimum(n_b, D)
    SS = S * S
    if n_b >= D:
        # out = xt V, V = W Σ1, W = xtᵀ M
        w_ptr = s_ptr
        v_ptr = s_ptr + SS
        dv_ptr = s_ptr + 2 * SS
        dw_ptr = s_ptr + 3 * SS
        ds_ptr = s_ptr + 4 * SS
        _program_mm(xt_ptr, 1, D, m_ptr, D, 1, w_ptr, S, 1, w_ptr, D, D, n_b,
                    False, True, 0, PRECISION, BW, BT, BK)                           # W = xtᵀ M
        _program_mm(xt_ptr, 1, D, g_ptr, D, 1, dv_ptr, S, 1, dv_ptr, D, D, n_b,
                    False, False, 0, PRECISION, BW, BT, BK)                          # dV = xtᵀ g
        tl.debug_barrier()
        _program_mm(w_ptr, S, 1, gram_ptr, S, 1, v_ptr, S, 1, v_ptr, D, D, D,
                    False, False, 0, PRECISION, BT, BT, BK)                          # V = W Σ1
        _program_mm(dv_ptr, S, 1, gram_ptr, S, 1, dw_ptr, S, 1, dw_ptr, D, D, D,
                    False, False, 0, PRECISION, BT, BT, BK)                          # dW = dV Σ1
        _program_mm(w_ptr, 1, S, dv_ptr, S, 1, ds_ptr, S, 1, ds_ptr, D, D, D,
                    False, False, 0, PRECISION, BT, BT, BK)                          # dΣ1 = Wᵀ dV
    else:
        # out = Q xc, Q = Σ2 U, U = M xcᵀ
        u_ptr = s_ptr
        q_ptr = s_ptr + SS
        dq_ptr = s_ptr + 2 * SS
        du_ptr = s_ptr + 3 * SS
        ds_ptr = s_ptr + 4 * SS
        _program_mm(m_ptr, D, 1, xc_ptr, 1, D, u_ptr, S, 1, u_ptr, n_b, n_b, D,
                    True, False, 0, PRECISION, BT, BW, BK)                           # U = M xcᵀ
        _program_mm(g_ptr, D, 1, xc_ptr, 1, D, dq_ptr, S, 1, dq_ptr, n_b, n_b, D,
                    False, False, 0, PRECISION, BT, BW, BK)                          # dQ = g xcᵀ
        tl.debug_barrier()
        _program_mm(gram_ptr, S, 1, u_ptr, S, 1, q_ptr, S, 1, q_ptr, n_b, n_b, n_b,
                    False, False, 0, PRECISION, BT, BT, BK)                          # Q = Σ2 U
        _program_mm(gram_ptr, S, 1, dq_ptr, S, 1, du_ptr, S, 1, du_ptr, n_b, n_b, n_b,
                    False, False, 0, PRECISION, BT, BT, BK)                          # dU = Σ2 dQ
        _program_mm(dq_ptr, S, 1, u_ptr, 1, S, ds_ptr, S, 1, ds_ptr, n_b, n_b, n_b,
                    False, False, 0, PRECISION, BT, BT, BK)                          # dΣ2 = dQ Uᵀ
    tl.debug_barrier()   # the rows stage reads these (S, S) matrices from every thread


@triton.jit
def _sigma_adjoint_rows(m_ptr, g_ptr, xc_ptr, xt_ptr, s_ptr, dxc_ptr, dxt_ptr, dm_ptr, n_b, D,
                        j, J, PRECISION: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr,
                        BK: tl.constexpr):
    """The (n_b, D) stage of _sigma_adjoint, from the (S, S) matrices of _sigma_adjoint_small
    in s: dxt, dxc, dm += their terms, output row tiles j, j + J, ... only (each tile reads
    the (S, S) matrices and its own rows of g, M, xc, xt; the tiles of one set are
    independent, so J programs share a set with no combine)."""
    S = tl.minimum(n_b, D)
    SS = S * S
    if n_b >= D:
        v_ptr = s_ptr + SS
        dw_ptr = s_ptr + 3 * SS
        ds_ptr = s_ptr + 4 * SS
        _program_mm2(g_ptr, D, 1, v_ptr, 1, S, m_ptr, D, 1, dw_ptr, 1, S, dxt_ptr, D, 1,
                     dxt_ptr, n_b, D, D, False, False, True, False, True, False, False, 1,
                     PRECISION, BT, BW, BK, j, J)                     # dxt += g Vᵀ + M dWᵀ
        _program_mm2(xc_ptr, D, 1, ds_ptr, S, 1, xc_ptr, D, 1, ds_ptr, S, 1, dxc_ptr, D, 1,
                     dxc_ptr, n_b, D, D, False, False, False, False, False, False, True, 1,
                     PRECISION, BT, BW, BK, j, J)                     # dxc += xc (dΣ1 + dΣ1ᵀ)
        _program_mm2(xt_ptr, D, 1, dw_ptr, S, 1, xt_ptr, D, 1, dw_ptr, S, 1, dm_ptr, D, 1,
                     m_ptr, n_b, D, D, False, False, False, False, False, False, False, 2,
                     PRECISION, BT, BW, BK, j, J)                     # dm += M ⊙ xt dW
    else:
        q_ptr = s_ptr + SS
        du_ptr = s_ptr + 3 * SS
        ds_ptr = s_ptr + 4 * SS
        _program_mm2(q_ptr, 1, S, g_ptr, D, 1, du_ptr, 1, S, m_ptr, D, 1, dxc_ptr, D, 1,
                     dxc_ptr, n_b, D, n_b, False, False, False, True, True, False, False, 1,
                     PRECISION, BW, BT, BK, j, J)                     # dxc += Qᵀ g + dUᵀ M
        _program_mm2(ds_ptr, S, 1, xt_ptr, D, 1, ds_ptr, S, 1, xt_ptr, D, 1, dxt_ptr, D, 1,
                     dxt_ptr, n_b, D, n_b, False, False, False, False, False, True, False, 1,
                     PRECISION, BW, BT, BK, j, J)                     # dxt += (dΣ2 + dΣ2ᵀ) xt
        _program_mm2(du_ptr, S, 1, xc_ptr, D, 1, du_ptr, S, 1, xc_ptr, D, 1, dm_ptr, D, 1,
                     m_ptr, n_b, D, n_b, False, False, False, False, False, False, False, 2,
                     PRECISION, BW, BT, BK, j, J)                     # dm += M ⊙ dU xc


@triton.jit
def sigma_product_kernel(m_ptr, xc_ptr, xt_ptr, gram_ptr, scratch_ptr, gram_slot, out_ptr,
                         bounds_ptr, D,
                         EXP_M: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr,
                   BW: tl.constexpr, BK: tl.constexpr):
    """out = Σ2 m Σ1 for every set, one program per set (see _sigma_product).
    m, xc, xt, out: (R, D) rows; gram: one (S, S) matrix per set and scratch two, set b's at
    _gram_block (resp. twice it)."""
    b = tl.program_id(0)
    row0, n_b = _set_rows(bounds_ptr, b)
    rows0 = row0 * D
    g0 = _gram_block(b, rows0, gram_slot)
    _sigma_product(m_ptr + rows0, xc_ptr + rows0, xt_ptr + rows0, gram_ptr + g0,
                   scratch_ptr + 2 * g0, out_ptr + rows0, n_b, D, EXP_M, PRECISION, BT, BW, BK)


@triton.jit
def sigma_adjoint_kernel(m_ptr, g_ptr, xc_ptr, xt_ptr, gram_ptr, scratch_ptr, gram_slot,
                         dxc_ptr, dxt_ptr, dm_ptr, bounds_ptr, D, PRECISION: tl.constexpr,
                         BT: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr,
                         ROWS_HERE: tl.constexpr):
    """The adjoint of Σ2 exp(m) Σ1 for every set, one program per set (see _sigma_adjoint;
    ROWS_HERE=False: its (n_b, D) stage left to sigma_adjoint_rows_kernel).
    m (log), g, xc, xt, dxc, dxt, dm: (R, D) rows; gram, scratch: 1 and 5 (S, S) matrices per
    set (_gram_block)."""
    b = tl.program_id(0)
    row0, n_b = _set_rows(bounds_ptr, b)
    rows0 = row0 * D
    g0 = _gram_block(b, rows0, gram_slot)
    _sigma_adjoint(m_ptr + rows0, g_ptr + rows0, xc_ptr + rows0, xt_ptr + rows0,
                   gram_ptr + g0, scratch_ptr + 5 * g0, dxc_ptr + rows0,
                   dxt_ptr + rows0, dm_ptr + rows0, n_b, D, PRECISION, BT, BW, BK,
                   ROWS_HERE)


@triton.jit
def sigma_adjoint_rows_kernel(m_ptr, g_ptr, xc_ptr, xt_ptr, scratch_ptr, gram_slot, dxc_ptr,
                              dxt_ptr, dm_ptr, bounds_ptr, D, PRECISION: tl.constexpr,
                              BT: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr):
    """The (n_b, D) stage of the structure product's adjoint (_sigma_adjoint_rows) after a
    step adjoint kernel launched with ROWS_HERE=False left its (S, S) matrices in scratch
    (5 per set, _gram_block): grid (B, J), program (b, j) adds the output row tiles j, j + J,
    ... of set b to dxt, dxc and dm (all (R, D) rows). J programs per set where one per set
    would leave SMs idle (W1: 50 sets, 132 SMs); no program waits for another."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    J = tl.num_programs(1)
    row0, n_b = _set_rows(bounds_ptr, b)
    rows0 = row0 * D
    g0 = _gram_block(b, rows0, gram_slot)
    _sigma_adjoint_rows(m_ptr + rows0, g_ptr + rows0, xc_ptr + rows0, xt_ptr + rows0,
                        scratch_ptr + 5 * g0, dxc_ptr + rows0, dxt_ptr + rows0,
                        dm_ptr + rows0, n_b, D, j, J, PRECISION, BT, BW, BK)


@triton.jit
def structure_factors_kernel(x_ptr, bounds_ptr, log_p0_ptr, log_q0_ptr, x32_ptr, xc_ptr,
                             xt_ptr, gram_ptr, gram_slot, lq0_ptr, log_s0_ptr, s_xb, s_xn, s_xd,
                             D, log_p_T_ptr, gy_ptr, gplan_ptr, g_lp_T_ptr, g_x_ptr,
                             DENSE_X: tl.constexpr, WRITE_X32: tl.constexpr,
                             HAS_Q0: tl.constexpr,
                             PRECISION: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr,
                             BK: tl.constexpr,
                             BN: tl.constexpr,
                             BD: tl.constexpr, POOL_BWD: tl.constexpr,
                             HAS_GPLAN: tl.constexpr):
    """One program per set: the fp32 copy of x (WRITE_X32; else x32 is x itself, fp32 and
    contiguous), the normalized factors, the smaller Gram matrix (order as in _sigma_product)
    and the initial state, all in the row layout.
    POOL_BWD (the backward's call): then the pooling's adjoint from x32 (_pool_bwd_set):
    g_lp_T = ∂L/∂log P_T, g_x += the pooling's ∂L/∂x, from log_p_T, gy (B, D) and gplan
    (HAS_GPLAN) (all (R, D) but gy).

    x: caller's tensor, row n of set b at b*s_xb + n*s_xn (DENSE_X) or (bounds[b] + n)*s_xn,
    feature d at d*s_xd. x32, xc, xt, log_s0: (R, D) fp32; gram: set b's (S, S) at
    _gram_block. xc = (x - μ1) / sqrt(n_b · max diag Σ1),
    xt = (x - μ2) / sqrt(D · max diag Σ2).
    lq0 (R,): log q0 as fp32 (HAS_Q0: read from log_q0 (R,); else uniform, -log n_b);
    log_s0 = log p0 (B, D) + log q0: log(p0 q0ᵀ), the state before iteration 0.
    """
    b = tl.program_id(0)
    row0, n_b = _set_rows(bounds_ptr, b)
    if DENSE_X:
        x_set = x_ptr + b.to(tl.int64) * s_xb
    else:
        x_set = x_ptr + row0 * s_xn
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    nf = tl.maximum(n_b, 1).to(tl.float32)
    # pass 1: μ1 (mean over samples, per feature)
    col = tl.zeros([BD], dtype=tl.float32)
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        msk = (rows < n_b)[:, None] & d_ok[None, :]
        xv = tl.load(x_set + rows[:, None] * s_xn + offs_d[None, :] * s_xd,
                     mask=msk, other=0.0).to(tl.float32)                      # [BN, BD]
        col += tl.sum(xv, 0)
    mu1 = col / nf
    # pass 2: diagonals of Σ1 (per feature) and Σ2 (per sample); write the fp32 copy
    var1 = tl.zeros([BD], dtype=tl.float32)
    max2 = tl.zeros([BN], dtype=tl.float32)
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        r_ok = rows < n_b
        msk = r_ok[:, None] & d_ok[None, :]
        xv = tl.load(x_set + rows[:, None] * s_xn + offs_d[None, :] * s_xd,
                     mask=msk, other=0.0).to(tl.float32)
        if WRITE_X32:
            tl.store(x32_ptr + (row0 + rows)[:, None] * D + offs_d[None, :], xv, mask=msk)
        xc = tl.where(msk, xv - mu1[None, :], 0.0)
        var1 += tl.sum(xc * xc, 0)
        mu2 = tl.sum(xv, 1) / D                                                # [BN]
        xt = tl.where(msk, xv - mu2[:, None], 0.0)
        max2 = tl.maximum(max2, tl.where(r_ok, tl.sum(xt * xt, 1) / D, 0.0))
    s1 = tl.maximum(tl.max(tl.where(d_ok, var1 / nf, 0.0), 0), _TINY)
    s2 = tl.maximum(tl.max(max2, 0), _TINY)
    c1 = 1.0 / tl.sqrt(nf * s1)
    c2 = 1.0 / tl.sqrt(D * s2)
    lp0 = tl.load(log_p0_ptr + b * D + offs_d, mask=d_ok, other=0.0)
    # pass 3: the factors and the initial state
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        r_ok = rows < n_b
        msk = r_ok[:, None] & d_ok[None, :]
        xv = tl.load(x_set + rows[:, None] * s_xn + offs_d[None, :] * s_xd,
                     mask=msk, other=0.0).to(tl.float32)
        mu2 = tl.sum(xv, 1) / D
        off = (row0 + rows)[:, None] * D + offs_d[None, :]
        tl.store(xc_ptr + off, (xv - mu1[None, :]) * c1, mask=msk)
        tl.store(xt_ptr + off, (xv - mu2[:, None]) * c2, mask=msk)
        if HAS_Q0:
            lq0 = tl.load(log_q0_ptr + row0 + rows, mask=r_ok, other=0.0).to(tl.float32)
        else:
            lq0 = tl.zeros([BN], dtype=tl.float32) - tl.log(nf)
        tl.store(lq0_ptr + row0 + rows, lq0, mask=r_ok)
        tl.store(log_s0_ptr + off, lq0[:, None] + lp0[None, :], mask=msk)
    tl.debug_barrier()   # the Gram matrix reads factor rows written by other threads
    rows0 = row0 * D
    g0 = _gram_block(b, rows0, gram_slot)
    S = tl.minimum(n_b, D)
    if n_b >= D:   # Σ1 = xcᵀ xc
        _program_mm(xc_ptr + rows0, 1, D, xc_ptr + rows0, D, 1, gram_ptr + g0, S, 1,
                    gram_ptr + g0, D, D, n_b, False, False, 0, PRECISION, BW, BT, BK)
    else:          # Σ2 = xt xtᵀ
        _program_mm(xt_ptr + rows0, D, 1, xt_ptr + rows0, 1, D, gram_ptr + g0, S, 1,
                    gram_ptr + g0, n_b, n_b, D, False, False, 0, PRECISION, BT, BW, BK)
    if POOL_BWD:   # x32's rows are visible to every thread since the barrier above
        _pool_bwd_set(log_p_T_ptr, x32_ptr, gy_ptr, gplan_ptr, g_lp_T_ptr, g_x_ptr, b, row0,
                      n_b, D, HAS_GPLAN, BN, BD)


@triton.jit
def structure_factors_bwd_kernel(x32_ptr, g_xc_ptr, g_xt_ptr, g_x_ptr, bounds_ptr, D,
                                 BN: tl.constexpr, BD: tl.constexpr):
    """Adjoint of structure_factors_kernel's factors, one program per set: g_x += ∂L/∂x from
    g_xc = ∂L/∂xc, g_xt = ∂L/∂xt (all (R, D)), through the centring and the normalization by
    the largest diagonal entry (its gradient split evenly between ties, as torch's amax).
    xc = xc0 c1, xc0 = x - μ1, c1 = (n s1)^-1/2, s1 = max(max_d Σ_n xc0²/n, tiny); xt likewise
    over d with D. Four passes over the set's rows."""
    b = tl.program_id(0)
    row0, n_b = _set_rows(bounds_ptr, b)
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    nf = tl.maximum(n_b, 1).to(tl.float32)
    zero_n = tl.zeros([BN], dtype=tl.float32)
    # pass 1: μ1
    col = tl.zeros([BD], dtype=tl.float32)
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        msk = (rows < n_b)[:, None] & d_ok[None, :]
        col += tl.sum(tl.load(x32_ptr + (row0 + rows)[:, None] * D + offs_d[None, :],
                              mask=msk, other=0.0), 0)
    mu1 = col / nf
    # pass 2: diag Σ1 (per feature), max diag Σ2, and ∂L/∂c1, ∂L/∂c2 (up to the factor)
    var1 = tl.zeros([BD], dtype=tl.float32)
    max2 = tl.sum(zero_n, 0)
    g_c1 = tl.sum(zero_n, 0)
    g_c2 = tl.sum(zero_n, 0)
    for n0 in range(0, n_b, BN):
        rows, r_ok, msk, off = _row_tile(n0, n_b, row0, D, offs_d, d_ok, BN)
        xv = tl.load(x32_ptr + off, mask=msk, other=0.0)
        xc0 = tl.where(msk, xv - mu1[None, :], 0.0)                             # [BN, BD]
        xt0 = tl.where(msk, xv - (tl.sum(xv, 1) / D)[:, None], 0.0)
        var1 += tl.sum(xc0 * xc0, 0)
        max2 = tl.maximum(max2, tl.max(tl.where(r_ok, tl.sum(xt0 * xt0, 1) / D, 0.0), 0))
        g_c1 += tl.sum(tl.load(g_xc_ptr + off, mask=msk, other=0.0) * xc0)
        g_c2 += tl.sum(tl.load(g_xt_ptr + off, mask=msk, other=0.0) * xt0)
    diag1 = tl.where(d_ok, var1 / nf, 0.0)
    s1r = tl.max(diag1, 0)
    s1 = tl.maximum(s1r, _TINY)
    c1 = 1.0 / tl.sqrt(nf * s1)
    g_s1 = tl.where(s1r >= _TINY, g_c1 * -0.5 * c1 / s1, 0.0)
    hit1 = tl.where(d_ok & (diag1 == s1r), 1.0, 0.0)
    g_d1 = g_s1 * hit1 / tl.sum(hit1, 0)                                       # [BD]
    s2 = tl.maximum(max2, _TINY)
    c2 = 1.0 / tl.sqrt(D * s2)
    g_s2 = tl.where(max2 >= _TINY, g_c2 * -0.5 * c2 / s2, 0.0)
    # pass 3: the ties of max diag Σ2 and Σ_n ∂L/∂xc0 (the centring's adjoint)
    n_hit2 = tl.sum(zero_n, 0)
    g0_col = tl.zeros([BD], dtype=tl.float32)
    for n0 in range(0, n_b, BN):
        rows, r_ok, msk, off = _row_tile(n0, n_b, row0, D, offs_d, d_ok, BN)
        xv = tl.load(x32_ptr + off, mask=msk, other=0.0)
        xc0 = tl.where(msk, xv - mu1[None, :], 0.0)
        xt0 = tl.where(msk, xv - (tl.sum(xv, 1) / D)[:, None], 0.0)
        n_hit2 += tl.sum(tl.where(r_ok & (tl.sum(xt0 * xt0, 1) / D == max2), 1.0, 0.0), 0)
        g0 = tl.load(g_xc_ptr + off, mask=msk, other=0.0) * c1 + g_d1[None, :] * 2.0 * xc0 / nf
        g0_col += tl.sum(g0, 0)
    # pass 4: g_x += g0 - mean_n g0 + h0 - mean_d h0 (h0: the xt branch)
    for n0 in range(0, n_b, BN):
        rows, r_ok, msk, off = _row_tile(n0, n_b, row0, D, offs_d, d_ok, BN)
        xv = tl.load(x32_ptr + off, mask=msk, other=0.0)
        xc0 = tl.where(msk, xv - mu1[None, :], 0.0)
        xt0 = tl.where(msk, xv - (tl.sum(xv, 1) / D)[:, None], 0.0)
        g0 = tl.load(g_xc_ptr + off, mask=msk, other=0.0) * c1 + g_d1[None, :] * 2.0 * xc0 / nf
        hit2 = tl.where(r_ok & (tl.sum(xt0 * xt0, 1) / D == max2), 1.0, 0.0)   # [BN]
        h0 = tl.load(g_xt_ptr + off, mask=msk, other=0.0) * c2 \
            + (g_s2 * hit2 / n_hit2)[:, None] * 2.0 * xt0 / D
        h0 = tl.where(msk, h0, 0.0)
        gx = g0 - g0_col[None, :] / nf + h0 - (tl.sum(h0, 1) / D)[:, None]
        tl.store(g_x_ptr + off, tl.load(g_x_ptr + off, mask=msk, other=0.0) + gx, mask=msk)


@triton.jit
def _p_step_weight(a1, rho, QUADRATIC: tl.constexpr, PAPER: tl.constexpr):
    """Step weight w of the B-ADMM P-step (Y = log S + G/w): ρ, except B-Q exact: ρ + α1, the
    majorized linearisation of reference/rot.py ``_exact_badmm`` (non-expansive for every α1/ρ)."""
    if QUADRATIC:
        if PAPER:
            w = rho
        else:
            w = rho + a1
    else:
        w = rho
    return w


@triton.jit
def _s_step_weight(a1, rho, QUADRATIC: tl.constexpr, PAPER: tl.constexpr):
    """Step weight w of the B-ADMM S-step: α1 + ρ (B-E; B-Q exact, majorized as in the P-step),
    ρ for B-Q paper (eq. (24) as printed)."""
    if QUADRATIC:
        if PAPER:
            w = rho
        else:
            w = rho + a1
    else:
        w = a1 + rho
    return w


@triton.jit(do_not_specialize=["t", "SAVE"])
def badmm_p_step_kernel(x_ptr, log_s_ptr, z_ptr, sig_ptr, log_p_ptr, log_p0_ptr, log_mu_ptr,
                        r_out_ptr, mu_out_ptr, bounds_ptr, a0_ptr, a1_ptr, a2_ptr, rho_ptr, t,
                        D, xc_ptr, xt_ptr, gram_ptr, scratch_ptr, gram_slot,
                        PRECISION: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr,
                        BK: tl.constexpr,
                        SAVE, QUADRATIC: tl.constexpr, PAPER: tl.constexpr,
                        BN: tl.constexpr, BD: tl.constexpr):
    """P-step of B-E/B-Q, one program per set (all D features).

    G = x + α0 Σ(S) - Z [- α1 S];  Y = log S + G/w;  R = LSE_n Y;
    exact: log μ = lognorm(κ2 log p0 + (1-κ2) R), κ2 = κ(α2, w);  paper: log μ is the state;
    log P = Y + (log μ - R).  w = ρ, except B-Q exact: w = ρ + α1 (the stable majorized step,
    reference/rot.py ``_exact_badmm``).   sig = Σ(S) (R, D); log_mu (B, D) (paper only).
    SAVE (a runtime int, 0 or 1, not a constexpr: the forward's and the backward's re-runs
    share one binary; not a bool, which triton 3.6's interpreter cannot pass): also write R and
    log μ to r_out, mu_out (B, D) for the backward.
    """
    b = tl.program_id(0)
    row0, n_b = _set_rows(bounds_ptr, b)
    # the structure product of this iteration, Σ2 exp(log_s) Σ1 -> sig, in this program
    rows0 = row0 * D
    g0 = _gram_block(b, rows0, gram_slot)
    _sigma_product(log_s_ptr + rows0, xc_ptr + rows0, xt_ptr + rows0, gram_ptr + g0,
                   scratch_ptr + 2 * g0, sig_ptr + rows0, n_b, D, True,
                   PRECISION, BT, BW, BK)
    a0 = tl.load(a0_ptr + t)
    a1 = tl.load(a1_ptr + t)
    w = _p_step_weight(a1, tl.load(rho_ptr + t), QUADRATIC, PAPER)
    inv_w = 1.0 / w
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    m = tl.full([BD], _NEG_BIG, dtype=tl.float32)
    l = tl.zeros([BD], dtype=tl.float32)
    # pass 1: R = LSE over samples of Y (online, per feature)
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        msk = (rows < n_b)[:, None] & d_ok[None, :]
        off = (row0 + rows)[:, None] * D + offs_d[None, :]
        ls = tl.load(log_s_ptr + off, mask=msk, other=0.0)
        g = tl.load(x_ptr + off, mask=msk, other=0.0) - tl.load(z_ptr + off, mask=msk, other=0.0)
        g += a0 * tl.load(sig_ptr + off, mask=msk, other=0.0)
        if QUADRATIC:
            g -= a1 * tl.exp(ls)
        y = tl.where(msk, ls + g * inv_w, float("-inf"))                        # [BN, BD]
        tl.store(log_p_ptr + off, y, mask=msk)      # Y parked in log P for pass 2
        m_new = tl.maximum(m, tl.max(y, 0))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(y - m_new[None, :]), 0)
        m = m_new
    # [BD]; an empty set has no samples: R = 0 keeps its per-set vectors finite
    r = tl.where(n_b > 0, m + tl.log(l), 0.0)
    if PAPER:
        log_mu = tl.load(log_mu_ptr + b * D + offs_d, mask=d_ok, other=0.0)
    else:
        k2 = _kappa(tl.load(a2_ptr + t), w)
        v = k2 * tl.load(log_p0_ptr + b * D + offs_d, mask=d_ok, other=0.0) + (1 - k2) * r
        v = tl.where(d_ok, v, float("-inf"))
        vm = tl.max(v, 0)
        log_mu = v - (vm + tl.log(tl.sum(tl.exp(v - vm), 0)))
    shift = log_mu - r
    if SAVE:
        tl.store(r_out_ptr + b * D + offs_d, r, mask=d_ok)
        tl.store(mu_out_ptr + b * D + offs_d, log_mu, mask=d_ok)
    # pass 2: log P = Y + log μ - R
    tl.debug_barrier()   # Y rows were parked by other threads of this program
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        msk = (rows < n_b)[:, None] & d_ok[None, :]
        off = (row0 + rows)[:, None] * D + offs_d[None, :]
        y = tl.load(log_p_ptr + off, mask=msk, other=0.0)
        tl.store(log_p_ptr + off, y + shift[None, :], mask=msk)


@triton.jit(do_not_specialize=["t", "SAVE"])
def badmm_s_step_kernel(log_p_ptr, z_ptr, sig_ptr, log_s_ptr, c_ptr, log_q0_ptr, log_eta_ptr,
                        z2_ptr, log_p0_ptr, log_mu_ptr, z1_ptr, eta_out_ptr, bounds_ptr,
                        a0_ptr, a1_ptr, a2_ptr, a3_ptr, rho_ptr, t, D,
                        xc_ptr, xt_ptr, gram_ptr, scratch_ptr, gram_slot,
                        PRECISION: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr,
                        BK: tl.constexpr, SAVE,
                        QUADRATIC: tl.constexpr, PAPER: tl.constexpr,
                        BN: tl.constexpr, BD: tl.constexpr):
    """S-step and dual update of B-E/B-Q, one program per set.

    H = Z + α0 Σ(P);  B-E: Y = (H + ρ log P)/w;  B-Q: Y = log P + (H - α1 P)/w;  w = α1 + ρ
    (B-Q paper: w = ρ);
    C = LSE_d Y;  exact: log η = lognorm_n(κ3 log q0 + (1-κ3) C), κ3 = κ(α3, w);
    paper: log η is the state;
    log S = Y + log η - C;  Z += ρ (P - S).
    Paper only, eqs. (26)-(28): log μ, log η, z1 (B, D), z2 (R,) updated in place.
    c: (R,) scratch for C.  Y is parked in log_s between the two passes.
    SAVE (a runtime flag, as the P-step's): also write log η to eta_out (R,) for the backward
    (C stays in c).
    """
    b = tl.program_id(0)
    row0, n_b = _set_rows(bounds_ptr, b)
    # the structure product of this iteration, Σ2 exp(log_p) Σ1 -> sig, in this program
    rows0 = row0 * D
    g0 = _gram_block(b, rows0, gram_slot)
    _sigma_product(log_p_ptr + rows0, xc_ptr + rows0, xt_ptr + rows0, gram_ptr + g0,
                   scratch_ptr + 2 * g0, sig_ptr + rows0, n_b, D, True,
                   PRECISION, BT, BW, BK)
    a0 = tl.load(a0_ptr + t)
    a1 = tl.load(a1_ptr + t)
    rho = tl.load(rho_ptr + t)
    w = _s_step_weight(a1, rho, QUADRATIC, PAPER)
    inv_w = 1.0 / w
    if PAPER:
        k3 = _kappa(tl.load(a3_ptr + t), rho)
    else:
        k3 = _kappa(tl.load(a3_ptr + t), w)
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    # pass 1: Y, C_n; the LSE over n of the η logits (running scalar max/sum)
    vm = tl.max(tl.full([BN], _NEG_BIG, dtype=tl.float32), 0)
    vl = tl.sum(tl.zeros([BN], dtype=tl.float32), 0)
    for n0 in range(0, n_b, BN):
        rows, r_ok, msk, off = _row_tile(n0, n_b, row0, D, offs_d, d_ok, BN)
        lp = tl.load(log_p_ptr + off, mask=msk, other=0.0)
        h = tl.load(z_ptr + off, mask=msk, other=0.0) + a0 * tl.load(sig_ptr + off, mask=msk,
                                                                     other=0.0)
        if QUADRATIC:
            y = lp + (h - a1 * tl.exp(lp)) * inv_w
        else:
            y = (h + rho * lp) * inv_w
        y = tl.where(msk, y, float("-inf"))                                     # [BN, BD]
        ym = tl.max(y, 1)
        c = ym + tl.log(tl.sum(tl.exp(y - ym[:, None]), 1))                     # [BN]
        tl.store(log_s_ptr + off, y, mask=msk)
        tl.store(c_ptr + row0 + rows, c, mask=r_ok)
        lq0 = tl.load(log_q0_ptr + row0 + rows, mask=r_ok, other=0.0)
        if PAPER:   # logits of the new log η, eq. (27), from the state before this update
            le = tl.load(log_eta_ptr + row0 + rows, mask=r_ok, other=0.0)
            z2 = tl.load(z2_ptr + row0 + rows, mask=r_ok, other=0.0)
            v = (1 - k3) * (le - z2 / rho) + k3 * lq0
        else:
            v = k3 * lq0 + (1 - k3) * c
        v = tl.where(r_ok, v, float("-inf"))
        vm_new = tl.maximum(vm, tl.max(v, 0))
        vl = vl * tl.exp(vm - vm_new) + tl.sum(tl.exp(v - vm_new), 0)
        vm = vm_new
    v_lse = vm + tl.log(vl)
    tl.debug_barrier()   # pass 2 reads what other threads of this program wrote in pass 1
    colsum_p = tl.zeros([BD], dtype=tl.float32)
    for n0 in range(0, n_b, BN):
        rows, r_ok, msk, off = _row_tile(n0, n_b, row0, D, offs_d, d_ok, BN)
        y = tl.load(log_s_ptr + off, mask=msk, other=0.0)
        c = tl.load(c_ptr + row0 + rows, mask=r_ok, other=0.0)
        lq0 = tl.load(log_q0_ptr + row0 + rows, mask=r_ok, other=0.0)
        if PAPER:
            le = tl.load(log_eta_ptr + row0 + rows, mask=r_ok, other=0.0)
        else:
            le = k3 * lq0 + (1 - k3) * c - v_lse
        ls = y + (le - c)[:, None]
        p = tl.where(msk, tl.exp(tl.load(log_p_ptr + off, mask=msk, other=0.0)), 0.0)
        s = tl.where(msk, tl.exp(ls), 0.0)
        zz = tl.load(z_ptr + off, mask=msk, other=0.0) + rho * (p - s)
        tl.store(log_s_ptr + off, ls, mask=msk)
        if SAVE:
            tl.store(eta_out_ptr + row0 + rows, le, mask=r_ok)
        tl.store(z_ptr + off, zz, mask=msk)
        if PAPER:
            z2 = tl.load(z2_ptr + row0 + rows, mask=r_ok, other=0.0)
            le_new = (1 - k3) * (le - z2 / rho) + k3 * lq0 - v_lse
            z2 = z2 + rho * (tl.exp(le_new) - tl.sum(s, 1))
            tl.debug_barrier()   # every warp has read this chunk's old log η, z2
            tl.store(log_eta_ptr + row0 + rows, le_new, mask=r_ok)
            tl.store(z2_ptr + row0 + rows, z2, mask=r_ok)
            colsum_p += tl.sum(p, 0)
    if PAPER:   # eq. (26) and the z1 update
        k2 = _kappa(tl.load(a2_ptr + t), rho)
        lmu = tl.load(log_mu_ptr + b * D + offs_d, mask=d_ok, other=0.0)
        z1 = tl.load(z1_ptr + b * D + offs_d, mask=d_ok, other=0.0)
        u = (1 - k2) * (lmu - z1 / rho) + k2 * tl.load(log_p0_ptr + b * D + offs_d, mask=d_ok,
                                                         other=0.0)
        u = tl.where(d_ok, u, float("-inf"))
        um = tl.max(u, 0)
        lmu = u - (um + tl.log(tl.sum(tl.exp(u - um), 0)))
        z1 = z1 + rho * (tl.exp(lmu) - colsum_p)
        tl.store(log_mu_ptr + b * D + offs_d, lmu, mask=d_ok)
        tl.store(z1_ptr + b * D + offs_d, z1, mask=d_ok)


@triton.jit(do_not_specialize=["t"])
def sinkhorn_prox_step_kernel(x_ptr, log_p_ptr, sig_ptr, y0_ptr, bvec_ptr, c_ptr, log_p0_ptr,
                              log_q0_ptr, hist_r_ptr, hist_a_ptr, hist_c_ptr, hist_b_ptr,
                              bounds_ptr, a0_ptr, a1_ptr, a2_ptr, a3_ptr, tau_ptr, t,
                              K, n_rows, D, xc_ptr, xt_ptr, gram_ptr, scratch_ptr, gram_slot,
                        PRECISION: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr,
                        BK: tl.constexpr,
                        PAPER: tl.constexpr, SAVE: tl.constexpr,
                              BN: tl.constexpr, BD: tl.constexpr):
    """One proximal (Alg. 1) outer step of S, all K inner iterations, one program per set.

    Y0 = (x + α0 Σ(P) + τ log P)/ε, ε = α1 + τ (= -C_t/ε). Exact: K Gauss-Seidel iterations
    a = lognorm(κ2 log p0 + (1-κ2) LSE_n(Y0 + b)) - LSE_n(..), b likewise over d; paper: K
    Jacobi iterations of eq. (18) with the a/ε factor. log P ← Y0 + a + b (in place).
    y0: (R, D) scratch; bvec, c: (R,) scratch.
    SAVE: the inner history for the adjoint, R_k, a_k (B, K, D) and C_k, b_k (K, R):
    exact, a_k and b_k after iteration k; paper, a and b entering iteration k.
    """
    b = tl.program_id(0)
    row0, n_b = _set_rows(bounds_ptr, b)
    # the structure product of this iteration, Σ2 exp(log_p) Σ1 -> sig, in this program
    rows0 = row0 * D
    g0 = _gram_block(b, rows0, gram_slot)
    _sigma_product(log_p_ptr + rows0, xc_ptr + rows0, xt_ptr + rows0, gram_ptr + g0,
                   scratch_ptr + 2 * g0, sig_ptr + rows0, n_b, D, True,
                   PRECISION, BT, BW, BK)
    a0 = tl.load(a0_ptr + t)
    tau = tl.load(tau_ptr + t)
    eps = tl.load(a1_ptr + t) + tau
    k2 = _kappa(tl.load(a2_ptr + t), eps)
    k3 = _kappa(tl.load(a3_ptr + t), eps)
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    lp0 = tl.load(log_p0_ptr + b * D + offs_d, mask=d_ok, other=0.0)
    # Y0 and b = 0
    for n0 in range(0, n_b, BN):
        rows, r_ok, msk, off = _row_tile(n0, n_b, row0, D, offs_d, d_ok, BN)
        y0 = (tl.load(x_ptr + off, mask=msk, other=0.0)
              + a0 * tl.load(sig_ptr + off, mask=msk, other=0.0)
              + tau * tl.load(log_p_ptr + off, mask=msk, other=0.0)) / eps
        tl.store(y0_ptr + off, y0, mask=msk)
        tl.store(bvec_ptr + row0 + rows, tl.zeros([BN], dtype=tl.float32), mask=r_ok)
    a = tl.zeros([BD], dtype=tl.float32)
    tl.debug_barrier()
    for _k in range(0, K):
        if PAPER:
            # Jacobi: R and C from the same Y = Y0 + a + b; b updated row by row
            m = tl.full([BD], _NEG_BIG, dtype=tl.float32)
            l = tl.zeros([BD], dtype=tl.float32)
            for n0 in range(0, n_b, BN):
                rows, r_ok, msk, off = _row_tile(n0, n_b, row0, D, offs_d, d_ok, BN)
                bv = tl.load(bvec_ptr + row0 + rows, mask=r_ok, other=0.0)
                y = tl.load(y0_ptr + off, mask=msk, other=0.0) + a[None, :] + bv[:, None]
                y = tl.where(msk, y, float("-inf"))
                m_new = tl.maximum(m, tl.max(y, 0))
                l = l * tl.exp(m - m_new) + tl.sum(tl.exp(y - m_new[None, :]), 0)
                m = m_new
                ym = tl.max(y, 1)
                c = ym + tl.log(tl.sum(tl.exp(y - ym[:, None]), 1))
                lq0 = tl.load(log_q0_ptr + row0 + rows, mask=r_ok, other=0.0)
                # bv is replicated across warps: all must have read it before it is replaced
                tl.debug_barrier()
                tl.store(bvec_ptr + row0 + rows, k3 * (bv / eps + lq0 - c), mask=r_ok)
                if SAVE:   # the state entering iteration k and its C
                    tl.store(hist_b_ptr + _k * n_rows + row0 + rows, bv, mask=r_ok)
                    tl.store(hist_c_ptr + _k * n_rows + row0 + rows, c, mask=r_ok)
            r = tl.where(n_b > 0, m + tl.log(l), 0.0)   # 0 for an empty set
            if SAVE:
                tl.store(hist_r_ptr + (b * K + _k) * D + offs_d, r, mask=d_ok)
                tl.store(hist_a_ptr + (b * K + _k) * D + offs_d, a, mask=d_ok)
            a = tl.where(d_ok, k2 * (a / eps + lp0 - r), 0.0)
        else:
            # a from R = LSE_n(Y0 + b)
            m = tl.full([BD], _NEG_BIG, dtype=tl.float32)
            l = tl.zeros([BD], dtype=tl.float32)
            for n0 in range(0, n_b, BN):
                rows, r_ok, msk, off = _row_tile(n0, n_b, row0, D, offs_d, d_ok, BN)
                bv = tl.load(bvec_ptr + row0 + rows, mask=r_ok, other=0.0)
                y = tl.load(y0_ptr + off, mask=msk, other=0.0) + bv[:, None]
                y = tl.where(msk, y, float("-inf"))
                m_new = tl.maximum(m, tl.max(y, 0))
                l = l * tl.exp(m - m_new) + tl.sum(tl.exp(y - m_new[None, :]), 0)
                m = m_new
            r = tl.where(n_b > 0, m + tl.log(l), 0.0)   # 0 for an empty set
            v = tl.where(d_ok, k2 * lp0 + (1 - k2) * r, float("-inf"))
            vmax = tl.max(v, 0)
            a = tl.where(d_ok, v - (vmax + tl.log(tl.sum(tl.exp(v - vmax), 0))) - r, 0.0)
            if SAVE:
                tl.store(hist_r_ptr + (b * K + _k) * D + offs_d, r, mask=d_ok)
                tl.store(hist_a_ptr + (b * K + _k) * D + offs_d, a, mask=d_ok)
            # b from C = LSE_d(Y0 + a)
            vm = tl.max(tl.full([BN], _NEG_BIG, dtype=tl.float32), 0)
            vl = tl.sum(tl.zeros([BN], dtype=tl.float32), 0)
            for n0 in range(0, n_b, BN):
                rows, r_ok, msk, off = _row_tile(n0, n_b, row0, D, offs_d, d_ok, BN)
                y = tl.load(y0_ptr + off, mask=msk, other=0.0) + a[None, :]
                y = tl.where(msk, y, float("-inf"))
                ym = tl.max(y, 1)
                c = ym + tl.log(tl.sum(tl.exp(y - ym[:, None]), 1))
                tl.store(c_ptr + row0 + rows, c, mask=r_ok)
                lq0 = tl.load(log_q0_ptr + row0 + rows, mask=r_ok, other=0.0)
                vn = tl.where(r_ok, k3 * lq0 + (1 - k3) * c, float("-inf"))
                vm_new = tl.maximum(vm, tl.max(vn, 0))
                vl = vl * tl.exp(vm - vm_new) + tl.sum(tl.exp(vn - vm_new), 0)
                vm = vm_new
            v_lse = vm + tl.log(vl)
            tl.debug_barrier()
            for n0 in range(0, n_b, BN):
                rows = n0 + tl.arange(0, BN)
                r_ok = rows < n_b
                c = tl.load(c_ptr + row0 + rows, mask=r_ok, other=0.0)
                lq0 = tl.load(log_q0_ptr + row0 + rows, mask=r_ok, other=0.0)
                bn = k3 * lq0 + (1 - k3) * c - v_lse - c
                tl.store(bvec_ptr + row0 + rows, bn, mask=r_ok)
                if SAVE:
                    tl.store(hist_c_ptr + _k * n_rows + row0 + rows, c, mask=r_ok)
                    tl.store(hist_b_ptr + _k * n_rows + row0 + rows, bn, mask=r_ok)
        tl.debug_barrier()
    # log P = Y0 + a + b
    for n0 in range(0, n_b, BN):
        rows, r_ok, msk, off = _row_tile(n0, n_b, row0, D, offs_d, d_ok, BN)
        bv = tl.load(bvec_ptr + row0 + rows, mask=r_ok, other=0.0)
        y = tl.load(y0_ptr + off, mask=msk, other=0.0) + a[None, :] + bv[:, None]
        tl.store(log_p_ptr + off, y, mask=msk)


@triton.jit(do_not_specialize=["t"])
def badmm_s_step_bwd_kernel(g_ls_ptr, g_z_ptr, log_p_ptr, z_ptr, sig_p_ptr, log_s_new_ptr, c_ptr,
                            eta_ptr, log_q0_ptr, g_z_out_ptr, g_sig_ptr, g_lp_ptr, g_p_ptr,
                            g_lq0_ptr, gvec_ptr, row_x_ptr, col_x_ptr, wpart_ptr, bounds_ptr,
                            a0_ptr, a1_ptr, a3_ptr, rho_ptr, t, D,
                            xc_ptr, xt_ptr, gram_ptr, scratch_ptr, gram_slot, dxc_ptr,
                            dxt_ptr,
                            PRECISION: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr,
                            BK: tl.constexpr,
                            QUADRATIC: tl.constexpr, PAPER: tl.constexpr,
                            BN: tl.constexpr, BD: tl.constexpr, ROWS_HERE: tl.constexpr):
    """Adjoint of the exact S-step and dual update (badmm_s_step_kernel), one program per set.

    In: g_ls, g_z = ∂L/∂log S', ∂L/∂Z' (R, D); the forward's log P, Z, Σ(P), log S',
    C (c) and log η (eta). Out: g_z_out = ∂L/∂Z through this step, g_sig = α0 ∂L/∂H (to be
    pushed through Σ by the epilogue, which adds the Σ(P) path to g_lp and the factors'
    gradients to dxc, dxt), g_lp = ∂L/∂log P and g_p = ∂L/∂P, g_lq0
    (R,), and per-set partial sums wpart[b] = (∂/∂α0, ∂/∂α1 direct, ∂/∂ρ direct, ∂/∂κ3,
    ∂/∂w) with w the step weight (``_s_step_weight``; ∂w/∂α1 = ∂w/∂ρ = 1 except B-Q paper's w = ρ).
    gvec: (R,) scratch.
    PAPER: log η is a state (no κ3 path): gvec returns ∂L/∂log η through log S'; the eq. (27)-(28)
    updates enter as row_x (R,) (∂L/∂S'_nd += row_x_n, from z2) and col_x (B, D)
    (∂L/∂P_nd += col_x_d, from z1).
    ROWS_HERE: the epilogue's (n_b, D) stage too; else sigma_adjoint_rows_kernel does it next.
    """
    b = tl.program_id(0)
    row0, n_b = _set_rows(bounds_ptr, b)
    a0 = tl.load(a0_ptr + t)
    a1 = tl.load(a1_ptr + t)
    rho = tl.load(rho_ptr + t)
    w = _s_step_weight(a1, rho, QUADRATIC, PAPER)
    k3 = _kappa(tl.load(a3_ptr + t), w)   # exact only (paper: no κ3 path)
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    zero_n = tl.zeros([BN], dtype=tl.float32)
    # pass 1: ∂L/∂log η_n = Σ_d ∂L/∂log S'_nd (total, through S' = exp(log S') in the dual too)
    g_rho = tl.sum(zero_n, 0)
    g_eta_sum = tl.sum(zero_n, 0)
    for n0 in range(0, n_b, BN):
        rows, r_ok, msk, off = _row_tile(n0, n_b, row0, D, offs_d, d_ok, BN)
        gz = tl.load(g_z_ptr + off, mask=msk, other=0.0)
        p = tl.where(msk, tl.exp(tl.load(log_p_ptr + off, mask=msk, other=0.0)), 0.0)
        s = tl.where(msk, tl.exp(tl.load(log_s_new_ptr + off, mask=msk, other=0.0)), 0.0)
        glt = tl.load(g_ls_ptr + off, mask=msk, other=0.0) - rho * gz * s      # [BN, BD]
        if PAPER:
            glt += tl.load(row_x_ptr + row0 + rows, mask=r_ok, other=0.0)[:, None] * s
        g_rho += tl.sum(gz * (p - s))
        g_eta = tl.sum(glt, 1)                                                  # [BN]
        tl.store(gvec_ptr + row0 + rows, g_eta, mask=r_ok)
        g_eta_sum += tl.sum(g_eta, 0)
    tl.debug_barrier()
    g_a0 = tl.sum(zero_n, 0)
    g_a1 = tl.sum(zero_n, 0)
    g_w = tl.sum(zero_n, 0)
    g_k3 = tl.sum(zero_n, 0)
    for n0 in range(0, n_b, BN):
        rows, r_ok, msk, off = _row_tile(n0, n_b, row0, D, offs_d, d_ok, BN)
        # log η = lognorm_n(v), v = κ3 log q0 + (1-κ3) C: softmax(v) = η
        g_eta = tl.load(gvec_ptr + row0 + rows, mask=r_ok, other=0.0)
        le = tl.load(eta_ptr + row0 + rows, mask=r_ok, other=0.0)
        c = tl.load(c_ptr + row0 + rows, mask=r_ok, other=0.0)
        lq0 = tl.load(log_q0_ptr + row0 + rows, mask=r_ok, other=0.0)
        if PAPER:
            g_c = -g_eta
        else:
            g_v = tl.where(r_ok, g_eta - tl.exp(le) * g_eta_sum, 0.0)
            g_c = -g_eta + (1 - k3) * g_v
            tl.store(g_lq0_ptr + row0 + rows, k3 * g_v, mask=r_ok)
            g_k3 += tl.sum(g_v * (lq0 - c), 0)
        gz = tl.load(g_z_ptr + off, mask=msk, other=0.0)
        lp = tl.load(log_p_ptr + off, mask=msk, other=0.0)
        p = tl.where(msk, tl.exp(lp), 0.0)
        s = tl.where(msk, tl.exp(tl.load(log_s_new_ptr + off, mask=msk, other=0.0)), 0.0)
        sig = tl.load(sig_p_ptr + off, mask=msk, other=0.0)
        h = tl.load(z_ptr + off, mask=msk, other=0.0) + a0 * sig
        if QUADRATIC:
            y = lp + (h - a1 * p) / w
        else:
            y = (h + rho * lp) / w
        # C = LSE_d Y: ∂C/∂Y = exp(Y - C)
        g_y = tl.load(g_ls_ptr + off, mask=msk, other=0.0) - rho * gz * s \
            + tl.where(msk, tl.exp(y - c[:, None]), 0.0) * g_c[:, None]          # [BN, BD]
        if PAPER:
            g_y += tl.load(row_x_ptr + row0 + rows, mask=r_ok, other=0.0)[:, None] * s
        if QUADRATIC:
            g_h = g_y / w
            g_lp = g_y
            g_p = rho * gz - a1 * g_h
            g_a1 += tl.sum(-g_h * p)
            g_w += tl.sum(-g_h * (h - a1 * p)) / w
        else:
            g_h = g_y / w
            g_lp = rho * g_h
            g_p = rho * gz
            g_w += tl.sum(-g_h * y)
            g_rho += tl.sum(g_h * lp)
        if PAPER:
            g_p += tl.load(col_x_ptr + b * D + offs_d, mask=d_ok, other=0.0)[None, :]
        g_a0 += tl.sum(g_h * sig)
        tl.store(g_z_out_ptr + off, gz + g_h, mask=msk)
        tl.store(g_sig_ptr + off, a0 * g_h, mask=msk)
        tl.store(g_lp_ptr + off, g_lp, mask=msk)
        tl.store(g_p_ptr + off, g_p, mask=msk)
    tl.store(wpart_ptr + b * 8 + 0, g_a0)
    tl.store(wpart_ptr + b * 8 + 1, g_a1)
    tl.store(wpart_ptr + b * 8 + 2, g_rho)
    tl.store(wpart_ptr + b * 8 + 3, g_k3)
    tl.store(wpart_ptr + b * 8 + 4, g_w)
    # the structure product's adjoint: g_sig through Σ2 exp(log_p) Σ1 into g_lp, xc, xt
    tl.debug_barrier()   # g_sig and g_lp rows were written by other threads of this program
    rows0 = row0 * D
    g0 = _gram_block(b, rows0, gram_slot)
    _sigma_adjoint(log_p_ptr + rows0, g_sig_ptr + rows0, xc_ptr + rows0, xt_ptr + rows0,
                   gram_ptr + g0, scratch_ptr + 5 * g0, dxc_ptr + rows0, dxt_ptr + rows0,
                   g_lp_ptr + rows0, n_b, D, PRECISION, BT, BW, BK, ROWS_HERE)


@triton.jit(do_not_specialize=["t"])
def badmm_p_step_bwd_kernel(g_lp_ptr, g_p_ptr, log_p_ptr, log_s_ptr, z_ptr, x_ptr, sig_s_ptr,
                            r_ptr, mu_ptr, log_p0_ptr, g_l_ptr, g_x_ptr, g_z_ptr, g_sig_ptr,
                            g_lp0_ptr, wpart_ptr, bounds_ptr, a0_ptr, a1_ptr, a2_ptr, rho_ptr, t,
                            D, xc_ptr, xt_ptr, gram_ptr, scratch_ptr, gram_slot, dxc_ptr,
                            dxt_ptr,
                        PRECISION: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr,
                        BK: tl.constexpr,
                        QUADRATIC: tl.constexpr, PAPER: tl.constexpr,
                            BN: tl.constexpr, BD: tl.constexpr, ROWS_HERE: tl.constexpr):
    """Adjoint of the exact P-step (badmm_p_step_kernel), one program per set.

    In: ∂L/∂log P = g_lp + P ⊙ g_p (all paths); the forward's log P, log S, Z, x, Σ(S), R and
    log μ (r, mu (B, D)). Out: g_l = ∂L/∂log S (written; the epilogue adds the Σ(S) path and
    the factors' gradients to dxc, dxt), g_x += and g_z -= ∂L/∂G (in place), g_sig = α0
    ∂L/∂G (pushed through Σ by the epilogue), g_lp0 (B, D), and
    per-set partials wpart[b] = (∂/∂α0, ∂/∂α1 direct, ∂/∂w, ∂/∂κ2) with w the step weight
    (``_p_step_weight``: ρ, or ρ + α1 for B-Q exact, so ∂/∂w counts for α1 there too).
    PAPER: log μ is a state: g_lp0 returns ∂L/∂log μ (no κ2 path).
    ROWS_HERE: the epilogue's (n_b, D) stage too; else sigma_adjoint_rows_kernel does it next.
    """
    b = tl.program_id(0)
    row0, n_b = _set_rows(bounds_ptr, b)
    a0 = tl.load(a0_ptr + t)
    a1 = tl.load(a1_ptr + t)
    w = _p_step_weight(a1, tl.load(rho_ptr + t), QUADRATIC, PAPER)
    k2 = _kappa(tl.load(a2_ptr + t), w)
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    # pass 1: ∂L/∂log μ_d = Σ_n ∂L/∂log P_nd
    g_mu = tl.zeros([BD], dtype=tl.float32)
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        msk = (rows < n_b)[:, None] & d_ok[None, :]
        off = (row0 + rows)[:, None] * D + offs_d[None, :]
        p = tl.where(msk, tl.exp(tl.load(log_p_ptr + off, mask=msk, other=0.0)), 0.0)
        g_mu += tl.sum(tl.load(g_lp_ptr + off, mask=msk, other=0.0)
                       + p * tl.load(g_p_ptr + off, mask=msk, other=0.0), 0)
    r = tl.load(r_ptr + b * D + offs_d, mask=d_ok, other=0.0)
    lmu = tl.load(mu_ptr + b * D + offs_d, mask=d_ok, other=0.0)
    lp0 = tl.load(log_p0_ptr + b * D + offs_d, mask=d_ok, other=0.0)
    if PAPER:
        g_r = -g_mu
        tl.store(g_lp0_ptr + b * D + offs_d, g_mu, mask=d_ok)
        g_k2 = tl.sum(tl.zeros([BD], dtype=tl.float32), 0)
    else:
        g_v = tl.where(d_ok, g_mu - tl.exp(lmu) * tl.sum(g_mu, 0), 0.0)  # log μ = lognorm(v)
        g_r = -g_mu + (1 - k2) * g_v
        tl.store(g_lp0_ptr + b * D + offs_d, k2 * g_v, mask=d_ok)
        g_k2 = tl.sum(tl.where(d_ok, g_v * (lp0 - r), 0.0), 0)
    zero_n = tl.zeros([BN], dtype=tl.float32)
    g_a0 = tl.sum(zero_n, 0)
    g_a1 = tl.sum(zero_n, 0)
    g_w = tl.sum(zero_n, 0)
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        msk = (rows < n_b)[:, None] & d_ok[None, :]
        off = (row0 + rows)[:, None] * D + offs_d[None, :]
        p = tl.where(msk, tl.exp(tl.load(log_p_ptr + off, mask=msk, other=0.0)), 0.0)
        glp = tl.load(g_lp_ptr + off, mask=msk, other=0.0) \
            + p * tl.load(g_p_ptr + off, mask=msk, other=0.0)
        ls = tl.load(log_s_ptr + off, mask=msk, other=0.0)
        sig = tl.load(sig_s_ptr + off, mask=msk, other=0.0)
        g = tl.load(x_ptr + off, mask=msk, other=0.0) - tl.load(z_ptr + off, mask=msk, other=0.0)
        g += a0 * sig
        s = tl.where(msk, tl.exp(ls), 0.0)
        if QUADRATIC:
            g -= a1 * s
        y = ls + g / w
        # R = LSE_n Y: ∂R/∂Y = exp(Y - R)
        g_y = glp + tl.where(msk, tl.exp(y - r[None, :]), 0.0) * g_r[None, :]   # [BN, BD]
        g_g = g_y / w
        g_w += tl.sum(-g_g * g) / w
        g_a0 += tl.sum(g_g * sig)
        g_l = g_y
        if QUADRATIC:
            g_a1 += tl.sum(-g_g * s)
            g_l -= a1 * g_g * s
        tl.store(g_l_ptr + off, g_l, mask=msk)
        tl.store(g_x_ptr + off, tl.load(g_x_ptr + off, mask=msk, other=0.0) + g_g, mask=msk)
        tl.store(g_z_ptr + off, tl.load(g_z_ptr + off, mask=msk, other=0.0) - g_g, mask=msk)
        tl.store(g_sig_ptr + off, a0 * g_g, mask=msk)
    tl.store(wpart_ptr + b * 8 + 0, g_a0)
    tl.store(wpart_ptr + b * 8 + 1, g_a1)
    tl.store(wpart_ptr + b * 8 + 2, g_w)
    tl.store(wpart_ptr + b * 8 + 3, g_k2)
    # the structure product's adjoint: g_sig through Σ2 exp(log_s) Σ1 into g_l, xc, xt
    tl.debug_barrier()   # g_sig and g_l rows were written by other threads of this program
    rows0 = row0 * D
    g0 = _gram_block(b, rows0, gram_slot)
    _sigma_adjoint(log_s_ptr + rows0, g_sig_ptr + rows0, xc_ptr + rows0, xt_ptr + rows0,
                   gram_ptr + g0, scratch_ptr + 5 * g0, dxc_ptr + rows0, dxt_ptr + rows0,
                   g_l_ptr + rows0, n_b, D, PRECISION, BT, BW, BK, ROWS_HERE)


@triton.jit(do_not_specialize=["t"])
def sinkhorn_prox_step_bwd_kernel(g_out_ptr, x_ptr, log_p_ptr, sig_ptr, y0_ptr, gy0_ptr,
                                  hist_r_ptr, hist_a_ptr, hist_c_ptr, hist_b_ptr, gb_ptr, gc_ptr,
                                  log_p0_ptr, log_q0_ptr, g_lp_ptr, g_x_ptr, g_sig_ptr,
                                  g_lp0_ptr, g_lq0_ptr, wpart_ptr, bounds_ptr, a0_ptr, a1_ptr,
                                  a2_ptr, a3_ptr, tau_ptr, t, K, n_rows, D,
                                  xc_ptr, xt_ptr, gram_ptr, scratch_ptr, gram_slot, dxc_ptr,
                                  dxt_ptr,
                                  PRECISION: tl.constexpr,
                                  BT: tl.constexpr, BW: tl.constexpr,
                                  BK: tl.constexpr, PAPER: tl.constexpr,
                                  BN: tl.constexpr,
                                  BD: tl.constexpr, ROWS_HERE: tl.constexpr):
    """Adjoint of one proximal S step (sinkhorn_prox_step_kernel, SAVE), one program per
    set: the K Gauss-Seidel (exact) or Jacobi (paper, eq. 18) iterations in reverse from their
    saved (R_k, a_k, C_k, b_k) and Y0.

    In: g_out = ∂L/∂log P_{t+1} (R, D); log P_t, Σ(P_t), Y0 and the history. Out: g_lp =
    ∂L/∂log P_t, g_x += ∂L/∂x, g_sig = α0 ∂L/∂Y0/ε (pushed through Σ by the epilogue, which
    adds the Σ(P_t) path to g_lp and the factors' gradients to dxc, dxt), g_lp0 (B, D), g_lq0
    (R,), wpart[b] = (∂/∂α0, ∂/∂τ direct, ∂/∂ε direct, ∂/∂κ2, ∂/∂κ3).
    Scratch: gy0 (R, D), gb, gc (R,); (B, 5, S, S) for the Σ adjoint.
    ROWS_HERE: the epilogue's (n_b, D) stage too; else sigma_adjoint_rows_kernel does it next.
    """
    b = tl.program_id(0)
    row0, n_b = _set_rows(bounds_ptr, b)
    a0 = tl.load(a0_ptr + t)
    tau = tl.load(tau_ptr + t)
    eps = tl.load(a1_ptr + t) + tau
    k2 = _kappa(tl.load(a2_ptr + t), eps)
    k3 = _kappa(tl.load(a3_ptr + t), eps)
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    lp0 = tl.load(log_p0_ptr + b * D + offs_d, mask=d_ok, other=0.0)
    zero_n = tl.zeros([BN], dtype=tl.float32)
    # log P_{t+1} = Y0 + a_K + b_K
    g_a_out = tl.zeros([BD], dtype=tl.float32)
    for n0 in range(0, n_b, BN):
        rows, r_ok, msk, off = _row_tile(n0, n_b, row0, D, offs_d, d_ok, BN)
        g = tl.load(g_out_ptr + off, mask=msk, other=0.0)
        tl.store(gy0_ptr + off, g, mask=msk)
        g_a_out += tl.sum(g, 0)
        tl.store(gb_ptr + row0 + rows, tl.sum(g, 1), mask=r_ok)
        tl.store(g_lq0_ptr + row0 + rows, zero_n, mask=r_ok)
    g_lp0 = tl.zeros([BD], dtype=tl.float32)
    g_k2 = tl.sum(zero_n, 0)
    g_k3 = tl.sum(zero_n, 0)
    g_eps_j = tl.sum(zero_n, 0)
    tl.debug_barrier()
    if PAPER:
        # a' = κ2 (a/ε + log p0 - R), b' = κ3 (b/ε + log q0 - C), R, C from Y = Y0 + a + b
        g_a = g_a_out
        for kk in range(0, K):
            k = K - 1 - kk
            a_old = tl.load(hist_a_ptr + (b * K + k) * D + offs_d, mask=d_ok, other=0.0)
            rk = tl.load(hist_r_ptr + (b * K + k) * D + offs_d, mask=d_ok, other=0.0)
            g_r = -k2 * g_a
            g_lp0 += k2 * g_a
            g_k2 += tl.sum(tl.where(d_ok, g_a * (a_old / eps + lp0 - rk), 0.0), 0)
            g_eps_j += tl.sum(tl.where(d_ok, -g_a * k2 * a_old, 0.0), 0) / (eps * eps)
            g_a_new = k2 / eps * g_a
            for n0 in range(0, n_b, BN):
                rows, r_ok, msk, off = _row_tile(n0, n_b, row0, D, offs_d, d_ok, BN)
                gbv = tl.load(gb_ptr + row0 + rows, mask=r_ok, other=0.0)
                b_old = tl.load(hist_b_ptr + k * n_rows + row0 + rows, mask=r_ok, other=0.0)
                c = tl.load(hist_c_ptr + k * n_rows + row0 + rows, mask=r_ok, other=0.0)
                lq0 = tl.load(log_q0_ptr + row0 + rows, mask=r_ok, other=0.0)
                g_c = -k3 * gbv
                g_k3 += tl.sum(gbv * (b_old / eps + lq0 - c), 0)
                g_eps_j += tl.sum(-gbv * k3 * b_old, 0) / (eps * eps)
                y = tl.load(y0_ptr + off, mask=msk, other=0.0) + a_old[None, :] + b_old[:, None]
                gy = tl.where(msk, tl.exp(y - rk[None, :]) * g_r[None, :]
                              + tl.exp(y - c[:, None]) * g_c[:, None], 0.0)     # [BN, BD]
                tl.store(gy0_ptr + off, tl.load(gy0_ptr + off, mask=msk, other=0.0) + gy,
                         mask=msk)
                g_a_new += tl.sum(gy, 0)
                old_q = tl.load(g_lq0_ptr + row0 + rows, mask=r_ok, other=0.0)
                tl.debug_barrier()   # every warp read gb, g_lq0 of these rows before the update
                tl.store(gb_ptr + row0 + rows, k3 / eps * gbv + tl.sum(gy, 1), mask=r_ok)
                tl.store(g_lq0_ptr + row0 + rows, old_q + k3 * gbv, mask=r_ok)
            g_a = g_a_new
            tl.debug_barrier()
    else:
        for kk in range(0, K):
            k = K - 1 - kk
            # b_k = lognorm_n(v) - C_k, v = κ3 log q0 + (1-κ3) C_k, softmax(v) = exp(b_k + C_k)
            gb_sum = tl.sum(zero_n, 0)
            for n0 in range(0, n_b, BN):
                rows = n0 + tl.arange(0, BN)
                gb_sum += tl.sum(tl.load(gb_ptr + row0 + rows, mask=rows < n_b,
                                         other=0.0), 0)
            for n0 in range(0, n_b, BN):
                rows = n0 + tl.arange(0, BN)
                r_ok = rows < n_b
                gbv = tl.load(gb_ptr + row0 + rows, mask=r_ok, other=0.0)
                c = tl.load(hist_c_ptr + k * n_rows + row0 + rows, mask=r_ok, other=0.0)
                bk = tl.load(hist_b_ptr + k * n_rows + row0 + rows, mask=r_ok, other=0.0)
                lq0 = tl.load(log_q0_ptr + row0 + rows, mask=r_ok, other=0.0)
                g_v = tl.where(r_ok, gbv - tl.exp(bk + c) * gb_sum, 0.0)
                tl.store(gc_ptr + row0 + rows, -gbv + (1 - k3) * g_v, mask=r_ok)
                g_k3 += tl.sum(g_v * (lq0 - c), 0)
                old = tl.load(g_lq0_ptr + row0 + rows, mask=r_ok, other=0.0)
                tl.debug_barrier()   # every warp read the old value before it is replaced
                tl.store(g_lq0_ptr + row0 + rows, old + k3 * g_v, mask=r_ok)
            tl.debug_barrier()
            # C_k = LSE_d(Y0 + a_k)
            ak = tl.load(hist_a_ptr + (b * K + k) * D + offs_d, mask=d_ok, other=0.0)
            g_a = tl.where(k == K - 1, g_a_out, 0.0)   # a_k feeds C_k and, last, the output
            for n0 in range(0, n_b, BN):
                rows, r_ok, msk, off = _row_tile(n0, n_b, row0, D, offs_d, d_ok, BN)
                c = tl.load(hist_c_ptr + k * n_rows + row0 + rows, mask=r_ok, other=0.0)
                gc = tl.load(gc_ptr + row0 + rows, mask=r_ok, other=0.0)
                e = tl.where(msk, tl.exp(tl.load(y0_ptr + off, mask=msk, other=0.0)
                                         + ak[None, :] - c[:, None]), 0.0) * gc[:, None]
                tl.store(gy0_ptr + off, tl.load(gy0_ptr + off, mask=msk, other=0.0) + e,
                         mask=msk)
                g_a += tl.sum(e, 0)
            # a_k = lognorm_d(u) - R_k, u = κ2 log p0 + (1-κ2) R_k, softmax(u) = exp(a_k + R_k)
            rk = tl.load(hist_r_ptr + (b * K + k) * D + offs_d, mask=d_ok, other=0.0)
            g_u = tl.where(d_ok, g_a - tl.exp(ak + rk) * tl.sum(g_a, 0), 0.0)
            g_r = -g_a + (1 - k2) * g_u
            g_lp0 += k2 * g_u
            g_k2 += tl.sum(tl.where(d_ok, g_u * (lp0 - rk), 0.0), 0)
            # R_k = LSE_n(Y0 + b_{k-1}), b_{-1} = 0
            for n0 in range(0, n_b, BN):
                rows, r_ok, msk, off = _row_tile(n0, n_b, row0, D, offs_d, d_ok, BN)
                bprev = tl.load(hist_b_ptr + tl.maximum(k - 1, 0) * n_rows + row0 + rows,
                                mask=r_ok, other=0.0)
                bprev = tl.where(k > 0, bprev, 0.0)
                e = tl.where(msk, tl.exp(tl.load(y0_ptr + off, mask=msk, other=0.0)
                                         + bprev[:, None] - rk[None, :]), 0.0) * g_r[None, :]
                tl.store(gy0_ptr + off, tl.load(gy0_ptr + off, mask=msk, other=0.0) + e,
                         mask=msk)
                tl.store(gb_ptr + row0 + rows, tl.sum(e, 1), mask=r_ok)
            tl.debug_barrier()
    # Y0 = (x + α0 Σ(P) + τ log P) / ε
    g_a0 = tl.sum(zero_n, 0)
    g_tau = tl.sum(zero_n, 0)
    g_eps = tl.sum(zero_n, 0)
    for n0 in range(0, n_b, BN):
        rows, r_ok, msk, off = _row_tile(n0, n_b, row0, D, offs_d, d_ok, BN)
        gy = tl.load(gy0_ptr + off, mask=msk, other=0.0) / eps
        sig = tl.load(sig_ptr + off, mask=msk, other=0.0)
        lp = tl.load(log_p_ptr + off, mask=msk, other=0.0)
        g_a0 += tl.sum(gy * sig)
        g_tau += tl.sum(gy * lp)
        g_eps += tl.sum(-gy * tl.load(y0_ptr + off, mask=msk, other=0.0))
        tl.store(g_x_ptr + off, tl.load(g_x_ptr + off, mask=msk, other=0.0) + gy, mask=msk)
        tl.store(g_sig_ptr + off, a0 * gy, mask=msk)
        tl.store(g_lp_ptr + off, tau * gy, mask=msk)
    tl.store(g_lp0_ptr + b * D + offs_d, g_lp0, mask=d_ok)
    tl.store(wpart_ptr + b * 8 + 0, g_a0)
    tl.store(wpart_ptr + b * 8 + 1, g_tau)
    tl.store(wpart_ptr + b * 8 + 2, g_eps + g_eps_j)
    tl.store(wpart_ptr + b * 8 + 3, g_k2)
    tl.store(wpart_ptr + b * 8 + 4, g_k3)
    # the structure product's adjoint: g_sig through Σ2 exp(log_p) Σ1 into g_lp, xc, xt
    tl.debug_barrier()   # g_sig and g_lp rows were written by other threads of this program
    rows0 = row0 * D
    g0 = _gram_block(b, rows0, gram_slot)
    _sigma_adjoint(log_p_ptr + rows0, g_sig_ptr + rows0, xc_ptr + rows0, xt_ptr + rows0,
                   gram_ptr + g0, scratch_ptr + 5 * g0, dxc_ptr + rows0, dxt_ptr + rows0,
                   g_lp_ptr + rows0, n_b, D, PRECISION, BT, BW, BK, ROWS_HERE)


@triton.jit
def _column_softmax(log_p_ptr, x_ptr, row0, n_b, D, BN: tl.constexpr, BD: tl.constexpr):
    """Per feature d of one set, in one online pass over its rows: c_d = LSE_n log P[:, d] and
    y_d = Σ_n softmax_n(log P[:, d]) x_nd; both 0 on padding lanes and for an empty set."""
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    m = tl.full([BD], _NEG_BIG, dtype=tl.float32)
    l = tl.zeros([BD], dtype=tl.float32)
    acc = tl.zeros([BD], dtype=tl.float32)
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        msk = (rows < n_b)[:, None] & d_ok[None, :]
        off = (row0 + rows)[:, None] * D + offs_d[None, :]
        lp = tl.where(msk, tl.load(log_p_ptr + off, mask=msk, other=0.0), float("-inf"))
        m_new = tl.maximum(m, tl.max(lp, 0))
        scale = tl.exp(m - m_new)
        e = tl.exp(lp - m_new[None, :])                                        # [BN, BD]
        l = l * scale + tl.sum(e, 0)
        acc = acc * scale + tl.sum(e * tl.load(x_ptr + off, mask=msk, other=0.0), 0)
        m = m_new
    l = tl.maximum(l, 1e-30)
    ok = d_ok & (n_b > 0)
    return tl.where(ok, m + tl.log(l), 0.0), tl.where(ok, acc / l, 0.0)


@triton.jit
def _plan_lse(col, d_ok):
    """LSE over the features of the column LSEs: log of the set's total plan mass."""
    cm = tl.max(tl.where(d_ok, col, float("-inf")), 0)
    return cm + tl.log(tl.sum(tl.where(d_ok, tl.exp(col - cm), 0.0), 0))


@triton.jit
def pool_from_log_plan_kernel(log_p_ptr, x_ptr, y_ptr, plan_ptr, bounds_ptr, D,
                              WRITE_PLAN: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """y_d = Σ_n softmax_n(log P[:, d]) x_nd (one online pass), 0 for empty sets; optionally
    the plan exp(log P - LSE_{n,d} log P) (R, D) in the plan's dtype. log P, x: (R, D) fp32.
    """
    b = tl.program_id(0)
    row0, n_b = _set_rows(bounds_ptr, b)
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    col, y = _column_softmax(log_p_ptr, x_ptr, row0, n_b, D, BN, BD)
    tl.store(y_ptr + b * D + offs_d, y.to(y_ptr.dtype.element_ty), mask=d_ok)
    if WRITE_PLAN:
        total = _plan_lse(col, d_ok)
        for n0 in range(0, n_b, BN):
            rows = n0 + tl.arange(0, BN)
            msk = (rows < n_b)[:, None] & d_ok[None, :]
            off = (row0 + rows)[:, None] * D + offs_d[None, :]
            lp = tl.load(log_p_ptr + off, mask=msk, other=0.0)
            tl.store(plan_ptr + off, tl.exp(lp - total).to(plan_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _pool_bwd_set(log_p_ptr, x_ptr, gy_ptr, gplan_ptr, g_lp_ptr, g_x_ptr, b, row0, n_b, D,
                  HAS_GPLAN: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """Adjoint of pool_from_log_plan_kernel for set b (rows row0 .. row0 + n_b): with
    W = softmax_n(log P) (per feature) and y = Σ_n W x, g_lp = W ⊙ gy (x - y) (+ plan ⊙
    (gplan - Σ plan ⊙ gplan) with HAS_GPLAN) is written and g_x += W ⊙ gy. log P, x, g_lp,
    g_x, gplan: (R, D); gy (B, D). The backward runs it as structure_factors_kernel's
    epilogue (POOL_BWD): one launch less."""
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    col, y = _column_softmax(log_p_ptr, x_ptr, row0, n_b, D, BN, BD)          # pass 1
    gy = tl.load(gy_ptr + b * D + offs_d, mask=d_ok, other=0.0)
    if HAS_GPLAN:
        total = _plan_lse(col, d_ok)
        # pass 2: Σ plan ⊙ gplan (the normalization's adjoint)
        pg = tl.zeros([BD], dtype=tl.float32)
        for n0 in range(0, n_b, BN):
            rows = n0 + tl.arange(0, BN)
            msk = (rows < n_b)[:, None] & d_ok[None, :]
            off = (row0 + rows)[:, None] * D + offs_d[None, :]
            plan = tl.where(msk, tl.exp(tl.load(log_p_ptr + off, mask=msk, other=0.0) - total),
                            0.0)
            pg += tl.sum(plan * tl.load(gplan_ptr + off, mask=msk, other=0.0).to(tl.float32), 0)
        pg_sum = tl.sum(pg, 0)
    # pass 3: the gradients
    for n0 in range(0, n_b, BN):
        rows = n0 + tl.arange(0, BN)
        msk = (rows < n_b)[:, None] & d_ok[None, :]
        off = (row0 + rows)[:, None] * D + offs_d[None, :]
        lp = tl.load(log_p_ptr + off, mask=msk, other=0.0)
        xv = tl.load(x_ptr + off, mask=msk, other=0.0)
        gyw = tl.where(msk, tl.exp(lp - col[None, :]), 0.0) * gy[None, :]      # [BN, BD]
        g_lp = gyw * (xv - y[None, :])
        if HAS_GPLAN:
            plan = tl.where(msk, tl.exp(lp - total), 0.0)
            g_lp += plan * (tl.load(gplan_ptr + off, mask=msk, other=0.0).to(tl.float32)
                            - pg_sum)
        tl.store(g_lp_ptr + off, g_lp, mask=msk)
        tl.store(g_x_ptr + off, tl.load(g_x_ptr + off, mask=msk, other=0.0) + gyw, mask=msk)
