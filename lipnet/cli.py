"""The ``lipnet`` command: ``lipnet train``, ``lipnet certify``, ``lipnet conformal`` and ``lipnet download``."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from . import __version__
from . import data as lipdata
from . import distributed as lipdist
from .certify import ConformalClassifier, certified_accuracy, lipschitz_lower_bound
from .models import MODELS, RESIDUAL_BLOCKS, build_model
from .pretrained import load_pretrained, pretrained_names
from .nn import input_checks_enabled, set_input_checks
from .nn.parametrizations import PARAMETRIZATIONS
from .checkpoints import CHECKPOINT, Checkpoint, load_checkpoint, read_checkpoint
from .output import PLOT_HINT, OutputError, format_table, plot_certified, plot_conformal, write_output
from .run_dir import claim_run_dir
from .presets import AMP_DTYPES, DEFAULT_MATRIX_LR, NAMED_PRESETS, OPTIMIZERS, PRESETS, TrainConfig, preset_names
from .training import amp_dtype, fit, fit_private


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None,
                   help="dataset folder: torchvision's layouts (MNIST/raw, cifar-10-batches-py, ...) or the "
                        "CIFAR-10 JPEG archive (default: $LIPNET_DATA, else ~/.cache/lipnet/data)")
    p.add_argument("--download", action="store_true",
                   help="fetch a dataset missing from the data root from torchvision's sources (MD5-checked)")
    p.add_argument("--mirror", default=None, metavar="URL",
                   help="--download: base URL serving the dataset's files (default: torchvision's; "
                        "$LIPNET_DATA_MIRROR)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N examples of each split (smoke runs)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_model_source(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="directory written by `lipnet train --out`")
    source.add_argument("--pretrained", choices=pretrained_names(),
                        help="a certified model shipped with lipnet (lipnet.pretrained); its bound is "
                             "recomputed from its weights")


def _load_model(args):
    """(model in eval mode, its TrainConfig, the folder plots go to by default) of --checkpoint / --pretrained."""
    if args.pretrained is not None:
        model, config = load_pretrained(args.pretrained, map_location=args.device)
        return model, config, Path(".")
    model, config, _ = load_checkpoint(args.checkpoint, map_location=args.device)
    return model, config, Path(args.checkpoint)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipnet", description="1-Lipschitz networks with certified robustness")
    parser.add_argument("--version", action="version", version=f"lipnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a 1-Lipschitz CNN and save a checkpoint")
    t.add_argument("--dataset", choices=sorted(PRESETS), help="required unless --resume")
    t.add_argument("--epochs", type=int, default=None, help="default: the dataset preset's")
    t.add_argument("--out", default=None,
                   help="checkpoint directory, rewritten after every epoch (required unless --resume; default: "
                        "the --resume directory)")
    t.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run whose checkpoint is in DIR with its configuration and trains its "
                        "remaining epochs, writing to DIR (or --out); options that would change the result must be "
                        "left out or match the run's")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run an --out directory already holds (without it, such a directory is refused)")
    t.add_argument("--preset", choices=preset_names(), default=None,
                   help="a named preset of --dataset (default: the dataset's own, e.g. cifar10 = the 2-CPU-core "
                        "recipe; cifar10-gpu = the full-size network for a GPU)")
    t.add_argument("--amp", choices=[*sorted(AMP_DTYPES), "fp32"], default=None,
                   help="mixed-precision training steps under torch.autocast (bf16: CPU or CUDA; fp16: CUDA only, "
                        "with loss scaling; fp32: none); evaluation stays fp32. Default: the preset's (fp32 for "
                        "every dataset preset)")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--model", choices=sorted(MODELS), default=None,
                   help="default: the dataset preset's (with --dp: scatter-net on MNIST / Fashion-MNIST)")
    t.add_argument("--width", type=int, default=None, help="model width (channels of the first stage)")
    t.add_argument("--block", choices=list(RESIDUAL_BLOCKS), default=None,
                   help="residual block of a liresnet model: 'convex' (default: ConvexResidual around an "
                        "orthogonal 3x3 conv) or 'sll' (SLLBlock)")
    t.add_argument("--parametrization", choices=list(PARAMETRIZATIONS), default=None,
                   help="how the orthogonal layers keep their weights: 'retraction' (default: the orthogonal "
                        "factor is stored and retracted after every step) or 'polar' (polar factor of a raw "
                        "parameter, recomputed every step)")
    t.add_argument("--optimizer", choices=list(OPTIMIZERS), default=None,
                   help="adam (default): Adam on every parameter; turbomuon / schatten: TurboMuon / SchattenMuon "
                        "(adaptive p) on the hidden matrices at --matrix-lr, Adam at --lr on the rest")
    t.add_argument("--matrix-lr", type=float, default=None,
                   help=f"--optimizer turbomuon / schatten: peak lr of the matrices (default {DEFAULT_MATRIX_LR})")
    t.add_argument("--offset", type=float, default=None, help="margin asked by the loss (logit units)")
    t.add_argument("--seed", type=int, default=None, help="default: 0")
    t.add_argument("--dp", action="store_true",
                   help="differentially private training (clipping-free DP-SGD, lipnet.privacy)")
    t.add_argument("--epsilon", type=float, default=None, help="--dp: privacy budget spent by the end of training")
    t.add_argument("--delta", type=float, default=None, help="--dp: delta (must be < 1/n; default 1e-5)")
    t.add_argument("--input-bound", type=float, default=None,
                   help="--dp: inputs are projected onto the L2 ball of this radius (raw pixels; default: preset)")
    t.add_argument("--loss-clip", type=float, default=None,
                   help="--dp: clip each sample's loss gradient w.r.t. the logits to this norm and calibrate the "
                        "noise to it (lipnet.nn.ClippedLossGradient; default: the preset's; 0: off)")
    t.add_argument("--accountant", choices=["rdp", "prv"], default=None, help="--dp: opacus accountant (default: rdp)")
    t.add_argument("--noise", choices=["global", "per_layer"], default=None,
                   help="--dp: noise calibration (default: the preset's, per_layer)")
    t.add_argument("--dp-train", choices=["dense", "all"], default=None,
                   help="--dp: train only the dense layers (convolutions stay random orthogonal; the preset's "
                        "default) or every layer")
    t.add_argument("--holdout", type=int, default=None,
                   help="leave N training images out (a fixed random subset) and report every epoch's "
                        "accuracy on them instead of the test split, to choose a recipe without the test set")
    t.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this machine (DDP; gloo on CPU, nccl on CUDA); "
                        "under torchrun this is taken from its environment")
    _add_common(t)
    c = sub.add_parser("certify", help="certified / PGD accuracy of a checkpoint, with a plot")
    _add_model_source(c)
    c.add_argument("--eps", type=float, nargs="+", default=None, help="L2 radii in raw-pixel units")
    c.add_argument("--pgd-steps", type=int, default=20, help="PGD steps per radius (0: no attack)")
    c.add_argument("--pgd-points", type=int, default=1000,
                   help="attack the first N test points (PGD is ~(steps+1)x a forward+backward per point and eps)")
    c.add_argument("--json", default=None, help="write the results as JSON here")
    c.add_argument("--plot", default=None,
                   help="PNG path (default: CHECKPOINT/certified.png; with --pretrained NAME: ./certified-NAME.png)")
    _add_common(c)
    k = sub.add_parser("conformal", help="robust conformal prediction sets: coverage and set size per eps")
    _add_model_source(k)
    k.add_argument("--alpha", type=float, default=0.1, help="miscoverage level (sets cover with prob. >= 1 - alpha)")
    k.add_argument("--eps", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5], help="L2 attack budgets (raw pixels)")
    k.add_argument("--score", choices=["lac", "aps"], default="lac")
    k.add_argument("--randomized", action="store_true", help="randomized APS (u ~ U(0, 1))")
    k.add_argument("--temperature", type=float, default=None, help="softmax temperature (default: the training loss')")
    k.add_argument("--calibration-fraction", type=float, default=0.5,
                   help="share of the test split used for calibration; the rest is the test/hold-out set")
    k.add_argument("--delta", type=float, default=0.05, help="failure probability of the vanilla coverage bound")
    k.add_argument("--pgd-steps", type=int, default=10, help="PGD steps of the set-exclusion attack (0: no attack)")
    k.add_argument("--pgd-points", type=int, default=1000, help="attack the first N test points")
    k.add_argument("--seed", type=int, default=0, help="seed of the calibration/test split")
    k.add_argument("--json", default=None, help="write the rows as JSON here")
    k.add_argument("--plot", default=None,
                   help="PNG path (default: CHECKPOINT/conformal.png; with --pretrained NAME: ./conformal-NAME.png)")
    _add_common(k)
    d = sub.add_parser("download", help="fetch the datasets the data root lacks (torchvision's sources, MD5-checked)")
    d.add_argument("datasets", nargs="+", choices=sorted(lipdata.DATASETS), metavar="DATASET",
                   help=f"one or more of {', '.join(sorted(lipdata.DATASETS))}")
    d.add_argument("--data-root", default=None, help="target folder (default: $LIPNET_DATA, else ~/.cache/lipnet/data)")
    d.add_argument("--mirror", default=None, metavar="URL", help="base URL serving the files (default: torchvision's)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _run_dir(args) -> Path:
    """The directory `lipnet train` writes: --out, else the --resume directory."""
    return Path(args.out if args.out is not None else args.resume)


def _dataset(args, name: str, split: str, limit: int | None) -> lipdata.ImageDataset:
    """``split`` of ``name`` from the command line's data root (downloaded there with --download)."""
    return lipdata.load_dataset(name, split, args.data_root, limit=limit, progress=not args.no_progress,
                                download=args.download, mirror=args.mirror)


def _loaders(config: TrainConfig, args, world_size: int = 1):
    """(train loader, evaluation loader): the evaluation split is the test split, or with
    ``config.holdout`` that many training images left out of training (the test split is not read)."""
    train = _dataset(args, config.dataset, "train", config.limit)
    if config.holdout:
        train, test = lipdata.holdout_split(train, config.holdout)
    else:
        test = _dataset(args, config.dataset, "test", config.limit)
    if world_size > 1:  # this rank's share of the same global batches (same seed on every rank)
        train_loader = lipdist.ShardedBatchLoader(train, config.batch_size, shuffle=True, seed=config.seed)
    else:
        train_loader = lipdata.BatchLoader(train, config.batch_size, shuffle=True,
                                           generator=torch.Generator().manual_seed(config.seed))
    return train_loader, lipdata.BatchLoader(test, 500, shuffle=False)


# Set in the processes `lipnet train --nproc N` starts: their parent holds the run directory.
_PARENT_HOLDS_OUT = "LIPNET_PARENT_HOLDS_OUT"


def _train_process(argv: list[str]) -> None:
    """One process of ``lipnet train --nproc N`` (started by ``lipnet.distributed.launch``)."""
    os.environ[_PARENT_HOLDS_OUT] = "1"
    code = main(argv)
    if code:
        raise SystemExit(code)


# Options of `lipnet train` whose value is part of the result, and the TrainConfig field each sets.
_RESULT_OPTIONS = (("--dataset", "dataset"), ("--epochs", "epochs"), ("--batch-size", "batch_size"), ("--lr", "lr"),
                   ("--model", "model"), ("--offset", "offset"), ("--seed", "seed"), ("--limit", "limit"),
                   ("--amp", "amp"), ("--holdout", "holdout"), ("--optimizer", "optimizer"),
                   ("--matrix-lr", "matrix_lr"))


def _model_default(model: str, key: str):
    """The default of ``MODELS[model]``'s keyword ``key`` (what a checkpoint without it was built with), or None."""
    parameter = inspect.signature(MODELS[model]).parameters.get(key)
    return None if parameter is None else parameter.default


def _resume_config(args, ckpt: Checkpoint, world_size: int) -> TrainConfig:
    """The configuration of the run to resume; ValueError if the command line asks for another one
    (an option given with a different value) or the checkpoint cannot be resumed."""
    config = ckpt.config
    ckpt.check_resumable(world_size)
    given = {attr: getattr(args, attr) for _, attr in _RESULT_OPTIONS}
    if args.amp == "fp32":  # "no autocast": a conflict only with a run that had one
        given["amp"] = "fp32" if config.amp is not None else None
    conflicts = [f"{flag} {given[attr]} (the run's: {getattr(config, attr)})" for flag, attr in _RESULT_OPTIONS
                 if given[attr] is not None and given[attr] != getattr(config, attr)]
    if args.preset is not None:
        conflicts.append(f"--preset {args.preset} (a resumed run keeps the configuration its checkpoint stores)")
    run_block = config.model_config.get("block", _model_default(config.model, "block"))
    for flag, key in (("--width", "width"), ("--parametrization", "parametrization"), ("--block", "block")):
        value, run_value = getattr(args, key), run_block if key == "block" else config.model_config.get(key)
        if value is not None and value != run_value:
            conflicts.append(f"{flag} {value} (the run's: {run_value})")
    if args.dp and not config.private:
        conflicts.append("--dp (the run is not private)")
    if config.private:
        run_privacy = {"--epsilon": ("epsilon", config.privacy.epsilon), "--delta": ("delta", config.privacy.delta),
                       "--accountant": ("accountant", config.privacy.accountant),
                       "--noise": ("noise", config.privacy.noise), "--loss-clip": ("loss_clip", config.privacy.loss_clip)}
        for flag, (attr, run_value) in run_privacy.items():
            value = getattr(args, attr)
            if value is not None and value != run_value:
                conflicts.append(f"{flag} {value} (the run's: {run_value})")
    if conflicts:
        raise ValueError(f"--resume {args.resume}: {', '.join(conflicts)} would change the run; a resumed run keeps "
                         "its configuration (leave these options out, or start a new run with --out)")
    return config


def cmd_train(args) -> int:
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if args.dp and args.epsilon is None:
        raise ValueError("--dp needs --epsilon (the privacy budget), e.g. --dp --epsilon 1.0 --delta 1e-5")
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    world_size = max(args.nproc, int(os.environ.get("WORLD_SIZE", "1")))
    if args.resume is not None:
        ckpt = read_checkpoint(args.resume)
        config = _resume_config(args, ckpt, world_size)
        if ckpt.epoch >= config.epochs:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"{args.resume}: all {config.epochs} epochs are done, nothing to resume")
            return 0
    else:
        ckpt, config = None, _train_config(args)
    amp_dtype(config.amp, args.device)
    if not config.private and config.batch_size % world_size:
        raise ValueError(f"--batch-size {config.batch_size} (the global batch) must be divisible by the number of "
                         "processes")
    out = _run_dir(args)
    # one process claims the directory before any data is read: the only one, the launcher of
    # --nproc N, or rank 0 under torchrun
    claims = not os.environ.get(_PARENT_HOLDS_OUT) and os.environ.get("RANK", "0") == "0"
    lock = claim_run_dir(out, resume=args.resume is not None and out == Path(args.resume),
                         overwrite=args.overwrite) if claims else None
    try:
        if args.nproc > 1 and "WORLD_SIZE" not in os.environ:  # not under torchrun: start the processes ourselves
            lipdist.launch(_train_process, args.nproc, args=(args.argv,))
            return 0
        ctx = lipdist.init_distributed(args.device)
        try:
            result = _train_private(args, ctx, config, ckpt) if config.private else _train(args, ctx, config, ckpt)
        except BaseException:
            lipdist.destroy_distributed(barrier=False)
            raise
        lipdist.destroy_distributed()
        return result
    finally:
        if lock is not None:
            lock.release()


def _train_config(args) -> TrainConfig:
    """The dataset's preset (the private one with --dp) with the command line's overrides; every
    rule between options is TrainConfig's."""
    privacy = {"epsilon": args.epsilon, "delta": args.delta, "accountant": args.accountant,
               "input_bound": args.input_bound, "noise": args.noise, "trainable": args.dp_train,
               "loss_clip": args.loss_clip}
    return TrainConfig.from_preset(args.dataset, private=args.dp, model=args.model, preset=args.preset,
                                   model_overrides={"width": args.width, "block": args.block,
                                                    "parametrization": args.parametrization},
                                   privacy=privacy, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                   offset=args.offset, seed=args.seed, limit=args.limit, amp=args.amp,
                                   holdout=args.holdout, optimizer=args.optimizer, matrix_lr=args.matrix_lr)


def _rank_log(ctx: lipdist.DistributedContext):
    """(log, " x N processes (backend)"): only rank 0 prints."""
    log = print if ctx.is_main else (lambda _: None)
    return log, (f" x {ctx.world_size} processes ({ctx.backend})" if ctx.world_size > 1 else "")


def _train(args, ctx: lipdist.DistributedContext, config: TrainConfig, resume: Checkpoint | None) -> int:
    """Train (or, with ``resume``, continue) ``config``; ``fit`` rewrites the checkpoint after every epoch."""
    out = _run_dir(args)
    train_loader, test_loader = _loaders(config, args, ctx.world_size)
    torch.manual_seed(config.seed)  # the initialization (a resumed run then loads its weights and RNG states)
    model = build_model(config.model, **config.model_config).to(ctx.device)
    log, procs = _rank_log(ctx)
    what = f"training {config.model} on {config.dataset}"
    if resume is not None:
        what = f"resuming {resume.path} after epoch {resume.epoch}/{config.epochs}: {what}"
    amp = f" with {config.amp} autocast" if config.amp else " in fp32"
    optimizer = ("" if config.optimizer == "adam" else
                 f", {config.optimizer} at lr {config.matrix_lr:g} on the matrices and Adam at lr {config.lr:g}")
    evaluation = f"{len(test_loader.dataset)} held-out train" if config.holdout else f"{len(test_loader.dataset)} test"
    log(f"{what} ({len(train_loader.dataset)} train / {evaluation}) for {config.epochs} epochs "
        f"on {ctx.device}{procs}{amp}{optimizer}")
    start = time.perf_counter()
    fit(model, train_loader, test_loader, config, device=ctx.device, progress=not args.no_progress, log=log,
        dist_ctx=ctx, checkpoint_dir=out, resume=resume)
    log(f"saved {out / CHECKPOINT} ({time.perf_counter() - start:.0f}s)")
    return 0


def _train_private(args, ctx: lipdist.DistributedContext, config: TrainConfig, resume: Checkpoint | None) -> int:
    """--dp: one Poisson batch per step split over the ranks, noise added once across them
    (lipnet.privacy.PrivateTrainer); rank 0 evaluates, logs and writes the checkpoint after every epoch.
    Frozen-prefix features are cached in ``$LIPNET_CACHE/features``."""
    train = _dataset(args, config.dataset, "train", config.limit)
    test = _dataset(args, config.dataset, "test", config.limit)
    torch.manual_seed(config.seed)
    model = build_model(config.model, **config.model_config).to(ctx.device)
    log, procs = _rank_log(ctx)
    what = f"private training of {config.model} on {config.dataset}"
    if resume is not None:
        what = f"resuming {resume.path} after epoch {resume.epoch}/{config.epochs}: {what}"
    log(f"{what} ({len(train)} train / {len(test)} test) for "
        f"{config.epochs} epochs on {ctx.device}{procs}: target (epsilon={config.privacy.epsilon:g}, "
        f"delta={config.privacy.delta:g})")
    start = time.perf_counter()
    out = _run_dir(args)
    history = fit_private(model, train, lipdata.BatchLoader(test, 500), config, device=ctx.device,
                          progress=not args.no_progress and ctx.is_main, log=log, evaluate=ctx.is_main,
                          checkpoint_dir=out if ctx.is_main else None, resume=resume,
                          feature_cache=lipdata.default_cache_dir() / "features")
    if not ctx.is_main:
        return 0
    print(f"privacy: ({history[-1]['epsilon']:.3f}, {config.privacy.delta:g})-DP after {history[-1]['steps']} steps "
          f"(accountant {config.privacy.accountant}); saved {out / CHECKPOINT} ({time.perf_counter() - start:.0f}s)")
    return 0


def _plot_path(args, folder: Path, stem: str) -> Path:
    """--plot, else ``folder/STEM.png`` (``STEM-NAME.png`` for --pretrained NAME)."""
    if args.plot:
        return Path(args.plot)
    return folder / (f"{stem}-{args.pretrained}.png" if args.pretrained else f"{stem}.png")


def cmd_certify(args) -> int:
    model, config, folder = _load_model(args)
    eps = args.eps if args.eps is not None else list(config.eval_eps)
    test = _dataset(args, config.dataset, "test", args.limit)
    loader = lipdata.BatchLoader(test, 500, shuffle=False)
    report = certified_accuracy(model, loader, eps, pgd_steps=args.pgd_steps, pgd_points=args.pgd_points,
                                device=args.device, progress=not args.no_progress)
    lower = lipschitz_lower_bound(model, next(iter(loader))[0][:128].to(args.device))
    rows = [[f"{e:.4g}", f"{report.certified[e]:.2%}"] + ([f"{report.pgd[e]:.2%}"] if report.pgd else []) for e in eps]
    print(f"{config.model} on {config.dataset} test ({report.n} images): clean accuracy {report.clean:.2%}")
    print(f"Lipschitz constant: sound upper bound {report.lipschitz_bound:.6f}, empirical lower bound {lower:.6f}")
    head = ["eps", f"certified ({report.n})"] + ([f"PGD-{args.pgd_steps} (first {report.pgd_n})"] if report.pgd else [])
    print(format_table(rows, head))
    if args.json:
        result = {"dataset": config.dataset, "n": report.n, "clean": report.clean, "certified": report.certified,
                  "pgd": report.pgd, "pgd_n": report.pgd_n, "pgd_steps": args.pgd_steps,
                  "lipschitz_bound": report.lipschitz_bound, "lipschitz_lower": lower}
        write_output(Path(args.json), "--json", lambda path: path.write_text(json.dumps(result, indent=2)))
    plot = _plot_path(args, folder, "certified")
    write_output(plot, "the plot", lambda path: plot_certified(report.radii, report.pgd, path,
                                                        f"{config.dataset}: certified accuracy vs eps"), PLOT_HINT)
    print(f"plot: {plot}")
    return 0


def cmd_conformal(args) -> int:
    if args.pgd_steps < 0 or args.pgd_points < 0:
        raise ValueError("--pgd-steps and --pgd-points must be >= 0")
    model, config, folder = _load_model(args)
    temperature = config.temperature if args.temperature is None else args.temperature
    test = _dataset(args, config.dataset, "test", args.limit)
    cal_set, test_set = lipdata.random_split(test, args.calibration_fraction, seed=args.seed)
    cal = lipdata.BatchLoader(cal_set, 500, device=args.device)
    held = lipdata.BatchLoader(test_set, 500, device=args.device)
    attacked = lipdata.BatchLoader(test_set.subset(torch.arange(min(args.pgd_points, len(test_set)))), 500,
                                   device=args.device)
    kw = dict(score=args.score, alpha=args.alpha, temperature=temperature, randomized=args.randomized,
              device=args.device, progress=not args.no_progress)
    # One calibration serves both: in inference mode the same threshold gives vanilla sets (eps = 0)
    # and sets robust to any eps.
    clf = ConformalClassifier(model, **kw).calibrate(cal).fit_coverage_bound(held, args.delta)
    attack = args.pgd_steps > 0 and args.pgd_points > 0
    v = clf.evaluate(held, eps=0.0)
    rows = []
    for eps in args.eps:
        r = clf.evaluate(held, eps=eps)
        row = {"eps": eps, "alpha": args.alpha, "vanilla_coverage": v.coverage, "vanilla_size": v.mean_size,
               "vanilla_coverage_bound": clf.vanilla_coverage_lower_bound(eps),
               "robust_coverage": r.coverage, "robust_size": r.mean_size, "robust_median_size": r.median_size,
               "robust_singletons": r.singleton_rate, "vanilla_attacked_coverage": None, "robust_attacked_coverage": None}
        if attack:
            row["vanilla_attacked_coverage"] = clf.evaluate(attacked, eps=0.0, attack="pgd", attack_eps=eps,
                                                            attack_steps=args.pgd_steps).coverage
            row["robust_attacked_coverage"] = clf.evaluate(attacked, eps=eps, attack="pgd",
                                                           attack_steps=args.pgd_steps).coverage
        rows.append(row)
    print(f"{config.model} on {config.dataset}: {args.score.upper()} score, T={temperature:g}, alpha={args.alpha}, "
          f"{len(cal_set)} calibration / {len(test_set)} test points, Lipschitz bound {clf.lipschitz:.6f}")

    def pct(value):
        return "-" if value is None else f"{value:.2%}"
    table = [[f"{r['eps']:.4g}", pct(r["vanilla_coverage"]), f"{r['vanilla_size']:.2f}", pct(r["vanilla_attacked_coverage"]),
              pct(r["vanilla_coverage_bound"]), pct(r["robust_coverage"]), f"{r['robust_size']:.2f}",
              pct(r["robust_attacked_coverage"])] for r in rows]
    pgd = f"PGD-{args.pgd_steps}, first {min(args.pgd_points, len(test_set))}"
    print(format_table(table, ["eps", "vanilla cov", "vanilla size", f"vanilla cov ({pgd})",
                               f"vanilla guaranteed (1-{args.delta:g} conf.)", "robust cov", "robust size",
                               f"robust cov ({pgd})"]))
    print(f"robust sets: coverage >= {1 - args.alpha:.0%} under every L2 attack of size eps (sound); "
          "vanilla guaranteed: lower bound on vanilla CP's coverage under any such attack")
    if args.json:
        text = json.dumps({"dataset": config.dataset, "score": args.score, "temperature": temperature,
                           "alpha": args.alpha, "lipschitz_bound": clf.lipschitz, "n_calibration": len(cal_set),
                           "n_test": len(test_set), "rows": rows}, indent=2)
        write_output(Path(args.json), "--json", lambda path: path.write_text(text))
    plot = _plot_path(args, folder, "conformal")
    write_output(plot, "the plot", lambda path: plot_conformal(rows, path,
                                                                  f"{config.dataset}: conformal sets, alpha={args.alpha}"),
                  PLOT_HINT)
    print(f"plot: {plot}")
    return 0


def cmd_download(args) -> int:
    from .download import download

    root = lipdata.resolve_data_root(args.data_root, create=True)
    for name in args.datasets:
        present = lipdata.find_layout(name, root)
        if present is None:
            download(name, root, mirror=args.mirror, progress=not args.no_progress)
            print(f"{name}: downloaded into {lipdata.find_layout(name, root)}")
        else:
            print(f"{name}: already there, {present}")
    return 0


COMMANDS = {"train": cmd_train, "certify": cmd_certify, "conformal": cmd_conformal, "download": cmd_download}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "train" and args.resume is None:
        if args.preset is not None and args.dataset is None:  # a named preset knows its dataset
            args.dataset = NAMED_PRESETS[args.preset][0] if args.preset in NAMED_PRESETS else args.preset
        missing = [flag for flag, value in (("--dataset", args.dataset), ("--out", args.out)) if value is None]
        if missing:
            parser.error(f"train: {' and '.join(missing)} required (or --resume DIR to continue a run)")
    args.argv = argv  # `train --nproc N` re-runs the same command line in each process
    checks = input_checks_enabled()
    set_input_checks(False)  # uint8 datasets are finite; certify checks each batch itself
    previous_term = _terminate_as_interrupt()
    try:
        return COMMANDS[args.command](args)
    except (lipdata.DataError, ValueError, FileNotFoundError, OutputError) as err:
        print(f"lipnet {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        signame = "SIGTERM" if isinstance(stop, _Terminated) else "interrupt"
        print(f"lipnet {args.command}: stopped by {signame}. {_resume_hint(args)}".rstrip(), file=sys.stderr)
        return 143 if isinstance(stop, _Terminated) else 130
    finally:
        set_input_checks(checks)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is so that it stops the way Ctrl-C does."""


def _terminate_as_interrupt():
    """Make SIGTERM raise :class:`_Terminated` in the main thread; returns the previous handler
    (None where signals cannot be set: not the main thread)."""
    def handler(signum, frame):
        raise _Terminated()
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


def _resume_hint(args) -> str:
    """What an interrupted `lipnet train` left: its last checkpoint and the command continuing it."""
    if args.command != "train" or getattr(args, "dp", False):
        return ""
    out = _run_dir(args)
    info = out / "config.json"
    try:
        epoch = json.loads(info.read_text())["epoch"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"No epoch was completed: {out / CHECKPOINT} was not written."
    return f"Last checkpoint: {out / CHECKPOINT} (epoch {epoch}); continue with: lipnet train --resume {out}"


if __name__ == "__main__":
    sys.exit(main())
