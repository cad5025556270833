"""Running a module in a mode for a while: train or eval (every submodule then gets its own mode
back), autocast off for the constrained weights, and the eval-mode fp32 function certificates are
about."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
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


def full_precision(device_type: str) -> AbstractContextManager:
    """Autocast off for ``device_type`` inside the block (a no-op where it is not on).

    The layers compute their constrained weights (orthogonalization, BCOP/RKO construction, AOL
    scales) inside it, so a weight is as orthogonal under autocast as in fp32; the convolution or
    matmul that *uses* the weight runs outside, in autocast's precision.
    """
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode and full precision (certificates, bounds and conformal sets are
    about the eval-mode fp32 function, whatever autocast context the caller is in), then restore
    every submodule's own mode."""
    with training_mode(model, False), full_precision("cpu"), full_precision("cuda"):
        yield model


__all__ = ["eval_mode", "full_precision", "training_mode"]
