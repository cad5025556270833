"""Ready 1-Lipschitz architectures, built only from ``lipnet.nn``.

Every model starts with its ``InputNormalization``, so ``lipschitz_bound(model)`` -- and every
certified radius -- is stated for raw pixels in [0, 1]. ``build_model(name, **config)`` rebuilds a
model from the (name, config) pair a checkpoint stores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import nn

from .. import nn as ln
from ..nn.parametrizations import DEFAULT_LAYER_METHOD, DEFAULT_PARAMETRIZATION


CENTERINGS = ("batch", "layer", "none")
# the inputs every model's radii are stated for: its InputNormalization refuses anything else
PIXEL_RANGE = (0.0, 1.0)
# residual blocks of `liresnet`: "convex" x -> (1-a) x + a MaxMin(center(AOC conv(x))); "sll" SLLBlock
# (Araujo et al. 2023). A convolutional ConvexPotentialLayer is not offered: its step needs a sound
# bound on ||W|| at every forward pass, and conv_operator_norm_bound's frequency grid (one float64
# eigenvalue problem per grid point) is far slower than the convolution at these widths.
RESIDUAL_BLOCKS = ("convex", "sll")


def _centering(channels: int, centering: str) -> list[nn.Module]:
    # "batch" couples the samples of a batch (fine for ordinary training, refused by lipnet.privacy);
    # "layer" is per sample; "none" keeps only the convolution's bias.
    if centering == "batch":
        return [ln.BatchCentering(channels)]
    if centering == "layer":
        return [ln.LayerCentering(channels)]
    if centering == "none":
        return []
    raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")


def _conv_block(cin: int, cout: int, kernel: int, stride: int, method: str, centering: str = "batch",
                parametrization: str = DEFAULT_PARAMETRIZATION, conv_bias: bool | None = None) -> list[nn.Module]:
    padding = "same" if stride == 1 else (kernel - stride) // 2
    # A bias right before BatchCentering is subtracted again by it: its true gradient is zero and
    # Adam turns the rounding noise in it into steps (the centering's own bias does its job).
    bias = centering != "batch" if conv_bias is None else conv_bias
    return [ln.OrthoConv2d(cin, cout, kernel, stride=stride, padding=padding, padding_mode="zeros", method=method,
                           parametrization=parametrization, bias=bias),
            *_centering(cout, centering), ln.MaxMin()]


def _residual_block(channels: int, block: str, method: str, centering: str, parametrization: str,
                    conv_bias: bool | None) -> nn.Module:
    if block == "convex":
        inner = nn.Sequential(*_conv_block(channels, channels, 3, 1, method, centering, parametrization, conv_bias))
        return ln.ConvexResidual(inner, alpha=0.5, learnable=True)
    return ln.SLLBlock(channels, channels, kernel_size=3)


def mnist_convnet(num_classes: int = 10, in_channels: int = 1, width: int = 16, hidden: int = 256,
                  mean: Sequence[float] = (0.1307,), std: Sequence[float] | None = None,
                  method: str = DEFAULT_LAYER_METHOD, centering: str = "batch",
                  input_radius: float | None = None, parametrization: str = DEFAULT_PARAMETRIZATION,
                  conv_bias: bool | None = None) -> nn.Sequential:
    """Small 1-Lipschitz ConvNet for 28x28 inputs (MNIST, Fashion-MNIST).

    Normalization -> 2 x [orthogonal 3x3 conv, centering, MaxMin] at 28x28 -> orthogonal 2x2/stride-2
    downsampling (RKO) -> 3x3 conv at 14x14 -> downsampling to 7x7 -> orthogonal dense layers.
    ``std=None`` subtracts the mean only, so the network bound stays 1 (dividing by MNIST's
    std=0.31 would multiply every bound by 3.2). ``centering``: "batch" (BatchCentering), "layer"
    (LayerCentering, per sample) or "none"; private training needs "layer" or "none".
    ``input_radius``: project the normalized input onto the L2 ball of that radius
    (``L2BallProjection``, 1-Lipschitz) -- it bounds what the first layer sees (``lipnet.privacy``).
    ``method`` / ``parametrization``: those of every orthogonal layer (``lipnet.nn.OrthoConv2d``);
    ``conv_bias``: whether the convolutions have a bias (default: not before ``BatchCentering``).
    """
    w, c, p, b = width, centering, parametrization, conv_bias
    layers: list[nn.Module] = [ln.InputNormalization(mean, std, input_range=PIXEL_RANGE)]
    if input_radius is not None:
        layers.append(ln.L2BallProjection(input_radius))
    layers += _conv_block(in_channels, w, 3, 1, method, c, p, b) + _conv_block(w, w, 3, 1, method, c, p, b)
    layers += _conv_block(w, 2 * w, 2, 2, method, c, p, b) + _conv_block(2 * w, 2 * w, 3, 1, method, c, p, b)
    layers += _conv_block(2 * w, 4 * w, 2, 2, method, c, p, b)
    layers += [ln.Flatten(), ln.OrthoLinear(4 * w * 7 * 7, hidden, method=method, parametrization=p), ln.MaxMin(),
               ln.OrthoLinear(hidden, num_classes, method=method, parametrization=p)]
    return nn.Sequential(*layers)


def liresnet(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: int = 64,
             blocks: Sequence[int] = (2, 2, 2), stem_stride: int = 1, max_width: int = 512,
             hidden: int = 512, mean: Sequence[float] = (0.4914, 0.4822, 0.4465),
             std: Sequence[float] | None = None, method: str = DEFAULT_LAYER_METHOD,
             centering: str = "batch", parametrization: str = DEFAULT_PARAMETRIZATION,
             conv_bias: bool | None = None, block: str = "convex") -> nn.Sequential:
    """1-Lipschitz residual CNN in the spirit of AOC / LiResNet.

    Stem (orthogonal conv, stride ``stem_stride``), then stages of residual blocks, each stage but
    the last followed by an orthogonal 2x2/stride-2 conv that doubles the width (up to
    ``max_width``); then flatten and an orthogonal dense head. Bound of the whole net: the product
    of its layers' bounds (~1 with ``std=None``; ``1/min(std)`` otherwise).

    ``block`` (one of ``RESIDUAL_BLOCKS``): "convex" is ``ConvexResidual``
    x -> (1-a) x + a MaxMin(center(conv(x))) around an orthogonal 3x3 conv (learned a in (0, 1):
    1-Lipschitz by the convex rule); "sll" a 3x3 ``SLLBlock`` (x -> x - 2 W T^-1 relu(W^T x + b),
    1-Lipschitz by its theorem). ``centering``: as in :func:`mnist_convnet` ("layer" or "none" for
    private training; with "sll" it applies to the stem and downsampling convs only);
    ``method`` / ``parametrization``: those of every orthogonal layer; ``conv_bias``: as in
    :func:`mnist_convnet`.
    """
    p, b = parametrization, conv_bias
    if block not in RESIDUAL_BLOCKS:
        raise ValueError(f"liresnet: block must be one of {RESIDUAL_BLOCKS}, got {block!r}")
    if image_size % stem_stride:
        raise ValueError(f"liresnet: image_size={image_size} is not divisible by stem_stride={stem_stride}")
    size, w = image_size // stem_stride, width
    layers: list[nn.Module] = [ln.InputNormalization(mean, std, input_range=PIXEL_RANGE)]
    layers += _conv_block(in_channels, w, max(3, stem_stride), stem_stride, method, centering, p, b)
    for stage, n in enumerate(blocks):
        layers += [_residual_block(w, block, method, centering, p, b) for _ in range(n)]
        if stage < len(blocks) - 1:
            if size % 2:
                raise ValueError(f"liresnet: feature map {size}x{size} cannot be halved; use fewer stages")
            layers += _conv_block(w, min(2 * w, max_width), 2, 2, method, centering, p, b)
            w, size = min(2 * w, max_width), size // 2
    if size > 8:  # keep the dense head small: fold the remaining map with a kernel == stride conv
        fold = size // 4
        layers += [ln.OrthoConv2d(w, w, fold, stride=fold, padding=0, padding_mode="zeros", method=method,
                                  parametrization=p)]
        size //= fold
    layers += [ln.Flatten(), ln.OrthoLinear(w * size * size, hidden, method=method, parametrization=p), ln.MaxMin(),
               ln.OrthoLinear(hidden, num_classes, method=method, parametrization=p)]
    return nn.Sequential(*layers)


def scatter_net(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, J: int = 2, L: int = 8,
                hidden: int = 0, head: str = "plain", mean: Sequence[float] = (0.1307,),
                std: Sequence[float] | None = None, input_radius: float | None = None,
                norm_groups: int | None = None) -> nn.Sequential:
    """Fixed wavelet-scattering features (``Scattering2d``, no trainable parameter) and a trained head.

    Normalization -> [L2BallProjection(input_radius)] -> Scattering2d(J, L) -> [GroupNormalization(norm_groups)]
    -> flatten ->
    [OrthoLinear(hidden) -> MaxMin] -> linear head. ``head="plain"``: an unconstrained ``nn.Linear``
    (its Lipschitz bound is its spectral norm, so certificates stay sound but radii shrink as it
    grows); ``"ortho"``: ``OrthoLinear`` (the whole network 1-Lipschitz). Tramer & Boneh (2021) found
    scattering + linear the strongest private MNIST/Fashion-MNIST model; with clipping-free DP-SGD
    (``lipnet.privacy``) the noise goes to the head only, and the features are computed once
    (``lipnet.privacy.precompute_frozen_prefix``). ``norm_groups``: each sample's scattering channels are
    normalized in that many groups (``GroupNormalization``), so every feature vector has norm close to the
    data-independent bound the private head's noise is calibrated to; its Lipschitz bound 1/sqrt(eps) makes
    certificates through it small (a model for private training, not for certification).
    """
    if head not in ("plain", "ortho"):
        raise ValueError(f"head must be 'plain' or 'ortho', got {head!r}")
    scattering = ln.Scattering2d(in_channels, image_size, J=J, L=L)
    features = math.prod(scattering.out_shape)
    layers: list[nn.Module] = [ln.InputNormalization(mean, std, input_range=PIXEL_RANGE)]
    if input_radius is not None:
        layers.append(ln.L2BallProjection(input_radius))
    layers.append(scattering)
    if norm_groups is not None:
        layers.append(ln.GroupNormalization(norm_groups, scattering.out_shape[0]))
    layers.append(ln.Flatten())
    if hidden:
        layers += [ln.OrthoLinear(features, hidden), ln.MaxMin()]
        features = hidden
    layers.append(nn.Linear(features, num_classes) if head == "plain" else ln.OrthoLinear(features, num_classes))
    return nn.Sequential(*layers)


def cifar_liresnet(num_classes: int = 10, width: int = 64, blocks: Sequence[int] = (2, 2, 2),
                   parametrization: str = DEFAULT_PARAMETRIZATION, block: str = "convex", **kw) -> nn.Sequential:
    """CIFAR-10 config of :func:`liresnet` (32x32 -> 8x8, widths 64/128/256)."""
    return liresnet(num_classes=num_classes, in_channels=3, image_size=32, width=width, blocks=blocks,
                    parametrization=parametrization, block=block, **kw)


def imagenet_liresnet(num_classes: int = 1000, width: int = 64, blocks: Sequence[int] = (1, 1, 1, 1),
                      parametrization: str = DEFAULT_PARAMETRIZATION, block: str = "convex",
                      **kw) -> nn.Sequential:
    """ImageNet-sized config of :func:`liresnet`: 224x224 inputs, stride-4 stem, 4 stages (56 -> 7)."""
    kw.setdefault("mean", (0.485, 0.456, 0.406))
    return liresnet(num_classes=num_classes, in_channels=3, image_size=224, width=width, blocks=blocks,
                    stem_stride=4, parametrization=parametrization, block=block, **kw)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mnist-convnet": mnist_convnet,
    "cifar-liresnet": cifar_liresnet,
    "imagenet-liresnet": imagenet_liresnet,
    "scatter-net": scatter_net,
}


def build_model(name: str, **config) -> nn.Module:
    """The model ``name`` built with keyword ``config`` (what a checkpoint stores to rebuild it)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name](**config)


__all__ = ["CENTERINGS", "MODELS", "RESIDUAL_BLOCKS", "build_model", "cifar_liresnet", "imagenet_liresnet", "liresnet",
           "mnist_convnet", "scatter_net"]
