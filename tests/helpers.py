"""Small data and models the test modules share (tests/ is on pytest's import path)."""

from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType

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


def load_benchmark(name: str) -> ModuleType:
    """A fresh copy of the script ``benchmarks/<name>.py`` as a module (its globals, e.g. a cache
    directory, are this copy's own)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"lipnet_benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
