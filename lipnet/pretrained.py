"""Certified models shipped inside the package: ``pretrained(name)``.

The registry sits above :mod:`lipnet.checkpoints` (which it loads with) and :mod:`lipnet.models`
(which rebuild the architectures); the weights stay package data of ``lipnet/models/weights/``.
Each file there is an ordinary lipnet checkpoint (``lipnet train``'s
format: the config that rebuilds the model and its ``state_dict``, without training state),
loaded with ``torch.load(weights_only=True)`` like any other. Floating tensors may be stored in
fp16; they are loaded into the fp32 model, whose orthogonal layers retract their (rounded) factors
back onto the orthogonal manifold before first use. Nothing certified is read from the file: the
Lipschitz bound, and every radius derived from it, is recomputed from the loaded weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoints import load_checkpoint

WEIGHTS_DIR = Path(__file__).resolve().parent / "models" / "weights"


@dataclass(frozen=True)
class PretrainedModel:
    """What the package ships under ``name``: the file, its dataset and how it was made (the
    README's table gives the full numbers and the command that measured them)."""

    name: str
    dataset: str
    file: str
    description: str
    # clean accuracy on the 500 test images load_dataset(..., limit=500) returns (a fixed random
    # subset), measured when the weights were shipped; the tests reproduce it to within a point
    clean_limit_500: float


PRETRAINED: dict[str, PretrainedModel] = {m.name: m for m in (
    PretrainedModel("cifar10", "cifar10", "cifar10.pt",
                    "the cifar10 preset (lipnet train --dataset cifar10): cifar-liresnet width 32, blocks (1, 1, 1), "
                    "256-wide head, TurboMuon, margin 0.45, 30 epochs in fp32 on 2 CPU cores; fp16 weights; its "
                    "measured accuracies: docs/certification.md#cifar-10-on-two-cpu-cores",
                    clean_limit_500=0.738),
    PretrainedModel("mnist", "mnist", "mnist.pt",
                    "mnist-convnet width 32, offset 1.55, TurboMuon on the orthogonal factors, 30 epochs on 50,000 "
                    "training images (lipnet train --dataset mnist --width 32 --epochs 30 --offset 1.55 --optimizer "
                    "turbomuon --holdout 10000); fp16 weights; its measured accuracies: "
                    "benchmarks/results/README.md#certification",
                    clean_limit_500=0.980),
    PretrainedModel("fashion-mnist", "fashion-mnist", "fashion-mnist.pt",
                    "the fashion-mnist preset (lipnet train --dataset fashion-mnist): mnist-convnet width 16, "
                    "10 epochs on 1 CPU thread; fp16 weights; its measured accuracies: "
                    "benchmarks/results/README.md#certification",
                    clean_limit_500=0.898),
)}


def pretrained_names() -> list[str]:
    """The names :func:`pretrained` accepts."""
    return sorted(PRETRAINED)


def pretrained_path(name: str) -> Path:
    """The checkpoint file of the shipped model ``name``; ValueError listing the known names."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; known: {pretrained_names()}")
    path = WEIGHTS_DIR / PRETRAINED[name].file
    if not path.is_file():
        raise FileNotFoundError(f"the weights of pretrained model {name!r} are missing from the installed package "
                                f"(expected {path}); reinstall lipnet")
    return path


def load_pretrained(name: str, map_location: str | torch.device = "cpu"):
    """``(model in eval mode, its TrainConfig)`` for the shipped model ``name``.

    Loaded safely (``torch.load(weights_only=True)``, as :func:`lipnet.checkpoints.load_checkpoint`).
    Loading writes the stored factors into the fp32 parameters, and the layers retract what was
    written before its first use, so ``lipnet.certify.network_lipschitz_bound`` computes the bound
    of the weights actually used (a bound is never read from the file)."""
    model, config, _ = load_checkpoint(pretrained_path(name), map_location=map_location)
    return model.eval(), config


def pretrained(name: str, map_location: str | torch.device = "cpu") -> nn.Module:
    """The shipped certified model ``name`` (see :func:`pretrained_names`) in eval mode.

    Its inputs are raw pixels in [0, 1] (the normalization is the model's first layer), so
    ``lipnet.certify.certified_radius(model(x), network_lipschitz_bound(model), x)`` is a radius in
    pixel space. ValueError for an unknown name (listing the known ones)."""
    return load_pretrained(name, map_location)[0]


__all__ = ["PRETRAINED", "PretrainedModel", "WEIGHTS_DIR", "load_pretrained", "pretrained", "pretrained_names",
           "pretrained_path"]
