"""Input checks shared by the orthogonalization core: one reduction, one host sync."""

from __future__ import annotations

import torch


def check_matrices(W: torch.Tensor, name: str = "W", *, allow_zero: bool = False) -> None:
    """Raise a ValueError naming the problem unless ``W`` is a finite stack of matrices ``(..., m, n)``.

    A zero matrix is rejected unless ``allow_zero`` (its polar factor is undefined; its spectral
    norm is simply 0).
    """
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if W.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dims (..., m, n), got shape {tuple(W.shape)}")
    if W.numel() == 0:
        raise ValueError(f"{name} is empty, shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {W.dtype}")
    # amax propagates NaN and keeps inf, so one per-matrix reduction answers both questions.
    per_matrix_max = W.detach().abs().amax(dim=(-2, -1))
    finite, nonzero = (torch.isfinite(per_matrix_max).all(), (per_matrix_max > 0).all())
    finite, nonzero = torch.stack([finite, nonzero]).tolist()
    if not finite:
        raise ValueError(f"{name} has non-finite entries (NaN or inf)")
    if not nonzero and not allow_zero:
        raise ValueError(f"{name} contains a zero matrix: its polar factor is undefined")
