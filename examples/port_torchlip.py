"""deel-torchlip's MNIST tutorial network, rebuilt from lipnet names only, trained with the HKR
loss and certified. Their names -> ours (docs/migration.md):

    SpectralConv2d -> OrthoConv2d        GroupSort2 -> GroupSort(2)
    ScaledL2NormPool2d -> L2NormPool2d   SpectralLinear -> OrthoLinear
    HKRMulticlassLoss -> HKRLoss         vanilla_export -> lipnet.nn.export

    python examples/port_torchlip.py --data-root ../shared/datasets --epochs 2

Differences that matter: our layers are exactly orthogonal (not Björck-approximated), and the
network's Lipschitz bound is computed from the weights (not declared), so every radius printed
is a certificate.
"""

import argparse

import torch
from torch import nn

import lipnet.nn as ln
from lipnet.certify import certified_accuracy, lipschitz_lower_bound
from lipnet.data import BatchLoader, load_dataset

parser = argparse.ArgumentParser()
parser.add_argument("--data-root", default=None, help="default: $LIPNET_DATA")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--limit", type=int, default=None, help="train/test on a subset")
args = parser.parse_args()
torch.manual_seed(0)

model = nn.Sequential(
    ln.InputNormalization([0.1307]),
    ln.OrthoConv2d(1, 16, 3, padding_mode="zeros"), ln.GroupSort(2), ln.L2NormPool2d(2),
    ln.OrthoConv2d(16, 32, 3, padding_mode="zeros"), ln.GroupSort(2), ln.L2NormPool2d(2),
    ln.Flatten(), ln.OrthoLinear(32 * 7 * 7, 64), ln.GroupSort(2), ln.OrthoLinear(64, 10),
)
loss_fn = ln.HKRLoss(10, alpha=0.98, min_margin=0.5)     # their tutorial's trade-off: mostly hinge
train = load_dataset("mnist", "train", args.data_root, limit=args.limit)
test = load_dataset("mnist", "test", args.data_root, limit=args.limit)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for epoch in range(args.epochs):
    model.train()
    for x, y in BatchLoader(train, 128, shuffle=True, generator=torch.Generator().manual_seed(epoch)):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
    print(f"epoch {epoch + 1}: HKR loss {loss.item():.4f}")

report = certified_accuracy(model, BatchLoader(test, 500), [0.5, 1.0, 1.58], pgd_steps=10, pgd_points=200)
lower = lipschitz_lower_bound(model, test.images[:128].float() / 255)
print(f"clean {report.clean:.2%}; sound bound {report.lipschitz_bound:.6f}, empirical lower bound {lower:.4f}")
for eps, acc in report.certified.items():
    print(f"certified at eps={eps:g}: {acc:.2%}   (PGD-10, first {report.pgd_n}: {report.pgd[eps]:.2%})")
plain = ln.export(model)                                  # deel-torchlip's vanilla_export
x = test.images[:8].float() / 255
print("exported model agrees:", torch.allclose(plain(x), model.eval()(x), atol=1e-5))
