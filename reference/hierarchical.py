"""Reference hierarchical ROT pooling (DESIGN §5, paper eqs. 13 and 14), per set, plain PyTorch.

Paper notation: a set is X in R^{D x N}; f_rot(X; theta) in R^D is `rot_pool_set(X, **theta)[0]`.
This module must never import rotp_triton.
"""

import torch

from .rot import rot_pool_set

__all__ = ["f_rot", "mixed_pool", "set_fusion_pool"]


def f_rot(X, theta):
    """f_rot(X; theta): the pooled (D,) vector of one set X (D x N); an empty set gives 0."""
    D, N = X.shape
    if N == 0:
        return X.new_zeros(D)
    return rot_pool_set(X, **theta)[0]


def mixed_pool(X, heads, final):
    """Eq. (13), mixed pooling: f_rot([f_rot(X; theta_1), ..., f_rot(X; theta_M)]; theta_{M+1}).

    heads: list of M kw dicts theta_1..theta_M for rot_log_plan; final: kw dict theta_{M+1}.
    The M pooled (D,) vectors are the columns of a D x M matrix, pooled by a final ROTP over its
    M columns.  Returns (D,).
    """
    Y = torch.stack([f_rot(X, theta) for theta in heads], dim=1)  # D x M
    return f_rot(Y, final)


def set_fusion_pool(Xs, inner, outer, g=None):
    """Eq. (14), set fusion: f_rot(||_m g(f_rot(X_m; theta_1)); theta_2) for a set of sets.

    Xs: list of M sets X_m (D x N_m); inner = theta_1 (shared by all member sets); optional g
    (callable (D,) -> (D',), e.g. an MLP); outer = theta_2, a ROTP over the M columns
    [g(y_1) ... g(y_M)] (D' x M).  Returns (D',).
    """
    cols = []
    for X_m in Xs:
        y_m = f_rot(X_m, inner)  # y_m = f_rot(X_m; theta_1)
        cols.append(g(y_m) if g is not None else y_m)
    Z = torch.stack(cols, dim=1)  # D' x M
    return f_rot(Z, outer)
