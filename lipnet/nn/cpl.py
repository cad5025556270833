"""Convex potential layer (CPL, Meunier et al., 2022): x -> x - (2 / h^2) W^T relu(W x + b)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ortho import spectral_norm_bound
from ._checks import check_input
from lipnet.modes import full_precision
from .conv_norm import conv_operator_norm_bound
from .sll import residual_weight


class ConvexPotentialLayer(nn.Module):
    """x -> x - (2 / h^2) W^T relu(W x + b), with h >= ||W||_2 computed soundly from the weights.

    Dense (``kernel_size=None``, inputs (B, features); W is (inner, features)) or convolutional (odd
    ``kernel_size``, zero padding, stride 1; W x is the convolution features -> inner, W^T its
    adjoint ``conv_transpose2d``).

    Guarantee: 1-Lipschitz. The layer is a gradient step x - t grad psi(x) on the convex potential
    psi(x) = ||relu(W x + b)||^2 / 2, whose gradient W^T relu(W x + b) is L-Lipschitz with
    L = ||W||_2^2 (its Jacobian W^T D W has 0 <= D <= I); a gradient step of a convex L-smooth
    function with t <= 2 / L is non-expansive (co-coercivity), and t = 2 / h^2 <= 2 / L because h
    is an upper bound (the core's ``spectral_norm_bound`` for dense W, ``conv_operator_norm_bound``
    for convolutions), never an estimate. h is recomputed from the current weights at every call (it
    carries no gradient: the step size is a normalization). ``lipschitz_bound`` returns
    1 * (1 + SAFETY_MARGIN) from this theorem; the tests attack it.
    """

    def __init__(self, features: int, inner_features: int, kernel_size: int | None = None, bias: bool = True) -> None:
        super().__init__()
        self.weight = residual_weight(features, inner_features, kernel_size, "ConvexPotentialLayer")
        self.features, self.inner_features, self.kernel_size = features, inner_features, kernel_size
        self.bias = nn.Parameter(torch.zeros(inner_features)) if bias else None

    @torch.no_grad()
    def norm_bound(self) -> float:
        """h >= ||W||_2 for the current weights (sound)."""
        if self.kernel_size is None:
            return float(spectral_norm_bound(self.weight.detach()))
        return conv_operator_norm_bound(self.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = self.kernel_size is None
        check_input(x, "ConvexPotentialLayer", channels=self.features, ndims=(1, 2) if dense else (3, 4))
        h = self.norm_bound()
        if h == 0:
            return x
        step = 2.0 / (h * h)
        with full_precision(x.device.type):  # the step must match the weight it was computed for
            w = self.weight
            if dense:
                return x - step * F.linear(F.relu(F.linear(x, w, self.bias)), w.t())
            pad = self.kernel_size // 2
            z = F.relu(F.conv2d(x, w, self.bias, padding=pad))
            return x - step * F.conv_transpose2d(z, w, padding=pad)

    def extra_repr(self) -> str:
        return f"{self.features}, {self.inner_features}, kernel_size={self.kernel_size}"


__all__ = ["ConvexPotentialLayer"]
