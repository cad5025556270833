"""``download(name, root)``: a dataset fetched from torchvision's sources, checked against
torchvision's MD5 checksums, into the standard layout the readers of ``lipnet.data`` know.

Only on request (``--download`` / ``download=True``): lipnet never downloads otherwise. Every file
is written to a temporary name beside its target, checked, then renamed: a failed or
mismatching download leaves nothing behind. ``mirror`` (or ``$LIPNET_DATA_MIRROR``) is a base URL
that replaces torchvision's for every file (``<mirror>/<file name>``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .progress import progress_bar

from .formats import DataError, extract_tar, file_digest

MIRROR_VAR = "LIPNET_DATA_MIRROR"


class DownloadError(DataError, ValueError):
    """A download that failed: unreachable, interrupted, or not the file its checksum names."""


@dataclass(frozen=True)
class Source:
    """Where a dataset's files come from and where they go under the data root."""

    files: tuple[tuple[str, str], ...]  # (file name, MD5)
    mirrors: tuple[str, ...]           # base URLs, tried in order
    folder: str                        # target folder under the root ("MNIST/raw"; "" for the root)
    extract: bool = False              # a .tar.gz to unpack into the root


def source(name: str) -> Source:
    """torchvision's source of dataset ``name`` (its URLs and MD5 checksums)."""
    import torchvision.datasets as tv

    if name in ("mnist", "fashion-mnist"):
        cls, folder = (tv.MNIST, "MNIST") if name == "mnist" else (tv.FashionMNIST, "FashionMNIST")
        return Source(tuple((f, md5) for f, md5 in cls.resources), tuple(cls.mirrors), f"{folder}/raw")
    if name in ("cifar10", "cifar100"):
        cls = tv.CIFAR10 if name == "cifar10" else tv.CIFAR100
        base = cls.url.rsplit("/", 1)[0] + "/"
        return Source(((cls.filename, cls.tgz_md5),), (base,), "", extract=True)
    raise ValueError(f"no download source for dataset {name!r}")


def _fetch(url: str, target: Path, md5: str, progress: bool) -> None:
    """``url`` into ``target`` if its MD5 is ``md5``; DownloadError otherwise, nothing left behind."""
    part = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, part.open("xb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress_bar(total=total, unit="B", unit_scale=True, desc=f"downloading {target.name}",
                              enabled=progress, leave=False) as bar:
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
        got = file_digest(part, "md5")
        if got != md5:
            raise DownloadError(f"{url}: checksum mismatch (MD5 {got}, expected {md5}); the file was removed")
        os.replace(part, target)
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(f"{url}: {getattr(err, 'reason', None) or err}") from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()


def _extract(archive: Path, root: Path) -> None:
    """Unpack ``archive`` (tar.gz) into ``root``: into a temporary folder, then each top-level
    entry renamed into place, so an interrupted extraction leaves no half-written layout."""
    tmp = root / f".extract-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        extract_tar(archive, tmp)
        for entry in tmp.iterdir():
            destination = root / entry.name
            if destination.exists():
                shutil.rmtree(destination) if destination.is_dir() else destination.unlink()
            os.replace(entry, destination)
    except (tarfile.TarError, EOFError) as err:
        raise DownloadError(f"cannot extract {archive}: {err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download(name: str, root: str | os.PathLike, *, mirror: str | None = None, progress: bool = True) -> Path:
    """Fetch dataset ``name`` into ``root`` in the layout torchvision writes (``MNIST/raw``,
    ``FashionMNIST/raw``, ``cifar-10-batches-py``, ``cifar-100-python``); returns ``root``.

    Each file is tried from each mirror in turn (``mirror`` or ``$LIPNET_DATA_MIRROR`` alone when
    given) and kept only if its MD5 is torchvision's; files already present with the right MD5
    are not fetched again. DownloadError listing every attempt if a file cannot be had."""
    src = source(name)
    mirror = mirror or os.environ.get(MIRROR_VAR)
    mirrors = (mirror.rstrip("/") + "/",) if mirror else src.mirrors
    root = Path(root).expanduser()
    folder = root / src.folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"cannot create {folder}: {err.strerror or err}") from err
    for filename, md5 in src.files:
        target = folder / filename
        if not (target.is_file() and file_digest(target, "md5") == md5):
            failures = []
            for base in mirrors:
                try:
                    _fetch(base + filename, target, md5, progress)
                    break
                except DownloadError as err:
                    failures.append(str(err))
            else:
                raise DownloadError(f"could not download {filename} for {name}: " + "; ".join(failures))
        if src.extract:
            _extract(target, root)
    return root


__all__ = ["MIRROR_VAR", "DownloadError", "Source", "download", "source"]
