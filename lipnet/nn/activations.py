"""Gradient-norm-preserving activations (1-Lipschitz)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..validate import positive_int
from ._checks import plain_eager


class _MaxMinFn(torch.autograd.Function):
    """(a, b) -> (max, min) with a one-mask backward: the gradient is the same permutation applied
    to the output gradient (at ties, the a >= b branch's). torch's maximum/minimum backward builds
    masks and tie-splits per op; this saves one boolean mask and two ``where``s (~4x faster on CPU).
    Forward-mode (jvp) and vmap are supported, so torch.func transforms (attacks, privacy) work."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a: torch.Tensor, b: torch.Tensor, dim: int):
        keep = a >= b
        return _MaxMinFn._permute(keep, a, b, dim), keep

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.dim = inputs[2]
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])
        ctx.keep = output[1]  # forward mode reads it here (saved_tensors is backward-only)

    @staticmethod
    def _permute(keep: torch.Tensor, first: torch.Tensor, second: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat([torch.where(keep, first, second), torch.where(keep, second, first)], dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _keep_grad):
        (keep,) = ctx.saved_tensors
        g_max, g_min = grad.chunk(2, dim=ctx.dim)
        return torch.where(keep, g_max, g_min), torch.where(keep, g_min, g_max), None

    @staticmethod
    def jvp(ctx, ta: torch.Tensor, tb: torch.Tensor, _dim):
        return _MaxMinFn._permute(ctx.keep, ta, tb, ctx.dim), None


class _MaxMinWholeFn(torch.autograd.Function):
    """x -> (max, min) of its two halves along ``dim``, written into one output (no ``cat``, and no
    split backward assembling the input gradient from two pieces): the eager, untransformed path.

    Forward uses ``maximum`` / ``minimum`` (cheaper than ``where``; equal values at ties); backward and
    jvp permute with the saved ``a >= b`` mask, as :class:`_MaxMinFn`. A backward that is itself
    differentiated (``create_graph=True``) is built from differentiable ops."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:
        a, b = x.chunk(2, dim)
        keep = a >= b
        out = torch.empty_like(x)
        hi, lo = out.chunk(2, dim)
        torch.maximum(a, b, out=hi)
        torch.minimum(a, b, out=lo)
        ctx.save_for_backward(keep)
        ctx.keep, ctx.dim = keep, dim  # forward mode reads keep here (saved_tensors is backward-only)
        return out

    @staticmethod
    def _permute_whole(keep: torch.Tensor, t: torch.Tensor, dim: int) -> torch.Tensor:
        first, second = t.chunk(2, dim)
        if torch.is_grad_enabled():  # double backward: keep the graph
            return _MaxMinFn._permute(keep, first, second, dim)
        out = torch.empty_like(t)
        hi, lo = out.chunk(2, dim)
        torch.where(keep, first, second, out=hi)
        torch.where(keep, second, first, out=lo)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return _MaxMinWholeFn._permute_whole(keep, grad, ctx.dim), None

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor, _dim):
        return _MaxMinWholeFn._permute_whole(ctx.keep, tangent, ctx.dim)


class MaxMin(nn.Module):
    """Pairs the first and second half of ``dim`` and returns (max, min) of each pair (GroupSort-2).

    A piecewise permutation: 1-Lipschitz and norm-preserving (||f(x)|| = ||x||). Needs an even size
    along ``dim``.
    """

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    @torch.jit.unused
    def _with_grad(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _MaxMinFn.apply(a, b, self.dim)[0]

    @torch.jit.unused
    def _whole(self, x: torch.Tensor) -> torch.Tensor:
        return _MaxMinWholeFn.apply(x, self.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[self.dim]
        if n % 2:
            raise ValueError(f"MaxMin needs an even size along dim {self.dim}, got shape {list(x.shape)}")
        if not torch.jit.is_scripting():
            # out= writes are neither vmap-able nor traceable by dynamo: torch.func transforms take the
            # split (a, b) Function, torch.compile the composite below (which it fuses)
            if plain_eager():
                return self._whole(x)
            if not torch.compiler.is_compiling() and torch.is_grad_enabled() and x.requires_grad:
                a, b = x.split(n // 2, dim=self.dim)
                return self._with_grad(a, b)
        a, b = x.split(n // 2, dim=self.dim)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=self.dim)


class Abs(nn.Module):
    """Elementwise |x|: 1-Lipschitz and norm-preserving."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs()


class GroupSort(nn.Module):
    """Sorts (ascending) each group of ``group_size`` consecutive entries along ``dim``
    (deel-torchlip's ``GroupSort``; ``group_size=2`` sorts adjacent pairs, where :class:`MaxMin`
    pairs the first half with the second).

    A piecewise permutation: 1-Lipschitz and norm-preserving (||f(x)|| = ||x||); the size along
    ``dim`` must be a multiple of ``group_size``.
    """

    def __init__(self, group_size: int = 2, dim: int = 1) -> None:
        super().__init__()
        self.group_size, self.dim = positive_int(group_size, "GroupSort: group_size"), dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.dim % x.dim()
        n = x.shape[dim]
        if n % self.group_size:
            raise ValueError(f"GroupSort: size {n} along dim {self.dim} is not a multiple of group_size="
                             f"{self.group_size} (shape {list(x.shape)})")
        grouped = x.unflatten(dim, (n // self.group_size, self.group_size))
        return grouped.sort(dim=dim + 1).values.flatten(dim, dim + 1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, dim={self.dim}"


class FullSort(nn.Module):
    """Sorts (ascending) all entries along ``dim`` (deel-torchlip's ``FullSort``): GroupSort with one
    group; 1-Lipschitz and norm-preserving."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sort(dim=self.dim).values


class HouseHolder(nn.Module):
    """Learned reflection of each channel pair (z_i, z_{i + C/2}) along ``dim``: the pair is kept on
    one side of the line at angle theta_i / 2 and reflected across it on the other (Singla et al.,
    2022; deel-torchlip's and orthogonium's ``HouseHolder``).

    Each piece is the identity or an orthogonal reflection and the two agree on the line, so the map
    is continuous, piecewise orthogonal: 1-Lipschitz and norm-preserving for every theta. theta = pi/2
    (the initialization) gives (min, max) of each pair.
    """

    def __init__(self, channels: int, dim: int = 1) -> None:
        super().__init__()
        channels = positive_int(channels, "HouseHolder: channels")
        if channels % 2:
            raise ValueError(f"HouseHolder: channels must be even, got {channels}")
        self.channels, self.dim = channels, dim
        self.theta = nn.Parameter(torch.full((channels // 2,), math.pi / 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.dim % x.dim()
        if x.shape[dim] != self.channels:
            raise ValueError(f"HouseHolder: expected {self.channels} channels along dim {self.dim}, "
                             f"got shape {list(x.shape)}")
        a, b = x.split(self.channels // 2, dim=dim)
        shape = [-1] + [1] * (x.dim() - dim - 1)  # theta along dim, broadcast over the dims after it
        theta = self.theta.reshape(shape).to(x.dtype)
        c, s = torch.cos(theta), torch.sin(theta)
        keep = a * torch.sin(theta / 2) - b * torch.cos(theta / 2) <= 0  # signed side of the line
        return torch.cat([torch.where(keep, a, a * c + b * s), torch.where(keep, b, a * s - b * c)], dim=dim)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, dim={self.dim}"


class LPReLU(nn.PReLU):
    """PReLU whose slopes are clamped to [-1, 1] in use (deel-torchlip's ``LPReLU``): x for x >= 0,
    a x otherwise, |a| <= 1, so 1-Lipschitz for every raw slope (not gradient-norm preserving unless
    |a| = 1). ``num_parameters``: 1 or the number of channels (dim 1), as ``nn.PReLU``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.slopes()
        if a.numel() > 1:  # one slope per channel (dim 1, or dim 0 of an unbatched 1-D input)
            a = a.view(-1, *([1] * (x.dim() - 2))) if x.dim() >= 2 else a
        # where() rather than F.prelu: prelu's backward has no batching rule under torch.func.vmap
        return torch.where(x >= 0, x, a.to(x.dtype) * x)

    def slopes(self) -> torch.Tensor:
        """The slopes in use: the raw ones clamped to [-1, 1]."""
        return self.weight.clamp(-1.0, 1.0)
