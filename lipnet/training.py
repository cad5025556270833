"""Training loop, dataset presets and checkpoints for the ``lipnet`` command (and for users)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .certify import certified_accuracy, network_lipschitz_bound
from .distributed import DistributedContext, all_reduce_mean, wrap_ddp
from .models import build_model
from .modes import training_mode
from .nn import ClippedLossGradient, LipschitzCrossEntropy


@dataclass
class Preset:
    """Per-dataset defaults: the model, its config, the certification radii to report, training."""

    model: str
    model_config: dict
    eval_eps: tuple[float, ...]
    epochs: int
    batch_size: int
    lr: float
    offset: float       # LipschitzCrossEntropy offset: asks for margin `offset`, radius offset/sqrt(2) at L=1
    temperature: float
    augment: bool


PRESETS: dict[str, Preset] = {
    "mnist": Preset("mnist-convnet", {"mean": (0.1307,)}, (0.5, 1.0, 1.58), 10, 256, 2e-3, 2.5, 0.25, False),
    "fashion-mnist": Preset("mnist-convnet", {"mean": (0.2860,)}, (0.1, 0.5, 1.0), 10, 256, 2e-3, 1.0, 0.25, False),
    "cifar10": Preset("cifar-liresnet", {"mean": (0.4914, 0.4822, 0.4465)}, (36 / 255, 72 / 255, 108 / 255),
                      100, 256, 1e-3, 0.3, 0.125, True),
}


@dataclass
class PrivatePreset:
    """Defaults of ``lipnet train --dp`` per dataset and model: the model's config (no batch-coupled
    layers), the expected (Poisson) batch size, the input ball radius X (raw pixels), the optimizer,
    the noise calibration and which layers train."""

    model_config: dict
    batch_size: int
    lr: float
    epochs: int
    input_bound: float
    offset: float
    temperature: float
    optimizer: str = "sgd"
    momentum: float = 0.9
    noise: str = "per_layer"
    trainable: str = "dense"
    freeze_bias: bool = True
    loss_clip: float | None = None   # ClippedLossGradient: per-sample logit-gradient norm (None: the loss' own bound)


# MNIST / Fashion-MNIST: raw pixels have ||x|| <= 28, so the raw projection is a no-op; the model's own
# L2BallProjection(8) after the mean subtraction bounds what the first layer (or the scattering) sees.
# scatter-net (the default): fixed Scattering2d features + a linear head trained with the cross-entropy
# (temperature 1); chosen on a held-out part of the MNIST train split, benchmarks/privacy.py --arch scatter --tune.
# mnist-convnet: the convolutions keep their random orthogonal initialization (trainable="dense": their
# analytic gradient bounds are 25-40x their actual per-sample norms, so noise calibrated to them drowns their
# gradients; held-out 85.2% vs 81.3% for the best all-layer setting, benchmarks/privacy.py --tune).
_SCATTER_DP = {"input_radius": 8.0, "J": 2, "L": 8, "head": "plain"}
_MNIST_DP = {"centering": "none", "width": 8, "hidden": 128, "input_radius": 8.0}
PRIVATE_PRESETS: dict[str, dict[str, PrivatePreset]] = {
    dataset: {
        "scatter-net": PrivatePreset({"mean": mean, **_SCATTER_DP}, 4096, 0.5, 20, 28.0, 0.0, 1.0, trainable="all"),
        "mnist-convnet": PrivatePreset({"mean": mean, **_MNIST_DP}, 1024, 0.2, 15, 28.0, 0.0, 0.1),
    } for dataset, mean in (("mnist", (0.1307,)), ("fashion-mnist", (0.2860,)))
}
# CIFAR-10: raw pixels have ||x|| <= sqrt(3 * 32 * 32) < 55.5. scatter-net (the default): chosen on a held-out
# part of the CIFAR-10 train split at eps=1: cross-entropy with its logit gradient clipped to 0.25
# (ClippedLossGradient: every example not yet fitted sends the gradient norm the noise is calibrated to), lr 1
# (54.02% held-out vs 52.33% for the best unclipped loss, temperature 0.1 with offset 3; at eps=3 lr 4 was best;
# benchmarks/results/privacy_tune_scatter_cifar10.md). cifar-liresnet: not tuned (no GPU run yet), the MNIST CNN recipe.
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
PRIVATE_PRESETS["cifar10"] = {
    "scatter-net": PrivatePreset({"mean": _CIFAR_MEAN, "in_channels": 3, "image_size": 32, **_SCATTER_DP}, 4096, 1.0,
                                 20, 55.5, 0.0, 1.0, trainable="all", loss_clip=0.25),
    "cifar-liresnet": PrivatePreset({"mean": _CIFAR_MEAN, "centering": "none", "width": 32, "blocks": (1, 1, 1)}, 2048,
                                    0.2, 30, 56.0, 0.0, 0.1),
}


def private_loss(temperature: float, offset: float, loss_clip: float | None = None) -> nn.Module:
    """``LipschitzCrossEntropy(temperature, offset)``; with ``loss_clip`` its per-sample logit gradient is
    clipped to that norm (:class:`lipnet.nn.ClippedLossGradient`), the bound the noise is then calibrated to
    instead of the loss' sqrt(2)."""
    loss = LipschitzCrossEntropy(temperature=temperature, offset=offset)
    return ClippedLossGradient(loss, loss_clip) if loss_clip else loss


def private_trainable(model: nn.Module, trainable: str = "dense", freeze_bias: bool = True) -> list[nn.Parameter]:
    """Freeze what private training leaves alone; returns the parameters that still train.
    ``trainable="dense"``: every convolution keeps its current (e.g. random orthogonal) weights;
    ``"all"``: nothing frozen. ``freeze_bias``: biases are zeroed and frozen. Frozen tensors release
    nothing, so they need no gradient bound and no noise."""
    if trainable not in ("dense", "all"):
        raise ValueError(f"trainable must be 'dense' or 'all', got {trainable!r}")
    from .nn import OrthoConv2d

    if trainable == "dense":
        for m in model.modules():
            if isinstance(m, (OrthoConv2d, nn.Conv2d, nn.ConvTranspose2d)):
                m.requires_grad_(False)
    if freeze_bias:
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                with torch.no_grad():
                    p.zero_()
                p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


@dataclass
class TrainConfig:
    """Everything needed to re-run a training job (stored in the checkpoint)."""

    dataset: str
    epochs: int
    batch_size: int
    lr: float
    offset: float
    temperature: float
    augment: bool
    model: str
    model_config: dict = field(default_factory=dict)
    eval_eps: tuple[float, ...] = ()
    seed: int = 0
    limit: int | None = None
    # private training: {"epsilon", "delta", "input_bound", "accountant", "noise"}; None = not private
    dp: dict | None = None

    @classmethod
    def from_preset(cls, dataset: str, private: bool = False, model: str | None = None, **overrides) -> TrainConfig:
        """The dataset's preset; ``private``: its private preset for ``model`` (default: the first listed
        in ``PRIVATE_PRESETS[dataset]``); keyword overrides (None = keep the preset's)."""
        if dataset not in PRESETS:
            raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(PRESETS)}")
        p = asdict(PRESETS[dataset])
        if private:
            models = PRIVATE_PRESETS[dataset]
            model = model or next(iter(models))
            if model not in models:
                raise ValueError(f"no private preset for model {model!r} on {dataset}; known: {sorted(models)}")
            q = models[model]
            p.update(model=model, model_config=dict(q.model_config), batch_size=q.batch_size, lr=q.lr,
                     epochs=q.epochs, offset=q.offset, temperature=q.temperature, augment=False,
                     # private models have small margins: report certificates at smaller radii
                     eval_eps=tuple(e / 5 for e in p["eval_eps"]),
                     dp={"input_bound": q.input_bound, "noise": q.noise, "optimizer": q.optimizer,
                         "momentum": q.momentum, "trainable": q.trainable, "freeze_bias": q.freeze_bias,
                         "loss_clip": q.loss_clip})
        elif model is not None and model != p["model"]:
            p.update(model=model, model_config={"mean": p["model_config"]["mean"]})
        p.update({k: v for k, v in overrides.items() if v is not None})
        return cls(dataset=dataset, **p)


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip, per sample, on a batch tensor."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b, 1), generator=generator).to(x.device)
    rows = dy + torch.arange(h, device=x.device)                      # (b, h)
    cols = dx + torch.arange(w, device=x.device)                      # (b, w)
    flip = (torch.rand(b, 1, generator=generator) < 0.5).to(x.device)
    cols = torch.where(flip, cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                scheduler=None, device: str | torch.device = "cpu", augment: bool = False,
                generator: torch.Generator | None = None, progress: bool = True, desc: str = "train") -> float:
    """One pass over ``loader``; returns the mean training loss. NaN/inf loss -> RuntimeError."""
    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    for x, y in bar:
        if augment:
            x = augment_batch(x, generator)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = loss_fn(model(x), y)
        if not torch.isfinite(loss):
            raise RuntimeError(f"training diverged: loss = {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total, count = total + loss.item() * len(y), count + len(y)
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1)


def fit(model: nn.Module, train_loader, test_loader, config: TrainConfig, device: str | torch.device = "cpu",
        progress: bool = True, log: Callable[[str], None] = print,
        dist_ctx: DistributedContext | None = None) -> list[dict]:
    """Adam + one-cycle schedule on ``LipschitzCrossEntropy(temperature, offset)``; after each epoch,
    clean and certified accuracy on ``test_loader`` at ``config.eval_eps``. Returns the history.

    Multi-process (``dist_ctx.world_size > 1``): ``train_loader`` must give this rank's share of
    every global batch (``lipnet.distributed.ShardedBatchLoader``); the model trains under DDP
    (gradients averaged: a step uses the whole global batch), the logged loss is the mean over
    ranks, and only rank 0 evaluates, logs and shows progress (the history is rank 0's)."""
    distributed = dist_ctx is not None and dist_ctx.world_size > 1
    main = not distributed or dist_ctx.is_main
    forward = wrap_ddp(model, dist_ctx) if distributed else model
    loss_fn = LipschitzCrossEntropy(temperature=config.temperature, offset=config.offset)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps = config.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps, pct_start=0.2)
    generator = torch.Generator().manual_seed(config.seed + (dist_ctx.rank if distributed else 0))  # augmentation
    history = []
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        loss = train_epoch(forward, train_loader, optimizer, loss_fn, scheduler, device, config.augment, generator,
                           progress and main, desc=f"epoch {epoch}/{config.epochs}")
        loss = all_reduce_mean(loss) if distributed else loss
        seconds = time.perf_counter() - start
        if not main:
            continue
        report = certified_accuracy(model, test_loader, config.eval_eps, device=device)
        row = {"epoch": epoch, "loss": loss, "train_seconds": seconds, "clean": report.clean,
               "certified": report.certified, "lipschitz_bound": report.lipschitz_bound}
        history.append(row)
        certs = "  ".join(f"cert@{e:.3g} {a:.2%}" for e, a in report.certified.items())
        log(f"epoch {epoch}/{config.epochs}  loss {loss:.4f}  clean {report.clean:.2%}  {certs}  "
            f"L<={report.lipschitz_bound:.5f}  ({seconds:.0f}s)")
    return history


@torch.no_grad()
def frozen_test_features(prefix: nn.Module, loader: Iterable, device: str | torch.device = "cpu"
                         ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(prefix(x), y)]`` for the batches of ``loader``, the prefix in eval mode (as certification
    runs the model), kept on ``device``: ``head(prefix(x)) == model(x)`` for a Sequential split by
    :func:`lipnet.privacy.split_frozen_prefix`, so per-epoch evaluation can run the head alone."""
    with training_mode(prefix, False):
        return [(prefix(x.to(device)), y.to(device)) for x, y in loader]


def fit_private(model: nn.Module, train_set, test_loader, config: TrainConfig, device: str | torch.device = "cpu",
                progress: bool = True, log: Callable[[str], None] = print, evaluate: bool = True) -> list[dict]:
    """Clipping-free DP-SGD (``lipnet.privacy.PrivateTrainer``) on ``LipschitzCrossEntropy``: Poisson
    batches of expected size ``config.batch_size``, noise calibrated to spend ``config.dp["epsilon"]``
    at ``config.dp["delta"]`` over ``config.epochs``; ``config.dp`` also names the optimizer ("sgd"
    with ``momentum`` or "adam"), the noise calibration, the trainable layers
    (:func:`private_trainable`) and ``loss_clip`` (if set, the loss' per-sample logit gradient is
    clipped to that norm, :class:`lipnet.nn.ClippedLossGradient`, and the noise calibrated to it).
    After each epoch: epsilon spent so far (the accountant), clean and certified test accuracy
    (``evaluate=False``: no evaluation, e.g. on ranks other than 0 of a multi-process run)."""
    from .privacy import PrivateTrainer, epoch_row, precompute_frozen_prefix, split_frozen_prefix

    dp = config.dp
    if not 0 < config.batch_size <= len(train_set):
        raise ValueError(f"expected batch size {config.batch_size} must be in [1, {len(train_set)}] (the training set)")
    loss_fn = private_loss(config.temperature, config.offset, dp.get("loss_clip"))
    params = private_trainable(model, dp.get("trainable", "all"), dp.get("freeze_bias", False))
    if dp.get("optimizer", "adam") == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=dp.get("momentum", 0.0))
    else:
        optimizer = torch.optim.Adam(params, lr=config.lr)
    trained, data, input_bound, input_shape = model, train_set, dp["input_bound"], None
    eval_model, eval_batches = model, test_loader
    precompute = dp.get("precompute", True) and isinstance(model, nn.Sequential)
    prefix = split_frozen_prefix(model)[0] if precompute else ()
    if len(prefix):
        # the frozen leading layers (scattering, frozen convs) run once per example, not once per step
        frozen = precompute_frozen_prefix(model, train_set, dp["input_bound"], device=device, progress=progress)
        trained, data, input_bound, input_shape = frozen.head, frozen.dataset, frozen.bound, frozen.shape
        log(f"frozen prefix computed once: features {frozen.shape}, norm <= {frozen.bound:.4g}")
        if evaluate:  # and once per test image: each epoch's evaluation runs the head only
            eval_model, eval_batches = frozen.head, frozen_test_features(prefix, test_loader, device)
    trainer = PrivateTrainer(trained, optimizer, data, loss=loss_fn, input_bound=input_bound, input_shape=input_shape,
                             target_epsilon=dp["epsilon"], target_delta=dp["delta"], epochs=config.epochs,
                             sample_rate=config.batch_size / len(train_set), accountant=dp["accountant"],
                             noise=dp["noise"], device=device, seed=config.seed, progress=progress)
    log(trainer.describe())
    history = []
    for _ in range(config.epochs):
        row = epoch_row(trainer.train_epoch())
        if not evaluate:
            history.append(row)
            continue
        # radii in input space: the whole model's bound (prefix included), whichever part is evaluated
        report = certified_accuracy(eval_model, eval_batches, config.eval_eps, device=device,
                                    lipschitz=network_lipschitz_bound(model))
        row.update(clean=report.clean, certified=report.certified, lipschitz_bound=report.lipschitz_bound,
                   train_seconds=row["seconds"])
        history.append(row)
        certs = "  ".join(f"cert@{e:.3g} {a:.2%}" for e, a in report.certified.items())
        log(f"epoch {row['epoch']}/{config.epochs}  eps spent {row['epsilon']:.3f} (delta {row['delta']:g})  "
            f"loss {row['loss']:.4f}  clean {report.clean:.2%}  {certs}  C={row['sensitivity']:.3g}  "
            f"({row['seconds']:.0f}s, {row['samples_per_s']:.0f} samples/s)")
    return history


CHECKPOINT = "checkpoint.pt"


def save_checkpoint(out: str | Path, model: nn.Module, config: TrainConfig, history: Sequence[dict] = ()) -> Path:
    """Write ``out/checkpoint.pt`` (state_dict + config to rebuild the model) and ``out/config.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = asdict(config)
    torch.save({"config": cfg, "state_dict": model.state_dict(), "history": list(history)}, out / CHECKPOINT)
    (out / "config.json").write_text(json.dumps({"config": cfg, "history": list(history)}, indent=2, default=str))
    return out / CHECKPOINT


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig, list[dict]]:
    """Rebuild the model of a checkpoint written by :func:`save_checkpoint` (a directory or the file)."""
    path = Path(path)
    file = path / CHECKPOINT if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {file} (expected the directory written by `lipnet train --out`)")
    ckpt = torch.load(file, map_location=map_location, weights_only=False)
    cfg = ckpt["config"]
    cfg["eval_eps"] = tuple(cfg.get("eval_eps", ()))
    config = TrainConfig(**cfg)
    model = build_model(config.model, **config.model_config)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(map_location).eval(), config, ckpt.get("history", [])


def format_table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
    """Plain-text table (right-aligned numbers)."""
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


__all__ = ["PRESETS", "PRIVATE_PRESETS", "Preset", "PrivatePreset", "TrainConfig", "augment_batch", "fit",
           "fit_private", "format_table", "load_checkpoint", "private_trainable",
           "save_checkpoint", "train_epoch"]
