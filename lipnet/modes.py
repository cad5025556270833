"""Running a module in train or eval mode for a while, then giving every submodule its own mode back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def training_mode(module: nn.Module, training: bool) -> Iterator[nn.Module]:
    """``module`` and all its submodules in train (``training=True``) or eval mode inside the block.

    On exit each submodule gets back the mode it had: ``module.train(previous)`` would reset them all
    to the container's flag, which is wrong for a container built over layers of mixed modes (e.g. a
    ``Sequential`` slice of a model, or a model with some layers deliberately kept in eval mode)."""
    modes = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode
