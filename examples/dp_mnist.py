"""Differentially private MNIST in one screen: clipping-free DP-SGD on fixed scattering features.

    python examples/dp_mnist.py --data-root ../shared/datasets --epsilon 3 --epochs 20

No per-sample gradient and no clipping: every sample's gradient norm is bounded analytically from
the network's Lipschitz structure (lipnet.privacy.gradient_norm_bounds, recomputed each step from
the weights in use), batches are Poisson-sampled, the Gaussian noise is calibrated by opacus'
get_noise_multiplier and epsilon is tracked by its RDP accountant. The features are a wavelet
scattering transform (lipnet.nn.Scattering2d: no trainable parameter, Lipschitz bound <= 1), so they
are computed once per image and the whole privacy budget goes to the linear head. Predictions come
with certified L2 radii (the network's Lipschitz bound includes the head's spectral norm).
"""

import argparse

import torch

from lipnet.certify import certified_accuracy
from lipnet.data import BatchLoader, load_dataset
from lipnet.models import scatter_net
from lipnet.nn import LipschitzCrossEntropy
from lipnet.privacy import make_private, precompute_frozen_prefix
from lipnet.privacy import private_trainable

parser = argparse.ArgumentParser()
parser.add_argument("--data-root", default=None, help="default: $LIPNET_DATA")
parser.add_argument("--epsilon", type=float, default=3.0)
parser.add_argument("--delta", type=float, default=1e-5)
parser.add_argument("--epochs", type=int, default=20)
parser.add_argument("--batch-size", type=int, default=4096, help="expected (Poisson) batch size")
parser.add_argument("--limit", type=int, default=None, help="use a subset of each split")
args = parser.parse_args()
torch.manual_seed(0)

train = load_dataset("mnist", "train", args.data_root, limit=args.limit)
test = BatchLoader(load_dataset("mnist", "test", args.data_root, limit=args.limit), 500)
# mean subtraction -> projection onto the L2 ball of radius 8 -> Scattering2d (81 x 7 x 7) -> linear head
model = scatter_net(mean=(0.1307,), input_radius=8.0)
optimizer = torch.optim.SGD(private_trainable(model, "all", freeze_bias=True), lr=0.5, momentum=0.9)
# The scattering trains nothing: its features are a fixed per-image function, computed once (same mechanism).
frozen = precompute_frozen_prefix(model, train, input_bound=28.0)
trainer = make_private(frozen.head, optimizer, frozen.dataset, args.epsilon, args.delta, args.epochs,
                       loss=LipschitzCrossEntropy(temperature=1.0, offset=0.0), input_bound=frozen.bound,
                       sample_rate=args.batch_size / len(train), noise="per_layer")
print(trainer.describe())
for _ in range(args.epochs):
    r = trainer.train_epoch()
    acc = certified_accuracy(model, test, (0.1,))
    print(f"epoch {r.epoch}: epsilon spent {r.epsilon:.3f} (delta {r.delta:g}), {r.samples} samples at "
          f"{r.samples_per_s:.0f}/s, per-sample gradient bound C={r.sensitivity:.3g}, "
          f"test accuracy {acc.clean:.2%}, certified@0.1 {acc.certified[0.1]:.2%}")
print(f"privacy report: ({trainer.epsilon():.3f}, {args.delta:g})-DP w.r.t. adding/removing one training example, "
      f"{trainer.steps} Poisson steps at q={trainer.sample_rate:.4g}, noise multiplier {trainer.noise_multiplier:.4g}")
