"""TEMPORARY shim (branch layout): ``sinkhorn_pool`` with the contract's signature over today's
``triton_set.py``. The κ rows are built here with torch ops; the real package computes them on
chip. Replaced by the sinkhorn package at integration."""
from ...params import A1, A2, A3, RHO

IS_SHIM = True  # tests count this module's eager ops apart (they vanish with the real package)


def sinkhorn_pool(x, ptr, w, log_p0, log_q0, *, variant, return_plan):
    from ... import triton_set  # looked up per call: tests may patch rot_pool_triton
    return triton_set.rot_pool_triton(x, ptr, method="sinkhorn", variant=variant, a1=w[A1],
                                      a2=w[A2], a3=w[A3], rho=w[RHO], log_p0=log_p0,
                                      log_q0=log_q0, return_plan=return_plan)
