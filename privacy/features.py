"""Frozen feature extractors computed once: private training of the trainable rest only.

When the leading layers of a model train nothing (a ``Scattering2d``, or convolutions frozen at
their random orthogonal initialization), every training example's features are a fixed function
of that example alone. Computing them once and running DP-SGD on the remaining layers is the same
mechanism as running it on the whole model -- the same per-sample gradients, the same noise -- at a
fraction of the cost (the scattering transform of MNIST is ~6 ms per image on CPU, the head's step
well under that for a whole batch).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

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


FEATURE_CACHE_FORMAT = "lipnet.frozen-features"


def feature_cache_key(prefix: nn.Sequential, data: ImageDataset, input_bound: float, dtype: torch.dtype,
                      train: bool = True) -> str:
    """A digest of everything the features depend on: the prefix's structure (its repr) and tensors
    (parameters and buffers, e.g. the scattering filters), the input bound, the dtype, and every image
    and label. Any change gives another key, so a cached file is never used for other features."""
    h = hashlib.sha256()
    h.update(repr(prefix).encode())
    for name, t in [*prefix.named_parameters(), *prefix.named_buffers()]:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(f"{float(input_bound)!r}|{dtype}|{train}|{tuple(data.images.shape)}".encode())
    h.update(data.images.contiguous().numpy().tobytes())
    h.update(data.labels.contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def _load_cached(path: Path, data: ImageDataset, dtype: torch.dtype) -> torch.Tensor | None:
    """The features stored in ``path`` if it is a complete cache file for ``data``, else None. Loaded
    with ``weights_only=True``: tensors and plain values only, nothing in the file can run code."""
    try:
        saved = torch.load(path, weights_only=True)
    except Exception:  # truncated or foreign: recompute (and replace it)
        return None
    ok = (isinstance(saved, dict) and saved.get("format") == FEATURE_CACHE_FORMAT
          and isinstance(saved.get("features"), torch.Tensor) and saved["features"].dtype == dtype
          and len(saved["features"]) == len(data) and torch.equal(saved.get("labels"), data.labels))
    return saved["features"] if ok else None


def _save_cached(path: Path, features: torch.Tensor, labels: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FEATURE_CACHE_FORMAT, "features": features, "labels": labels}, f)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@torch.no_grad()
def prefix_features(prefix: nn.Sequential, data: ImageDataset, input_bound: float | None, *, dtype: torch.dtype,
                    batch_size: int = 256, device: str | torch.device = "cpu", progress: bool = True,
                    cache_dir: str | Path | None = None, train: bool = True) -> torch.Tensor:
    """``prefix(project(x_i))`` for every image of ``data`` in ``dtype`` (``input_bound=None``: no
    projection), the prefix in train mode or not (``train``), read from ``cache_dir`` when a file
    with the same key is there (:func:`feature_cache_key`), else computed and stored there. A local
    computation: no collective, so one rank may call it alone."""
    key = feature_cache_key(prefix, data, -1.0 if input_bound is None else input_bound, dtype, train)
    path = None if cache_dir is None else Path(cache_dir) / f"frozen-{key}.pt"
    cached = _load_cached(path, data, dtype) if path is not None and path.is_file() else None
    if cached is not None:
        return cached.to(device)
    project = nn.Identity() if input_bound is None else L2BallProjection(input_bound)
    chunks = []
    # Each layer's own mode is restored after (the prefix is a new container over the model's layers, so
    # its own flag says nothing about theirs).
    with training_mode(prefix, train):
        for start in progress_bar(range(0, len(data), batch_size), desc="frozen features", enabled=progress):
            x = data.images[start:start + batch_size].to(device, dtype=dtype).div_(255)
            chunks.append(prefix(project(x)))
    features = torch.cat(chunks)
    if path is not None:
        _save_cached(path, features.cpu(), data.labels)
    return features


@torch.no_grad()
def precompute_frozen_prefix(model: nn.Sequential, data: ImageDataset, input_bound: float, *, batch_size: int = 256,
                             device: str | torch.device = "cpu", progress: bool = True,
                             cache_dir: str | Path | None = None, train: bool = True) -> FrozenFeatures:
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

    ``cache_dir``: the features are stored there (``frozen-<key>.pt``, :func:`feature_cache_key`) and
    read back by later calls with the same prefix, bound, dtype and data instead of being recomputed.
    The bound is always recomputed from the prefix, never read from the file. ``train``: the mode the
    prefix runs in (train, as :class:`PrivateTrainer` runs the model; False for test features, as
    certification runs it).
    """
    prefix, head = split_frozen_prefix(model)
    if not len(head):
        raise ValueError("the model has no trainable parameters after its frozen prefix: nothing to train")
    shape = tuple(data.images.shape[1:])
    if world()[1] > 1:  # every rank must compute the same features (as PrivateTrainer syncs the whole model)
        for t in [*prefix.parameters(), *prefix.buffers()]:
            dist.broadcast(t.data, src=0)
    bound = output_norm_bound(prefix, input_bound, shape)
    features = prefix_features(prefix, data, input_bound, dtype=next(head.parameters()).dtype, batch_size=batch_size,
                               device=device, progress=progress, cache_dir=cache_dir, train=train)
    return FrozenFeatures(head, FeatureDataset(features, data.labels), float(bound))


__all__ = ["FrozenFeatures", "feature_cache_key", "precompute_frozen_prefix", "prefix_features", "split_frozen_prefix"]
