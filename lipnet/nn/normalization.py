"""Input normalization kept inside the network, so certificates stay in raw-pixel units."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ._checks import input_checks_enabled, plain_eager


class InputNormalization(nn.Module):
    """x -> (x - mean) / std per channel (dim 1).

    Lipschitz constant (L2, exact): 1 / min(std). It is part of the model, so ``lipschitz_bound``
    of the whole network -- and every certified radius divided by it -- is stated for the raw
    inputs a user attacks (pixels in [0, 1]), never for the normalized ones.

    ``input_range=(lo, hi)``: the inputs those radii are stated for. A batch with any value outside
    it, or any NaN, raises ``ValueError`` (0-255 pixels in float would run, give garbage and be
    certified in the wrong units). The models of :mod:`lipnet.models` set (0, 1); ``None`` (the
    default here) checks nothing -- the certificate itself holds for every input, so an attack on
    the whole ball (``pgd_l2(..., clamp=None)``) sets ``input_range = None`` first. Like the
    layers' other input checks it costs one host sync and is skipped under ``torch.compile``,
    ``torch.func`` and :func:`lipnet.nn.set_input_checks` ``(False)``. Integer inputs always raise
    ``TypeError``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float] | None = None, *,
                 input_range: tuple[float, float] | None = None) -> None:
        super().__init__()
        if input_range is not None:
            lo, hi = (float(v) for v in input_range)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"InputNormalization: input_range must be finite (lo, hi) with lo < hi, got {input_range!r}")
            input_range = (lo, hi)
        self.input_range = input_range
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
        if self.input_range is not None and input_checks_enabled() and plain_eager():
            self._check_range(x)
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)

    def _check_range(self, x: torch.Tensor) -> None:
        lo, hi = self.input_range
        if x.numel() == 0:
            return
        low, high = torch.stack(torch.aminmax(x.detach().float())).tolist()   # one host sync
        if not (lo <= low and high <= hi):   # also false for NaN
            scale = " (0-255 pixels? divide by 255)" if high > 1.5 and hi == 1.0 else ""
            raise ValueError(f"InputNormalization: inputs must lie in [{lo:g}, {hi:g}] (the units the model's "
                             f"radii are stated in), got values in [{low:g}, {high:g}]{scale}; an attack that "
                             "leaves the box on purpose sets this layer's input_range = None")

    def extra_repr(self) -> str:
        rng = "" if self.input_range is None else f", input_range={self.input_range}"
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}{rng}"


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


class GroupNormalization(nn.Module):
    """Per-sample group normalization without affine parameters: the channels (dim 1) are split into
    ``num_groups`` consecutive groups, and each group of each sample (channels x positions, n entries)
    is centred and divided by sqrt(var + eps), var its biased variance -- ``nn.GroupNorm(affine=False)``.

    Each sample is normalized by its own statistics, so the layer couples no samples and uses no data
    beyond the sample itself: a fixed per-example preprocessing, free under differential privacy.
    Guarantees (data independent, for any input):

    * output norm: a group's squared norm is n var / (var + eps) < n, so every output has
      ``||y|| <= sqrt(numel per sample)`` (:meth:`output_norm_bound`);
    * Lipschitz (L2): per group y = c / s(c), c the centred group (an orthogonal projection), s =
      sqrt(||c||^2 / n + eps); its Jacobian (I - c c^T / (n s^2)) / s has norm 1 / s <= 1 / sqrt(eps),
      and the groups are disjoint blocks, so ``lipschitz_bound = 1 / sqrt(eps)``. Sound but large by
      nature (near-constant groups are scaled up): certificates through it stay correct and get small.

    Why it is here: clipping-free DP-SGD calibrates its noise to the bound on each sample's feature
    norm. Scattering features have norms spread far below their worst case; after this layer every
    sample's norm is within a factor sqrt(var / (var + eps)) of the bound, so the noise matches the
    gradients it hides (Tramer & Boneh, 2021, normalize scattering features with GroupNorm).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        for name, v in (("num_groups", num_groups), ("num_channels", num_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GroupNormalization: {name} must be an int >= 1, got {v!r}")
        if num_channels % num_groups:
            raise ValueError(f"GroupNormalization: num_channels={num_channels} is not divisible by "
                             f"num_groups={num_groups}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"GroupNormalization: eps must be finite and > 0, got {eps!r}")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"GroupNormalization: expected (B, {self.num_channels}, ...), got {list(x.shape)}")
        return nn.functional.group_norm(x, self.num_groups, eps=self.eps)

    @staticmethod
    def output_norm_bound(sample_shape: Sequence[int]) -> float:
        """sqrt(entries per sample): a bound on every output's L2 norm, whatever the input."""
        return math.sqrt(math.prod(int(s) for s in sample_shape))

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, num_channels={self.num_channels}, eps={self.eps:g}"
