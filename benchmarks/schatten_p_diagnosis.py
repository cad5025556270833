"""Why the adaptive p lands where it does: the criterion with the optimizer's activation sample
against the full batch's activations.

    python benchmarks/schatten_p_diagnosis.py --steps 400 --center none --p-every 10 --act-every 50 \
        --json benchmarks/results/schatten_p_diagnosis.json

Trains the Fashion-MNIST CNN of benchmarks/optim_task.py with SchattenMuon (adaptive p, lr
``--lr``) for ``--steps`` steps, then, for every hidden matrix, takes the p maximizing the
criterion f(p) = relu(<G, S_p> / ||S_p||_{S_(p+1)})^2 / ||A||_{S_k(p)}^2 (the optimizer's own
alignment statistic) with the activation norms ||A||_{S_k(p)} from

- ``optimizer``: the optimizer's state (``act_rows`` sampled rows per record, EMA'd; centered for
  the layers feeding a BatchNorm unless ``--center none``);
- ``sample``: ``act_rows`` rows of one fresh batch, as one record of the optimizer sees them;
- ``full batch``: every feature row of that batch (batch x positions rows, through the n x n
  second-moment matrix);
- ``full batch, centered``: the same rows minus their mean (the mean direction removed).

A scale common to every singular value does not move the argmax, so only the shape of the
spectrum matters: ``effective rank`` = ||A||_F^2 / ||A||_2^2 is printed beside each, and
log f(pmax) - log f(pmin) split into the numerator's gain (the momentum's spectrum seen through the
gradient) and each activation source's gain: p goes to pmax when the numerator gains more.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lipnet.data import batches, holdout_split, load_dataset  # noqa: E402
from lipnet.optim import SchattenMuon, split_params  # noqa: E402
from lipnet.optim.schatten import activation_log_norms, choose_p, layer_features  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine_info  # noqa: E402
from optim_task import BATCH, HOLDOUT, make_net  # noqa: E402


def spectrum(A: torch.Tensor) -> torch.Tensor:
    """Singular values of A (rows x n) through its smaller Gram matrix (float64)."""
    A = A.double()
    gram = A @ A.mT if len(A) <= A.shape[-1] else A.mT @ A
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--aux-lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--center", choices=("batchnorm", "none"), default="batchnorm",
                    help="SchattenMuon.watch's feature centering during the training run")
    ap.add_argument("--p-every", type=int, default=50, help="SchattenMuon's p_every")
    ap.add_argument("--act-every", type=int, default=200, help="SchattenMuon's act_every")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, _ = holdout_split(load_dataset("fashion-mnist", "train", args.data_root, progress=False), HOLDOUT)
    torch.manual_seed(0)
    model = make_net()
    hidden, rest = split_params(model)
    opt = SchattenMuon(hidden, lr=args.lr, p="adaptive", p_every=args.p_every, act_every=args.act_every)
    opt.watch(model, center=False if args.center == "none" else "batchnorm")
    aux = torch.optim.AdamW(rest, lr=args.aux_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    step = 0
    while step < args.steps:
        for x, y in batches(train, BATCH, shuffle=True, generator=gen):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            aux.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            aux.step()
            step += 1
            if step == args.steps:
                break
    # one fresh batch: every layer's input
    inputs: dict[nn.Module, torch.Tensor] = {}
    modules = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight in set(hidden)]
    handles = [m.register_forward_hook(lambda m, i, o: inputs.__setitem__(m, i[0].detach())) for m in modules]
    x, _ = next(batches(train, BATCH, shuffle=True, generator=gen))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    grid = opt.grid
    rows = []
    for m in modules:
        state = opt.state[m.weight]
        n = m.weight[0].numel()
        full = layer_features(m, inputs[m], 10 ** 9).double()
        ranks = {"sample": spectrum(layer_features(m, inputs[m], opt.act_rows)),
                 "full batch": spectrum(full), "full batch, centered": spectrum(full - full.mean(0))}
        sources = {"optimizer": state["act_log_norm"].double(),
                   **{name: activation_log_norms(sv, grid) for name, sv in ranks.items()}}
        row = {"matrix": [len(m.weight), n], "rows_full": len(full), "rows_sample": min(opt.act_rows, len(full)),
               "p_in_force": float(state["p"]), "centered_by_optimizer": m.weight in opt._centered}
        for name, log_norm in sources.items():
            p = choose_p(state["alignment"].double()[None], log_norm[None], grid, state["p"].double()[None])
            row[f"p[{name}]"] = float(p)
        # log f(pmax) - log f(pmin) = numerator gain - activation gain: p -> pmax when the first wins
        align = state["alignment"].double().clamp_min(1e-300).log()
        row["numerator_log_gain"] = float(2 * (align[-1] - align[0]))
        for name, log_norm in sources.items():
            row[f"activation_log_gain[{name}]"] = float(2 * (log_norm[-1] - log_norm[0]))
        for name, sv in ranks.items():
            row[f"effective_rank[{name}]"] = float((sv.square().sum() / sv.max().square()))
        rows.append(row)
        print(f"{row['matrix']}: rows {row['rows_sample']} / {row['rows_full']}, p in force {row['p_in_force']:.2f}; "
              + ", ".join(f"{k[2:-1]} -> {row[k]:.2f}" for k in row if k.startswith("p[")) + "; effective rank "
              + ", ".join(f"{k[15:-1]} {row[k]:.1f}" for k in row if k.startswith("effective_rank"))
              + f"; log f(pmax) - log f(pmin) = {row['numerator_log_gain']:.2f} (numerator) - "
              + ", ".join(f"{k[20:-1]} {row[k]:.2f}" for k in row if k.startswith("activation_log_gain")), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": {**vars(args), "machine": machine_info()["cpu"]},
                                               "layers": rows}, indent=1))


if __name__ == "__main__":
    main()
