"""SDP-based Lipschitz layer (SLL, Araujo et al., ICLR 2023): a 1-Lipschitz residual block."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ortho import spectral_norm_bound
from ..validate import positive_int
from ._checks import check_input
from lipnet.modes import full_precision
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
        gram, q = inner_gram_abs(self.weight), self.q.exp()  # W^T W in the paper's notation
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


def inner_gram_abs(w: torch.Tensor) -> torch.Tensor:
    """(inner, inner) |W W^T| of a dense (inner, features) W, or the absolute tap sums of the
    inner-space Gram kernel of an (inner, features, k, k) kernel (the adjoint convolution's, on
    conv_transpose's input side): the matrix SLL's diagonal dominance is stated for."""
    if w.dim() == 2:
        return (w @ w.mT).abs()
    return conv_gram_kernel(w.transpose(0, 1).flip(-1, -2)).abs().sum((-2, -1))


def _inner_gram_abs_bound(weight: torch.Tensor) -> torch.Tensor:
    """Entrywise upper bound on :func:`inner_gram_abs` of ``weight``, computed in float64 with its
    rounding added: the fp32/bf16 products are exact in float64, and a sum of n of them errs by at
    most gamma_n times the sum of their absolute values -- the same Gram of |W|."""
    w = weight.double()
    nu = (w[0].numel() + 2) * _UNIT_ROUNDOFF_FP64
    return inner_gram_abs(w) + (nu / (1 - nu)) * inner_gram_abs(w.abs()) * (1 + nu)


@torch.no_grad()
def frozen_step_lipschitz_bound(weight: torch.Tensor, t_inv: torch.Tensor) -> float:
    """Upper bound on the Lipschitz constant of x - 2 W^T D relu(W x + b), D = diag(t_inv), for
    the stored W: dense (inner, features) or an odd (inner, features, k, k) kernel (zero padding
    k // 2), trusting neither tensor.

    f(x) - f(y) = (I - 2 W^T D S W)(x - y) with S = diag(secant slopes of relu) in [0, 1]. For
    D >= 0 the matrix is I - 2 A^T S A with A = D^(1/2) W, symmetric with eigenvalues in
    [1 - 2 ||A||^2, 1]: Lip <= max(1, 2 ||A||^2 - 1), which is 1 exactly when T = D^-1 >= W W^T
    (the SLL / CPL condition). ||A||^2 is the smallest of three sound bounds:

    1. the weighted Gershgorin test SLL's theorem uses, on the inner-space Gram
       sqrt(D) |W W^T| sqrt(D) with its float64 rounding bounded (:func:`weighted_schur_bound`:
       any positive weights are sound);
    2. max(D) * ||W||^2 (what CPL's constant step is built from);
    3. ||sqrt(D) W||^2 (the core's ``spectral_norm_bound`` / ``conv_operator_norm_bound``).

    An entry of D below 0: the triangle inequality, 1 + 2 max|D| ||W||^2.
    """
    t = t_inv.detach().double().flatten()
    if t.numel() == 1:
        t = t.expand(weight.shape[0])
    if t.numel() != weight.shape[0]:
        raise ValueError(f"t_inv has {t.numel()} entries for {weight.shape[0]} inner features")
    if not (torch.isfinite(weight).all() and torch.isfinite(t).all()):
        raise ValueError("weight or t_inv has non-finite entries (NaN or inf)")
    dense = weight.dim() == 2

    def norm(w: torch.Tensor) -> float:
        return float(spectral_norm_bound(w)) if dense else conv_operator_norm_bound(w)

    by_max_step = float(t.abs().max()) * norm(weight) ** 2 * (1 + 4 * _UNIT_ROUNDOFF_FP64)
    if (t < 0).any():
        return 1.0 + 2.0 * by_max_step
    root = t.sqrt()
    a = root[:, None] * _inner_gram_abs_bound(weight) * root[None, :]
    by_gershgorin = weighted_schur_bound(a[None]) * (1 + 4 * weight.shape[0] * _UNIT_ROUNDOFF_FP64)
    # sqrt(t) rounds by at most u relative, squared 2u: covered by the inflation below
    scaled = weight.double() * root.view(-1, *([1] * (weight.dim() - 1)))
    by_scaled = norm(scaled) ** 2 * (1 + 8 * _UNIT_ROUNDOFF_FP64)
    return max(1.0, 2.0 * min(by_gershgorin, by_max_step, by_scaled) - 1.0)


class ExportedSLL(nn.Module):
    """SLL block with frozen weights: x - 2 W (t_inv * relu(W^T x + b)). Plain torch ops.

    ``lipschitz_bound`` recomputes the bound from the stored ``weight`` and ``t_inv``
    (:func:`frozen_step_lipschitz_bound`), so a tampered buffer gets the bound it earns."""

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
