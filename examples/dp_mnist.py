"""Differentially private MNIST in one screen: clipping-free DP-SGD on a 1-Lipschitz ConvNet.

    python examples/dp_mnist.py --data-root ../shared/datasets --epsilon 3 --epochs 15

No per-sample gradient and no clipping: every sample's gradient norm is bounded analytically from
the network's Lipschitz structure (lipnet.privacy.gradient_norm_bounds, recomputed each step from
the weights in use), batches are Poisson-sampled, the Gaussian noise is calibrated by opacus'
get_noise_multiplier and epsilon is tracked by its RDP accountant. The trained network is still
1-Lipschitz, so its predictions also come with certified L2 radii.
"""

import argparse

import torch

from lipnet.certify import certified_accuracy
from lipnet.data import BatchLoader, load_dataset
from lipnet.models import mnist_convnet
from lipnet.nn import LipschitzCrossEntropy
from lipnet.privacy import make_private
from lipnet.training import private_trainable

parser = argparse.ArgumentParser()
parser.add_argument("--data-root", default=None, help="default: $LIPNET_DATA")
parser.add_argument("--epsilon", type=float, default=3.0)
parser.add_argument("--delta", type=float, default=1e-5)
parser.add_argument("--epochs", type=int, default=15)
parser.add_argument("--batch-size", type=int, default=1024, help="expected (Poisson) batch size")
parser.add_argument("--limit", type=int, default=None, help="use a subset of each split")
args = parser.parse_args()
torch.manual_seed(0)

train = load_dataset("mnist", "train", args.data_root, limit=args.limit)
test = BatchLoader(load_dataset("mnist", "test", args.data_root, limit=args.limit), 500)
# No BatchCentering (it couples samples); the normalized input is projected onto the ball of radius 8.
model = mnist_convnet(width=8, hidden=128, centering="none", input_radius=8.0)
# The convolutions stay random orthogonal feature maps: their worst-case gradient bounds are far above
# their real gradients, so the budget goes to the dense layers (benchmarks/privacy.py --tune).
optimizer = torch.optim.SGD(private_trainable(model, "dense", freeze_bias=True), lr=0.2, momentum=0.9)
trainer = make_private(model, optimizer, BatchLoader(train, args.batch_size), args.epsilon, args.delta, args.epochs,
                       loss=LipschitzCrossEntropy(temperature=0.1, offset=0.0), input_bound=28.0, noise="per_layer")
print(trainer.describe())
for _ in range(args.epochs):
    r = trainer.train_epoch()
    acc = certified_accuracy(model, test, (0.5,))
    print(f"epoch {r.epoch}: epsilon spent {r.epsilon:.3f} (delta {r.delta:g}), {r.samples} samples at "
          f"{r.samples_per_s:.0f}/s, per-sample gradient bound C={r.sensitivity:.3g}, "
          f"test accuracy {acc.clean:.2%}, certified@0.5 {acc.certified[0.5]:.2%}")
print(f"privacy report: ({trainer.epsilon():.3f}, {args.delta:g})-DP w.r.t. adding/removing one training example, "
      f"{trainer.steps} Poisson steps at q={trainer.sample_rate:.4g}, noise multiplier {trainer.noise_multiplier:.4g}")
