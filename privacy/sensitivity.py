"""Analytic per-sample gradient-norm bounds of a Lipschitz network (Bethune et al., 2023, "DP-SGD
without clipping: the Lipschitz neural network way"), the sensitivity of clipping-free DP-SGD.

For one sample (x, y) with ||x|| <= X and a loss that is L_loss-Lipschitz in the logits, a layer k
with input u_k and output v_k = f_k(u_k; theta_k) has

    ||d loss / d theta_k||  <=  ||d v_k / d theta_k||_op  *  ||d loss / d v_k||
                            <=  S_k(||u_k||)             *  L_loss * prod_{j > k} Lip(f_j)

The three factors, each computed from the weights in use (never assumed):

* forward: ||u_{k+1}|| <= Lip(f_k) ||u_k|| + ||f_k(0)||  (triangle inequality; f_k(0) is evaluated,
  so biases and input normalization enter exactly); ``L2BallProjection`` resets it to its radius;
* backward: a gradient is bounded by the Lipschitz constant of the map it differentiates
  (``lipschitz_bound`` of every downstream layer, and the loss');
* parameter sensitivity S_k (derived here, for the *effective* tensors the layer computes with):
  - dense ``W x + b``: dv/dW [D] = D x, so S_W = ||x||; S_b = 1.
  - convolution with kernel K: dv/dK [D] = conv(x, D). Output position p reads the patch P_p(x),
    so ||conv(x, D)||^2 = sum_p ||D P_p(x)||^2 <= ||D||_F^2 sum_p ||P_p(x)||^2 <= ||D||_F^2 R ||x||^2
    with R = the largest number of (position, tap) pairs that read one input pixel (groups only
    shrink the patches). R is *counted* for the layer's stride, dilation, padding mode and input
    size (one probe convolution with a ones kernel), not taken from a formula: S_K = sqrt(R) ||x||.
    Transposed: output pixel q sums at most R' terms D_j^T x_p, and ||sum of R' terms||^2 <=
    R' * sum of squares, so S_K = sqrt(R') ||x|| with R' the largest number of (position, tap)
    pairs writing one output pixel. A bias broadcast over P output positions: S_b = sqrt(P).
  - ``LayerCentering`` bias (broadcast over P positions): sqrt(P).
  - ``ConvexResidual`` alpha = sigmoid(a): dl/da = alpha (1 - alpha) <dl/dy, f(x) - x>, bounded by
    alpha (1 - alpha) g (||f(x)|| + ||x||); the residual branch's gradient is scaled by alpha.

Which gradient is privatized. For a constrained weight W = P(theta) (orthogonalization, AOL, BCOP)
the bound is on the gradient w.r.t. W, the tensor the layer computes with, *not* on the gradient
w.r.t. the raw theta: dl/dtheta = J_P^T dl/dW, and ||J_P|| is unbounded in general (the polar
factor's derivative scales like 1 / sigma_min(theta)). DP-SGD releases G = sum_i dl_i/dW + N, and
the raw parameters are updated with J_P^T G: a function of the release and of the current (already
public) theta, i.e. post-processing, free under differential privacy. This is lip-dp's "gradient of
the effective weight, then re-project" argument, without the projection step: the parametrization
itself maps the update back onto the constraint set at the next forward pass.

Layers without a proven rule raise before anything is trained: ``SLLBlock`` (its parameters enter
through T^-1, no bound derived here), ``BatchCentering`` (the batch mean couples the samples, so
one sample's gradient is not separable, and its running mean is computed from private data),
and any module with trainable parameters we do not know.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache, singledispatch

import torch
from torch import nn

from lipnet.nn import (BatchCentering, ConvexResidual, GroupNormalization, L2BallProjection, LayerCentering, OrthoConv2d,
                       OrthoConvTranspose2d, SLLBlock, lipschitz_bound)
from lipnet.validate import finite_positive

# Relative slack on every bound: the bounds are computed in float64 from the weights, the per-sample
# gradients they cover are float32 sums (relative rounding ~1e-6); 1e-4 covers it with room.
BOUND_MARGIN = 1e-4


@dataclass(frozen=True)
class TensorBound:
    """A sound bound on the L2 (Frobenius) norm of one sample's gradient w.r.t. ``module.<attr>``.

    ``effective=True``: the tensor is what the layer computes with (``module.weight`` of a constrained
    layer, a function of its raw parameters); its gradient is the privatized quantity and the raw
    parameters receive J^T of it (post-processing). ``effective=False``: a plain parameter."""

    name: str
    module: nn.Module
    attr: str
    effective: bool
    bound: float

    def tensor(self) -> torch.Tensor:
        """The tensor the bound is about, as the layer computes it now (with autograd history)."""
        return getattr(self.module, self.attr)


@dataclass
class SensitivityReport:
    """Per-tensor bounds of one sample's gradient; ``total`` bounds the whole gradient's L2 norm."""

    bounds: list[TensorBound]
    input_bound: float
    loss_lipschitz: float
    output_bound: float

    @property
    def total(self) -> float:
        return math.sqrt(sum(b.bound ** 2 for b in self.bounds))

    def as_dict(self) -> dict[str, float]:
        return {b.name: b.bound for b in self.bounds}


def loss_lipschitz(loss: nn.Module) -> float:
    """L2 Lipschitz constant of one sample's loss w.r.t. its logits (for any label).

    lipnet losses state it (``.lipschitz``); ``nn.CrossEntropyLoss`` without class weights has
    gradient p - q with p, q in the simplex, norm <= sqrt(2). Anything else raises: an unbounded or
    unknown loss would give an unbounded gradient."""
    if isinstance(loss, nn.CrossEntropyLoss):
        if loss.weight is not None:
            raise TypeError("nn.CrossEntropyLoss with class weights: per-sample gradient bound not derived here")
        return math.sqrt(2.0)
    value = getattr(loss, "lipschitz", None)
    if value is None:
        raise TypeError(f"loss {type(loss).__name__} states no Lipschitz constant w.r.t. the logits; use "
                        "lipnet.nn.LipschitzCrossEntropy, MultiMarginHinge or nn.CrossEntropyLoss, or give the "
                        "loss a `lipschitz` attribute (a proven bound)")
    return finite_positive(value, "loss Lipschitz constant")


def _trainable(m: nn.Module) -> list[nn.Parameter]:
    return [p for p in m.parameters() if p.requires_grad]


def _bias(m: nn.Module) -> nn.Parameter | None:
    b = getattr(m, "bias", None)
    return b if isinstance(b, nn.Parameter) and b.requires_grad else None


@torch.no_grad()
def _zero_response(m: nn.Module, shape: tuple[int, ...]) -> tuple[float, tuple[int, ...]]:
    """||m(0)|| for one sample of ``shape`` (float64 sum), and the output shape."""
    p = next(m.parameters(), None)
    b = next(m.buffers(), None)
    ref = p if p is not None else b
    x = torch.zeros((1, *shape), dtype=ref.dtype if ref is not None and ref.is_floating_point() else torch.float32,
                    device=ref.device if ref is not None else "cpu")
    y = m(x)
    return float(y.double().norm()), tuple(y.shape[1:])


def conv_reuse(conv: nn.Module, shape: Sequence[int]) -> tuple[int, int]:
    """(R, P) for a ``nn.Conv2d`` / ``nn.ConvTranspose2d`` on inputs of spatial size ``shape[-2:]``:
    R = the largest number of (output position, tap) pairs that read one input pixel (conv) or write
    one output pixel (transposed); P = number of output positions. Counted with a ones kernel
    through the layer's own stride, dilation, padding and padding mode (cached per configuration:
    it depends on nothing else)."""
    transposed = isinstance(conv, nn.ConvTranspose2d)
    return _count_reuse(transposed, tuple(conv.kernel_size), tuple(conv.stride), conv.padding, tuple(conv.dilation),
                        tuple(conv.output_padding) if transposed else (0, 0), conv.padding_mode,
                        int(shape[-2]), int(shape[-1]))


@lru_cache(maxsize=1024)
@torch.no_grad()
def _count_reuse(transposed: bool, kernel_size, stride, padding, dilation, output_padding, padding_mode: str,
                 h: int, w: int) -> tuple[int, int]:
    padding = tuple(padding) if isinstance(padding, list) else padding
    if transposed:
        probe = nn.ConvTranspose2d(1, 1, kernel_size, stride, padding, output_padding,
                                   bias=False, dilation=dilation, dtype=torch.float64)
        probe.weight.fill_(1.0)
        y = probe(torch.ones(1, 1, h, w, dtype=torch.float64))
        return int(round(float(y.max()))), y.shape[-2] * y.shape[-1]
    probe = nn.Conv2d(1, 1, kernel_size, stride, padding, dilation, bias=False, padding_mode=padding_mode,
                      dtype=torch.float64)
    probe.weight.fill_(1.0)
    with torch.enable_grad():
        x = torch.ones(1, 1, h, w, dtype=torch.float64, requires_grad=True)
        y = probe(x)
        (grad,) = torch.autograd.grad(y.sum(), x)
    return int(round(float(grad.max()))), y.shape[-2] * y.shape[-1]


class _Analysis:
    """Forward norm bounds and backward gradient bounds through a module tree."""

    def __init__(self) -> None:
        self.bounds: list[TensorBound] = []
        self.covered: set[int] = set()
        self._lipschitz: dict[int, float] = {}

    def lipschitz(self, m: nn.Module) -> float:
        """``lipschitz_bound(m)``, computed once per module per analysis (the weights do not change
        during one)."""
        if id(m) not in self._lipschitz:
            self._lipschitz[id(m)] = lipschitz_bound(m)
        return self._lipschitz[id(m)]

    def forward_bound(self, m: nn.Module, b: float, shape: tuple[int, ...]) -> tuple[float, tuple[int, ...]]:
        """Lip(m) b + ||m(0)||: the triangle inequality around m(0), evaluated exactly."""
        f0, out_shape = _zero_response(m, shape)
        return self.lipschitz(m) * b + f0, out_shape

    def add(self, name: str, module: nn.Module, attr: str, effective: bool, bound: float,
            params: Sequence[nn.Parameter]) -> None:
        if not params:
            return
        self.bounds.append(TensorBound(name, module, attr, effective, bound * (1 + BOUND_MARGIN)))
        self.covered.update(id(p) for p in params)

    def visit(self, m: nn.Module, name: str, b: float, shape: tuple[int, ...], g: float) -> tuple[float, tuple[int, ...]]:
        """Record the bounds of ``m``'s tensors (input norm <= b, gradient w.r.t. its output <= g);
        return the bound on its output norm and its output shape (per sample)."""
        return _visit(m, self, name, b, shape, g)


def output_norm_bound(module: nn.Module, input_bound: float, shape: tuple[int, ...]) -> float:
    """A bound on ||module(x)|| over every input of per-sample ``shape`` with ||x|| <= ``input_bound``:
    Lip(layer) b + ||layer(0)|| layer by layer, as :func:`gradient_norm_bounds` propagates it (the
    same rules, so a layer the privacy analysis refuses raises ``TypeError`` here too)."""
    bound, _ = _Analysis().visit(module, "", float(input_bound), tuple(shape), 0.0)
    return float(bound)


@singledispatch
def _visit(m: nn.Module, a: _Analysis, name: str, b: float, shape, g: float):
    if _trainable(m):
        raise TypeError(f"{name or 'model'} ({type(m).__name__}) has trainable parameters but no per-sample gradient "
                        "bound rule; clipping-free DP-SGD supports Linear/Conv2d/ConvTranspose2d (lipnet's Ortho*/AOL* "
                        "included), OrthoConv2d, LayerCentering, ConvexResidual and parameter-free layers inside "
                        "nn.Sequential. Freeze it (requires_grad_(False)) or replace it.")
    return a.forward_bound(m, b, shape)


@_visit.register(nn.Sequential)
def _(m: nn.Sequential, a: _Analysis, name: str, b: float, shape, g: float):
    children = list(m.named_children())
    lips = [a.lipschitz(c) for _, c in children]
    for k, (child_name, child) in enumerate(children):
        downstream = math.prod(lips[k + 1:])
        b, shape = a.visit(child, f"{name}{child_name}.", b, shape, g * downstream)
    return b, shape


@_visit.register(ConvexResidual)
def _(m: ConvexResidual, a: _Analysis, name: str, b: float, shape, g: float):
    alpha = float(m.alpha().detach())
    bf, shape_f = a.visit(m.f, f"{name}f.", b, shape, g * alpha)
    if tuple(shape_f) != tuple(shape):
        raise ValueError(f"{name}: ConvexResidual branch changes the shape {shape} -> {shape_f}")
    if m.learnable and m.alpha_raw.requires_grad:
        a.add(f"{name}alpha_raw", m, "alpha_raw", False, alpha * (1 - alpha) * g * (bf + b), [m.alpha_raw])
    return (1 - alpha) * b + alpha * bf, shape


def _weighted(m: nn.Module, a: _Analysis, name: str, b: float, shape, g: float, sensitivity: float, positions: int):
    out_b, out_shape = a.forward_bound(m, b, shape)
    bias = _bias(m)
    weight_params = [p for p in _trainable(m) if p is not bias]
    a.add(f"{name}weight", m, "weight", True, sensitivity * b * g, weight_params)
    if bias is not None:
        a.add(f"{name}bias", m, "bias", False, math.sqrt(positions) * g, [bias])
    return out_b, out_shape


@_visit.register(nn.Linear)
def _(m: nn.Linear, a: _Analysis, name: str, b: float, shape, g: float):
    if len(shape) != 1:
        raise ValueError(f"{name}: Linear expects flat samples, got per-sample shape {shape}")
    return _weighted(m, a, name, b, shape, g, 1.0, 1)


@_visit.register(nn.Conv2d)
@_visit.register(nn.ConvTranspose2d)
def _(m: nn.Module, a: _Analysis, name: str, b: float, shape, g: float):
    reuse, positions = conv_reuse(m, shape)
    return _weighted(m, a, name, b, shape, g, math.sqrt(reuse), positions)


@_visit.register(OrthoConv2d)
@_visit.register(OrthoConvTranspose2d)
def _(m: OrthoConv2d | OrthoConvTranspose2d, a: _Analysis, name: str, b: float, shape, g: float):
    reuse, positions = conv_reuse(m.conv, shape)  # the orthogonium conv holds stride/padding/dilation
    return _weighted(m, a, name, b, shape, g, math.sqrt(reuse), positions)


@_visit.register(LayerCentering)
def _(m: LayerCentering, a: _Analysis, name: str, b: float, shape, g: float):
    out = a.forward_bound(m, b, shape)
    bias = _bias(m)
    if bias is not None:
        positions = math.prod(shape[1:]) if len(shape) > 1 else 1
        a.add(f"{name}bias", m, "bias", False, math.sqrt(positions) * g, [bias])
    return out


@_visit.register(L2BallProjection)
def _(m: L2BallProjection, a: _Analysis, name: str, b: float, shape, g: float):
    return min(b, m.radius), shape


@_visit.register(GroupNormalization)
def _(m: GroupNormalization, a: _Analysis, name: str, b: float, shape, g: float):
    # every output has norm <= sqrt(entries), whatever the input (the class docstring's proof)
    out_b, out_shape = a.forward_bound(m, b, shape)
    return min(out_b, m.output_norm_bound(out_shape)), out_shape


@_visit.register(BatchCentering)
def _(m: BatchCentering, a: _Analysis, name: str, b: float, shape, g: float):
    raise TypeError(f"{name or 'model'}: BatchCentering subtracts the batch mean, which couples the samples (one "
                    "sample's gradient is not separable) and its running mean is computed from private data. Use "
                    "LayerCentering or no centering for private training (e.g. mnist_convnet(centering='layer')).")


@_visit.register(SLLBlock)
def _(m: SLLBlock, a: _Analysis, name: str, b: float, shape, g: float):
    if not _trainable(m):
        return a.forward_bound(m, b, shape)
    raise TypeError(f"{name or 'model'}: SLLBlock's parameters enter through T^-1; no per-sample gradient bound is "
                    "derived for it, so it is not supported in private training (freeze it or use OrthoConv2d)")


def gradient_norm_bounds(model: nn.Module, input_bound: float, loss: nn.Module,
                         input_shape: Sequence[int]) -> SensitivityReport:
    """Sound bounds on the norm of one sample's loss gradient, per trainable tensor and in total.

    Args:
        model: an ``nn.Sequential`` (possibly nested, with ``ConvexResidual`` blocks) of lipnet layers,
            plain Linear/Conv2d/ConvTranspose2d and parameter-free layers with a ``lipschitz_bound``.
        input_bound: X, with ||x|| <= X for every sample fed to ``model`` (e.g. after projecting onto
            the ball of radius X; pixels in [0, 1]^d also satisfy X = sqrt(d)).
        loss: the per-sample loss (its Lipschitz constant w.r.t. the logits: :func:`loss_lipschitz`).
        input_shape: one sample's shape, e.g. (1, 28, 28); convolution and bias factors depend on it.

    Guarantee: for every input with ||x|| <= X and every label, with the model's *current* weights
    and in its current train/eval mode, the gradient of the sample's loss w.r.t. each listed tensor
    has norm <= its ``bound`` and the whole gradient (all tensors) <= ``total`` (derivation in the
    module docstring; rounding covered by ``BOUND_MARGIN``). Weights change every step, so DP-SGD
    recomputes it every step. Every trainable parameter of ``model`` is covered by exactly one
    listed tensor, or a ``TypeError`` names the one that is not.
    """
    finite_positive(input_bound, "input_bound")
    shape = tuple(int(s) for s in input_shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"input_shape must be one sample's shape, e.g. (1, 28, 28), got {input_shape!r}")
    g = loss_lipschitz(loss)
    analysis = _Analysis()
    out_b, _ = analysis.visit(model, "", float(input_bound), shape, g)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in analysis.covered]
    if missing:
        raise TypeError(f"no per-sample gradient bound covers the trainable parameters {missing}")
    return SensitivityReport(analysis.bounds, float(input_bound), g, out_b)


__all__ = ["BOUND_MARGIN", "SensitivityReport", "TensorBound", "conv_reuse", "gradient_norm_bounds", "loss_lipschitz",
           "output_norm_bound"]
