"""The private-training recipe: which layers train, the loss, and the measured presets of
``lipnet train --dp`` (``TrainConfig.from_preset(dataset, private=True, model=...)``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lipnet.nn import ClippedLossGradient, LipschitzCrossEntropy, OrthoConv2d, OrthoConvTranspose2d
from lipnet.validate import one_of


@dataclass
class PrivatePreset:
    """Defaults of ``lipnet train --dp`` per dataset and model: the model's config (no batch-coupled
    layers), the expected (Poisson) batch size, the input ball radius X (raw pixels), the optimizer,
    the noise calibration and which layers train."""

    model_config: dict
    batch_size: int
    lr: float
    epochs: int
    input_bound: float
    offset: float
    temperature: float
    optimizer: str = "sgd"
    momentum: float = 0.9
    noise: str = "per_layer"
    trainable: str = "dense"
    freeze_bias: bool = True
    loss_clip: float | None = None   # ClippedLossGradient: per-sample logit-gradient norm (None: the loss' own bound)


# MNIST / Fashion-MNIST: raw pixels have ||x|| <= 28, so the raw projection is a no-op; the model's own
# L2BallProjection(8) after the mean subtraction bounds what the first layer (or the scattering) sees.
# scatter-net (the default): fixed Scattering2d features + a linear head trained with the cross-entropy
# (temperature 1); chosen on a held-out part of the MNIST train split, benchmarks/privacy.py --arch scatter --tune.
# mnist-convnet: the convolutions keep their random orthogonal initialization (trainable="dense": their
# analytic gradient bounds are far above their actual per-sample norms, so noise calibrated to them drowns
# their gradients; chosen on a held-out split, benchmarks/privacy.py --tune, benchmarks/results/README.md#privacy).
_SCATTER_DP = {"input_radius": 8.0, "J": 2, "L": 8, "head": "plain"}
_MNIST_DP = {"centering": "none", "width": 8, "hidden": 128, "input_radius": 8.0}
PRIVATE_PRESETS: dict[str, dict[str, PrivatePreset]] = {
    dataset: {
        "scatter-net": PrivatePreset({"mean": mean, **_SCATTER_DP}, 4096, 0.5, 20, 28.0, 0.0, 1.0, trainable="all"),
        "mnist-convnet": PrivatePreset({"mean": mean, **_MNIST_DP}, 1024, 0.2, 15, 28.0, 0.0, 0.1),
    } for dataset, mean in (("mnist", (0.1307,)), ("fashion-mnist", (0.2860,)))
}
# CIFAR-10: raw pixels have ||x|| <= sqrt(3 * 32 * 32) < 55.5. scatter-net (the default): the scattering channels
# normalized per sample in 81 groups (GroupNormalization: every feature vector has norm <= sqrt(15552), and close
# to it), a linear head with its bias trained, the cross-entropy's logit gradient clipped to 0.25, global noise,
# expected batch 8192 for 60 epochs, lr 0.00625 -- chosen at eps=3 on a held-out 10k of the CIFAR-10 train split
# (benchmarks/results/privacy_tune_scatter_cifar10.md, the feature_norm=group rows).
# cifar-liresnet: not tuned, the MNIST CNN recipe.
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
PRIVATE_PRESETS["cifar10"] = {
    "scatter-net": PrivatePreset({"mean": _CIFAR_MEAN, "in_channels": 3, "image_size": 32, **_SCATTER_DP,
                                  "norm_groups": 81}, 8192, 0.00625, 60, 55.5, 0.0, 1.0, trainable="all",
                                 freeze_bias=False, noise="global", loss_clip=0.25),
    "cifar-liresnet": PrivatePreset({"mean": _CIFAR_MEAN, "centering": "none", "width": 32, "blocks": (1, 1, 1)}, 2048,
                                    0.2, 30, 56.0, 0.0, 0.1),
}


def private_loss(temperature: float, offset: float, loss_clip: float | None = None) -> nn.Module:
    """``LipschitzCrossEntropy(temperature, offset)``; with ``loss_clip`` its per-sample logit gradient is
    clipped to that norm (:class:`lipnet.nn.ClippedLossGradient`), the bound the noise is then calibrated to
    instead of the loss' sqrt(2)."""
    loss = LipschitzCrossEntropy(temperature=temperature, offset=offset)
    return ClippedLossGradient(loss, loss_clip) if loss_clip else loss


TRAINABLE = ("dense", "all")   # private_trainable's choices


def private_trainable(model: nn.Module, trainable: str = "dense", freeze_bias: bool = True) -> list[nn.Parameter]:
    """Freeze what private training leaves alone; returns the parameters that still train.
    ``trainable="dense"``: every convolution keeps its current (e.g. random orthogonal) weights;
    ``"all"``: nothing frozen. ``freeze_bias``: biases are zeroed and frozen. Frozen tensors release
    nothing, so they need no gradient bound and no noise."""
    one_of(trainable, TRAINABLE, "trainable")

    if trainable == "dense":
        for m in model.modules():
            if isinstance(m, (OrthoConv2d, OrthoConvTranspose2d, nn.Conv2d, nn.ConvTranspose2d)):
                m.requires_grad_(False)
    if freeze_bias:
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                with torch.no_grad():
                    p.zero_()
                p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


__all__ = ["PRIVATE_PRESETS", "PrivatePreset", "private_loss", "private_trainable"]
