"""1-Lipschitz convolutions: orthogonal AOC convolutions (orthogonium's construction, our core inside)
and AOL-rescaled convolutions."""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from orthogonium.layers.conv.AOC import AdaptiveOrthoConv2d, AdaptiveOrthoConvTranspose2d
from orthogonium.reparametrizers import L2Normalize
from torch import nn

from ..validate import nonnegative_int, positive_int
from ._checks import check_input
from ._precision import full_precision
from .conv_norm import check_circular_input
from .parametrizations import DEFAULT_LAYER_METHOD, DEFAULT_PARAMETRIZATION, aol, core_ortho_params, retract_

Padding = Union[str, int]


def _int(name: str, value, allow_pair: bool = True) -> int:
    """Square (int or equal pair) hyper-parameter as an int; orthogonium supports square kernels only."""
    if isinstance(value, (tuple, list)) and allow_pair:
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name} must be square (an int or an equal pair), got {value!r}")
        value = value[0]
    return positive_int(value, name)


def _check_channels(in_channels: int, out_channels: int, groups: int) -> None:
    for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
        positive_int(v, name)
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must be divisible by groups={groups}")


def _out_size(n: int, kernel: int, stride: int, padding: Padding, dilation: int) -> int:
    if padding == "same":
        return n
    p = 0 if padding == "valid" else padding
    return (n + 2 * p - dilation * (kernel - 1) - 1) // stride + 1


def _check_circular(x: torch.Tensor, layer: str, kernel: tuple[int, int], stride: tuple[int, int],
                    padding: Padding | tuple[int, int], dilation: tuple[int, int]) -> None:
    """Shape-only, always on (not behind ``set_input_checks``): the bound depends on it."""
    size = tuple(x.shape[-2:])
    pads = (padding, padding) if isinstance(padding, (str, int)) else padding
    out = tuple(_out_size(size[i], kernel[i], stride[i], pads[i], dilation[i]) for i in range(2))
    check_circular_input(size, out, stride, layer)


class OrthoConv2d(nn.Module):
    """Orthogonal convolution: the AOC construction (Boissin et al., 2025) -- BCOP for stride 1, RKO
    for kernel == stride, BCOP x RKO for native strides; dilation, groups, transposed -- built by
    orthogonium with **every matrix orthogonalization done by** ``lipnet.ortho`` (injected through
    ``OrthoParams``). ``parametrization="retraction"`` (default): the orthogonal factors are the
    parameters, retracted in place after every change, so only the kernel construction is in the
    autograd graph; ``"polar"``: each factor is ``orthogonalize(raw, method, steps)`` on every
    access (see :class:`lipnet.nn.parametrizations.CoreOrthogonalizer`). Under ``torch.autocast``
    the kernel is built in fp32 and the convolution runs in autocast's precision.

    Guarantees: with circular padding, stride 1 and in == out channels the convolution is orthogonal
    (norm-preserving) up to the core's convergence; in every supported configuration it is
    1-Lipschitz up to that convergence, and ``lipschitz_bound`` gives a sound bound of the actual
    kernel. ``padding="same"`` (the default) with a stride s pads ceil((d(k-1) + 1 - s) / 2) on
    each side, so an n-pixel side gives n / s outputs whenever s divides n, as with stride 1's
    n -> n (and ceil(n / 2) for stride 2 with an odd kernel, e.g. kernel 3: padding 1). Limits
    (``ValueError``, at construction): square kernels only; kernel_size >= stride; at stride 1 with
    kernel_size > 1, at least 2 channels per group (one channel per group is orthogonal only as a
    shift); strided depthwise layers (e.g. 1 -> 2 channels per group, kernel 3, stride 2) are built
    where orthogonium's construction exists and refused where it does not; output_padding
    only for transposed convolutions and below the stride or dilation; circular padding needs input
    sizes divisible by the stride (checked at run time) and is not available for transposed
    convolutions.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: Padding = "same",
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str | None = None,
        transposed: bool = False,
        output_padding: int = 0,
        method: str = DEFAULT_LAYER_METHOD,
        steps: int | None = None,
        parametrization: str = DEFAULT_PARAMETRIZATION,
    ) -> None:
        super().__init__()
        name = "OrthoConv2d"
        k, s, d = _int("kernel_size", kernel_size), _int("stride", stride), _int("dilation", dilation)
        _check_channels(in_channels, out_channels, groups)
        if k < s:
            raise ValueError(f"{name}: kernel_size={k} < stride={s}: no orthogonal convolution exists "
                             "(some inputs would never be read); use kernel_size >= stride")
        # As a conv, a transposed layer maps out_channels -> in_channels: check that orientation.
        c_in, c_out = (out_channels, in_channels) if transposed else (in_channels, out_channels)
        if transposed and s > 1 and d % s == 0 and c_in > c_out:  # orthogonium checks the other case
            raise ValueError(f"{name}: dilation={d} is a multiple of stride={s}: the dilated taps of "
                             "neighbouring outputs overlap, so no orthogonal convolution exists")
        inner = max(c_in, c_out // (s * s))  # channels of the BCOP part (stride 1: max(in, out))
        if k > s and s == 1 and inner // groups < 2:
            raise ValueError(f"{name}: a stride-1 convolution with kernel_size > 1 and one channel per group "
                             "is orthogonal only as a pure shift, so no learnable orthogonal kernel exists; use "
                             "at least 2 channels per group or kernel_size=1")
        padding_mode = padding_mode or ("zeros" if transposed else "circular")
        if padding_mode not in ("circular", "zeros"):
            raise ValueError(f"{name}: padding_mode must be 'circular' or 'zeros', got {padding_mode!r}")
        if isinstance(padding, (tuple, list)):
            padding = _int("padding", padding) if padding[0] else 0
        if padding == "same" and s > 1 and not transposed:
            # torch refuses 'same' with strides: pad so that n -> n / s when s divides n
            padding = (d * (k - 1) + 2 - s) // 2
        if not (padding in ("same", "valid") or (isinstance(padding, int) and not isinstance(padding, bool) and padding >= 0)):
            raise ValueError(f"{name}: padding must be 'same', 'valid' or an int >= 0, got {padding!r}")
        nonnegative_int(output_padding, f"{name}: output_padding")
        if output_padding and not transposed:
            raise ValueError(f"{name}: output_padding={output_padding} applies to transposed convolutions only")
        if transposed and output_padding >= max(s, d):
            raise ValueError(f"{name}: output_padding={output_padding} must be smaller than the stride ({s}) or "
                             f"the dilation ({d}), as torch's transposed convolutions require")
        if transposed:
            if padding_mode == "circular":
                raise ValueError(f"{name}: torch's transposed convolutions support zero padding only; "
                                 "use padding_mode='zeros'")
            if padding == "same":
                if (d * (k - 1)) % 2:
                    raise ValueError(f"{name}: padding='same' needs an odd dilated kernel for transposed convs")
                padding = d * (k - 1) // 2
            padding = 0 if padding == "valid" else padding
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.stride, self.padding, self.dilation, self.groups = s, padding, d, groups
        self.padding_mode, self.transposed, self.output_padding = padding_mode, transposed, output_padding
        self.method, self.steps, self.parametrization = method, steps, parametrization
        params = core_ortho_params(method, steps, parametrization)
        try:
            if transposed:
                self.conv = AdaptiveOrthoConvTranspose2d(
                    in_channels, out_channels, k, stride=s, padding=padding, output_padding=output_padding,
                    groups=groups, bias=bias, dilation=d, padding_mode=padding_mode, ortho_params=params)
            else:
                self.conv = AdaptiveOrthoConv2d(
                    in_channels, out_channels, k, stride=s, padding=padding, dilation=d, groups=groups,
                    bias=bias, padding_mode=padding_mode, ortho_params=params)
        except (ValueError, RuntimeError, AssertionError) as err:  # orthogonium's own checks
            raise ValueError(f"{name}({in_channels}, {out_channels}, kernel_size={k}, stride={s}, "
                             f"dilation={d}, groups={groups}): not constructible as an orthogonal "
                             f"convolution: {err}") from err
        if bias:
            nn.init.zeros_(self.conv.bias)
        for m in self.conv.modules():  # orthogonium pins L2Normalize's dtype at construction;
            if isinstance(m, L2Normalize):  # let it follow the weight so .double() works
                m.dtype = None
        retract_(self)  # orthogonium draws some factors Gaussian (RKO): start from orthogonal ones

    @property
    def weight(self) -> torch.Tensor:
        """The constrained kernel in use (``F.conv2d`` / ``F.conv_transpose2d`` layout), built in
        full precision also inside ``torch.autocast``: the bound and the forward pass see one kernel."""
        with full_precision(next(self.conv.parameters()).device.type):
            return self.conv.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, "OrthoConv2d", channels=self.in_channels, ndims=(3, 4))
        if self.padding_mode == "circular":
            k, s, d = self.kernel_size, self.stride, self.dilation
            _check_circular(x, "OrthoConv2d", (k, k), (s, s), self.padding, (d, d))
        weight, conv = self.weight, self.conv
        if not self.transposed:
            return conv._conv_forward(x, weight, conv.bias)
        output_padding = conv._output_padding(x, None, conv.stride, conv.padding, conv.kernel_size, 2, conv.dilation)
        return F.conv_transpose2d(x, weight, conv.bias, conv.stride, conv.padding, output_padding, conv.groups,
                                  conv.dilation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding!r}, dilation={self.dilation}, groups={self.groups}, "
                f"padding_mode={self.padding_mode!r}, transposed={self.transposed}, method={self.method!r}, "
                f"parametrization={self.parametrization!r}")


class AOLConv2d(nn.Conv2d):
    """Convolution with AOL rescaling of its input channels (Prach & Lampert, 2022).

    Guarantee (exact arithmetic): the stride-1 convolution operator has norm <= 1 for any padding
    that is a window of a convolution (zeros, or circular under the checks below); strides only
    subsample. Cheaper than AOC (one Gram kernel, no iterations) but not norm-preserving.
    ``lipschitz_bound`` certifies the actual kernel.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: Padding = "same",
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros") -> None:
        _check_channels(in_channels, out_channels, groups)
        if padding_mode not in ("circular", "zeros"):
            raise ValueError(f"AOLConv2d: padding_mode must be 'circular' or 'zeros', got {padding_mode!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode)
        # Identity-like (dirac) init, as AOL does: the rescaling leaves it at norm 1, whereas a
        # Gaussian kernel comes out strongly contracting (measured ~0.3 per 3x3 layer).
        nn.init.dirac_(self.weight, groups)
        if bias:
            nn.init.zeros_(self.bias)
        aol(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, "AOLConv2d", channels=self.in_channels, ndims=(3, 4))
        if self.padding_mode == "circular":
            _check_circular(x, "AOLConv2d", self.kernel_size, self.stride, self.padding, self.dilation)
        return super().forward(x)
