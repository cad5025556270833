"""``lipschitz_bound(module)``: a guaranteed upper bound on a module's L2 Lipschitz constant,
computed from the weights in use (never an estimate).

Rules: dense weights -> the core's ``spectral_norm_bound``; convolutions -> ``conv_operator_norm_bound``
(sound for every input size, see ``conv_norm.py``); ``nn.Sequential`` -> product; ``ConvexResidual``
-> (1 - alpha) + alpha L_f; SLL -> 1 (its theorem); parameter-free layers -> their exact constant.
A module without a rule raises ``TypeError``: an unknown module is never assumed 1-Lipschitz.
Register a rule for your own module with ``@lipschitz_bound.register(MyModule)``.
"""

from __future__ import annotations

import math
from functools import singledispatch

import torch
from torch import nn

from ..ortho import SAFETY_MARGIN, spectral_norm_bound
from .activations import Abs, FullSort, GroupSort, HouseHolder, LPReLU, MaxMin
from .centering import BatchCentering, LayerCentering
from .conv import OrthoConv2d, OrthoConvTranspose2d
from .conv1d import OrthoConv1d
from .conv_norm import conv_operator_norm_bound
from .cpl import ConvexPotentialLayer
from .normalization import GroupNormalization, InputNormalization, L2BallProjection
from .pooling import (FirstChannels, GlobalL2NormPool2d, InvertibleDownSampling, InvertibleUpSampling, L2NormPool2d,
                      ScaledAvgPool2d)
from .residual import ConcatResidual, ConvexResidual, L2NormResidual, PrescaledAdditiveResidual
from .scattering import ROUNDING_MARGIN as SCATTERING_ROUNDING_MARGIN
from .scattering import Scattering2d, operator_norm_squared
from .sll import ExportedSLL, SLLBlock, frozen_step_lipschitz_bound


@singledispatch
def lipschitz_bound(module: nn.Module) -> float:
    """Guaranteed upper bound on the L2 Lipschitz constant of ``module`` (eval-mode semantics:
    ``BatchCentering`` subtracts its running mean). Raises TypeError for modules without a rule."""
    raise TypeError(
        f"no Lipschitz bound rule for {type(module).__name__}; lipnet never assumes an unknown module "
        "is 1-Lipschitz. Build the model from lipnet.nn, or register a rule with "
        "@lipnet.nn.lipschitz_bound.register(YourModule)."
    )


@torch.no_grad()
def _dense(weight: torch.Tensor) -> float:
    return float(spectral_norm_bound(weight.detach()))


@lipschitz_bound.register(nn.Linear)
def _linear(m: nn.Linear) -> float:  # OrthoLinear, AOLLinear and exported plain layers
    return _dense(m.weight)


def _conv_padding_ok(m: nn.Module, padding_mode: str) -> None:
    if padding_mode not in ("zeros", "circular"):
        raise TypeError(f"{type(m).__name__} with padding_mode={padding_mode!r} repeats pixels; "
                        "only 'zeros' and 'circular' padding have a bound rule")


@lipschitz_bound.register(nn.Conv2d)
def _conv(m: nn.Conv2d) -> float:  # AOLConv2d and exported plain convolutions
    _conv_padding_ok(m, m.padding_mode)
    return conv_operator_norm_bound(m.weight, m.stride, m.dilation, m.groups)


@lipschitz_bound.register(nn.ConvTranspose2d)
def _conv_transpose(m: nn.ConvTranspose2d) -> float:  # the adjoint of a conv: same norm
    _conv_padding_ok(m, m.padding_mode)
    return conv_operator_norm_bound(m.weight, m.stride, m.dilation, m.groups)


@lipschitz_bound.register(nn.Conv1d)
def _conv1d(m: nn.Conv1d) -> float:  # a 1 x k convolution of 1 x n images: the same operator
    _conv_padding_ok(m, m.padding_mode)
    kernel, d = m.weight[:, :, None], (1, m.dilation[0])
    # A stride subsamples the stride-1 output, so the stride-1 norm bounds it too, often more tightly
    # than the polyphase bound; with circular padding only while the padding stays within 'same'
    # (beyond it wrapped samples are read twice).
    total = m.dilation[0] * (m.kernel_size[0] - 1)
    window = m.padding_mode == "zeros" or m.padding == "same" or 2 * m.padding[0] <= total
    stride_one = conv_operator_norm_bound(kernel, 1, d, m.groups) if window else float("inf")
    if m.stride[0] == 1 or (window and m.padding_mode == "circular"):
        return stride_one
    return min(stride_one, conv_operator_norm_bound(kernel, (1, m.stride[0]), d, m.groups))


@lipschitz_bound.register(OrthoConv1d)
def _ortho_conv1d(m: OrthoConv1d) -> float:
    # the stride-1 operator's norm: a stride subsamples it, and circular padding never exceeds 'same'
    # (checked at construction), so every configuration is a window of the stride-1 convolution
    return conv_operator_norm_bound(m.weight[:, :, None], 1, (1, m.dilation), m.groups)


@lipschitz_bound.register(OrthoConv2d)
@lipschitz_bound.register(OrthoConvTranspose2d)  # the adjoint of a conv: same norm
def _ortho_conv(m: OrthoConv2d | OrthoConvTranspose2d) -> float:
    return conv_operator_norm_bound(m.weight, m.stride, m.dilation, m.groups)


@lipschitz_bound.register(SLLBlock)  # T is recomputed from W and q at every call (its theorem)
@lipschitz_bound.register(ConvexPotentialLayer)  # h is recomputed from W at every call (its theorem)
def _sll(m: nn.Module) -> float:
    return 1.0 + SAFETY_MARGIN


@lipschitz_bound.register(ExportedSLL)
def _exported_sll(m: ExportedSLL) -> float:  # both blocks with their step frozen: from the stored tensors
    try:
        return frozen_step_lipschitz_bound(m.weight, m.t_inv) * (1.0 + SAFETY_MARGIN)
    except ValueError as err:
        raise ValueError(f"ExportedSLL: {err}") from err


@lipschitz_bound.register(ScaledAvgPool2d)
def _scaled_avg(m: ScaledAvgPool2d) -> float:
    # Per channel it is a stride-s convolution with the constant kernel scale / (k1 k2).
    k1, k2 = m.kernel_size
    kernel = torch.full((1, 1, k1, k2), m.scale / (k1 * k2), dtype=torch.float64)
    return conv_operator_norm_bound(kernel, m.stride)


@lipschitz_bound.register(Scattering2d)
def _scattering(m: Scattering2d) -> float:
    # recomputed from the stored (float32-rounded) filters; the margin covers the FFTs' rounding
    norm = math.sqrt(operator_norm_squared(m.phi_hat, torch.view_as_complex(m.psi_hat), m.scale))
    return norm * (1.0 + SCATTERING_ROUNDING_MARGIN)


@lipschitz_bound.register(InputNormalization)
def _input_normalization(m: InputNormalization) -> float:
    # exact constant 1/min|std| of the stored std (a sign flips a channel, the norm stays), rounded up
    std = m.std.detach().double()
    if not torch.isfinite(std).all() or not (std != 0).all() or not torch.isfinite(m.mean.detach()).all():
        raise ValueError(f"InputNormalization: mean must be finite and std finite and non-zero, got std={std.tolist()}")
    return float(1.0 / std.abs().min()) * (1.0 + SAFETY_MARGIN)


@lipschitz_bound.register(GroupNormalization)
def _group_normalization(m: GroupNormalization) -> float:
    # 1 / sqrt(eps): the largest Jacobian norm of c -> c / sqrt(||c||^2 / n + eps) (proof in the class)
    return (1.0 / math.sqrt(m.eps)) * (1.0 + SAFETY_MARGIN)


@lipschitz_bound.register(nn.Sequential)
def _sequential(m: nn.Sequential) -> float:
    return math.prod(lipschitz_bound(child) for child in m)


@lipschitz_bound.register(ConvexResidual)
def _convex_residual(m: ConvexResidual) -> float:
    # (1 - a) x + a f(x) for the alpha in use, whatever its value: |1 - a| + |a| Lip(f) (triangle
    # inequality; (1 - a) + a Lip(f) only for a in [0, 1], which a loaded buffer need not be)
    alpha = float(m.alpha().detach())
    if not math.isfinite(alpha):
        raise ValueError(f"ConvexResidual: alpha is {alpha}")
    return abs(1 - alpha) + abs(alpha) * lipschitz_bound(m.f)


@lipschitz_bound.register(PrescaledAdditiveResidual)
def _prescaled_residual(m: PrescaledAdditiveResidual) -> float:  # (x + f(a x)) / (1 + |a|)
    a = abs(float(m.alpha.detach()))
    if not math.isfinite(a):
        raise ValueError(f"PrescaledAdditiveResidual: alpha is {a}")
    return (1.0 + a * lipschitz_bound(m.f)) / (1.0 + a) * (1 + SAFETY_MARGIN)


@lipschitz_bound.register(nn.PReLU)
def _prelu(m: nn.PReLU) -> float:  # slopes 1 and a per channel: max(1, max |a|)
    slopes = (m.slopes() if isinstance(m, LPReLU) else m.weight).detach()
    if not torch.isfinite(slopes).all():  # max(1, nan) would be 1
        raise ValueError(f"{type(m).__name__}: slopes have non-finite entries (NaN or inf)")
    return max(1.0, float(slopes.abs().max()))


@lipschitz_bound.register(ConcatResidual)
def _concat_residual(m: ConcatResidual) -> float:  # (x1, f(x2)): orthogonal coordinates
    return max(1.0, lipschitz_bound(m.f))


@lipschitz_bound.register(L2NormResidual)
def _l2_norm_residual(m: L2NormResidual) -> float:  # the merge is 1/sqrt(2)-Lipschitz in (x, f(x))
    return math.sqrt((1.0 + lipschitz_bound(m.f) ** 2) / 2.0) * (1 + SAFETY_MARGIN)


def _one(m: nn.Module) -> float:
    return 1.0


for _cls in (MaxMin, Abs, GroupSort, FullSort, HouseHolder, InvertibleDownSampling, InvertibleUpSampling, L2BallProjection, L2NormPool2d, GlobalL2NormPool2d, FirstChannels, BatchCentering, LayerCentering,
             nn.Flatten, nn.Unflatten, nn.Identity, nn.ReLU, nn.Softmax):
    # nn.Softmax: its Jacobian diag(p) - p p^T has eigenvalues <= max p_i <= 1
    lipschitz_bound.register(_cls)(_one)


@lipschitz_bound.register(nn.MaxPool2d)
def _max_pool(m: nn.MaxPool2d) -> float:
    """sqrt(the largest number of windows a pixel belongs to): each output is 1-Lipschitz in its
    window (in the max norm, hence in L2), and ||f(x) - f(y)||^2 <= sum over windows of
    ||x_w - y_w||^2 <= (windows per pixel) ||x - y||^2. Non-overlapping windows: exactly 1."""
    k = _pair(m.kernel_size)
    s = _pair(m.stride if m.stride is not None else m.kernel_size)
    d = _pair(m.dilation)
    if any(v < 1 for v in (*k, *s, *d)):
        raise TypeError(f"MaxPool2d with kernel {k}, stride {s}, dilation {d} has no bound rule")
    # along one axis a pixel lies in at most ceil(k / s) windows when d = 1; dilation spreads a window's
    # k taps d apart, so a pixel is tap j of at most one window per j for which the window start fits
    # the stride: at most k windows, and ceil(k / s) when d = 1
    per_axis = [math.ceil(ki / si) if di == 1 else min(ki, math.ceil(((ki - 1) * di + 1) / si))
                for ki, si, di in zip(k, s, d)]
    return math.sqrt(per_axis[0] * per_axis[1])


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


@lipschitz_bound.register(nn.Dropout)
def _dropout(m: nn.Dropout) -> float:  # identity in eval mode; rescales by 1/(1-p) in training
    return 1.0 if not m.training else 1.0 / (1.0 - m.p)


__all__ = ["lipschitz_bound"]
