"""Weight parametrizations (``torch.nn.utils.parametrize`` style): the raw parameter is kept, the
constrained weight is derived on access, ``state_dict`` holds only raw parameters.

* :class:`CoreOrthogonalizer` -- an orthogonal (..., m, n) factor by the core: a stored factor
  retracted after every change (default), or the polar factor of a raw parameter on every access;
  with :func:`core_ortho_params` it fills orthogonium's ``OrthoParams`` slots, so every matrix
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
from torch.nn.utils import parametrize

from ..ortho import POLAR_BACKWARD_METHODS, aol_rescale, orthogonalize, retract, tangent_projection
from ._checks import plain_eager
from lipnet.modes import full_precision
from .conv_norm import conv_gram_kernel

# Layers need every sigma within 1e-3 of 1 (a looser factor shrinks the signal it passes): converging methods only, never the optimizer's bands.
DEFAULT_LAYER_METHOD = "convergent"
LAYER_METHODS = POLAR_BACKWARD_METHODS
PARAMETRIZATIONS = ("retraction", "polar")
DEFAULT_PARAMETRIZATION = "retraction"


def check_method(method: str, steps: int | None, parametrization: str = DEFAULT_PARAMETRIZATION) -> None:
    """ValueError unless (method, steps, parametrization) describe a layer whose weight converges to orthogonal."""
    if method in ("turbo", "ns5"):
        raise ValueError(f"method {method!r} is an optimizer schedule: it leaves singular values in a band "
                         "(turbo: [0.78, 1.22]), not at 1, so a layer built on it is not orthogonal (a convolution "
                         "assembled from such factors can be far from 1-Lipschitz); "
                         f"use one of {LAYER_METHODS}")
    if method not in LAYER_METHODS:
        raise ValueError(f"unknown orthogonalization method {method!r}; expected one of {LAYER_METHODS}")
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int or None, got {steps!r}")
        if parametrization != "polar" or method == "svd":
            raise ValueError("steps applies to parametrization='polar' with an iterative method only "
                             "(a retraction runs until it has converged)")


def _stored_parameter(w: torch.Tensor) -> nn.Parameter | None:
    """The parameter ``w`` is (or a full contiguous view of): the stored factor a retraction may
    overwrite. None under torch.func transforms and torch.compile (there the factor is used as
    given: retract outside, :func:`retract_after_step`) or for any other tensor (e.g.
    functional_call inputs)."""
    if not plain_eager():
        return None
    if isinstance(w, nn.Parameter):
        return w
    base = w._base
    if (isinstance(base, nn.Parameter) and w.is_contiguous() and base.is_contiguous()
            and w.numel() == base.numel() and w.storage_offset() == base.storage_offset()):
        return base
    return None


class _TangentGradient(torch.autograd.Function):
    """Identity forward; backward: the gradient projected onto the tangent space at the factor (the
    plain eager path; :func:`_tangent_gradient` is the same map as composite ops)."""

    @staticmethod
    def forward(w):
        return w.view_as(w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return tangent_projection(w.detach(), grad.to(torch.promote_types(grad.dtype, torch.float32))).to(grad.dtype)


def _tangent_gradient(w: torch.Tensor) -> torch.Tensor:
    """w, with the derivative of the tangent projection P_w: the value w + P_w(w - w) = w, the
    derivative P_w, which is self-adjoint, so reverse mode gives P_w(grad) as the Function does and
    forward mode P_w(tangent) -- the same linear map both ways. For torch.func transforms and
    torch.compile (traced as ordinary ops; costs the projection's two matmuls in the forward pass)."""
    fixed = w.detach()
    return fixed + tangent_projection(fixed, w - fixed)


class CoreOrthogonalizer(nn.Module):
    """The orthogonal (semi-orthogonal when m != n) weight of a raw (..., m, n) parameter, by the
    core. Also orthogonium's ``orthogonalizer`` slot (called as ``cls(weight_shape=...)``).

    ``parametrization="retraction"`` (default): the parameter *is* the orthogonal factor and the
    weight is that tensor itself, so no orthogonalization sits in the autograd graph; its gradient
    is projected onto the tangent space at the factor (``lipnet.ortho.tangent_projection``: what the
    polar parametrization's gradient is at an orthogonal raw matrix, two matmuls). Whenever the
    stored factor has changed since it was last retracted (an optimizer step, ``load_state_dict``,
    ``.double()``: any in-place write or new storage), the next access retracts it in place
    (``lipnet.ortho.retract``: a few Newton-Schulz steps after an optimizer step, converging
    fallbacks far from orthogonal), in train and eval mode alike, so the bound, the forward pass
    and ``export`` all read the same retracted tensor. A write that bypasses the version counter
    (``p.data.add_``) is not seen: the weight in use is then the drifted factor, and
    ``lipschitz_bound`` reports its actual norm; :func:`lipnet.nn.retract_` retracts explicitly.
    Under torch.func transforms the given tensor is used as it is.

    ``parametrization="polar"``: weight = ``orthogonalize(raw, method, steps)`` on every access,
    differentiated as the exact polar factor (``backward="polar"``): any raw tensor is valid.

    Guarantee: whatever the core returns; ``lipschitz_bound`` measures the result.
    """

    def __init__(self, weight_shape: tuple[int, ...], method: str = DEFAULT_LAYER_METHOD,
                 steps: int | None = None, parametrization: str = DEFAULT_PARAMETRIZATION) -> None:
        super().__init__()
        check_method(method, steps, parametrization)
        self.weight_shape, self.method, self.steps = tuple(weight_shape), method, steps
        self.parametrization = parametrization
        # polar: differentiate the polar factor the schedule converges to (one eigh of the small
        # side) instead of every step -- the same gradient up to convergence error, cheaper
        self.backward = "polar"
        self._retracted_state: tuple | None = None  # (data_ptr, version) of the factor when last retracted
        self._force_retraction = False  # set by lipnet.nn.retract_ for one access

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if w.numel() == 0:  # no singular values: trivially orthogonal (AOC's rank-0 projectors, one channel per group)
            return w
        stored = _stored_parameter(w)
        if stored is not None and (self._force_retraction or (
                self.parametrization == "retraction" and (stored.data_ptr(), stored._version) != self._retracted_state)):
            self._retract(w, stored)
        if self.parametrization == "polar":
            return orthogonalize(w, method=self.method, steps=self.steps, backward=self.backward)
        if not (torch.is_grad_enabled() and w.requires_grad):
            return w
        return _TangentGradient.apply(w) if plain_eager() else _tangent_gradient(w)

    def _retract(self, w: torch.Tensor, stored: nn.Parameter) -> None:
        """Retract ``w`` (``stored``, or its full view) in place and record the state retracted."""
        retracted = retract(w.detach(), self.method)
        if retracted.data_ptr() != stored.data_ptr():  # else: already orthogonal, returned as it is
            with torch.no_grad():
                stored.copy_(retracted.reshape(stored.shape))
        self._retracted_state = (stored.data_ptr(), stored._version)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def extra_repr(self) -> str:
        return f"method={self.method!r}, parametrization={self.parametrization!r}"


def retract_(module: nn.Module) -> nn.Module:
    """Retract every stored factor of ``module``'s orthogonal layers onto the orthogonal matrices now,
    whatever it has been through (also writes that bypassed the version counter). The raw
    parameters of ``parametrization="polar"`` layers are retracted too: their weight becomes the
    polar factor of the raw matrix (close to what ``orthogonalize`` made of it, not equal) and stays
    so, now from a perfectly conditioned raw matrix. Returns ``module``. The layers call it on themselves at construction,
    so a new layer's factors are orthogonal (orthogonium initializes some of them Gaussian)."""
    orthogonalizers = [m for m in module.modules() if isinstance(m, CoreOrthogonalizer)]
    for m in orthogonalizers:
        m._force_retraction = True
    try:
        with torch.no_grad():
            for m in module.modules():
                if parametrize.is_parametrized(m):
                    for name in m.parametrizations:
                        getattr(m, name)  # runs the chain: each CoreOrthogonalizer retracts its input
    finally:
        for m in orthogonalizers:
            m._force_retraction = False
    return module


def retract_after_step(optimizer: torch.optim.Optimizer, module: nn.Module):
    """Retract ``module``'s stored factors after every ``optimizer.step()`` (a step post-hook);
    returns the hook's handle (``.remove()`` ends it).

    What the layers do on their own in eager mode (the first access after a step retracts the
    changed factor), for a ``torch.compile``-d module, whose compiled forward uses the factors as
    they are: with this hook the compiled training steps see the same retracted factors as eager
    ones. Without it the factors drift from orthogonal under compiled training; ``lipschitz_bound``
    (eager) still retracts before it measures, so no bound is ever wrong, but the trained function
    is not the eager one."""
    return optimizer.register_step_post_hook(lambda opt, args, kwargs: retract_(module))


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


def core_ortho_params(method: str = DEFAULT_LAYER_METHOD, steps: int | None = None,
                      parametrization: str = DEFAULT_PARAMETRIZATION) -> OrthoParams:
    """orthogonium ``OrthoParams`` that route every orthogonalization through ``lipnet.ortho``."""
    check_method(method, steps, parametrization)
    return OrthoParams(
        spectral_normalizer=ClassParam(NoSpectralNormalization),
        orthogonalizer=ClassParam(CoreOrthogonalizer, method=method, steps=steps, parametrization=parametrization),
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
        with full_precision(raw.device.type):  # the bound and the forward pass must see one weight
            if raw.dim() == 2:
                return aol_rescale(raw)  # the core's AOL, on the short side (the smaller Gram matrix)
            d = aol_conv_scale(raw, self.groups)
            co, cig = raw.shape[:2]
            d = d.view(self.groups, 1, cig).expand(self.groups, co // self.groups, cig).reshape(co, cig)
            return raw * d[:, :, None, None]



def orthogonal(module: nn.Linear, name: str = "weight", *, method: str = DEFAULT_LAYER_METHOD,
               steps: int | None = None, parametrization: str = DEFAULT_PARAMETRIZATION) -> nn.Linear:
    """Constrain ``module.<name>`` (an ``nn.Linear``'s (out, in) weight) to a (semi-)orthogonal matrix
    kept by the core, as ``torch.nn.utils.parametrizations.orthogonal`` does; returns ``module``.

    The current weight becomes the starting point (its polar factor); afterwards ||W||_2 = 1 up to
    the core's convergence (see :class:`CoreOrthogonalizer` for the two parametrizations), and
    ``lipschitz_bound(module)`` certifies the weight in use. Convolutions are refused: an orthogonal
    reshaped kernel is not an orthogonal convolution (use :class:`lipnet.nn.OrthoConv2d`).
    """
    if isinstance(module, nn.modules.conv._ConvNd):
        raise ValueError(f"orthogonal: {type(module).__name__} refused -- an orthogonal reshaped kernel is not an "
                         "orthogonal convolution (overlapping windows reuse it); use lipnet.nn.OrthoConv2d")
    if not isinstance(module, nn.Linear):
        raise ValueError(f"orthogonal: expected an nn.Linear, got {type(module).__name__}")
    check_method(method, steps, parametrization)
    weight = getattr(module, name)
    if weight.dim() != 2:
        raise ValueError(f"orthogonal: {name} must be a matrix, got shape {tuple(weight.shape)}")
    parametrize.register_parametrization(module, name, CoreOrthogonalizer(weight.shape, method, steps, parametrization))
    return retract_(module)


def aol(module: nn.Linear | nn.Conv2d, name: str = "weight") -> nn.Linear | nn.Conv2d:
    """Constrain ``module.<name>`` by AOL rescaling (:class:`AOLScaling`): ||W||_2 <= 1 for an
    ``nn.Linear``, and the convolution operator's norm <= 1 for an ``nn.Conv2d`` with zero or
    circular padding (any stride, dilation, groups); returns ``module``. ``lipschitz_bound``
    re-checks the weight in use."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode not in ("circular", "zeros"):
            raise ValueError(f"aol: padding_mode must be 'circular' or 'zeros' (other modes repeat pixels), got "
                             f"{module.padding_mode!r}")
        scaling = AOLScaling(module.groups)
    elif isinstance(module, nn.Linear):
        scaling = AOLScaling()
    else:
        raise ValueError(f"aol: expected an nn.Linear or nn.Conv2d, got {type(module).__name__}")
    parametrize.register_parametrization(module, name, scaling)
    return module
