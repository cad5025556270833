"""Robust conformal prediction the Lipschitz way: prediction sets that keep coverage >= 1 - alpha
under any L2 attack of budget eps, at the cost of vanilla split conformal prediction.

The one fact everything rests on: if the network is L-Lipschitz (sound bound, raw-pixel inputs),
an input perturbation ||delta||_2 <= eps moves the logits by ||Delta z||_2 <= r = eps * L, hence
every pairwise logit difference z_k - z_j by at most sqrt(2) r (Cauchy-Schwarz on e_k - e_j).
Softmax probabilities are monotone in these differences, so

    p_k(x + delta) in [ softmax_k(z_k - r/sqrt2, z_j + r/sqrt2),  softmax_k(z_k + r/sqrt2, z_j - r/sqrt2) ]

(temperature T applied after the shift). Scores are bounded from these intervals
(:func:`score_bounds`); the robust set includes every class whose score could be <= q_hat
somewhere in the eps-ball. lip-rcp (ICML 2025) shifts every logit by the full r (differences by
2 r): sound but sqrt(2) looser; ours is exact for two classes.

Two sound constructions (both give coverage >= 1 - alpha for every attacked test point):
  * robust *inference* (``mode="inference"``): vanilla q_hat from clean calibration scores; at the
    attacked x~ include k when lower_score(x~, k) <= q_hat. Since the clean x lies in the ball
    around x~, score(x, y) <= q_hat implies lower_score(x~, y) <= q_hat.
  * robust *calibration* (``mode="calibration"``): q_hat from the upper scores
    upper_score(x_i, y_i) of the calibration points; at test include k when score(x~, k) <= q_hat.
    score(x~, y) <= upper_score(x, y), which is exchangeable with the calibration upper scores.
Both reduce to vanilla split CP at eps = 0, exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from scipy.stats import beta as beta_dist
from torch import nn
from torch.nn.utils import parametrize

from lipnet.inputs import check_finite, split_batch
from lipnet.certify.attacks import pgd_l2
from lipnet.certify.lipschitz import network_lipschitz_bound
# certified_radius' float-evaluation slack, one rule for both: r grows by 64 ulp (fp32) of
# max |z| + L ||x|| when r > 0
from lipnet.certify.radius import check_logits, float_evaluation_slack, input_norms
from lipnet.modes import eval_mode
from lipnet.progress import progress_bar
from lipnet.validate import class_labels as check_labels
from lipnet.validate import finite_nonnegative, finite_positive, open_unit

SCORES = ("lac", "aps")
MODES = ("inference", "calibration")
BOUNDS = ("local", "lipschitz")
_SQRT2 = math.sqrt(2.0)


# ----------------------------------------------------------------------------------- validation

def check_alpha(alpha: float) -> float:
    return open_unit(alpha, "alpha")


def _check_eps(eps: float) -> float:
    return finite_nonnegative(eps, "eps")


def _check_temperature(temperature: float) -> float:
    return finite_positive(temperature, "temperature")


def _check_score(score: str) -> str:
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {SCORES}")
    return score


# ------------------------------------------------------------------------------------ quantile

def _quantile_rank(n: int, alpha: float) -> int:
    # Exact rational arithmetic: (n + 1)(1 - 0.1) in floats is 9.000000000000002 for n = 8, and
    # ceil would then ask for one more calibration point than the definition needs.
    return math.ceil((n + 1) * (1 - Fraction(repr(float(alpha)))))


def min_calibration_size(alpha: float) -> int:
    """Smallest n with ceil((n + 1)(1 - alpha)) <= n, i.e. a finite conformal quantile exists."""
    a = Fraction(repr(check_alpha(alpha)))
    return math.ceil((1 - a) / a)


def conformal_quantile(scores: torch.Tensor | np.ndarray, alpha: float) -> float:
    """The split-conformal threshold: the ceil((n + 1)(1 - alpha))-th smallest calibration score.

    Guarantee (Vovk et al.; Lei et al. 2018): for a test score exchangeable with the n calibration
    scores, P(score <= q_hat) >= 1 - alpha. Raises ValueError when n < ``min_calibration_size``.
    """
    alpha = check_alpha(alpha)
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    n = s.numel()
    k = _quantile_rank(n, alpha)
    if n == 0 or k > n:
        raise ValueError(f"calibration set too small for alpha={alpha}: got n={n}, need n >= "
                         f"{min_calibration_size(alpha)}")
    if not torch.isfinite(s).all():
        raise ValueError("calibration scores contain NaN or inf")
    return float(s.kthvalue(k).values)


# ------------------------------------------------------------------------------------- scores

def _softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.double() / temperature, dim=1)


def _aps(p: torch.Tensor, u: torch.Tensor | float) -> torch.Tensor:
    """APS score of every class: mass of strictly more likely classes + u * own mass."""
    above = (p[:, None, :] > p[:, :, None]).to(p.dtype)  # above[b, k, j] = p_j > p_k
    u = torch.as_tensor(u, dtype=p.dtype, device=p.device)
    # <= 1 exactly; the clamp removes float sums of 1 + ulp, which would drop a class at q_hat = 1
    return ((above * p[:, None, :]).sum(-1) + u.reshape(-1, 1) * p).clamp_max(1.0)


def class_scores(logits: torch.Tensor, score: str = "lac", temperature: float = 1.0,
                 u: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Non-conformity score of every class, (batch, classes), float64; low = conforming.

    ``"lac"``: 1 - softmax(z / T)_k (Sadinle et al. 2019). ``"aps"``: sum of the softmax masses
    strictly above class k plus u * p_k (Romano et al. 2020); ``u`` = 1 is the non-randomized
    score, u ~ U(0, 1) per sample (a (batch,) tensor) the randomized one.
    """
    _check_score(score)
    p = _softmax(logits, _check_temperature(temperature))
    return 1.0 - p if score == "lac" else _aps(p, u)


def probability_bounds(logits: torch.Tensor, radius: torch.Tensor | float,
                       temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sound bounds on softmax(z' / T) over every z' with ||z' - z||_2 <= radius (per sample).

    Each difference z'_k - z'_j lies within sqrt(2) * radius of z_k - z_j, and p_k increases with
    every such difference, so p_k is bracketed by the softmax of the logits with all differences
    to class k shifted by -/+ sqrt(2) radius. Exact (attained) for two classes. O(batch * K^2).
    """
    temperature = _check_temperature(temperature)
    z = logits.double() / temperature
    r = torch.as_tensor(radius, dtype=torch.float64, device=z.device).reshape(-1, 1, 1)
    diff = z[:, None, :] - z[:, :, None]                      # diff[b, k, j] = (z_j - z_k) / T
    off = 1.0 - torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
    shift = off * (_SQRT2 * r / temperature)
    lower = torch.exp(-torch.logsumexp(diff + shift, dim=-1))   # p_k = 1 / sum_j exp(z_j - z_k)
    upper = torch.exp(-torch.logsumexp(diff - shift, dim=-1))
    return lower, upper


def score_lipschitz(score: str = "lac", temperature: float = 1.0) -> float:
    """Global Lipschitz constant of the score w.r.t. the logits (L2).

    LAC: grad_z p_k = p_k (e_k - p) / T and ||e_k - p||^2 = (1 - p_k)^2 + sum_{j!=k} p_j^2
    <= 2 (1 - p_k)^2, so ||grad|| <= sqrt(2) p_k (1 - p_k) / T <= sqrt(2) / (4 T), attained for two
    classes at p_k = 1/2. (lip-rcp's looser rule uses 1 / (2 T).) Times the network bound L and the
    attack budget eps this bounds every LAC score change: |Delta s| <= eps * L * sqrt(2) / (4 T).
    APS has no Lipschitz constant: when p_j crosses p_k the score of k jumps by p_j; its changes
    are bounded by interval propagation instead (:func:`score_bounds`).
    """
    _check_score(score)
    temperature = _check_temperature(temperature)
    if score == "aps":
        raise ValueError("the APS score is discontinuous in the logits (it jumps when two "
                         "probabilities cross): it has no Lipschitz constant; use score_bounds")
    return _SQRT2 / (4.0 * temperature)


def score_bounds(logits: torch.Tensor, radius: torch.Tensor | float, score: str = "lac",
                 temperature: float = 1.0, u: torch.Tensor | float = 1.0,
                 bound: str = "local", *, activation_scale: torch.Tensor | float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper), each (batch, classes): sound bounds on every class's score over all logits
    within L2 distance ``radius`` of ``logits`` (radius = eps * network Lipschitz bound).

    ``bound="local"``: from :func:`probability_bounds`. LAC: [1 - p_hi, 1 - p_lo]. APS: every
    class j that is above k for *some* logits in the ball has p_hi_j > p_lo_k, and every class with
    p_lo_j > p_hi_k is above k for *all* of them, so
    sum_{p_lo_j > p_hi_k} p_lo_j + u p_lo_k <= s_k <= min(sum_{p_hi_j > p_lo_k} p_hi_j + u p_hi_k, 1 - (1 - u) p_lo_k).
    ``bound="lipschitz"`` (LAC only): s -/+ radius * :func:`score_lipschitz` (looser; for comparison).
    A radius > 0 is enlarged by 64 fp32-ulp of max |z| + ``activation_scale`` (L ||x|| per sample:
    the float error grows with the activations) for the logits' rounding error; radius 0 returns
    the scores themselves.
    """
    _check_score(score)
    if bound not in BOUNDS:
        raise ValueError(f"unknown bound {bound!r}; choose one of {BOUNDS}")
    r = torch.as_tensor(radius, dtype=torch.float64, device=logits.device).expand(logits.shape[0])
    if (r < 0).any() or not torch.isfinite(r).all():
        raise ValueError("radius must be finite and >= 0")
    if not (r > 0).any():  # exactly the scores, so that eps = 0 is vanilla CP bit for bit
        s = class_scores(logits, score, temperature, u)
        return s, s
    r = torch.where(r > 0, r + float_evaluation_slack(logits, activation_scale=activation_scale), r)
    if bound == "lipschitz":
        s = class_scores(logits, score, temperature, u)
        width = (r * score_lipschitz(score, temperature))[:, None]
        return s - width, s + width
    p_lo, p_hi = probability_bounds(logits, r, temperature)
    if score == "lac":
        return 1.0 - p_hi, 1.0 - p_lo
    u = torch.as_tensor(u, dtype=torch.float64, device=logits.device).reshape(-1, 1)
    off = 1.0 - torch.eye(logits.shape[1], dtype=torch.float64, device=logits.device)
    surely_above = (p_lo[:, None, :] > p_hi[:, :, None]).double() * off
    maybe_above = (p_hi[:, None, :] > p_lo[:, :, None]).double() * off
    lower = ((surely_above * p_lo[:, None, :]).sum(-1) + u * p_lo).clamp_max(1.0)
    upper = torch.minimum((maybe_above * p_hi[:, None, :]).sum(-1) + u * p_hi, 1.0 - (1.0 - u) * p_lo)
    return lower, upper


# --------------------------------------------------------------- coverage bound for vanilla CP

def coverage_radii(logits: torch.Tensor, labels: torch.Tensor, q_hat: float, lipschitz: float,
                   score: str = "lac", temperature: float = 1.0, u: torch.Tensor | float = 1.0,
                   max_eps: float = 1e3, iters: int = 60, *,
                   activation_scale: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Per point, a lower bound on the largest eps for which the *vanilla* set {k: s(x~, k) <= q_hat}
    provably keeps the true label for every x~ with ||x~ - x|| <= eps: the upper score bound of
    the label stays <= q_hat. Batched bisection on eps (the bound is monotone in eps); returns the
    last eps known to hold (-inf if the clean set already misses the label, ``max_eps`` if never lost).
    ``activation_scale``: as in :func:`score_bounds`.
    """
    y = labels.reshape(-1, 1).to(logits.device)
    u_t = torch.as_tensor(u, dtype=torch.float64, device=logits.device)

    def holds(eps: torch.Tensor) -> torch.Tensor:
        _, upper = score_bounds(logits, eps * lipschitz, score, temperature, u_t, activation_scale=activation_scale)
        return upper.gather(1, y)[:, 0] <= q_hat

    n = logits.shape[0]
    lo = torch.zeros(n, dtype=torch.float64, device=logits.device)
    hi = torch.full_like(lo, float(max_eps))
    clean_ok = class_scores(logits, score, temperature, u_t).gather(1, y)[:, 0] <= q_hat
    never_lost = holds(hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        ok = holds(mid)
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return torch.where(never_lost, hi, torch.where(clean_ok, lo, torch.full_like(lo, float("-inf"))))


def simultaneous_miss_upper_bound(radii: torch.Tensor | np.ndarray, eps: float | Sequence[float],
                                  delta: float = 0.05) -> np.ndarray:
    """Upper bounds on R(eps) = P(E < eps) for every eps at once, from n i.i.d. draws E_i of the
    per-point coverage radius E (points independent of the calibration set).

    With probability >= 1 - delta over the draws, simultaneously for every eps:
    R(eps) <= B(k(eps)), k(eps) = #{i: E_i < eps}, B(k) = Beta(k + 1, n - k).ppf(1 - delta / n)
    (the Clopper-Pearson upper limit for k misses out of n at level delta / n; 1 for k = n).
    Why: with G(t) = P(E < t), G(E_(j)) <= U_(j) ~ Beta(j, n - j + 1) for the j-th order statistic
    (probability integral transform, left limits make it hold for atoms too); k(eps) <= k means
    eps <= E_(k+1), so R(eps) <= G(E_(k+1)) <= U_(k+1); a union bound over the n order statistics
    costs the delta / n. This is lip-rcp's Clopper-Pearson inversion with its union correction.
    """
    open_unit(delta, "delta")
    e = np.sort(np.asarray(torch.as_tensor(radii, dtype=torch.float64).cpu(), dtype=np.float64))
    n = e.size
    if n == 0:
        raise ValueError("no hold-out points")
    eps_arr = np.atleast_1d(np.asarray(eps, dtype=np.float64))
    if not np.all(np.isfinite(eps_arr)) or np.any(eps_arr < 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps_arr.tolist()}")
    k = np.searchsorted(e, eps_arr, side="left")  # #{E_i < eps}
    bound = np.ones_like(eps_arr)
    ok = k < n
    bound[ok] = beta_dist.ppf(1.0 - delta / n, k[ok] + 1, n - k[ok])
    return bound


# ------------------------------------------------------------------------------ the classifier

@dataclass
class ConformalReport:
    """Coverage and set sizes of one evaluation (fractions in [0, 1], sizes in classes)."""

    n: int
    eps: float               # robustness budget the sets were built for
    attack_eps: float        # budget of the attack applied to the test inputs (0: clean)
    coverage: float
    mean_size: float
    median_size: float
    singleton_rate: float
    empty_rate: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class ConformalClassifier:
    """Split conformal prediction sets for a classifier, robust to L2 attacks of size ``eps``.

    Guarantee: with ``eps > 0`` and ``lipschitz`` a sound L2 Lipschitz bound of ``model`` (default
    :func:`network_lipschitz_bound`, raw-pixel inputs), for calibration and test points drawn
    exchangeably, P(y in C(x + delta)) >= 1 - alpha for *every* attack ||delta||_2 <= eps chosen
    after seeing x (see the module docstring for both modes). ``eps = 0`` is vanilla split CP,
    bit for bit. ``score``: "lac" or "aps" (``randomized`` draws u ~ U(0, 1) per point from
    ``seed``). ``temperature``: softmax temperature of the score.
    """

    def __init__(self, model: nn.Module, score: str = "lac", alpha: float = 0.1, eps: float = 0.0, *,
                 temperature: float = 1.0, randomized: bool = False, mode: str = "inference",
                 bound: str = "local", lipschitz: float | None = None,
                 device: str | torch.device | None = None, seed: int = 0, progress: bool = False) -> None:
        self.model, self.score, self.alpha = model, _check_score(score), check_alpha(alpha)
        self.eps, self.temperature = _check_eps(eps), _check_temperature(temperature)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        if bound not in BOUNDS or (bound == "lipschitz" and score != "lac"):
            raise ValueError(f"bound must be one of {BOUNDS} ('lipschitz' only for the LAC score), got {bound!r}")
        if randomized and score != "aps":
            raise ValueError("randomized=True is the randomized APS score; LAC is never randomized")
        self.mode, self.bound, self.randomized, self.progress = mode, bound, bool(randomized), progress
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if lipschitz is None:
            lipschitz = network_lipschitz_bound(model)
        self.lipschitz = finite_positive(lipschitz, "lipschitz")
        self.generator = torch.Generator().manual_seed(seed)
        self._calibration: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._quantiles: dict[float, float] = {}
        self._coverage_radii: torch.Tensor | None = None
        self._coverage_delta = 0.05

    # -- plumbing
    def _u(self, n: int) -> torch.Tensor:
        if self.randomized:
            return torch.rand(n, generator=self.generator, dtype=torch.float64)
        return torch.ones(n, dtype=torch.float64)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Model outputs in eval mode, float64, after an input finiteness check."""
        check_finite(x)
        with eval_mode(self.model), parametrize.cached(), torch.no_grad():
            return self.model(x.to(self.device)).double()

    def _collect(self, loader: Iterable, desc: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        zs, ys, norms = [], [], []
        for batch in progress_bar(loader, desc=desc, enabled=self.progress, leave=False):
            x, y = split_batch(batch)
            if y is None:
                raise ValueError(f"{desc} needs (inputs, labels) batches")
            zs.append(self.logits(x).cpu())
            ys.append(y.reshape(-1).long().cpu())
            norms.append(input_norms(x, len(x)))
        if not zs:
            raise ValueError(f"{desc}: the loader is empty")
        return torch.cat(zs), torch.cat(ys), torch.cat(norms)

    def _radius(self, eps: float) -> float:
        return _check_eps(eps) * self.lipschitz

    def _activation_scale(self, logits: torch.Tensor, inputs: torch.Tensor | float | None) -> torch.Tensor:
        """L ||x|| per sample (float64, on the logits' device) for the float slack; 0 where the
        inputs are not known."""
        norms = input_norms(0.0 if inputs is None else inputs, logits.shape[0])
        return (self.lipschitz * norms).to(logits.device)

    def _check_labelled(self, logits: torch.Tensor, labels: torch.Tensor, where: str) -> torch.Tensor:
        check_logits(logits, where)
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.numel() != logits.shape[0]:
            raise ValueError(f"{where}: {logits.shape[0]} rows of logits but {labels.numel()} labels")
        return check_labels(labels, logits.shape[1], where)

    # -- calibration
    def calibrate(self, loader: Iterable) -> ConformalClassifier:
        """Score the calibration data (clean inputs, held out from training). Keeps the logits so
        that thresholds for other eps (robust calibration) cost no further forward pass."""
        z, y, norms = self._collect(loader, "calibrate")
        return self.calibrate_logits(z, y, inputs=norms)

    def calibrate_logits(self, logits: torch.Tensor, labels: torch.Tensor, *,
                         inputs: torch.Tensor | float | None = None) -> ConformalClassifier:
        """As :meth:`calibrate`, from precomputed (clean) logits. ``inputs``: the inputs they came
        from, or bounds on their L2 norms, so that the float slack covers the activations (see
        :func:`lipnet.certify.certified_radius`); without them it covers the logits' scale only."""
        labels = self._check_labelled(logits, labels, "calibrate_logits")
        if logits.shape[0] < min_calibration_size(self.alpha):
            raise ValueError(f"calibration set too small for alpha={self.alpha}: got n={logits.shape[0]}, "
                             f"need n >= {min_calibration_size(self.alpha)}")
        scale = self._activation_scale(logits, inputs)
        self._calibration = (logits.detach().double().cpu(), labels.cpu(), self._u(logits.shape[0]), scale.cpu())
        self._quantiles = {}
        return self

    def quantile(self, eps: float | None = None) -> float:
        """q_hat for sets robust to ``eps`` (default: ``self.eps``): the clean calibration quantile
        in inference mode; the quantile of the calibration points' upper scores in calibration mode."""
        if self._calibration is None:
            raise RuntimeError("call calibrate(loader) first")
        eps = self.eps if eps is None else _check_eps(eps)
        key = eps if self.mode == "calibration" else 0.0
        if key not in self._quantiles:
            z, y, u, scale = self._calibration
            _, upper = score_bounds(z, self._radius(key), self.score, self.temperature, u, self.bound,
                                    activation_scale=scale)
            self._quantiles[key] = conformal_quantile(upper.gather(1, y[:, None])[:, 0], self.alpha)
        return self._quantiles[key]

    # -- prediction
    def sets_from_logits(self, logits: torch.Tensor, eps: float | None = None,
                         u: torch.Tensor | None = None, *, inputs: torch.Tensor | float | None = None) -> torch.Tensor:
        """Boolean (batch, classes) prediction sets from logits of the (possibly attacked) inputs.
        ``inputs``: those inputs or bounds on their norms, for the float slack (as in
        :meth:`calibrate_logits`). NaN or inf logits are refused (they would give empty sets)."""
        check_logits(logits, "sets_from_logits")
        eps = self.eps if eps is None else _check_eps(eps)
        u = self._u(logits.shape[0]) if u is None else u
        scale = self._activation_scale(logits, inputs)
        return self._rule_scores(logits, eps, u, scale) <= self.quantile(eps)

    def _rule_scores(self, logits: torch.Tensor, eps: float, u: torch.Tensor,
                     activation_scale: torch.Tensor | float = 0.0) -> torch.Tensor:
        """The scores the set rule compares with q_hat: plain scores in calibration mode and at
        eps = 0, the lower score bounds over the eps-ball in inference mode."""
        u = u.to(logits.device)
        if self.mode == "calibration" or eps == 0:
            return class_scores(logits, self.score, self.temperature, u)
        return score_bounds(logits, self._radius(eps), self.score, self.temperature, u, self.bound,
                            activation_scale=activation_scale)[0]

    def predict_sets(self, x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
        """Prediction sets for inputs ``x`` (clean or attacked), robust to ``eps`` (default self.eps)."""
        return self.sets_from_logits(self.logits(x), eps, inputs=x).cpu()

    def attack_objective(self, eps: float | None = None, u: torch.Tensor | None = None
                         ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Differentiable objective an attacker maximizes to push the true label out of the set:
        the label's score as the set rule compares it to q_hat, minus q_hat (> 0: excluded)."""
        eps = self.eps if eps is None else _check_eps(eps)
        q = self.quantile(eps)

        def objective(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            uu = torch.ones(len(y), dtype=torch.float64) if u is None else u
            return self._rule_scores(logits, eps, uu).gather(1, y[:, None])[:, 0] - q
        return objective

    def evaluate(self, loader: Iterable, *, eps: float | None = None, attack: str | Callable | None = None,
                 attack_eps: float | None = None, attack_steps: int = 20,
                 clamp: tuple[float, float] | None = (0.0, 1.0)) -> ConformalReport:
        """Coverage and set sizes on (x, y) batches, optionally attacked.

        ``attack="pgd"``: L2 PGD of budget ``attack_eps`` (default: ``eps``) maximizing the true
        label's score against the set rule (:meth:`attack_objective`), inputs clamped to ``clamp``.
        A callable ``attack(model, x, y) -> x_adv`` is used as is (its budget is the caller's).
        """
        eps = self.eps if eps is None else _check_eps(eps)
        attack_eps = eps if attack_eps is None else _check_eps(attack_eps)
        if attack not in (None, "pgd") and not callable(attack):
            raise ValueError(f"attack must be None, 'pgd' or a callable, got {attack!r}")
        covered, sizes = [], []
        for batch in progress_bar(loader, desc="conformal", enabled=self.progress, leave=False):
            x, y = split_batch(batch)
            if y is None:
                raise ValueError("evaluate needs (inputs, labels) batches")
            x, y = x.to(self.device), y.reshape(-1).long().to(self.device)
            check_finite(x)
            u = self._u(len(y))
            if self._calibration is not None:
                check_labels(y, self._calibration[0].shape[1], "evaluate")
            if attack == "pgd" and attack_eps > 0:
                x = pgd_l2(self.model, x, y, attack_eps, attack_steps, loss=self.attack_objective(eps, u), clamp=clamp)
            elif callable(attack):
                x = attack(self.model, x, y)
            sets = self.sets_from_logits(self.logits(x), eps, u, inputs=x).cpu()
            covered.append(sets.gather(1, y.cpu()[:, None])[:, 0])
            sizes.append(sets.sum(1))
        if not sizes:
            raise ValueError("evaluate: the loader is empty")
        cov, size = torch.cat(covered).double(), torch.cat(sizes).double()
        return ConformalReport(n=len(size), eps=eps, attack_eps=attack_eps if attack is not None else 0.0,
                               coverage=float(cov.mean()), mean_size=float(size.mean()),
                               median_size=float(size.median()), singleton_rate=float((size == 1).double().mean()),
                               empty_rate=float((size == 0).double().mean()))

    # -- what vanilla CP keeps under attack
    def fit_coverage_bound(self, holdout: Iterable, delta: float = 0.05) -> ConformalClassifier:
        """Prepare :meth:`vanilla_coverage_lower_bound` from hold-out (x, y) data that is
        independent of the calibration set (per point: the radius up to which the vanilla set
        provably keeps its label, :func:`coverage_radii`)."""
        open_unit(delta, "delta")
        if self._calibration is None:
            raise RuntimeError("call calibrate(loader) first")
        z, y, norms = self._collect(holdout, "hold-out")
        return self.fit_coverage_bound_logits(z, y, delta=delta, inputs=norms)

    def fit_coverage_bound_logits(self, logits: torch.Tensor, labels: torch.Tensor,
                                  delta: float = 0.05, *, inputs: torch.Tensor | float | None = None
                                  ) -> ConformalClassifier:
        """As :meth:`fit_coverage_bound`, from precomputed hold-out logits (``inputs`` as in
        :meth:`calibrate_logits`)."""
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        labels = self._check_labelled(logits, labels, "fit_coverage_bound_logits")
        q = self.quantile(0.0)  # the vanilla threshold, in both modes
        z, y = logits.detach().double().cpu(), labels.cpu()
        scale = self._activation_scale(logits, inputs).cpu()
        self._coverage_radii = coverage_radii(z, y, q, self.lipschitz, self.score, self.temperature, self._u(len(y)),
                                              activation_scale=scale)
        self._coverage_delta = float(delta)
        return self

    def vanilla_coverage_lower_bound(self, eps: float | Sequence[float]) -> float | np.ndarray:
        """Coverage that the *vanilla* (eps = 0) sets keep under any L2 attack of size eps.

        With probability >= 1 - delta over the hold-out draw (given the calibration set), for
        every eps simultaneously: P(y in C_vanilla(x + delta) for all ||delta|| <= eps) >= returned
        value (:func:`simultaneous_miss_upper_bound`). At eps = 0 it is a (weaker) finite-sample
        version of the usual 1 - alpha.
        """
        if self._coverage_radii is None:
            raise RuntimeError("call fit_coverage_bound(holdout_loader) first")
        lower = 1.0 - simultaneous_miss_upper_bound(self._coverage_radii, eps, self._coverage_delta)
        return float(lower[0]) if np.ndim(eps) == 0 else lower
