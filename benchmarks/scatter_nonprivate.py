"""The non-private ceiling of the privacy benchmark's ScatterNet + linear model: the same cached, normalized
scattering features (benchmarks/privacy.py --arch scatter), the same linear head, trained without any privacy
(AdamW, cross-entropy, full passes). What a private run on these features could at best reach.

    python benchmarks/scatter_nonprivate.py --dataset cifar10 --feature-cache DIR [--holdout 10000]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _privacy_benchmark():
    spec = importlib.util.spec_from_file_location("privacy_benchmark", Path(__file__).with_name("privacy.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-root", default=None)
    p.add_argument("--feature-cache", required=True)
    p.add_argument("--holdout", type=int, default=0, help="evaluate on the last N of a fixed permutation of TRAIN")
    p.add_argument("--cfg", default='{"feature_norm":"group","norm_groups":81}', help="JSON: the feature options")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, nargs="+", default=[1e-3])
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--standardize", action="store_true",
                   help="then standardize every scattering channel with TRAIN's (non-private) mean and std")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bench = _privacy_benchmark()
    bench.FEATURE_CACHE = args.feature_cache
    cfg = dict(bench.SCATTER, **json.loads(args.cfg))
    train, test = bench.get_data(args.dataset, args.data_root, holdout=args.holdout)
    (tr, _), (te, _) = bench.scatter_features(train, cfg), bench.scatter_features(test, cfg)
    x, y, xt, yt = tr.features.flatten(1), tr.labels, te.features.flatten(1), te.labels
    if args.standardize:  # per channel: the statistics the private data_norm option releases under DP
        c = x.shape[1] // math.prod(bench._scatter_hw(train, cfg))
        per_channel = x.view(len(x), c, -1)
        mean, std = per_channel.mean((0, 2)), per_channel.std((0, 2)).clamp_min(1e-6)
        x, xt = ((v.view(len(v), c, -1) - mean[:, None]) / std[:, None] for v in (x, xt))
        x, xt = x.flatten(1), xt.flatten(1)
    rows = []
    for lr in args.lr:
        torch.manual_seed(args.seed)
        head = bench.feature_head(cfg, x.shape[1], ortho=False)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=args.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
        start = time.perf_counter()
        for _ in range(args.epochs):
            for idx in torch.randperm(len(x)).split(args.batch):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(head(x[idx]), y[idx]).backward()
                opt.step()
            sched.step()
        with torch.no_grad():
            acc = float((head(xt).argmax(1) == yt).float().mean())
            train_acc = float((head(x).argmax(1) == y).float().mean())
        row = dict(lr=lr, epochs=args.epochs, batch=args.batch, weight_decay=args.weight_decay, cfg=cfg,
                   holdout=args.holdout, standardize=args.standardize, accuracy=acc, train_accuracy=train_acc,
                   seconds=time.perf_counter() - start)
        rows.append(row)
        print(f"  lr {lr:g}: {'held-out' if args.holdout else 'test'} acc {acc:.4f} (train {train_acc:.4f}), "
              f"{row['seconds']:.0f}s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
