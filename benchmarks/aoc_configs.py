"""Sweep OrthoConv2d configurations: each must be refused with a ValueError or have a sound bound <= 1.001.

Also times ``lipschitz_bound`` on the 5-conv CIFAR-sized AOC network of ``benchmarks/layers.py``.

    python benchmarks/aoc_configs.py
"""

from __future__ import annotations

import collections
import itertools
import time

import torch
from torch import nn

import lipnet.nn as ln


def sweep() -> None:
    bad, refused, ok = [], collections.Counter(), 0
    for g, ci, co, k, s, d, tr, mode in itertools.product(
        [1, 2], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3], [1, 2, 3], [False, True], ["circular", "zeros"]
    ):
        if tr and mode == "circular":
            continue
        pad = "same" if s == 1 and not tr else (d * (k - 1) - s + 2) // 2
        torch.manual_seed(0)
        try:
            m = ln.OrthoConv2d(g * ci, g * co, k, stride=s, padding=pad, dilation=d, groups=g, transposed=tr, padding_mode=mode)
            m(torch.randn(1, g * ci, 12, 12))
        except ValueError as err:
            refused[str(err).split(": ", 1)[-1][:70]] += 1
            continue
        with torch.no_grad():
            for p in m.parameters():
                p.normal_()
        bound = ln.lipschitz_bound(m)
        if bound > 1.001:
            bad.append(((g * ci, g * co, k, s, d, tr, mode), bound))
        else:
            ok += 1
    total = ok + len(bad) + sum(refused.values())
    print(f"{total} configurations: {ok} constructible with bound <= 1.001, {sum(refused.values())} refused, {len(bad)} bad")
    for reason, n in refused.most_common():
        print(f"  refused x{n}: {reason}")
    for cfg, bound in bad:
        print(f"  BAD (in, out, k, stride, dilation, transposed, padding) = {cfg}: bound {bound}")


def bound_timing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        ln.OrthoConv2d(3, 32, 3), ln.MaxMin(), ln.OrthoConv2d(32, 64, 3, stride=2, padding=1), ln.MaxMin(),
        ln.OrthoConv2d(64, 64, 3), ln.MaxMin(), ln.OrthoConv2d(64, 128, 3, stride=2, padding=1), ln.MaxMin(),
        ln.OrthoConv2d(128, 128, 3, stride=2, padding=1), ln.MaxMin(), ln.Flatten(), ln.OrthoLinear(2048, 10),
    ).eval()
    start = time.perf_counter()
    bound = ln.lipschitz_bound(model)
    print(f"5-conv AOC network: lipschitz_bound = {bound:.7f} in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    sweep()
    bound_timing()
