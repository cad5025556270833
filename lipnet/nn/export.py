"""``export(model)``: the same function as plain torch modules, weights baked in.

Constrained layers become ``nn.Linear`` / ``nn.Conv2d`` / ``nn.ConvTranspose2d`` holding the current
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
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..modes import training_mode
from .conv import AOLConv2d, OrthoConv2d
from .linear import AOLLinear, OrthoLinear
from .residual import ConvexResidual
from .sll import SLLBlock

_EXPORTERS: dict[type, Callable[[nn.Module], nn.Module]] = {}


def register_exporter(cls: type) -> Callable:
    """Decorator: ``fn(module) -> plain nn.Module`` used by :func:`export` for ``cls``."""
    def wrap(fn: Callable[[nn.Module], nn.Module]) -> Callable[[nn.Module], nn.Module]:
        _EXPORTERS[cls] = fn
        return fn
    return wrap


def _copy_param(p: torch.Tensor | None) -> nn.Parameter | None:
    return None if p is None else nn.Parameter(p.detach().clone())


@register_exporter(OrthoLinear)
@register_exporter(AOLLinear)
def _linear(m: nn.Linear) -> nn.Linear:
    out = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                    device=m.weight.device, dtype=m.weight.dtype)
    out.weight, out.bias = _copy_param(m.weight), _copy_param(m.bias)
    return out


@register_exporter(OrthoConv2d)
def _ortho_conv(m: OrthoConv2d) -> nn.Module:
    kw = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
              bias=m.bias is not None, padding_mode=m.padding_mode, device=m.weight.device, dtype=m.weight.dtype)
    if m.transposed:
        out = nn.ConvTranspose2d(m.in_channels, m.out_channels, m.kernel_size, output_padding=m.output_padding, **kw)
    else:
        out = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, **kw)
    out.weight, out.bias = _copy_param(m.weight), _copy_param(m.bias)
    return out


@register_exporter(AOLConv2d)
def _aol_conv(m: AOLConv2d) -> nn.Conv2d:
    out = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                    dilation=m.dilation, groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode,
                    device=m.weight.device, dtype=m.weight.dtype)
    out.weight, out.bias = _copy_param(m.weight), _copy_param(m.bias)
    return out


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


@register_exporter(SLLBlock)
def _sll(m: SLLBlock) -> ExportedSLL:
    bias = None if m.bias is None else m.bias.detach().clone()
    return ExportedSLL(m.weight.detach().clone(), m.t_inverse().detach().clone(), bias, m.kernel_size is not None)


@register_exporter(ConvexResidual)
def _convex(m: ConvexResidual) -> ConvexResidual:
    return ConvexResidual(_export(m.f), alpha=float(m.alpha()), learnable=False).to(m.alpha_raw.device)


def _export(module: nn.Module) -> nn.Module:
    for cls in type(module).__mro__:
        if cls in _EXPORTERS:
            return _EXPORTERS[cls](module)
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
