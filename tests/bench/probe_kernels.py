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
