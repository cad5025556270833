"""``lipschitz_report(model, x)``: every layer's sound bound beside an empirical lower bound
(``lipschitz_lower_bound``, computed from real input pairs in float64)."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from lipnet.inputs import first_batch
from lipnet.modes import eval_mode, training_mode

from .bounds import lipschitz_bound
from .export import export
from .normalization import InputNormalization


@dataclass(frozen=True)
class LayerBound:
    """One layer: its name in the model, its type, ``lipschitz_bound`` (sound) and, with data,
    the largest ratio ||f(a) - f(b)|| / ||a - b|| found at the inputs it actually receives."""

    name: str
    type: str
    bound: float
    lower: float | None


@dataclass(frozen=True)
class LipschitzReport:
    """Per-layer bounds of a model (``rows``, in forward order for ``nn.Sequential`` models) and
    their product ``bound``, the network bound ``lipnet.certify.network_lipschitz_bound`` states."""

    rows: tuple[LayerBound, ...]

    @property
    def bound(self) -> float:
        return math.prod(r.bound for r in self.rows)

    def as_dict(self) -> dict[str, dict[str, float | str | None]]:
        return {r.name: {"type": r.type, "bound": r.bound, "lower": r.lower} for r in self.rows}

    def __str__(self) -> str:
        head = ("layer", "type", "bound (sound)", "lower (empirical)")
        cells = [head] + [(r.name, r.type, f"{r.bound:.6f}", "-" if r.lower is None else f"{r.lower:.6f}")
                          for r in self.rows]
        widths = [max(len(c[i]) for c in cells) for i in range(4)]
        lines = ["  ".join(c[i].ljust(widths[i]) if i < 2 else c[i].rjust(widths[i]) for i in range(4)) for c in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines + [f"product of the bounds: {self.bound:.6f}"])


def _layers(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            yield from _layers(child, f"{prefix}.{name}" if prefix else name)
    else:
        yield prefix or type(module).__name__, module


@torch.no_grad()
def _layer_inputs(model: nn.Module, layers: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.setdefault(id(m), args[0].detach()))
             for m in layers]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return [seen[id(m)] for m in layers]


def _type_name(m: nn.Module) -> str:
    cls = type(m)
    # torch.nn.utils.parametrize swaps in a subclass named "Parametrized<Class>": report the class
    return cls.__bases__[0].__name__ if parametrize.is_parametrized(m) else cls.__name__


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


_ROUNDING_ALLOWANCE = 1e-12


def _float64_twin(model: nn.Module) -> nn.Module:
    """The function ``model`` computes in eval mode, evaluated in float64 with the very weights in
    use: ``export`` bakes them into plain layers (so casting re-runs no retraction), then every
    tensor is cast exactly (fp32 / bf16 values are float64 values). A model export cannot handle
    is cast as it is."""
    try:
        twin = export(model)
    except TypeError:
        twin = copy.deepcopy(model).eval()
    for m in twin.modules():  # the pairs (x, x + h v) may leave the pixel box by h: accept any input
        if isinstance(m, InputNormalization):
            m.input_range = None
    return twin.double()


def lipschitz_lower_bound(model: nn.Module, data: torch.Tensor | Iterable, iters: int = 10,
                          step: float = 1e-2, max_points: int = 256) -> float:
    """Empirical lower bound: max over data points x of ||f(x + h v) - f(x)|| / h, with v found by
    power iteration on J^T J at x (J v by a finite difference -- exact for piecewise-linear nets
    within a linear piece -- and J^T by one backward pass), h = ``step`` (raw-pixel L2 units).

    Every reported value is the ratio of an actual pair of inputs, computed in float64 on the
    weights in use (:func:`_float64_twin`) and lowered by 1e-12 relative for that evaluation's
    rounding (~1e-15), so it stays below the true constant and never exceeds
    ``network_lipschitz_bound``; it shows how tight that bound is (to 1e-12). ``data``: a tensor
    of inputs or a loader of (x, y) / x batches (its first batch is used, up to ``max_points``
    points).
    """
    x = first_batch(data)[:max_points].detach().double()
    with eval_mode(model):
        model = _float64_twin(model)
    with eval_mode(model), parametrize.cached():
        xr = x.clone().requires_grad_(True)
        fx = model(xr)
        v = _unit(torch.randn_like(x))
        for _ in range(iters):
            with torch.no_grad():
                jv = (model(x + step * v) - fx) / step
            (v,) = torch.autograd.grad(fx, xr, jv, retain_graph=True)
            v = _unit(v)
        with torch.no_grad():
            ratio = (model(x + step * v) - fx).flatten(1).norm(dim=1) / step
    # float64 evaluation errs ~1e-15 relative on these depths: deflating by 1e-12 keeps the ratio
    # of the pair below the true constant even where that constant is exactly 1 (MaxMin, Flatten)
    return float(ratio.max()) * (1 - _ROUNDING_ALLOWANCE)


def lipschitz_report(model: nn.Module, x: torch.Tensor | None = None) -> LipschitzReport:
    """Each layer's ``lipschitz_bound`` (eval-mode semantics; a layer without a rule raises
    TypeError, as the network bound does) and, given inputs ``x``, an empirical lower bound at the
    inputs each layer receives from ``x`` (:func:`lipschitz_lower_bound`: ratios of real
    input pairs, never above the true constant). Nested ``nn.Sequential`` models are flattened into
    their layers; any other module is one row. The gap between the two columns shows where a
    network's bound is loose. The model's modes are restored."""
    named = list(_layers(model))
    with training_mode(model, False):
        bounds = [float(lipschitz_bound(m)) for _, m in named]
        lowers: list[float | None] = [None] * len(named)
        if x is not None:
            inputs = _layer_inputs(model, [m for _, m in named], x)
            lowers = [lipschitz_lower_bound(m, inp) for (_, m), inp in zip(named, inputs)]
    return LipschitzReport(tuple(LayerBound(n, _type_name(m), b, lo)
                                 for (n, m), b, lo in zip(named, bounds, lowers)))


__all__ = ["LayerBound", "LipschitzReport", "lipschitz_lower_bound", "lipschitz_report"]
