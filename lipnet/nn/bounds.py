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
from .activations import Abs, MaxMin
from .centering import BatchCentering, LayerCentering
from .conv import OrthoConv2d
from .conv_norm import conv_operator_norm_bound
from .export import ExportedSLL
from .normalization import InputNormalization, L2BallProjection
from .pooling import FirstChannels, GlobalL2NormPool2d, L2NormPool2d, ScaledAvgPool2d
from .residual import ConvexResidual
from .scattering import ROUNDING_MARGIN as SCATTERING_ROUNDING_MARGIN
from .scattering import Scattering2d, operator_norm_squared
from .sll import SLLBlock


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


@lipschitz_bound.register(OrthoConv2d)
def _ortho_conv(m: OrthoConv2d) -> float:
    return conv_operator_norm_bound(m.weight, m.stride, m.dilation, m.groups)


@lipschitz_bound.register(SLLBlock)
@lipschitz_bound.register(ExportedSLL)  # the same block with T frozen: the same theorem
def _sll(m: nn.Module) -> float:
    return 1.0 + SAFETY_MARGIN


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
    # exact constant 1/min(std), rounded up so the float is never below it
    return float(1.0 / m.std.detach().double().min()) * (1.0 + SAFETY_MARGIN)


@lipschitz_bound.register(nn.Sequential)
def _sequential(m: nn.Sequential) -> float:
    return math.prod(lipschitz_bound(child) for child in m)


@lipschitz_bound.register(ConvexResidual)
def _convex_residual(m: ConvexResidual) -> float:
    alpha = float(m.alpha().detach())
    return (1 - alpha) + alpha * lipschitz_bound(m.f)


def _one(m: nn.Module) -> float:
    return 1.0


for _cls in (MaxMin, Abs, L2BallProjection, L2NormPool2d, GlobalL2NormPool2d, FirstChannels, BatchCentering, LayerCentering,
             nn.Flatten, nn.Unflatten, nn.Identity, nn.ReLU):
    lipschitz_bound.register(_cls)(_one)


@lipschitz_bound.register(nn.Dropout)
def _dropout(m: nn.Dropout) -> float:  # identity in eval mode; rescales by 1/(1-p) in training
    return 1.0 if not m.training else 1.0 / (1.0 - m.p)


__all__ = ["lipschitz_bound"]
