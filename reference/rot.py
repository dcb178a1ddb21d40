"""Reference oracle for ROT pooling (Xu & Cheng, TPAMI 2023), as specified by DESIGN.md §1-5.

A plain, literal, per-set transcription in PyTorch.  Paper notation throughout:

    one set      X  in R^{D x N}   (D features = rows d, N samples = columns n)
    a plan       P  in R^{D x N}   (same layout as X)
    priors       p0 in Delta^D (over features d), q0 in Delta^N (over samples n)

Only `rot_pool_sets` speaks the code layout (rows = samples, x in R^{N x D}); it transposes.

The problem (DESIGN §2, paper eq. 3), over Omega = {P > 0, 1^T P 1 = 1}:

    min_P  <-X, P> - a0 tr(S1 P S2 P^T) + a1 R(P) + a2 KL(P 1_N | p0) + a3 KL(P^T 1_D | q0)

with R(P) = <P, log P - 1> (entropic) or ||P||_F^2 (quadratic) and the generalized
KL(a|b) = <a, log a - log b> - <a - b, 1>.

No batching, no performance tricks; every function works in the dtype it is given and is
differentiable by autograd.  This module must never import rotp_triton.
"""

import math

import torch

__all__ = [
    "kappa",
    "lognorm",
    "structure_matrices",
    "pool_from_log_plan",
    "rot_log_plan",
    "rot_pool_set",
    "rot_pool_sets",
    "rot_objective",
    "METHODS",
    "VARIANTS",
]

METHODS = ("sinkhorn", "badmm-e", "badmm-q")
VARIANTS = ("exact", "paper")


# ----------------------------------------------------------------------------------------------
# Small helpers (DESIGN §2, last bullet)
# ----------------------------------------------------------------------------------------------
def kappa(alpha, w):
    """kappa(alpha, w) = alpha / (alpha + w) in [0, 1]; kappa = 1 when alpha = +inf.

    Evaluated with a safe denominator so that autograd never sees inf/inf (no NaN gradient
    at alpha = inf: the gradient with respect to alpha there is 0, the derivative of the limit).
    """
    if not torch.is_tensor(alpha):
        alpha = torch.as_tensor(alpha, dtype=w.dtype if torch.is_tensor(w) else torch.get_default_dtype())
    is_inf = torch.isinf(alpha)
    safe_alpha = torch.where(is_inf, torch.ones_like(alpha), alpha)  # never inf in the division
    k = safe_alpha / (safe_alpha + w)
    return torch.where(is_inf, torch.ones_like(k), k)


def lognorm(v):
    """lognorm(v) = v - LSE(v), the log of softmax(v) (over all entries of the vector v)."""
    return v - torch.logsumexp(v, dim=0)


def _lse_n(Y):
    """LSE over samples n (per row d): R_d = log sum_n exp(Y_dn); returns (D,)."""
    return torch.logsumexp(Y, dim=1)


def _lse_d(Y):
    """LSE over features d (per column n): C_n = log sum_d exp(Y_dn); returns (N,)."""
    return torch.logsumexp(Y, dim=0)


def _row(v):
    """v (D,) -> v 1_N^T as a (D, 1) column that broadcasts over n."""
    return v[:, None]


def _col(v):
    """v (N,) -> 1_D v^T as a (1, N) row that broadcasts over d."""
    return v[None, :]


# ----------------------------------------------------------------------------------------------
# Structure matrices (DESIGN §2)
# ----------------------------------------------------------------------------------------------
def structure_matrices(X):
    """Sigma1 (D x D) and Sigma2 (N x N) of one set X (D x N), DESIGN §2.

    Sigma1 = (1/N)(X - mu1 1^T)(X - mu1 1^T)^T,  mu1 = X 1_N / N   (feature covariance)
    Sigma2 = (1/D)(X - 1 mu2^T)^T(X - 1 mu2^T),  mu2 = X^T 1_D / D (sample covariance)
    each divided by its own largest diagonal entry (left as zeros if that entry is 0).
    """
    D, N = X.shape
    mu1 = X.mean(dim=1)  # (D,)
    Xc1 = X - mu1[:, None]  # X - mu1 1^T
    Sigma1 = Xc1 @ Xc1.T / N  # (D, D)
    mu2 = X.mean(dim=0)  # (N,)
    Xc2 = X - mu2[None, :]  # X - 1 mu2^T
    Sigma2 = Xc2.T @ Xc2 / D  # (N, N)

    def _scale(S):
        m = torch.diagonal(S).max()
        # m == 0 only if S == 0 (PSD): divide by 1 then, leaving the zeros.
        return S / torch.where(m > 0, m, torch.ones_like(m))

    return _scale(Sigma1), _scale(Sigma2)


def _gw_term(Sigma1, P, Sigma2):
    """Sigma1 P Sigma2 (D x N): the gradient direction of the structure term tr(S1 P S2 P^T).
    Zero when the structure term is absent (alpha0 = 0: Sigma1 = Sigma2 = None)."""
    if Sigma1 is None:
        return torch.zeros_like(P)
    return Sigma1 @ P @ Sigma2


# ----------------------------------------------------------------------------------------------
# Pooling from a plan (eq. 1 / eq. 5)
# ----------------------------------------------------------------------------------------------
def pool_from_log_plan(log_P, X):
    """Eq. (5): y_d = sum_n P_dn X_dn / sum_n P_dn = sum_n softmax_n(log P_d.) X_dn; (D,)."""
    return (torch.softmax(log_P, dim=1) * X).sum(dim=1)


# ----------------------------------------------------------------------------------------------
# Weights: float, inf, 0-d tensor or (T,) tensor; module t uses entry t.
# ----------------------------------------------------------------------------------------------
def _weight_at(w, t, T, X, name):
    """Entry t of a weight (float / 0-d / (T,) or (1,) tensor), as a 0-d tensor in X's dtype."""
    if not torch.is_tensor(w):
        return torch.tensor(float(w), dtype=X.dtype, device=X.device)
    w = w.to(dtype=X.dtype, device=X.device)
    if w.dim() == 0:
        return w
    if w.dim() == 1 and w.shape[0] == T:
        return w[t]
    if w.dim() == 1 and w.shape[0] == 1:
        return w[0]
    raise ValueError(f"weight {name} must be a float, a 0-d tensor or a ({T},) tensor; got shape {tuple(w.shape)}")


def _uses_structure(a0):
    """structure=None rule: the alpha0 > 0 algorithm iff a0 requires grad or any entry > 0."""
    if torch.is_tensor(a0):
        return bool(a0.requires_grad) or bool((a0.detach() > 0).any())
    return float(a0) > 0


# ----------------------------------------------------------------------------------------------
# DESIGN §3.1  variant="exact"
# ----------------------------------------------------------------------------------------------
def _exact_sinkhorn_iteration(Xe, a, b, log_p0, log_q0, k2, k3):
    """One alternating (Gauss-Seidel) iteration of the mass-constrained unbalanced Sinkhorn
    update on the scaled score Xe = X / eps (DESIGN §3.1; the corrected eq. (18)):

        R = LSE_n(Xe + 1 b^T);  a = lognorm(k2 log p0 + (1 - k2) R) - R
        C = LSE_d(Xe + a 1^T);  b = lognorm(k3 log q0 + (1 - k3) C) - C
    """
    R = _lse_n(Xe + _col(b))
    a = lognorm(k2 * log_p0 + (1 - k2) * R) - R
    C = _lse_d(Xe + _row(a))
    b = lognorm(k3 * log_q0 + (1 - k3) * C) - C
    return a, b


def _exact_sinkhorn_uot(X, log_p0, log_q0, w, T):
    """Sinkhorn (S), alpha0 = 0: one module of T alternating iterations, eps_t = a1[t]."""
    D, N = X.shape
    a = X.new_zeros(D)  # a = 0_D
    b = X.new_zeros(N)  # b = 0_N
    eps = None
    for t in range(T):
        eps = w("a1", t)
        k2 = kappa(w("a2", t), eps)
        k3 = kappa(w("a3", t), eps)
        a, b = _exact_sinkhorn_iteration(X / eps, a, b, log_p0, log_q0, k2, k3)
    # log P = X/eps + a 1^T + 1 b^T  with the last eps
    return X / eps + _row(a) + _col(b)


def _exact_sinkhorn_rot(X, Sigma1, Sigma2, log_p0, log_q0, w, T, K):
    """Sinkhorn, alpha0 > 0: proximal point (paper Alg. 1 outer loop), K inner iterations.

    P^0 = p0 q0^T; for t < T:  C_t = -X - a0 S1 P S2 - tau log P,  eps = a1 + tau,
    K iterations of the update above on -C_t / eps from a = b = 0; P = exp(Y).
    """
    D, N = X.shape
    log_P = _row(log_p0) + _col(log_q0)  # log(p0 q0^T)
    for t in range(T):
        a0, a1, tau = w("a0", t), w("a1", t), w("tau", t)
        eps = a1 + tau
        k2 = kappa(w("a2", t), eps)
        k3 = kappa(w("a3", t), eps)
        P = torch.exp(log_P)
        cost = -X - a0 * _gw_term(Sigma1, P, Sigma2) - tau * log_P  # C_t
        a = X.new_zeros(D)
        b = X.new_zeros(N)
        for _ in range(K):
            a, b = _exact_sinkhorn_iteration(-cost / eps, a, b, log_p0, log_q0, k2, k3)
        log_P = -cost / eps + _row(a) + _col(b)  # Y = -C_t/eps + a 1^T + 1 b^T
    return log_P


def _exact_badmm(X, Sigma1, Sigma2, log_p0, log_q0, w, T, quadratic):
    """Bregman ADMM (B-E entropic / B-Q quadratic), two blocks P = S with dual Z (DESIGN §3.1).

    P-step: G = X + a0 S1 S S2 - Z [B-Q: - a1 S];  Y = log S + G/wP;  R = LSE_n(Y)
            log mu = lognorm(k2 log p0 + (1 - k2) R), k2 = kappa(a2, wP);  log P = Y + (log mu - R) 1^T
            wP = rho (B-E), rho + a1 (B-Q, see below)
    S-step: H = Z + a0 S1 P S2
            B-E: Y = (H + rho log P)/(a1 + rho), w = a1 + rho;   B-Q: Y = log P + (H - a1 P)/(rho + a1), w = rho + a1
            C = LSE_d(Y);  log eta = lognorm(k3 log q0 + (1 - k3) C), k3 = kappa(a3, w);  log S = Y + 1 (log eta - C)^T
    dual:   Z = Z + rho (P - S)

    B-Q step (a deliberate change from DESIGN §3.1, which divides by rho): each block carries half
    of the quadratic, (a1/2)||P||^2 and (a1/2)||S||^2, linearised at the other block (gradient
    a1 S in the P-step, a1 P in the S-step).  Both blocks have total mass 1, so by Pinsker
    (a1/2)||P - S||_2^2 <= (a1/2)||P - S||_1^2 <= a1 KL(P|S): adding a1 KL(P|S) to the linearisation
    gives a majorizer of the block's subproblem, whose minimizer is the step above with weight
    rho + a1.  Elementwise, log P <- log S - a1 S/(rho + a1) + ... has derivative
    1 - a1 S/(rho + a1) in [rho/(rho + a1), 1] (S <= 1): a non-expansion for every a1/rho, where the
    spec's 1 - a1 S/rho is < -1 (chaotic) once a1 S > 2 rho.  A fixed point (P = S) does not
    depend on the step weight (the row/column corrections there equal a2 log(P1/p0), a3 log(P^T 1/q0)
    up to constants whatever wP, w), so the optimum of DESIGN §2 is unchanged.
    """
    log_S = _row(log_p0) + _col(log_q0)  # log S = log(p0 q0^T)
    Z = torch.zeros_like(X)
    log_P = log_S
    for t in range(T):
        a0, a1, a2, a3, rho = w("a0", t), w("a1", t), w("a2", t), w("a3", t), w("rho", t)
        S = torch.exp(log_S)
        # P-step
        G = X + a0 * _gw_term(Sigma1, S, Sigma2) - Z
        wP = rho
        if quadratic:
            G = G - a1 * S
            wP = rho + a1  # majorized linearisation (docstring)
        Y = log_S + G / wP
        R = _lse_n(Y)
        log_mu = lognorm(kappa(a2, wP) * log_p0 + (1 - kappa(a2, wP)) * R)
        log_P = Y + _row(log_mu - R)
        P = torch.exp(log_P)
        # S-step
        H = Z + a0 * _gw_term(Sigma1, P, Sigma2)
        if quadratic:
            wS = rho + a1  # majorized linearisation (docstring)
            Y = log_P + (H - a1 * P) / wS
        else:
            Y = (H + rho * log_P) / (a1 + rho)
            wS = a1 + rho
        C = _lse_d(Y)
        k3 = kappa(a3, wS)
        log_eta = lognorm(k3 * log_q0 + (1 - k3) * C)
        log_S = Y + _col(log_eta - C)
        S = torch.exp(log_S)
        # dual
        Z = Z + rho * (P - S)
    return log_P


# ----------------------------------------------------------------------------------------------
# DESIGN §3.2  variant="paper" (the published algorithms)
# ----------------------------------------------------------------------------------------------
def _paper_sinkhorn_step(Y, a, b, log_p0, log_q0, a11, k2, k3):
    """One iteration of eq. (18) as printed: Jacobi updates of a and b from the SAME Y, with the
    a/a1' (b/a1') factor:

        a = a2/(a1'+a2) (a/a1' + log p0 - LSE_n Y),   b = a3/(a1'+a3) (b/a1' + log q0 - LSE_d Y)
    """
    R = _lse_n(Y)  # per d
    C = _lse_d(Y)  # per n
    a = k2 * (a / a11 + log_p0 - R)
    b = k3 * (b / a11 + log_q0 - C)
    return a, b


def _paper_sinkhorn_uot(X, log_p0, log_q0, w, T):
    """Eq. (18), alpha0 = 0, tau = 0: a single module of T Jacobi iterations; log P = Y.
    (The official code's uot_sinkhorn has tau = 0 in one revision and tau = 1 in another;
    DESIGN §3.2 fixes tau = 0.)"""
    D, N = X.shape
    a = X.new_zeros(D)
    b = X.new_zeros(N)
    Y = X / w("a1", 0)  # Y = X / a1[0]
    for t in range(T):
        a11 = w("a1", t)
        a, b = _paper_sinkhorn_step(Y, a, b, log_p0, log_q0, a11,
                                    kappa(w("a2", t), a11), kappa(w("a3", t), a11))
        Y = X / a11 + _row(a) + _col(b)
    return Y


def _paper_sinkhorn_rot(X, Sigma1, Sigma2, log_p0, log_q0, w, T, K):
    """Alg. 1: T proximal outer iterations, each K inner Jacobi iterations of eq. (18)."""
    D, N = X.shape
    log_P = _row(log_p0) + _col(log_q0)  # log(p0 q0^T)
    for t in range(T):
        a0, tau = w("a0", t), w("tau", t)
        a11 = w("a1", t) + tau  # a1' = a1 + tau
        k2 = kappa(w("a2", t), a11)
        k3 = kappa(w("a3", t), a11)
        P = torch.exp(log_P)  # unnormalized, as the algorithm leaves it
        cost = -X - a0 * _gw_term(Sigma1, P, Sigma2) - tau * log_P
        a = X.new_zeros(D)
        b = X.new_zeros(N)
        Y = -cost / a11
        for _ in range(K):
            a, b = _paper_sinkhorn_step(Y, a, b, log_p0, log_q0, a11, k2, k3)
            Y = -cost / a11 + _row(a) + _col(b)
        log_P = Y
    return log_P


def _paper_badmm(X, Sigma1, Sigma2, log_p0, log_q0, w, T, quadratic):
    """Alg. 2, eqs. (23)-(28): B-E (entropic) / B-Q (quadratic) with marginal variables mu, eta
    and duals Z, z1, z2."""
    D, N = X.shape
    log_S = _row(log_p0) + _col(log_q0)  # log S = log(p0 q0^T)
    log_P = log_S
    log_mu = log_p0
    log_eta = log_q0
    Z = torch.zeros_like(X)
    z1 = X.new_zeros(D)
    z2 = X.new_zeros(N)
    for t in range(T):
        a0, a1, a2, a3, rho = w("a0", t), w("a1", t), w("a2", t), w("a3", t), w("rho", t)
        S = torch.exp(log_S)
        # eq. (23) P-step: rows of P normalized to mu
        G = X + a0 * _gw_term(Sigma1, S, Sigma2) - Z
        if quadratic:
            G = G - a1 * S
        Y = G / rho + log_S
        log_P = Y + _row(log_mu - _lse_n(Y))
        P = torch.exp(log_P)
        # eq. (24) S-step: columns of S normalized to eta
        if quadratic:
            Y = (Z + a0 * _gw_term(Sigma1, P, Sigma2) - a1 * P) / rho + log_P
        else:
            Y = (Z + a0 * _gw_term(Sigma1, P, Sigma2) + rho * log_P) / (a1 + rho)
        log_S = Y + _col(log_eta - _lse_d(Y))
        S = torch.exp(log_S)
        # eq. (25) dual of P = S
        Z = Z + rho * (P - S)
        # eqs. (26), (27): log mu = lognorm((rho log mu + a2 log p0 - z1)/(rho + a2)), written
        # through kappa so that a2 = inf gives log p0 (likewise eta with a3, q0, z2)
        k2 = kappa(a2, rho)
        log_mu = lognorm((1 - k2) * (log_mu - z1 / rho) + k2 * log_p0)
        k3 = kappa(a3, rho)
        log_eta = lognorm((1 - k3) * (log_eta - z2 / rho) + k3 * log_q0)
        # eq. (28) duals of P 1 = mu (uses P) and S^T 1 = eta (uses S)
        z1 = z1 + rho * (torch.exp(log_mu) - P.sum(dim=1))
        z2 = z2 + rho * (torch.exp(log_eta) - S.sum(dim=0))
    return log_P


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------
def rot_log_plan(X, *, method="badmm-e", variant="exact", num_iters=4, inner_iters=5,
                 a0=0.0, a1=1.0, a2=1.0, a3=1.0, rho=1.0, tau=1.0, p0=None, q0=None, structure=None):
    """log P (D x N) of one set X (D x N) after `num_iters` unrolled modules (unnormalized, as the
    algorithm leaves it).

    Each weight is a float, float('inf') (a2, a3), a 0-d tensor or a (T,) tensor (entry t used by
    module t).  p0 (D,), q0 (N,) are probability vectors, None = uniform.  structure=None means
    the alpha0 > 0 algorithm iff a0 requires grad or has an entry > 0.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if X.dim() != 2:
        raise ValueError(f"X must be (D, N), got shape {tuple(X.shape)}")
    D, N = X.shape
    T = int(num_iters)
    K = int(inner_iters)
    if p0 is None:
        p0 = X.new_full((D,), 1.0 / D)
    if q0 is None:
        q0 = X.new_full((N,), 1.0 / N)
    log_p0 = torch.log(p0.to(X.dtype))
    log_q0 = torch.log(q0.to(X.dtype))
    weights = dict(a0=a0, a1=a1, a2=a2, a3=a3, rho=rho, tau=tau)

    def w(name, t):
        return _weight_at(weights[name], t, T, X, name)

    if structure is None:
        structure = _uses_structure(a0)
    if structure:
        Sigma1, Sigma2 = structure_matrices(X)
    else:
        # alpha0 = 0: no structure term (a0 * S1 P S2 is taken as 0)
        Sigma1 = Sigma2 = None
        weights["a0"] = 0.0

    if variant == "exact":
        if method == "sinkhorn":
            if structure:
                return _exact_sinkhorn_rot(X, Sigma1, Sigma2, log_p0, log_q0, w, T, K)
            return _exact_sinkhorn_uot(X, log_p0, log_q0, w, T)
        return _exact_badmm(X, Sigma1, Sigma2, log_p0, log_q0, w, T, quadratic=(method == "badmm-q"))
    # variant == "paper"
    if method == "sinkhorn":
        if structure:
            return _paper_sinkhorn_rot(X, Sigma1, Sigma2, log_p0, log_q0, w, T, K)
        return _paper_sinkhorn_uot(X, log_p0, log_q0, w, T)
    return _paper_badmm(X, Sigma1, Sigma2, log_p0, log_q0, w, T, quadratic=(method == "badmm-q"))


def rot_pool_set(X, **kw):
    """f_rot(X): pooled y (D,) by eq. (5) and the plan P (D x N) normalized to total mass 1."""
    log_P = rot_log_plan(X, **kw)
    y = pool_from_log_plan(log_P, X)
    P = torch.exp(log_P - torch.logsumexp(log_P.reshape(-1), dim=0))
    return y, P


def rot_pool_sets(xs, p0s=None, q0s=None, **kw):
    """Loop of rot_pool_set over sets given in CODE layout (rows = samples).

    xs: list of (N_b, D) tensors.  p0s: None, a list of (D,) tensors / None, or a (B, D) tensor.
    q0s: None, a list of (N_b,) tensors / None, or one (sum_b N_b,) tensor (split by set sizes).
    Returns Y (B, D) and the plans in code layout, (N_b, D) each summing to 1; an empty set
    (N_b = 0) gives y = 0 and an empty (0, D) plan.
    """
    if torch.is_tensor(q0s):
        q0s = list(torch.split(q0s, [x.shape[0] for x in xs]))
    ys, plans = [], []
    for i, x in enumerate(xs):
        N, D = x.shape
        if N == 0:
            ys.append(x.new_zeros(D))
            plans.append(x.new_zeros(0, D))
            continue
        p0 = None if p0s is None else p0s[i]
        q0 = None if q0s is None else q0s[i]
        y, P = rot_pool_set(x.T, p0=p0, q0=q0, **kw)
        ys.append(y)
        plans.append(P.T)
    if len(xs) == 0:
        return torch.zeros(0, 0), plans
    return torch.stack(ys, dim=0), plans


# ----------------------------------------------------------------------------------------------
# The objective of DESIGN §2 (used by the tests to judge solutions)
# ----------------------------------------------------------------------------------------------
def _gkl(a, b):
    """Generalized KL(a|b) = <a, log a - log b> - <a - b, 1>."""
    return (a * (torch.log(a) - torch.log(b))).sum() - (a - b).sum()


def rot_objective(P, X, *, a0=0.0, a1=1.0, a2=1.0, a3=1.0, p0=None, q0=None, regularizer="entropic"):
    """DESIGN §2 / eq. (3) at a plan P (D x N) with scalar weights (a2, a3 finite):

    <-X, P> - a0 tr(S1 P S2 P^T) + a1 R(P) + a2 KL(P 1_N | p0) + a3 KL(P^T 1_D | q0)
    """
    D, N = X.shape
    if p0 is None:
        p0 = X.new_full((D,), 1.0 / D)
    if q0 is None:
        q0 = X.new_full((N,), 1.0 / N)
    if regularizer == "entropic":
        R = (P * (torch.log(P) - 1)).sum()
    elif regularizer == "quadratic":
        R = (P * P).sum()
    else:
        raise ValueError(f"regularizer must be 'entropic' or 'quadratic', got {regularizer!r}")
    value = -(X * P).sum() + a1 * R
    if (torch.is_tensor(a0) and bool((a0 != 0).any())) or (not torch.is_tensor(a0) and a0 != 0):
        Sigma1, Sigma2 = structure_matrices(X)
        value = value - a0 * torch.trace(Sigma1 @ P @ Sigma2 @ P.T)
    if not math.isinf(float(a2)):
        value = value + a2 * _gkl(P.sum(dim=1), p0)
    if not math.isinf(float(a3)):
        value = value + a3 * _gkl(P.sum(dim=0), q0)
    return value
