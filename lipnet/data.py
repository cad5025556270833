"""Datasets from a data root: MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100.

The root is ``--data-root`` / the ``data_root`` argument, else ``$LIPNET_DATA``, else
``~/.cache/lipnet/data``. Each dataset is read from the layouts torchvision writes
(``MNIST/raw`` with plain or gzipped idx files, ``cifar-10-batches-py``, ``cifar-100-python``) or,
for CIFAR-10, the JPEG archive ``cifar10-jpg.tar.gz`` (``lipnet.formats``). Nothing is downloaded
unless asked (``download=True`` / ``--download``: ``lipnet.download``). Images are held as one
uint8 tensor (N, C, H, W); ``BatchLoader`` slices it into float batches in [0, 1] without
per-item Python, which is what the training loop and certification use.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .formats import (CIFAR_ARCHIVE, DataError, DatasetCorruptError, DatasetNotFoundError, idx_path,
                      read_cifar_batches, read_idx_split, read_jpeg_archive)
from .validate import class_labels, open_unit, positive_int

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DIGITS = tuple(str(i) for i in range(10))
# CIFAR-100's fine labels, in their index order (alphabetical)
CIFAR100_CLASSES = ("apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle",
    "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
    "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon",
    "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail",
    "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    channels: int
    size: int
    mean: tuple[float, ...]  # per-channel mean of the train split, pixels in [0, 1]
    std: tuple[float, ...]
    classes: tuple[str, ...]


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), DIGITS),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), FASHION_CLASSES),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), CIFAR10_CLASSES),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                            CIFAR100_CLASSES),
}


class DataRootError(DataError, ValueError):
    """A data root that cannot be used."""


def default_data_root() -> Path:
    """Where datasets live when neither ``--data-root`` nor ``$LIPNET_DATA`` names a folder:
    ``$LIPNET_CACHE/data``, by default ``~/.cache/lipnet/data`` (``--download`` fills it)."""
    return default_cache_dir() / "data"


def resolve_data_root(data_root: str | os.PathLike | None = None, *, create: bool = False) -> Path:
    """``data_root`` if given, else ``$LIPNET_DATA``, else :func:`default_data_root`. A root that
    was named must be an existing directory (``create``: it is made, for a download)."""
    named = data_root if data_root is not None else os.environ.get("LIPNET_DATA")
    path = Path(named).expanduser() if named else default_data_root()
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataRootError(f"cannot create the data root {path}: {err.strerror or err}") from err
    elif named and not path.is_dir():
        raise DatasetNotFoundError(f"data root {path} does not exist or is not a directory")
    return path


def default_cache_dir() -> Path:
    """``$LIPNET_CACHE``, else ``~/.cache/lipnet`` (CIFAR-10 is extracted and decoded there once)."""
    return Path(os.environ.get("LIPNET_CACHE") or Path.home() / ".cache" / "lipnet")


class ImageDataset(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) and int64 labels; items are float32 (C, H, W) in [0, 1] and an int."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError("ImageDataset needs uint8 (N, C, H, W) images and N labels")
        if info is not None:  # labels the dataset has no class for: refused here, not scored as silent misses
            labels = class_labels(labels, info.num_classes, info.name)
        self.images, self.labels, self.info = images, labels.long(), info

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].float().div_(255), int(self.labels[i])

    def subset(self, index: torch.Tensor) -> ImageDataset:
        return ImageDataset(self.images[index], self.labels[index], self.info)


def holdout_split(dataset: ImageDataset, holdout: int) -> tuple[ImageDataset, ImageDataset]:
    """(training part, held-out part): the held-out part is the last ``holdout`` examples of a
    seed-0 permutation of ``dataset``, the training part the rest (disjoint, the same on every call)."""
    positive_int(holdout, "holdout")
    if holdout >= len(dataset):
        raise ValueError(f"holdout={holdout} leaves no training examples out of {len(dataset)}")
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    return dataset.subset(perm[:-holdout]), dataset.subset(perm[-holdout:])


def random_split(dataset: ImageDataset, fraction: float, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Split into two disjoint random parts, the first holding round(fraction * n) examples
    (e.g. conformal calibration / test). Deterministic for a given ``seed``."""
    open_unit(fraction, "fraction")
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    k = round(fraction * len(dataset))
    if k == 0 or k == len(dataset):
        raise ValueError(f"cannot split {len(dataset)} examples with fraction {fraction}: one part would be empty")
    return dataset.subset(perm[:k]), dataset.subset(perm[k:])


# ------------------------------------------------------------------------------------- layouts
_IDX_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_CIFAR_BATCHES = {"cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
                  "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels")}
_IDX_FOLDERS = {"mnist": "MNIST/raw", "fashion-mnist": "FashionMNIST/raw"}
CIFAR_ORDER_SEED = 0  # the fixed order load_dataset returns a split of the class-sorted JPEG archive in


def layouts(name: str, root: Path) -> list[Path]:
    """The places under ``root`` where dataset ``name`` is looked for, in order: torchvision's
    folders (``MNIST/raw``, ``FashionMNIST/raw``, ``cifar-10-batches-py``, ``cifar-100-python``),
    then for CIFAR-10 the JPEG archive."""
    if name in _IDX_FOLDERS:
        return [root / _IDX_FOLDERS[name]]
    found = [root / _CIFAR_BATCHES[name][0]]
    return found + ([root / CIFAR_ARCHIVE] if name == "cifar10" else [])


def _present(place: Path) -> bool:
    if place.name == CIFAR_ARCHIVE:
        return place.is_file()
    if place.name == "raw":  # an idx folder counts once any of its files is there
        return any(idx_path(place, f) is not None for pair in _IDX_FILES.values() for f in pair)
    return place.is_dir()


def find_layout(name: str, root: Path) -> Path | None:
    """The first of :func:`layouts` present under ``root``, or None."""
    return next((p for p in layouts(name, root) if _present(p)), None)


def _read(name: str, place: Path, train: bool, cache: Path, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if name in _IDX_FOLDERS:
        return read_idx_split(place, *_IDX_FILES[train])
    if place.name == CIFAR_ARCHIVE:
        images, labels = read_jpeg_archive(place, "train" if train else "test", CIFAR10_CLASSES, cache, progress)
        # the archive is sorted by class: a fixed shuffle makes every first-N subset (PGD points,
        # conformal attacks, smoke runs) a sample of all classes
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(CIFAR_ORDER_SEED))
        return images[order], labels[order]
    _, train_files, test_files, label_key = _CIFAR_BATCHES[name]
    return read_cifar_batches(place, train_files if train else test_files, label_key)


def _not_found(name: str, root: Path) -> DatasetNotFoundError:
    where = ", ".join(str(p) for p in layouts(name, root))
    named = "" if root != default_data_root() else " (the default data root: --data-root or LIPNET_DATA name another)"
    return DatasetNotFoundError(
        f"no {name} data under {root}{named}: looked for {where}. Pass --download (load_dataset(..., "
        f"download=True)) to fetch it from torchvision's sources into {root}, or point --data-root / LIPNET_DATA "
        "at a folder that holds it")


# -------------------------------------------------------------------------------------- public
def load_dataset(name: str, split: str = "train", data_root: str | os.PathLike | None = None, *,
                 limit: int | None = None, cache_dir: str | os.PathLike | None = None,
                 progress: bool = True, download: bool = False, mirror: str | None = None) -> ImageDataset:
    """The ``split`` ("train" / "test") of dataset ``name`` (``DATASETS``: mnist, fashion-mnist,
    cifar10, cifar100) from the data root (:func:`resolve_data_root`), in the first layout of
    :func:`layouts` present there.

    ``limit``: a fixed subset of that many examples (a seed-0 permutation, so classes are mixed;
    the same subset on every call). Nothing is downloaded unless ``download`` (then a dataset
    absent from the root is fetched into it, :func:`lipnet.download.download`, ``mirror``: its
    base URL). A dataset that is absent raises ``DatasetNotFoundError`` listing where it was
    looked for; a damaged file ``DatasetCorruptError`` naming it.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None:
        positive_int(limit, "limit")
    root = resolve_data_root(data_root, create=download)
    place = find_layout(name, root)
    if place is None and download:
        from .download import download as fetch

        fetch(name, root, mirror=mirror, progress=progress)
        place = find_layout(name, root)
    if place is None:
        raise _not_found(name, root)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    images, labels = _read(name, place, split == "train", cache, progress)
    if limit is not None and limit < len(labels):
        keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:limit]
        images, labels = images[keep], labels[keep]
    return ImageDataset(images, labels, DATASETS[name])


def batches(dataset: ImageDataset, batch_size: int, *, shuffle: bool = False,
            generator: torch.Generator | None = None, drop_last: bool = False,
            device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Float32 image batches in [0, 1] and labels, by slicing the whole tensors (one epoch)."""
    positive_int(batch_size, "batch_size")
    n = len(dataset)
    order = torch.randperm(n, generator=generator) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size] if shuffle else slice(start, start + batch_size)
        x = dataset.images[idx].to(device, non_blocking=True).float().div_(255)
        yield x, dataset.labels[idx].to(device, non_blocking=True)


class BatchLoader:
    """Iterable over :func:`batches` with ``len()`` (number of batches); reshuffles every epoch."""

    def __init__(self, dataset: ImageDataset, batch_size: int, *, shuffle: bool = False,
                 generator: torch.Generator | None = None, drop_last: bool = False,
                 device: str | torch.device = "cpu") -> None:
        positive_int(batch_size, "batch_size")
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.generator, self.drop_last, self.device = generator, drop_last, device

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return batches(self.dataset, self.batch_size, shuffle=self.shuffle, generator=self.generator,
                       drop_last=self.drop_last, device=self.device)
