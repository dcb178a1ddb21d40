"""Which solver weights each method reads (DESIGN §3): a layer owns a learnable parameter only
for those, so that every parameter receives a gradient (DDP without find_unused_parameters)."""
from __future__ import annotations

from .weights import WEIGHT_NAMES


def used_weights(method: str, structure: bool) -> tuple:
    """Names of the weights the solver of ``method`` reads: Sinkhorn has no ρ (and reads τ only
    with α0 > 0, the proximal outer loop); Bregman ADMM has no τ; α0 only with the structure
    term."""
    used = {"a1", "a2", "a3"}
    if structure:
        used.add("a0")
    if method == "sinkhorn":
        if structure:
            used.add("tau")
    else:
        used.add("rho")
    return tuple(n for n in WEIGHT_NAMES if n in used)


def restrict_learning(method: str, weights: dict) -> dict:
    """The weight keyword arguments with ``learn_<name>=False`` for every weight ``method`` does
    not read; an explicit ``learn_<name>=True`` for such a weight is a ValueError. Values of
    unused weights are accepted (a shared kwargs dict may carry ρ to a Sinkhorn head)."""
    structure = bool(weights.get("learn_a0", False)) or float(weights.get("a0", 0.0) or 0.0) > 0
    used = used_weights(method, structure)
    out = dict(weights)
    for name in WEIGHT_NAMES:
        if name in used:
            continue
        if out.get(f"learn_{name}") is True:
            raise ValueError(f"learn_{name}=True, but method={method!r}"
                             f"{' with a0 > 0' if structure else ''} does not use {name}: the "
                             f"parameter would never receive a gradient")
        out[f"learn_{name}"] = False
    return out


def describe_used(weights, method: str) -> str:
    """``a1=100*, a2=1*, ...`` for the weights ``method`` reads (learnable ones marked ``*``)."""
    used = used_weights(method, weights.structure)
    return ", ".join(f"{n}={weights.init[n]:g}{'*' if weights.learn[n] else ''}" for n in used)
