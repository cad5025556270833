"""A network's Lipschitz constant: a sound upper bound, and an empirical lower bound beside it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..nn import lipschitz_bound
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


def lipschitz_lower_bound(model: nn.Module, data: torch.Tensor | Iterable, iters: int = 10,
                          step: float = 1e-2, max_points: int = 256) -> float:
    """Empirical lower bound: max over data points x of ||f(x + h v) - f(x)|| / h, with v found by
    power iteration on J^T J at x (J v by a finite difference -- exact for piecewise-linear nets
    within a linear piece -- and J^T by one backward pass), h = ``step`` (raw-pixel L2 units).

    Every reported value is the ratio of an actual pair of inputs, so it can never exceed the true
    Lipschitz constant (up to float rounding); it shows how tight ``network_lipschitz_bound`` is.
    ``data``: a tensor of inputs or a loader of (x, y) / x batches (its first batch is used, up
    to ``max_points`` points).
    """
    x = first_batch(data)[:max_points].detach()
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
    return float(ratio.max())
