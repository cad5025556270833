"""Clipping-free DP-SGD: the ordinary batched backward pass plus Gaussian noise scaled to an
analytic per-sample gradient bound. No per-sample gradients, no clipping.

One step, on a Poisson batch B (each example independently with probability q):

    x_i <- x_i * min(1, X / ||x_i||)                    inputs projected onto the ball of radius X
    C_t  = gradient_norm_bounds(model, X, loss)         sound bound on one sample's gradient, from
                                                        the weights in use at this step
    G    = sum_{i in B} grad loss_i + N(0, sigma^2 C_t^2 I)   (effective tensors, see sensitivity.py)
    raw parameters get J^T G / (q n); optimizer.step()  (post-processing of G)
    accountant.step(noise_multiplier=sigma, sample_rate=q)

Why this is (eps, delta)-DP: adding or removing one example changes sum_i grad loss_i by at most
C_t in L2 norm (the bound holds for every sample, with the examples not interacting: layers that
mix samples, like BatchCentering, are refused). C_t is a function of the current weights only,
which are themselves post-processing of earlier releases, so each step is the sampled Gaussian
mechanism with noise multiplier sigma, exactly what opacus' RDP / PRV accountants compose. The
division by the *expected* batch size q n (not the realized, private one) and every optimizer
(momentum, Adam) are post-processing. Noise comes from torch's PRNG (opacus' default, non-secure
mode); the logged training loss is computed on private data and is not privatized.

Multi-process (``torch.distributed`` initialized, W ranks): every rank draws the same global
Poisson mask and keeps its share, adds independent noise of std sigma C / sqrt(W) (the sum over
ranks is N(0, sigma^2 C^2 I): the noise of one step, added once in distribution), and the raw
gradients are summed over ranks before the step, so all ranks hold identical weights (rank 0's are
broadcast at construction).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.nn.utils import parametrize
from lipnet.progress import progress_bar

from lipnet.data import ImageDataset
from lipnet.distributed import world
from lipnet.nn import L2BallProjection
from lipnet.validate import finite_positive

from .moments import GaussianRelease
from .sampling import poisson_loader
from .sensitivity import SensitivityReport, gradient_norm_bounds, loss_lipschitz

ACCOUNTANTS = ("rdp", "prv")
# opacus' RDP accountant warns when the best order is its largest alpha: the epsilon it returns is
# then a valid but not the tightest bound (larger orders could lower it) -- conservative, so muted.
_RDP_ORDER_WARNING = "Optimal order is the largest alpha"
NOISE_MODES = ("global", "per_layer", "min_energy")


def noise_stds(bounds: Sequence[float], sizes: Sequence[int], noise_multiplier: float, mode: str) -> list[float]:
    """The Gaussian noise std of each effective tensor, given its sensitivity bound C_k (one sample's
    gradient norm bound) and its number of entries d_k, such that the whitened sensitivity
    sqrt(sum_k C_k^2 / std_k^2) is exactly 1 / ``noise_multiplier`` -- the mechanism the accountant
    composes -- whatever the ``mode``:

    * ``"global"``: std sigma C on every tensor, C = sqrt(sum_k C_k^2);
    * ``"per_layer"``: std sigma sqrt(K) C_k on tensor k of K;
    * ``"min_energy"``: the stds minimizing the total noise energy sum_k d_k std_k^2 under that
      constraint (Lagrange): std_k^2 = sigma^2 S C_k / sqrt(d_k), S = sum_j C_j sqrt(d_j).
    """
    if mode not in NOISE_MODES:
        raise ValueError(f"noise mode must be one of {NOISE_MODES}, got {mode!r}")
    sigma = noise_multiplier
    if mode == "global":
        return [sigma * math.sqrt(sum(c * c for c in bounds))] * len(bounds)
    if mode == "per_layer":
        return [sigma * math.sqrt(len(bounds)) * c for c in bounds]
    total = sum(c * math.sqrt(d) for c, d in zip(bounds, sizes))
    return [sigma * math.sqrt(total * c / math.sqrt(d)) for c, d in zip(bounds, sizes)]


def check_privacy_params(target_epsilon: float | None, target_delta: float, n: int) -> None:
    """epsilon > 0 and finite; 0 < delta < 1/n (delta >= 1/n admits releasing one random example in
    the clear, so it is refused, not warned about)."""
    if target_epsilon is not None and not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon!r}")
    if not (0 < target_delta < 1):
        raise ValueError(f"target_delta must be in (0, 1), got {target_delta!r}")
    if target_delta >= 1 / n:
        raise ValueError(f"target_delta={target_delta:g} >= 1/n = {1 / n:g} for n={n} training examples: such a "
                         "delta allows publishing a random example in the clear; use delta << 1/n (e.g. 1e-5)")


def calibrate_noise_multiplier(target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
                               accountant: str = "rdp", prior_releases: Sequence[GaussianRelease] = (),
                               epsilon_tolerance: float = 0.01) -> float:
    """The noise multiplier sigma whose ``steps`` Poisson-subsampled Gaussian steps at ``sample_rate``,
    composed after ``prior_releases``, spend at most ``target_epsilon`` at ``target_delta`` (opacus'
    accountant on the whole history), within ``epsilon_tolerance`` below it. Without prior releases
    this is opacus' ``get_noise_multiplier``, unchanged."""
    # np.errstate: opacus' PRV takes log(1 - q) = -inf for a full-data release (q = 1), harmlessly
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.filterwarnings("ignore", message=_RDP_ORDER_WARNING)
        if not prior_releases:
            return get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                        sample_rate=sample_rate, steps=steps, accountant=accountant,
                                        epsilon_tolerance=epsilon_tolerance)
        prior = [r.as_history() for r in prior_releases]
        acct = create_accountant(accountant)

        def spent(sigma: float) -> float:
            acct.history = [*prior, (sigma, sample_rate, steps)]
            return float(acct.get_epsilon(delta=target_delta))

        acct.history = prior
        if float(acct.get_epsilon(delta=target_delta)) >= target_epsilon:
            raise ValueError(f"the prior releases alone spend epsilon >= {target_epsilon:g} at delta={target_delta:g}; "
                             "raise their noise multiplier or the budget")
        low, high = 0.0, 10.0
        while spent(high) > target_epsilon:  # bracket, then bisect, as opacus does
            high *= 2
            if high > 2 ** 20:
                raise ValueError("The privacy budget is too low.")
        eps_high = spent(high)
        while target_epsilon - eps_high > epsilon_tolerance:
            mid = (low + high) / 2
            eps = spent(mid)
            if eps < target_epsilon:
                high, eps_high = mid, eps
            else:
                low = mid
        return high


def _input_shape(data) -> tuple[int, ...]:
    dataset = getattr(data, "dataset", data)
    if isinstance(dataset, ImageDataset):
        return tuple(dataset.images.shape[1:])
    first = dataset[0][0]
    return tuple(torch.as_tensor(first).shape)


def _sum_reduced(loss: nn.Module) -> nn.Module:
    if not hasattr(loss, "reduction"):
        raise TypeError(f"loss {type(loss).__name__} has no `reduction`; private training needs the per-sample sum")
    summed = copy.copy(loss)
    summed.reduction = "sum"
    return summed


@dataclass
class EpochReport:
    epoch: int
    steps: int               # total steps so far
    samples: int             # examples drawn this epoch (Poisson: random)
    loss: float              # mean training loss of the epoch (not privatized)
    epsilon: float           # privacy spent so far, at delta
    delta: float
    noise_multiplier: float
    sample_rate: float
    sensitivity: float       # C_t of the last step (bound on one sample's gradient norm)
    seconds: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


class PrivateTrainer:
    """Differentially private training of a Lipschitz network without per-sample gradients.

    Args:
        model: a model accepted by :func:`gradient_norm_bounds` (checked here, before any step).
        optimizer: any torch optimizer over ``model``'s parameters (its update is post-processing).
        data: the training data: lipnet ``ImageDataset`` / ``BatchLoader`` or a torch ``DataLoader``;
            it is re-sampled with Poisson sampling (:func:`poisson_loader`).
        loss: per-sample loss with a Lipschitz constant w.r.t. the logits.
        input_bound: X; every input is projected onto the L2 ball of radius X (raw units).
        target_epsilon, epochs: calibrate sigma with opacus' ``get_noise_multiplier`` so that
            ``epochs`` epochs (``epochs * len(loader)`` steps) spend ``target_epsilon`` at
            ``target_delta``; or pass ``noise_multiplier`` directly (then epsilon is only tracked).
        sample_rate: q (default: batch_size / n of a loader; required for a bare dataset).
        accountant: ``"rdp"`` or ``"prv"`` (opacus).
        noise: ``"global"`` (std sigma C on every coordinate, C = sqrt(sum_k C_k^2)) or
            ``"per_layer"`` (std sigma sqrt(K) C_k on tensor k of K; the whitened sensitivity is
            sqrt(sum_k C_k^2 / (sigma^2 K C_k^2)) = 1/sigma, the same mechanism strength), or
            ``"min_energy"`` (std_k^2 = sigma^2 (sum_j C_j sqrt(d_j)) C_k / sqrt(d_k) for a tensor of d_k
            entries: the least total noise energy at whitened sensitivity 1/sigma).
        prior_releases: mechanisms already run on the same training data (e.g. the private
            normalization statistics of :func:`private_channel_moments`); they open the accountant's
            history, so sigma is calibrated for the rest of ``target_epsilon`` and ``epsilon()``
            reports the composition of all of them.

    Guarantee: after T steps the training is (``epsilon()``, ``target_delta``)-DP w.r.t. adding or
    removing one training example (opacus' accountant on the prior releases followed by
    (sigma, q, T)), under the assumptions of the module docstring. Unsupported layers or losses raise ``TypeError`` in the constructor.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, data, *, loss: nn.Module,
                 input_bound: float, target_delta: float, target_epsilon: float | None = None,
                 epochs: int | None = None, noise_multiplier: float | None = None,
                 sample_rate: float | None = None, input_shape: Sequence[int] | None = None,
                 accountant: str = "rdp", noise: str = "global", device: str | torch.device = "cpu",
                 seed: int = 0, progress: bool = True, prior_releases: Sequence[GaussianRelease] = ()) -> None:
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        self.model, self.optimizer, self.device, self.progress = model, optimizer, device, progress
        self.rank, self.world_size = world()
        self.sampling_generator = torch.Generator().manual_seed(seed)
        self.loader, self.sample_rate = poisson_loader(data, sample_rate, device=device,
                                                       generator=self.sampling_generator,
                                                       rank=self.rank, world_size=self.world_size)
        self.n = len(self.loader.dataset)
        check_privacy_params(target_epsilon, target_delta, self.n)
        self.delta, self.noise_mode, self.accountant_name = float(target_delta), noise, accountant
        self.projection = L2BallProjection(input_bound)
        self.input_bound = float(input_bound)
        self.loss = loss
        self.summed_loss = _sum_reduced(loss)
        self.loss_lipschitz = loss_lipschitz(loss)
        self.input_shape = tuple(input_shape) if input_shape is not None else _input_shape(data)
        self.expected_batch_size = self.sample_rate * self.n
        self.planned_epochs = epochs
        self.prior_releases = tuple(prior_releases)
        for r in self.prior_releases:
            if not isinstance(r, GaussianRelease):
                raise TypeError(f"prior_releases must be GaussianRelease entries, got {type(r).__name__}")
            finite_positive(r.noise_multiplier, "prior release noise_multiplier")
            if not (0 < r.sample_rate <= 1 and r.steps >= 1):
                raise ValueError(f"prior release needs 0 < sample_rate <= 1 and steps >= 1, got {r}")
        if noise_multiplier is None:
            if target_epsilon is None or epochs is None:
                raise ValueError("give target_epsilon and epochs (sigma is calibrated), or noise_multiplier")
            if not (isinstance(epochs, int) and epochs > 0):
                raise ValueError(f"epochs must be a positive int, got {epochs!r}")
            noise_multiplier = calibrate_noise_multiplier(target_epsilon, target_delta, self.sample_rate,
                                                          epochs * len(self.loader), accountant, self.prior_releases)
        self.noise_multiplier = finite_positive(noise_multiplier, "noise_multiplier")
        self.target_epsilon = target_epsilon
        self.accountant = create_accountant(accountant)
        self.accountant.history = [r.as_history() for r in self.prior_releases]
        # independent noise per rank (its std is divided by sqrt(world_size) in _noise_stds)
        self.noise_generator = torch.Generator(device=device).manual_seed(seed + 1 + 7919 * self.rank)
        self.steps, self.epochs_done, self.last_sensitivity = 0, 0, float("nan")
        if self.world_size > 1:
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=0)
        self.sensitivity()  # unsupported layers / losses fail here, before any data is touched

    def sensitivity(self) -> SensitivityReport:
        """Per-tensor bounds of one sample's gradient at the current weights."""
        return gradient_norm_bounds(self.model, self.input_bound, self.loss, self.input_shape)

    def epsilon(self, delta: float | None = None) -> float:
        """Privacy spent so far (opacus accountant), at ``delta`` (default: the target delta)."""
        if not self.accountant.history:
            return 0.0
        with warnings.catch_warnings(), np.errstate(divide="ignore"):
            warnings.filterwarnings("ignore", message=_RDP_ORDER_WARNING)
            return float(self.accountant.get_epsilon(delta=delta or self.delta))

    def state_dict(self) -> dict:
        """What continues this run exactly: steps and epochs done, sigma and q, the accountant's
        history (opacus' ``state_dict``), and the states of the Poisson-sampling and noise generators
        (one noise state per rank, gathered to every rank: a collective under ``torch.distributed``).
        The optimizer's state is the caller's (``optimizer.state_dict()``)."""
        noise = self.noise_generator.get_state()
        if self.world_size > 1:
            gathered = [torch.empty_like(noise) for _ in range(self.world_size)]
            dist.all_gather_object(gathered, noise)
            noise_states = [t.clone() for t in gathered]
        else:
            noise_states = [noise]
        return {"steps": self.steps, "epochs_done": self.epochs_done, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "prior_releases": [r.as_history() for r in self.prior_releases],
                "accountant": dict(self.accountant.state_dict()),
                "sampling_generator": self.sampling_generator.get_state(), "noise_generators": noise_states}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`. The mechanism must be the one this trainer was built with
        (same sigma and q, as the same config calibrates them) and the accountant's history must
        account for every step done: otherwise ``ValueError``, since the epsilon reported after a
        resume would not be the privacy spent. Every noise generator continues where it stopped:
        restarting one would add the same noise twice."""
        for key in ("noise_multiplier", "sample_rate"):
            if not math.isclose(float(state[key]), getattr(self, key), rel_tol=1e-12):
                raise ValueError(f"resumed private run: its {key} {state[key]!r} differs from this trainer's "
                                 f"{getattr(self, key)!r}; a run resumes with the configuration it started with")
        prior = [tuple(r) for r in state.get("prior_releases", [])]
        if prior != [r.as_history() for r in self.prior_releases]:
            raise ValueError(f"resumed private run: its prior releases {prior} differ from this trainer's "
                             f"{[r.as_history() for r in self.prior_releases]}")
        history = [tuple(entry) for entry in state["accountant"]["history"]]
        accounted = sum(int(entry[2]) for entry in history[len(prior):])
        if history[:len(prior)] != prior or accounted != int(state["steps"]):
            raise ValueError(f"resumed private run: the accountant's history {history} does not hold the prior "
                             f"releases followed by the run's {state['steps']} steps; refusing a state whose epsilon "
                             "would be wrong")
        if len(state["noise_generators"]) != self.world_size:
            raise ValueError(f"resumed private run: saved by {len(state['noise_generators'])} process(es), resumed by "
                             f"{self.world_size}")
        self.accountant.load_state_dict(state["accountant"])
        self.steps, self.epochs_done = int(state["steps"]), int(state["epochs_done"])
        self.sampling_generator.set_state(state["sampling_generator"])
        self.noise_generator.set_state(state["noise_generators"][self.rank])

    def _noise_stds(self, report: SensitivityReport) -> list[float]:
        # each rank adds its share: the sum over ranks has the step's std
        return noise_stds([b.bound for b in report.bounds], [b.tensor().numel() for b in report.bounds],
                          self.noise_multiplier / math.sqrt(self.world_size), self.noise_mode)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One private step on a Poisson batch (possibly empty); returns the batch's summed loss."""
        model = self.model
        dtype = next(model.parameters()).dtype  # loaders give float32; a float64 model gets float64
        x, y = x.to(self.device, dtype=dtype), y.to(self.device)
        with parametrize.cached():  # each constrained weight computed once, shared by bound, noise and forward
            for m in model.modules():  # fill the cache with autograd-tracked weights first
                if parametrize.is_parametrized(m):
                    for name in m.parametrizations:
                        getattr(m, name)
            report = self.sensitivity()
            tensors = [b.tensor() for b in report.bounds]
            noises = [torch.randn(t.shape, generator=self.noise_generator, device=t.device, dtype=t.dtype) * std
                      for t, std in zip(tensors, self._noise_stds(report))]
            self.optimizer.zero_grad(set_to_none=True)
            roots, grads, loss_sum = list(tensors), list(noises), 0.0
            if len(y):
                loss = self.summed_loss(model(self.projection(x)), y)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"private training diverged: loss = {loss.item()}")
                roots.insert(0, loss)
                grads.insert(0, torch.ones_like(loss))
                loss_sum = float(loss.detach())
            # one backward: sum_i grad loss_i + noise at each effective tensor, then J^T to raw params
            torch.autograd.backward(roots, grads)
        params = [p for p in model.parameters() if p.grad is not None]
        if self.world_size > 1 and params:  # sum the ranks' J^T (G_r + N_r): one buffer, one all-reduce
            loss_t = torch.tensor([loss_sum], device=params[0].device, dtype=params[0].grad.dtype)
            flat = torch.cat([p.grad.reshape(-1) for p in params] + [loss_t])
            dist.all_reduce(flat)
            for p, g in zip(params, flat[:-1].split([p.numel() for p in params])):
                p.grad.copy_(g.view_as(p.grad))
            loss_sum = float(flat[-1])
        for p in params:
            p.grad.div_(self.expected_batch_size)
        self.optimizer.step()
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.steps += 1
        self.last_sensitivity = report.total
        return loss_sum

    def train_epoch(self) -> EpochReport:
        """One epoch = ``len(loader)`` Poisson steps; returns the privacy report so far."""
        self.model.train()
        start, total, count = time.perf_counter(), 0.0, 0
        bar = progress_bar(self.loader, desc=f"private epoch {self.epochs_done + 1}", enabled=self.progress, leave=False)
        for x, y in bar:
            total += self.step(x, y)  # summed over ranks
            count += len(y)
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}", C=f"{self.last_sensitivity:.3g}")
        self.epochs_done += 1
        if self.world_size > 1:
            counts = torch.tensor([float(count)], dtype=torch.float64)
            dist.all_reduce(counts)
            count = int(counts.item())
        return EpochReport(self.epochs_done, self.steps, count, total / max(count, 1), self.epsilon(), self.delta,
                           self.noise_multiplier, self.sample_rate, self.last_sensitivity,
                           time.perf_counter() - start)

    def describe(self) -> str:
        return (f"clipping-free DP-SGD: sigma={self.noise_multiplier:.4g}, q={self.sample_rate:.4g} "
                f"(expected batch {self.expected_batch_size:.1f} of n={self.n}), {len(self.loader)} steps/epoch, "
                f"delta={self.delta:g}, accountant={self.accountant_name}, noise={self.noise_mode}, "
                f"inputs projected to ||x|| <= {self.input_bound:g}, loss Lipschitz {self.loss_lipschitz:.4g}")


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, data_loader, target_epsilon: float,
                 target_delta: float, epochs: int, *, loss: nn.Module, input_bound: float, **kwargs) -> PrivateTrainer:
    """The opacus-style call: a :class:`PrivateTrainer` whose noise spends ``target_epsilon`` at
    ``target_delta`` over ``epochs`` epochs of Poisson batches with ``data_loader``'s expected batch
    size. Iterate ``trainer.train_epoch()``; ``trainer.epsilon()`` reports the budget spent."""
    return PrivateTrainer(model, optimizer, data_loader, loss=loss, input_bound=input_bound,
                          target_epsilon=target_epsilon, target_delta=target_delta, epochs=epochs, **kwargs)


def epoch_row(report: EpochReport) -> dict:
    row = asdict(report)
    row["samples_per_s"] = report.samples_per_s
    return row


__all__ = ["ACCOUNTANTS", "EpochReport", "calibrate_noise_multiplier", "NOISE_MODES", "PrivateTrainer", "check_privacy_params", "epoch_row",
           "make_private"]
