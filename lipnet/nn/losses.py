"""Margin losses for certifiable training, with their Lipschitz constants w.r.t. the logits.

``lipschitz`` is the L2 Lipschitz constant of the *per-sample* loss z -> loss(z, y) for any fixed
label y (before the batch reduction); the privacy module multiplies it into gradient bounds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _check(logits: torch.Tensor, target: torch.Tensor, name: str) -> None:
    if logits.dim() != 2:
        raise ValueError(f"{name}: logits must be (batch, classes), got {tuple(logits.shape)}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"{name}: target must be (batch,) labels matching logits, got {tuple(target.shape)}")


class LipschitzCrossEntropy(nn.Module):
    """tau * CE((z - offset * onehot(y)) / tau, y): cross-entropy on margin-shifted, tempered logits.

    Lipschitz constant w.r.t. z: the gradient is softmax(.) - onehot(y), whose L2 norm is < sqrt(2)
    (||p - e_y||^2 = (1 - p_y)^2 + sum_{j != y} p_j^2 <= 2 (1 - p_y)^2), for every tau and offset.
    Small tau approaches the multi-class hinge with margin ``offset``; ``offset`` asks for a margin
    (certified radius offset / (sqrt(2) L)). orthogonium's ``LossXent`` default: offset 2.12, tau 0.25.
    """

    def __init__(self, temperature: float = 0.25, offset: float = 2.12132, reduction: str = "mean") -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"LipschitzCrossEntropy: temperature must be > 0, got {temperature}")
        if offset < 0:
            raise ValueError(f"LipschitzCrossEntropy: offset must be >= 0, got {offset}")
        self.temperature, self.offset, self.reduction = float(temperature), float(offset), reduction

    @property
    def lipschitz(self) -> float:
        return math.sqrt(2.0)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check(logits, target, "LipschitzCrossEntropy")
        # scatter, not F.one_hot: no data-dependent check, so torch.func.vmap can take per-sample gradients
        shifted = logits - self.offset * torch.zeros_like(logits).scatter(1, target[:, None], 1.0)
        return F.cross_entropy(shifted / self.temperature, target, reduction=self.reduction) * self.temperature


class MultiMarginHinge(nn.Module):
    """relu(margin - (z_y - max_{j != y} z_j)): hinge on the top-1 margin.

    Lipschitz constant w.r.t. z: sqrt(2) (the margin z_y - max_{j != y} z_j is sqrt(2)-Lipschitz:
    its subgradients are e_y - e_j). Zero loss means margin >= ``margin``, i.e. a certified radius
    >= margin / (sqrt(2) L) for a network with Lipschitz bound L.
    """

    def __init__(self, margin: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        if margin < 0:
            raise ValueError(f"MultiMarginHinge: margin must be >= 0, got {margin}")
        self.margin, self.reduction = float(margin), reduction

    @property
    def lipschitz(self) -> float:
        return math.sqrt(2.0)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check(logits, target, "MultiMarginHinge")
        true = logits.gather(1, target[:, None])[:, 0]
        others = logits.scatter(1, target[:, None], float("-inf")).amax(dim=1)
        loss = F.relu(self.margin - (true - others))
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss
