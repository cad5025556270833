"""Datasets in the layouts the ecosystem has them, and --download against a local server.

Every file here is built by the test in the real format (idx, gzipped idx, CIFAR python
pickles as torchvision writes them); the download tests serve them from 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import pathlib
import pickle
import shutil
import tarfile
import threading

import numpy as np
import pytest
import torch

from lipnet import data as D
from lipnet import download as dl
from lipnet.cli import main


def _idx(array: np.ndarray) -> bytes:
    magic = 0x800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _mnist_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = (rng.random((n, 28, 28)) * 60 + labels[:, None, None] * 19).astype(np.uint8)
    return images, labels.astype(np.uint8)


def write_idx_folder(folder: pathlib.Path, n_train: int = 60, n_test: int = 30, compress: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = _mnist_like(n, seed)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            payload = _idx(array)
            name = f"{prefix}-{kind}-ubyte"
            if compress:
                (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
            else:
                (folder / name).write_bytes(payload)


def _cifar_batch(n: int, classes: int, seed: int, label_key: str) -> dict:
    rng = np.random.default_rng(seed)
    labels = [int(v) for v in rng.integers(0, classes, n)]
    data = (rng.random((n, 3072)) * 40 + np.array(labels)[:, None] * (200 // classes)).astype(np.uint8)
    # str keys: what Python 2's pickles of the real batches load as under encoding="latin1"
    return {"batch_label": "synthetic", label_key: labels, "data": data, "filenames": [f"{i}.png" for i in range(n)]}


def write_cifar_folder(root: pathlib.Path, name: str = "cifar10", per_batch: int = 20) -> pathlib.Path:
    """``cifar-10-batches-py`` / ``cifar-100-python`` as torchvision's CIFAR10 / CIFAR100 read them."""
    if name == "cifar10":
        folder, files, key, classes = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + [
            "test_batch"], "labels", 10
    else:
        folder, files, key, classes = root / "cifar-100-python", ["train", "test"], "fine_labels", 100
    folder.mkdir(parents=True, exist_ok=True)
    for seed, f in enumerate(files):
        with open(folder / f, "wb") as out:
            pickle.dump(_cifar_batch(per_batch, classes, seed, key), out, protocol=2)
    meta, names = ("batches.meta", "label_names") if name == "cifar10" else ("meta", "fine_label_names")
    with open(folder / meta, "wb") as out:
        pickle.dump({names: [f"class{i}" for i in range(classes)]}, out, protocol=2)
    return folder


def test_gzipped_and_plain_idx_folders_give_the_same_data(tmp_path):
    write_idx_folder(tmp_path / "gz" / "MNIST" / "raw", compress=True)
    write_idx_folder(tmp_path / "plain" / "MNIST" / "raw", compress=False)
    a = D.load_dataset("mnist", "train", tmp_path / "gz")
    b = D.load_dataset("mnist", "train", tmp_path / "plain")
    assert a.images.shape == (60, 1, 28, 28) and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    images, labels = _mnist_like(30, 1)
    test = D.load_dataset("mnist", "test", tmp_path / "gz")
    assert torch.equal(test.images[:, 0], torch.from_numpy(images)) and test.labels.tolist() == labels.tolist()


def test_the_shared_idx_files_read_as_torchvision_reads_them(data_root):
    import torchvision

    ours = D.load_dataset("fashion-mnist", "test", data_root)
    theirs = torchvision.datasets.FashionMNIST(str(data_root), train=False, download=False)
    assert torch.equal(ours.images[:, 0], theirs.data) and torch.equal(ours.labels, theirs.targets)


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_python_batches_are_read_as_torchvision_reads_them(tmp_path, name, classes):
    import torchvision

    write_cifar_folder(tmp_path, name)
    train, test = D.load_dataset(name, "train", tmp_path), D.load_dataset(name, "test", tmp_path)
    assert len(train) == (100 if name == "cifar10" else 20) and len(test) == 20
    assert train.info.num_classes == classes and len(train.info.classes) == classes
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    with mock_integrity(cls):
        theirs = cls(str(tmp_path), train=True, download=False)
    assert torch.equal(train.images, torch.from_numpy(theirs.data).permute(0, 3, 1, 2))
    assert train.labels.tolist() == list(theirs.targets)


@contextlib.contextmanager
def mock_integrity(cls):
    """torchvision MD5-checks the real CIFAR pickles; these are synthetic ones in the same format."""
    import torchvision.datasets.cifar as module

    original = module.check_integrity
    module.check_integrity = lambda *args, **kwargs: True
    try:
        yield
    finally:
        module.check_integrity = original


def test_a_planted_cifar_pickle_runs_no_code(tmp_path):
    folder = write_cifar_folder(tmp_path, "cifar10")
    marker = tmp_path / "code-ran"

    class Planted:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": Planted(), "labels": [0]}, f, protocol=2)
    with pytest.raises(D.DatasetCorruptError, match="test_batch.*refusing to rebuild"):
        D.load_dataset("cifar10", "test", tmp_path)
    assert not marker.exists()


def _damage(path: pathlib.Path, how: str) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if how == "truncate" else b"\x00garbage" + raw[8:])


@pytest.mark.parametrize("how", ["truncate", "garbage"])
@pytest.mark.parametrize("layout", ["idx", "idx.gz", "cifar10", "cifar100"])
def test_a_damaged_file_is_one_clear_error_naming_it(tmp_path, capsys, layout, how):
    if layout.startswith("idx"):
        write_idx_folder(tmp_path / "MNIST" / "raw", compress=layout == "idx.gz")
        victim = next((tmp_path / "MNIST" / "raw").glob("t10k-images*"))
        dataset = "mnist"
    else:
        folder = write_cifar_folder(tmp_path, layout)
        victim, dataset = folder / ("test_batch" if layout == "cifar10" else "test"), layout
    _damage(victim, how)
    with pytest.raises(D.DatasetCorruptError, match=victim.name):
        D.load_dataset(dataset, "test", tmp_path)
    rc = main(["conformal", "--pretrained", "mnist", "--data-root", str(tmp_path), "--no-progress"]) \
        if dataset == "mnist" else None
    if rc is not None:
        err = capsys.readouterr().err
        assert rc == 2 and victim.name in err and "Traceback" not in err


def test_no_data_says_where_it_looked_and_offers_download(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LIPNET_DATA", raising=False)
    monkeypatch.setenv("LIPNET_CACHE", str(tmp_path / "cache"))
    with pytest.raises(D.DatasetNotFoundError) as err:
        D.load_dataset("cifar10", "test")
    message = str(err.value)
    assert str(tmp_path / "cache" / "data" / "cifar-10-batches-py") in message and "--download" in message
    assert D.CIFAR_ARCHIVE in message and "default data root" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["certify", "--pretrained", "mnist", "--data-root", str(empty), "--no-progress"])
    text = capsys.readouterr().err
    assert rc == 2 and str(empty / "MNIST" / "raw") in text and "--download" in text


def test_train_reads_a_cifar10_batches_folder_and_cifar100_has_100_classes(tmp_path, capsys):
    write_cifar_folder(tmp_path / "data", "cifar10")
    out = tmp_path / "c10"
    common = ["--epochs", "1", "--width", "8", "--batch-size", "25", "--data-root", str(tmp_path / "data"),
              "--no-progress"]
    assert main(["train", "--dataset", "cifar10", "--out", str(out), *common]) == 0
    write_cifar_folder(tmp_path / "data", "cifar100")
    out100 = tmp_path / "c100"
    assert main(["train", "--dataset", "cifar100", "--out", str(out100), *common]) == 0
    from lipnet.checkpoints import load_checkpoint

    model, config, _ = load_checkpoint(out100)
    assert config.model_config["num_classes"] == 100
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 100)
    capsys.readouterr()
    rc = main(["certify", "--checkpoint", str(out100), "--eps", "0.1", "--pgd-steps", "0", "--data-root",
               str(tmp_path / "data"), "--no-progress", "--plot", str(tmp_path / "p.png")])
    assert rc == 0 and "cifar100 test (20 images)" in capsys.readouterr().out
    rc = main(["conformal", "--checkpoint", str(out100), "--eps", "0.0", "0.1", "--pgd-steps", "0",
               "--calibration-fraction", "0.5", "--alpha", "0.2", "--data-root", str(tmp_path / "data"),
               "--no-progress", "--plot", str(tmp_path / "c.png")])
    assert rc == 0


# ------------------------------------------------------------------------------------- download
@contextlib.contextmanager
def serve(folder: pathlib.Path):
    """An HTTP server on 127.0.0.1 (a free port) serving ``folder``; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _md5(path: pathlib.Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _served_mnist(tmp_path: pathlib.Path) -> tuple[pathlib.Path, dl.Source]:
    served = tmp_path / "served"
    write_idx_folder(served, compress=True)
    files = tuple((p.name, _md5(p)) for p in sorted(served.iterdir()))
    return served, dl.Source(files, ("http://127.0.0.1:9/unused/",), "MNIST/raw")


def test_download_fetches_checks_and_trains(tmp_path, monkeypatch, capsys):
    served, src = _served_mnist(tmp_path)
    monkeypatch.setattr(dl, "source", lambda name: src)
    root = tmp_path / "root"
    with serve(served) as url:
        rc = main(["train", "--dataset", "mnist", "--epochs", "1", "--width", "4", "--batch-size", "30",
                   "--out", str(tmp_path / "run"), "--data-root", str(root), "--download", "--mirror", url,
                   "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in (root / "MNIST" / "raw").iterdir()) == sorted(f for f, _ in src.files)
    assert len(D.load_dataset("mnist", "train", root)) == 60  # now an ordinary offline root
    # the mirror can come from the environment; files already there are not fetched again
    monkeypatch.setenv(dl.MIRROR_VAR, "http://127.0.0.1:9/nothing-listens-here/")
    assert dl.download("mnist", root, progress=False) == root


def test_a_download_with_a_wrong_checksum_is_refused_and_removed(tmp_path, monkeypatch, capsys):
    served, src = _served_mnist(tmp_path)
    name, md5 = src.files[0]
    (served / name).write_bytes(b"not what the checksum names")  # a tampered mirror
    monkeypatch.setattr(dl, "source", lambda _: src)
    root = tmp_path / "root"
    with serve(served) as url:
        with pytest.raises(dl.DownloadError, match=f"{name}.*checksum mismatch.*expected {md5}.*removed"):
            dl.download("mnist", root, mirror=url, progress=False)
        rc = main(["certify", "--pretrained", "mnist", "--data-root", str(root), "--download", "--mirror", url,
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "checksum mismatch" in err and "Traceback" not in err
    left = [p.name for p in (root / "MNIST" / "raw").iterdir()]
    assert name not in left and not any(p.endswith(".part") for p in left)  # nothing half-written


def test_an_unreachable_mirror_names_every_attempt(tmp_path, monkeypatch):
    _, src = _served_mnist(tmp_path)
    monkeypatch.setattr(dl, "source", lambda _: dl.Source(src.files, ("http://127.0.0.1:9/a/", "http://127.0.0.1:9/b/"),
                                                           src.folder))
    with pytest.raises(dl.DownloadError, match="127.0.0.1:9/a/.*127.0.0.1:9/b/"):
        dl.download("mnist", tmp_path / "root", progress=False)


def test_a_downloaded_cifar_archive_is_unpacked_into_torchvision_s_layout(tmp_path, monkeypatch):
    staging = tmp_path / "staging"
    write_cifar_folder(staging, "cifar10")
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    src = dl.Source((("cifar-10-python.tar.gz", _md5(served / "cifar-10-python.tar.gz")),), ("unused",), "",
                    extract=True)
    monkeypatch.setattr(dl, "source", lambda _: src)
    with serve(served) as url:
        ds = D.load_dataset("cifar10", "test", tmp_path / "root", download=True, mirror=url, progress=False)
    assert len(ds) == 20 and (tmp_path / "root" / "cifar-10-batches-py" / "test_batch").is_file()
    assert not [p for p in (tmp_path / "root").iterdir() if p.name.startswith(".")]
    shutil.rmtree(staging)


def test_the_real_sources_are_torchvision_s():
    import torchvision

    assert dl.source("mnist").files == tuple(map(tuple, torchvision.datasets.MNIST.resources))
    assert dl.source("cifar100").files == (("cifar-100-python.tar.gz", torchvision.datasets.CIFAR100.tgz_md5),)
    assert dl.source("cifar10").mirrors[0] + "cifar-10-python.tar.gz" == torchvision.datasets.CIFAR10.url


def test_the_download_command_fills_a_root_the_loaders_then_read(tmp_path, monkeypatch, capsys):
    served, src = _served_mnist(tmp_path)
    monkeypatch.setattr(dl, "source", lambda name: src)
    with serve(served) as url:
        assert main(["download", "mnist", "--data-root", str(tmp_path / "root"), "--mirror", url, "--no-progress"]) == 0
    assert "mnist: downloaded into" in capsys.readouterr().out
    assert len(D.load_dataset("mnist", "test", tmp_path / "root")) == 30
    # a dataset the root already holds, in any layout, is not fetched (nothing listens on port 9)
    assert main(["download", "mnist", "--data-root", str(tmp_path / "root"), "--mirror", "http://127.0.0.1:9/"]) == 0
    assert "already there" in capsys.readouterr().out
