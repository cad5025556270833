"""1-Lipschitz convolutions: orthogonal AOC convolutions and transposed convolutions (orthogonium's
construction, our core inside) and AOL-rescaled convolutions."""

from __future__ import annotations

import inspect
from typing import Union

import torch
import torch.nn.functional as F
from orthogonium.layers.conv.AOC import AdaptiveOrthoConv2d, AdaptiveOrthoConvTranspose2d
from orthogonium.reparametrizers import L2Normalize
from torch import nn

from ..validate import nonnegative_int, positive_int
from ._checks import check_channels, check_input
from lipnet.modes import full_precision
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


def _geometry(name: str, in_channels: int, out_channels: int, kernel_size, stride, dilation, groups: int,
              transposed: bool) -> tuple[int, int, int]:
    """(kernel_size, stride, dilation) as ints, after refusing the geometries without an orthogonal
    kernel; a transposed layer is checked as the convolution from out_channels to in_channels."""
    k, s, d = _int("kernel_size", kernel_size), _int("stride", stride), _int("dilation", dilation)
    check_channels(in_channels, out_channels, groups)
    if k < s:
        raise ValueError(f"{name}: kernel_size={k} < stride={s}: no orthogonal convolution exists "
                         "(some inputs would never be read); use kernel_size >= stride")
    c_in, c_out = (out_channels, in_channels) if transposed else (in_channels, out_channels)
    if transposed and s > 1 and d % s == 0 and c_in > c_out:  # orthogonium checks the other case
        raise ValueError(f"{name}: dilation={d} is a multiple of stride={s}: the dilated taps of "
                         "neighbouring outputs overlap, so no orthogonal convolution exists")
    inner = max(c_in, c_out // (s * s))  # channels of the BCOP part (stride 1: max(in, out))
    if k > s and s == 1 and inner // groups < 2:
        raise ValueError(f"{name}: a stride-1 convolution with kernel_size > 1 and one channel per group "
                         "is orthogonal only as a pure shift, so no learnable orthogonal kernel exists; use "
                         "at least 2 channels per group or kernel_size=1")
    return k, s, d


def _padding(name: str, padding, kernel: int, stride: int, dilation: int, transposed: bool) -> Padding:
    """``padding`` (an int, an equal pair, ``"same"`` or ``"valid"``) as the orthogonium layer takes it.
    A convolution keeps ``"same"`` at stride 1 and ``"valid"``; ``"same"`` at a stride s > 1 (which
    torch refuses) pads (d(k - 1) + 2 - s) // 2, so that n -> n / s when s divides n. A transposed
    convolution takes an int: ``"same"`` pads d(k - 1) / 2 (an odd dilated kernel only), ``"valid"`` 0."""
    if isinstance(padding, (tuple, list)):
        if len(padding) != 2 or padding[0] != padding[1]:
            raise ValueError(f"padding must be square (an int or an equal pair), got {padding!r}")
        padding = padding[0]
    if not (padding in ("same", "valid") or (isinstance(padding, int) and not isinstance(padding, bool) and padding >= 0)):
        raise ValueError(f"{name}: padding must be 'same', 'valid' or an int >= 0, got {padding!r}")
    total = dilation * (kernel - 1)
    if not transposed:
        return (total + 2 - stride) // 2 if padding == "same" and stride > 1 else padding
    if padding == "same":
        if total % 2:
            raise ValueError(f"{name}: padding='same' needs an odd dilated kernel for transposed convs")
        return total // 2
    return 0 if padding == "valid" else padding


class _AdaptiveOrthoConv(nn.Module):
    """What :class:`OrthoConv2d` and :class:`OrthoConvTranspose2d` share: the orthogonium layer in
    ``self.conv`` with the core injected, its kernel in full precision, its configuration."""

    transposed = False  # as torch's conv modules: True for the transposed layer (lipnet.nn.export reads it)

    def _build(self, name: str, factory, in_channels: int, out_channels: int, kernel_size: int, stride: int,
               padding: Padding, dilation: int, groups: int, bias: bool, padding_mode: str, method: str,
               steps: int | None, parametrization: str, **factory_kwargs) -> None:
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.padding_mode, self.method, self.steps, self.parametrization = padding_mode, method, steps, parametrization
        params = core_ortho_params(method, steps, parametrization)
        try:
            self.conv = factory(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                                ortho_params=params, **factory_kwargs)
        except (ValueError, RuntimeError, AssertionError) as err:  # orthogonium's own checks
            raise ValueError(f"{name}({in_channels}, {out_channels}, kernel_size={kernel_size}, stride={stride}, "
                             f"dilation={dilation}, groups={groups}): not constructible as an orthogonal "
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

    def extra_repr(self) -> str:
        output_padding = f", output_padding={self.output_padding}" if self.transposed else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding!r}{output_padding}, dilation={self.dilation}, groups={self.groups}, "
                f"padding_mode={self.padding_mode!r}, method={self.method!r}, "
                f"parametrization={self.parametrization!r}")


class OrthoConv2d(_AdaptiveOrthoConv):
    """Orthogonal convolution: the AOC construction (Boissin et al., 2025) -- BCOP for stride 1, RKO
    for kernel == stride, BCOP x RKO for native strides; dilation, groups -- built by orthogonium
    with **every matrix orthogonalization done by** ``lipnet.ortho`` (injected through
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
    where orthogonium's construction exists and refused where it does not; circular padding needs
    input sizes divisible by the stride (checked at run time).

    ``OrthoConv2d(..., transposed=True)`` returns the :class:`OrthoConvTranspose2d` of the other
    arguments (``padding_mode=None``: its zero padding); ``output_padding`` belongs to it.
    """

    def __new__(cls, *args, **kwargs):
        if cls is OrthoConv2d:
            arguments = _INIT_SIGNATURE.bind_partial(None, *args, **kwargs).arguments
            del arguments["self"]
            if arguments.pop("transposed", False):
                if arguments.get("padding_mode") is None:
                    arguments.pop("padding_mode", None)
                return OrthoConvTranspose2d(**arguments)
        return super().__new__(cls)

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
        if transposed:  # a subclass's call: OrthoConv2d(..., transposed=True) itself is built in __new__
            raise ValueError(f"{type(self).__name__}: transposed=True: build a lipnet.nn.OrthoConvTranspose2d")
        k, s, d = _geometry(name, in_channels, out_channels, kernel_size, stride, dilation, groups, transposed=False)
        padding_mode = padding_mode or "circular"
        if padding_mode not in ("circular", "zeros"):
            raise ValueError(f"{name}: padding_mode must be 'circular' or 'zeros', got {padding_mode!r}")
        padding = _padding(name, padding, k, s, d, transposed=False)
        nonnegative_int(output_padding, f"{name}: output_padding")
        if output_padding:
            raise ValueError(f"{name}: output_padding={output_padding} applies to transposed convolutions only "
                             "(OrthoConvTranspose2d)")
        self.output_padding = 0
        self._build(name, AdaptiveOrthoConv2d, in_channels, out_channels, k, s, padding, d, groups, bias,
                    padding_mode, method, steps, parametrization)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, "OrthoConv2d", channels=self.in_channels, ndims=(3, 4))
        if self.padding_mode == "circular":
            k, s, d = self.kernel_size, self.stride, self.dilation
            _check_circular(x, "OrthoConv2d", (k, k), (s, s), self.padding, (d, d))
        return self.conv._conv_forward(x, self.weight, self.conv.bias)


_INIT_SIGNATURE = inspect.signature(OrthoConv2d.__init__)


class OrthoConvTranspose2d(_AdaptiveOrthoConv):
    """Orthogonal transposed convolution: the adjoint of an AOC convolution from ``out_channels`` to
    ``in_channels`` (orthogonium's ``AdaptiveOrthoConvTranspose2d``), run by ``F.conv_transpose2d``.
    Arguments in ``nn.ConvTranspose2d``'s order; ``method``, ``steps``, ``parametrization``, the
    construction and the precision policy are :class:`OrthoConv2d`'s: every matrix orthogonalization
    is done by ``lipnet.ortho``.

    Guarantees: 1-Lipschitz up to the core's convergence (the adjoint has the convolution's norm),
    and ``lipschitz_bound`` gives a sound bound of the actual kernel. ``padding="same"`` (the
    default) pads d(k-1) / 2 on each side, so a stride s maps n pixels to s (n - 1) + 1 +
    output_padding (s n with ``output_padding=s - 1``). Limits (``ValueError``, at construction):
    zero padding only (``padding_mode="zeros"``, torch's transposed convolutions); square kernels;
    kernel_size >= stride; at stride 1 with kernel_size > 1, at least 2 channels per group;
    ``padding="same"`` needs an odd dilated kernel; output_padding below the stride or the
    dilation; a dilation that is a multiple of the stride (> 1) when out_channels > in_channels.
    """

    transposed = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: Padding = "same",
        output_padding: int = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: int | tuple[int, int] = 1,
        padding_mode: str = "zeros",
        method: str = DEFAULT_LAYER_METHOD,
        steps: int | None = None,
        parametrization: str = DEFAULT_PARAMETRIZATION,
    ) -> None:
        super().__init__()
        name = "OrthoConvTranspose2d"
        k, s, d = _geometry(name, in_channels, out_channels, kernel_size, stride, dilation, groups, transposed=True)
        if padding_mode != "zeros":
            raise ValueError(f"{name}: torch's transposed convolutions support zero padding only; "
                             f"use padding_mode='zeros', got {padding_mode!r}")
        padding = _padding(name, padding, k, s, d, transposed=True)
        nonnegative_int(output_padding, f"{name}: output_padding")
        if output_padding >= max(s, d):
            raise ValueError(f"{name}: output_padding={output_padding} must be smaller than the stride ({s}) or "
                             f"the dilation ({d}), as torch's transposed convolutions require")
        self.output_padding = output_padding
        self._build(name, AdaptiveOrthoConvTranspose2d, in_channels, out_channels, k, s, padding, d, groups, bias,
                    padding_mode, method, steps, parametrization, output_padding=output_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, "OrthoConvTranspose2d", channels=self.in_channels, ndims=(3, 4))
        conv = self.conv
        output_padding = conv._output_padding(x, None, conv.stride, conv.padding, conv.kernel_size, 2, conv.dilation)
        return F.conv_transpose2d(x, self.weight, conv.bias, conv.stride, conv.padding, output_padding, conv.groups,
                                  conv.dilation)


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
        check_channels(in_channels, out_channels, groups)
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

