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
