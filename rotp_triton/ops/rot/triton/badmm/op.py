"""TEMPORARY shim (branch layout): ``badmm_pool`` with the contract's signature over today's
``triton_badmm.py`` (through ``triton_set.rot_pool_triton``, which tests patch). The κ rows
are built there with torch ops; the real package computes them on chip. Replaced by the badmm
package at integration."""
from ...params import A1, A2, A3, RHO

IS_SHIM = True  # tests count this module's eager ops apart (they vanish with the real package)


def badmm_pool(x, ptr, w, log_p0, log_q0, *, quadratic, variant, return_plan):
    from ... import triton_set
    return triton_set.rot_pool_triton(x, ptr, method="badmm-q" if quadratic else "badmm-e",
                                      variant=variant, a1=w[A1], a2=w[A2], a3=w[A3],
                                      rho=w[RHO], log_p0=log_p0, log_q0=log_q0,
                                      return_plan=return_plan)
