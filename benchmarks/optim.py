"""Side-by-side optimizer benchmark: TurboMuon, TurboMuon+NorMuon, SchattenMuon, torch.optim.Muon, AdamW.

    python benchmarks/optim.py --steps 60 --json benchmarks/results/optim_cpu.json --md benchmarks/results/optim_cpu.md \
        --plot benchmarks/results/optim_cpu_p.png --roots

Task: a CIFAR-10-sized CNN (32x32x3 inputs, conv widths 32/64/128, BatchNorm, 10 classes) on a
synthetic teacher task (low-pass-filtered Gaussian images labelled by a fixed random CNN), so it
needs no dataset. Conv kernels are stored as 2-D (out, in*k*k) parameters because
``torch.optim.Muon`` only accepts 2-D parameters; every optimizer trains the same matrices.
``lipnet.optim.split_params`` sends the hidden matrices to the Muon variant and the head, biases and
BatchNorm gains to an auxiliary AdamW (the AdamW row trains everything with AdamW).

All runs start from the same weights and see the same batches. They are interleaved round-robin
(one step of each per round, the order rotated each round) so machine noise hits them alike; we
report medians. Columns: ``step`` = the whole optimizer step (matrix optimizer + aux AdamW),
``matrix step`` = the Muon-variant step only, ``ortho`` = the orthogonalization alone on the net's
matrices (stacked per shape for TurboMuon, one by one for torch's Muon, also interleaved; plus
Keller Jordan's ns5 in fp32 through the same core in torch's direct form: the equal-precision
reference; and turbo in the direct form: what the Gram form that TurboMuon uses on wide matrices buys), losses
= mean training loss of the last 10 steps and loss / accuracy on 2048 held-out examples.
``schatten-adaptive`` is SchattenMuon with the paper's per-layer p (its activation hooks on the
convolutions; their cost is inside ``step``; ``--cadences`` adds runs with other ``p_every`` /
``act_every``), ``schatten-p2`` / ``schatten-p4`` the same with p fixed at 2 / 4; the
``p trajectory`` (``--plot``) shows the adaptive p of every matrix per step. ``--roots`` adds a table
of the ways to compute U S^(1/p) V^T on the net's stacks: time and error against an fp64 SVD.
Precision: ``torch.optim.Muon`` runs its Newton-Schulz steps in bf16 on every device; the lipnet
core runs fp32 on CPU by default (``turbomuon``) or bf16 with a final fp32 step and an fp32 Gram
matrix (``turbomuon-bf16``, ``low_precision=True``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from lipnet.optim import SchattenMuon, TurboMuon, schatten_update, split_params  # noqa: E402
from lipnet.ortho import orthogonalize  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this script
from _harness import machine_info, median, sync, time_interleaved  # noqa: E402


class FlatConv2d(nn.Conv2d):
    """3x3 'same' convolution whose kernel is stored as a 2-D (out, in*9) parameter (an ``nn.Conv2d``
    so that SchattenMuon's hooks know its geometry; built on "meta" so the init RNG stream is unchanged)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1, bias=False, device="meta")
        self.shape = (cout, cin, 3, 3)
        self.weight = nn.Parameter(nn.init.kaiming_normal_(torch.empty(self.shape)).reshape(cout, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.view(self.shape), padding=1)


def make_net(widths=(32, 64, 128)) -> nn.Sequential:
    layers, cin = [FlatConv2d(3, widths[0]), nn.BatchNorm2d(widths[0]), nn.GELU()], widths[0]
    for w in widths:
        layers += [FlatConv2d(cin, w), nn.MaxPool2d(2), nn.BatchNorm2d(w), nn.GELU(),
                   FlatConv2d(w, w), nn.BatchNorm2d(w), nn.GELU()]
        cin = w
    layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


def _images(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return F.avg_pool2d(F.avg_pool2d(x, 3, 1, 1), 3, 1, 1) * 3


def make_task(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x = _images(n, seed)
    torch.manual_seed(1234)  # the teacher is the same for every call
    teacher = nn.Sequential(nn.Conv2d(3, 16, 5, padding=2), nn.ReLU(), nn.AvgPool2d(4), nn.Flatten(),
                            nn.Linear(16 * 64, 10))
    with torch.no_grad():
        reference = teacher(_images(4096, 99))  # standardized logits: roughly balanced classes
        y = ((teacher(x) - reference.mean(0)) / reference.std(0)).argmax(dim=1)
    return x, y


def make_optimizers(name: str, model: nn.Module, lr: float, aux_lr: float) -> list[torch.optim.Optimizer]:
    hidden, rest = split_params(model)
    if name == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=aux_lr, weight_decay=0.0)]
    aux = torch.optim.AdamW(rest, lr=aux_lr, weight_decay=0.0)
    if name == "torch-muon":
        return [torch.optim.Muon(hidden, lr=lr, momentum=0.95, nesterov=True, weight_decay=0.0,
                                 adjust_lr_fn="original"), aux]
    kw = dict(lr=lr, momentum=0.95, nesterov=True, weight_decay=0.0, adjust_lr="spectral")
    if name == "turbomuon":
        return [TurboMuon(hidden, **kw), aux]
    if name == "turbomuon-bf16":
        return [TurboMuon(hidden, low_precision=True, **kw), aux]
    if name == "turbomuon+normuon":
        return [TurboMuon(hidden, normuon=True, **kw), aux]
    if name.startswith("schatten-adaptive"):   # "schatten-adaptive@P/A": p_every P, act_every A
        cadence = name.partition("@")[2]
        every = dict(zip(("p_every", "act_every"), map(int, cadence.split("/")))) if cadence else {}
        opt = SchattenMuon(hidden, p="adaptive", **every, **kw)
        opt.watch(model)
        return [opt, aux]
    if name in ("schatten-p2", "schatten-p4"):
        return [SchattenMuon(hidden, p=float(name[-1]), **kw), aux]
    raise ValueError(name)


def ortho_timers(shapes: list[tuple[int, int]], seed: int = 0) -> dict:
    """Callables orthogonalizing one gradient per matrix of the net, as each optimizer does."""
    from torch.optim._muon import _zeropower_via_newtonschulz  # the function torch.optim.Muon calls
    g = torch.Generator().manual_seed(seed)
    mats = [torch.randn(s, generator=g) for s in shapes]
    stacks = {}
    for m in mats:
        stacks.setdefault(tuple(m.shape), []).append(m)
    stacks = [torch.stack(v) for v in stacks.values()]
    return {
        "turbomuon": lambda: [orthogonalize(s, "turbo", 4, validate=False) for s in stacks],
        "turbomuon-bf16": lambda: [orthogonalize(s, "turbo", 4, low_precision=True, validate=False) for s in stacks],
        "torch-muon": lambda: [_zeropower_via_newtonschulz(m, (3.4445, -4.7750, 2.0315), 5, 1e-7) for m in mats],
        # equal-precision reference: Keller Jordan's 5 quintic steps through the same core, fp32, stacked,
        # in the direct form torch.optim.Muon uses
        "ns5-fp32 (ortho only)": lambda: [orthogonalize(s, "ns5", 5, low_precision=False, validate=False,
                                                        form="direct") for s in stacks],
        # what the Gram form (form="auto" picks it for the wide conv matrices) buys TurboMuon
        "turbo-direct-fp32 (ortho only)": lambda: [orthogonalize(s, "turbo", 4, low_precision=False, validate=False,
                                                                 form="direct") for s in stacks],
    }


def core_q_power(M: torch.Tensor, p: float, method: str) -> torch.Tensor:
    """The route the issue sketches: Q = the core's polar factor, then Q-side PSD power by eigh:
    U S^(1/p) V^T = H^(1/p) Q, H = sym(M Q^T) (M wide). Exact only if Q is the polar factor of M;
    the core's turbo/convergent give the polar factor of the AOL-rescaled M instead."""
    Q = orthogonalize(M, method, validate=False)
    H = M @ Q.mT
    lam, W = torch.linalg.eigh((H + H.mT) / 2)
    return (W * lam.clamp_min(1e-3 * lam[..., -1:]).pow(1 / p).unsqueeze(-2)) @ W.mT @ Q


def newton_power(M: torch.Tensor, p: int, floor: float = 1e-3, iters: int = 30) -> torch.Tensor:
    """U S^(1/p) V^T (integer p, fp32) by the coupled Newton inverse-root iteration (Guo & Higham
    2006) instead of an eigh: with X the wide orientation of M and A = X X^T + (floor^2 max_i A_ii) I,
    U S^(1/p) V^T ~ (A^(-1/r))^(p-1) X, r = 2p. The iteration R <- R T, N <- T^r N with
    T = ((r+1) I - N) / r, from R = I / c, N = A / c^r, c^r = trace(A) (N's spectrum in (0, 1]), has
    R -> A^(-1/r), N -> I."""
    p = int(p)
    X = M.float()
    transposed = X.shape[-2] > X.shape[-1]
    X = X.mT if transposed else X
    A = X @ X.mT
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    lam_max = A.diagonal(dim1=-2, dim2=-1).amax(-1)                     # <= sigma_max^2 <= k lam_max
    A = A + (floor ** 2 * lam_max[..., None, None]).clamp_min(torch.finfo(A.dtype).tiny) * eye
    r = 2 * p
    trace = A.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    R, N = eye / trace ** (1 / r), A / trace
    for _ in range(iters):
        T = ((r + 1) * eye - N) / r
        R, N = R @ T, torch.linalg.matrix_power(T, r) @ N
    S = torch.linalg.matrix_power(R, p - 1) @ X
    return S.mT if transposed else S


def root_rows(shapes: list[tuple[int, int]], repeats: int, seed: int = 0) -> list[dict]:
    """Time (all stacks of the net, median) and error (worst relative Frobenius error against an fp64
    SVD, over the stacks) of each way to compute U S^(1/p) V^T, fp32, momentum-like inputs."""
    g = torch.Generator().manual_seed(seed)
    stacks: dict[tuple, list] = {}
    for s in shapes:   # a random-walk sum of gradients: a realistic decaying spectrum
        stacks.setdefault(s if s[0] <= s[1] else s[::-1], []).append(
            torch.randn(20, *s, generator=g).cumsum(0).mul(torch.linspace(0.2, 1, 20)[:, None, None]).sum(0))
    stacks = [torch.stack(v) for v in stacks.values()]
    ways = {
        "eigh (Gram, ours)": lambda M, p: schatten_update(M, p, validate=False),
        "coupled Newton (Gram, 30 it.)": lambda M, p: newton_power(M, p),
        "core Q (turbo) + eigh": lambda M, p: core_q_power(M, p, "turbo"),
        "core Q (convergent) + eigh": lambda M, p: core_q_power(M, p, "convergent"),
        "turbo polar (p = inf, reference cost)": lambda M, p: orthogonalize(M, "turbo", 4, validate=False),
    }
    rows = []
    for p in (2, 4, 8):
        refs = []
        for M in stacks:
            U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
            refs.append((U * S.pow(1 / p).unsqueeze(-2)) @ Vh)
        for name, f in ways.items():
            err = max(((f(M, p).double() - r).norm(dim=(-2, -1)) / r.norm(dim=(-2, -1))).max().item()
                      for M, r in zip(stacks, refs))
            # the error pass above is this way's warm-up
            times = time_interleaved({name: lambda f=f: [f(M, p) for M in stacks]}, repeats, warmup=0)[name]
            rows.append({"p": p, "method": name, "ms": 1e3 * median(times),
                         "max_rel_error": None if "p = inf" in name else err})
    return rows


def plot_p(path: str, runs: dict, names: list[str], matrices: list, p_hist: list) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_p, ax_l) = plt.subplots(1, 2, figsize=(12, 4.2))
    hist = torch.tensor(p_hist)
    for j, shape in enumerate(matrices):
        ax_p.plot(range(1, len(hist) + 1), hist[:, j], label=f"matrix {j}: {shape[0]}x{shape[1]}")
    ax_p.set(xlabel="step", ylabel="p", title="SchattenMuon adaptive p per layer", yscale="log")
    ax_p.legend(fontsize=7)
    for name in names:
        loss = torch.tensor(runs[name]["loss"])
        w = min(10, len(loss))
        smooth = torch.nn.functional.avg_pool1d(loss[None, None], w, 1)[0, 0]
        ax_l.plot(range(w, len(loss) + 1), smooth, label=name)
    ax_l.set(xlabel="step", ylabel="train loss (10-step mean)", title="training loss")
    ax_l.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.02, help="Muon-variant learning rate")
    p.add_argument("--aux-lr", type=float, default=2e-3, help="AdamW learning rate (aux and baseline)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ortho-repeats", type=int, default=30)
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--plot", default=None, help="PNG: adaptive p per layer and the loss curves")
    p.add_argument("--roots", action="store_true", help="also time/check the ways to compute U S^(1/p) V^T")
    all_names = ["turbomuon", "turbomuon-bf16", "turbomuon+normuon", "schatten-adaptive", "schatten-p2", "schatten-p4",
                 "torch-muon", "adamw"]
    p.add_argument("--optimizers", default=",".join(all_names),
                   help="comma-separated subset (turbomuon and schatten-adaptive are always run)")
    p.add_argument("--cadences", default="",
                   help="extra adaptive SchattenMuon runs, comma-separated p_every/act_every pairs (e.g. 25/100,50/200)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in all_names if n in set(args.optimizers.split(",")) | {"turbomuon", "schatten-adaptive"}]
    names += [f"schatten-adaptive@{c}" for c in args.cadences.split(",") if c]
    if not hasattr(torch.optim, "Muon") and "torch-muon" in names:
        names.remove("torch-muon")

    x_train, y_train = make_task(args.steps * args.batch_size, seed=0)
    x_eval, y_eval = make_task(2048, seed=1)
    torch.manual_seed(0)
    init = make_net().state_dict()
    runs = {}
    for name in names:
        model = make_net()
        model.load_state_dict(init)
        runs[name] = dict(model=model, opts=make_optimizers(name, model, args.lr, args.aux_lr),
                          step=[], matrix=[], loss=[])

    for t in range(args.steps):
        xb = x_train[t * args.batch_size:(t + 1) * args.batch_size]
        yb = y_train[t * args.batch_size:(t + 1) * args.batch_size]
        order = names[t % len(names):] + names[:t % len(names)]
        for name in order:
            # timed inside the training loop on purpose: the optimizer steps alone, split into the
            # matrix optimizer and the aux AdamW, on the real gradients of this run
            r = runs[name]
            device = next(r["model"].parameters()).device
            loss = F.cross_entropy(r["model"](xb), yb)
            for o in r["opts"]:
                o.zero_grad(set_to_none=True)
            loss.backward()
            sync(device)
            start = time.perf_counter()
            r["opts"][0].step()
            sync(device)
            mid = time.perf_counter()
            for o in r["opts"][1:]:
                o.step()
            sync(device)
            r["matrix"].append(mid - start)
            r["step"].append(time.perf_counter() - start)
            r["loss"].append(loss.item())
            if name.startswith("schatten-adaptive"):
                r.setdefault("p", []).append(r["opts"][0].current_p())
        if (t + 1) % 10 == 0:
            print(f"step {t + 1}/{args.steps}: " + "  ".join(f"{n} {runs[n]['loss'][-1]:.3f}" for n in names),
                  flush=True)

    hidden, _ = split_params(runs[names[0]]["model"])
    timers = ortho_timers([(len(w), w[0].numel()) for w in hidden])
    timers = {k: v for k, v in timers.items() if k in names or "ortho only" in k}
    ortho = time_interleaved(timers, args.ortho_repeats, warmup=1)
    ortho["turbomuon+normuon"] = ortho["turbomuon"]
    matrices = [list(w.shape) for w in hidden]
    roots = root_rows([tuple(s) for s in matrices], args.ortho_repeats) if args.roots else None

    rows = []
    for name in names:
        r = runs[name]
        model = r["model"].eval()
        with torch.no_grad():
            logits = torch.cat([model(xe) for xe in x_eval.split(512)])
        warm = r["step"][2:]  # the first steps allocate state
        rows.append({
            "optimizer": name,
            "step_ms": 1e3 * median(warm),
            "matrix_step_ms": 1e3 * median(r["matrix"][2:]) if name != "adamw" else None,
            # the mean carries the criterion's periodic steps, which the median skips
            "step_ms_mean": 1e3 * statistics.fmean(warm),
            "matrix_step_ms_mean": 1e3 * statistics.fmean(r["matrix"][2:]) if name != "adamw" else None,
            "ortho_ms": 1e3 * median(ortho[name]) if name in ortho else None,
            "train_loss_last10": statistics.fmean(r["loss"][-10:]),
            "eval_loss": F.cross_entropy(logits, y_eval).item(),
            "eval_acc": (logits.argmax(1) == y_eval).float().mean().item(),
        })
    for ref_name in ("ns5-fp32 (ortho only)", "turbo-direct-fp32 (ortho only)"):
        rows.append({"optimizer": ref_name, "step_ms": None, "matrix_step_ms": None,
                     "ortho_ms": 1e3 * median(ortho[ref_name]), "train_loss_last10": None,
                     "eval_loss": None, "eval_acc": None})
    ref = next((row for row in rows if row["optimizer"] == "torch-muon"), None)
    for row in rows:
        for key in ("matrix_step_ms", "ortho_ms"):
            ok = ref is not None and row[key] is not None and ref[key] is not None
            row[f"{key.split('_ms')[0]}_speedup_vs_torch_muon"] = ref[key] / row[key] if ok else None

    info = machine_info()
    meta = {"torch": info["torch"], "threads": args.threads, "steps": args.steps, "batch_size": args.batch_size,
            "lr": args.lr, "aux_lr": args.aux_lr, "machine": info["cpu"],
            "matrices": [list(w.shape) for w in hidden],
            "note": "runs interleaved round-robin, medians (and means in the ratio table)", "machine_info": info}
    header = ["optimizer", "step ms", "matrix step ms", "ortho ms", "matrix step speed-up vs torch Muon",
              "ortho speed-up", "train loss (last 10)", "eval loss", "eval acc"]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join([
            row["optimizer"], fmt(row["step_ms"], ".1f"), fmt(row["matrix_step_ms"], ".1f"), fmt(row["ortho_ms"], ".1f"),
            fmt(row["matrix_step_speedup_vs_torch_muon"], ".2f") + ("x" if row["matrix_step_speedup_vs_torch_muon"] else ""),
            fmt(row["ortho_speedup_vs_torch_muon"], ".2f") + ("x" if row["ortho_speedup_vs_torch_muon"] else ""),
            fmt(row["train_loss_last10"], ".3f"), fmt(row["eval_loss"], ".3f"), fmt(row["eval_acc"], ".1%")]) + " |")
    table = "\n".join(lines)
    turbo = next(row for row in rows if row["optimizer"] == "turbomuon")
    lines = ["| optimizer | step / TurboMuon step (median) | matrix step / TurboMuon (median) | "
             "step / TurboMuon (mean) | matrix step / TurboMuon (mean) | final p per matrix |", "|---|---|---|---|---|---|"]
    for row in rows:
        if row["matrix_step_ms"] is None or "schatten" not in row["optimizer"]:
            continue
        row["step_ratio_vs_turbomuon"] = row["step_ms"] / turbo["step_ms"]
        row["matrix_step_ratio_vs_turbomuon"] = row["matrix_step_ms"] / turbo["matrix_step_ms"]
        row["step_mean_ratio_vs_turbomuon"] = row["step_ms_mean"] / turbo["step_ms_mean"]
        row["matrix_step_mean_ratio_vs_turbomuon"] = row["matrix_step_ms_mean"] / turbo["matrix_step_ms_mean"]
        run = runs[row["optimizer"]]
        final_p = run["p"][-1] if "p" in run else [run["opts"][0].current_p()[0]] * len(matrices)
        lines.append(f"| {row['optimizer']} | {row['step_ratio_vs_turbomuon']:.3f}x | "
                     f"{row['matrix_step_ratio_vs_turbomuon']:.3f}x | {row['step_mean_ratio_vs_turbomuon']:.3f}x | "
                     f"{row['matrix_step_mean_ratio_vs_turbomuon']:.3f}x | "
                     + ", ".join(format(float(v), ".2f") for v in final_p) + " |")
    table += "\n\n" + "\n".join(lines)
    p_hist = runs["schatten-adaptive"]["p"]
    meta["p_trajectory"] = {"matrices": matrices, "every_10_steps": p_hist[::10], "final": p_hist[-1]}
    if roots is not None:
        lines = ["| p | U S^(1/p) V^T via | ms (all stacks) | max rel. error vs fp64 SVD |", "|---|---|---|---|"]
        for row in roots:
            lines.append(f"| {row['p']} | {row['method']} | {row['ms']:.2f} | {fmt(row['max_rel_error'], '.1e')} |")
        table += "\n\n" + "\n".join(lines)
    print(table)
    if args.plot:
        plot_p(args.plot, runs, names, matrices, p_hist)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows, "roots": roots}, indent=2))
    if args.md:
        cmd = "python benchmarks/optim.py " + " ".join(sys.argv[1:])
        Path(args.md).write_text(f"# Optimizer benchmark (CPU)\n\n`{cmd}`\n\n{meta['note']}; {meta['machine']}, torch {meta['torch']}, "
                                 f"{args.threads} thread(s), {args.steps} steps of batch {args.batch_size}.\n\n"
                                 f"{table}\n")


if __name__ == "__main__":
    main()
