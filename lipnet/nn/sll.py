"""SDP-based Lipschitz layer (SLL, Araujo et al., ICLR 2023): a 1-Lipschitz residual block."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..validate import positive_int
from ._checks import check_input
from ._precision import full_precision
from .conv_norm import conv_gram_kernel

# Relative inflation of T: keeps T - W^T W dominated by the diagonal despite float rounding.
_T_INFLATION = 1e-5


def residual_weight(features: int, inner_features: int, kernel_size: int | None, layer: str) -> nn.Parameter:
    """The W of a residual block x - W^T g(W x + b) (SLL, CPL): (inner, features), or an
    (inner, features, k, k) kernel for an odd ``kernel_size`` (zero padding k // 2 keeps the size),
    drawn N(0, 1 / fan_in). ValueError naming ``layer`` for bad sizes."""
    if kernel_size is not None and (not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0):
        raise ValueError(f"{layer}: kernel_size must be an odd positive int or None, got {kernel_size!r}")
    positive_int(features, f"{layer}: features")
    positive_int(inner_features, f"{layer}: inner_features")
    shape = (inner_features, features) if kernel_size is None else (inner_features, features, kernel_size, kernel_size)
    fan_in = features * (1 if kernel_size is None else kernel_size**2)
    return nn.Parameter(nn.init.normal_(torch.empty(shape), std=1 / math.sqrt(fan_in)))


class SLLBlock(nn.Module):
    """x -> x - 2 W T^{-1} relu(W^T x + b), with T = diag(sum_j |W^T W|_ij q_j / q_i).

    Dense (``kernel_size=None``, inputs (B, features)) or convolutional (odd ``kernel_size``, zero
    padding, stride 1, inputs (B, features, H, W); W^T is the convolution features -> inner and W
    its adjoint, ``conv_transpose2d`` with the same kernel).

    Guarantee: 1-Lipschitz (Araujo et al. 2023, Thm. 3: T - W^T W is PSD by the rescaled Gershgorin
    argument, and relu is slope-restricted in [0, 1]). T is inflated by a relative 1e-5 so that the
    diagonal dominance survives float rounding. ``lipschitz_bound`` returns 1 * (1 + SAFETY_MARGIN)
    from this theorem, not from the weights; the tests attack it.
    """

    def __init__(self, features: int, inner_features: int, kernel_size: int | None = None,
                 bias: bool = True) -> None:
        super().__init__()
        self.weight = residual_weight(features, inner_features, kernel_size, "SLLBlock")
        self.features, self.inner_features, self.kernel_size = features, inner_features, kernel_size
        self.q = nn.Parameter(torch.zeros(inner_features))  # q = exp(log q), positive
        self.bias = nn.Parameter(torch.zeros(inner_features)) if bias else None

    def t_inverse(self) -> torch.Tensor:
        """1 / T_ii (length inner_features) for the current weights."""
        w, q = self.weight, self.q.exp()
        if self.kernel_size is None:
            gram = (w @ w.mT).abs()  # W^T W in the paper's notation: (inner, inner)
        else:  # Gram of the adjoint conv (inner space): kernel of conv_transpose's input side
            gram = conv_gram_kernel(w.transpose(0, 1).flip(-1, -2)).abs().sum((-2, -1))
        t = (gram * q[None, :]).sum(-1) / q
        return 1 / (t * (1 + _T_INFLATION) + 1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = self.kernel_size is None
        check_input(x, "SLLBlock", channels=self.features, ndims=(1, 2) if dense else (3, 4))
        with full_precision(x.device.type):  # T's diagonal dominance is what makes the block 1-Lipschitz
            t_inv = self.t_inverse()
        if dense:
            h = F.linear(x, self.weight, self.bias)
            return x - 2 * F.linear(F.relu(h) * t_inv, self.weight.t())
        pad = self.kernel_size // 2
        h = F.conv2d(x, self.weight, self.bias, padding=pad)
        return x - 2 * F.conv_transpose2d(F.relu(h) * t_inv[:, None, None], self.weight, padding=pad)


class ExportedSLL(nn.Module):
    """SLL block with frozen weights: x - 2 W (t_inv * relu(W^T x + b)). Plain torch ops."""

    def __init__(self, weight: torch.Tensor, t_inv: torch.Tensor, bias: torch.Tensor | None, conv: bool) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("t_inv", t_inv if not conv else t_inv[:, None, None])
        self.register_buffer("bias", bias)
        self.conv = conv
        self.pad = weight.shape[-1] // 2 if conv else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            h = F.conv2d(x, self.weight, self.bias, padding=self.pad)
            return x - 2 * F.conv_transpose2d(F.relu(h) * self.t_inv, self.weight, padding=self.pad)
        h = F.linear(x, self.weight, self.bias)
        return x - 2 * F.linear(F.relu(h) * self.t_inv, self.weight.t())
