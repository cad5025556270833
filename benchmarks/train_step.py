"""One training step of a lipnet CNN against its plain twin and orthogonium's layers, fp32 and bf16 autocast.

    python benchmarks/train_step.py --threads 2 --json benchmarks/results/train_step_cpu.json \
        --md benchmarks/results/train_step_cpu.md

Networks (``--nets``):
* ``cifar_liresnet``: ``lipnet.models.cifar_liresnet(width=32, blocks=(1, 1, 1))`` (4.3M parameters,
  zero padding, BatchCentering, a 8192 -> 512 orthogonal dense layer);
* ``cifar10-preset``: the network ``lipnet train --dataset cifar10`` trains (``PRESETS["cifar10"]``:
  width 32, one block per stage, a 256-wide head);
* ``layers-net``: the network of ``benchmarks/layers.py`` (five 3x3 AOC convolutions, circular
  padding, MaxMin, a 2048 -> 10 orthogonal head).

Models per network, all with the same shapes, activations and loss:
* ``retraction``: lipnet's orthogonal layers, ``parametrization="retraction"`` (the default);
* ``polar``: the same layers, ``parametrization="polar"`` (polar factor of a raw parameter, every step);
* ``plain``: ``lipnet.nn.export(model)`` trained as a plain CNN (unconstrained ``nn.Conv2d`` /
  ``nn.Linear``, same shapes and activations) -- the twin the targets are stated against;
* ``orthogonium``: every ``OrthoConv2d`` / ``OrthoLinear`` replaced by orthogonium's own
  ``AdaptiveOrthoConv2d`` / ``OrthoLinear`` with their default ``OrthoParams`` (power iteration +
  12 Bjorck steps through autograd).

A step: forward and ``LipschitzCrossEntropy`` (under ``torch.autocast("cpu", bfloat16)`` for the bf16
rows), backward, Adam (lr ``--lr``) -- so the orthogonal factors change every step and every step pays
for their retraction. ``--formats contiguous channels_last``: each case also on the same batch in
channels-last memory format (what the cifar10 preset trains on). Input checks off
(``set_input_checks(False)``), as ``lipnet train`` runs. All cases of a batch size are interleaved
round-robin in each repeat and reported as medians with ratios to the plain twin of the same run.
``--compile`` adds the retraction model and the plain twin under ``torch.compile`` (fp32, the first
format; fresh copies, the factors retracted after each step by ``lipnet.nn.retract_after_step``),
each compiled model's ratio taken to the compiled twin. ``--profile`` adds, for the retraction model, the median cost of its weights alone: retracting every
factor as a real (5th) Adam step left it (no grad) and building every kernel forward + backward
(including the tangent projection of the factors' gradients).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
import lipnet.nn as ln  # noqa: E402
from lipnet.models import build_model, cifar_liresnet  # noqa: E402
from lipnet.nn.parametrizations import CoreOrthogonalizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # layers.py and the harness beside this script
import layers as layers_benchmark  # noqa: E402
from _harness import machine_info, median, time_interleaved, write_outputs  # noqa: E402


def build(net: str, parametrization: str) -> nn.Module:
    if net == "cifar_liresnet":
        return cifar_liresnet(width=32, blocks=(1, 1, 1), parametrization=parametrization)
    if net == "cifar10-preset":
        from lipnet.presets import PRESETS

        return build_model(PRESETS["cifar10"].model, **PRESETS["cifar10"].model_config, parametrization=parametrization)
    layers = []
    for cin, cout, s in layers_benchmark.CONVS:
        layers += [ln.OrthoConv2d(cin, cout, 3, stride=s, padding=1 if s > 1 else "same", parametrization=parametrization),
                   ln.MaxMin()]
    return nn.Sequential(*layers, ln.Flatten(), ln.OrthoLinear(layers_benchmark.FEATURES, 10, parametrization=parametrization))


def orthogonium_twin(model: nn.Module) -> nn.Module:
    """``model`` with orthogonium's own layers (default OrthoParams) in place of lipnet's."""
    from orthogonium.layers.conv.AOC import AdaptiveOrthoConv2d
    from orthogonium.layers.linear import OrthoLinear

    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, ln.OrthoConv2d):
                setattr(module, name, AdaptiveOrthoConv2d(
                    child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                    padding=child.padding, groups=child.groups, bias=child.bias is not None,
                    padding_mode=child.padding_mode))
            elif isinstance(child, ln.OrthoLinear):
                setattr(module, name, OrthoLinear(child.in_features, child.out_features, bias=child.bias is not None))
            else:
                swap(child)
    swap(model)
    return model


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, amp: bool, compiled: bool = False):
    criterion = ln.LipschitzCrossEntropy(temperature=0.125, offset=0.3)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    forward = model
    if compiled:  # the compiled forward uses the factors as given: retract them after each step
        ln.retract_after_step(opt, model)
        forward = torch.compile(model)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = criterion(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, opt


def weight_cases(model: nn.Module, opt: torch.optim.Optimizer, step) -> dict:
    """The retraction model's weights alone: retracting the factors a real step moved, and building
    every constrained kernel forward + backward (the tangent projections included)."""
    weighted = [(m, n) for m in model.modules() if parametrize.is_parametrized(m) for n in m.parametrizations]
    orthogonalizers = [m for m in model.modules() if isinstance(m, CoreOrthogonalizer)]
    factors = [p for n, p in model.named_parameters() if "parametrizations" in n]
    moved = [None]

    def retraction():
        if moved[0] is None:  # the factors after a real step (the 5th: Adam's first are its largest), restored each time
            for _ in range(5):
                step()
            moved[0] = [p.detach().clone() for p in factors]
        with torch.no_grad():
            for p, v in zip(factors, moved[0]):
                p.copy_(v)  # bumps the version: the next access retracts
        for m in orthogonalizers:
            m._retracted_state = None
        with torch.no_grad():
            for m, n in weighted:
                getattr(m, n)

    def kernels():
        _mark_retracted(model)  # time the graph alone
        ws = [getattr(m, n) for m, n in weighted]
        torch.autograd.backward(ws, [torch.ones_like(w) for w in ws])
        opt.zero_grad(set_to_none=True)
    return {"retraction": retraction, "kernels fwd+bwd": kernels}


def _mark_retracted(model: nn.Module) -> None:
    """Record every stored factor as freshly retracted (without retracting): benchmarking only."""
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for plist in module.parametrizations.values():
            for m in plist.modules():
                if isinstance(m, CoreOrthogonalizer):
                    m._retracted_state = (plist.original.data_ptr(), plist.original._version)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    ln.set_input_checks(False)
    rows, profile = [], []
    for net in args.nets:
        for batch in args.batches:
            torch.manual_seed(args.seed)
            x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
            models = {"retraction": build(net, "retraction")}
            torch.manual_seed(args.seed)
            models["polar"] = build(net, "polar")
            models["plain"] = ln.export(models["retraction"]).train()
            if not args.no_orthogonium:
                torch.manual_seed(args.seed)
                models["orthogonium"] = orthogonium_twin(build(net, "retraction"))
            inputs = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
            cases, opts = {}, {}
            for amp in args.precisions:
                for fmt in args.formats:
                    for name, model in models.items():
                        cases[(name, amp, fmt)], opts[(name, amp, fmt)] = make_step(model, inputs[fmt], y, args.lr,
                                                                                    amp == "bf16")
            first = args.formats[0]
            if args.compile:  # fresh copies (compiled and eager steps must not share factors), fp32, first format
                torch.manual_seed(args.seed)
                compiled = {"retraction": build(net, "retraction")}
                compiled["plain"] = ln.export(compiled["retraction"]).train()
                for name, model in compiled.items():
                    cases[(f"{name}+compile", "fp32", first)], _ = make_step(model, inputs[first], y, args.lr, False,
                                                                            compiled=True)
            if args.profile:
                for key, fn in weight_cases(models["retraction"], opts[("retraction", "fp32", first)],
                                            cases[("retraction", "fp32", first)]).items():
                    cases[("weights: " + key, "fp32", first)] = fn
            print(f"{net}, batch {batch}: {len(cases)} cases, {args.warmup} warm-up + {args.repeats} repeats",
                  flush=True)
            seconds = {case: median(t) for case, t in time_interleaved(cases, args.repeats, args.warmup).items()}
            for (name, amp, fmt), s in seconds.items():
                if name.startswith("weights: "):
                    profile.append(dict(net=net, batch=batch, part=name[9:], seconds=s,
                                        share_of_step=s / seconds[("retraction", "fp32", fmt)]))
                else:
                    # None where the contiguous twin of the case was not measured (--formats channels_last)
                    contiguous = seconds.get((name, amp, "contiguous"))
                    # a compiled model against the compiled plain twin, an eager one against the eager twin
                    twin = "plain+compile" if name.endswith("+compile") else "plain"
                    rows.append(dict(net=net, batch=batch, model=name, precision=amp, format=fmt, seconds=s,
                                     ratio_to_plain=s / seconds[(twin, amp, fmt)],
                                     ratio_to_eager=(None if not name.endswith("+compile") else
                                                     seconds[(name[:-len("+compile")], amp, fmt)] / s),
                                     ratio_to_contiguous=None if contiguous is None else contiguous / s))
    info = machine_info()
    return {"cpu": info["cpu"], "threads": args.threads, "torch": info["torch"], "date": info["date"][:10],
            "repeats": args.repeats, "warmup": args.warmup, "lr": args.lr, "rows": rows, "profile": profile,
            "command": " ".join(["python", "benchmarks/train_step.py"] + sys.argv[1:]), "machine_info": info}


def tables(result: dict) -> str:
    out = [f"cpu: {result['cpu']}, {result['threads']} threads, torch {result['torch']}, {result['date']}; "
           f"median of {result['repeats']} interleaved repeats ({result['warmup']} warm-up), Adam lr {result['lr']}", "",
           "| network | batch | precision | format | model | step ms | ratio to plain twin | speed-up over contiguous |"
           " speed-up of compiling |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        fmt = r.get("format", "contiguous")  # results saved before the format axis are contiguous
        speedup = r.get("ratio_to_contiguous", 1.0)
        speedup = "-" if speedup is None else f"{speedup:.2f}x"
        eager = r.get("ratio_to_eager")
        eager = "-" if eager is None else f"{eager:.2f}x"
        out.append(f"| {r['net']} | {r['batch']} | {r['precision']} | {fmt} | {r['model']} | {1e3 * r['seconds']:.0f} | "
                   f"{r['ratio_to_plain']:.2f}x | {speedup} | {eager} |")
    if any(r["model"].endswith("+compile") for r in result["rows"]):
        out += ["", "`+compile`: `torch.compile(model)` (inductor), factors retracted after each step by "
                "`lipnet.nn.retract_after_step`; its ratio is to the compiled plain twin, the last column its "
                "eager step time over the compiled one."]
    if result["profile"]:
        out += ["", "Weights of the retraction model alone (fp32):", "",
                "| network | batch | part | ms | share of its step |", "|---|---|---|---|---|"]
        for p in result["profile"]:
            out.append(f"| {p['net']} | {p['batch']} | {p['part']} | {1e3 * p['seconds']:.0f} | "
                       f"{100 * p['share_of_step']:.0f}% |")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=["cifar_liresnet", "layers-net"],
                        choices=["cifar_liresnet", "cifar10-preset", "layers-net"])
    parser.add_argument("--formats", nargs="+", default=["contiguous"], choices=["contiguous", "channels_last"])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-orthogonium", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="also the retraction model and the plain twin under torch.compile (fp32, first format)")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--summarize", type=Path, help="print the tables of a saved --json file and exit")
    args = parser.parse_args(argv)
    if args.summarize:
        print(tables(json.loads(args.summarize.read_text())))
        return
    result = run(args)
    text = tables(result)
    print(text)
    write_outputs(result, text, args.json, args.md)


if __name__ == "__main__":
    main()
