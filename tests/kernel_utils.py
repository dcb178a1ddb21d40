"""Former name of the shared test helpers: everything now lives in ``harness.py``."""
from harness import (DEVICE, KERNEL_DTYPES, ON_CUDA, RTOL, rel_err,  # noqa: F401
                     run_without_interpreter)
