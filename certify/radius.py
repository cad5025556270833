"""Certified radii and certified accuracy: margin / (sqrt(2) L)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from lipnet.validate import finite_positive

from ._utils import check_finite, eval_mode, split_batch
from .attacks import pgd_l2
from .lipschitz import network_lipschitz_bound

# Relative slack on the logit margin for float evaluation error: the logits are computed in float32
# (error ~1e-6 relative on these depths); subtracting 64 ulp of the largest |logit| keeps the
# radius on the safe side of that error. Not a rounding-error proof, but 10-100x the observed error.
_FLOAT_SLACK_ULPS = 64


def check_eps(eps_list: Sequence[float]) -> list[float]:
    eps = [float(e) for e in eps_list]
    if not eps:
        raise ValueError("eps list is empty")
    bad = [e for e in eps if not math.isfinite(e) or e < 0]
    if bad:
        raise ValueError(f"eps must be finite and >= 0, got {bad}")
    return eps


def float_evaluation_slack(logits: torch.Tensor, precision: torch.dtype | None = None) -> torch.Tensor:
    """Per sample, ``_FLOAT_SLACK_ULPS`` ulp of max |z|: the allowance for the float error of logits
    computed in ``precision`` -- the dtype the *model* ran in, not the one the logits are handed
    over in (``model(x).double()`` is still fp32 arithmetic). Default: fp32, or the logits' own
    dtype where that is coarser (bf16 / fp16 logits). Pass ``torch.float64`` for a float64 model."""
    if precision is None:
        precision = logits.dtype if torch.finfo(logits.dtype).eps > torch.finfo(torch.float32).eps else torch.float32
    return _FLOAT_SLACK_ULPS * torch.finfo(precision).eps * logits.detach().double().abs().amax(dim=1)


def certified_radius(logits: torch.Tensor, lipschitz: float, *, precision: torch.dtype | None = None) -> torch.Tensor:
    """Per-sample L2 radius inside which the top-1 class provably cannot change.

    Guarantee: for a network f with L2 Lipschitz bound ``lipschitz`` (sound, e.g.
    :func:`network_lipschitz_bound`), each difference z_i - z_j is sqrt(2) L-Lipschitz, so the
    top-1 class of f(x + delta) equals that of f(x) for every ||delta||_2 < margin / (sqrt(2) L),
    margin = z_top1 - z_top2. The margin is reduced by 64 ulp of max|z| for float evaluation error,
    ulp of the precision the model ran in (:func:`float_evaluation_slack`: fp32 unless ``precision``
    says otherwise, whatever dtype ``logits`` arrive in).
    Radii are in the units of the model's input (raw pixels for lipnet's models). Ties -> 0.
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"certified_radius: logits must be (batch, classes >= 2), got {tuple(logits.shape)}")
    finite_positive(lipschitz, "certified_radius: lipschitz")
    if not torch.isfinite(logits).all():
        raise ValueError("certified_radius: logits contain NaN or inf")
    z = logits.detach().double()
    top2 = z.topk(2, dim=1).values
    slack = float_evaluation_slack(logits, precision)
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
    radii: torch.Tensor | None = None  # per sample, 0 where misclassified

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
    device = torch.device(device) if device is not None else next(model.parameters()).device
    lip = network_lipschitz_bound(model) if lipschitz is None else float(lipschitz)
    n, correct, pgd_n = 0, 0, 0
    cert = {e: 0 for e in eps}
    pgd = {e: 0 for e in eps} if pgd_steps > 0 else {}
    radii = []
    with eval_mode(model), parametrize.cached():
        for batch in tqdm(loader, desc="certify", disable=not progress, leave=False):
            x, y = split_batch(batch)
            if y is None:
                raise ValueError("certified_accuracy needs (inputs, labels) batches")
            x, y = x.to(device), y.to(device)
            check_finite(x)
            with torch.no_grad():
                logits = model(x)
            ok = logits.argmax(1) == y
            r = torch.where(ok, certified_radius(logits, lip), torch.zeros((), dtype=torch.float64, device=device))
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
                               lipschitz_bound=lip, pgd={e: c / max(pgd_n, 1) for e, c in pgd.items()}, pgd_n=pgd_n, radii=torch.cat(radii))
