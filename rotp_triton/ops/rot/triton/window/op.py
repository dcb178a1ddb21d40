"""TEMPORARY shim (branch layout): ``window_pool`` with the contract's signature over today's
``triton_window.py`` (its (T, 6) parameter table is built there with torch ops; the real
package reads the (6, T) weight table on chip). Replaced by the window package at integration."""
from ...params import A1, A2, A3, RHO

IS_SHIM = True  # tests count this module's eager ops apart (they vanish with the real package)


def window_pool(x, w, *, kernel_size, stride, padding, ceil_mode, method, variant):
    from ... import triton_window  # looked up per call: tests may patch rot_pool2d_triton
    return triton_window.rot_pool2d_triton(x, kernel_size, stride, padding, ceil_mode,
                                           method=method, variant=variant, a1=w[A1], a2=w[A2],
                                           a3=w[A3], rho=w[RHO], num_iters=w.shape[1])
