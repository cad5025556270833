"""Small helpers shared by the certification modules."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..modes import training_mode
from ..nn.precision import full_precision


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode and full precision (certificates, bounds and conformal sets are
    about the eval-mode fp32 function, whatever autocast context the caller is in), then restore
    every submodule's own mode."""
    with training_mode(model, False), full_precision("cpu"), full_precision("cuda"):
        yield model


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def first_batch(data: torch.Tensor | Iterable) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        x = data
    else:
        try:
            x, _ = split_batch(next(iter(data)))
        except StopIteration:
            raise ValueError("the data loader is empty") from None
    check_finite(x)
    return x


def check_finite(x: torch.Tensor) -> None:
    if x.numel() == 0:
        raise ValueError("empty input batch")
    if not x.is_floating_point():
        raise ValueError(f"inputs of dtype {x.dtype}: certificates are about real-valued inputs (float pixels in "
                         "[0, 1] for lipnet's models: convert uint8 images with x.float() / 255)")
    if not torch.isfinite(x).all():
        raise ValueError("input contains NaN or inf values; a certificate for it would be meaningless")
