"""``lipschitz_report(model, x)``: every layer's sound bound beside an empirical lower bound."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from .bounds import lipschitz_bound


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


def lipschitz_report(model: nn.Module, x: torch.Tensor | None = None) -> LipschitzReport:
    """Each layer's ``lipschitz_bound`` (eval-mode semantics; a layer without a rule raises
    TypeError, as the network bound does) and, given inputs ``x``, an empirical lower bound at the
    inputs each layer receives from ``x`` (``lipnet.certify.lipschitz_lower_bound``: ratios of real
    input pairs, never above the true constant). Nested ``nn.Sequential`` models are flattened into
    their layers; any other module is one row. The gap between the two columns shows where a
    network's bound is loose. The model's modes are restored."""
    from ..certify import lipschitz_lower_bound
    from ..modes import training_mode

    named = list(_layers(model))
    with training_mode(model, False):
        bounds = [float(lipschitz_bound(m)) for _, m in named]
        lowers: list[float | None] = [None] * len(named)
        if x is not None:
            inputs = _layer_inputs(model, [m for _, m in named], x)
            lowers = [lipschitz_lower_bound(m, inp) for (_, m), inp in zip(named, inputs)]
    return LipschitzReport(tuple(LayerBound(n, _type_name(m), b, lo)
                                 for (n, m), b, lo in zip(named, bounds, lowers)))


__all__ = ["LayerBound", "LipschitzReport", "lipschitz_report"]
