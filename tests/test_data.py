"""Datasets: read from the data root only, clear errors for missing/corrupt data, fast batching."""

from __future__ import annotations

import collections
import io
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from lipnet import data as D


def test_data_root_resolution(monkeypatch, tmp_path):
    assert issubclass(D.DataRootError, ValueError) and issubclass(D.DatasetNotFoundError, FileNotFoundError)
    monkeypatch.delenv("LIPNET_DATA", raising=False)
    monkeypatch.setenv("LIPNET_CACHE", str(tmp_path / "cache"))
    assert D.resolve_data_root() == tmp_path / "cache" / "data"  # neither named: the default root
    with pytest.raises(D.DatasetNotFoundError, match="--data-root") as err:
        D.load_dataset("mnist")
    assert "LIPNET_DATA" in str(err.value) and "--download" in str(err.value)
    with pytest.raises(D.DatasetNotFoundError, match="nowhere"):
        D.resolve_data_root(tmp_path / "nowhere")
    monkeypatch.setenv("LIPNET_DATA", str(tmp_path))
    assert D.resolve_data_root() == tmp_path
    with pytest.raises(ValueError, match="unknown dataset"):
        D.load_dataset("imagenet", data_root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        D.load_dataset("mnist", "val", data_root=tmp_path)
    with pytest.raises(ValueError, match="limit"):
        D.load_dataset("mnist", data_root=tmp_path, limit=0)


def test_a_named_root_without_the_data_is_an_error_even_where_the_default_root_has_it(data_root, tmp_path,
                                                                                      monkeypatch, capsys):
    # one rule for train and certify: a named root is used alone, never topped up from the default one
    monkeypatch.setenv("LIPNET_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "data").mkdir(parents=True)
    for folder in ("MNIST", "cifar10-jpg.tar.gz"):
        (tmp_path / "cache" / "data" / folder).symlink_to(data_root / folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.delenv("LIPNET_DATA", raising=False)
    assert len(D.load_dataset("mnist", "test", limit=5)) == 5   # the default root serves it
    for name in ("mnist", "cifar10"):
        with pytest.raises(D.DatasetNotFoundError, match=f"no {name} data under {empty}"):
            D.load_dataset(name, "test", data_root=empty)
    monkeypatch.setenv("LIPNET_DATA", str(empty))
    with pytest.raises(D.DatasetNotFoundError, match=str(empty)):
        D.load_dataset("cifar10", "test")
    from lipnet.cli import main

    for argv in (["train", "--dataset", "cifar10", "--out", str(tmp_path / "run"), "--data-root", str(empty)],
                 ["certify", "--pretrained", "cifar10", "--data-root", str(empty)]):
        assert main(argv) == 2
        assert "no cifar10 data under" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_datasets(data_root, name):
    train = D.load_dataset(name, "train", data_root)
    test = D.load_dataset(name, "test", data_root)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert set(train.labels.unique().tolist()) == set(range(10)) == set(test.labels.unique().tolist())
    mean = train.images.float().mean().item() / 255
    assert mean == pytest.approx(D.DATASETS[name].mean[0], abs=1e-3)
    x, y = train[0]
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and isinstance(y, int)


def test_limit_is_a_fixed_mixed_subset(data_root):
    a = D.load_dataset("mnist", "test", data_root, limit=500)
    b = D.load_dataset("mnist", "test", data_root, limit=500)
    assert len(a) == 500 and torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    assert len(a.labels.unique()) == 10
    assert len(D.load_dataset("mnist", "test", data_root, limit=10**6)) == 10000


def test_missing_and_corrupt_idx_files(data_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    shutil.copytree(data_root / "MNIST" / "raw", raw)
    for f in raw.iterdir():
        f.chmod(0o644)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(D.DatasetNotFoundError, match="t10k-labels-idx1-ubyte"):
        D.load_dataset("mnist", "test", tmp_path)
    images = raw / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:100_000])
    with pytest.raises(D.DatasetCorruptError, match="train-images-idx3-ubyte"):
        D.load_dataset("mnist", "train", tmp_path)


def _jpeg(value: int) -> bytes:
    """A flat 32x32 JPEG (decodes back to ``value`` up to rounding)."""
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _shade(name: str) -> int:
    """Each class's images have their own grey level, so a label can be checked against its pixels."""
    return 20 * D.CIFAR10_CLASSES.index(name) + 10 if name in D.CIFAR10_CLASSES else 128


def _archive(path, classes, per_class=2, corrupt=False):
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for c, name in enumerate(classes):
                for i in range(per_class):
                    payload = b"not a jpeg" if corrupt and c == 3 else _jpeg(_shade(name))
                    info = tarfile.TarInfo(f"CIFAR10_jpg/{split}/{name}/{i:04d}.jpg")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def _keyed(cache):
    (folder,) = [p for p in cache.iterdir() if p.name.startswith("cifar10-jpg-")]
    return folder


def test_cifar10_archive_is_extracted_once_and_cached(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    root.mkdir()
    with pytest.raises(D.DatasetNotFoundError, match="cifar10-jpg.tar.gz"):
        D.load_dataset("cifar10", "train", root, cache_dir=cache)
    classes = list(D.CIFAR10_CLASSES)
    _archive(root / D.CIFAR_ARCHIVE, classes[::-1])  # archive order must not matter
    ds = D.load_dataset("cifar10", "train", root, cache_dir=cache, progress=False)
    assert ds.images.shape == (20, 3, 32, 32) and sorted(ds.labels.tolist()) == [c for c in range(10) for _ in range(2)]
    assert len(set(ds.labels[:5].tolist())) > 1  # a fixed shuffle of the class-sorted archive
    shades = ds.images.float().mean((1, 2, 3))
    assert torch.allclose(shades, 20 * ds.labels.float() + 10, atol=2)  # label = canonical class index
    decoded = _keyed(cache) / "train.pt"
    assert decoded.is_file()
    stamp = decoded.stat().st_mtime_ns
    again = D.load_dataset("cifar10", "train", root, cache_dir=cache, progress=False)
    assert torch.equal(again.images, ds.images) and decoded.stat().st_mtime_ns == stamp  # served from the cache
    assert len(D.load_dataset("cifar10", "test", root, cache_dir=cache, progress=False)) == 20


def test_the_cifar10_cache_serves_only_its_own_archive(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    root.mkdir()
    _archive(root / D.CIFAR_ARCHIVE, D.CIFAR10_CLASSES)
    first = D.load_dataset("cifar10", "train", root, cache_dir=cache, progress=False)
    # another archive at the same path (one image per class): decoded anew, never the old cache
    _archive(root / D.CIFAR_ARCHIVE, D.CIFAR10_CLASSES, per_class=1)
    second = D.load_dataset("cifar10", "train", root, cache_dir=cache, progress=False)
    assert len(first) == 20 and len(second) == 10
    # no archive: the data root has no CIFAR-10, whatever a cache holds
    (root / D.CIFAR_ARCHIVE).unlink()
    with pytest.raises(D.DatasetNotFoundError, match="cifar10-jpg.tar.gz"):
        D.load_dataset("cifar10", "train", root, cache_dir=cache, progress=False)


@pytest.mark.parametrize("damage", [b"", b"garbage", "truncate", "foreign"])
def test_a_corrupt_cifar10_cache_is_decoded_again(tmp_path, damage):
    root, cache = tmp_path / "data", tmp_path / "cache"
    root.mkdir()
    _archive(root / D.CIFAR_ARCHIVE, D.CIFAR10_CLASSES)
    good = D.load_dataset("cifar10", "test", root, cache_dir=cache, progress=False)
    decoded = _keyed(cache) / "test.pt"
    if damage == "truncate":
        decoded.write_bytes(decoded.read_bytes()[:200])
    elif damage == "foreign":
        torch.save({"not": "images"}, decoded)
    else:
        decoded.write_bytes(damage)
    again = D.load_dataset("cifar10", "test", root, cache_dir=cache, progress=False)
    assert torch.equal(again.images, good.images) and torch.equal(again.labels, good.labels)
    assert torch.equal(torch.load(decoded, weights_only=True)[0].sort(0).values, again.images.sort(0).values)


def test_labels_outside_the_classes_are_refused():
    images = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        D.ImageDataset(images, torch.tensor([0, 10, 3]), D.DATASETS["mnist"])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        D.ImageDataset(images, torch.tensor([0, -1, 3]), D.DATASETS["mnist"])


def test_cifar10_bad_archives(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    _archive(root / D.CIFAR_ARCHIVE, [c.upper() for c in D.CIFAR10_CLASSES])
    with pytest.raises(D.DatasetCorruptError, match="class folders"):
        D.load_dataset("cifar10", "train", root, cache_dir=tmp_path / "c1", progress=False)
    _archive(root / D.CIFAR_ARCHIVE, D.CIFAR10_CLASSES, corrupt=True)
    with pytest.raises(D.DatasetCorruptError, match="cannot decode"):
        D.load_dataset("cifar10", "train", root, cache_dir=tmp_path / "c2", progress=False)
    (root / D.CIFAR_ARCHIVE).write_bytes(b"truncated")
    with pytest.raises(D.DatasetCorruptError, match="cannot extract"):
        D.load_dataset("cifar10", "train", root, cache_dir=tmp_path / "c3", progress=False)


def test_batch_loader_covers_every_example_once():
    ds = D.ImageDataset(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).clone(),
                        torch.arange(10), D.DATASETS["mnist"])
    loader = D.BatchLoader(ds, 4, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(loader) == 3
    epoch1 = torch.cat([y for _, y in loader])
    epoch2 = torch.cat([y for _, y in loader])
    assert sorted(epoch1.tolist()) == sorted(epoch2.tolist()) == list(range(10))
    assert not torch.equal(epoch1, epoch2)  # reshuffled each epoch
    assert torch.cat([y for _, y in D.batches(ds, 3)]).tolist() == list(range(10))
    x, y = next(iter(loader))
    assert x.dtype == torch.float32 and torch.allclose(x[:, 0, 0, 0] * 255, y.float())
    dropped = D.BatchLoader(ds, 4, drop_last=True)
    assert len(dropped) == 2 and sum(len(y) for _, y in dropped) == 8
    with pytest.raises(ValueError, match="batch_size"):
        D.BatchLoader(ds, 0)
    with pytest.raises(ValueError, match="batch_size"):
        next(D.batches(ds, -1))


def test_real_cifar10_layout(data_root):
    """The data root's CIFAR-10 has the layout the loader expects: the JPEG archive (listing only:
    extracting it costs minutes) or torchvision's cifar-10-batches-py."""
    if not (data_root / D.CIFAR_ARCHIVE).is_file():
        ds = D.load_dataset("cifar10", "test", data_root, progress=False)
        assert ds.images.shape == (10000, 3, 32, 32) and torch.bincount(ds.labels).tolist() == [1000] * 10
        return
    counts = collections.Counter()
    with tarfile.open(data_root / D.CIFAR_ARCHIVE) as tar:
        for member in tar:
            if member.isfile():
                top, split, name, _ = member.name.split("/")
                counts[top, split, name] += 1
    assert counts == {**{("CIFAR10_jpg", "train", c): 5000 for c in D.CIFAR10_CLASSES},
                      **{("CIFAR10_jpg", "test", c): 1000 for c in D.CIFAR10_CLASSES}}


def test_random_split_is_disjoint_and_deterministic(data_root):
    from lipnet.data import load_dataset, random_split
    ds = load_dataset("mnist", "test", data_root, limit=100)
    a, b = random_split(ds, 0.3, seed=1)
    assert len(a) == 30 and len(b) == 70
    a2, _ = random_split(ds, 0.3, seed=1)
    assert torch.equal(a.images, a2.images)
    rows = {bytes(img.numpy()) for img in ds.images}
    assert {bytes(img.numpy()) for img in a.images} | {bytes(img.numpy()) for img in b.images} <= rows
    assert sorted(a.labels.tolist() + b.labels.tolist()) == sorted(ds.labels.tolist())
    with pytest.raises(ValueError, match="fraction"):
        random_split(ds, 1.0)
    with pytest.raises(ValueError, match="empty"):
        random_split(load_dataset("mnist", "test", data_root, limit=2), 0.1)
