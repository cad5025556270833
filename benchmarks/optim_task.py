"""Optimizers on a real task: a small CNN on Fashion-MNIST, learning rates chosen on a held-out split.

    python benchmarks/optim_task.py --jobs 2 --json benchmarks/results/optim_task_fashion.json \
        --md benchmarks/results/optim_task_fashion.md --plot benchmarks/results/optim_task_fashion_p.png

Model: three 3x3 convolutions (1 -> 16 -> 32 -> 64, each BatchNorm, ReLU, 2x2 max-pool), a hidden
linear layer 576 -> 256 and a linear head; convolution kernels are stored as 2-D (out, in*9)
parameters so that ``torch.optim.Muon`` accepts them (``FlatConv2d`` of benchmarks/optim.py).
``lipnet.optim.split_params`` gives the four hidden matrices to the matrix optimizer and the head,
biases and BatchNorm gains to an auxiliary AdamW (lr ``--aux-lr``); the ``adamw`` row trains
everything with AdamW. Every run: batch 128, ``--epochs`` epochs, cosine decay of every lr to 0, no
weight decay, no augmentation.

Protocol: the training set is split by ``lipnet.data.holdout_split`` into 50,000 training and
10,000 held-out images. Phase 1 trains seed 0 of every optimizer at every lr of its grid (matrix
optimizers 0.01, 0.03, 0.1; AdamW 1e-3, 3e-3, 1e-2) and keeps the lr with the best held-out
accuracy -- a best lr at an end of the grid extends the grid one step further (1-3-10 steps, at most
six lrs); phase 2 trains seeds 1 and 2 at that lr. The test set is
only evaluated, never used for a choice. Reported: test accuracy mean and spread (min..max) over
the three seeds, seconds per epoch and the optimizer step's median, and for SchattenMuon adaptive
the p of every matrix at every criterion evaluation (``--plot``).

``--jobs 2`` runs two trainings at once, each on one thread (the two cores of the machine); every
run then shares the machine alike, so its seconds per epoch compare across rows (not with a run
alone). Results are written after every run and a rerun with the same ``--json`` skips the runs
already in it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from lipnet.data import batches, holdout_split, load_dataset  # noqa: E402
from lipnet.optim import SchattenMuon, TurboMuon, split_params  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine_info  # noqa: E402
from optim import FlatConv2d  # noqa: E402

OPTIMIZERS = ("schatten-adaptive", "schatten-adaptive-uncentered", "schatten-p2", "schatten-p4", "turbomuon",
              "torch-muon", "adamw")
MATRIX_LRS = (0.01, 0.03, 0.1)
ADAMW_LRS = (1e-3, 3e-3, 1e-2)
MAX_LRS = 6
HOLDOUT = 10_000
BATCH = 128


def make_net() -> nn.Sequential:
    layers, cin = [], 1
    for w in (16, 32, 64):
        layers += [FlatConv2d(cin, w), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
        cin = w
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))


def make_optimizers(name: str, model: nn.Module, lr: float, aux_lr: float) -> list[torch.optim.Optimizer]:
    if name == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)]
    hidden, rest = split_params(model)
    aux = torch.optim.AdamW(rest, lr=aux_lr, weight_decay=0.0)
    if name == "torch-muon":
        return [torch.optim.Muon(hidden, lr=lr, momentum=0.95, nesterov=True, weight_decay=0.0,
                                 adjust_lr_fn="original"), aux]
    if name == "turbomuon":
        return [TurboMuon(hidden, lr=lr), aux]
    if name == "schatten-adaptive-uncentered":   # features never centered, the criterion every 10 / 50 steps
        opt = SchattenMuon(hidden, lr=lr, p="adaptive", p_every=10, act_every=50)
        opt.watch(model, center=False)
        return [opt, aux]
    p = {"schatten-adaptive": "adaptive", "schatten-p2": 2.0, "schatten-p4": 4.0}[name]
    opt = SchattenMuon(hidden, lr=lr, p=p)
    if p == "adaptive":
        opt.watch(model)
    return [opt, aux]


def accuracy(model: nn.Module, data) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in batches(data, 1000):
            correct += (model(x).argmax(1) == y).sum().item()
    model.train()
    return correct / len(data)


def train_one(job: dict) -> dict:
    """One training run (in a worker process, one thread): held-out and test accuracy, timings,
    loss curve, and the adaptive p history."""
    torch.set_num_threads(job["threads"])
    train, held = holdout_split(load_dataset("fashion-mnist", "train", job["data_root"], progress=False), HOLDOUT)
    test = load_dataset("fashion-mnist", "test", job["data_root"], progress=False)
    torch.manual_seed(job["seed"])
    model = make_net()
    opts = make_optimizers(job["optimizer"], model, job["lr"], job["aux_lr"])
    steps = job["epochs"] * math.ceil(len(train) / BATCH)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps))) for o in opts]
    gen = torch.Generator().manual_seed(job["seed"])
    epoch_s, step_s, losses, p_hist = [], [], [], []
    schatten = opts[0] if isinstance(opts[0], SchattenMuon) and opts[0].defaults["p"] == "adaptive" else None
    t = 0
    for _ in range(job["epochs"]):
        start = time.perf_counter()
        for x, y in batches(train, BATCH, shuffle=True, generator=gen):
            loss = F.cross_entropy(model(x), y)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            s = time.perf_counter()
            for o in opts:
                o.step()
            step_s.append(time.perf_counter() - s)
            for sc in scheds:
                sc.step()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{job['optimizer']} lr={job['lr']}: loss is {loss.item()}")
            if t % 50 == 0:
                losses.append([t, loss.item()])
            if schatten is not None and t % schatten.p_every == 0:
                p_hist.append([t + 1] + schatten.current_p())
            t += 1
        epoch_s.append(time.perf_counter() - start)
    return {**{k: job[k] for k in ("optimizer", "lr", "seed", "epochs", "aux_lr", "threads")},
            "holdout_acc": accuracy(model, held), "test_acc": accuracy(model, test), "epoch_seconds": epoch_s,
            "step_ms_median": 1e3 * statistics.median(step_s), "loss": losses, "p_history": p_hist,
            "matrices": [list(w.shape) for w in split_params(model)[0]]}


def next_lr(lr: float, direction: int) -> float:
    """The neighbour of ``lr`` on the 1-3-10 grid (1e-3, 3e-3, 1e-2, ...) above (+1) or below (-1)."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = round(lr / 10 ** exponent)
    if mantissa not in (1, 3):
        raise ValueError(f"lr {lr} is not on the 1-3-10 grid")
    if direction > 0:
        mantissa, exponent = (3, exponent) if mantissa == 1 else (1, exponent + 1)
    else:
        mantissa, exponent = (3, exponent - 1) if mantissa == 1 else (1, exponent)
    return float(f"{mantissa * 10.0 ** exponent:.3g}")


def _key(r: dict) -> tuple:
    return r["optimizer"], float(r["lr"]), r["seed"]


def run_jobs(jobs: list[dict], results: list[dict], workers: int, save) -> None:
    done = {_key(r) for r in results}
    todo = [j for j in jobs if _key(j) not in done]
    if not todo:
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for r in pool.map(train_one, todo):
            results.append(r)
            save()
            print(f"{r['optimizer']:18s} lr {r['lr']:<7g} seed {r['seed']}: held-out {r['holdout_acc']:.2%} "
                  f"test {r['test_acc']:.2%}  {statistics.fmean(r['epoch_seconds']):.0f} s/epoch", flush=True)


def best_lrs(results: list[dict]) -> dict[str, float]:
    best = {}
    for r in results:
        if r["seed"] == 0 and (r["optimizer"] not in best or r["holdout_acc"] > best[r["optimizer"]][1]):
            best[r["optimizer"]] = (r["lr"], r["holdout_acc"])
    return {k: v[0] for k, v in best.items()}


def summary_rows(results: list[dict], chosen: dict[str, float], seeds: int) -> list[dict]:
    rows = []
    for name, lr in chosen.items():
        runs = [r for r in results if r["optimizer"] == name and r["lr"] == lr and r["seed"] < seeds]
        accs = [r["test_acc"] for r in runs]
        tried = sorted({r["lr"] for r in results if r["optimizer"] == name and r["seed"] == 0})
        rows.append({"optimizer": name, "lr": lr, "lr_at_grid_edge": lr in (tried[0], tried[-1]), "seeds": len(runs),
                     "test_acc_mean": statistics.fmean(accs), "test_acc_min": min(accs), "test_acc_max": max(accs),
                     "holdout_acc_seed0": next(r["holdout_acc"] for r in runs if r["seed"] == 0),
                     "epoch_seconds": statistics.fmean(s for r in runs for s in r["epoch_seconds"]),
                     "step_ms": statistics.median(r["step_ms_median"] for r in runs)})
    return rows


def markdown(rows: list[dict], results: list[dict], meta: dict) -> str:
    lines = [f"{meta['machine']}, torch {meta['torch']}, {meta['jobs']} runs at once, 1 thread each; "
             f"{meta['epochs']} epochs of batch {BATCH} on 50,000 Fashion-MNIST training images; lr chosen on "
             f"10,000 held-out training images (seed 0), test accuracy over seeds 0-2 on the 10,000 test images.",
             "", "| optimizer | lr (chosen) | test acc mean | min .. max | held-out acc (seed 0) | s / epoch | "
             "optimizer step ms |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["test_acc_mean"]):
        edge = " (grid edge)" if r["lr_at_grid_edge"] else ""
        lines.append(f"| {r['optimizer']} | {r['lr']:g}{edge} | {r['test_acc_mean']:.2%} | {r['test_acc_min']:.2%} .. "
                     f"{r['test_acc_max']:.2%} | {r['holdout_acc_seed0']:.2%} | {r['epoch_seconds']:.1f} | "
                     f"{r['step_ms']:.2f} |")
    cells = {name: [f"{r['lr']:g}: {r['holdout_acc']:.2%}" for r in sorted(results, key=lambda r: r["lr"])
                    if r["optimizer"] == name and r["seed"] == 0] for name in OPTIMIZERS}
    cells = {name: c for name, c in cells.items() if c}
    width = max(map(len, cells.values()))
    lines += ["", "Held-out accuracy of every lr (seed 0):", "", "| optimizer | " +
              " | ".join("lr: held-out acc" for _ in range(width)) + " |", "|---|" + "---|" * width]
    for name, c in cells.items():
        lines.append(f"| {name} | " + " | ".join(c + [""] * (width - len(c))) + " |")
    return "\n".join(lines)


def plot_p(path: str, results: list[dict], chosen: dict[str, float]) -> None:
    """The p of every matrix over the steps: one row per adaptive variant (at its chosen lr), one
    column per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    variants = [n for n in ("schatten-adaptive", "schatten-adaptive-uncentered") if n in chosen]
    grid = [sorted((r for r in results if r["optimizer"] == n and r["lr"] == chosen[n]), key=lambda r: r["seed"])
            for n in variants]
    cols = max(len(runs) for runs in grid)
    fig, axes = plt.subplots(len(variants), cols, figsize=(4.6 * cols, 3.4 * len(variants)), squeeze=False)
    for name, runs, row in zip(variants, grid, axes):
        for ax, r in zip(row, runs):
            hist = torch.tensor(r["p_history"])
            for j, shape in enumerate(r["matrices"]):
                ax.plot(hist[:, 0], hist[:, 1 + j], label=f"{shape[0]}x{shape[1]}")
            ax.set(xlabel="step", ylabel="p", yscale="log", ylim=(1, 11),
                   title=f"{name}, lr {r['lr']:g}, seed {r['seed']}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", default=None, help="datasets folder (default: $LIPNET_DATA)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--aux-lr", type=float, default=3e-3, help="lr of the auxiliary AdamW beside the matrix optimizers")
    ap.add_argument("--jobs", type=int, default=1, help="trainings at once (one thread each)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--json", required=True, help="results file (read first: runs already in it are skipped)")
    ap.add_argument("--md", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    names = args.optimizers.split(",")
    unknown = set(names) - set(OPTIMIZERS)
    if unknown:
        raise SystemExit(f"unknown optimizers {sorted(unknown)}; known: {OPTIMIZERS}")
    path = Path(args.json)
    results = json.loads(path.read_text())["runs"] if path.exists() else []
    info = machine_info()
    meta = {"machine": info["cpu"], "torch": info["torch"], "jobs": args.jobs, "epochs": args.epochs,
            "aux_lr": args.aux_lr, "date": info["date"]}

    def save() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"meta": meta, "runs": results}, indent=1))

    base = dict(epochs=args.epochs, aux_lr=args.aux_lr, threads=1, data_root=args.data_root)
    grids = {n: list(ADAMW_LRS if n == "adamw" else MATRIX_LRS) for n in names}
    while True:   # a best lr at an end of its grid extends that grid by one step past the end
        run_jobs([dict(base, optimizer=n, lr=lr, seed=0) for n in names for lr in grids[n]], results, args.jobs, save)
        chosen = {n: lr for n, lr in best_lrs(results).items() if n in names}
        extend = {n: next_lr(chosen[n], -1 if chosen[n] == min(grids[n]) else 1) for n in names
                  if chosen[n] in (min(grids[n]), max(grids[n])) and len(grids[n]) < MAX_LRS}
        if not extend:
            break
        for n, lr in extend.items():
            grids[n].append(lr)
    run_jobs([dict(base, optimizer=n, lr=chosen[n], seed=s) for n in names for s in range(1, args.seeds)],
             results, args.jobs, save)
    rows = summary_rows(results, chosen, args.seeds)
    meta["summary"] = rows
    save()
    table = markdown(rows, results, meta)
    print(table)
    if args.md:
        cmd = "python benchmarks/optim_task.py " + " ".join(sys.argv[1:])
        Path(args.md).write_text(f"# Optimizers on Fashion-MNIST\n\n`{cmd}`\n\n{table}\n")
    if args.plot and any(n.startswith("schatten-adaptive") for n in chosen):
        plot_p(args.plot, results, chosen)


if __name__ == "__main__":
    main()
