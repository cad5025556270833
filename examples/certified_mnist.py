"""Certified robustness on MNIST in one screen: build a 1-Lipschitz CNN from lipnet.nn, train it,
certify it (sound radii), check with PGD, plot certified accuracy vs eps.

    python examples/certified_mnist.py --data-root ../shared/datasets --epochs 2

Every radius below is a proof: no L2 perturbation smaller than it can change the prediction,
because the network's Lipschitz bound is computed soundly from the weights in use.
"""

import argparse

import torch
from torch import nn

import lipnet.nn as ln
from lipnet.certify import certified_accuracy, lipschitz_lower_bound, network_lipschitz_bound
from lipnet.data import BatchLoader, load_dataset

parser = argparse.ArgumentParser()
parser.add_argument("--data-root", default=None, help="default: $LIPNET_DATA")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--limit", type=int, default=None, help="train/test on a subset")
parser.add_argument("--plot", default="certified_mnist.png")
args = parser.parse_args()
torch.manual_seed(0)


def conv(cin, cout, k=3, stride=1):  # orthogonal conv (AOC), mean-centering, GroupSort-2
    pad = "same" if stride == 1 else 0
    return [ln.OrthoConv2d(cin, cout, k, stride=stride, padding=pad, padding_mode="zeros"),
            ln.BatchCentering(cout), ln.MaxMin()]


model = nn.Sequential(
    ln.InputNormalization([0.1307]),                 # inside the model: radii stay in pixel units
    *conv(1, 16), *conv(16, 16), *conv(16, 32, k=2, stride=2),
    *conv(32, 32), *conv(32, 64, k=2, stride=2),
    ln.Flatten(), ln.OrthoLinear(64 * 7 * 7, 256), ln.MaxMin(), ln.OrthoLinear(256, 10),
)

train = BatchLoader(load_dataset("mnist", "train", args.data_root, limit=args.limit), 256, shuffle=True)
test = BatchLoader(load_dataset("mnist", "test", args.data_root, limit=args.limit), 500)
loss_fn = ln.LipschitzCrossEntropy(temperature=0.25, offset=2.5)  # asks for margin 2.5: radius ~1.77
opt = torch.optim.Adam(model.parameters(), lr=2e-3)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.epochs * len(train))

for epoch in range(args.epochs):
    model.train()
    for x, y in train:
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    report = certified_accuracy(model, test, [1.58])
    print(f"epoch {epoch + 1}: clean {report.clean:.2%}, certified at eps=1.58: {report.certified[1.58]:.2%}")

eps = [0.5, 1.0, 1.58, 2.0]
report = certified_accuracy(model, test, eps, pgd_steps=10)
print(f"Lipschitz: sound bound {network_lipschitz_bound(model):.5f}, "
      f"empirical lower {lipschitz_lower_bound(model, test):.5f}")
for e in eps:
    print(f"eps {e:4}: certified {report.certified[e]:.2%}  PGD {report.pgd[e]:.2%}")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

grid = torch.linspace(0, 3, 100)
plt.plot(grid, [(report.radii > e).float().mean() for e in grid], label="certified")
plt.plot(eps, [report.pgd[e] for e in eps], "o", label="PGD")
plt.xlabel("L2 radius (pixels in [0, 1])")
plt.ylabel("accuracy")
plt.legend()
plt.savefig(args.plot, dpi=120)
print(f"plot: {args.plot}")
