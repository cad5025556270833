"""Several optimizers over disjoint parameters, stepped as one ``torch.optim.Optimizer``.

Muon-style training gives the hidden matrices to one optimizer and the rest (biases, gains, the
head) to Adam; ``CombinedOptimizer`` makes the pair one object, so a single lr scheduler, a
``GradScaler`` and a checkpoint see both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class CombinedOptimizer(torch.optim.Optimizer):
    """``optimizers`` (over disjoint parameters) as one optimizer.

    Guarantees: ``param_groups`` is the concatenation of the optimizers' own group dicts (the same
    objects, in order, also after ``load_state_dict``), so a scheduler setting ``group["lr"]``
    (e.g. ``OneCycleLR`` with one ``max_lr`` per group) or ``GradScaler.unscale_`` acts on the
    optimizer that owns the group; ``step`` evaluates ``closure`` once and then steps each optimizer
    in order; ``state_dict`` holds each optimizer's state dict, and ``load_state_dict`` refuses one
    of a different composition. ``zero_grad`` clears every parameter's gradient.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        optimizers = list(optimizers)
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        for o in optimizers:
            if not isinstance(o, torch.optim.Optimizer) or isinstance(o, CombinedOptimizer):
                raise TypeError(f"CombinedOptimizer takes torch.optim.Optimizer instances (not combined ones), "
                                f"got {type(o).__name__}")
        owner: dict[int, int] = {}
        for i, o in enumerate(optimizers):
            for group in o.param_groups:
                for p in group["params"]:
                    if owner.setdefault(id(p), i) != i:
                        raise ValueError(f"a parameter of shape {tuple(p.shape)} is trained by optimizers "
                                         f"{owner[id(p)]} and {i}: the parameter sets must be disjoint")
        self.optimizers = optimizers
        # Optimizer.__init__ appends the group dicts it is given (with no defaults to add): the groups
        # stay shared with the optimizers that own them
        super().__init__([g for o in optimizers for g in o.param_groups], {})

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers],
                "types": [type(o).__name__ for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        types = [type(o).__name__ for o in self.optimizers]
        if not isinstance(state_dict, dict) or state_dict.get("types") != types:
            found = state_dict.get("types") if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"this state dict is not one of a CombinedOptimizer of {types} (it holds {found})")
        for o, s in zip(self.optimizers, state_dict["optimizers"]):
            o.load_state_dict(s)
        # Optimizer.load_state_dict gives each optimizer new group dicts: share those
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]

    def __repr__(self) -> str:
        return "CombinedOptimizer(\n" + ",\n".join(f"  {o!r}".replace("\n", "\n  ") for o in self.optimizers) + "\n)"


__all__ = ["CombinedOptimizer"]
