"""Exact per-sample gradients of the privatized tensors, to audit the analytic bounds.

Private training never computes these (that is the point of clipping-free DP-SGD); tests and the
benchmark do, to check ``gradient_norm_bounds`` against reality and report how tight it is.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from lipnet.nn import ConvexResidual, export

from .sensitivity import SensitivityReport


def _effective_copy(model: nn.Module) -> nn.Module:
    """``export(model)`` (constrained weights baked into plain layers, same function) with learnable
    residual gates kept as parameters under their original name ``alpha_raw``."""
    plain = export(model)
    exported = dict(plain.named_modules())
    for name, src in model.named_modules():
        if isinstance(src, ConvexResidual) and src.learnable:
            dst = exported[name]
            del dst._buffers["alpha_raw"]
            dst.alpha_raw = nn.Parameter(src.alpha_raw.detach().clone())
            dst.learnable = True
    return plain


def per_sample_gradient_norms(model: nn.Module, report: SensitivityReport, x: torch.Tensor, y: torch.Tensor,
                              loss: nn.Module) -> dict[str, torch.Tensor]:
    """{tensor name: (B,) norms of each sample's gradient w.r.t. that tensor} for the tensors of
    ``report`` (effective weights, biases, gates), plus ``"total"``: the whole gradient's norm.

    Computed with ``torch.func.vmap(grad)`` on a plain copy of ``model`` whose parameters are the
    effective tensors; the loss is taken per sample (batch of one), as in the bound."""
    plain = _effective_copy(model)
    params = dict(plain.named_parameters())
    names = [b.name for b in report.bounds]
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"tensors {missing} not found in the exported copy (have {sorted(params)})")
    frozen = {k: v.detach() for k, v in params.items() if k not in names}
    per_sample_loss = copy.copy(loss)
    per_sample_loss.reduction = "sum"

    def sample_loss(tensors: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(plain, {**frozen, **tensors}, (xi[None],))
        return per_sample_loss(out, yi[None])

    tensors = {n: params[n].detach() for n in names}
    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(tensors, x, y)
    norms = {n: g.reshape(len(x), -1).double().norm(dim=1) for n, g in grads.items()}
    norms["total"] = torch.stack(list(norms.values())).square().sum(0).sqrt()
    return norms


__all__ = ["per_sample_gradient_norms"]
