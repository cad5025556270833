"""Gradient-norm-preserving activations (1-Lipschitz)."""

from __future__ import annotations

import torch
from torch import nn


class MaxMin(nn.Module):
    """Pairs the first and second half of ``dim`` and returns (max, min) of each pair (GroupSort-2).

    A piecewise permutation: 1-Lipschitz and norm-preserving (||f(x)|| = ||x||). Needs an even size
    along ``dim``.
    """

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[self.dim]
        if n % 2:
            raise ValueError(f"MaxMin needs an even size along dim {self.dim}, got shape {list(x.shape)}")
        a, b = x.split(n // 2, dim=self.dim)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=self.dim)


class Abs(nn.Module):
    """Elementwise |x|: 1-Lipschitz and norm-preserving."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs()
