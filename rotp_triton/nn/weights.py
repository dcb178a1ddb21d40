"""Learnable ROT weights (α0, α1, α2, α3, ρ, τ) as softplus of free parameters (DESIGN §2)."""
from __future__ import annotations

import math
from typing import Dict, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._transforms import transforms_active
from ..ops.rot.params import check_weight_values, value_checks_enabled

WEIGHT_NAMES = ("a0", "a1", "a2", "a3", "rho", "tau")

# Defaults of the modules (not of the functional rot_pool): large smoothness and ADMM penalty make
# a freshly built layer pool close to the mean (DESIGN §4: mean pooling is the α1 -> inf limit),
# so it can replace average pooling in a trained network; training moves them.
MODULE_DEFAULTS = dict(a0=0.0, a1=100.0, a2=1.0, a3=1.0, rho=100.0, tau=1.0)
LEARN_DEFAULTS = dict(a0=False, a1=True, a2=True, a3=True, rho=True, tau=False)
# learn_a0=True with a0=0 starts from this value (softplus cannot reach 0)
A0_LEARN_INIT = 0.1
# A learnable weight never goes below FLOOR_REL × its initial value (nor below MIN_WEIGHT for
# α1, ρ): Adam at a large learning rate otherwise drives softplus(raw) to subnormals, where
# x/α1 overflows (issue #16). Fixed α1, ρ below MIN_WEIGHT are rejected.
FLOOR_REL = 1e-6
MIN_WEIGHT = 1e-12


def _launchable_on(device: torch.device) -> bool:
    """Whether a Triton kernel can take tensors on ``device``."""
    if device.type == "cuda":
        return True
    from ..ops.rot.triton.common import interpreter_enabled
    return device.type == "cpu" and interpreter_enabled()


def kernels_may_run(x: Tensor, backend: str) -> bool:
    """Whether a layer's call on ``x`` may run the Triton kernels (CUDA x, or backend="triton"
    under the interpreter): then its weight table is built by one launch too."""
    if transforms_active():  # the torch path, and the table's torch ops
        return False
    return x.is_cuda or (backend == "triton" and _launchable_on(x.device))


class ROTWeights(nn.Module):
    """Holds the solver weights of one ROT layer and returns them as ``(T,)`` tensors.

    Each learnable weight is ``floor + (init - floor) * softplus(raw) / softplus(0)`` with
    ``floor = FLOOR_REL * init`` (at least ``MIN_WEIGHT`` for α1, ρ) and ``raw`` starting at 0, of
    shape ``(T,)`` when ``per_iter_params`` (one value per unrolled module, the official code's
    default) or ``(1,)``. The fixed scale makes learning move every weight by the same relative
    amount per step whatever its initial value: a layer that starts near mean pooling (α1 = ρ =
    100) trains as fast as one that starts at the paper's softplus(0) ≈ 0.69 (a plain
    ``softplus(raw)`` at raw ≈ 100 would need ~100 times more steps to halve a weight).
    Fixed weights are buffers; ``float('inf')`` is allowed for fixed ``a2``/``a3`` (hard marginal).
    """

    def __init__(self, num_iters: int, per_iter_params: bool = True, **kwargs):
        super().__init__()
        self.num_iters = num_iters
        self.per_iter_params = per_iter_params
        self.init: Dict[str, float] = {}
        self.learn: Dict[str, bool] = {}
        for name in WEIGHT_NAMES:
            v = kwargs.pop(name, MODULE_DEFAULTS[name])
            learn = kwargs.pop(f"learn_{name}", LEARN_DEFAULTS[name])
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a float, got {type(v).__name__}")
            v = float(v)
            if math.isnan(v) or v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
            if name in ("a1", "rho") and v < MIN_WEIGHT:
                raise ValueError(f"{name} must be >= {MIN_WEIGHT:g}, got {v}")
            if math.isinf(v) and (learn or name not in ("a2", "a3")):
                raise ValueError(f"{name} = inf is only allowed for a fixed (learn_{name}=False) a2 "
                                 f"or a3")
            if learn and v == 0:
                if name != "a0":
                    raise ValueError(f"a learnable {name} must start positive (softplus > 0)")
                v = A0_LEARN_INIT
            self.init[name], self.learn[name] = v, bool(learn)
            size = num_iters if per_iter_params else 1
            # the buffers' values are set by reset_parameters (_fill_constants), so that a layer
            # built on the meta device gets them there after to_empty(), as its parameters
            if learn:
                self.register_parameter(f"raw_{name}", nn.Parameter(torch.empty(size)))
                self.register_buffer(f"scale_{name}", torch.empty(()), persistent=False)
                self.register_buffer(f"floor_{name}", torch.empty(()), persistent=False)
            elif name != "a0":  # a fixed α0 stays a Python number: see forward()
                self.register_buffer(f"fixed_{name}", torch.empty(size), persistent=False)
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        self._register_table_constants()
        self.reset_parameters()

    def _floor_scale(self, name: str):
        """(floor, scale) of a learned weight: weight = scale · softplus(raw) + floor, = its
        initial value at raw = 0; Python floats, from the configuration alone."""
        v = self.init[name]
        floor = max(FLOOR_REL * v, MIN_WEIGHT if name in ("a1", "rho") else 0.0)
        return floor, (v - floor) / math.log(2.0)

    def _table_values(self):
        """The (6, T) table's constants as nested lists (see _register_table_constants)."""
        base = [[self._floor_scale(n)[0] if self.learn[n] else self.init[n]] * self.num_iters
                for n in WEIGHT_NAMES]
        scale = [self._floor_scale(n)[1] if self.learn[n] else 0.0 for n in WEIGHT_NAMES]
        return base, scale

    def _register_table_constants(self) -> None:
        """The constants of the (6, T) table in one op (``table``): the fixed weights' values
        and the learned ones' floors (``table_base``), the learned ones' softplus scales
        (``table_scale``). They depend on the configuration only, never on the parameters'
        values; non-persistent buffers, so they follow ``.to()`` and stay out of state dicts."""
        ref = next(iter(self.buffers()), None)
        kw = {} if ref is None else dict(device=ref.device, dtype=ref.dtype)
        base, scale = self._table_values()
        self.register_buffer("table_base", torch.tensor(base, **kw), persistent=False)
        self.register_buffer("table_scale", torch.tensor(scale, **kw), persistent=False)
        self.learned_rows = tuple(i for i, n in enumerate(WEIGHT_NAMES) if self.learn[n])

    def _fill_constants(self) -> None:
        """Writes every buffer's value (all are constants of the configuration)."""
        for name in WEIGHT_NAMES:
            if self.learn[name]:
                floor, scale = self._floor_scale(name)
                getattr(self, f"floor_{name}").fill_(floor)
                getattr(self, f"scale_{name}").fill_(scale)
            elif name != "a0":
                getattr(self, f"fixed_{name}").fill_(self.init[name])
        base, scale = self._table_values()
        self.table_base.copy_(torch.tensor(base, dtype=torch.float64))
        self.table_scale.copy_(torch.tensor(scale, dtype=torch.float64))

    def reset_parameters(self) -> None:
        """Raw parameters to 0 (each weight at its initial value) and every buffer written: a
        layer built under ``torch.device("meta")`` is ready after ``to_empty()`` and this."""
        with torch.no_grad():
            for name in WEIGHT_NAMES:
                if self.learn[name]:
                    getattr(self, f"raw_{name}").zero_()
            self._fill_constants()

    @property
    def structure(self) -> bool:
        """Whether the layer runs the α0 > 0 algorithms (α0 learned, or fixed above 0)."""
        return self.learn["a0"] or self.init["a0"] > 0

    def forward(self) -> Dict[str, Union[Tensor, float]]:
        """The weights as ``(T,)`` (or ``(1,)``) tensors; a fixed α0 as a Python float, so that
        the choice of algorithm (α0 = 0 or > 0) is static, also under torch.compile."""
        out = {}
        for name in WEIGHT_NAMES:
            if self.learn[name]:
                out[name] = (getattr(self, f"scale_{name}") * F.softplus(getattr(self, f"raw_{name}"))
                             + getattr(self, f"floor_{name}"))
            elif name == "a0":
                out[name] = self.init[name]
            else:
                out[name] = getattr(self, f"fixed_{name}")
        return out

    def table(self, device, dtype, *, kernels: bool = False) -> Tensor:
        """The (6, T) weight table (rows ``a0 … tau``, ops/rot/params.py) on ``device`` in
        ``dtype``, differentiable in the raw parameters: the values of :meth:`forward`.

        ``kernels``: the caller runs the Triton kernels (CUDA, or the interpreter), so one
        Triton launch builds it (and one its gradient) where it can; otherwise (CPU, float64,
        torch.compile tracing: inductor fuses them) the torch ops of :meth:`forward` and a
        ``stack``."""
        if "table_base" not in self._buffers:  # a layer pickled before the table constants
            self._register_table_constants()
        raws = [getattr(self, f"raw_{WEIGHT_NAMES[i]}") for i in self.learned_rows]
        base = self.table_base
        if (kernels and not torch.compiler.is_compiling() and base.dtype == torch.float32
                and _launchable_on(base.device)
                and all(r.dtype == torch.float32 and r.device == base.device for r in raws)):
            from ..ops.rot.triton.weights import softplus_table
            table = softplus_table(base, self.table_scale, self.learned_rows, raws,
                                   not self.per_iter_params)
        else:
            w = self()
            rows = [w[n].expand(self.num_iters) if self.learn[n] else base[i]
                    for i, n in enumerate(WEIGHT_NAMES)]
            table = torch.stack(rows)
        table = table.to(device=device, dtype=dtype)
        if raws and value_checks_enabled(table):  # a diverged training: NaN weights
            check_weight_values(table)
        return table

    def extra_repr(self) -> str:
        parts = [f"num_iters={self.num_iters}", f"per_iter_params={self.per_iter_params}"]
        for name in WEIGHT_NAMES:
            parts.append(f"{name}={self.init[name]:g}{'*' if self.learn[name] else ''}")
        return ", ".join(parts)

    def describe(self) -> str:
        """Short form for the owning layer's ``__repr__``: learnable weights marked with ``*``."""
        return ", ".join(f"{n}={self.init[n]:g}{'*' if self.learn[n] else ''}" for n in WEIGHT_NAMES)
