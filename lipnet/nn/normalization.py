"""Input normalization kept inside the network, so certificates stay in raw-pixel units."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class InputNormalization(nn.Module):
    """x -> (x - mean) / std per channel (dim 1).

    Lipschitz constant (L2, exact): 1 / min(std). It is part of the model, so ``lipschitz_bound``
    of the whole network -- and every certified radius divided by it -- is stated for the raw
    inputs a user attacks (pixels in [0, 1]), never for the normalized ones.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float] | None = None) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.ones_like(mean_t) if std is None else torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() == 0 or mean_t.shape != std_t.shape:
            raise ValueError(f"InputNormalization: mean and std need the same non-zero length, "
                             f"got {mean_t.numel()} and {std_t.numel()}")
        if not torch.isfinite(mean_t).all() or not (torch.isfinite(std_t) & (std_t > 0)).all():
            raise ValueError(f"InputNormalization: mean must be finite and std finite and > 0, "
                             f"got mean={mean_t.tolist()}, std={std_t.tolist()}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            # uint8 images (0-255) would run, give garbage, and be certified in the wrong units
            raise TypeError(f"InputNormalization: expected float pixels in [0, 1], got dtype {x.dtype}; "
                            "convert uint8 images with x.float() / 255 (radii are stated in those units)")
        if x.dim() < 2 or x.shape[1] != self.mean.numel():
            raise ValueError(f"InputNormalization: expected (B, {self.mean.numel()}, ...), got {list(x.shape)}")
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"


class L2BallProjection(nn.Module):
    """x -> x * min(1, radius / ||x||) per sample (norm over all non-batch dims).

    The Euclidean projection onto a closed convex set, hence 1-Lipschitz (exact), and every output
    has norm <= ``radius``. Placed after ``InputNormalization`` it bounds what the first layer sees,
    which is what per-sample gradient bounds (``lipnet.privacy``) are computed from.
    """

    def __init__(self, radius: float) -> None:
        super().__init__()
        if not (isinstance(radius, (int, float)) and torch.isfinite(torch.tensor(float(radius))) and radius > 0):
            raise ValueError(f"L2BallProjection: radius must be finite and > 0, got {radius!r}")
        self.radius = float(radius)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"L2BallProjection: expected a batched input (B, ...), got {list(x.shape)}")
        norms = x.flatten(1).norm(dim=1).view([-1] + [1] * (x.dim() - 1))
        # clamp_max(1) on radius / norm: a zero sample stays zero (inf * 0 is avoided by the clamp)
        return x * (self.radius / norms.clamp_min(torch.finfo(x.dtype).tiny)).clamp_max(1.0)

    def extra_repr(self) -> str:
        return f"radius={self.radius}"
