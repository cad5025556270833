"""Turn a trained run into a shipped model (lipnet/models/weights/NAME.pt, lipnet.pretrained).

    python benchmarks/ship_pretrained.py --checkpoint runs/cifar10-cpu --name cifar10 \\
        --json benchmarks/results/pretrained_cifar10.json

Certifies the run's fp32 weights and an fp16 copy on the whole test split (clean accuracy and
certified accuracy at the run's radii, each copy's bound recomputed from its own weights) and ships
the fp16 copy only if no number moves by more than --max-change (default 0.1 point), the fp32
weights otherwise. Prints the clean accuracy of the shipped file on the 500 test images
``load_dataset(..., limit=500)`` returns (those ``lipnet certify --limit 500`` certifies), the value
lipnet.pretrained.PRETRAINED records and the tests reproduce.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from lipnet import data as lipdata
from lipnet.certify import certified_accuracy
from lipnet.pretrained import WEIGHTS_DIR
from lipnet.nn import set_input_checks
from lipnet.checkpoints import CHECKPOINT, load_checkpoint, save_checkpoint


def certify(model, loader, eps) -> dict:
    report = certified_accuracy(model, loader, eps)
    return {"clean": report.clean, "certified": {float(e): a for e, a in report.certified.items()},
            "lipschitz_bound": report.lipschitz_bound}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory written by `lipnet train --out`")
    p.add_argument("--name", required=True, help="shipped name (lipnet/models/weights/NAME.pt)")
    p.add_argument("--max-change", type=float, default=0.001, help="largest accuracy change fp16 may cause")
    p.add_argument("--data-root", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    set_input_checks(False)
    model, config, history = load_checkpoint(args.checkpoint)
    test = lipdata.load_dataset(config.dataset, "test", args.data_root, progress=False)
    loader = lipdata.BatchLoader(test, 500)
    eps = list(config.eval_eps)
    full = certify(model, loader, eps)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, model, config, history, weights_dtype=torch.float16)
        half_model, _, _ = load_checkpoint(tmp)
        half = certify(half_model, loader, eps)
        change = max([abs(full["clean"] - half["clean"])]
                     + [abs(full["certified"][e] - half["certified"][e]) for e in full["certified"]])
        ship_half = change <= args.max_change
        WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
        target = WEIGHTS_DIR / f"{args.name}.pt"
        if ship_half:
            shutil.copyfile(Path(tmp) / CHECKPOINT, target)
        else:
            save_checkpoint(tmp, model, config, history)
            shutil.copyfile(Path(tmp) / CHECKPOINT, target)
    shipped, _, _ = load_checkpoint(target)
    subset = lipdata.BatchLoader(lipdata.load_dataset(config.dataset, "test", args.data_root, limit=500,
                                                      progress=False), 500)
    clean_500 = certify(shipped, subset, eps)["clean"]
    result = {"name": args.name, "file": str(target.relative_to(WEIGHTS_DIR.parent.parent.parent)),
              "bytes": target.stat().st_size, "dtype": "float16" if ship_half else "float32",
              "fp32": full, "fp16": half, "largest_change": change, "clean_limit_500": clean_500,
              "parameters": sum(t.numel() for t in model.parameters())}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
