"""Datasets from a local data root (never downloaded): MNIST, Fashion-MNIST, CIFAR-10 (JPEG archive).

The root comes from ``--data-root`` / the ``data_root`` argument, else ``$LIPNET_DATA``. Images are
held as one uint8 tensor (N, C, H, W); ``BatchLoader`` slices it into float batches in [0, 1]
without per-item Python, which is what the training loop and certification use.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .validate import class_labels, open_unit, positive_int

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DIGITS = tuple(str(i) for i in range(10))
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
}


class DataError(Exception):
    """Base class of the dataset errors."""


class DataRootError(DataError, ValueError):
    """No data root was given."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A dataset file or folder is missing."""


class DatasetCorruptError(DataError, ValueError):
    """A dataset file exists but cannot be read as expected."""


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """``data_root`` if given, else ``$LIPNET_DATA``; an existing directory, or a clear error."""
    root = data_root if data_root is not None else os.environ.get("LIPNET_DATA")
    if not root:
        raise DataRootError("no data root: pass --data-root DIR (data_root=...) or set LIPNET_DATA=DIR "
                            "to the folder holding MNIST/, FashionMNIST/ and cifar10-jpg.tar.gz")
    path = Path(root).expanduser()
    if not path.is_dir():
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
        self.images, self.labels, self.info = images, class_labels(labels, info.num_classes, info.name), info

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


# ----------------------------------------------------------------------------------------- MNIST
_IDX_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _check_idx(path: Path, header: int, item_bytes: int) -> None:
    """The idx header's item count must match the file size (catches truncated copies)."""
    if not path.is_file():
        raise DatasetNotFoundError(f"missing dataset file {path}")
    with path.open("rb") as f:
        raw = f.read(header)
    count = int.from_bytes(raw[4:8], "big") if len(raw) == header else -1
    size = path.stat().st_size
    if count < 0 or size != header + count * item_bytes:
        raise DatasetCorruptError(f"corrupt dataset file {path}: size {size} bytes does not match its header "
                                  f"({count} items of {item_bytes} bytes)")


def _load_idx(name: str, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision

    cls, folder = {"mnist": (torchvision.datasets.MNIST, "MNIST"),
                   "fashion-mnist": (torchvision.datasets.FashionMNIST, "FashionMNIST")}[name]
    images, labels = (root / folder / "raw" / f for f in _IDX_FILES[train])
    _check_idx(images, 16, 28 * 28)
    _check_idx(labels, 8, 1)
    try:
        ds = cls(str(root), train=train, download=False)
    except Exception as err:  # torchvision's own checks / readers
        raise DatasetCorruptError(f"cannot read {folder} from {root / folder / 'raw'}: {err}") from err
    return ds.data[:, None].contiguous(), ds.targets.long()


# -------------------------------------------------------------------------------------- CIFAR-10
CIFAR_ARCHIVE = "cifar10-jpg.tar.gz"
CIFAR_ORDER_SEED = 0  # the fixed order load_dataset returns a CIFAR-10 split in


def _extract_once(archive: Path, cache: Path) -> Path:
    """Extract ``archive`` into ``cache/cifar10-jpg`` once (atomic rename; a marker file says done)."""
    target = cache / "cifar10-jpg"
    if (target / ".complete").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".cifar10-", dir=cache))
    try:
        with tarfile.open(archive) as tar:
            kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, **kw)
        (tmp / ".complete").touch()
        if (target / ".complete").is_file():  # another process finished first
            return target
        if target.exists():  # a tree without its marker: not ours to trust
            shutil.rmtree(target)
        os.replace(tmp, target)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DatasetCorruptError(f"cannot extract {archive}: {err}") from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _decode_split(folder: Path, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np
    import torchvision
    from PIL import Image

    if not folder.is_dir():
        raise DatasetCorruptError(f"the CIFAR-10 archive has no folder {folder}")
    try:
        ds = torchvision.datasets.ImageFolder(str(folder))
    except FileNotFoundError as err:  # no class folders, or an empty one
        raise DatasetCorruptError(f"{folder}: {err}") from err
    if tuple(ds.classes) != CIFAR10_CLASSES:
        raise DatasetCorruptError(f"{folder}: class folders {ds.classes} are not CIFAR-10's {list(CIFAR10_CLASSES)}")
    images = torch.empty(len(ds.samples), 3, 32, 32, dtype=torch.uint8)
    for i, (path, _) in enumerate(tqdm(ds.samples, desc=f"decoding {folder.name}", disable=not progress)):
        try:
            with Image.open(path) as im:
                arr = np.array(im.convert("RGB"))
        except Exception as err:
            raise DatasetCorruptError(f"cannot decode {path}: {err}") from err
        if arr.shape != (32, 32, 3):
            raise DatasetCorruptError(f"{path}: expected a 32x32 RGB image, got shape {arr.shape}")
        images[i] = torch.from_numpy(arr).permute(2, 0, 1)
    return images, torch.tensor(ds.targets, dtype=torch.int64)


_ARCHIVE_DIGESTS: dict[tuple[str, int, int], str] = {}


def _archive_digest(archive: Path) -> str:
    """SHA-256 of ``archive`` (memoized per path, size and mtime within the process): the key of
    its decode cache, so a cache is only ever used for the very archive it was decoded from."""
    stat = archive.stat()
    key = (str(archive.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _ARCHIVE_DIGESTS:
        digest = hashlib.sha256()
        with archive.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        _ARCHIVE_DIGESTS[key] = digest.hexdigest()
    return _ARCHIVE_DIGESTS[key]


def _read_decoded(decoded: Path, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A decode cache file's (images, labels), or None if it is missing or not a valid one (then
    it is decoded again; a cache is never trusted past these checks)."""
    if not decoded.is_file():
        return None
    try:
        images, labels = torch.load(decoded, weights_only=True)
    except Exception:  # truncated, corrupt, foreign: decode again
        return None
    if not (isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor) and images.dtype == torch.uint8
            and images.dim() == 4 and tuple(images.shape[1:]) == (3, 32, 32) and labels.dim() == 1
            and len(labels) == len(images) and not labels.is_floating_point()):
        return None
    return images, labels.long()


def _load_cifar(root: Path, train: bool, cache: Path, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    split = "train" if train else "test"
    archive = root / CIFAR_ARCHIVE
    if not archive.is_file():
        raise DatasetNotFoundError(f"missing CIFAR-10 archive {archive}")
    keyed = cache / f"cifar10-jpg-{_archive_digest(archive)[:16]}"
    decoded = keyed / f"{split}.pt"
    cached = _read_decoded(decoded)
    if cached is not None:
        return cached
    folder = _extract_once(archive, keyed) / "CIFAR10_jpg" / split
    images, labels = _decode_split(folder, progress)
    tmp = decoded.with_name(f".{split}.{os.getpid()}.tmp")
    torch.save((images, labels), tmp)
    os.replace(tmp, decoded)
    return images, labels


# -------------------------------------------------------------------------------------- public
def load_dataset(name: str, split: str = "train", data_root: str | os.PathLike | None = None, *,
                 limit: int | None = None, cache_dir: str | os.PathLike | None = None,
                 progress: bool = True) -> ImageDataset:
    """The ``split`` ("train" / "test") of dataset ``name`` ("mnist", "fashion-mnist", "cifar10").

    ``limit``: a fixed subset of that many examples (a seed-0 permutation, so classes are mixed;
    the same subset on every call). Never downloads; missing / corrupt files raise
    ``DatasetNotFoundError`` / ``DatasetCorruptError`` naming the expected path.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None:
        positive_int(limit, "limit")
    root = resolve_data_root(data_root)
    if name == "cifar10":
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        images, labels = _load_cifar(root, split == "train", cache, progress)
        # the archive is sorted by class: a fixed shuffle makes every first-N subset (PGD points,
        # conformal attacks, smoke runs) a sample of all classes
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(CIFAR_ORDER_SEED))
        images, labels = images[order], labels[order]
    else:
        images, labels = _load_idx(name, root, split == "train")
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
