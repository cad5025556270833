"""The float error that ``certified_radius``'s slack must absorb, measured.

For each case, the largest error of a logit difference |(z_i - z_j)_fp32 - (z_i - z_j)_fp64| over a
batch, in ulp (fp32) of the slack's scale max|z| + L ||x||, and in ulp of max|z| alone (the
pre-activation-scale rule). The slack is 64 ulp of the first scale; a ratio near 64 would mean it
is too small. Cases: the shipped CIFAR-10 model on uniform images scaled by 1, 1e3, 1e6; an
OrthoLinear head fed 1e7-norm inputs from its null space (exact logits 0, only rounding left).

    python benchmarks/float_slack.py --json benchmarks/results/float_slack.json
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import describe, machine_info, write_outputs  # noqa: E402

import lipnet.nn as ln  # noqa: E402
from lipnet.certify import network_lipschitz_bound  # noqa: E402
from lipnet.pretrained import pretrained  # noqa: E402

ULP = torch.finfo(torch.float32).eps


def _worst(z32: torch.Tensor, z64: torch.Tensor, x: torch.Tensor, lipschitz: float) -> tuple[float, float]:
    err = z32.double() - z64
    pair = (err[:, :, None] - err[:, None, :]).abs().amax((1, 2))
    logit_scale = z32.double().abs().amax(1)
    scale = logit_scale + lipschitz * x.double().flatten(1).norm(dim=1)
    return float((pair / (ULP * scale)).max()), float((pair / (ULP * logit_scale)).max())


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)  # the heads' initialization
    g = torch.Generator().manual_seed(0)
    rows = []
    model = pretrained("cifar10")
    lipschitz = network_lipschitz_bound(model)
    plain = ln.export(model)
    plain64 = copy.deepcopy(plain).double()
    for scale in (1.0, 1e3, 1e6):
        x = torch.rand(32, 3, 32, 32, generator=g) * scale
        rows.append({"case": f"cifar10 model, uniform images x {scale:g}",
                     **dict(zip(("ulp_of_slack_scale", "ulp_of_max_logit"),
                                _worst(plain(x), plain64(x.double()), x, lipschitz)))})
    for d in (16, 256, 4096):
        head = ln.export(ln.OrthoLinear(d, 10, bias=False))
        head64 = copy.deepcopy(head).double()
        w = head64.weight
        worst = (0.0, 0.0)
        for _ in range(20):
            x = torch.randn(64, d, generator=g, dtype=torch.float64)
            x = x - x @ w.T @ w
            x = (x * (1e7 / x.norm(dim=1, keepdim=True))).float()
            worst = tuple(map(max, worst, _worst(head(x), head64(x.double()), x, 1.0)))
        rows.append({"case": f"OrthoLinear({d}, 10), 1e7-norm inputs in its null space",
                     "ulp_of_slack_scale": worst[0], "ulp_of_max_logit": worst[1]})
    info = machine_info()
    lines = [f"{describe(info)}, torch {info['torch']}, {info['date'][:10]}", "",
             "| case | worst error, ulp of max\\|z\\| + L\\|x\\| (slack: 64) | ulp of max\\|z\\| |", "|---|---|---|"]
    lines += [f"| {r['case']} | {r['ulp_of_slack_scale']:.3f} | {r['ulp_of_max_logit']:.3g} |" for r in rows]
    markdown = "\n".join(lines)
    print(markdown)
    write_outputs({"machine": info, "rows": rows}, markdown, args.json, args.md)


if __name__ == "__main__":
    main()
