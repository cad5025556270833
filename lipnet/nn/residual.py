"""Residual merges with a stated Lipschitz bound."""

from __future__ import annotations

import math

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
        fx = self.f(x)
        dtype = torch.promote_types(x.dtype, fx.dtype)
        # lerp: x + a (f(x) - x), one pass where (1 - a) x + a f(x) takes three
        return torch.lerp(x.to(dtype), fx.to(dtype), a.to(dtype))


class ConcatResidual(nn.Module):
    """x = (x1, x2) split in halves along ``dim`` -> (x1, f(x2)) (orthogonium's ``ConcatResidual``).

    Bound: the two halves are orthogonal coordinates, so Lip = max(1, Lip(f)): 1-Lipschitz whenever
    f is (f must keep the second half's shape; the size along ``dim`` must be even)."""

    def __init__(self, f: nn.Module, dim: int = 1) -> None:
        super().__init__()
        self.f, self.dim = f, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[self.dim]
        if n % 2:
            raise ValueError(f"ConcatResidual: needs an even size along dim {self.dim}, got shape {list(x.shape)}")
        a, b = x.split(n // 2, dim=self.dim)
        return torch.cat([a, self.f(b)], dim=self.dim)


class L2NormResidual(nn.Module):
    """x -> sqrt((x^2 + f(x)^2) / 2 + eps), elementwise (orthogonium's ``L2NormResidual``).

    Bound: per entry, (a, b) -> sqrt((a^2 + b^2) / 2 + eps) has gradient norm <= 1/sqrt(2), so the
    merge is 1/sqrt(2)-Lipschitz in (x, f(x)) jointly and Lip <= sqrt((1 + Lip(f)^2) / 2): 1 when f
    is 1-Lipschitz. Without the halving (sqrt(x^2 + f(x)^2)) the same argument gives sqrt(2),
    which an attack reaches (tests/test_nn_layers.py)."""

    def __init__(self, f: nn.Module, eps: float = 1e-6) -> None:
        super().__init__()
        self.f, self.eps = f, float(eps)
        if not self.eps > 0:
            raise ValueError(f"L2NormResidual: eps must be > 0 (keeps the square root differentiable), got {eps!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.f(x)
        return torch.sqrt(0.5 * x * x + 0.5 * out * out + self.eps)


class PrescaledAdditiveResidual(nn.Module):
    """x -> (x + f(alpha x)) / (1 + |alpha|) (orthogonium's ``PrescaledAdditiveResidual``; alpha
    learned by default, as there).

    Bound (triangle inequality): Lip <= (1 + |alpha| Lip(f)) / (1 + |alpha|), so 1-Lipschitz
    whenever f is, for every alpha; ``lipschitz_bound`` evaluates it with the current alpha.
    """

    def __init__(self, f: nn.Module, alpha: float = 1.0, learnable: bool = True) -> None:
        super().__init__()
        alpha = float(alpha)
        if not math.isfinite(alpha):
            raise ValueError(f"PrescaledAdditiveResidual: alpha must be finite, got {alpha!r}")
        self.f, self.learnable = f, learnable
        if learnable:
            self.alpha = nn.Parameter(torch.tensor(alpha))
        else:
            self.register_buffer("alpha", torch.tensor(alpha))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha.to(x.dtype)
        return (x + self.f(a * x)) / (1 + a.abs())
