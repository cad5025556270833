"""The training loop of ``lipnet train`` (and for users): ``fit`` (resumable, mixed precision,
multi-process) and ``fit_private`` (clipping-free DP-SGD). Presets live in :mod:`lipnet.presets`,
checkpoints in :mod:`lipnet.checkpoints`, the private recipe in :mod:`lipnet.privacy.recipe`."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .certify import certified_accuracy, network_lipschitz_bound
from .data import ImageDataset
from .checkpoints import Checkpoint, save_checkpoint
from .distributed import DistributedContext, all_gather_stack, all_reduce_mean, wrap_ddp
from .modes import training_mode
from .nn import LipschitzCrossEntropy
from .presets import AMP_DTYPES, TrainConfig
from .progress import progress_bar
from .validate import class_labels


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


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` runs bf16 matrix products natively: a CUDA device that supports bf16, or a
    CPU with bf16 instructions (AVX512-BF16 or AMX, as oneDNN reports). Elsewhere torch emulates
    bf16, and bf16 autocast makes a training step several times slower than fp32 (docs/training.md,
    "Mixed precision", gives a measurement)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN's query: keep bf16 as asked
        return True


def train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                scheduler=None, device: str | torch.device = "cpu", augment: bool = False,
                generator: torch.Generator | None = None, progress: bool = True, desc: str = "train", *,
                amp: str | None = None, scaler: torch.amp.GradScaler | None = None,
                channels_last: bool = False) -> float:
    """One pass over ``loader``; returns the mean training loss. NaN/inf loss -> RuntimeError.

    ``amp`` ("bf16" / "fp16", see :func:`amp_dtype`): each step's forward pass and loss run under
    ``torch.autocast``, the backward pass and the update outside it (parameters stay fp32).
    "fp16" needs an enabled ``scaler`` (``torch.amp.GradScaler``), which then scales the loss,
    unscales the gradients and skips steps whose gradients overflowed. ``channels_last``: 4-D batches
    enter the model in channels-last memory format (the convolutions keep it; same values up to
    float rounding order)."""
    device = torch.device(device)
    dtype = amp_dtype(amp, device)
    scaled = scaler is not None and scaler.is_enabled()
    if amp == "fp16" and not scaled:
        raise ValueError("amp='fp16' needs an enabled torch.amp.GradScaler (fp16 gradients underflow unscaled)")
    model.train()
    total, count = 0.0, 0
    bar = progress_bar(loader, desc=desc, enabled=progress, leave=False)
    for x, y in bar:
        if augment:
            x = augment_batch(x, generator)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            logits = model(x)
            # a label the model has no class for: a clear error, not an index error inside the loss
            # (one min/max per step; the loss.item() below syncs anyway)
            class_labels(y, logits.shape[-1], desc)
            loss = loss_fn(logits, y)
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
    resume.check_resumable(world_size)
    diff = _config_differences(resume.config, config)
    if diff:
        raise ValueError(f"cannot resume {where} with a different configuration: {'; '.join(diff)}")
    state = resume.training
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


def build_optimizer(model: nn.Module, config: TrainConfig, total_steps: int
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer of ``config.optimizer`` over ``model``'s trainable parameters and its one-cycle
    schedule of ``total_steps`` steps (warm-up over the first 20%, then cosine annealing).

    "adam": ``Adam(lr)`` on every parameter, one-cycle with beta1 cycled 0.95 -> 0.85 -> 0.95.
    "turbomuon" / "schatten": :func:`lipnet.optim.split_params` gives the hidden matrices (stored
    orthogonal factors or raw parametrized weights included) to ``TurboMuon`` / ``SchattenMuon``
    (adaptive p) at ``config.matrix_lr`` and the rest (biases, gains, the head) to ``Adam`` at
    ``config.lr``, as one :class:`~lipnet.optim.CombinedOptimizer`; each group's lr follows the
    one-cycle shape from its own peak, momenta fixed (Muon's 0.95, Adam's 0.9). SchattenMuon's
    criterion sees white activations here: its ``watch`` hooks ``nn.Linear`` / ``nn.Conv2d``
    weights, and an orthogonal layer's trained tensor is the factor behind its weight.
    The optimizer changes how the weights move, never the network's Lipschitz bound (each
    orthogonal layer is orthogonal whatever its stored tensor is)."""
    from .optim import CombinedOptimizer, SchattenMuon, TurboMuon, split_params

    schedule = dict(total_steps=total_steps, pct_start=0.2)
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        return optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, **schedule)
    matrices, rest = split_params(model)
    if not matrices:
        raise ValueError(f"optimizer {config.optimizer!r}: {type(model).__name__} has no hidden matrix to give it")
    matrix_optimizer = (TurboMuon(matrices, lr=config.matrix_lr) if config.optimizer == "turbomuon"
                        else SchattenMuon(matrices, lr=config.matrix_lr))
    parts = [matrix_optimizer] + ([torch.optim.Adam(rest, lr=config.lr)] if rest else [])
    optimizer = CombinedOptimizer(parts)
    peaks = [config.matrix_lr] * len(matrix_optimizer.param_groups) + [config.lr] * (len(parts) - 1)
    return optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, cycle_momentum=False, **schedule)


def fit(model: nn.Module, train_loader, test_loader, config: TrainConfig, device: str | torch.device = "cpu",
        progress: bool = True, log: Callable[[str], None] = print,
        dist_ctx: DistributedContext | None = None, *, checkpoint_dir: str | Path | None = None,
        resume: Checkpoint | None = None) -> list[dict]:
    """``config.optimizer`` with its one-cycle schedule (:func:`build_optimizer`) on
    ``LipschitzCrossEntropy(temperature, offset)``; after each epoch,
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
    if config.amp == "bf16" and not native_bf16(device):
        warnings.warn(f"amp='bf16' on {device}, which has no native bf16 matrix units: torch emulates bf16 here and "
                      "each step is several times slower than fp32 (amp=None)", RuntimeWarning, stacklevel=2)
    loss_fn = LipschitzCrossEntropy(temperature=config.temperature, offset=config.offset)
    steps = config.epochs * len(train_loader)
    optimizer, scheduler = build_optimizer(model, config, steps)
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
                           progress and main, desc=f"epoch {epoch}/{config.epochs}", amp=config.amp, scaler=scaler,
                           channels_last=config.channels_last)
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
def frozen_test_features(prefix: nn.Module, loader: Iterable, device: str | torch.device = "cpu", *,
                         cache_dir: str | Path | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(prefix(x), y)]`` for the batches of ``loader``, the prefix in eval mode (as certification
    runs the model), kept on ``device``: ``head(prefix(x)) == model(x)`` for a Sequential split by
    :func:`lipnet.privacy.split_frozen_prefix`, so per-epoch evaluation can run the head alone.
    ``cache_dir`` with a loader over an ``ImageDataset``: the features are kept there
    (:func:`lipnet.privacy.prefix_features`) and batched like the loader."""
    dataset = getattr(loader, "dataset", None)
    if cache_dir is not None and isinstance(dataset, ImageDataset) and hasattr(loader, "batch_size"):
        from .privacy import prefix_features
        dtype = next((t.dtype for t in [*prefix.parameters(), *prefix.buffers()] if t.is_floating_point()),
                     torch.float32)
        x = prefix_features(prefix, dataset, None, dtype=dtype, device=device, progress=False, cache_dir=cache_dir,
                            train=False)
        b = loader.batch_size
        return [(x[i:i + b], dataset.labels[i:i + b].to(device)) for i in range(0, len(x), b)]
    with training_mode(prefix, False):
        return [(prefix(x.to(device)), y.to(device)) for x, y in loader]


def fit_private(model: nn.Module, train_set, test_loader, config: TrainConfig, device: str | torch.device = "cpu",
                progress: bool = True, log: Callable[[str], None] = print, evaluate: bool = True, *,
                checkpoint_dir: str | Path | None = None, resume=None,
                feature_cache: str | Path | None = None) -> list[dict]:
    """Clipping-free DP-SGD (``lipnet.privacy.PrivateTrainer``) on ``LipschitzCrossEntropy``: Poisson
    batches of expected size ``config.batch_size``, noise calibrated to spend
    ``config.privacy.epsilon`` at ``config.privacy.delta`` over ``config.epochs``, with the
    mechanism ``config.privacy`` describes (:class:`lipnet.presets.PrivacyConfig`) and the optimizer
    ``config.optimizer`` ("sgd" with ``privacy.momentum``, or "adam"). After each epoch: epsilon
    spent so far (the accountant; each history row's ``epsilon``), clean and certified test
    accuracy (``evaluate=False``: no evaluation, e.g. on ranks other than 0 of a multi-process run).

    ``checkpoint_dir``: after every epoch the weights, history, optimizer state and the trainer's
    state (:meth:`lipnet.privacy.PrivateTrainer.state_dict`: steps, accountant history, sampling and
    noise generators) are written there; ``resume=read_checkpoint(dir)`` with the same config and a
    model built alike continues the run, and ends with the same weights and epsilon as the
    uninterrupted run. ``feature_cache``: a folder where the frozen prefix's features are kept
    (:func:`lipnet.privacy.precompute_frozen_prefix`), so a rerun or a resume does not recompute them."""
    from .privacy import PrivateTrainer, epoch_row, precompute_frozen_prefix, split_frozen_prefix
    from .privacy.recipe import private_loss, private_trainable

    dp = config.privacy
    if dp is None:
        raise ValueError("fit_private needs a private config (TrainConfig.privacy; lipnet train --dp)")
    if not 0 < config.batch_size <= len(train_set):
        raise ValueError(f"expected batch size {config.batch_size} must be in [1, {len(train_set)}] (the training set); "
                         f"with --limit, pass a --batch-size of at most {len(train_set)}")
    loss_fn = private_loss(config.temperature, config.offset, dp.loss_clip)
    params = private_trainable(model, dp.trainable, dp.freeze_bias)
    if resume is not None:
        model.load_state_dict(resume.state_dict)
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=dp.momentum)
    else:
        optimizer = torch.optim.Adam(params, lr=config.lr)
    trained, data, input_bound, input_shape = model, train_set, dp.input_bound, None
    eval_model, eval_batches = model, test_loader
    precompute = dp.precompute and isinstance(model, nn.Sequential)
    prefix = split_frozen_prefix(model)[0] if precompute else ()
    if len(prefix):
        # the frozen leading layers (scattering, frozen convs) run once per example, not once per step
        frozen = precompute_frozen_prefix(model, train_set, dp.input_bound, device=device, progress=progress,
                                          cache_dir=feature_cache)
        trained, data, input_bound, input_shape = frozen.head, frozen.dataset, frozen.bound, frozen.shape
        log(f"frozen prefix computed once: features {frozen.shape}, norm <= {frozen.bound:.4g}")
        if evaluate:  # and once per test image: each epoch's evaluation runs the head only
            eval_model = frozen.head
            eval_batches = frozen_test_features(prefix, test_loader, device, cache_dir=feature_cache)
    trainer = PrivateTrainer(trained, optimizer, data, loss=loss_fn, input_bound=input_bound, input_shape=input_shape,
                             target_epsilon=dp.epsilon, target_delta=dp.delta, epochs=config.epochs,
                             sample_rate=config.batch_size / len(train_set), accountant=dp.accountant,
                             noise=dp.noise, device=device, seed=config.seed, progress=progress)
    history: list[dict] = []
    if resume is not None:
        if resume.training is None or "private" not in resume.training:
            raise ValueError(f"{resume.path} holds no private training state (accountant, generators): it cannot "
                             "continue a private run")
        if _config_differences(resume.config, config):
            raise ValueError(f"{resume.path} was written by another configuration: "
                             f"{', '.join(_config_differences(resume.config, config))}")
        optimizer.load_state_dict(resume.training["optimizer"])
        trainer.load_state_dict(resume.training["private"])
        history = list(resume.history)
        log(f"resumed after epoch {trainer.epochs_done}: epsilon spent so far {trainer.epsilon():.3f}")
    log(trainer.describe())
    world_size = trainer.world_size
    while trainer.epochs_done < config.epochs:
        row = epoch_row(trainer.train_epoch())
        if evaluate:
            # radii in input space: the whole model's bound (prefix included), whichever part is evaluated
            report = certified_accuracy(eval_model, eval_batches, config.eval_eps, device=device,
                                        lipschitz=network_lipschitz_bound(model))
            row.update(clean=report.clean, certified=report.certified, lipschitz_bound=report.lipschitz_bound,
                       train_seconds=row["seconds"])
            certs = "  ".join(f"cert@{e:.3g} {a:.2%}" for e, a in report.certified.items())
            log(f"epoch {row['epoch']}/{config.epochs}  eps spent {row['epsilon']:.3f} (delta {row['delta']:g})  "
                f"loss {row['loss']:.4f}  clean {report.clean:.2%}  {certs}  C={row['sensitivity']:.3g}  "
                f"({row['seconds']:.0f}s, {row['samples_per_s']:.0f} samples/s)")
        history.append(row)
        # after the epoch: the state the next one starts from (a collective with several processes)
        state = trainer.state_dict()
        if checkpoint_dir is not None:
            training = {"optimizer": optimizer.state_dict(), "private": state, "world_size": world_size}
            save_checkpoint(checkpoint_dir, model, config, history, training=training)
    return history


__all__ = ["AMP_DTYPES", "amp_dtype", "augment_batch", "build_optimizer", "fit", "fit_private", "frozen_test_features",
           "native_bf16", "train_epoch"]
