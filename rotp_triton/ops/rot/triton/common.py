"""Helpers shared by every kernel family: environment checks, grid sizing, custom-op plumbing,
and the few ``@triton.jit`` primitives (exp2-based LSE, κ) that all families use.

Kernels work in base 2: a natural-log quantity v is carried as v·log2(e), so that the
transcendental of the inner loop is one ``exp2`` (one MUFU op) and logs happen only on reduced
vectors (PERF.md, "speed of light").
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): natural-log quantities are multiplied by it for exp2
LN2 = 0.6931471805599453  # ln(2): back from base 2


def interpreter_enabled() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors, one program at a time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; under the interpreter a small stand-in (4), so that
    grid-splitting code paths (several programs per set, persistent loops) are exercised."""
    if device.type != "cuda":
        return 4
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def next_pow2(n: int) -> int:
    """Smallest power of two ≥ max(n, 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


# triton >= 3.9 (ptxas 12.9) builds the register-capped layouts found with it without spills;
# 3.6 (the H200 image's) needs more registers for the same kernels and keeps the uncapped ones
# (window/launch.py, sinkhorn/launch.py: where each family reads it)
FRUGAL_REGISTERS = tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 9)

# torch.library.triton_op makes a launcher one node for torch.compile / export; older torch
# falls back to a plain autograd.Function (each family's op.py handles both).
HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def direct_launch(*tensors) -> bool:
    """Whether a family's forward may call its launcher itself instead of the custom operator
    or autograd.Function: in eager mode (not while torch.compile, export or torch.jit.trace
    trace), on plain tensors (no FakeTensor, FunctionalTensor or other subclass: those need the operator's fake
    kernel), when no autograd graph is recorded (grad disabled, or no input requires grad).
    The same launcher and kernels run either way; the operator's dispatch costs ~100 µs of
    host time per call (bench/host_overhead.py), most of a small inference call."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor or (grad and t.requires_grad):
            return False
    return True


# In eager mode a recorded forward (one that builds an autograd graph) goes through its family's
# torch.autograd.Function, not its custom operator: the same launchers, ~25 % less host time per
# forward+backward (W1's call, launches stubbed: 446 -> 339 µs on the development CPU; the
# operator's autograd wrapper and dispatch; bench/host_overhead.py). torch.compile and export
# trace the operator. False: the operator in eager mode too (tests of its registered autograd).
EAGER_FUNCTION = True


def eager_function(*tensors) -> bool:
    """Whether a recorded forward may take its family's torch.autograd.Function instead of the
    custom operator: in eager mode (not while torch.compile, export or torch.jit.trace trace:
    they need the operator, to which a Function's launches are invisible), on plain tensors (no FakeTensor, FunctionalTensor or
    other subclass)."""
    if not EAGER_FUNCTION or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    return all(t is None or type(t) is torch.Tensor for t in tensors)


def launcher(kernel, wrap=None):
    """``kernel`` itself, or ``wrap(kernel)`` (``torch.library.wrap_triton`` inside a custom op)."""
    return kernel if wrap is None else wrap(kernel)


# Each host op costs a few µs of CPU per call on a GPU (PERF.md, front end): a launcher carves
# its scratch out of one allocation instead of one allocation per buffer.
_SCRATCH_ALIGN = 32  # fp32 elements: every view starts on a 128-byte boundary (Triton
#                      specialises pointers on 16-byte alignment; an unaligned view would
#                      compile a second, slower variant of the kernel)


def aligned_row(n: int) -> int:
    """``n`` fp32 elements rounded up to whole 128-byte lines: the room a row or a segment of
    a flat buffer takes so that the next one starts aligned, as every carved view does (rows
    or segments laid end to end start where their lengths put them, and a kernel handed one
    of them compiled again when that moved it off a 16-byte boundary)."""
    return -(-n // _SCRATCH_ALIGN) * _SCRATCH_ALIGN


def flat_views(buf: torch.Tensor, shapes, offsets=None) -> list:
    """Contiguous views of the flat contiguous ``buf`` with the given shapes (tuples), at
    ``offsets`` (elements; default: one after another). One ``as_strided`` each: a slice and a
    ``view`` are two dispatches (the host front end, PERF.md)."""
    base, out, o = buf.storage_offset(), [], 0
    for i, shape in enumerate(shapes):
        if offsets is not None:
            o = offsets[i]
        stride, acc = [], 1
        for n in reversed(shape):
            stride.append(acc)
            acc *= n
        out.append(buf.as_strided(shape, stride[::-1], base + o))
        o += acc
    return out


def flat_numel(sizes) -> int:
    """Elements of a flat buffer that :func:`split_flat` splits into segments of ``sizes``:
    each rounded up to whole 128-byte lines (:func:`aligned_row`), the last too, so that what
    a caller puts after them starts aligned as well."""
    return sum(aligned_row(n) for n in sizes)


@functools.lru_cache(maxsize=256)
def _split_plan(sizes: tuple, numel: int) -> tuple:
    """(the split's segment sizes, gaps included, and the indices of the requested ones) of
    :func:`split_flat`: computed once per shape (a launcher calls it every step)."""
    parts, keep, o = [], [], 0
    for n in sizes:
        gap = -o % _SCRATCH_ALIGN        # up to the next line (none before the first)
        if gap:
            parts.append(gap)
        keep.append(len(parts))
        parts.append(n)
        o += gap + n
    if numel < o:
        raise ValueError(f"split_flat: {numel} elements, the segments need {o}")
    if numel > o:
        parts.append(numel - o)
    return tuple(parts), tuple(keep)


def split_flat(buf: torch.Tensor, sizes) -> list:
    """1-D views of the flat contiguous ``buf`` (:func:`flat_numel` of ``sizes`` elements is
    enough) with the given sizes, each starting on a 128-byte line, all from one
    ``split_with_sizes`` (the gaps are segments of it too, dropped): one dispatch, where
    :func:`flat_views` makes one a view (6 views: ~4 instead of ~11 µs on this project's CPU).
    For buffers that only kernels read (their addresses matter, not their shapes). Aligned
    because triton specialises a pointer on it: views at offsets that follow the batch's
    sizes (a ragged batch's rows) compiled a kernel again for new batches."""
    sizes, numel = tuple(sizes), buf.numel()
    try:
        parts, keep = _split_plan(sizes, numel)
    except TypeError:                    # symbolic sizes (tracing) are not hashable
        parts, keep = _split_plan.__wrapped__(sizes, numel)
    views = buf.split_with_sizes(parts)
    return [views[i] for i in keep]


def fp32_scratch(device, zeroed=(), empty=()):
    """Views of one fp32 allocation: ``(zeroed views, empty views)`` with the given shapes
    (ints or tuples). The ``zeroed`` ones lie first and are cleared by one fill; the rest are
    uninitialised. Two host ops (one with no ``zeroed``) however many buffers; never for
    tensors that leave the launcher (outputs, saved tensors): a view keeps the whole
    allocation alive. (Not :func:`split_flat`: with the alignment gaps in the split, and a
    ``view`` for each shape of 2 or more dimensions, the B-ADMM and structure launchers took
    2-5 % longer, ``bench/results/host_overhead_split_views_2026-12-02.md``.)"""
    shapes = [(s,) if isinstance(s, int) else tuple(s) for s in (*zeroed, *empty)]
    sizes = [math.prod(s) for s in shapes]
    offsets, o = [], 0
    for n in sizes:
        offsets.append(o)
        o += aligned_row(n)
    buf = torch.empty(max(o, 1), device=device, dtype=torch.float32)
    views = flat_views(buf, shapes, offsets)
    nz = len(zeroed)
    if nz:
        buf[:offsets[nz - 1] + sizes[nz - 1]].zero_()
    return views[:nz], views[nz:]


def as_f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as contiguous fp32, without a host op when it already is one (``.to`` and
    ``.contiguous`` dispatch even when they return ``t``)."""
    if t.dtype == torch.float32 and t.is_contiguous():
        return t.detach() if t.requires_grad else t
    return t.detach().to(torch.float32).contiguous()


# --------------------------------------------------------------------------------------------
# jit primitives
# --------------------------------------------------------------------------------------------
@triton.jit
def kappa(alpha, w):
    """κ(α, w) = α / (α + w) ∈ [0, 1], and exactly 1 for α = +inf (never inf/inf)."""
    return tl.where(alpha == float("inf"), 1.0, alpha / (alpha + w))


# On the GPU ``tl.log2`` is a ~29-instruction polynomial (libdevice's precise log2f) and a
# division ~10; on a reduced vector that every thread of a tile layout holds replicated, that is
# a third of a Sinkhorn chunk's instructions (sm_90 SASS, bench/results). The approximate PTX
# forms are one MUFU op each (lg2.approx: |error| < 2^-22 in the log, subnormals handled;
# rcp.approx.ftz). The interpreter has no inline PTX: there the precise forms run. Decided at
# import, as triton itself decides at ``@triton.jit`` time whether a function is interpreted.
FAST_MATH = tl.constexpr(not interpreter_enabled())


@triton.jit
def lg2_approx(v):
    """log2(v) as one MUFU.LG2 (GPU only: inline PTX)."""
    return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [v],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def lg2_approx_ftz(v):
    """log2(v) as one MUFU.LG2 without ``lg2_approx``'s subnormal rescale (a compare, a multiply
    and an add around it: subnormal v flush to 0, log2 to -inf). For v that is never
    subnormal: a sum of 2^(y - max y), which holds its max term 1 (GPU only: inline PTX)."""
    return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [v],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def rcp_approx(v):
    """1/v as one MUFU.RCP (GPU only: inline PTX; subnormal v flush to 0, 1/v to inf)."""
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [v],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def st_global_f32(ptr, v):
    """ptr[...] = v (fp32), each element by the threads that hold it, in v's own layout (GPU
    only: inline PTX ``st.global``; the threads holding a replicated element store the same
    value to the same address)."""
    return tl.inline_asm_elementwise("st.global.f32 [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,f",
                                     [ptr.to(tl.int64, bitcast=True), v], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def st_global_f32_masked(ptr, v, mask):
    """``st_global_f32`` where ``mask`` holds (GPU only: a predicated PTX ``st.global``)."""
    return tl.inline_asm_elementwise(
        "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, $3, 0;\n\t@p st.global.f32 [$1], $2;\n\t}"
        "\n\tmov.u32 $0, 0;", "=r,l,f,r",
        [ptr.to(tl.int64, bitcast=True), v, mask.to(tl.int32)], dtype=tl.int32, is_pure=False,
        pack=1)


# tl.store of a reduced vector (a [BD] column vector that the lanes of a tile layout hold
# replicated) goes through shared memory: the store is given a blocked layout of its own
# (triton's coalescing), so every chunk converts the vector into it with an STS, an LDS and two
# barriers. An element-loop store of such a vector is written where it is held instead. No
# barrier comes with it: a read of the same addresses before it (by any thread that holds them)
# or after it (by other threads) needs one of its own. From triton 3.9 on: under 3.6 it moved
# small one-tile sets' spills both ways (sm_90 ptxas, e.g. the forward at 32 × 128 rows ×
# features, 8 warps: 0 -> 136 B; at 64 × 64: 88 -> 40 B), and there tl.store stays, unless
# ROTP_TRITON_STORE_IN_LAYOUT=1 (read at import: a 3.6 GPU can check the inline stores,
# bench/README.md "A GPU lease").
STORE_IN_LAYOUT = tl.constexpr(not interpreter_enabled() and (
    FRUGAL_REGISTERS or os.environ.get("ROTP_TRITON_STORE_IN_LAYOUT", "") == "1"))


@triton.jit
def store_reduced(ptr, v, mask=None):
    """ptr[...] = v for a reduced fp32 vector (where ``mask`` holds, if given):
    ``st_global_f32`` / ``st_global_f32_masked`` where ``STORE_IN_LAYOUT``, else ``tl.store``
    (the same values)."""
    if STORE_IN_LAYOUT:
        if mask is None:
            st_global_f32(ptr, v)
        else:
            st_global_f32_masked(ptr, v, mask)
    else:
        tl.store(ptr, v, mask=mask)


@triton.jit
def log2_reduced(v):
    """log2 of a reduced vector (a column or row sum): ``lg2_approx`` on the GPU, ``tl.log2``
    under the interpreter (one line, so that bench/sass.py finds the GPU's instructions at the
    source line the interpreter counts)."""
    return lg2_approx(v) if FAST_MATH else tl.log2(v)


@triton.jit
def snake_start(i, n, rev, BD: tl.constexpr):
    """The first feature of trip ``i`` (0, BD, 2 BD, ...) of a pass over the BD-wide blocks
    that cover features [0, n): i, or the same trip counted from the last block where ``rev``
    (0 or 1) is 1. A set larger than its program's share
    of L2 (W2: 401 KB; ~200 KB for the Sinkhorn forward's 256 resident programs, ~388 KB for
    the B-ADMM forward's 132) finds none of its blocks in L2 (LRU) on a pass in the direction
    of the one before; one in the opposite direction starts on the blocks read last
    (``bench/l2_reuse.py``, docs/kernels.md "Passes over a set in alternating directions")."""
    return i + rev * ((n - 1) // BD * BD - 2 * i)


@triton.jit
def snake_direction(t, SNAKE: tl.constexpr, AFTER_ONE: tl.constexpr):
    """The direction (:func:`snake_start`) of a forward's pass t, one pass per iteration (the
    pass after the last iteration: the pooling): alternating with SNAKE, starting reversed
    where a pass went before iteration 0 (AFTER_ONE: the feature spread's), else 0."""
    if SNAKE:
        if AFTER_ONE:
            return (t + 1) % 2
        else:
            return t % 2
    else:
        return t * 0


@triton.jit
def lse2_combine(m1, s1, m2, s2):
    """Merge two partial base-2 log-sum-exps kept as (max m, sum s of 2^(v - m))."""
    m = tl.maximum(m1, m2)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m, s1 * tl.exp2(m1 - m_safe) + s2 * tl.exp2(m2 - m_safe)


__all__ = ["LOG2E", "LN2", "interpreter_enabled", "sm_count", "next_pow2", "cdiv",
           "HAS_TRITON_OP", "direct_launch", "eager_function", "launcher", "kappa", "lse2_combine",
           "FAST_MATH", "lg2_approx", "lg2_approx_ftz", "rcp_approx", "log2_reduced",
           "st_global_f32", "st_global_f32_masked", "STORE_IN_LAYOUT", "store_reduced",
           "snake_start", "snake_direction"]


@triton.jit
def set_inv_scale(sc_ptr, b, SCALED: tl.constexpr):
    """1/σ_b, σ (B,) fp32 the sets' feature scale (the layers' ``scale="auto"``,
    ``ops/rot/spread.py``) where a kernel folds it in (SCALED), else the constant 1 (a multiply
    by it folds away at compile time)."""
    if SCALED:
        return 1.0 / tl.load(sc_ptr + b)
    else:
        return 1.0


@triton.jit
def feature_block_stats(x_ptr, sf, ss, n_b, offs_f, fm, BS: tl.constexpr, BF: tl.constexpr):
    """Statistics of the features ``offs_f`` (mask ``fm``) of one set over its n_b samples, x
    at ``x_ptr`` with feature stride sf and sample stride ss, in [BS, BF] tiles: (mean [BF],
    C, part) with Σ_{f in the block} var_f = part·C² (population variances). Tiles merge with
    Chan et al.'s pairwise update (no cancellation for features far from 0, one read of x);
    the sum of squares is kept divided by a running per-feature scale c_f (the largest
    deviation merged so far), so nothing squared exceeds 1 - no overflow where |x - mean| >
    1.8e19 (var_f itself is never formed) - and C = max_f c_f. An empty set: mean 0, part 0.
    (``ops/rot/spread.py``; spread_stats_kernel, and the set kernels' :func:`set_spread`.)"""
    mean = tl.zeros([BF], dtype=tl.float32)
    m2 = tl.zeros([BF], dtype=tl.float32)        # Σ (x - mean)² / c²
    c = tl.zeros([BF], dtype=tl.float32)         # the running scale c_f
    for s0 in range(0, n_b, BS):
        offs_s = s0 + tl.arange(0, BS)
        mask = (offs_s < n_b)[:, None] & fm[None, :]
        X = tl.load(x_ptr + offs_s[:, None].to(tl.int64) * ss + offs_f[None, :].to(tl.int64) * sf,
                    mask=mask, other=0.0).to(tl.float32)                              # [BS, BF]
        cnt = tl.minimum(n_b - s0, BS).to(tl.float32)    # samples in this tile; s0 before it
        tmean = tl.sum(X, axis=0) / cnt                                               # [BF]
        dev = tl.where(mask, X - tmean[None, :], 0.0)
        tot = s0 + cnt
        delta = tmean - mean
        mean += delta * (cnt / tot)
        dw = delta * tl.sqrt(s0 * cnt / tot)             # the merge term is dw²
        c_new = tl.maximum(tl.maximum(c, tl.max(tl.abs(dev), axis=0)), tl.abs(dw))     # [BF]
        inv = 1.0 / tl.where(c_new > 0, c_new, 1.0)
        r = c * inv
        devs = dev * inv[None, :]
        dws = dw * inv
        m2 = m2 * (r * r) + tl.sum(devs * devs, axis=0) + dws * dws
        c = c_new
    # the block's Σ_f var_f = Σ_f m2_f c_f² / n as (C, Σ_f m2_f (c_f / C)² / n), C = max_f c_f
    C = tl.max(tl.where(fm, c, 0.0), axis=0)
    rc = c / tl.where(C > 0, C, 1.0)
    var = m2 * rc * rc / tl.maximum(n_b, 1)              # an empty set: 0
    return mean, C, tl.sum(tl.where(fm, var, 0.0), axis=0)


@triton.jit
def merge_block_spread(cm, acc, c, part):
    """Fold a feature block's (scale c, part) into the running (largest scale cm,
    Σ_blocks part·(c / cm)²)."""
    c_new = tl.maximum(cm, c)
    inv = 1.0 / tl.where(c_new > 0, c_new, 1.0)
    r_old = cm * inv
    r_new = c * inv
    return c_new, acc * r_old * r_old + part * r_new * r_new


@triton.jit
def store_spread(cm, acc, F, s_b, root_b):
    """The spread root = cm·sqrt(acc / F) and σ (1 where it is 0) stored; returns 1/σ."""
    root = cm * tl.sqrt(acc / F)
    sig = tl.where(root > 0, root, 1.0)
    tl.store(s_b, sig)
    tl.store(root_b, root)
    return 1.0 / sig


@triton.jit
def set_spread(x_ptr, sn, sf, n_b, F, s_b, root_b, mean_b, BN: tl.constexpr, BF: tl.constexpr):
    """A set kernel's own feature spread σ of its set (x at ``x_ptr``: n_b samples of stride
    sn, F features of stride sf; ``ops/rot/spread.py``) in one read of x - what
    spread_stats_kernel and spread_normalize_kernel form in two launches: writes the feature
    means to mean_b [F], σ (1 where the spread is 0) to s_b and the spread itself to root_b
    (what the backward's spread pass reads); returns 1/σ. The feature blocks' variance sums
    (scale C, part: :func:`feature_block_stats`) merge under a running max scale."""
    cm = tl.sum(tl.zeros([BF], dtype=tl.float32), axis=0)   # the largest block scale so far
    acc = tl.sum(tl.zeros([BF], dtype=tl.float32), axis=0)  # Σ_blocks part·(C / cm)²
    for f0 in range(0, F, BF):
        offs_f = f0 + tl.arange(0, BF)
        fm = offs_f < F
        mean, c, part = feature_block_stats(x_ptr, sf, sn, n_b, offs_f, fm, BN, BF)
        tl.store(mean_b + offs_f, mean, mask=fm)
        cm, acc = merge_block_spread(cm, acc, c, part)
    return store_spread(cm, acc, F, s_b, root_b)


# the one-tile spreads' unscaled sums of squares (set_spread_tile, the Sinkhorn row pieces'): a
# lane's sum within [2^-80, 2^100] lost no term worth keeping to underflow (n_b <= 512 terms
# < 2^-126 each: < 2^-37 of it) and leaves room to add 2^28 lanes' worth without overflow
SPREAD_SQ_MIN = tl.constexpr(2.0 ** -80)
SPREAD_SQ_MAX = tl.constexpr(2.0 ** 100)


@triton.jit
def set_spread_tile(x_ptr, sn, sf, n_b, F, s_b, root_b, mean_b, MASK_N: tl.constexpr,
                    BN: tl.constexpr, BF: tl.constexpr):
    """:func:`set_spread` of a set whose n_b <= BN samples all fit one [BN, BF] tile (the dense
    one-tile set kernels): per feature block one pass - the mean, then the squared deviations
    (scaled by their largest magnitude c_f where a sum leaves [SPREAD_SQ_MIN, SPREAD_SQ_MAX]) -
    with no pairwise merge across sample tiles and loads
    without a per-element mask (padded rows read the last real row and are zeroed where
    MASK_N; a partial feature block reads the last feature, its results are not stored)."""
    cm = tl.sum(tl.zeros([BF], dtype=tl.float32), axis=0)
    acc = tl.sum(tl.zeros([BF], dtype=tl.float32), axis=0)
    acc1 = tl.sum(tl.zeros([BF], dtype=tl.float32), axis=0)   # the unscaled blocks' sum
    if n_b > 0:
        on = tl.arange(0, BN)
        rows = on < n_b                                                         # [BN]
        roff = tl.minimum(on, n_b - 1).to(tl.int64) * sn                        # [BN]
        inv_n = 1.0 / n_b.to(tl.float32)
        for f0 in range(0, F, BF):
            offs_f = f0 + tl.arange(0, BF)
            fm = offs_f < F
            # (an int32 feature offset: one IMAD.WIDE per element off the rows' int64 bases,
            # where an int64 one costs a 64-bit add)
            fo = tl.minimum(offs_f, F - 1) * sf                                 # [BF]
            X = tl.load(x_ptr + roff[:, None] + fo[None, :]).to(tl.float32)     # [BN, BF]
            if MASK_N:
                X = tl.where(rows[:, None], X, 0.0)
            mean = tl.sum(X, axis=0) * inv_n                                    # [BF]
            tl.store(mean_b + offs_f, mean, mask=fm)
            dev = X - mean[None, :]
            if MASK_N:
                dev = tl.where(rows[:, None], dev, 0.0)
            # the squares as they are where every lane's sum lies in [2^-80, 2^100]; else
            # (|x| ~ 1e30 overflows, ~1e-30 underflows to 0, a constant feature is 0 too) each
            # lane scaled by its largest deviation: the max and the scaling cost ~1/5 of the
            # pass on every block
            m2 = tl.sum(dev * dev, axis=0)                                      # [BF]
            odd = fm & ((m2 > SPREAD_SQ_MAX) | (m2 < SPREAD_SQ_MIN))
            if tl.max(odd.to(tl.int32), axis=0) == 0:
                acc1 += tl.sum(tl.where(fm, m2, 0.0), axis=0) * inv_n
            else:
                cf = tl.max(tl.abs(dev), axis=0)                                # [BF] c_f
                # (every lane scaled by its own c_f, a padded one too: a padded lane's m2
                # then stays <= n_b, where dividing by 1 would square |x| ~ 1e30 to inf and
                # inf · 0 below would be NaN)
                devs = dev * (1.0 / tl.where(cf > 0, cf, 1.0))[None, :]
                m2s = tl.sum(devs * devs, axis=0)                               # Σ (dev / c_f)²
                c = tl.where(fm, cf, 0.0)
                # the block's Σ_f var_f = C² · Σ_f m2_f (c_f / C)² / n, C = max_f c_f
                C = tl.max(c, axis=0)
                rc = c / tl.where(C > 0, C, 1.0)
                cm, acc = merge_block_spread(cm, acc, C,
                                              tl.sum(m2s * rc * rc, axis=0) * inv_n)
    else:          # an empty set: means 0, σ = 1
        for f0 in range(0, F, BF):
            offs_f = f0 + tl.arange(0, BF)
            tl.store(mean_b + offs_f, tl.zeros([BF], tl.float32), mask=offs_f < F)
    # the unscaled blocks join once (a merge per block divides: ~20 instructions; scale 0 when
    # there were none, so that 1 does not swamp a set of tiny features' scale)
    cm, acc = merge_block_spread(cm, acc, tl.where(acc1 > 0, 1.0, 0.0), acc1)
    return store_spread(cm, acc, F, s_b, root_b)

