"""lipnet.privacy: clipping-free DP-SGD (installed as ``lipnet.privacy``).

Per-sample gradient norms of a Lipschitz network are bounded analytically (no per-sample
gradients, no clipping); batches are Poisson-sampled exactly as opacus' accountants assume; noise
is calibrated with opacus' ``get_noise_multiplier`` and epsilon tracked with its RDP / PRV
accountants.

* :func:`gradient_norm_bounds` -- sound per-tensor bounds on one sample's gradient (sensitivity).
* :class:`PrivateTrainer` / :func:`make_private` -- the private training loop.
* :class:`PoissonBatchLoader` / :func:`poisson_loader` -- Poisson subsampling.
* :func:`precompute_frozen_prefix` -- features of a frozen leading part (e.g. ``Scattering2d``) computed
  once; the same mechanism on the trainable rest, much faster.
* :func:`private_channel_moments` -- per-channel feature mean / std released with the Gaussian mechanism,
  composed into the trainer's accountant (``prior_releases``) for data normalization.
* :func:`per_sample_gradient_norms` -- exact per-sample norms (torch.func), to audit the bounds.
"""

from .audit import per_sample_gradient_norms
from .engine import (ACCOUNTANTS, NOISE_MODES, EpochReport, PrivateTrainer, calibrate_noise_multiplier,
                     check_privacy_params, epoch_row, make_private, noise_stds)
from .features import FrozenFeatures, precompute_frozen_prefix, prefix_features, split_frozen_prefix
from .moments import ChannelMoments, GaussianRelease, channel_moment_clips, private_channel_moments
from .recipe import PRIVATE_PRESETS, PrivatePreset, private_loss, private_trainable
from .sampling import FeatureDataset, PoissonBatchLoader, poisson_loader
from .sensitivity import BOUND_MARGIN, SensitivityReport, TensorBound, conv_reuse, gradient_norm_bounds, loss_lipschitz

__all__ = [
    "ACCOUNTANTS", "BOUND_MARGIN", "ChannelMoments", "EpochReport", "GaussianRelease", "calibrate_noise_multiplier",
    "channel_moment_clips", "private_channel_moments", "FeatureDataset", "FrozenFeatures", "NOISE_MODES", "PRIVATE_PRESETS",
    "PoissonBatchLoader", "PrivatePreset", "PrivateTrainer", "SensitivityReport", "TensorBound", "check_privacy_params", "conv_reuse", "epoch_row", "gradient_norm_bounds",
    "loss_lipschitz", "make_private", "noise_stds", "per_sample_gradient_norms", "poisson_loader",
    "precompute_frozen_prefix", "prefix_features", "private_loss", "private_trainable", "split_frozen_prefix",
]
