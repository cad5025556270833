"""How tight and how costly the per-sample gradient bounds of lipnet.privacy are.

    python benchmarks/privacy_bounds.py --threads 1 [--data-root ../shared/datasets] [--json PATH]

1. Tightness on real MNIST test digits: exact per-sample gradient norms (torch.func, through
   ``per_sample_gradient_norms``) over ``gradient_norm_bounds``, per tensor and in total, for the
   private MNIST CNN at initialization (every layer trainable), and for ``scatter_net`` (the default
   private model: fixed scattering, linear head).
2. The convolution reuse factor on an adversarial pair (lip-dp's case): a 3x3 zero-padded conv on a
   28x28 constant image of norm X with a constant output cotangent of norm g; the exact kernel
   gradient over X g, beside lipnet's sqrt(R) and lip-dp's sqrt(kh kw) * coef.
3. Cost: ``gradient_norm_bounds`` per step (weights computed once, as in a step) and a private step
   vs a non-private step (same summed loss, same optimizer) at batch 256.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
import lipnet.nn as ln  # noqa: E402
from lipnet.data import load_dataset  # noqa: E402
from lipnet.models import mnist_convnet, scatter_net  # noqa: E402
from lipnet.privacy import PrivateTrainer, gradient_norm_bounds, per_sample_gradient_norms  # noqa: E402
from lipnet.privacy import private_trainable  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this script
from _harness import machine_info, median, time_interleaved  # noqa: E402


def tightness(data_root: str | None) -> dict:
    ds = load_dataset("mnist", "test", data_root, limit=64, progress=False)
    x, y = ds.images.float() / 255, ds.labels
    torch.manual_seed(0)
    model = mnist_convnet(width=8, hidden=64, centering="none", input_radius=8.0)
    loss = ln.LipschitzCrossEntropy(temperature=0.25, offset=1.0)
    report = gradient_norm_bounds(model, 28.0, loss, (1, 28, 28))
    norms = per_sample_gradient_norms(model, report, x, y, loss)
    per_tensor = {b.name: float(norms[b.name].max()) / b.bound for b in report.bounds}
    return {"samples": len(y), "total_max_ratio": float(norms["total"].max()) / report.total,
            "total_mean_ratio": float(norms["total"].mean()) / report.total,
            "per_tensor_max_ratio": per_tensor}


def scatter_tightness(data_root: str | None) -> dict:
    """The same measurement for the default private model (``scatter_net``: fixed scattering, linear
    head, biases frozen as in the preset), at initialization, through the whole model."""
    ds = load_dataset("mnist", "test", data_root, limit=64, progress=False)
    x, y = ds.images.float() / 255, ds.labels
    torch.manual_seed(0)
    model = scatter_net(mean=(0.1307,), input_radius=8.0)
    private_trainable(model, "all", freeze_bias=True)
    loss = ln.LipschitzCrossEntropy(temperature=1.0, offset=0.0)
    report = gradient_norm_bounds(model, 28.0, loss, (1, 28, 28))
    norms = per_sample_gradient_norms(model, report, x, y, loss)
    return {"samples": len(y), "total_max_ratio": float(norms["total"].max()) / report.total,
            "total_mean_ratio": float(norms["total"].mean()) / report.total}


def conv_reuse_case(size: int = 28, radius: float = 5.0) -> dict:
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    head = nn.Linear(size * size, 2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1 / 9)
        head.weight.copy_(torch.cat([torch.ones(1, size * size), -torch.ones(1, size * size)]) / math.sqrt(2 * size * size))
    model = nn.Sequential(conv, nn.Flatten(), head)
    loss = ln.LipschitzCrossEntropy(temperature=0.01, offset=0.0)
    report = gradient_norm_bounds(model, radius, loss, (1, size, size))
    norms = per_sample_gradient_norms(model, report, torch.full((1, 1, size, size), radius / size), torch.tensor([1]),
                                      loss)
    xg = radius * math.sqrt(2.0)  # X * g: loss Lipschitz sqrt(2), head norm 1
    a = 1.0  # lip-dp's (k - 1) / 2 for a 3x3 kernel
    coef = math.sqrt(size * size / ((3 * size - a * (a + 1)) ** 2))
    return {"exact_over_Xg": float(norms["0.weight"][0]) / xg, "lipnet_over_Xg": report.bounds[0].bound / xg,
            "lipdp_over_Xg": 3 * coef}


def cost(data_root: str | None, repeats: int = 10) -> dict:
    ds = load_dataset("mnist", "train", data_root, limit=10000, progress=False)
    torch.manual_seed(0)
    model = mnist_convnet(width=8, hidden=128, centering="none", input_radius=8.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    trainer = PrivateTrainer(model, opt, ds, loss=ln.LipschitzCrossEntropy(), input_bound=28.0, target_delta=1e-5,
                             noise_multiplier=1.0, sample_rate=256 / len(ds), progress=False)
    x, y = ds.images[:256].float() / 255, ds.labels[:256]

    def normal():
        opt.zero_grad(set_to_none=True)
        trainer.summed_loss(model(trainer.projection(x)), y).backward()
        opt.step()

    def bounds():
        with parametrize.cached():
            for m in model.modules():
                if parametrize.is_parametrized(m):
                    for name in m.parametrizations:
                        getattr(m, name)
            trainer.sensitivity()

    cases = {"normal_step": normal, "private_step": lambda: trainer.step(x, y), "bounds": bounds}
    timings = time_interleaved(cases, repeats, warmup=2, rotate=False)
    med = {k: 1000 * median(v) for k, v in timings.items()}
    return {"batch": 256, "normal_step_ms": med["normal_step"], "private_step_ms": med["private_step"],
            "bounds_ms": med["bounds"], "private_over_normal": med["private_step"] / med["normal_step"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=None, help="default: $LIPNET_DATA")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info()
    out = {"machine": f"{info['host']} {info['arch']}, torch {info['torch']}, threads {args.threads}",
           "tightness": tightness(args.data_root), "scatter_tightness": scatter_tightness(args.data_root),
           "conv_reuse_case": conv_reuse_case(), "cost": cost(args.data_root), "machine_info": info}
    t, c, k = out["tightness"], out["cost"], out["conv_reuse_case"]
    print(f"tightness on {t['samples']} MNIST test digits: max per-sample / bound = {t['total_max_ratio']:.3f} "
          f"(mean {t['total_mean_ratio']:.3f}); per tensor {min(t['per_tensor_max_ratio'].values()):.3f}"
          f"-{max(t['per_tensor_max_ratio'].values()):.3f}")
    st = out["scatter_tightness"]
    print(f"scatter_net (linear head) on the same digits: max per-sample / bound = {st['total_max_ratio']:.3f} "
          f"(mean {st['total_mean_ratio']:.3f})")
    print(f"constant image, 3x3 zero-padded conv on 28x28: exact kernel gradient {k['exact_over_Xg']:.3f} X g, "
          f"lipnet bound {k['lipnet_over_Xg']:.3f} X g, lip-dp's factor {k['lipdp_over_Xg']:.3f} X g")
    print(f"batch 256: bounds {c['bounds_ms']:.1f} ms, private step {c['private_step_ms']:.1f} ms vs non-private "
          f"{c['normal_step_ms']:.1f} ms ({c['private_over_normal']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
