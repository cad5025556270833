"""Train a preset model and report clean / certified / PGD accuracy, bounds and training time.

    python benchmarks/certified.py --dataset mnist --epochs 8 --width 32 --offset 2.0 \\
        --data-root ../shared/datasets --out runs/bench_mnist --json benchmarks/results/certified_mnist.json
    # evaluate a saved run again (e.g. with other radii) without retraining:
    python benchmarks/certified.py --from-checkpoint runs/bench_mnist --json ...

PGD runs on the first --pgd-points test points (default 1000); certified accuracy on all of them.

    # CIFAR-10: the 2-core recipe trained by `lipnet train --dataset cifar10 --out runs/cifar10-cpu`
    python benchmarks/certified.py --from-checkpoint runs/cifar10-cpu \
        --json benchmarks/results/certified_cifar10.json --curve benchmarks/results/certified_cifar10_curve.png

Output JSON: {"dataset", "clean", "certified": {eps: acc}, "pgd": {eps: acc}, "lipschitz_bound",
"lipschitz_lower", "train_seconds", "seconds_per_epoch", "epochs", "parameters", "cpu", "threads",
"config", "history", "machine"}. ``train_seconds`` sums the epochs' training time as the run logged it
(a resumed run's epochs included, evaluation excluded). ``--curve``: the learning curve (clean and
certified test accuracy per epoch) as a PNG.
The CIFAR-10 copy in ../shared/datasets is a lossy JPEG re-encoding: its numbers are close to,
not identical with, published CIFAR-10 numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lipnet import data as lipdata
from lipnet.certify import certified_accuracy, lipschitz_lower_bound
from lipnet.models import build_model
from lipnet.nn import set_input_checks
from lipnet.checkpoints import load_checkpoint, save_checkpoint
from lipnet.presets import PRESETS, TrainConfig
from lipnet.training import fit

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this script
from _harness import machine_info  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=sorted(PRESETS))
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--offset", type=float, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--eps", type=float, nargs="+", default=None)
    p.add_argument("--pgd-steps", type=int, default=20)
    p.add_argument("--pgd-points", type=int, default=1000)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="also save the checkpoint here")
    p.add_argument("--from-checkpoint", default=None,
                   help="skip training: evaluate a checkpoint saved by --out / `lipnet train` (its history gives the training time)")
    p.add_argument("--json", default=None)
    p.add_argument("--curve", default=None, help="PNG of the per-epoch clean / certified accuracy")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()
    set_input_checks(False)
    if args.from_checkpoint:
        model, config, history = load_checkpoint(args.from_checkpoint, map_location=args.device)
        args.dataset, args.limit = config.dataset, config.limit
    else:
        config = TrainConfig.from_preset(args.dataset, epochs=args.epochs, offset=args.offset, lr=args.lr,
                                         batch_size=args.batch_size, limit=args.limit,
                                         model_overrides={"width": args.width})
    eps = args.eps or list(config.eval_eps)
    torch.manual_seed(config.seed)
    test = lipdata.load_dataset(args.dataset, "test", args.data_root, limit=args.limit)
    test_loader = lipdata.BatchLoader(test, 500)
    if not args.from_checkpoint:
        train = lipdata.load_dataset(args.dataset, "train", args.data_root, limit=args.limit)
        train_loader = lipdata.BatchLoader(train, config.batch_size, shuffle=True,
                                           generator=torch.Generator().manual_seed(config.seed))
        model = build_model(config.model, **config.model_config).to(args.device)
        history = fit(model, train_loader, test_loader, config, device=args.device, progress=args.progress)
        if args.out:
            save_checkpoint(args.out, model, config, history)
    train_seconds = sum(h["train_seconds"] for h in history)
    report = certified_accuracy(model, test_loader, eps, pgd_steps=args.pgd_steps, pgd_points=args.pgd_points,
                                device=args.device)
    lower = lipschitz_lower_bound(model, next(iter(test_loader))[0][:256].to(args.device))
    info = machine_info(args.device)
    result = {"dataset": args.dataset, "n_test": report.n, "clean": report.clean, "certified": report.certified,
              "pgd": report.pgd, "pgd_steps": args.pgd_steps, "pgd_n": report.pgd_n, "lipschitz_bound": report.lipschitz_bound,
              "lipschitz_lower": lower, "train_seconds": train_seconds,
              "seconds_per_epoch": train_seconds / max(len(history), 1), "epochs": len(history),
              "parameters": sum(p.numel() for p in model.parameters()), "cpu": info["cpu"],
              "threads": info["threads"], "config": config.__dict__, "history": history,
              "machine": {**info, "torch_threads": info["threads"]}}
    print(json.dumps({k: v for k, v in result.items() if k not in ("history", "config", "machine")}, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    if args.curve:
        # a --holdout run evaluated each epoch on held-out training images, not on the test split
        split = f"held-out ({config.holdout} training images)" if config.holdout else "test"
        plot_learning_curve(history, Path(args.curve), f"{args.dataset}: {split} accuracy per epoch")


def plot_learning_curve(history: list[dict], path: Path, title: str) -> None:
    """Clean and certified accuracy (each radius) against the epoch, from a run's history."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(epochs, [h["clean"] for h in history], "k-", label="clean")
    for eps in history[-1]["certified"]:
        ax.plot(epochs, [h["certified"][eps] for h in history], label=f"certified @ {float(eps):.3g}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
