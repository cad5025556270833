"""orthogonium's CIFAR-10 demo network (AOC stages, MaxMin, BatchCentering, an orthogonal head),
rebuilt from lipnet names only, trained briefly with orthogonium's loss and certified. Their
names -> ours (docs/migration.md):

    AdaptiveOrthoConv2d -> OrthoConv2d    BatchCentering2D -> BatchCentering
    MaxMin -> MaxMin                      OrthoLinear -> OrthoLinear
    LossXent -> LipschitzCrossEntropy     VRA -> lipnet.certify.certified_accuracy

    python examples/port_orthogonium.py --data-root ../shared/datasets --epochs 1

lipnet builds the same AOC convolutions (through orthogonium) with its own orthogonalization core
inside and certifies them with a bound computed from the kernel. Our CIFAR-10 copy is a lossy JPEG
re-encoding (../shared/datasets/README.md).
"""

import argparse

import torch
from torch import nn

import lipnet.nn as ln
from lipnet.certify import certified_accuracy
from lipnet.data import BatchLoader, load_dataset
from lipnet.training import augment_batch

parser = argparse.ArgumentParser()
parser.add_argument("--data-root", default=None, help="default: $LIPNET_DATA")
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--limit", type=int, default=None, help="train/test on a subset")
parser.add_argument("--width", type=int, default=16)
args = parser.parse_args()
torch.manual_seed(0)


def stage(cin, cout, blocks):  # AOC convs at one resolution, then a 2x2 stride-2 AOC downsampling
    layers = []
    for i in range(blocks):
        layers += [ln.OrthoConv2d(cin if i == 0 else cout, cout, 3), ln.BatchCentering(cout), ln.MaxMin()]
    return layers + [ln.OrthoConv2d(cout, 2 * cout, 2, stride=2, padding=0), ln.BatchCentering(2 * cout), ln.MaxMin()]


w = args.width
model = nn.Sequential(
    ln.InputNormalization([0.4914, 0.4822, 0.4465]),
    *stage(3, w, 2), *stage(2 * w, 2 * w, 2), *stage(4 * w, 4 * w, 1),      # 32 -> 16 -> 8 -> 4
    ln.Flatten(), ln.OrthoLinear(8 * w * 4 * 4, 10),
)
loss_fn = ln.LipschitzCrossEntropy(temperature=0.25, offset=2.12132)   # orthogonium's LossXent defaults
train = load_dataset("cifar10", "train", args.data_root, limit=args.limit)
test = load_dataset("cifar10", "test", args.data_root, limit=args.limit)
optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
g = torch.Generator().manual_seed(0)
for epoch in range(args.epochs):
    model.train()
    for x, y in BatchLoader(train, 128, shuffle=True, generator=torch.Generator().manual_seed(epoch)):
        optimizer.zero_grad()
        loss = loss_fn(model(augment_batch(x, g)), y)
        loss.backward()
        optimizer.step()
    print(f"epoch {epoch + 1}: loss {loss.item():.4f}")

report = certified_accuracy(model, BatchLoader(test, 500), [36 / 255, 72 / 255, 108 / 255])
print(f"clean {report.clean:.2%}; sound Lipschitz bound {report.lipschitz_bound:.6f}")
for eps, acc in report.certified.items():
    print(f"certified (VRA) at eps={eps * 255:.0f}/255: {acc:.2%}")
