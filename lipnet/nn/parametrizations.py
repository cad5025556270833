"""Weight parametrizations (``torch.nn.utils.parametrize`` style): the raw parameter is kept, the
constrained weight is derived on access, ``state_dict`` holds only raw parameters.

* :class:`CoreOrthogonalizer` -- the core's ``orthogonalize`` of a raw (..., m, n) parameter; with
  :func:`core_ortho_params` it fills orthogonium's ``OrthoParams`` slots, so every matrix
  orthogonalization inside an AOC convolution runs through our core too.
* :class:`AOLScaling` -- AOL rescaling (Prach & Lampert, 2022): W diag(d), d_j = (sum_i |W^T W|_ij)^(-1/2),
  which guarantees ||W diag(d)||_2 <= 1. Dense weights use the core's ``aol_rescale`` (short
  side); for a kernel the Gram matrix is that of the convolution operator (a (2k-1)^2 kernel).
"""

from __future__ import annotations

import torch
from orthogonium.model_factory.classparam import ClassParam
from orthogonium.reparametrizers import OrthoParams
from torch import nn

from ..ortho import METHODS, aol_rescale, orthogonalize
from .conv_norm import conv_gram_kernel

# Layers want sigma within 1e-3 of 1 (DESIGN.md): the convergent schedule, not turbo.
DEFAULT_LAYER_METHOD = "convergent"


def check_method(method: str, steps: int | None) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown orthogonalization method {method!r}; expected one of {METHODS}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int or None, got {steps!r}")


class CoreOrthogonalizer(nn.Module):
    """weight = the core's ``orthogonalize`` of the raw (..., m, n) parameter: semi-orthogonal when
    m != n. Also orthogonium's ``orthogonalizer`` slot (called as ``cls(weight_shape=...)``).
    Guarantee: whatever the core returns; ``lipschitz_bound`` measures the result."""

    def __init__(self, weight_shape: tuple[int, ...], method: str = DEFAULT_LAYER_METHOD,
                 steps: int | None = None) -> None:
        super().__init__()
        check_method(method, steps)
        self.weight_shape, self.method, self.steps = tuple(weight_shape), method, steps
        # Converging schedules: differentiate the polar factor they converge to (one eigh of the
        # small side) instead of every step -- the same gradient up to convergence error, cheaper.
        self.backward = "polar" if method in ("convergent", "bjorck") else "iteration"

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return orthogonalize(w, method=self.method, steps=self.steps, backward=self.backward)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w


class NoSpectralNormalization(nn.Module):
    """orthogonium ``spectral_normalizer`` slot: identity. The core's AOL preconditioning already
    scales every matrix to sigma <= 1, so orthogonium's power iteration (and its u, v buffers) is
    not needed."""

    def __init__(self, weight_shape: tuple[int, ...]) -> None:
        super().__init__()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w


def core_ortho_params(method: str = DEFAULT_LAYER_METHOD, steps: int | None = None) -> OrthoParams:
    """orthogonium ``OrthoParams`` that route every orthogonalization through ``lipnet.ortho``."""
    check_method(method, steps)
    return OrthoParams(
        spectral_normalizer=ClassParam(NoSpectralNormalization),
        orthogonalizer=ClassParam(CoreOrthogonalizer, method=method, steps=steps),
    )


def aol_conv_scale(kernel: torch.Tensor, groups: int = 1, eps: float = 1e-12) -> torch.Tensor:
    """AOL input-channel scales d (length ``in``) for a conv kernel: ||conv(K diag(d))|| <= 1 for
    every stride and dilation (dilation spreads the Gram kernel's taps without changing them, so
    the row sums -- and the scales -- do not depend on it; strides only subsample)."""
    cig = kernel.shape[1]
    gram = conv_gram_kernel(kernel, groups).abs()  # (cig, groups*cig, ...)
    row_sums = gram.view(cig, groups, cig, -1).sum(dim=(2, 3))  # (cig, groups): [i, g]
    return (row_sums.transpose(0, 1).reshape(-1) + eps).rsqrt()  # index g*cig + i


class AOLScaling(nn.Module):
    """AOL rescaling of a dense weight (out, in) or a conv kernel (out, in/groups, k1, k2).

    Guarantee (exact arithmetic): spectral norm of the dense map / stride-1 convolution operator
    <= 1 (Prach & Lampert 2022, Thm. 1: diag(d) T^T T diag(d) is dominated by its diagonal sums);
    strides only subsample, so <= 1 as well. ``lipschitz_bound`` re-checks it on the actual weights.
    """

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        if raw.dim() == 2:
            return aol_rescale(raw)  # the core's AOL, on the short side (the smaller Gram matrix)
        d = aol_conv_scale(raw, self.groups)
        co, cig = raw.shape[:2]
        d = d.view(self.groups, 1, cig).expand(self.groups, co // self.groups, cig).reshape(co, cig)
        return raw * d[:, :, None, None]

