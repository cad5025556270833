"""Training loop, dataset presets and checkpoints for the ``lipnet`` command (and for users)."""

from __future__ import annotations

import contextlib
import inspect
import json
import numbers
import os
import pickle
import pickletools
import secrets
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .certify import certified_accuracy, network_lipschitz_bound
from .distributed import DistributedContext, all_gather_stack, all_reduce_mean, wrap_ddp
from .models import MODELS, build_model
from .modes import training_mode
from .nn import ClippedLossGradient, LipschitzCrossEntropy
from .nn.parametrizations import DEFAULT_PARAMETRIZATION


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
    amp: str | None = None  # mixed precision of the training steps (see amp_dtype)


PRESETS: dict[str, Preset] = {
    "mnist": Preset("mnist-convnet", {"mean": (0.1307,)}, (0.5, 1.0, 1.58), 10, 256, 2e-3, 2.5, 0.25, False),
    "fashion-mnist": Preset("mnist-convnet", {"mean": (0.2860,)}, (0.1, 0.5, 1.0), 10, 256, 2e-3, 1.0, 0.25, False),
    "cifar10": Preset("cifar-liresnet", {"mean": (0.4914, 0.4822, 0.4465), "width": 32, "blocks": (1, 1, 1),
                                         "hidden": 256},
                      (36 / 255, 72 / 255, 108 / 255), 30, 256, 2e-3, 0.3, 0.125, True, amp="bf16"),
}
# The cifar10 preset is sized for 2 CPU cores (about 3.5 minutes per epoch with bf16 autocast on a
# 2-core Xeon with AMX): width 32, one residual block per stage and a 256-wide dense head (a 512-wide
# one's 8192x512 orthogonal factor costs a quarter of each step). Measured in the README's CIFAR-10 section.

# Presets chosen by name (`lipnet train --preset NAME`), beyond each dataset's default: (dataset, preset).
NAMED_PRESETS: dict[str, tuple[str, Preset]] = {
    # the LiResNet-style network at its full size (width 64, two blocks per stage, 512-wide head),
    # fp32, 100 epochs: sized for a GPU (several times the cifar10 preset's time per epoch)
    "cifar10-gpu": ("cifar10", Preset("cifar-liresnet", {"mean": (0.4914, 0.4822, 0.4465)},
                                      (36 / 255, 72 / 255, 108 / 255), 100, 256, 1e-3, 0.3, 0.125, True)),
}


def preset_names(dataset: str | None = None) -> list[str]:
    """Every preset name ``TrainConfig.from_preset(preset=...)`` accepts (those of ``dataset`` only,
    if given): the dataset names (their default presets) and ``NAMED_PRESETS``."""
    names = [d for d in PRESETS if dataset in (None, d)]
    return sorted(names + [n for n, (d, _) in NAMED_PRESETS.items() if dataset in (None, d)])


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


def _takes_parametrization(model: str | None) -> bool:
    """Whether the named model builder has orthogonal layers with a ``parametrization`` choice."""
    return model in MODELS and "parametrization" in inspect.signature(MODELS[model]).parameters


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
    # mixed precision of the training steps: "bf16", "fp16" (CUDA only) or None (fp32); evaluation is always fp32
    amp: str | None = None

    @classmethod
    def from_preset(cls, dataset: str, private: bool = False, model: str | None = None, *,
                    preset: str | None = None, **overrides) -> TrainConfig:
        """The dataset's preset (``preset``: a named one of that dataset, see :func:`preset_names`);
        ``private``: its private preset for ``model`` (default: the first listed in
        ``PRIVATE_PRESETS[dataset]``); keyword overrides (None = keep the preset's)."""
        if dataset not in PRESETS:
            raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(PRESETS)}")
        if preset is None or preset == dataset:
            p = asdict(PRESETS[dataset])
        elif preset in NAMED_PRESETS and NAMED_PRESETS[preset][0] == dataset:
            if private:
                raise ValueError(f"preset {preset!r} is not a private preset; private training uses "
                                 f"PRIVATE_PRESETS[{dataset!r}] (choose among them with model=)")
            p = asdict(NAMED_PRESETS[preset][1])
        else:
            raise ValueError(f"unknown preset {preset!r} for {dataset}; known: {preset_names(dataset)}")
        if private:
            models = PRIVATE_PRESETS[dataset]
            model = model or next(iter(models))
            if model not in models:
                raise ValueError(f"no private preset for model {model!r} on {dataset}; known: {sorted(models)}")
            q = models[model]
            p.update(model=model, model_config=dict(q.model_config), batch_size=q.batch_size, lr=q.lr,
                     epochs=q.epochs, offset=q.offset, temperature=q.temperature, augment=False, amp=None,
                     # private models have small margins: report certificates at smaller radii
                     eval_eps=tuple(e / 5 for e in p["eval_eps"]),
                     dp={"input_bound": q.input_bound, "noise": q.noise, "optimizer": q.optimizer,
                         "momentum": q.momentum, "trainable": q.trainable, "freeze_bias": q.freeze_bias,
                         "loss_clip": q.loss_clip})
        elif model is not None and model != p["model"]:
            p.update(model=model, model_config={"mean": p["model_config"]["mean"]})
        p.update({k: v for k, v in overrides.items() if v is not None})
        if _takes_parametrization(p["model"]):  # recorded, so a checkpoint always says how its factors are stored
            p["model_config"] = {"parametrization": DEFAULT_PARAMETRIZATION, **p["model_config"]}
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


AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str | None, device: str | torch.device = "cpu") -> torch.dtype | None:
    """The autocast dtype of ``amp`` ("bf16", "fp16" or None: no autocast) on ``device``.

    ValueError for an unknown name, and for "fp16" off CUDA: fp16 training needs ``GradScaler``'s
    loss scaling, which lipnet only runs on CUDA (bf16 has fp32's exponent range and needs none)."""
    if amp is None:
        return None
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)} or None, got {amp!r}")
    if amp == "fp16" and torch.device(device).type != "cuda":
        raise ValueError(f"--amp fp16 needs a CUDA device (got {device}); on CPU use --amp bf16")
    return AMP_DTYPES[amp]


def train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                scheduler=None, device: str | torch.device = "cpu", augment: bool = False,
                generator: torch.Generator | None = None, progress: bool = True, desc: str = "train", *,
                amp: str | None = None, scaler: torch.amp.GradScaler | None = None) -> float:
    """One pass over ``loader``; returns the mean training loss. NaN/inf loss -> RuntimeError.

    ``amp`` ("bf16" / "fp16", see :func:`amp_dtype`): each step's forward pass and loss run under
    ``torch.autocast``, the backward pass and the update outside it (parameters stay fp32).
    "fp16" needs an enabled ``scaler`` (``torch.amp.GradScaler``), which then scales the loss,
    unscales the gradients and skips steps whose gradients overflowed."""
    device = torch.device(device)
    dtype = amp_dtype(amp, device)
    scaled = scaler is not None and scaler.is_enabled()
    if amp == "fp16" and not scaled:
        raise ValueError("amp='fp16' needs an enabled torch.amp.GradScaler (fp16 gradients underflow unscaled)")
    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    for x, y in bar:
        if augment:
            x = augment_batch(x, generator)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            loss = loss_fn(model(x), y)
        if not torch.isfinite(loss):
            raise RuntimeError(f"training diverged: loss = {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        if scaled:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total, count = total + loss.item() * len(y), count + len(y)
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1)


def _loader_generator(loader) -> torch.Generator | None:
    generator = getattr(loader, "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


def _rng_states(augment: torch.Generator, loader: torch.Generator | None, device: torch.device,
                dist_ctx: DistributedContext | None) -> dict[str, list[torch.Tensor] | None]:
    """Every RNG stream training draws from, one state per rank (rank order): the global CPU
    generator, the augmentation generator, the train loader's shuffling generator and, on CUDA,
    the device's generator. A collective under DDP: every rank must call it."""
    local = {"torch": torch.get_rng_state(), "augment": augment.get_state(),
             "loader": loader.get_state() if loader is not None else None,
             "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if dist_ctx is None or dist_ctx.world_size == 1:
        return {k: None if v is None else [v] for k, v in local.items()}
    # nccl gathers device tensors only; gloo takes CPU ones
    comm = dist_ctx.device if dist_ctx.backend == "nccl" else torch.device("cpu")
    # one tensor per rank with its own storage: a row view would be saved with its offset in the
    # stacked storage, which Generator.set_state ignores
    return {k: None if v is None else [row.clone() for row in all_gather_stack(v.to(comm)[None]).cpu()]
            for k, v in local.items()}


def _config_differences(a: TrainConfig, b: TrainConfig) -> list[str]:
    x, y = asdict(a), asdict(b)
    return [f"{k}: {x[k]!r} vs {y[k]!r}" for k in x if x[k] != y[k]]


def _restore(resume: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler,
             augment: torch.Generator, loader: torch.Generator | None, config: TrainConfig, device: torch.device,
             rank: int, world_size: int, steps: int) -> tuple[int, list[dict]]:
    """Load a resumable checkpoint's states into a fresh run; returns (first epoch to train, history)."""
    where = resume.path
    if resume.training is None:
        raise CheckpointError(f"{where} holds weights only (no optimizer / scheduler / RNG states): it cannot be "
                              "resumed (written by an older lipnet, by save_checkpoint without training state, "
                              "or by private training)")
    diff = _config_differences(resume.config, config)
    if diff:
        raise ValueError(f"cannot resume {where} with a different configuration: {'; '.join(diff)}")
    state = resume.training
    if state.get("world_size", 1) != world_size:
        raise ValueError(f"{where} was trained by {state.get('world_size', 1)} process(es); resume it with "
                         f"--nproc {state.get('world_size', 1)} (got {world_size}): the per-rank random streams "
                         "and batch statistics depend on it")
    if state["scheduler"].get("total_steps") not in (None, steps):
        raise ValueError(f"{where}: its learning-rate schedule has {state['scheduler']['total_steps']} steps, this "
                         f"run {steps} (a different training set size or batch size)")
    model.load_state_dict(resume.state_dict)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    # Generator.set_state reads a state from the start of its storage: give each its own
    rng = {k: None if v is None else [t.clone() for t in v] for k, v in state["rng"].items()}
    torch.set_rng_state(rng["torch"][rank])
    augment.set_state(rng["augment"][rank])
    if loader is not None:
        if rng.get("loader") is None:
            raise ValueError(f"{where} has no shuffling state for the train loader, which this run shuffles")
        loader.set_state(rng["loader"][rank])
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"][rank], device)
    return resume.epoch + 1, list(resume.history)


def _reload_checkpointed_state(model: nn.Module) -> None:
    """Load rank 0's state_dict (the one just checkpointed) into ``model`` on every rank.

    A resumed run starts its next epoch from ``load_state_dict(checkpoint)`` on every rank; this run
    does too, so rank-local state (buffers and factors that only rank 0 touched while evaluating, the
    other ranks' own copies) cannot make the uninterrupted and the resumed multi-process run differ
    (measured: without it a 2-process resume drifted by 3e-4 in the biases feeding BatchCentering,
    whose true gradient is zero and whose Adam step amplifies any difference)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for tensor in state.values():
        dist.broadcast(tensor, src=0)
    model.load_state_dict(state)


def fit(model: nn.Module, train_loader, test_loader, config: TrainConfig, device: str | torch.device = "cpu",
        progress: bool = True, log: Callable[[str], None] = print,
        dist_ctx: DistributedContext | None = None, *, checkpoint_dir: str | Path | None = None,
        resume: Checkpoint | None = None) -> list[dict]:
    """Adam + one-cycle schedule on ``LipschitzCrossEntropy(temperature, offset)``; after each epoch,
    clean and certified accuracy on ``test_loader`` at ``config.eval_eps`` (always in fp32, outside
    any autocast, even with ``config.amp``). Returns the history (one row per epoch, resumed ones included).

    ``checkpoint_dir``: after every epoch, :func:`save_checkpoint` writes it atomically with the
    whole training state (model, optimizer, scheduler, GradScaler, RNG states, the epoch). The
    random streams an epoch draws from (global CPU / CUDA generator, the augmentation generator, the
    loader's ``generator`` attribute if it is a ``torch.Generator``) are a function of that state,
    so ``resume=read_checkpoint(dir)`` (same ``config``, a fresh model and loaders built alike)
    trains the remaining epochs exactly as the uninterrupted run would have (same device and thread
    settings: up to float non-associativity). A loader without such a ``generator`` must make its
    own order reproducible.

    Multi-process (``dist_ctx.world_size > 1``): ``train_loader`` must give this rank's share of
    every global batch (``lipnet.distributed.ShardedBatchLoader``); the model trains under DDP
    (gradients averaged: a step uses the whole global batch), the logged loss is the mean over
    ranks, and only rank 0 evaluates, logs, shows progress and writes checkpoints (the history is
    rank 0's). Pass the same ``checkpoint_dir`` on every rank: the per-rank RNG states are gathered
    to rank 0 (a collective); resuming needs the same number of processes."""
    distributed = dist_ctx is not None and dist_ctx.world_size > 1
    main = not distributed or dist_ctx.is_main
    rank, world_size = (dist_ctx.rank, dist_ctx.world_size) if distributed else (0, 1)
    device = torch.device(device)
    amp_dtype(config.amp, device)  # refuse an unknown / unsupported amp before any work
    loss_fn = LipschitzCrossEntropy(temperature=config.temperature, offset=config.offset)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps = config.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps, pct_start=0.2)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    generator = torch.Generator().manual_seed(config.seed + rank)  # augmentation
    shuffling = _loader_generator(train_loader)
    history, first = [], 1
    if resume is not None:
        first, history = _restore(resume, model, optimizer, scheduler, scaler, generator, shuffling, config, device,
                                  rank, world_size, steps)
    forward = wrap_ddp(model, dist_ctx) if distributed else model
    for epoch in range(first, config.epochs + 1):
        start = time.perf_counter()
        loss = train_epoch(forward, train_loader, optimizer, loss_fn, scheduler, device, config.augment, generator,
                           progress and main, desc=f"epoch {epoch}/{config.epochs}", amp=config.amp, scaler=scaler)
        loss = all_reduce_mean(loss) if distributed else loss
        seconds = time.perf_counter() - start
        if main:
            report = certified_accuracy(model, test_loader, config.eval_eps, device=device)
            row = {"epoch": epoch, "loss": loss, "train_seconds": seconds, "clean": report.clean,
                   "certified": report.certified, "lipschitz_bound": report.lipschitz_bound}
            history.append(row)
            certs = "  ".join(f"cert@{e:.3g} {a:.2%}" for e, a in report.certified.items())
            log(f"epoch {epoch}/{config.epochs}  loss {loss:.4f}  clean {report.clean:.2%}  {certs}  "
                f"L<={report.lipschitz_bound:.5f}  ({seconds:.0f}s)")
        if checkpoint_dir is not None:
            # after the evaluation: these are the states the next epoch starts from
            rng = _rng_states(generator, shuffling, device, dist_ctx if distributed else None)
            if main:
                training = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "scaler": scaler.state_dict(), "rng": rng, "world_size": world_size}
                save_checkpoint(checkpoint_dir, model, config, history, epoch=epoch, training=training)
            if distributed:
                _reload_checkpointed_state(model)
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
                progress: bool = True, log: Callable[[str], None] = print, evaluate: bool = True, *,
                checkpoint_dir: str | Path | None = None) -> list[dict]:
    """Clipping-free DP-SGD (``lipnet.privacy.PrivateTrainer``) on ``LipschitzCrossEntropy``: Poisson
    batches of expected size ``config.batch_size``, noise calibrated to spend ``config.dp["epsilon"]``
    at ``config.dp["delta"]`` over ``config.epochs``; ``config.dp`` also names the optimizer ("sgd"
    with ``momentum`` or "adam"), the noise calibration, the trainable layers
    (:func:`private_trainable`) and ``loss_clip`` (if set, the loss' per-sample logit gradient is
    clipped to that norm, :class:`lipnet.nn.ClippedLossGradient`, and the noise calibrated to it).
    After each epoch: epsilon spent so far (the accountant), clean and certified test accuracy
    (``evaluate=False``: no evaluation, e.g. on ranks other than 0 of a multi-process run).
    ``config.dp["epsilon_spent"]`` is updated after each epoch; ``checkpoint_dir``: then written
    there (:func:`save_checkpoint`, weights and history only: private runs cannot be resumed, the
    accountant's state is not saved). No mixed precision: ``config.amp`` must be None."""
    from .privacy import PrivateTrainer, epoch_row, precompute_frozen_prefix, split_frozen_prefix

    if config.amp is not None:
        raise ValueError("mixed precision (--amp) is not supported with private training (--dp): its gradient "
                         "bounds are computed for fp32")
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
        dp["epsilon_spent"] = row["epsilon"]
        if not evaluate:
            history.append(row)
            if checkpoint_dir is not None:
                save_checkpoint(checkpoint_dir, model, config, history)
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
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, model, config, history)
    return history


CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "lipnet.checkpoint"
CHECKPOINT_VERSION = 2  # 1: {config, state_dict, history}, pickled without restriction; 2: + epoch, training


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: empty, truncated or not a checkpoint at all, holding
    objects that only arbitrary (code-running) unpickling could rebuild -- refused without
    unpickling them -- or lacking what the caller needs (e.g. the training state to resume)."""


@dataclass
class Checkpoint:
    """A checkpoint's content as :func:`read_checkpoint` returns it (nothing in it ran code to load)."""

    path: Path                          # the checkpoint file
    config: TrainConfig
    state_dict: dict[str, torch.Tensor]  # the model's
    history: list[dict]                 # one row per completed epoch (rank 0's)
    epoch: int                          # epochs completed when it was written
    # {"optimizer", "scheduler", "scaler": state_dicts, "rng": {stream: [state per rank] | None},
    #  "world_size"}; None: weights only (not resumable)
    training: dict | None = None

    @property
    def resumable(self) -> bool:
        """True if it holds the training state :func:`fit` needs to continue the run."""
        return self.training is not None


_PLAIN_SCALARS = (type(None), bool, int, float, str)


def _plain(obj: Any, where: str) -> Any:
    """``obj`` rebuilt from plain types (dict, list, tuple, str, int, float, bool, None) and tensors,
    which ``torch.load(weights_only=True)`` loads without running code: number-likes (e.g. numpy
    scalars) become int / float, dict / list / tuple subclasses the base type; anything else is a
    TypeError naming ``where`` it is."""
    if type(obj) in _PLAIN_SCALARS or isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, dict):
        return {_plain(k, f"{where} key {k!r}"): _plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    raise TypeError(f"save_checkpoint: {where} is a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints "
                    "hold only dict / list / tuple / str / int / float / bool / None and tensors, so that loading "
                    "them never needs arbitrary unpickling")


def _unsafe_globals(file: Path | IO[bytes]) -> list[str]:
    """The pickle globals of a torch zip archive that ``weights_only=True`` would refuse, found by
    disassembling the pickle (nothing is executed); [] if torch cannot tell (torch < 2.5)."""
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    return list(scan(file if not isinstance(file, Path) else str(file))) if scan is not None else []


def _raw_pickle_globals(f: IO[bytes]) -> list[str] | None:
    """The globals named by the pickle(s) at the start of ``f`` (a pre-zip ``torch.save`` file or a
    bare ``pickle.dump``), by static disassembly (``pickletools``: nothing is executed); None if
    ``f`` does not start with a pickle. Torch's own rebuild functions are left out."""
    found: list[str] = []
    parsed = False
    while True:
        strings: list[str] = []
        try:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:  # not (or no longer) pickle data: tensor bytes of a legacy file, garbage
            break
        parsed = True
        position = f.tell()
        if not f.read(1):  # end of file
            break
        f.seek(position)
    if not parsed:
        return None
    return sorted({g for g in found if not (g.startswith("torch.") or g == "collections.OrderedDict")})


def _fsync_dir(folder: Path) -> None:
    # makes the rename itself durable on POSIX; directories cannot be opened this way on Windows
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None], verify: Callable[[Path], None] | None = None) -> None:
    """Replace ``path`` by what ``write`` writes, all or nothing: into a temporary file of the same
    directory, flushed and fsynced, checked by ``verify`` (it raises to refuse), then renamed over
    ``path`` (``os.replace``, atomic). A reader, or a crash at any point, sees the old file or the
    new one, never a partial one; on failure the temporary file is removed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _refuse_unsafe(tmp: Path) -> None:
    unsafe = _unsafe_globals(tmp)
    if unsafe:
        raise TypeError(f"save_checkpoint: the state holds objects ({', '.join(unsafe)}) that load_checkpoint would "
                        "refuse (they need arbitrary unpickling); nothing was written")


def _cast_floating(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def save_checkpoint(out: str | Path, model: nn.Module, config: TrainConfig, history: Sequence[dict] = (), *,
                    epoch: int | None = None, training: dict | None = None,
                    weights_dtype: torch.dtype | None = None) -> Path:
    """Write ``out/checkpoint.pt`` (the model's state_dict, the config to rebuild it, the history)
    and ``out/config.json`` (config and history, for people); returns the checkpoint's path.

    Each file is replaced atomically (written to a temporary file in ``out``, flushed and fsynced,
    then ``os.replace``d): a run killed at any moment leaves the previous complete checkpoint or the
    new one. Everything is stored as plain types and tensors,
    so :func:`load_checkpoint` reads it with ``torch.load(weights_only=True)``; a config, history or
    ``training`` holding anything else is a TypeError and nothing is written. ``epoch``: epochs
    completed (default ``len(history)``); ``training``: the state :func:`fit` resumes from (fit
    builds it; None: a weights-only checkpoint). ``weights_dtype`` (e.g. ``torch.float16``, for
    shipping): the state_dict's floating tensors are stored in it; loading copies them back into the
    model's own dtype (its orthogonal layers then retract the rounded factors before first use)."""
    if weights_dtype is not None and training is not None:
        raise ValueError("weights_dtype is for weights-only checkpoints: a resumable one keeps the exact weights")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _plain(asdict(config), "config")
    rows = _plain(list(history), "history")
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": cfg,
               "state_dict": _cast_floating(model.state_dict(), weights_dtype), "history": rows,
               "epoch": len(rows) if epoch is None else int(epoch),
               "training": None if training is None else _plain(training, "training")}
    _atomic_write(out / CHECKPOINT, lambda f: torch.save(payload, f), verify=_refuse_unsafe)
    text = json.dumps({"config": cfg, "history": rows, "epoch": payload["epoch"]}, indent=2, default=str)
    _atomic_write(out / "config.json", lambda f: f.write(text.encode()))
    return out / CHECKPOINT


def _safe_load(file: Path, map_location: str | torch.device) -> Any:
    """``torch.load(file, weights_only=True)``, every failure a CheckpointError naming ``file``.
    One open file handle for all the checks and the load: a checkpoint replaced meanwhile (a
    running ``lipnet train``) is either wholly the old file or wholly the new one."""
    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise CheckpointError(f"checkpoint {file} is empty (an interrupted copy?)")
        # torch.save writes zip archives; a truncated one loses its central directory (at the end)
        if not zipfile.is_zipfile(f):
            f.seek(0)
            named = _raw_pickle_globals(f)
            if named:
                raise CheckpointError(f"refusing to load {file}: a bare pickle (not a torch zip archive) naming "
                                      f"{', '.join(named)}, which only arbitrary unpickling could rebuild and which "
                                      "can run code (nothing of it was executed)")
            raise CheckpointError(f"{file} ({size} bytes) is not a PyTorch checkpoint archive: truncated, corrupt, "
                                  "or not written by `lipnet train`")
        try:
            f.seek(0)
            unsafe = _unsafe_globals(f)
        except Exception as err:
            raise CheckpointError(f"cannot read checkpoint {file}: corrupt archive ({type(err).__name__})") from err
        if unsafe:
            raise CheckpointError(f"refusing to load {file}: it holds pickled objects ({', '.join(unsafe)}) that only "
                                  "arbitrary unpickling could rebuild, which can run code; lipnet checkpoints hold "
                                  "plain types and tensors only (nothing of it was executed)")
        try:
            f.seek(0)
            return torch.load(f, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            detail = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                          type(err).__name__)
            raise CheckpointError(f"refusing to load {file}: its pickle is corrupt or needs arbitrary unpickling, "
                                  f"which can run code ({detail}); nothing of it was executed") from err
        except Exception as err:  # the zip reader's internal errors, EOF in a damaged record, ...
            raise CheckpointError(f"cannot read checkpoint {file}: corrupt or truncated "
                                  f"({type(err).__name__})") from err


def _config_from_dict(cfg: dict, file: Path, version: int) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise CheckpointError(f"{file}: unknown config fields {unknown} (written by a newer lipnet?)")
    cfg = dict(cfg)
    model_config = cfg.get("model_config") or {}
    if version < 2 and _takes_parametrization(cfg.get("model")) and "parametrization" not in model_config:
        # written before layers stored their orthogonal factors: its raw parameters are "polar" ones,
        # and its convolutions had a bias before every centering (version-2 files without the key
        # hold cifar/imagenet-liresnet factors of the default "retraction" layers)
        cfg["model_config"] = {**model_config, "parametrization": "polar", "conv_bias": True}
    cfg["eval_eps"] = tuple(cfg.get("eval_eps", ()))  # version-1 files and JSON round trips may hold a list
    try:
        return TrainConfig(**cfg)
    except TypeError as err:
        raise CheckpointError(f"{file}: incomplete config ({err})") from err


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """The content of a checkpoint written by :func:`save_checkpoint` (``path``: its directory or
    the file), loaded with ``torch.load(weights_only=True)``: nothing in the file can run code.

    FileNotFoundError if there is no such file; CheckpointError (a ValueError) naming the file if
    it is empty, truncated or foreign, or holds objects that only arbitrary unpickling could
    rebuild (refused before unpickling them). Resuming needs ``map_location="cpu"`` (RNG states
    are CPU tensors; optimizer states follow their parameters' device when loaded)."""
    path = Path(path)
    file = path / CHECKPOINT if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {file} (expected the directory written by `lipnet train --out`)")
    raw = _safe_load(file, map_location)
    if not (isinstance(raw, dict) and isinstance(raw.get("config"), dict) and isinstance(raw.get("state_dict"), dict)):
        raise CheckpointError(f"{file} is not a lipnet checkpoint (expected a dict with 'config' and 'state_dict', "
                              "as `lipnet train --out` writes)")
    history = raw.get("history") or []
    if not isinstance(history, list):
        raise CheckpointError(f"{file}: its history is a {type(history).__name__}, not a list")
    training = raw.get("training")
    if training is not None and not (isinstance(training, dict)
                                     and {"optimizer", "scheduler", "rng"} <= set(training)):
        raise CheckpointError(f"{file}: incomplete training state (keys {sorted(training)})")
    epoch = raw.get("epoch", len(history))
    config = _config_from_dict(raw["config"], file, int(raw.get("version", 1)))
    return Checkpoint(file, config, raw["state_dict"], history, int(epoch), training)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig, list[dict]]:
    """Rebuild the model of a checkpoint written by :func:`save_checkpoint` (a directory or the
    file): ``(model in eval mode on map_location, config, history)``. Loads safely and raises as
    :func:`read_checkpoint`; weights that do not fit the configured model are a CheckpointError."""
    ckpt = read_checkpoint(path, map_location)
    model = build_model(ckpt.config.model, **ckpt.config.model_config)
    try:
        model.load_state_dict(ckpt.state_dict)
    except RuntimeError as err:
        raise CheckpointError(f"{ckpt.path}: its weights do not fit {ckpt.config.model}"
                              f"({ckpt.config.model_config}): {err}") from err
    return model.to(map_location).eval(), ckpt.config, ckpt.history


def format_table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
    """Plain-text table (right-aligned numbers)."""
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


__all__ = ["AMP_DTYPES", "CHECKPOINT", "NAMED_PRESETS", "PRESETS", "PRIVATE_PRESETS", "Checkpoint", "CheckpointError", "Preset",
           "PrivatePreset", "TrainConfig", "amp_dtype", "augment_batch", "fit", "fit_private", "format_table",
           "load_checkpoint", "preset_names", "private_trainable", "read_checkpoint", "save_checkpoint", "train_epoch"]
