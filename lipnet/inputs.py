"""Input batches as certificates, bounds and conformal sets accept them: a tensor of inputs, or
a loader of ``(x, y)`` / ``x`` batches; real-valued, finite and non-empty."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, y)`` of a loader's batch: a pair, a one-element sequence (y None) or a bare tensor."""
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def first_batch(data: torch.Tensor | Iterable) -> torch.Tensor:
    """``data`` itself if it is a tensor, else the inputs of its first batch; checked by
    :func:`check_finite` (an empty loader raises ValueError)."""
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
    """ValueError unless ``x`` is a non-empty, floating-point tensor of finite values."""
    if x.numel() == 0:
        raise ValueError("empty input batch")
    if not x.is_floating_point():
        raise ValueError(f"inputs of dtype {x.dtype}: certificates are about real-valued inputs (float pixels in "
                         "[0, 1] for lipnet's models: convert uint8 images with x.float() / 255)")
    if not torch.isfinite(x).all():
        raise ValueError("input contains NaN or inf values; a certificate for it would be meaningless")


__all__ = ["check_finite", "first_batch", "split_batch"]
