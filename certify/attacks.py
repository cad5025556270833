"""L2 attacks: empirical robustness beside the certified one, and the soundness tests' adversary."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lipnet.modes import eval_mode
from lipnet.validate import positive_int



def _margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y per sample: > 0 exactly when the prediction is wrong."""
    true = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return others - true


def _per_sample(v: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.expand(x.shape[0]).view(-1, *([1] * (x.dim() - 1)))


def _norms(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def pgd_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, steps: int = 20,
           *, step_size: float | None = None, loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "margin",
           random_start: bool = True,
           clamp: tuple[float, float] | None = (0.0, 1.0), generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient ascent inside {x + delta : ||delta||_2 <= eps} (per sample).

    ``eps``: a float or a (batch,) tensor of per-sample budgets. ``loss``: "margin" (max_{j!=y} z_j -
    z_y, the quantity a certificate bounds), "ce", or a callable ``(logits, y) -> (batch,)`` objective to
    maximize (e.g. a conformal score of the true label). ``clamp``: the valid input box (pixels in
    [0, 1]); ``None`` attacks the whole ball (what a certificate covers). Step size defaults to
    2.5 eps / steps (Madry et al.). Returns, per sample, the iterate with the largest margin loss
    seen (so a misclassifying point, once found, is kept; with a callable loss, the largest
    objective). An empirical attack: the accuracy under it is an upper bound on robust
    accuracy (its success rate a lower bound on the attackable fraction), never a certificate. The model runs in eval mode.
    """
    positive_int(steps, "pgd_l2: steps")
    if not callable(loss) and loss not in ("margin", "ce"):
        raise ValueError(f"pgd_l2: loss must be 'margin' or 'ce', got {loss!r}")
    eps_t = _per_sample(eps, x)
    if (eps_t < 0).any() or not torch.isfinite(eps_t).all():
        raise ValueError("pgd_l2: eps must be finite and >= 0")
    alpha = 2.5 * eps_t / steps if step_size is None else _per_sample(step_size, x)
    x = x.detach()
    delta = torch.zeros_like(x)
    if random_start:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
        delta = noise / _norms(noise).clamp_min(1e-12) * eps_t * 0.5
    best, best_score = x.clone(), torch.full((x.shape[0],), float("-inf"), device=x.device)
    with eval_mode(model):
        for _ in range(steps + 1):
            adv = x + delta if clamp is None else (x + delta).clamp(*clamp)
            adv.requires_grad_(True)
            logits = model(adv)
            if callable(loss):
                objective = loss(logits, y)
                tracked = objective
            else:
                tracked = _margin_loss(logits, y)
                objective = tracked if loss == "margin" else F.cross_entropy(logits, y, reduction="none")
            improved = tracked.detach() > best_score
            best[improved], best_score[improved] = adv.detach()[improved], tracked.detach()[improved].to(best_score.dtype)
            (grad,) = torch.autograd.grad(objective.sum(), adv)
            delta = delta + alpha * grad / _norms(grad).clamp_min(1e-12)
            delta = delta * (eps_t / _norms(delta).clamp_min(1e-12)).clamp(max=1.0)  # onto the ball
    return best


@torch.no_grad()
def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 20, **kw) -> float:
    """Fraction of (x, y) still correctly classified after :func:`pgd_l2` at budget ``eps``
    (an empirical upper bound on the true robust accuracy)."""
    with torch.enable_grad():
        adv = pgd_l2(model, x, y, eps, steps, **kw) if eps > 0 else x
    return (model(adv).argmax(1) == y).float().mean().item()
