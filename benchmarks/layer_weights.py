"""Cost of computing the constrained weights alone (no data) of the layers benchmark's network, per
core method, with the resulting per-layer Lipschitz bounds; then a profile of the default method.

    python benchmarks/layer_weights.py [--repeats 7] [--threads N]

Answers: how much of a training step is orthogonalization, and would another core method (or fewer
steps) be faster while staying orthogonal? Interleaved timing, median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.profiler import profile

import lipnet.nn as ln
from lipnet.nn.parametrizations import CoreOrthogonalizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this script
from _harness import machine_info, median, time_interleaved  # noqa: E402

# (parametrization, method, steps, backward); "retraction" is the layers' default: its weights are the
# stored factors (the retraction after an optimizer step is not part of this forward + backward)
VARIANTS = {"retraction": ("retraction", "convergent", None),
            "polar convergent": ("polar", "convergent", None), "polar convergent, 5 steps": ("polar", "convergent", 5),
            "polar convergent, iteration backward": ("polar", "convergent", None, "iteration"),
            "polar svd": ("polar", "svd", None), "polar bjorck": ("polar", "bjorck", None)}


def build(parametrization: str, method: str, steps: int | None, backward: str | None = None) -> nn.ModuleList:
    torch.manual_seed(0)
    kw = dict(method=method, steps=steps, parametrization=parametrization)
    layers = nn.ModuleList([
        ln.OrthoConv2d(3, 32, 3, **kw), ln.OrthoConv2d(32, 64, 3, stride=2, padding=1, **kw), ln.OrthoConv2d(64, 64, 3, **kw),
        ln.OrthoConv2d(64, 128, 3, stride=2, padding=1, **kw), ln.OrthoConv2d(128, 128, 3, stride=2, padding=1, **kw),
        ln.OrthoLinear(2048, 10, **kw),
    ])
    for m in layers.modules():  # the polar layers' default is backward="polar"
        if isinstance(m, CoreOrthogonalizer) and backward is not None:
            m.backward = backward
    return layers


def weights_forward_backward(layers: nn.ModuleList) -> None:
    sum(layer.weight.sum() for layer in layers).backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {name: build(*cfg) for name, cfg in VARIANTS.items()}
    cases = {name: partial(weights_forward_backward, layers) for name, layers in models.items()}
    seconds = {name: median(t) for name, t in
               time_interleaved(cases, args.repeats, warmup=0, rotate=False).items()}
    print(f"{machine_info()['threads']} threads, median of {args.repeats}, weights forward+backward:")
    base = seconds["polar convergent"]
    for name, layers in models.items():
        bounds = ", ".join(f"{ln.lipschitz_bound(layer):.6f}" for layer in layers)
        print(f"  {name:31s} {seconds[name] * 1e3:7.1f} ms  ({seconds[name] / base:.2f}x)  bounds: {bounds}")
    with profile() as prof:
        for _ in range(3):
            weights_forward_backward(models["polar convergent"])
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
