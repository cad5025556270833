"""Per-channel feature statistics released under differential privacy, for data normalization.

A linear head on fixed features learns much faster under DP noise when the features are
standardized per channel (Tramer & Boneh 2021's private "BN" statistics). The mean and variance
of each channel are a function of every training example, so they are released with the Gaussian
mechanism and charged to the same privacy budget as the training that uses them.

The mechanism, for features x_i of shape (C, *spatial), i = 1..n, and clips c_m, c_s:

    m_i = mean over positions of x_i            (per channel, C entries), scaled down to ||m_i|| <= c_m
    s_i = mean over positions of x_i^2          (per channel, C entries), scaled down to ||s_i|| <= c_s
    M   = sum_i m_i + N(0, sigma^2 c_m^2 I),    S = sum_i s_i + N(0, sigma^2 c_s^2 I)
    mean = M / n,   var = max(S / n - mean^2, min_var)

Adding or removing one example moves M by at most c_m and S by at most c_s: two Gaussian
mechanisms of noise multiplier sigma on the full data set (sample rate 1), which is how they enter
the accountant (:class:`GaussianRelease` ``(sigma, 1.0, 2)``; opacus' RDP and PRV accountants
compose them with the training steps). Dividing by the public data set size n, not by a noisy
count, is post-processing, as the trainer's division by the expected batch size. The clips are
fixed before looking at the data (``channel_moment_clips`` gives data-independent ones for inputs
of bounded norm), never a data quantile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lipnet.validate import finite_positive


@dataclass(frozen=True)
class GaussianRelease:
    """``steps`` compositions of the (Poisson-subsampled, at ``sample_rate``) Gaussian mechanism with
    ``noise_multiplier``: one entry of an opacus accountant's history."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def as_history(self) -> tuple[float, float, int]:
        return (float(self.noise_multiplier), float(self.sample_rate), int(self.steps))


@dataclass(frozen=True)
class ChannelMoments:
    """The released per-channel ``mean`` and ``std`` (= sqrt(var)) and the mechanism that released them."""

    mean: torch.Tensor
    std: torch.Tensor
    release: GaussianRelease


def channel_moment_clips(entry_norm_bound: float, channels: int, positions: int) -> tuple[float, float]:
    """Clips that never clip, for features with ||x_i|| <= ``entry_norm_bound`` over ``channels`` x
    ``positions`` entries: ||m_i|| <= ||x_i|| / sqrt(positions) (Cauchy-Schwarz per channel) and
    ||s_i||_2 <= ||s_i||_1 = ||x_i||^2 / positions (s_i >= 0)."""
    finite_positive(entry_norm_bound, "entry_norm_bound")
    if channels < 1 or positions < 1:
        raise ValueError(f"channels and positions must be >= 1, got {channels}, {positions}")
    return entry_norm_bound / math.sqrt(positions), entry_norm_bound ** 2 / positions


def _clip_rows(v: torch.Tensor, clip: float) -> torch.Tensor:
    norms = v.norm(dim=1, keepdim=True)
    return v * (clip / norms.clamp_min(clip))  # scale only the rows above the clip: ||row|| <= clip


@torch.no_grad()
def clipped_moment_sums(features: torch.Tensor, clip_mean: float, clip_sq: float, chunk: int = 4096) -> torch.Tensor:
    """(2, C) float64: sum_i of the clipped m_i (row 0) and of the clipped s_i (row 1), before noise.
    Adding or removing one sample changes row 0 by at most ``clip_mean`` and row 1 by at most
    ``clip_sq`` in L2 norm (the sensitivity the noise is scaled to)."""
    n, c = features.shape[:2]
    sums = torch.zeros(2, c, dtype=torch.float64)
    for i in range(0, n, chunk):
        x = features[i:i + chunk].double().flatten(2)  # (b, C, positions)
        if not torch.isfinite(x).all():
            raise ValueError("features contain NaN or inf")
        sums[0] += _clip_rows(x.mean(2), clip_mean).sum(0)
        sums[1] += _clip_rows(x.square().mean(2), clip_sq).sum(0)
    return sums


@torch.no_grad()
def private_channel_moments(features: torch.Tensor, *, clip_mean: float, clip_sq: float, noise_multiplier: float,
                            min_var: float, generator: torch.Generator | None = None,
                            chunk: int = 4096) -> ChannelMoments:
    """Release each channel's mean and variance of ``features`` (N, C, *spatial) under DP.

    Guarantee: the output is the two-fold Gaussian mechanism of the module docstring, with
    sensitivities ``clip_mean`` and ``clip_sq`` enforced by clipping every sample's statistics, so it
    is exactly what ``ChannelMoments.release`` = ``GaussianRelease(noise_multiplier, 1.0, 2)``
    describes to an accountant, whatever the data. ``min_var`` (> 0, fixed in advance) floors the
    released variance so that std = sqrt(var) >= sqrt(min_var): the normalization's Lipschitz
    constant 1 / min(std) is then at most 1 / sqrt(min_var)."""
    if features.dim() < 2 or len(features) == 0 or not features.is_floating_point():
        raise ValueError(f"features must be a non-empty float tensor (N, C, ...), got {tuple(features.shape)} "
                         f"{features.dtype}")
    clip_mean = finite_positive(clip_mean, "clip_mean")
    clip_sq = finite_positive(clip_sq, "clip_sq")
    sigma = finite_positive(noise_multiplier, "noise_multiplier")
    min_var = finite_positive(min_var, "min_var")
    n, c = features.shape[:2]
    sums = clipped_moment_sums(features, clip_mean, clip_sq, chunk)
    noise = torch.randn(2, c, generator=generator, dtype=torch.float64)
    sums += noise * torch.tensor([[sigma * clip_mean], [sigma * clip_sq]], dtype=torch.float64)
    mean = sums[0] / n
    var = (sums[1] / n - mean.square()).clamp_min(min_var)
    return ChannelMoments(mean.float(), var.sqrt().float(), GaussianRelease(sigma, 1.0, 2))


__all__ = ["ChannelMoments", "GaussianRelease", "channel_moment_clips", "private_channel_moments"]
