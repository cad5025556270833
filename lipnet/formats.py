"""Readers of the on-disk dataset formats, each returning uint8 images (N, C, H, W) and int64
labels, each failing with an error that names the file.

* idx (MNIST, Fashion-MNIST as torchvision's ``MNIST/raw`` / ``FashionMNIST/raw`` hold them):
  ``*-ubyte`` files, plain or gzip-compressed (``*-ubyte.gz``);
* the CIFAR python pickles (``cifar-10-batches-py/``, ``cifar-100-python/``, as torchvision's
  ``CIFAR10`` / ``CIFAR100`` write them), read by an unpickler that only rebuilds numpy arrays,
  lists, dicts and strings: a planted pickle cannot run code;
* the CIFAR-10 JPEG archive (``cifar10-jpg.tar.gz``: ``CIFAR10_jpg/{train,test}/<class>/*.jpg``),
  extracted and decoded once into a cache keyed by the archive's SHA-256.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import shutil
import tarfile
import tempfile
from pathlib import Path

import torch
from .progress import progress_bar


class DataError(Exception):
    """Base class of the dataset errors."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A dataset file or folder is missing."""


class DatasetCorruptError(DataError, ValueError):
    """A dataset file exists but cannot be read as expected."""


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest (``hashlib`` ``algorithm``: "sha256", "md5") of the file at ``path``, read in chunks."""
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extract_tar(archive: Path, into: Path) -> None:
    """Unpack the tar archive ``archive`` into the folder ``into`` with tarfile's "data" filter
    (no absolute paths, no links out of ``into``, no device files) where Python has it."""
    with tarfile.open(archive) as tar:
        tar.extractall(into, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


# ------------------------------------------------------------------------------------------- idx
_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # uint8 data, 3 dims (images) or 1 dim (labels)


def idx_path(folder: Path, name: str) -> Path | None:
    """``folder/name`` or ``folder/name.gz``, whichever exists (the plain file first), else None."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path, dims: int) -> torch.Tensor:
    """The uint8 array of an idx file with ``dims`` dimensions (3: images, 1: labels), plain or
    gzip; DatasetCorruptError naming ``path`` for a wrong magic number, a size that does not match
    the header (a truncated copy) or a damaged gzip stream."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DatasetCorruptError(f"corrupt dataset file {path}: {err}") from err
    header = 4 + 4 * dims
    if len(raw) < header or int.from_bytes(raw[:4], "big") != _IDX_MAGIC[dims]:
        raise DatasetCorruptError(f"corrupt dataset file {path}: not an idx file of {dims}-D uint8 data")
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    count = math.prod(shape)
    if len(raw) != header + count:
        raise DatasetCorruptError(f"corrupt dataset file {path}: {len(raw)} bytes do not match its header "
                                  f"(shape {shape}: {header + count} bytes)")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def read_idx_split(folder: Path, images: str, labels: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, H, W), labels (N,)) from the idx files ``images`` / ``labels`` in ``folder``."""
    paths = [idx_path(folder, name) for name in (images, labels)]
    for name, path in zip((images, labels), paths):
        if path is None:
            raise DatasetNotFoundError(f"missing dataset file {folder / name} (or {name}.gz)")
    x, y = read_idx(paths[0], 3), read_idx(paths[1], 1)
    if len(x) != len(y):
        raise DatasetCorruptError(f"{paths[0]} holds {len(x)} images but {paths[1]} {len(y)} labels")
    return x[:, None].contiguous(), y.long()


# ------------------------------------------------------------------------------- CIFAR pickles
# What the CIFAR batches' pickles need (numpy arrays and their dtypes); nothing else is rebuilt.
_PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                   ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to rebuild {module}.{name}")
        return super().find_class(module, name)


def _load_batch(path: Path) -> dict:
    if not path.is_file():
        raise DatasetNotFoundError(f"missing dataset file {path}")
    try:
        with path.open("rb") as f:
            batch = _ArraysOnlyUnpickler(io.BufferedReader(f), encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise DatasetCorruptError(f"cannot read {path}: {err} (a CIFAR batch holds numpy arrays and lists only; "
                                  "nothing of it was executed)") from err
    except Exception as err:  # truncated, not a pickle at all
        raise DatasetCorruptError(f"cannot read {path}: corrupt or truncated ({type(err).__name__}: {err})") from err
    if not isinstance(batch, dict):
        raise DatasetCorruptError(f"{path} is not a CIFAR batch (a pickled dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}


def read_cifar_batches(folder: Path, files: list[str], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 3, 32, 32), labels) of the CIFAR python batches ``files`` in ``folder``
    (``label_key``: "labels" for CIFAR-10, "fine_labels" for CIFAR-100)."""
    import numpy as np

    xs, ys = [], []
    for name in files:
        path = folder / name
        batch = _load_batch(path)
        data, labels = batch.get("data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DatasetCorruptError(f"{path}: 'data' is not a (N, 3072) uint8 array")
        if labels is None or len(labels) != len(data):
            raise DatasetCorruptError(f"{path}: '{label_key}' missing or not one per image")
        xs.append(torch.from_numpy(data.copy()).reshape(-1, 3, 32, 32))
        try:
            ys.append(torch.as_tensor(np.asarray(labels, dtype=np.int64)))
        except (TypeError, ValueError) as err:
            raise DatasetCorruptError(f"{path}: '{label_key}' are not integers") from err
    return torch.cat(xs), torch.cat(ys)


# ------------------------------------------------------------------------- CIFAR-10 JPEG archive
CIFAR_ARCHIVE = "cifar10-jpg.tar.gz"
_ARCHIVE_DIGESTS: dict[tuple[str, int, int], str] = {}


def archive_digest(archive: Path) -> str:
    """SHA-256 of ``archive`` (memoized per path, size and mtime within the process): the key of
    its decode cache, so a cache is only ever used for the very archive it was decoded from."""
    stat = archive.stat()
    key = (str(archive.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _ARCHIVE_DIGESTS:
        _ARCHIVE_DIGESTS[key] = file_digest(archive, "sha256")
    return _ARCHIVE_DIGESTS[key]


def _extract_once(archive: Path, cache: Path) -> Path:
    """Extract ``archive`` into ``cache/cifar10-jpg`` once (atomic rename; a marker file says done)."""
    target = cache / "cifar10-jpg"
    if (target / ".complete").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".cifar10-", dir=cache))
    try:
        extract_tar(archive, tmp)
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


def _decode_split(folder: Path, classes: tuple[str, ...], progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np
    import torchvision
    from PIL import Image

    if not folder.is_dir():
        raise DatasetCorruptError(f"the CIFAR-10 archive has no folder {folder}")
    try:
        ds = torchvision.datasets.ImageFolder(str(folder))
    except FileNotFoundError as err:  # no class folders, or an empty one
        raise DatasetCorruptError(f"{folder}: {err}") from err
    if tuple(ds.classes) != classes:
        raise DatasetCorruptError(f"{folder}: class folders {ds.classes} are not CIFAR-10's {list(classes)}")
    images = torch.empty(len(ds.samples), 3, 32, 32, dtype=torch.uint8)
    for i, (path, _) in enumerate(progress_bar(ds.samples, desc=f"decoding {folder.name}", enabled=progress)):
        try:
            with Image.open(path) as im:
                arr = np.array(im.convert("RGB"))
        except Exception as err:
            raise DatasetCorruptError(f"cannot decode {path}: {err}") from err
        if arr.shape != (32, 32, 3):
            raise DatasetCorruptError(f"{path}: expected a 32x32 RGB image, got shape {arr.shape}")
        images[i] = torch.from_numpy(arr).permute(2, 0, 1)
    return images, torch.tensor(ds.targets, dtype=torch.int64)


def _read_decoded(decoded: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
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


def read_jpeg_archive(archive: Path, split: str, classes: tuple[str, ...], cache: Path,
                      progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of ``split`` in the CIFAR-10 JPEG archive, decoded once into
    ``cache/cifar10-jpg-<sha256[:16]>/<split>.pt``; a corrupt cache file is decoded again."""
    keyed = cache / f"cifar10-jpg-{archive_digest(archive)[:16]}"
    decoded = keyed / f"{split}.pt"
    cached = _read_decoded(decoded)
    if cached is not None:
        return cached
    folder = _extract_once(archive, keyed) / "CIFAR10_jpg" / split
    images, labels = _decode_split(folder, classes, progress)
    tmp = decoded.with_name(f".{split}.{os.getpid()}.tmp")
    torch.save((images, labels), tmp)
    os.replace(tmp, decoded)
    return images, labels


__all__ = ["CIFAR_ARCHIVE", "DataError", "DatasetCorruptError", "DatasetNotFoundError", "archive_digest",
           "extract_tar", "file_digest", "idx_path", "read_cifar_batches", "read_idx", "read_idx_split", "read_jpeg_archive"]
