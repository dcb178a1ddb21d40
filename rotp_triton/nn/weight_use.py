"""Which solver weights each method reads (DESIGN §3): a layer owns a learnable parameter only
for those, so that every parameter receives a gradient (DDP without find_unused_parameters)."""
from __future__ import annotations

from .weights import WEIGHT_NAMES


def used_weights(method: str, structure: bool, variant: str = "exact",
                 num_iters: int = 2) -> tuple:
    """Names of the weights the solver of ``method`` reads: Sinkhorn has no ρ (and reads τ only
    with α0 > 0, the proximal outer loop); Bregman ADMM has no τ; α0 only with the structure
    term. Bregman ADMM outputs the P of the last module's P-step, so what only its S-step reads
    (α3; α1 for B-E) reaches the output only with T ≥ 2 modules; the paper's variant updates μ
    (α2) and η (α3) at the end of a module, for the next one: α2 needs T ≥ 2, α3 T ≥ 3."""
    used = {"a1", "a2", "a3"}
    if method != "sinkhorn":
        late = {"a3"} | ({"a1"} if method == "badmm-e" else set())
        if variant == "paper":
            late.add("a2")
        if num_iters < 2:
            used -= late
        if variant == "paper" and num_iters < 3:
            used.discard("a3")
    if structure:
        used.add("a0")
    if method == "sinkhorn":
        if structure:
            used.add("tau")
    else:
        used.add("rho")
    return tuple(n for n in WEIGHT_NAMES if n in used)


def restrict_learning(method: str, weights: dict, variant: str = "exact",
                      num_iters: int = 2) -> dict:
    """The weight keyword arguments with ``learn_<name>=False`` for every weight ``method`` does
    not read; an explicit ``learn_<name>=True`` for such a weight is a ValueError. Values of
    unused weights are accepted (a shared kwargs dict may carry ρ to a Sinkhorn head)."""
    structure = bool(weights.get("learn_a0", False)) or float(weights.get("a0", 0.0) or 0.0) > 0
    used = used_weights(method, structure, variant, num_iters)
    out = dict(weights)
    for name in WEIGHT_NAMES:
        if name in used:
            continue
        if out.get(f"learn_{name}") is True:
            raise ValueError(f"learn_{name}=True, but method={method!r}, variant={variant!r}, "
                             f"num_iters={num_iters}{' with a0 > 0' if structure else ''} does "
                             f"not use {name}: the parameter would never receive a gradient")
        out[f"learn_{name}"] = False
    return out


def describe_used(weights, method: str, variant: str = "exact") -> str:
    """``a1=100*, a2=1*, ...`` for the weights ``method`` reads (learnable ones marked ``*``)."""
    used = used_weights(method, weights.structure, variant, weights.num_iters)
    return ", ".join(f"{n}={weights.init[n]:g}{'*' if weights.learn[n] else ''}" for n in used)
