"""1-Lipschitz pooling and glue: L2-norm pooling, scaled average pooling, flatten, channel heads."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..validate import positive_int
from .conv_norm import conv_operator_norm_bound


def _pool_args(kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None) -> tuple[tuple[int, int], tuple[int, int]]:
    k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    s = k if stride is None else ((stride, stride) if isinstance(stride, int) else tuple(stride))
    if len(k) != 2 or len(s) != 2 or min(k + s) < 1 or any(isinstance(v, bool) or not isinstance(v, int) for v in k + s):
        raise ValueError(f"kernel_size and stride must be positive ints or pairs, got {kernel_size!r}, {stride!r}")
    return k, s


def reuse_count(kernel: tuple[int, int], stride: tuple[int, int]) -> int:
    """Largest number of pooling windows that contain one input pixel: ceil(k1/s1) ceil(k2/s2)."""
    return math.ceil(kernel[0] / stride[0]) * math.ceil(kernel[1] / stride[1])


class L2NormPool2d(nn.Module):
    """y = sqrt(sum_window x^2 + eps) / sqrt(r): the L2 norm of each window, r = windows per pixel.

    Guarantee: 1-Lipschitz. Each window's norm is 1-Lipschitz in the window (|(||p||) - (||p'||)| <=
    ||p - p'||, also with the eps smoothing, whose gradient p / sqrt(||p||^2 + eps) has norm < 1),
    and summing squared window differences counts each pixel at most r times. eps (default 1e-12)
    keeps the gradient finite at zero windows.
    """

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
                 eps: float = 1e-12) -> None:
        super().__init__()
        self.kernel_size, self.stride = _pool_args(kernel_size, stride)
        self.eps = float(eps)
        self.scale = 1 / math.sqrt(reuse_count(self.kernel_size, self.stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window_sum = F.avg_pool2d(x * x, self.kernel_size, self.stride) * (self.kernel_size[0] * self.kernel_size[1])
        return (window_sum + self.eps).sqrt() * self.scale


class ScaledAvgPool2d(nn.Module):
    """Average pooling times 1 / ||avg_pool||, so that it is 1-Lipschitz and no looser than needed.

    Per channel, average pooling is a stride-s convolution with the constant kernel 1/(k1 k2); its
    norm is bounded soundly by ``conv_operator_norm_bound`` (= 1/sqrt(k1 k2) for non-overlapping
    windows, the default stride = kernel, where it is norm-preserving on constant windows).
    No padding (a padded window would change the constant).
    """

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None) -> None:
        super().__init__()
        self.kernel_size, self.stride = _pool_args(kernel_size, stride)
        k1, k2 = self.kernel_size
        uniform = torch.full((1, 1, k1, k2), 1.0 / (k1 * k2), dtype=torch.float64)
        self.scale = 1.0 / conv_operator_norm_bound(uniform, self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.kernel_size, self.stride) * self.scale


class GlobalL2NormPool2d(nn.Module):
    """Per-channel L2 norm over all spatial positions (B, C, H, W) -> (B, C): 1-Lipschitz."""

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x * x).sum(dim=(-2, -1)) + self.eps).sqrt()


class FirstChannels(nn.Module):
    """Keeps the first ``n`` entries of ``dim`` (a coordinate projection, 1-Lipschitz): the usual
    head that turns a wide orthogonal layer's output into ``n`` logits."""

    def __init__(self, n: int, dim: int = 1) -> None:
        super().__init__()
        positive_int(n, "FirstChannels: n")
        self.n, self.dim = n, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[self.dim] < self.n:
            raise ValueError(f"FirstChannels({self.n}): input has only {x.shape[self.dim]} entries in dim {self.dim}")
        return x.narrow(self.dim, 0, self.n)


Flatten = nn.Flatten  # a reshape: norm-preserving; re-exported so models import everything from lipnet.nn


class InvertibleDownSampling(nn.Module):
    """(B, C, H, W) -> (B, C f^2, H/f, W/f), each f x f block of a channel moved into f^2 channels
    (``F.pixel_unshuffle``; deel-torchlip's ``InvertibleDownSampling``). A permutation of the
    entries: orthogonal, norm-preserving, bound 1; H and W must be multiples of f."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = positive_int(factor, "InvertibleDownSampling: factor")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"InvertibleDownSampling: expected (B, C, H, W) with H and W multiples of {self.factor}, "
                             f"got {list(x.shape)}")
        return F.pixel_unshuffle(x, self.factor)


class InvertibleUpSampling(nn.Module):
    """The inverse of :class:`InvertibleDownSampling` (``F.pixel_shuffle``): (B, C f^2, H, W) ->
    (B, C, H f, W f). A permutation: orthogonal, bound 1; C must be a multiple of f^2."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = positive_int(factor, "InvertibleUpSampling: factor")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] % (self.factor * self.factor):
            raise ValueError(f"InvertibleUpSampling: expected (B, C, H, W) with C a multiple of {self.factor ** 2}, "
                             f"got {list(x.shape)}")
        return F.pixel_shuffle(x, self.factor)
