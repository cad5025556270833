"""Side-by-side cost of one training step of the same 1-Lipschitz CNN built from four layer libraries.

    python benchmarks/layers.py                                  # batch 64, CIFAR-10 sized
    python benchmarks/layers.py --repeats 9 --threads 2 --json benchmarks/results/layers_cpu_2threads.json --md benchmarks/results/layers_cpu_2threads.md

Model (same for all): conv 3->32 s1, conv 32->64 s2, conv 64->64 s1, conv 64->128 s2,
conv 128->128 s2 (all 3x3, padding "same" at stride 1 and 1 at stride 2, circular padding by
default), an activation after each conv, flatten (128*4*4) and a linear head to 10 classes.

* ``lipnet``: ``lipnet.nn.OrthoConv2d`` (AOC, our core, method "convergent"), ``MaxMin``, ``Flatten``,
  ``OrthoLinear``.
* ``orthogonium``: orthogonium's own ``AdaptiveOrthoConv2d`` and ``OrthoLinear`` with their default
  ``OrthoParams`` (3 power iterations + 12 Bjorck iterations), orthogonium's ``MaxMin``.
* ``deel-torchlip``: ``SpectralConv2d`` / ``SpectralLinear`` (spectral norm + Bjorck on the reshaped
  kernel, times the ``lconv`` coefficient: 1-Lipschitz, not orthogonal) and ``GroupSort2`` (its
  ``MaxMin`` doubles the channels, so it would change the architecture). Skipped if not installed.
* ``plain``: unconstrained ``nn.Conv2d`` / ``nn.Linear`` of the same shapes with ReLU; an extra
  ``plain (MaxMin)`` row has lipnet's MaxMin instead: the data path of the constrained models without
  any weight constraint.

Training step: forward, ``lipnet.nn.LipschitzCrossEntropy``, backward, Adam step (same for all);
one extra row runs the lipnet step with ``lipnet.nn.set_input_checks(False)``.
Inference (eval mode, no grad): ``lipnet.nn.export(lipnet model)``, the plain model, and the lipnet
model itself (which recomputes its constrained weights on every call).

All cases are interleaved round-robin in every repeat (machine load drifts hit all alike); we report
the median of ``--repeats`` and ratios to the plain model measured in the same run. ``--profile``
(default on) adds, for the constrained models, the time of computing all constrained weights alone
(no data convolution): under ``torch.no_grad`` and forward+backward through the parametrizations.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
import lipnet.nn as lnn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this script
from _harness import describe, machine_info, median, time_interleaved, write_outputs  # noqa: E402

# (in, out, stride) of the five 3x3 convolutions; 32x32 -> 32 -> 16 -> 16 -> 8 -> 4
CONVS = [(3, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 2)]
KERNEL, IMAGE, CLASSES = 3, 32, 10
FEATURES = CONVS[-1][1] * (IMAGE // 8) ** 2


def _padding(stride: int):
    return KERNEL // 2 if stride > 1 else "same"


def build_lipnet(padding_mode: str) -> nn.Module:
    layers = []
    for cin, cout, s in CONVS:
        layers += [lnn.OrthoConv2d(cin, cout, KERNEL, stride=s, padding=_padding(s), padding_mode=padding_mode),
                   lnn.MaxMin()]
    return nn.Sequential(*layers, lnn.Flatten(), lnn.OrthoLinear(FEATURES, CLASSES))


def build_orthogonium(padding_mode: str) -> nn.Module:
    from orthogonium.layers.conv.AOC import AdaptiveOrthoConv2d
    from orthogonium.layers.custom_activations import MaxMin
    from orthogonium.layers.linear import OrthoLinear

    layers = []
    for cin, cout, s in CONVS:
        layers += [AdaptiveOrthoConv2d(cin, cout, KERNEL, stride=s, padding=_padding(s), padding_mode=padding_mode),
                   MaxMin()]
    return nn.Sequential(*layers, nn.Flatten(), OrthoLinear(FEATURES, CLASSES))


def build_deel(padding_mode: str) -> nn.Module:
    from deel.torchlip import GroupSort2, SpectralConv2d, SpectralLinear

    layers = []
    for cin, cout, s in CONVS:
        # deel's "same" is not accepted by torch with stride > 1 either; padding 1 gives the same shapes
        layers += [SpectralConv2d(cin, cout, KERNEL, stride=s, padding=KERNEL // 2, padding_mode=padding_mode),
                   GroupSort2()]
    return nn.Sequential(*layers, nn.Flatten(), SpectralLinear(FEATURES, CLASSES))


def build_plain(padding_mode: str, activation=nn.ReLU) -> nn.Module:
    layers = []
    for cin, cout, s in CONVS:
        layers += [nn.Conv2d(cin, cout, KERNEL, stride=s, padding=_padding(s), padding_mode=padding_mode),
                   activation()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(FEATURES, CLASSES))


BUILDERS = {"lipnet": build_lipnet, "orthogonium": build_orthogonium, "deel-torchlip": build_deel,
            "plain": build_plain, "plain (MaxMin)": lambda pm: build_plain(pm, lnn.MaxMin)}


def deel_version() -> str | None:
    try:
        from importlib.metadata import version
        import deel.torchlip  # noqa: F401
        return version("deel-torchlip")
    except Exception:  # noqa: BLE001 -- absent or broken: the row is skipped
        return None


def weight_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose ``.weight`` is the constrained kernel actually used (a parametrization or,
    for orthogonium's strided AOC, a property composing two parametrized kernels)."""
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def make_cases(models: dict, x: torch.Tensor, y: torch.Tensor, lr: float, profile: bool) -> dict:
    """Zero-argument callables; ``train/<name>``, ``infer/<name>`` and ``weights*/<name>``."""
    criterion = lnn.LipschitzCrossEntropy()
    cases = {}

    def train_step(model, opt):
        def step():
            opt.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            loss.backward()
            opt.step()
        return step

    for name, model in models.items():
        model.train()
        cases[f"train/{name}"] = train_step(model, torch.optim.Adam(model.parameters(), lr=lr))
    # lipnet's per-layer input checks (shape + an isfinite host sync) switched off: their cost
    checked = cases["train/lipnet"]

    def unchecked():
        lnn.set_input_checks(False)
        try:
            checked()
        finally:
            lnn.set_input_checks(True)
    cases["train/lipnet (input checks off)"] = unchecked

    def infer(model):
        def run():
            with torch.no_grad():
                model(x)
        return run

    exported = lnn.export(models["lipnet"]).eval()
    plain_eval = models["plain"]  # same module: eval mode is set/restored around each call (see below)
    cases["infer/export(lipnet)"] = infer(exported)
    cases["infer/plain"] = _in_eval(plain_eval, infer(plain_eval))
    cases["infer/lipnet"] = _in_eval(models["lipnet"], infer(models["lipnet"]))

    if profile:
        for name, model in models.items():
            if name.startswith("plain"):
                continue
            mods = weight_modules(model)

            def weights_nograd(mods=mods):
                with torch.no_grad():
                    for m in mods:
                        m.weight

            def weights_grad(mods=mods):
                ws = [m.weight for m in mods]
                torch.autograd.backward(ws, [torch.ones_like(w) for w in ws])

            cases[f"weights-nograd/{name}"] = weights_nograd
            cases[f"weights-fwd+bwd/{name}"] = weights_grad
    return cases


def _in_eval(model: nn.Module, fn):
    def run():
        model.eval()
        try:
            fn()
        finally:
            model.train()
    return run


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    notes = []
    names = ["lipnet", "orthogonium", "deel-torchlip", "plain", "plain (MaxMin)"]
    dv = deel_version()
    if dv is None:
        notes.append("deel-torchlip not installed (pip install deel-torchlip): its row is skipped")
        names.remove("deel-torchlip")
    else:
        notes.append(f"deel-torchlip {dv}: SpectralConv2d/SpectralLinear (spectral norm + Bjorck on the reshaped "
                     "kernel, lconv coefficient: 1-Lipschitz, not an orthogonal convolution), GroupSort2 "
                     "activation (deel's MaxMin doubles the channels); strides and circular padding supported "
                     "natively, padding=1 at every layer")
    notes.append(f"all convolutions use padding_mode={args.padding_mode!r} (lipnet's and orthogonium's default)")
    if args.threads:
        notes.append(f"torch.set_num_threads({args.threads})")
    for n in notes:
        print(f"note: {n}")
    models = {n: BUILDERS[n](args.padding_mode) for n in names}
    x = torch.randn(args.batch, 3, IMAGE, IMAGE)
    y = torch.randint(0, CLASSES, (args.batch,))
    with torch.no_grad():  # every model maps the batch to (batch, 10)
        for n, m in models.items():
            assert m(x).shape == (args.batch, CLASSES), n
    cases = make_cases(models, x, y, args.lr, args.profile)
    print(f"timing {len(cases)} cases round-robin: {args.warmup} warm-up + {args.repeats} repeats ...", flush=True)
    t0 = time.perf_counter()
    seconds = {case: median(t) for case, t in time_interleaved(cases, args.repeats, args.warmup).items()}
    print(f"done in {time.perf_counter() - t0:.0f} s\n")

    rows = []
    for kind, ref in (("train", "train/plain"), ("infer", "infer/plain")):
        for case, s in seconds.items():
            if case.startswith(kind + "/"):
                rows.append(dict(name=case, seconds=s, ratio_to_plain=s / seconds[ref]))
    profile = []
    if args.profile:
        for n in names:
            if n.startswith("plain"):
                continue
            step = seconds[f"train/{n}"]
            wn, wg = seconds[f"weights-nograd/{n}"], seconds[f"weights-fwd+bwd/{n}"]
            profile.append(dict(model=n, train_step=step, weights_nograd=wn, weights_fwd_bwd=wg,
                                rest=step - wg, weights_share=wg / step))
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    info = machine_info()
    return {"device": describe(info), "torch": info["torch"], "threads": info["threads"],
            "batch": args.batch, "repeats": args.repeats, "warmup": args.warmup,
            "padding_mode": args.padding_mode, "deel_torchlip": dv, "notes": notes, "parameters": params,
            "rows": rows, "profile": profile, "machine_info": info}


def tables(result: dict) -> str:
    sec = {r["name"]: r["seconds"] for r in result["rows"]}
    out = [f"device: {result['device']}, torch {result['torch']}, batch {result['batch']}, "
           f"median of {result['repeats']} interleaved repeats ({result['warmup']} warm-up)", "",
           "| case | median ms | ratio to plain |", "|---|---|---|"]
    for r in result["rows"]:
        out.append(f"| {r['name']} | {1e3 * r['seconds']:.1f} | {r['ratio_to_plain']:.2f}x |")
    out.append("")
    a = sec["train/lipnet"]
    for peer in ("orthogonium", "deel-torchlip"):
        if f"train/{peer}" in sec:
            out.append(f"train step lipnet / {peer}: {a / sec[f'train/{peer}']:.2f}x")
    out.append(f"inference lipnet (eval, weights recomputed) / export(lipnet): "
               f"{sec['infer/lipnet'] / sec['infer/export(lipnet)']:.2f}x")
    if result["profile"]:
        out += ["", "Where a training step's time goes (weights = all constrained weights, no data; "
                "rest = step - weights fwd+bwd: data convolutions, activations, loss, Adam):", "",
                "| model | step ms | weights no_grad ms | weights fwd+bwd ms | rest ms | weights share |",
                "|---|---|---|---|---|---|"]
        for p in result["profile"]:
            out.append(f"| {p['model']} | {1e3 * p['train_step']:.1f} | {1e3 * p['weights_nograd']:.1f} | "
                       f"{1e3 * p['weights_fwd_bwd']:.1f} | {1e3 * p['rest']:.1f} | {100 * p['weights_share']:.0f}% |")
        out.append(f"\nunconstrained steps, same data convolutions: ReLU {1e3 * sec['train/plain']:.1f} ms, "
                   f"MaxMin {1e3 * sec['train/plain (MaxMin)']:.1f} ms")
    out += [""] + [f"note: {n}" for n in result["notes"]]
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--padding-mode", default="circular", choices=["circular", "zeros"])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip timing the constrained weights alone")
    parser.add_argument("--json", type=Path, help="write {'device', 'torch', 'rows': [...], ...} here")
    parser.add_argument("--md", type=Path, help="write the printed tables here as markdown")
    parser.add_argument("--summarize", type=Path, help="print the tables of a saved --json file and exit")
    args = parser.parse_args(argv)
    if args.summarize:
        print(tables(json.loads(args.summarize.read_text())))
        return
    result = run(args)
    text = tables(result)
    print(text)
    write_outputs(result, text.replace("\nnote: ", "\n- note: "), args.json, args.md)


if __name__ == "__main__":
    main()
