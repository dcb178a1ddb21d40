"""The torch path as a function of a kernel family's inputs: what the kernels' backward
recomputes and differentiates when autograd records it (``create_graph=True``,
``..higher_order``), since the kernels' own backward is first order."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from ...._batching import make_set_batch
from ..higher_order import recomputed_vjp
from ..spread import normalize_by_spread, normalize_sets_by_spread
from ..torch.pool import rot_pool_padded
from ..torch.windows import adaptive_rot_pool2d_torch, rot_pool2d_torch, table_weights


def pool_sets(x: Tensor, ptr: Optional[Tensor], table: Tensor, log_p0: Optional[Tensor],
              log_q0: Optional[Tensor], *, method: str, variant: str, structure: bool = False,
              inner_iters: int = 1, return_plan: bool = False, spread: bool = False):
    """(y (B, D), plan or None) of a set family's inputs: x (B, N, D), or (rows, D) grouped by
    set with ptr (B + 1,); table (6, T); normalised log priors (B, D) / like x[..., 0] or None;
    ``spread``: s · (pooling of x / s), s each set's feature spread."""
    batch = make_set_batch(x, None, ptr, None, pad=False)
    s = None
    if spread:
        x, s = normalize_sets_by_spread(x, batch)
    y, plan = rot_pool_padded(x, batch, table, method=method, variant=variant,
                              structure=structure, num_iters=table.shape[1],
                              inner_iters=inner_iters, p0=None, q0=None, log_p0=log_p0,
                              log_q0=log_q0, return_plan=return_plan)
    return (y, plan) if s is None else (y * s, None)


def pool_windows(x: Tensor, table: Tensor, kernel_size: Sequence[int], stride: Sequence[int],
                 padding: Sequence[int], ceil_mode: bool, method: str, variant: str,
                 output_size: Sequence[int] = (), spread: bool = False) -> Tensor:
    """(B, C, Ho, Wo) of the window family's inputs (``window_pool``'s: ``output_size``
    non-empty for nn.AdaptiveAvgPool2d's windows); ``spread``: s · (pooling of x / s)."""
    s = None
    if spread:
        x, s = normalize_by_spread(x, (2, 3), x.dtype)
    kw = dict(method=method, variant=variant, num_iters=table.shape[1], inner_iters=1,
              weights=table_weights(table, structure=False))     # the kernels' α0 = 0
    if len(output_size):
        y = adaptive_rot_pool2d_torch(x, tuple(output_size), **kw)
    else:
        y = rot_pool2d_torch(x, tuple(kernel_size), tuple(stride), tuple(padding),
                             bool(ceil_mode), **kw)
    return y if s is None else (y * s).to(y.dtype)


def set_grads(ctx, inputs, grad_outputs, **kw) -> list:
    """The recorded gradients of :func:`pool_sets` for ``inputs`` = (x, ptr, table, log p0,
    log q0) (None for ptr, for what ``ctx.needs_input_grad`` leaves out and for absent ones)
    under ``grad_outputs`` = (ḡ_y, ḡ_plan)."""
    def forward(x, ptr, table, lp0, lq0):
        return pool_sets(x, ptr, table, lp0, lq0, **kw)
    return recomputed_vjp(forward, inputs, ctx.needs_input_grad[:5], grad_outputs)
