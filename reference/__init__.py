"""Reference oracle of rotp_triton: a literal per-set PyTorch transcription of DESIGN.md §1-5.

Never imports rotp_triton.  Paper layout: one set X is (D, N), a plan P is (D, N).
"""

from .rot import (
    METHODS,
    VARIANTS,
    kappa,
    lognorm,
    pool_from_log_plan,
    rot_log_plan,
    rot_objective,
    rot_pool_set,
    rot_pool_sets,
    structure_matrices,
)
from .hierarchical import f_rot, mixed_pool, set_fusion_pool

__all__ = [
    "METHODS",
    "VARIANTS",
    "kappa",
    "lognorm",
    "structure_matrices",
    "pool_from_log_plan",
    "rot_log_plan",
    "rot_pool_set",
    "rot_pool_sets",
    "rot_objective",
    "f_rot",
    "mixed_pool",
    "set_fusion_pool",
]
