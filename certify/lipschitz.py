"""A network's Lipschitz constant: a sound upper bound, and (from :mod:`lipnet.nn.report`) an
empirical lower bound beside it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lipnet.modes import eval_mode
from lipnet.nn import lipschitz_bound


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
