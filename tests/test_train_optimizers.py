"""`TrainConfig.optimizer` / `lipnet train --optimizer`: the Muon-type optimizers train, checkpoint
and resume like Adam; configurations written before the option existed resume as Adam runs."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import asdict

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lipnet.certify import network_lipschitz_bound
from lipnet.checkpoints import CHECKPOINT, read_checkpoint
from lipnet.cli import main
from lipnet.models import build_model
from lipnet.optim import CombinedOptimizer, SchattenMuon, TurboMuon
from lipnet.presets import DEFAULT_MATRIX_LR, TrainConfig
from lipnet.training import build_optimizer, fit


def _config(**overrides) -> TrainConfig:
    return TrainConfig.from_preset("mnist", **{"epochs": 2, "batch_size": 16, **overrides},
                                   model_overrides={"width": 2, "hidden": 16})


def _loaders(seed: int = 0):
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    data = TensorDataset(x, y)
    return (DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed)),
            DataLoader(data, batch_size=64))


def _model(config: TrainConfig) -> torch.nn.Module:
    torch.manual_seed(config.seed)
    return build_model(config.model, **config.model_config)


def test_config_validates_the_optimizer_once():
    assert _config().optimizer == "adam" and _config().matrix_lr is None
    assert _config(optimizer="turbomuon").matrix_lr == DEFAULT_MATRIX_LR
    assert _config(optimizer="schatten", matrix_lr=0.05).matrix_lr == 0.05
    with pytest.raises(ValueError, match="optimizer must be one of \\['adam', 'turbomuon', 'schatten'\\], got 'sgd'"):
        _config(optimizer="sgd")  # sgd trains private runs only
    with pytest.raises(ValueError, match="optimizer 'adam' has one lr"):
        _config(matrix_lr=0.1)
    for bad in (0.0, -1.0, float("nan"), float("inf"), "0.1"):
        with pytest.raises(ValueError, match="matrix_lr must be (finite and > 0|a number)"):
            _config(optimizer="turbomuon", matrix_lr=bad)
    private = TrainConfig.from_preset("mnist", private=True, privacy={"epsilon": 1.0})
    assert private.optimizer == "sgd" and private.privacy.delta == 1e-5   # what the private preset trains with
    with pytest.raises(ValueError, match="private training trains with one of \\['sgd', 'adam'\\]"):
        TrainConfig(**{**asdict(private), "optimizer": "turbomuon"})
    with pytest.raises(ValueError, match="matrix_lr is the lr of the turbomuon"):
        dataclasses.replace(private, matrix_lr=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        private.lr = 1.0   # a run's config is what it ran: nothing changes it during the run


@pytest.mark.parametrize("name, cls", [("turbomuon", TurboMuon), ("schatten", SchattenMuon)])
def test_muon_optimizers_train_the_matrices_and_adam_the_rest(name, cls):
    config = _config(optimizer=name, matrix_lr=0.03)
    model = _model(config)
    optimizer, scheduler = build_optimizer(model, config, total_steps=10)
    assert isinstance(optimizer, CombinedOptimizer)
    matrix, adam = optimizer.optimizers
    assert isinstance(matrix, cls) and isinstance(adam, torch.optim.Adam)
    trained = [p for o in optimizer.optimizers for g in o.param_groups for p in g["params"]]
    assert sorted(map(id, trained)) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert all(p.dim() >= 2 for g in matrix.param_groups for p in g["params"])
    peaks = [g["max_lr"] for g in optimizer.param_groups]
    assert peaks == [0.03] * len(matrix.param_groups) + [config.lr] * len(adam.param_groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train, test = _loaders()
    history = fit(model, train, test, config, progress=False, log=lambda _: None)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("parametrizations" in n for n in moved), moved  # the orthogonal factors were trained
    # whatever moved the stored factors, the network stays 1-Lipschitz
    assert network_lipschitz_bound(model.eval()) <= 1 + 1e-4


@pytest.mark.parametrize("name", ["turbomuon", "schatten"])
def test_a_muon_run_resumes_to_the_uninterrupted_weights(tmp_path, name):
    config = _config(optimizer=name, epochs=3)
    full_dir, copy_dir = tmp_path / "full", tmp_path / "copy"
    copy_dir.mkdir()

    def keep_epoch_1(line: str) -> None:  # logged before epoch 2's checkpoint replaces epoch 1's
        if line.startswith("epoch 2/"):
            shutil.copy(full_dir / CHECKPOINT, copy_dir / CHECKPOINT)

    train, test = _loaders()
    fit(_model(config), train, test, config, progress=False, log=keep_epoch_1, checkpoint_dir=full_dir)
    resume = read_checkpoint(copy_dir)
    assert resume.epoch == 1 and resume.config == config
    model = _model(config)
    train, test = _loaders()
    history = fit(model, train, test, config, progress=False, log=lambda _: None, checkpoint_dir=copy_dir,
                  resume=resume)
    full = read_checkpoint(full_dir)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    for key, tensor in full.state_dict.items():
        torch.testing.assert_close(model.state_dict()[key], tensor, msg=lambda m, key=key: f"{key}: {m}")
    assert [r["loss"] for r in history] == pytest.approx([r["loss"] for r in full.history], rel=1e-6)


def test_a_checkpoint_written_before_the_option_resumes_as_adam(tmp_path):
    """A stored configuration without `optimizer` / `matrix_lr` (older lipnet) is an Adam run, and
    its Adam state loads into the Adam of `build_optimizer`."""
    config = _config(epochs=2)
    train, test = _loaders()
    fit(_model(config), train, test, config, progress=False, log=lambda _: None, checkpoint_dir=tmp_path / "run")
    ckpt = read_checkpoint(tmp_path / "run")
    payload = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    for key in ("optimizer", "matrix_lr"):
        payload["config"].pop(key)
    torch.save(payload, tmp_path / "run" / CHECKPOINT)
    old = read_checkpoint(tmp_path / "run")
    assert old.config.optimizer == "adam" and old.config.matrix_lr is None and old.resumable
    assert old.config == ckpt.config
    optimizer, _ = build_optimizer(_model(config), old.config, total_steps=8)
    optimizer.load_state_dict(old.training["optimizer"])


def test_cli_optimizer_option(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    common = ["--no-progress", "--data-root", str(data_root)]
    assert main(["train", "--dataset", "mnist", "--epochs", "1", "--limit", "64", "--width", "2", "--batch-size", "32",
                 "--optimizer", "turbomuon", "--matrix-lr", "0.04", "--out", str(out), *common]) == 0
    assert "turbomuon at lr 0.04 on the matrices and Adam at lr 0.002" in capsys.readouterr().out
    config = read_checkpoint(out).config
    assert config.optimizer == "turbomuon" and config.matrix_lr == 0.04
    assert main(["train", "--resume", str(out), "--optimizer", "turbomuon", *common]) == 0
    assert "all 1 epochs are done" in capsys.readouterr().out
    for extra, message in ((["--optimizer", "adam"], "--optimizer adam (the run's: turbomuon) would change the run"),
                           (["--matrix-lr", "0.1"], "--matrix-lr 0.1 (the run's: 0.04)")):
        assert main(["train", "--resume", str(out), *extra, *common]) == 2
        assert message in capsys.readouterr().err
    assert main(["train", "--dataset", "mnist", "--matrix-lr", "0.1", "--out", str(tmp_path / "x"), *common]) == 2
    assert "optimizer 'adam' has one lr" in capsys.readouterr().err
    assert main(["train", "--dataset", "mnist", "--dp", "--epsilon", "1", "--optimizer", "turbomuon",
                 "--out", str(tmp_path / "y"), *common]) == 2
    assert "private training trains with one of" in capsys.readouterr().err


def test_a_two_process_turbomuon_run(tmp_path, data_root):
    """--nproc 2 --optimizer turbomuon: TurboMuon shards each stack over the ranks; the run ends
    1-Lipschitz with the combined optimizer's state in its checkpoint."""
    out = tmp_path / "run"
    argv = ["train", "--dataset", "mnist", "--epochs", "1", "--limit", "128", "--width", "2", "--batch-size", "32",
            "--nproc", "2", "--optimizer", "turbomuon", "--no-progress", "--out", str(out),
            "--data-root", str(data_root)]
    assert main(argv) == 0
    ckpt = read_checkpoint(out)
    assert ckpt.config.optimizer == "turbomuon" and ckpt.training["world_size"] == 2
    assert ckpt.training["optimizer"]["types"] == ["TurboMuon", "Adam"]
    model = build_model(ckpt.config.model, **ckpt.config.model_config)
    model.load_state_dict(ckpt.state_dict)
    assert network_lipschitz_bound(model.eval()) <= 1 + 1e-4
