"""SDP-based Lipschitz layer (SLL, Araujo et al., ICLR 2023): a 1-Lipschitz residual block."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ortho import spectral_norm_bound
from ..validate import positive_int
from ._checks import check_input
from ._precision import full_precision
from .conv_norm import conv_gram_kernel, conv_operator_norm_bound, weighted_schur_bound

_UNIT_ROUNDOFF_FP64 = 2.0**-53

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


def _inner_gram_abs(weight: torch.Tensor) -> torch.Tensor:
    """(inner, inner) entrywise upper bound on |W W^T| (dense) or on the absolute tap sums of the
    inner-space Gram kernel (convolution), in float64 with its rounding added: the fp32/bf16
    products are exact in float64, a sum of n of them errs by at most gamma_n times the sum of
    their absolute values, which is the same Gram of |W|."""
    w = weight.double()
    if w.dim() == 2:
        gram, gram_of_abs, n = w @ w.mT, w.abs() @ w.abs().mT, w.shape[1]
    else:  # the adjoint's kernel (features -> inner is conv2d with w; its Gram lives on inner)
        adjoint = w.transpose(0, 1).flip(-1, -2)
        gram = conv_gram_kernel(adjoint).abs().sum((-2, -1))
        gram_of_abs = conv_gram_kernel(adjoint.abs()).sum((-2, -1))
        n = w.shape[1] * w.shape[2] * w.shape[3]
    nu = (n + 2) * _UNIT_ROUNDOFF_FP64
    return gram.abs() + (nu / (1 - nu)) * gram_of_abs * (1 + nu)


@torch.no_grad()
def residual_step_norm_squared(weight: torch.Tensor, t_inv: torch.Tensor) -> float:
    """Upper bound on ||D^(1/2) W||_2^2 for D = diag(t_inv) >= 0 (inner features) and the stored W
    of x - 2 W^T D relu(W x + b): dense (inner, features) or an odd (inner, features, k, k) kernel
    (zero padding k // 2). For entries of D below 0: max|D| ||W||^2 (the triangle inequality
    needs no sign). Sound: the smallest of three sound bounds --

    1. the weighted Gershgorin test SLL's theorem uses, on the inner-space Gram
       sqrt(D) |W W^T| sqrt(D) with its float64 rounding bounded (:func:`weighted_schur_bound`:
       any positive weights are sound, power iteration picks good ones);
    2. max(D) * ||W||^2 (what CPL's constant step is built from);
    3. ||sqrt(D) W||^2 (the core's ``spectral_norm_bound`` / ``conv_operator_norm_bound``).
    """
    t = t_inv.detach().double().flatten()
    if t.numel() == 1:
        t = t.expand(weight.shape[0])
    if t.numel() != weight.shape[0]:
        raise ValueError(f"t_inv has {t.numel()} entries for {weight.shape[0]} inner features")
    if not torch.isfinite(weight).all():
        raise ValueError("weight has non-finite entries (NaN or inf)")
    dense = weight.dim() == 2

    def norm(w: torch.Tensor) -> float:
        return float(spectral_norm_bound(w)) if dense else conv_operator_norm_bound(w)

    t_max = float(t.abs().max())
    by_max_step = t_max * norm(weight) ** 2 * (1 + 4 * _UNIT_ROUNDOFF_FP64)
    if (t < 0).any():
        return by_max_step
    root = t.sqrt()
    a = root[:, None] * _inner_gram_abs(weight) * root[None, :]
    by_gershgorin = weighted_schur_bound(a[None]) * (1 + 4 * weight.shape[0] * _UNIT_ROUNDOFF_FP64)
    # sqrt(t) rounds by at most u relative, squared 2u: covered by the inflation below
    scaled = weight.double() * root.view(-1, *([1] * (weight.dim() - 1)))
    by_scaled = norm(scaled) ** 2 * (1 + 8 * _UNIT_ROUNDOFF_FP64)
    return min(by_gershgorin, by_max_step, by_scaled)


class ExportedSLL(nn.Module):
    """SLL block with frozen weights: x - 2 W (t_inv * relu(W^T x + b)). Plain torch ops.

    ``lipschitz_bound`` recomputes the bound from the stored ``weight`` and ``t_inv``
    (:func:`residual_step_norm_squared`), so a tampered buffer gets the bound it earns."""

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
