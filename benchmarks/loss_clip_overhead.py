"""What ``ClippedLossGradient`` costs in a private step: the same linear head on CIFAR-sized scattering
features (15,552 per sample), one ``PrivateTrainer.step`` with ``LipschitzCrossEntropy`` and one with it
wrapped in ``ClippedLossGradient(0.25)``, interleaved (alternating which goes first), medians.

    python benchmarks/loss_clip_overhead.py --threads 1 [--batch 1024] [--steps 60]

Random features on the sphere of radius 7 stand in for the cached ones (the step's cost does not depend on
their values); no data needed.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import lipnet.nn as ln  # noqa: E402
from lipnet.privacy import FeatureDataset, make_private  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this script
from _harness import machine_info, median, time_interleaved  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--features", type=int, default=15552)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = 20 * args.batch
    x = torch.randn(n, args.features)
    x *= 7 / x.norm(dim=1, keepdim=True)
    data = FeatureDataset(x, torch.randint(0, 10, (n,)))
    losses = {"LipschitzCrossEntropy": ln.LipschitzCrossEntropy(1.0, 0.0),
              "ClippedLossGradient(0.25)": ln.ClippedLossGradient(ln.LipschitzCrossEntropy(1.0, 0.0), 0.25)}
    trainers = {}
    for name, loss in losses.items():
        head = torch.nn.Sequential(torch.nn.Linear(args.features, 10, bias=False))
        trainers[name] = make_private(head, torch.optim.SGD(head.parameters(), lr=1.0), data, 3.0, 1e-5, 5, loss=loss,
                                      input_bound=8.0, sample_rate=args.batch / n, progress=False)
    xb, yb = x[:args.batch], data.labels[:args.batch]
    steps = {name: partial(trainer.step, xb, yb) for name, trainer in trainers.items()}
    # two cases rotated each repeat: they alternate which goes first
    times = time_interleaved(steps, args.steps, warmup=3)
    med = {k: median(v) * 1e3 for k, v in times.items()}
    print(f"{machine_info()['cpu']}, {args.threads} thread(s), batch {args.batch}, "
          f"{args.features} features, {args.steps} interleaved steps, medians:")
    for name, ms in med.items():
        print(f"  {name:28s} {ms:8.1f} ms/step")
    ratio = med["ClippedLossGradient(0.25)"] / med["LipschitzCrossEntropy"]
    print(f"  ratio clipped / plain: {ratio:.3f}")


if __name__ == "__main__":
    main()
