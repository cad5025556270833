"""Residual merges with a stated Lipschitz bound."""

from __future__ import annotations

import torch
from torch import nn


class ConvexResidual(nn.Module):
    """x -> (1 - alpha) x + alpha f(x), alpha in [0, 1] (fixed, or learned as sigmoid of a logit).

    Bound (triangle inequality): Lip <= (1 - alpha) + alpha Lip(f), so 1-Lipschitz whenever f is.
    ``lipschitz_bound`` evaluates it with the current alpha and the bound of f.
    """

    def __init__(self, f: nn.Module, alpha: float = 0.5, learnable: bool = False) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"ConvexResidual: alpha must be in [0, 1], got {alpha}")
        self.f = f
        self.learnable = learnable
        if learnable:
            if not 0.0 < alpha < 1.0:
                raise ValueError("ConvexResidual: a learnable alpha must start strictly inside (0, 1)")
            self.alpha_raw = nn.Parameter(torch.logit(torch.tensor(float(alpha))))  # alpha = sigmoid
        else:
            self.register_buffer("alpha_raw", torch.tensor(float(alpha)))  # alpha itself

    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha_raw) if self.learnable else self.alpha_raw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha()
        return (1 - a) * x + a * self.f(x)
