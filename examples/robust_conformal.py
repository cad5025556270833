"""Robust conformal prediction in one screen: calibrate a 1-Lipschitz MNIST classifier, predict
prediction sets that keep 90% coverage under any L2 attack of size eps, attack them, plot.

    python examples/robust_conformal.py --data-root ../shared/datasets            # trains 1 epoch
    python examples/robust_conformal.py --checkpoint runs/mnist                   # or reuse `lipnet train`

Why it is sound: the network's Lipschitz bound L is computed from its weights, so an attack of
size eps moves the logits by at most eps * L; the robust set includes every class whose score
could reach the calibrated threshold anywhere in that ball -- no sampling, no smoothing.
"""

import argparse

import torch

from lipnet.certify import ConformalClassifier
from lipnet.data import BatchLoader, load_dataset, random_split
from lipnet.models import build_model
from lipnet.nn import LipschitzCrossEntropy
from lipnet.checkpoints import load_checkpoint

parser = argparse.ArgumentParser()
parser.add_argument("--data-root", default=None, help="default: $LIPNET_DATA")
parser.add_argument("--checkpoint", default=None, help="a `lipnet train --dataset mnist` directory")
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--limit", type=int, default=None, help="use a subset of each split")
parser.add_argument("--alpha", type=float, default=0.1)
parser.add_argument("--plot", default="robust_conformal.png")
args = parser.parse_args()
torch.manual_seed(0)

if args.checkpoint:
    model, _, _ = load_checkpoint(args.checkpoint)
else:  # a 1-Lipschitz ConvNet from lipnet.models, trained briefly
    model = build_model("mnist-convnet", mean=(0.1307,))
    train = BatchLoader(load_dataset("mnist", "train", args.data_root, limit=args.limit), 256, shuffle=True)
    loss_fn, opt = LipschitzCrossEntropy(temperature=0.25, offset=2.5), torch.optim.Adam(model.parameters(), lr=2e-3)
    for epoch in range(args.epochs):
        for x, y in train:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

# Calibration and test points come from the same distribution (a random split of the test set).
calibration, test = random_split(load_dataset("mnist", "test", args.data_root, limit=args.limit), 0.5)
cal_loader, test_loader = BatchLoader(calibration, 500), BatchLoader(test, 500)
attacked_loader = BatchLoader(test.subset(torch.arange(min(500, len(test)))), 500)

vanilla = ConformalClassifier(model, "lac", args.alpha, eps=0.0, temperature=0.25).calibrate(cal_loader)
vanilla.fit_coverage_bound(test_loader)          # what plain CP provably keeps under attack
print(f"Lipschitz bound of the network: {vanilla.lipschitz:.6f}")
eps_list = [0.0, 0.1, 0.25, 0.5, 1.0]
sizes, robust_cov, vanilla_cov = [], [], []
for eps in eps_list:
    robust = ConformalClassifier(model, "lac", args.alpha, eps=eps, temperature=0.25).calibrate(cal_loader)
    clean = robust.evaluate(test_loader)
    under_attack = robust.evaluate(attacked_loader, attack="pgd", attack_steps=10)
    plain_attacked = vanilla.evaluate(attacked_loader, attack="pgd", attack_eps=eps, attack_steps=10)
    sizes.append(clean.mean_size)
    robust_cov.append(under_attack.coverage)
    vanilla_cov.append(plain_attacked.coverage)
    print(f"eps {eps:4}: robust sets size {clean.mean_size:.2f}, coverage {clean.coverage:.1%} clean / "
          f"{under_attack.coverage:.1%} under PGD | vanilla under PGD {plain_attacked.coverage:.1%}, "
          f"guaranteed >= {vanilla.vanilla_coverage_lower_bound(eps):.1%}")

sets = robust.predict_sets(next(iter(test_loader))[0][:5])  # the last robust classifier (eps = 1.0)
print("robust sets of 5 test images:", [torch.nonzero(s).flatten().tolist() for s in sets])

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
a.plot(eps_list, sizes, "s-")
a.set_xlabel("L2 budget eps")
a.set_ylabel("mean robust set size")
b.plot(eps_list, robust_cov, "s-", label="robust CP under PGD")
b.plot(eps_list, vanilla_cov, "o-", label="vanilla CP under PGD")
b.plot(eps_list, vanilla.vanilla_coverage_lower_bound(eps_list), "o--", label="vanilla: guaranteed")
b.axhline(1 - args.alpha, color="gray", lw=0.8)
b.set_xlabel("L2 budget eps")
b.set_ylabel("coverage")
b.legend(fontsize=7)
fig.tight_layout()
fig.savefig(args.plot, dpi=120)
print(f"plot: {args.plot}")
