"""``export(model)``: the same function as plain torch modules, weights baked in.

Constrained layers become ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.ConvTranspose2d`` holding the current
constrained weights; SLL blocks become a small module with fixed weights; parameter-free lipnet
layers (MaxMin, pooling, centering, ...) are kept -- they are TorchScript-compatible, so
``torch.jit.script(export(model)).save(path)`` gives a file that ``torch.jit.load`` runs without
lipnet installed. The exported model is in eval mode and holds no parametrizations.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from lipnet.modes import training_mode
from .conv import AOLConv2d, OrthoConv2d, OrthoConvTranspose2d
from .conv1d import OrthoConv1d
from .cpl import ConvexPotentialLayer
from .linear import AOLLinear, OrthoLinear
from .parametrizations import AOLScaling, CoreOrthogonalizer
from .activations import LPReLU
from .residual import ConvexResidual, PrescaledAdditiveResidual
from .sll import ExportedSLL, SLLBlock

_EXPORTERS: dict[type, Callable[[nn.Module], nn.Module]] = {}


def register_exporter(cls: type) -> Callable:
    """Decorator: ``fn(module) -> plain nn.Module`` used by :func:`export` for ``cls``."""
    def wrap(fn: Callable[[nn.Module], nn.Module]) -> Callable[[nn.Module], nn.Module]:
        _EXPORTERS[cls] = fn
        return fn
    return wrap


def _copy_param(p: torch.Tensor | None) -> nn.Parameter | None:
    return None if p is None else nn.Parameter(p.detach().clone())


def _plain_layer(m: nn.Module) -> nn.Module:
    """The plain ``nn.Linear`` / ``nn.Conv2d`` / ``nn.ConvTranspose2d`` computing what ``m`` computes,
    with ``m``'s current (constrained) weight and bias: OrthoLinear, AOLLinear, OrthoConv2d,
    OrthoConvTranspose2d, AOLConv2d and every ``nn.Linear`` / ``nn.Conv2d`` constrained by :func:`lipnet.nn.orthogonal` /
    :func:`lipnet.nn.aol`."""
    factory = dict(device=m.weight.device, dtype=m.weight.dtype)
    if isinstance(m, nn.Linear):
        out = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, **factory)
    else:
        kw = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                  padding_mode=m.padding_mode, **factory)
        if getattr(m, "transposed", False):
            out = nn.ConvTranspose2d(m.in_channels, m.out_channels, m.kernel_size, output_padding=m.output_padding,
                                     **kw)
        else:
            out = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, **kw)
    out.weight, out.bias = _copy_param(m.weight), _copy_param(m.bias)
    return out


for _cls in (OrthoLinear, AOLLinear, OrthoConv2d, OrthoConvTranspose2d, AOLConv2d):
    register_exporter(_cls)(_plain_layer)


@register_exporter(OrthoConv1d)
def _ortho_conv1d(m: OrthoConv1d) -> nn.Conv1d:
    left, right = m.pads
    padding = left if left == right else "same"  # uneven: stride 1 only (checked at construction)
    weight = m.weight  # built from the factors: once
    out = nn.Conv1d(m.in_channels, m.out_channels, m.kernel_size, m.stride, padding, m.dilation, m.groups,
                    bias=m.bias is not None, padding_mode=m.padding_mode, device=weight.device, dtype=weight.dtype)
    out.weight, out.bias = _copy_param(weight), _copy_param(m.bias)
    return out


@register_exporter(SLLBlock)
def _sll(m: SLLBlock) -> ExportedSLL:
    bias = None if m.bias is None else m.bias.detach().clone()
    return ExportedSLL(m.weight.detach().clone(), m.t_inverse().detach().clone(), bias, m.kernel_size is not None)


@register_exporter(ConvexPotentialLayer)
def _cpl(m: ConvexPotentialLayer) -> ExportedSLL:
    # x - 2 W^T (t_inv * relu(W x + b)) with t_inv = 1 / h^2: the same frozen form as SLL
    h = m.norm_bound()
    step = torch.tensor(1.0 / (h * h) if h else 0.0, dtype=torch.float64)
    rounded = step.to(m.weight.dtype)
    if rounded.double() > step:  # round the step down: the frozen block stays within 1 / h^2
        rounded = torch.nextafter(rounded, torch.zeros_like(rounded))
    t_inv = rounded.expand(m.inner_features).clone().to(m.weight.device)
    bias = None if m.bias is None else m.bias.detach().clone()
    return ExportedSLL(m.weight.detach().clone(), t_inv, bias, m.kernel_size is not None)


@register_exporter(PrescaledAdditiveResidual)
def _prescaled(m: PrescaledAdditiveResidual) -> PrescaledAdditiveResidual:
    return PrescaledAdditiveResidual(_export(m.f), alpha=float(m.alpha), learnable=False).to(m.alpha.device)


@register_exporter(LPReLU)
def _lprelu(m: LPReLU) -> nn.PReLU:  # the clamped slopes baked into a plain PReLU
    out = nn.PReLU(m.num_parameters, device=m.weight.device, dtype=m.weight.dtype)
    out.weight = _copy_param(m.slopes())
    return out


@register_exporter(ConvexResidual)
def _convex(m: ConvexResidual) -> ConvexResidual:
    return ConvexResidual(_export(m.f), alpha=float(m.alpha()), learnable=False).to(m.alpha_raw.device)


def _lipnet_constrained(module: nn.Module) -> bool:
    """Whether ``module``'s only parametrization is lipnet's own, on its weight (orthogonal / aol)."""
    if not parametrize.is_parametrized(module) or set(module.parametrizations) != {"weight"}:
        return False
    return all(isinstance(p, (CoreOrthogonalizer, AOLScaling)) for p in module.parametrizations.weight)


def _export(module: nn.Module) -> nn.Module:
    for cls in type(module).__mro__:
        if cls in _EXPORTERS:
            return _EXPORTERS[cls](module)
    if isinstance(module, (nn.Linear, nn.Conv2d)) and _lipnet_constrained(module):
        return _plain_layer(module)  # constrained by lipnet.nn.orthogonal / aol
    if parametrize.is_parametrized(module):
        raise TypeError(f"export: {type(module).__name__} is parametrized and has no exporter; "
                        "register one with lipnet.nn.export.register_exporter")
    # A container or parameter-free layer: shallow copy with exported children and copied tensors.
    out = copy.copy(module)
    out._parameters = OrderedDict((k, _copy_param(v)) for k, v in module._parameters.items())
    out._buffers = OrderedDict((k, None if v is None else v.detach().clone()) for k, v in module._buffers.items())
    out._modules = OrderedDict((k, None if v is None else _export(v)) for k, v in module._modules.items())
    return out


@torch.no_grad()
def export(model: nn.Module) -> nn.Module:
    """Plain-torch copy of ``model`` in eval mode with the current constrained weights baked in.

    Guarantee: same outputs as ``model.eval()`` up to float rounding (the weights are the very
    tensors the model computes), and the same ``lipschitz_bound``. The input model keeps every
    submodule's mode; its only change is the retraction of orthogonal factors changed since their
    last use, which its own next forward pass would make too.
    """
    with training_mode(model, False):
        out = _export(model)
    return out.eval()
