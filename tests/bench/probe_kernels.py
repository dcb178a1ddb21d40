"""Small kernels whose SASS counts are known, for tests/bench/test_sass_reader.py."""
import triton
import triton.language as tl


@triton.jit
def exp2_loop_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """y = exp2(x) over n elements, one program looping over BLOCK-sized tiles: one MUFU.EX2 per
    element in the loop."""
    offs = tl.arange(0, BLOCK)                                      # [BLOCK]
    for start in range(0, n, BLOCK):
        m = start + offs < n
        x = tl.load(x_ptr + start + offs, mask=m, other=0.0)
        tl.store(y_ptr + start + offs, tl.exp2(x), mask=m)


@triton.jit
def block_sum_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    """y[0] = sum of a BLOCK tile: a cross-warp reduction (SHFL within warps, BAR across)."""
    offs = tl.arange(0, BLOCK)                                      # [BLOCK]
    tl.store(y_ptr, tl.sum(tl.load(x_ptr + offs), axis=0))


@triton.jit
def _scaled_exp2_sum(x_ptr, n, s, BLOCK: tl.constexpr):
    """Σ 2^(x s) over n elements in BLOCK-sized tiles."""
    offs = tl.arange(0, BLOCK)                                      # [BLOCK]
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        m = start + offs < n
        acc += tl.where(m, tl.exp2(tl.load(x_ptr + start + offs, mask=m, other=0.0) * s), 0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def fallback_sum_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """y[0] = Σ 2^x over n elements; where that is below 2^-100 (never for finite x of moderate
    size), the sum again with x halved: the same tile loop twice, once in a branch not taken."""
    total = _scaled_exp2_sum(x_ptr, n, 1.0, BLOCK)
    if total < 2.0 ** -100:
        total = _scaled_exp2_sum(x_ptr, n, 0.5, BLOCK)
    tl.store(y_ptr, total)


@triton.jit
def replay_kernel(x_ptr, r_ptr, y_ptr, n, BN: tl.constexpr, BD: tl.constexpr):
    """The shape of the B-ADMM replay: a [BN, BD] tile held in registers, n trips that each load
    a [BN] row vector (replicated across the lanes of a row) and take two exp2 per element in
    one statement: 2 MUFU.EX2 per element a trip, whatever ptxas's unroll."""
    offs_n = tl.arange(0, BN)                                                         # [BN]
    offs_d = tl.arange(0, BD)                                                         # [BD]
    x = tl.load(x_ptr + offs_n[:, None] * BD + offs_d[None, :])                      # [BN, BD]
    acc = tl.zeros([BN, BD], tl.float32)
    for k in range(n):
        row = tl.load(r_ptr + k * BN + offs_n)                                        # [BN]
        acc += tl.exp2(x - row[:, None]) + tl.exp2(acc * 0.5)
    tl.store(y_ptr + offs_n[:, None] * BD + offs_d[None, :], acc)


@triton.jit
def static_copies_kernel(x_ptr, y_ptr, n, C: tl.constexpr, BLOCK: tl.constexpr):
    """n trips of a loop whose body holds C copies of one exp2 statement (tl.static_range): the
    statement runs n·C times, the loop n."""
    offs = tl.arange(0, BLOCK)                                                        # [BLOCK]
    x = tl.load(x_ptr + offs)
    acc = tl.zeros([BLOCK], tl.float32)
    for k in range(n):
        acc += k
        for i in tl.static_range(C):
            acc = tl.exp2(acc * 0.5 + x * i)
    tl.store(y_ptr + offs, acc)


@triton.jit
def small_body_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """n trips of a small loop body (one element per thread a trip, one exp2 and an online
    sum): ptxas unrolls it and keeps a remainder loop of the same statements."""
    offs = tl.arange(0, BLOCK)                                                        # [BLOCK]
    acc = tl.zeros([BLOCK], tl.float32)
    for k in range(n):
        v = tl.load(x_ptr + k * BLOCK + offs)
        acc = acc * 0.5 + tl.exp2(v)
    tl.store(y_ptr + offs, acc)


@triton.jit
def persistent_kernel(x_ptr, y_ptr, B, BLOCK: tl.constexpr):
    """y = exp2(x) over B tiles of BLOCK, program p taking tiles p, p + P, ... (P programs): the
    trip count is an integer division (MUFU.RCP), which ptxas evaluates before the loop and
    again in it - an instruction of the loop's statement outside it that is no peeled trip."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)                                                        # [BLOCK]
    for it in range(0, tl.cdiv(B - pid, nprog)):
        b = pid + it * nprog
        v = tl.load(x_ptr + b * BLOCK + offs)
        tl.store(y_ptr + b * BLOCK + offs, tl.exp2(v))


@triton.jit(do_not_specialize=["first"])
def first_trip_kernel(x_ptr, y_ptr, n, first, BLOCK: tl.constexpr):
    """n trips of a loop whose trip k == ``first`` takes a long branch (a dozen statements, two
    exp2 per element) and the others a short one (one exp2): most of the loop's instructions
    run once and the loop n times, as in the Sinkhorn forward's iteration loop (its t = 0
    branch)."""
    offs = tl.arange(0, BLOCK)                                                        # [BLOCK]
    acc = tl.zeros([BLOCK], tl.float32)
    for k in range(n):
        v = tl.load(x_ptr + k * BLOCK + offs)
        acc = acc * 0.5 + v
        if k == first:
            a = v * 1.5 + 0.25
            b = tl.sqrt(a * a + 1.0)
            c = tl.exp2(a - b)
            d = c * c + a * 0.75
            e = tl.maximum(d, b) - tl.minimum(d, c)
            g = e * e * 0.125 + d
            h = tl.where(g > a, g - a, a - g)
            i = tl.exp2(h * -0.5)
            j = (i + c) * (b - 0.5)
            acc += j / (1.0 + e * e)
        else:
            acc += tl.exp2(v)
    tl.store(y_ptr + offs, acc)


@triton.jit
def inlined_pass_kernel(x_ptr, v_ptr, y_ptr, n, BLOCK: tl.constexpr, V: tl.constexpr):
    """n trips of a loop whose body holds, besides one exp2 per element, a pass of V tiles
    with a constant trip count, which the compiler unrolls into the body: its loads move V
    tiles a trip, yet the body is no V-fold copy of the loop's (the Sinkhorn forward's
    iteration loop and its vector passes over the features)."""
    offs = tl.arange(0, BLOCK)                                                        # [BLOCK]
    acc = tl.zeros([BLOCK], tl.float32)
    for k in range(n):
        acc = acc * 0.5 + tl.exp2(tl.load(x_ptr + k * BLOCK + offs))
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        for j in range(0, V * BLOCK, BLOCK):
            m = tl.maximum(m, tl.load(v_ptr + (k * V) * BLOCK + j + offs))
        acc += m
    tl.store(y_ptr + offs, acc)
