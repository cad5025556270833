"""1-D orthogonal convolution: BCOP (Li et al., 2019) in one dimension, every factor kept by the core.

A kernel of size k is the product of a c x c orthogonal matrix H and k - 1 two-tap blocks
(P_i, I - P_i), P_i = Q_i Q_i^T a rank-c/2 orthogonal projector:

    K(z) = H (P_1 + (I - P_1) z) ... (P_{k-1} + (I - P_{k-1}) z).

Each block is paraunitary ((P + (I - P) z)(P + (I - P) z^-1) = P + (I - P) = I), so K(z) is, and
the convolution with K is orthogonal on signals over Z (and on circular signals). Keeping the first
``out`` rows / ``in`` columns of the c = max(in, out) channel kernel gives a row- / column-orthogonal
convolution: 1-Lipschitz, norm-preserving when out >= in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..validate import positive_int
from ._checks import check_channels, check_input
from .parametrizations import DEFAULT_LAYER_METHOD, DEFAULT_PARAMETRIZATION, CoreOrthogonalizer, retract_
from lipnet.modes import full_precision

PADDING_MODES = ("circular", "zeros")


class _BCOPFactors(nn.Module):
    """The orthogonal factors of one 1-D BCOP kernel per group: ``head`` (groups, c, c) and
    ``projectors`` (groups, k - 1, c, c // 2), each a parametrized tensor kept by the core."""

    def __init__(self, groups: int, channels: int, kernel_size: int, method: str, steps: int | None,
                 parametrization: str) -> None:
        super().__init__()
        rank = channels // 2
        shapes = {"head": (groups, channels, channels), "projectors": (groups, kernel_size - 1, channels, rank)}
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.randn(shape)))
            parametrize.register_parametrization(self, name, CoreOrthogonalizer(shape, method, steps, parametrization))

    def kernel(self) -> torch.Tensor:
        """(groups, c, c, k): the taps of K(z), tap j the coefficient of z^j."""
        taps = self.head[:, None]  # (g, 1, c, c)
        eye = torch.eye(taps.shape[-1], dtype=taps.dtype, device=taps.device)
        q = self.projectors
        projectors = q @ q.transpose(-1, -2)  # (g, k - 1, c, c)
        for i in range(projectors.shape[1]):  # k - 1 polynomial products; each is one batched matmul pair
            p = projectors[:, i, None]
            zero = torch.zeros_like(taps[:, :1])
            taps = torch.cat([taps @ p, zero], 1) + torch.cat([zero, taps @ (eye - p)], 1)
        return taps.permute(0, 2, 3, 1)


class OrthoConv1d(nn.Module):
    """Orthogonal 1-D convolution (``F.conv1d`` semantics, inputs (batch, in, length) or (in, length)).

    The kernel is the 1-D BCOP product of the module docstring, per group, cut to ``out`` x ``in``
    channels; its orthogonal factors are kept by ``lipnet.ortho`` (``parametrization`` as for
    :class:`lipnet.nn.OrthoConv2d`). Guarantees, up to the core's convergence: at stride 1 with
    circular padding and out >= in, the layer preserves norms; in every configuration it is
    1-Lipschitz (a stride subsamples the stride-1 output, a coordinate projection; zero padding
    restricts the convolution over Z), and ``lipschitz_bound`` gives a sound bound of the kernel in
    use. ``padding="same"`` (default) pads d(k - 1) in all (the extra pixel on the right for an even
    kernel at stride 1, as torch), so a stride s gives ceil(n / s) outputs. Limits (``ValueError`` at
    construction): kernel_size > 1 needs at least 2 channels per group (one channel is orthogonal
    only as a shift); circular padding at most "same" (more would read wrapped samples twice);
    "same" with an even dilated kernel only at stride 1 (uneven padding). ``lipnet.nn.export`` gives
    the ``nn.Conv1d`` computing the same function.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: str | int = "same", dilation: int = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "circular", method: str = DEFAULT_LAYER_METHOD, steps: int | None = None,
                 parametrization: str = DEFAULT_PARAMETRIZATION) -> None:
        super().__init__()
        name = "OrthoConv1d"
        check_channels(in_channels, out_channels, groups)
        for label, v in (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)):
            positive_int(v, f"{name}: {label}")
        channels = max(in_channels, out_channels) // groups
        if kernel_size > 1 and channels < 2:
            raise ValueError(f"{name}: kernel_size={kernel_size} with one channel per group is orthogonal only as a "
                             "shift; use at least 2 channels per group or kernel_size=1")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"{name}: padding_mode must be one of {PADDING_MODES} (others repeat samples), "
                             f"got {padding_mode!r}")
        total = dilation * (kernel_size - 1)
        if padding == "same":
            # torch's 'same' is stride-1 only; the (left, right) split is torch's for every stride
            pads = (total // 2, total - total // 2)
        elif padding == "valid":
            pads = (0, 0)
        elif isinstance(padding, int) and not isinstance(padding, bool) and padding >= 0:
            pads = (padding, padding)
        else:
            raise ValueError(f"{name}: padding must be 'same', 'valid' or an int >= 0, got {padding!r}")
        if padding == "same" and total % 2 and stride > 1:
            raise ValueError(f"{name}: padding='same' with an even dilated kernel (d(k-1) = {total}) and stride "
                             f"{stride} pads unevenly, which no torch convolution exports; give an int padding")
        if padding_mode == "circular" and sum(pads) > total:
            raise ValueError(f"{name}: circular padding {padding!r} exceeds 'same' (d(k-1) = {total} in all): "
                             "wrapped samples would be read twice and the layer would not be 1-Lipschitz")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.padding_mode, self.pads = padding_mode, pads
        self.method, self.steps, self.parametrization = method, steps, parametrization
        self.factors = _BCOPFactors(groups, channels, kernel_size, method, steps, parametrization)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        retract_(self)

    @property
    def weight(self) -> torch.Tensor:
        """The kernel in use, (out, in / groups, k) as ``F.conv1d`` takes it, built in full precision."""
        with full_precision(self.factors.head.device.type):
            k = self.factors.kernel()  # (g, c, c, k)
            g = self.groups
            return k[:, : self.out_channels // g, : self.in_channels // g].reshape(
                self.out_channels, self.in_channels // g, self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, "OrthoConv1d", channels=self.in_channels, ndims=(2, 3))
        if self.padding_mode == "circular":
            if max(self.pads) > x.shape[-1]:
                raise ValueError(f"OrthoConv1d: circular padding {self.pads} needs inputs of length >= "
                                 f"{max(self.pads)}, got {x.shape[-1]}")
            x = F.pad(x, self.pads, mode="circular")
        else:
            x = F.pad(x, self.pads)
        return F.conv1d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding!r}, dilation={self.dilation}, groups={self.groups}, "
                f"padding_mode={self.padding_mode!r}, method={self.method!r}, "
                f"parametrization={self.parametrization!r}")


__all__ = ["OrthoConv1d"]
