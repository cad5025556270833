"""Small data and models the test modules share (tests/ is on pytest's import path)."""

from __future__ import annotations

import torch
from torch import nn

import lipnet.nn as ln
from lipnet.data import DATASETS, ImageDataset


def blobs(n: int = 600, seed: int = 0) -> ImageDataset:
    """Two classes of 1x8x8 uint8 images: bright top half vs bright bottom half, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    img = torch.rand(n, 1, 8, 8, generator=g) * 80
    img[labels == 0, :, :4] += 150
    img[labels == 1, :, 4:] += 150
    info = DATASETS["mnist"]
    return ImageDataset(img.clamp(0, 255).to(torch.uint8), labels, info)


def small_model() -> nn.Sequential:
    return nn.Sequential(ln.InputNormalization((0.5,)), ln.OrthoConv2d(1, 4, 3), ln.MaxMin(),
                         ln.OrthoConv2d(4, 8, 2, stride=2, padding=0), ln.MaxMin(), ln.Flatten(),
                         ln.OrthoLinear(128, 2))
