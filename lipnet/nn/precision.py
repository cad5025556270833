"""The layers' precision policy under ``torch.autocast``: constrained weights in full precision."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def full_precision(device_type: str) -> AbstractContextManager:
    """Autocast off for ``device_type`` inside the block (a no-op where it is not on).

    The layers compute their constrained weights (orthogonalization, BCOP/RKO construction, AOL
    scales) inside it, so a weight is as orthogonal under autocast as in fp32; the convolution or
    matmul that *uses* the weight runs outside, in autocast's precision.
    """
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


__all__ = ["full_precision"]
