"""Poisson subsampling, exactly as the accountant assumes.

Every step includes each training example independently with probability q (the sampled Gaussian
mechanism that opacus' RDP/PRV accountants analyse); batch sizes are Binomial(n, q), empty batches
included. lip-dp shuffles fixed-size batches while accounting for Poisson sampling, a gap in its
guarantee; here the batches are drawn by opacus' own ``UniformWithReplacementSampler`` (for lipnet's
in-memory datasets) or ``DPDataLoader`` (any map-style dataset).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from opacus.data_loader import DPDataLoader
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from lipnet.data import BatchLoader, ImageDataset


def check_sample_rate(sample_rate: float) -> float:
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    return float(sample_rate)


class FeatureDataset(torch.utils.data.Dataset):
    """Float inputs (N, ...) and int64 labels held in memory, e.g. the outputs of a frozen feature
    extractor (:func:`lipnet.privacy.precompute_frozen_prefix`); Poisson-sampled like an ``ImageDataset``."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        if not features.is_floating_point() or len(features) != len(labels):
            raise ValueError("FeatureDataset needs float features (N, ...) and N labels")
        self.features, self.labels = features, labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.features[i], int(self.labels[i])


class PoissonBatchLoader:
    """Poisson-sampled float batches of an in-memory ``ImageDataset`` (pixels in [0, 1]) or ``FeatureDataset``.

    ``len()`` = steps per epoch = int(1 / sample_rate) (opacus' convention, which its
    ``get_noise_multiplier(epochs=...)`` assumes); each step draws a fresh Bernoulli(q) mask over the
    whole dataset with ``generator``. Batches may be empty: (0, C, H, W) tensors.

    Multi-process: every rank passes a generator with the same seed, draws the same global mask and
    keeps the selected indices ``rank::world_size``; the ranks' parts make up one Poisson batch."""

    def __init__(self, dataset: ImageDataset | FeatureDataset, sample_rate: float, *, generator: torch.Generator | None = None,
                 device: str | torch.device = "cpu", steps: int | None = None, rank: int = 0,
                 world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.dataset, self.sample_rate, self.device = dataset, check_sample_rate(sample_rate), device
        self.rank, self.world_size = rank, world_size
        self.sampler = UniformWithReplacementSampler(num_samples=len(dataset), sample_rate=self.sample_rate,
                                                     generator=generator, steps=steps)

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * len(self.dataset)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for indices in self.sampler:
            idx = torch.as_tensor(indices, dtype=torch.long)[self.rank::self.world_size]
            if isinstance(self.dataset, FeatureDataset):
                x = self.dataset.features[idx].to(self.device, non_blocking=True)
            else:
                x = self.dataset.images[idx].to(self.device, non_blocking=True).float().div_(255)
            yield x, self.dataset.labels[idx].to(self.device, non_blocking=True)


def poisson_loader(data, sample_rate: float | None = None, *, generator: torch.Generator | None = None,
                   device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1):
    """A Poisson-sampling loader over ``data`` with the same expected batch size.

    ``data``: an ``ImageDataset`` or ``FeatureDataset`` (needs ``sample_rate``), a lipnet ``BatchLoader`` (q = batch_size / n)
    or a ``torch.utils.data.DataLoader`` over a map-style dataset (wrapped by opacus'
    ``DPDataLoader.from_data_loader``: q = 1 / len(loader); single process only). Returns
    (loader, sample_rate). ``rank``/``world_size``: this process's part of every Poisson batch."""
    if isinstance(data, (ImageDataset, FeatureDataset)):
        if sample_rate is None:
            raise ValueError(f"poisson_loader({type(data).__name__}) needs sample_rate (expected batch size / dataset size)")
        return PoissonBatchLoader(data, sample_rate, generator=generator, device=device, rank=rank,
                                  world_size=world_size), float(sample_rate)
    if isinstance(data, BatchLoader):
        q = sample_rate if sample_rate is not None else data.batch_size / len(data.dataset)
        return PoissonBatchLoader(data.dataset, q, generator=generator, device=device, rank=rank,
                                  world_size=world_size), float(q)
    if isinstance(data, torch.utils.data.DataLoader):
        if world_size > 1:
            raise ValueError("multi-process private training needs a lipnet ImageDataset / BatchLoader (every rank "
                             "draws the same global Poisson mask and keeps its share)")
        if sample_rate is not None:
            return DPDataLoader(data.dataset, sample_rate=sample_rate, collate_fn=data.collate_fn,
                                generator=generator), float(sample_rate)
        loader = DPDataLoader.from_data_loader(data, generator=generator)
        return loader, float(loader.sample_rate)
    raise TypeError(f"cannot Poisson-sample from {type(data).__name__}: pass an ImageDataset, a lipnet BatchLoader "
                    "or a torch DataLoader over a map-style dataset")


__all__ = ["FeatureDataset", "PoissonBatchLoader", "check_sample_rate", "poisson_loader"]
