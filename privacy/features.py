"""Frozen feature extractors computed once: private training of the trainable rest only.

When the leading layers of a model train nothing (a ``Scattering2d``, or convolutions frozen at
their random orthogonal initialization), every training example's features are a fixed function
of that example alone. Computing them once and running DP-SGD on the remaining layers is the same
mechanism as running it on the whole model -- the same per-sample gradients, the same noise -- at a
fraction of the cost (the scattering transform of MNIST is ~6 ms per image on CPU, the head's step
well under that for a whole batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from lipnet.progress import progress_bar

from lipnet.data import ImageDataset
from lipnet.distributed import world
from lipnet.modes import training_mode
from lipnet.nn import L2BallProjection

from .sampling import FeatureDataset
from .sensitivity import output_norm_bound


def split_frozen_prefix(model: nn.Sequential) -> tuple[nn.Sequential, nn.Sequential]:
    """(prefix, rest) of ``model``: the longest leading run of children with no trainable parameter,
    and the children after it (sharing the modules, not copies)."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"split_frozen_prefix needs an nn.Sequential, got {type(model).__name__}")
    children = list(model)
    k = 0
    while k < len(children) and not any(p.requires_grad for p in children[k].parameters()):
        k += 1
    return nn.Sequential(*children[:k]), nn.Sequential(*children[k:])


@dataclass
class FrozenFeatures:
    """``head``: the trainable rest of the model; ``dataset``: the features of every training example;
    ``bound``: every feature vector has L2 norm <= bound (the privacy analysis' forward bound)."""

    head: nn.Sequential
    dataset: FeatureDataset
    bound: float

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.dataset.features.shape[1:])


@torch.no_grad()
def precompute_frozen_prefix(model: nn.Sequential, data: ImageDataset, input_bound: float, *, batch_size: int = 1024,
                             device: str | torch.device = "cpu", progress: bool = True) -> FrozenFeatures:
    """Features ``prefix(project_X(x_i))`` of every example of ``data`` (X = ``input_bound``, the
    projection :class:`PrivateTrainer` applies) through the frozen prefix of ``model``.

    Guarantee: ``PrivateTrainer(features.head, ..., features.dataset, input_bound=features.bound)``
    is the same mechanism as ``PrivateTrainer(model, ..., data, input_bound=X)``: the prefix trains
    nothing and acts on each example alone, so it is a fixed per-example preprocessing, and ``bound``
    (Lip(layer) b + ||layer(0)|| layer by layer, as in :func:`gradient_norm_bounds`) bounds every
    feature's norm, so the trainer's projection onto that ball changes nothing. Prefix layers the
    privacy analysis refuses (e.g. ``BatchCentering``, which couples the samples) raise ``TypeError``.
    Under ``torch.distributed`` the prefix's tensors are first broadcast from rank 0, so every rank
    computes the same features.
    """
    prefix, head = split_frozen_prefix(model)
    if not len(head):
        raise ValueError("the model has no trainable parameters after its frozen prefix: nothing to train")
    shape = tuple(data.images.shape[1:])
    if world()[1] > 1:  # every rank must compute the same features (as PrivateTrainer syncs the whole model)
        for t in [*prefix.parameters(), *prefix.buffers()]:
            dist.broadcast(t.data, src=0)
    bound = output_norm_bound(prefix, input_bound, shape)
    project = L2BallProjection(input_bound)
    dtype = next(head.parameters()).dtype
    # Train mode, as PrivateTrainer.train_epoch runs the whole model; each layer's own mode is restored after
    # (the prefix is a new container over the model's layers, so its own flag says nothing about theirs).
    chunks = []
    with training_mode(prefix, True):
        for start in progress_bar(range(0, len(data), batch_size), desc="frozen features", enabled=progress, leave=False):
            x = data.images[start:start + batch_size].to(device, dtype=dtype).div_(255)
            chunks.append(prefix(project(x)))
    return FrozenFeatures(head, FeatureDataset(torch.cat(chunks), data.labels), float(bound))


__all__ = ["FrozenFeatures", "precompute_frozen_prefix", "split_frozen_prefix"]
