"""A network's Lipschitz constant: a sound upper bound, and an empirical lower bound beside it."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..nn import InputNormalization, export, lipschitz_bound
from ._utils import eval_mode, first_batch


def network_lipschitz_bound(model: nn.Module, input_std: Sequence[float] | None = None) -> float:
    """Sound upper bound on the L2 Lipschitz constant of ``model`` in eval mode, from the weights
    in use (``lipnet.nn.lipschitz_bound``: product/convex rules over layers, each layer bounded by
    the core's rigorous ``spectral_norm_bound`` or the conv operator bound).

    Inputs are the raw ones a user attacks. lipnet's models normalize inside the network, so the
    normalization's 1/min(std) is already in the product. If *your* pipeline normalizes before
    the model, pass ``input_std`` (per-channel std) and the bound is multiplied by 1/min(std).
    Raises TypeError for a module without a bound rule (never assumed 1-Lipschitz).
    """
    with eval_mode(model):
        bound = lipschitz_bound(model)
    if input_std is not None:
        std = torch.as_tensor(input_std, dtype=torch.float64).flatten()
        if std.numel() == 0 or not (torch.isfinite(std) & (std > 0)).all():
            raise ValueError(f"network_lipschitz_bound: input_std must be finite and > 0, got {std.tolist()}")
        bound /= float(std.min())
    return bound


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


_ROUNDING_ALLOWANCE = 1e-12


def _float64_twin(model: nn.Module) -> nn.Module:
    """The function ``model`` computes in eval mode, evaluated in float64 with the very weights in
    use: ``export`` bakes them into plain layers (so casting re-runs no retraction), then every
    tensor is cast exactly (fp32 / bf16 values are float64 values). A model export cannot handle
    is cast as it is."""
    try:
        twin = export(model)
    except TypeError:
        twin = copy.deepcopy(model).eval()
    for m in twin.modules():  # the pairs (x, x + h v) may leave the pixel box by h: accept any input
        if isinstance(m, InputNormalization):
            m.input_range = None
    return twin.double()


def lipschitz_lower_bound(model: nn.Module, data: torch.Tensor | Iterable, iters: int = 10,
                          step: float = 1e-2, max_points: int = 256) -> float:
    """Empirical lower bound: max over data points x of ||f(x + h v) - f(x)|| / h, with v found by
    power iteration on J^T J at x (J v by a finite difference -- exact for piecewise-linear nets
    within a linear piece -- and J^T by one backward pass), h = ``step`` (raw-pixel L2 units).

    Every reported value is the ratio of an actual pair of inputs, computed in float64 on the
    weights in use (:func:`_float64_twin`) and lowered by 1e-12 relative for that evaluation's
    rounding (~1e-15), so it stays below the true constant and never exceeds
    ``network_lipschitz_bound``; it shows how tight that bound is (to 1e-12). ``data``: a tensor
    of inputs or a loader of (x, y) / x batches (its first batch is used, up to ``max_points``
    points).
    """
    x = first_batch(data)[:max_points].detach().double()
    with eval_mode(model):
        model = _float64_twin(model)
    with eval_mode(model), parametrize.cached():
        xr = x.clone().requires_grad_(True)
        fx = model(xr)
        v = _unit(torch.randn_like(x))
        for _ in range(iters):
            with torch.no_grad():
                jv = (model(x + step * v) - fx) / step
            (v,) = torch.autograd.grad(fx, xr, jv, retain_graph=True)
            v = _unit(v)
        with torch.no_grad():
            ratio = (model(x + step * v) - fx).flatten(1).norm(dim=1) / step
    # float64 evaluation errs ~1e-15 relative on these depths: deflating by 1e-12 keeps the ratio
    # of the pair below the true constant even where that constant is exactly 1 (MaxMin, Flatten)
    return float(ratio.max()) * (1 - _ROUNDING_ALLOWANCE)
