"""Certified radii and certified accuracy: margin / (sqrt(2) L)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from lipnet.inputs import check_finite, split_batch
from lipnet.certify.attacks import pgd_l2
from lipnet.certify.lipschitz import network_lipschitz_bound
from lipnet.modes import eval_mode
from lipnet.progress import progress_bar
from lipnet.validate import class_labels, finite_positive, nonnegative_int

# Slack on the logit margin for float evaluation error. The error of a float network's logits
# scales with its activations, not with its logits (inputs in the null space of a head give tiny
# logits from huge sums), and the activations of a network with Lipschitz bound L at input x are
# on the scale of ||f(0)|| + L ||x||. The slack is 64 ulp of max|z| + L ||x||: measured errors of
# a logit difference (fp32 vs fp64, benchmarks/results/README.md#float-slack) stay below 1 ulp of
# that scale, also for 1e7-norm inputs in a head's null space. An allowance 64x the observed
# error, not a rounding-error proof.
_FLOAT_SLACK_ULPS = 64


def check_eps(eps_list: Sequence[float]) -> list[float]:
    eps = [float(e) for e in eps_list]
    if not eps:
        raise ValueError("eps list is empty")
    bad = [e for e in eps if not math.isfinite(e) or e < 0]
    if bad:
        raise ValueError(f"eps must be finite and >= 0, got {bad}")
    return eps


def input_norms(inputs: torch.Tensor | float, batch: int) -> torch.Tensor:
    """Per-sample L2 norms (float64, length ``batch``) of ``inputs``: a batch (batch, ...) of
    inputs, or upper bounds on their norms (a float, or a (batch,) tensor)."""
    if not isinstance(inputs, torch.Tensor):
        norms = torch.full((batch,), abs(float(inputs)), dtype=torch.float64)
    elif inputs.is_complex():
        raise ValueError(f"inputs must be real, got dtype {inputs.dtype}")
    elif inputs.dim() >= 2 and inputs.shape[0] == batch:
        norms = inputs.detach().double().flatten(1).norm(dim=1)
    elif inputs.dim() <= 1 and inputs.numel() in (1, batch):
        norms = inputs.detach().double().abs().reshape(-1).expand(batch)
    else:
        raise ValueError(f"inputs of shape {tuple(inputs.shape)} do not match {batch} rows of logits: pass the "
                         "batch (batch, ...) or its norms (a float or a (batch,) tensor)")
    if not torch.isfinite(norms).all():
        raise ValueError("inputs contain NaN or inf (or norms beyond float64)")
    return norms


def float_evaluation_slack(logits: torch.Tensor, precision: torch.dtype | None = None, *,
                           activation_scale: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Per sample, ``_FLOAT_SLACK_ULPS`` ulp of (max |z| + ``activation_scale``): the allowance for
    the float error of logits computed in ``precision`` -- the dtype the *model* ran in, not the
    one the logits are handed over in (``model(x).double()`` is still fp32 arithmetic). Default:
    fp32, or the logits' own dtype where that is coarser (bf16 / fp16 logits); pass
    ``torch.float64`` for a float64 model. ``activation_scale``: L ||x|| per sample (the scale of
    the activations beyond the logits'; :func:`certified_radius` passes it)."""
    if precision is None:
        precision = logits.dtype if torch.finfo(logits.dtype).eps > torch.finfo(torch.float32).eps else torch.float32
    scale = logits.detach().double().abs().amax(dim=1) + torch.as_tensor(activation_scale, dtype=torch.float64,
                                                                           device=logits.device)
    return _FLOAT_SLACK_ULPS * torch.finfo(precision).eps * scale


def check_logits(logits: torch.Tensor, where: str) -> None:
    """ValueError naming ``where`` unless ``logits`` is a finite real (batch, classes >= 2) tensor."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{where}: logits must be a tensor, got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"{where}: logits must be (batch, classes >= 2), got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{where}: logits must be a real floating-point tensor, got dtype {logits.dtype}")
    if not torch.isfinite(logits).all():
        raise ValueError(f"{where}: logits contain NaN or inf")


def certified_radius(logits: torch.Tensor, lipschitz: float, inputs: torch.Tensor | float, *,
                     precision: torch.dtype | None = None) -> torch.Tensor:
    """Per-sample L2 radius inside which the top-1 class provably cannot change.

    Guarantee: for a network f with L2 Lipschitz bound ``lipschitz`` (sound, e.g.
    :func:`network_lipschitz_bound`), each difference z_i - z_j is sqrt(2) L-Lipschitz, so the
    top-1 class of f(x + delta) equals that of f(x) for every ||delta||_2 < margin / (sqrt(2) L),
    margin = z_top1 - z_top2. The margin is reduced by 64 ulp of max|z| + L ||x|| for float
    evaluation error (:func:`float_evaluation_slack`), ulp of the precision the model ran in (fp32
    unless ``precision`` says otherwise, whatever dtype ``logits`` arrive in). ``inputs``: the
    batch x the logits were computed from, or upper bounds on its L2 norms (a float or a (batch,)
    tensor) -- the float error grows with the activations, which the logits alone do not show.
    Radii are in the units of the model's input (raw pixels for lipnet's models). Ties -> 0.
    """
    check_logits(logits, "certified_radius")
    finite_positive(lipschitz, "certified_radius: lipschitz")
    norms = input_norms(inputs, logits.shape[0]).to(logits.device)
    z = logits.detach().double()
    top2 = z.topk(2, dim=1).values
    slack = float_evaluation_slack(logits, precision, activation_scale=lipschitz * norms)
    margin = (top2[:, 0] - top2[:, 1] - slack).clamp_min(0.0)
    return margin / (math.sqrt(2.0) * lipschitz)


@dataclass
class CertificationReport:
    """Clean / certified (/ PGD) accuracy over a dataset; accuracies are fractions in [0, 1]."""

    n: int
    clean: float
    certified: dict[float, float]
    lipschitz_bound: float
    pgd: dict[float, float] = field(default_factory=dict)
    pgd_n: int = 0  # points attacked (the first ``pgd_points`` of the loader)
    radii: torch.Tensor | None = field(default=None, repr=False)  # per sample, 0 where misclassified

    def as_dict(self) -> dict:
        return {"n": self.n, "clean": self.clean, "certified": dict(self.certified), "pgd": dict(self.pgd),
                "pgd_n": self.pgd_n, "lipschitz_bound": self.lipschitz_bound}


def certified_accuracy(model: nn.Module, loader: Iterable, eps_list: Sequence[float], *,
                       lipschitz: float | None = None, pgd_steps: int = 0, pgd_points: int | None = None, device: str | torch.device | None = None,
                       progress: bool = False) -> CertificationReport:
    """Clean accuracy and, per eps, the fraction of points that are correctly classified *and*
    certified at radius > eps (a sound lower bound on accuracy under any L2 attack of size eps).

    ``lipschitz`` defaults to :func:`network_lipschitz_bound` (computed once, eval mode).
    ``pgd_steps > 0`` also runs :func:`pgd_l2` (inputs clamped to [0, 1]) per eps on the first
    ``pgd_points`` points (all if None): empirical robust accuracy, an upper bound that must never
    fall below the certified accuracy of the same points. PGD costs ~(steps + 1) forward+backward
    passes per point and eps, so on CPU attack a subset.
    """
    eps = check_eps(eps_list)
    nonnegative_int(pgd_steps, "pgd_steps")
    if pgd_points is not None:
        nonnegative_int(pgd_points, "pgd_points")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    lip = network_lipschitz_bound(model) if lipschitz is None else float(lipschitz)
    n, correct, pgd_n = 0, 0, 0
    cert = {e: 0 for e in eps}
    pgd = {e: 0 for e in eps} if pgd_steps > 0 else {}
    radii = []
    with eval_mode(model), parametrize.cached():
        for batch in progress_bar(loader, desc="certify", enabled=progress, leave=False):
            x, y = split_batch(batch)
            if y is None:
                raise ValueError("certified_accuracy needs (inputs, labels) batches")
            x, y = x.to(device), y.to(device)
            check_finite(x)
            with torch.no_grad():
                logits = model(x)
            y = class_labels(y, logits.shape[1], "certified_accuracy").to(device)
            ok = logits.argmax(1) == y
            r = torch.where(ok, certified_radius(logits, lip, x), torch.zeros((), dtype=torch.float64, device=device))
            radii.append(r.cpu())
            n, correct = n + len(y), correct + int(ok.sum())
            for e in eps:
                cert[e] += int((ok & (r > e)).sum())
            take = len(y) if pgd_points is None else max(0, min(len(y), pgd_points - pgd_n))
            if pgd_steps > 0 and take > 0:
                xa, ya = x[:take], y[:take]
                for e in eps:
                    adv = pgd_l2(model, xa, ya, e, pgd_steps) if e > 0 else xa
                    with torch.no_grad():
                        pgd[e] += int((model(adv).argmax(1) == ya).sum())
                pgd_n += take
    if n == 0:
        raise ValueError("certified_accuracy: the loader is empty")
    return CertificationReport(n=n, clean=correct / n, certified={e: c / n for e, c in cert.items()},
                               lipschitz_bound=lip, pgd={e: c / pgd_n for e, c in pgd.items()} if pgd_n else {}, pgd_n=pgd_n, radii=torch.cat(radii))
