"""Margin losses for certifiable training, with their Lipschitz constants w.r.t. the logits.

``lipschitz`` is the L2 Lipschitz constant of the *per-sample* loss z -> loss(z, y) for any fixed
label y (before the batch reduction); the privacy module multiplies it into gradient bounds.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..validate import finite_nonnegative, finite_positive, one_of


REDUCTIONS = ("mean", "sum", "none")


def reduce_loss(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-sample loss ``values`` reduced as ``reduction`` (one of :data:`REDUCTIONS`) says: their
    mean, their sum, or the values themselves (``"none"``)."""
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def class_indices(logits: torch.Tensor, target: torch.Tensor, name: str) -> torch.Tensor:
    """``target`` as int64 class indices (batch,): given as indices of any integer dtype, or one-hot
    / score rows (batch, classes) whose argmax is the class. ValueError naming ``name`` for shapes
    that do not match ``logits`` (batch, classes)."""
    if logits.dim() != 2:
        raise ValueError(f"{name}: logits must be (batch, classes), got {tuple(logits.shape)}")
    if target.dim() == 2 and target.shape == logits.shape:
        return target.argmax(dim=1)
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"{name}: target must be (batch,) class indices or (batch, classes) one-hot rows matching "
                         f"logits {tuple(logits.shape)}, got {tuple(target.shape)}")
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"{name}: class indices must be integers, got dtype {target.dtype}")
    return target.long()


class LipschitzCrossEntropy(nn.Module):
    """tau * CE((z - offset * onehot(y)) / tau, y): cross-entropy on margin-shifted, tempered logits.

    Lipschitz constant w.r.t. z: the gradient is softmax(.) - onehot(y), whose L2 norm is < sqrt(2)
    (||p - e_y||^2 = (1 - p_y)^2 + sum_{j != y} p_j^2 <= 2 (1 - p_y)^2), for every tau and offset.
    Small tau approaches the multi-class hinge with margin ``offset``; ``offset`` asks for a margin
    (certified radius offset / (sqrt(2) L)). orthogonium's ``LossXent`` default: offset 2.12, tau 0.25.
    """

    def __init__(self, temperature: float = 0.25, offset: float = 2.12132, reduction: str = "mean") -> None:
        super().__init__()
        self.temperature = finite_positive(temperature, "LipschitzCrossEntropy: temperature")
        self.offset = finite_nonnegative(offset, "LipschitzCrossEntropy: offset")
        self.reduction = one_of(reduction, REDUCTIONS, "LipschitzCrossEntropy: reduction")

    @property
    def lipschitz(self) -> float:
        return math.sqrt(2.0)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = class_indices(logits, target, "LipschitzCrossEntropy")
        # scatter, not F.one_hot: no data-dependent check, so torch.func.vmap can take per-sample gradients
        shifted = logits - self.offset * torch.zeros_like(logits).scatter(1, target[:, None], 1.0)
        return F.cross_entropy(shifted / self.temperature, target, reduction=self.reduction) * self.temperature


class MultiMarginHinge(nn.Module):
    """relu(margin - (z_y - max_{j != y} z_j)): hinge on the top-1 margin.

    Lipschitz constant w.r.t. z: sqrt(2) (the margin z_y - max_{j != y} z_j is sqrt(2)-Lipschitz:
    its subgradients are e_y - e_j). Zero loss means margin >= ``margin``, i.e. a certified radius
    >= margin / (sqrt(2) L) for a network with Lipschitz bound L.
    """

    def __init__(self, margin: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        self.margin = finite_nonnegative(margin, "MultiMarginHinge: margin")
        self.reduction = one_of(reduction, REDUCTIONS, "MultiMarginHinge: reduction")

    @property
    def lipschitz(self) -> float:
        return math.sqrt(2.0)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = class_indices(logits, target, "MultiMarginHinge")
        true = logits.gather(1, target[:, None])[:, 0]
        others = logits.scatter(1, target[:, None], float("-inf")).amax(dim=1)
        return reduce_loss(F.relu(self.margin - (true - others)), self.reduction)


class ClippedLossGradient(nn.Module):
    """``loss``'s value; its gradient w.r.t. each sample's logits clipped to L2 norm <= ``clip``.

    Backward sends ``min(1, clip / ||g_i||) g_i`` for each sample i, with ``g_i`` = d loss_i / d z_i
    (lip-dp's ``DP_ClipGradient``, "loss gradient clipping"). Guarantee: every per-sample logit
    gradient that reaches the network has norm <= ``clip``, so ``lipschitz`` = ``clip`` is the
    constant the privacy analysis needs (it bounds ||J_i^T v|| over ||v|| <= L, and v here is the
    clipped g_i); it is *not* a Lipschitz constant of the value. The clipping acts in the logit
    space -- K numbers per sample, no per-sample parameter gradient -- so it keeps clipping-free
    DP-SGD's cost. Why: a loss' own bound (sqrt(2) for cross-entropy) is met only by maximally wrong
    samples, while noise is calibrated to it; clipping at a small ``clip`` gives every sample still
    being learned the full gradient norm the noise is calibrated to, as per-sample clipping does.
    The update is then no longer the gradient of the reported value (as with per-sample clipping).
    Each value and g_i is computed on sample i alone (g_i sent as is), so the bound holds even for a
    wrapped loss whose batch call would couple samples.
    """

    def __init__(self, loss: nn.Module, clip: float, reduction: str | None = None) -> None:
        super().__init__()
        finite_positive(clip, "ClippedLossGradient: clip")
        if not hasattr(loss, "reduction"):
            raise TypeError(f"ClippedLossGradient: {type(loss).__name__} has no `reduction` (needs per-sample values)")
        self.reduction = one_of(loss.reduction if reduction is None else reduction, REDUCTIONS,
                                "ClippedLossGradient: reduction")
        self.loss, self.clip = copy.copy(loss), float(clip)   # a per-sample copy; the caller's loss is left as is
        self.loss.reduction = "none"

    @property
    def lipschitz(self) -> float:
        return self.clip

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or target.shape[0] != logits.shape[0]:
            raise ValueError(f"ClippedLossGradient: logits must be (batch, classes) and target match its batch, got "
                             f"{tuple(logits.shape)} and {tuple(target.shape)}")

        def one(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.loss(z[None], t[None]).sum()

        # each sample's own value and logit gradient, the sample taken alone (torch.func composes with callers'
        # vmap/grad, e.g. the privacy audits)
        g, values = torch.func.vmap(torch.func.grad_and_value(one))(logits.detach(), target)
        clipped = (g * (self.clip / g.norm(dim=1, keepdim=True).clamp_min(self.clip))).detach()
        # the value; d out_i / d z = clipped_i exactly
        out = values.detach() + (clipped * (logits - logits.detach())).sum(dim=1)
        return reduce_loss(out, self.reduction)

    def extra_repr(self) -> str:
        return f"clip={self.clip:g}"
