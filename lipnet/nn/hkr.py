"""Kantorovich–Rubinstein (KR), hinge and HKR losses (Serrurier et al., 2021), the losses of
deel-torchlip, with their Lipschitz constants w.r.t. the logits.

Per sample, with logits z (K classes; K = 1: one binary logit) and sign s_k = +1 for the true
class, -1 otherwise:

* KR term: sum_k w_k z_k / K, w_k = +1 / p_k for the true class and -1 / (1 - p_k) for the others,
  p_k the frequency of class k. Its batch mean estimates, class by class, E[z_k | y = k] -
  E[z_k | y != k] averaged over k: the dual (Kantorovich–Rubinstein) form of the Wasserstein-1
  distance a 1-Lipschitz network maximizes. ``frequencies="batch"`` takes p_k from the batch
  (deel-torchlip's ``kr_loss``): the samples are coupled and a sample's gradient grows as its class
  gets rare, so no per-sample constant exists (``lipschitz`` is None: ``lipnet.privacy`` refuses
  it). ``frequencies="balanced"`` fixes p_k = 1/K (binary: 1/2): a per-sample loss, equal to the
  batch version on class-balanced batches.
* hinge term: relu(m/2 - s_k z_k) per class, the true class weighted by K - 1 and the sum divided
  by K (binary: relu(m/2 - s z)); zero when the true logit exceeds m/2 and every other one is
  below -m/2.
* HKR: alpha * hinge - (1 - alpha) * KR, alpha in [0, 1].

Labels: class indices (batch,) of any integer dtype or one-hot rows (batch, K); binary: (batch,) or
(batch, 1) with values in {0, 1} or {-1, +1} (positive = the class). ``reduction``: "mean", "sum"
or "none". Lipschitz constants (L2, w.r.t. one sample's logits, the "balanced" KR; tested by
autograd, and attained):

======================  ======================  ==========================
loss                    multiclass (K >= 2)      binary
======================  ======================  ==========================
KR                      sqrt(K / (K - 1))        2
hinge                   sqrt((K - 1) / K)        1
HKR                     alpha L_hinge + (1 - alpha) L_KR (triangle inequality)
======================  ======================  ==========================
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..validate import finite_nonnegative, finite_positive, one_of, positive_int, unit_interval
from .losses import REDUCTIONS, LipschitzCrossEntropy, class_indices, reduce_loss

FREQUENCIES = ("balanced", "batch")


def _signs(logits: torch.Tensor, target: torch.Tensor, name: str) -> torch.Tensor:
    """+1 for the true class, -1 elsewhere, shaped like ``logits`` (batch, K)."""
    if logits.dim() != 2:
        raise ValueError(f"{name}: logits must be (batch, classes) or (batch, 1), got {tuple(logits.shape)}")
    batch, k = logits.shape
    if k == 1:  # binary: labels in {0, 1} or {-1, +1}, positive = the class
        if target.shape not in ((batch,), (batch, 1)):
            raise ValueError(f"{name}: binary targets must be (batch,) or (batch, 1), got {tuple(target.shape)}")
        return torch.where(target.reshape(batch, 1) > 0, 1.0, -1.0).to(logits.dtype)
    if target.shape == logits.shape:
        return torch.where(target > 0, 1.0, -1.0).to(logits.dtype)
    if target.shape != (batch,) or target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"{name}: target must be (batch,) integer class indices or (batch, {k}) one-hot rows, "
                         f"got shape {tuple(target.shape)} dtype {target.dtype}")
    return torch.zeros_like(logits).scatter(1, target.long()[:, None], 2.0) - 1.0


def _kr_terms(logits: torch.Tensor, signs: torch.Tensor, frequencies: str) -> torch.Tensor:
    positive = signs > 0
    if frequencies == "batch":
        p = positive.to(logits.dtype).mean(dim=0, keepdim=True)
        # a class absent from the batch contributes nothing (deel-torchlip's nan_to_num)
        pos, neg = torch.nan_to_num(1 / p, posinf=0.0), torch.nan_to_num(1 / (1 - p), posinf=0.0)
    else:
        k = logits.shape[1]
        p = 0.5 if k == 1 else 1.0 / k
        pos, neg = 1 / p, 1 / (1 - p)
    # weights in the logits' dtype (a where() on Python floats would round them to the default dtype)
    weights = positive.to(logits.dtype) * (pos + neg) - neg
    return (weights * logits).mean(dim=1)


def _hinge_terms(logits: torch.Tensor, signs: torch.Tensor, margin: float) -> torch.Tensor:
    hinge = F.relu(margin / 2 - signs * logits)
    k = logits.shape[1]
    if k > 1:
        hinge = torch.where(signs > 0, hinge * (k - 1), hinge)
    return hinge.mean(dim=1)


def _kr_lipschitz(classes: int) -> float:
    return 2.0 if classes == 1 else math.sqrt(classes / (classes - 1))


def _hinge_lipschitz(classes: int) -> float:
    return 1.0 if classes == 1 else math.sqrt((classes - 1) / classes)


class _LogitLoss(nn.Module):
    """Shared plumbing: the number of classes (for ``lipschitz``), the reduction."""

    def __init__(self, classes: int, reduction: str, name: str) -> None:
        super().__init__()
        self.classes = positive_int(classes, f"{name}: classes (1: one binary logit)")
        self.reduction = one_of(reduction, REDUCTIONS, f"{name}: reduction")

    def _check_classes(self, logits: torch.Tensor, name: str) -> None:
        if logits.dim() == 2 and logits.shape[1] != self.classes:
            raise ValueError(f"{name} was built for {self.classes} logit(s), got logits {tuple(logits.shape)}")


class KRLoss(_LogitLoss):
    """The Kantorovich–Rubinstein estimate (module docstring), to be *maximized*; deel-torchlip's
    ``KRLoss`` / ``KRMulticlassLoss``. ``NegKRLoss`` is the quantity to minimize."""

    _sign = 1.0  # NegKRLoss: -1

    def __init__(self, classes: int, frequencies: str = "balanced", reduction: str = "mean") -> None:
        super().__init__(classes, reduction, "KRLoss")
        self.frequencies = one_of(frequencies, FREQUENCIES, "KRLoss: frequencies")

    @property
    def lipschitz(self) -> float | None:
        """sqrt(K/(K-1)) (binary: 2) for balanced frequencies; None for batch ones (no per-sample constant)."""
        return _kr_lipschitz(self.classes) if self.frequencies == "balanced" else None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check_classes(logits, type(self).__name__)
        value = _kr_terms(logits, _signs(logits, target, type(self).__name__), self.frequencies)
        return reduce_loss(self._sign * value, self.reduction)


class NegKRLoss(KRLoss):
    """Minus :class:`KRLoss`: the KR term as a loss to minimize (deel-torchlip's ``NegKRLoss``)."""

    _sign = -1.0


class HingeMarginLoss(_LogitLoss):
    """The hinge term of the module docstring with margin ``min_margin`` (deel-torchlip's
    ``HingeMarginLoss`` for one logit, ``HingeMulticlassLoss`` for K). Zero loss means the true
    logit is >= m/2 and the others <= -m/2."""

    def __init__(self, classes: int, min_margin: float = 1.0, reduction: str = "mean") -> None:
        super().__init__(classes, reduction, "HingeMarginLoss")
        self.min_margin = finite_nonnegative(min_margin, "HingeMarginLoss: min_margin")

    @property
    def lipschitz(self) -> float:
        """sqrt((K-1)/K), 1 for one binary logit."""
        return _hinge_lipschitz(self.classes)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check_classes(logits, "HingeMarginLoss")
        value = _hinge_terms(logits, _signs(logits, target, "HingeMarginLoss"), self.min_margin)
        return reduce_loss(value, self.reduction)


class HKRLoss(_LogitLoss):
    """alpha * hinge(min_margin) - (1 - alpha) * KR (deel-torchlip's ``HKRLoss`` /
    ``HKRMulticlassLoss``; alpha must lie in [0, 1], where deel-torchlip maps alpha > 1 to
    alpha / (1 + alpha) with a warning)."""

    def __init__(self, classes: int, alpha: float, min_margin: float = 1.0, frequencies: str = "balanced",
                 reduction: str = "mean") -> None:
        super().__init__(classes, reduction, "HKRLoss")
        self.alpha = unit_interval(alpha, "HKRLoss: alpha", closed_high=True)
        self.min_margin = finite_nonnegative(min_margin, "HKRLoss: min_margin")
        self.frequencies = one_of(frequencies, FREQUENCIES, "HKRLoss: frequencies")

    @property
    def lipschitz(self) -> float | None:
        """alpha L_hinge + (1 - alpha) L_KR; None with batch frequencies unless alpha = 1."""
        if self.frequencies == "batch" and self.alpha < 1:
            return None
        kr = _kr_lipschitz(self.classes) if self.alpha < 1 else 0.0
        return self.alpha * _hinge_lipschitz(self.classes) + (1 - self.alpha) * kr

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check_classes(logits, "HKRLoss")
        signs = _signs(logits, target, "HKRLoss")
        value = (self.alpha * _hinge_terms(logits, signs, self.min_margin)
                 - (1 - self.alpha) * _kr_terms(logits, signs, self.frequencies))
        return reduce_loss(value, self.reduction)


class TauCrossEntropyLoss(LipschitzCrossEntropy):
    """deel-torchlip's ``TauCrossEntropyLoss``: CE(tau z, y) / tau, which is
    ``LipschitzCrossEntropy(temperature=1/tau, offset=0)`` (same value; Lipschitz sqrt(2))."""

    def __init__(self, tau: float, reduction: str = "mean") -> None:
        self.tau = finite_positive(tau, "TauCrossEntropyLoss: tau")
        super().__init__(temperature=1.0 / self.tau, offset=0.0, reduction=reduction)


def _true_and_others(logits: torch.Tensor, target: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(true logit (batch,), a mask (batch, K) of the other classes) for single-label targets."""
    index = class_indices(logits, target, name)
    others = torch.ones_like(logits, dtype=torch.bool).scatter(1, index[:, None], False)
    return logits.gather(1, index[:, None])[:, 0], others


class _SingleLabelHKR(_LogitLoss):
    """Shared plumbing of the soft / log-sum-exp HKR losses: K >= 2 classes, alpha, temperature."""

    def __init__(self, classes: int, alpha: float, temperature: float, reduction: str, name: str) -> None:
        super().__init__(classes, reduction, name)
        if self.classes < 2:
            raise ValueError(f"{name}: classes must be >= 2 (a multiclass loss; one logit: HKRLoss(1, ...))")
        self.alpha = unit_interval(alpha, f"{name}: alpha", closed_high=True)
        self.temperature = finite_positive(temperature, f"{name}: temperature")


class LseHKRLoss(_SingleLabelHKR):
    """HKR with a log-sum-exp summary of the other classes (deel-torchlip's ``LseHKRMulticlassLoss``).

    With z' = ``temperature`` * z, true logit p = z'_y and n = (1/t) logsumexp(t z'_j, j != y),
    t = log(K - 1) / (``penalty`` * m / 2), so max_j z'_j <= n <= max_j z'_j + penalty * m / 2 (K = 2:
    n is the other logit): loss = (1 - alpha) (n - p) + alpha (relu(m/2 - p) + relu(m/2 + n)).
    Lipschitz w.r.t. the logits: sqrt(2) * temperature (the gradient is a e_y + c softmax(t z'_others)
    with |a|, c <= 1; approached when the true logit is below m/2 and one other logit dominates).
    Single-label targets: class indices or one-hot rows.
    """

    def __init__(self, classes: int, alpha: float = 1.0, min_margin: float = 1.0, temperature: float = 1.0,
                 penalty: float = 1.0, reduction: str = "mean") -> None:
        super().__init__(classes, alpha, temperature, reduction, "LseHKRLoss")
        self.min_margin = finite_positive(min_margin, "LseHKRLoss: min_margin")  # t divides by it
        self.penalty = finite_positive(penalty, "LseHKRLoss: penalty")

    @property
    def lipschitz(self) -> float:
        """sqrt(2) * temperature (class docstring)."""
        return math.sqrt(2.0) * self.temperature

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check_classes(logits, "LseHKRLoss")
        z = logits * self.temperature
        true, others = _true_and_others(z, target, "LseHKRLoss")
        masked = z.masked_fill(~others, -math.inf)
        if self.classes == 2:
            negative = masked.amax(dim=1)
        else:
            t = math.log(self.classes - 1) / (self.penalty * self.min_margin / 2)
            negative = torch.logsumexp(t * masked, dim=1) / t
        m = self.min_margin
        hinge = F.relu(m / 2 - true) + F.relu(m / 2 + negative)
        return reduce_loss((1 - self.alpha) * (negative - true) + self.alpha * hinge, self.reduction)


class SoftHKRLoss(_SingleLabelHKR):
    """HKR with the other classes weighted by a softmax (deel-torchlip's ``SoftHKRMulticlassLoss``).

    Per sample, w = softmax(temperature * z_j, j != y) (differentiated, as deel-torchlip does):
    loss = (1 - alpha) (sum_j w_j z_j - z_y) + alpha (relu(m/2 - z_y) + sum_j w_j relu(m/2 + z_j)).
    ``temperature`` is fixed; deel-torchlip divides it by a running mean of |logits| kept across
    batches, which couples the samples (no per-sample constant) -- pass the temperature that
    quotient settles at to reproduce it. Lipschitz w.r.t. the logits, for every temperature:
    sqrt(1 + (1 + 2 (K - 2) / e)^2) (derivation: the gradient is a e_y + b with |a| <= 1 and
    b_k = c_k w_k + T w_k (h_k - sum_j w_j h_j), c_k <= 1, h 1-Lipschitz; the last term's L1 norm is at
    most sum_jk w_j w_k |u_j - u_k| with u = T z, and each pair contributes w_max^2 d e^(-d) <= w_max^2 / e;
    sqrt(2) for K = 2, attained). Single-label targets: class indices or one-hot rows.
    """

    def __init__(self, classes: int, alpha: float = 0.9, min_margin: float = 1.0, temperature: float = 1.0,
                 reduction: str = "mean") -> None:
        super().__init__(classes, alpha, temperature, reduction, "SoftHKRLoss")
        self.min_margin = finite_nonnegative(min_margin, "SoftHKRLoss: min_margin")

    @property
    def lipschitz(self) -> float:
        """sqrt(1 + (1 + 2 (K - 2) / e)^2) (class docstring)."""
        return math.sqrt(1 + (1 + 2 * (self.classes - 2) / math.e) ** 2)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check_classes(logits, "SoftHKRLoss")
        true, others = _true_and_others(logits, target, "SoftHKRLoss")
        weights = torch.softmax((self.temperature * logits).masked_fill(~others, -math.inf), dim=1)
        m = self.min_margin
        kr = (weights * logits).sum(dim=1) - true
        hinge = F.relu(m / 2 - true) + (weights * F.relu(m / 2 + logits)).sum(dim=1)
        return reduce_loss((1 - self.alpha) * kr + self.alpha * hinge, self.reduction)


class TauBCEWithLogitsLoss(_LogitLoss):
    """deel-torchlip's ``TauBCEWithLogitsLoss``: BCE(tau z, y) / tau per logit, targets > 0 the
    positive label ({0, 1} or {-1, +1}), shaped like the logits ((batch,) or (batch, K)). One sample's
    loss is the mean over its K logits, so "mean" equals deel-torchlip's mean over every element.
    Lipschitz w.r.t. one sample's logits: 1 / sqrt(K) (each partial derivative is
    (sigmoid(tau z) - y) / K, of magnitude < 1 / K)."""

    def __init__(self, tau: float, classes: int = 1, reduction: str = "mean") -> None:
        super().__init__(classes, reduction, "TauBCEWithLogitsLoss")
        self.tau = finite_positive(tau, "TauBCEWithLogitsLoss: tau")

    @property
    def lipschitz(self) -> float:
        """1 / sqrt(K)."""
        return 1.0 / math.sqrt(self.classes)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        name = "TauBCEWithLogitsLoss"
        if logits.dim() == 1:
            logits = logits[:, None]
        self._check_classes(logits, name)
        if target.numel() != logits.numel() or target.shape[0] != logits.shape[0]:
            raise ValueError(f"{name}: target must have the logits' shape {tuple(logits.shape)}, got "
                             f"{tuple(target.shape)}")
        positive = (target.reshape(logits.shape) > 0).to(logits.dtype)
        per_logit = F.binary_cross_entropy_with_logits(self.tau * logits, positive, reduction="none") / self.tau
        return reduce_loss(per_logit.mean(dim=1), self.reduction)


__all__ = ["FREQUENCIES", "HKRLoss", "HingeMarginLoss", "KRLoss", "LseHKRLoss", "NegKRLoss", "SoftHKRLoss",
           "TauBCEWithLogitsLoss", "TauCrossEntropyLoss"]
