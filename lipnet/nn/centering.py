"""Mean subtraction (no variance scaling): the 1-Lipschitz part of batch/layer normalization."""

from __future__ import annotations

import torch
from torch import nn

from ..validate import unit_interval
from ._checks import plain_eager


def _batch_dims(x: torch.Tensor) -> list[int]:
    """Every dim of ``x`` but the channel dim 1: those a per-channel batch statistic reduces."""
    return [0] + list(range(2, x.dim()))


def _channel_shape(x: torch.Tensor) -> list[int]:
    """The shape that broadcasts a per-channel vector against ``x``: (1, C, 1, ...)."""
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _channel_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-channel mean of ``x`` over batch and spatial dims, accumulated in at least fp32 (bf16 /
    fp16 inputs under autocast would otherwise sum a whole batch in their own short mantissa)."""
    return x.mean(dim=_batch_dims(x), dtype=torch.promote_types(x.dtype, torch.float32))


class _BatchCenterFn(torch.autograd.Function):
    """(x, bias) -> (x - mean + bias, mean), the mean per channel over every dim but 1 (accumulated in
    at least fp32). Backward is the projection g - mean(g) itself (two passes over g), where autograd
    of the composite would add a negation, a broadcast division and an accumulation of full-size
    tensors. The backward is differentiable (built from differentiable ops) and forward mode is
    supported; ``torch.func`` transforms take the composite (see :class:`BatchCentering`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None):
        mean = _channel_mean(x)
        shift = mean.to(x.dtype) if bias is None else mean.to(x.dtype) - bias
        ctx.reduce, ctx.x_dtype, ctx.has_bias = _batch_dims(x), x.dtype, bias is not None
        ctx.mark_non_differentiable(mean)
        return x - shift.view(_channel_shape(x)), mean

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_mean):
        grad_x = (grad - grad.mean(dim=ctx.reduce, keepdim=True)).to(ctx.x_dtype)
        grad_bias = grad.sum(dim=ctx.reduce) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return grad_x, grad_bias

    @staticmethod
    def jvp(ctx, tx: torch.Tensor, tbias: torch.Tensor | None):
        out = tx - tx.mean(dim=ctx.reduce, keepdim=True)
        if tbias is not None:
            out = out + tbias.view(_channel_shape(tx))
        return out, None


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
        return _channel_shape(x)

    @torch.jit.unused
    def _centered(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _BatchCenterFn.apply(x, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = self._shape(x)
        if not self.training:
            return self._subtract(x, self.running_mean, shape)
        update = True
        if not torch.jit.is_scripting():  # TorchScript compiles neither the Function nor the functorch query
            # under torch.func transforms (jacrev, vmap) the batch mean is a transformed tensor that
            # cannot be written into a plain buffer: the transform computes the composite function,
            # and the running statistics are left as they are
            # under torch.compile the composite function, with the update, which dynamo traces
            # (the Function's custom jvp would break the graph)
            eager = plain_eager()
            update = eager or torch.compiler.is_compiling()
            if eager:
                out, mean = self._centered(x)
                with torch.no_grad():
                    self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                return out
        mean = _channel_mean(x)
        if update:
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
        return self._subtract(x, mean, shape)

    def _subtract(self, x: torch.Tensor, mean: torch.Tensor, shape: list[int]) -> torch.Tensor:
        if self.bias is None:
            return x - mean.to(x.dtype).view(shape)
        return x - (mean.to(x.dtype) - self.bias).view(shape)  # one pass over x, not two


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
