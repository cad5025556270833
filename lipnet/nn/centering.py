"""Mean subtraction (no variance scaling): the 1-Lipschitz part of batch/layer normalization."""

from __future__ import annotations

import torch
from torch import nn

from ..validate import unit_interval
from ._checks import _functorch_active


class BatchCentering(nn.Module):
    """x - mean + bias per channel (dim 1), mean over batch and spatial dims.

    Training: subtracts the batch mean (an orthogonal projection of the whole batch, 1-Lipschitz
    as a map of the batch) and updates ``running_mean``. Eval: subtracts ``running_mean`` -- a
    translation, 1-Lipschitz per sample; certificates are computed in eval mode. Note the training
    map couples the samples of a batch (matters for per-sample privacy accounting). Under
    ``torch.func`` transforms the training map is computed without updating ``running_mean``.
    """

    def __init__(self, num_features: int, momentum: float = 0.1, bias: bool = True) -> None:
        super().__init__()
        unit_interval(momentum, "BatchCentering: momentum", closed_low=False, closed_high=True)
        self.num_features, self.momentum = num_features, momentum
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features)) if bias else None

    def _shape(self, x: torch.Tensor) -> list[int]:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchCentering: expected (B, {self.num_features}, ...), got {list(x.shape)}")
        return [1, self.num_features] + [1] * (x.dim() - 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = self._shape(x)
        if self.training:
            # accumulated in at least fp32 (bf16/fp16 inputs under autocast), kept in the buffer's dtype
            mean = x.transpose(0, 1).reshape(self.num_features, -1).mean(
                dim=1, dtype=torch.promote_types(x.dtype, torch.float32))
            # under torch.func transforms (jacrev, vmap) the batch mean is a transformed tensor that
            # cannot be written into a plain buffer: the transform computes the function, and the
            # running statistics are left as they are
            update = True
            if not torch.jit.is_scripting():  # TorchScript compiles no functorch query
                update = not _functorch_active()
            if update:
                with torch.no_grad():
                    self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
        else:
            mean = self.running_mean
        out = x - mean.to(x.dtype).view(shape)
        return out if self.bias is None else out + self.bias.view(shape)


class LayerCentering(nn.Module):
    """x - mean over the spatial dims (per sample, per channel) + bias: an orthogonal projection
    plus a translation, 1-Lipschitz per sample in train and eval mode. For (B, C) inputs the mean is
    over the features."""

    def __init__(self, num_features: int, bias: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.bias = nn.Parameter(torch.zeros(num_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"LayerCentering: expected (B, {self.num_features}, ...), got {list(x.shape)}")
        dims = list(range(2, x.dim())) if x.dim() > 2 else [1]
        out = x - x.mean(dim=dims, keepdim=True)
        if self.bias is None:
            return out
        return out + self.bias.view([1, self.num_features] + [1] * (x.dim() - 2))
