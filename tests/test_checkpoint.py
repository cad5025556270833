"""Checkpoints load with torch.load(weights_only=True): plain types survive, code-running pickles and
damaged / foreign files are refused with a clear error (also through `lipnet certify`), writes are atomic."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shlex
from dataclasses import asdict

import pytest
import torch

from lipnet.cli import main
from lipnet.models import build_model
from lipnet.checkpoints import CHECKPOINT, CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from lipnet.presets import PrivacyConfig, TrainConfig


def _config(**overrides) -> TrainConfig:
    return TrainConfig.from_preset("mnist", epochs=2, limit=64, model_overrides={"width": 2, "hidden": 16}, **overrides)


def _tiny(config: TrainConfig) -> torch.nn.Module:
    return build_model(config.model, **config.model_config)


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``: what a malicious checkpoint does."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _malicious(tmp_path, name: str):
    """A checkpoint directory shaped like a real one whose history holds a code-running pickle."""
    config = _config()
    model = _tiny(config)
    marker = tmp_path / f"{name}.pwned"
    folder = tmp_path / name
    folder.mkdir()
    torch.save({"config": asdict(config), "state_dict": model.state_dict(),
                "history": [{"epoch": 1, "note": _Payload(marker)}]}, folder / CHECKPOINT)
    return folder, marker


def test_plain_types_round_trip(tmp_path):
    config = _config(amp="bf16")
    model = _tiny(config)
    history = [{"epoch": 1, "loss": 2.5, "clean": 0.5, "certified": {0.5: 0.25, 1.0: 0.125, 1.58: 0.0},
                "lipschitz_bound": 1.0, "numpy": __import__("numpy").float64(0.75)}]
    path = save_checkpoint(tmp_path / "run", model, config, history)
    assert path == tmp_path / "run" / CHECKPOINT and (tmp_path / "run" / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt", "config.json"]  # no temp files
    torch.load(path, weights_only=True)  # the restricted unpickler accepts the whole file
    loaded, cfg, hist = load_checkpoint(path.parent)
    assert cfg == config and cfg.amp == "bf16"
    assert isinstance(cfg.eval_eps, tuple) and isinstance(cfg.model_config["mean"], tuple)
    assert hist[0]["certified"] == {0.5: 0.25, 1.0: 0.125, 1.58: 0.0}
    assert type(hist[0]["numpy"]) is float and hist[0]["numpy"] == 0.75
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
    ckpt = read_checkpoint(path)
    assert ckpt.epoch == 1 and not ckpt.resumable


def test_version_1_checkpoints_still_load(tmp_path):
    """What lipnet wrote before (no format / epoch / training keys, eval_eps as a list) stays loadable."""
    config = _config()
    model = _tiny(config)
    cfg = asdict(config)
    cfg.pop("amp")
    cfg["eval_eps"] = list(cfg["eval_eps"])
    torch.save({"config": cfg, "state_dict": model.state_dict(), "history": [{"epoch": 1, "certified": {0.5: 0.1}}]},
               tmp_path / CHECKPOINT)
    _, loaded, history = load_checkpoint(tmp_path)
    assert loaded.eval_eps == config.eval_eps and loaded.amp is None and history[0]["certified"] == {0.5: 0.1}


def test_version_2_private_configs_load_as_the_typed_privacy_config(tmp_path):
    """Version-2 files kept private training's options in an untyped ``dp`` dict and recorded
    optimizer "adam" while the dict's "sgd" trained: they load as PrivacyConfig and "sgd"."""
    config = _config()
    model = _tiny(config)
    cfg = asdict(config)
    cfg.pop("privacy")
    cfg["dp"] = {"input_bound": 28.0, "noise": "per_layer", "optimizer": "sgd", "momentum": 0.9, "trainable": "dense",
                 "freeze_bias": True, "loss_clip": None, "epsilon": 2.0, "delta": 1e-5, "accountant": "rdp",
                 "epsilon_spent": 1.98}
    torch.save({"format": "lipnet.checkpoint", "version": 2, "config": cfg, "state_dict": model.state_dict(),
                "history": [], "epoch": 1, "training": None}, tmp_path / CHECKPOINT)
    loaded = read_checkpoint(tmp_path).config
    assert loaded.optimizer == "sgd" and loaded.private
    assert loaded.privacy == PrivacyConfig(epsilon=2.0, input_bound=28.0, delta=1e-5, momentum=0.9, trainable="dense")
    cfg["dp"] = None  # a version-2 file of an ordinary run
    torch.save({"format": "lipnet.checkpoint", "version": 2, "config": cfg, "state_dict": model.state_dict(),
                "history": [], "epoch": 1, "training": None}, tmp_path / CHECKPOINT)
    assert read_checkpoint(tmp_path).config == config
    cfg["dp"] = {"epsilon": -1.0, "input_bound": 1.0, "optimizer": "sgd"}  # a crafted budget is refused
    torch.save({"format": "lipnet.checkpoint", "version": 2, "config": cfg, "state_dict": model.state_dict(),
                "history": [], "epoch": 1, "training": None}, tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError, match="epsilon must be finite and > 0"):
        read_checkpoint(tmp_path)


def test_checkpoints_without_a_parametrization_load_as_polar(tmp_path):
    """Checkpoints from before the layers stored their orthogonal factors hold raw parameters whose
    weight is their polar factor: they must rebuild that model, not retract the raw tensors."""
    from lipnet.models import mnist_convnet

    torch.manual_seed(0)
    old = mnist_convnet(width=2, hidden=8, parametrization="polar", conv_bias=True)  # as models were built then
    with torch.no_grad():
        for name, p in old.named_parameters():
            if "original" in name:
                p.add_(0.3 * torch.randn_like(p))  # raw parameters far from orthogonal, as after training
    config = TrainConfig(dataset="mnist", epochs=1, batch_size=8, lr=1e-3, offset=1.0, temperature=0.25,
                         augment=False, model="mnist-convnet", model_config={"width": 2, "hidden": 8})
    cfg = asdict(config)
    cfg.pop("amp")
    torch.save({"config": cfg, "state_dict": old.state_dict(), "history": []}, tmp_path / CHECKPOINT)
    loaded, loaded_config, _ = load_checkpoint(tmp_path)
    assert loaded_config.model_config["parametrization"] == "polar"
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(loaded(x), old.eval()(x))
    # new runs record the parametrization they use
    assert TrainConfig.from_preset("mnist").model_config["parametrization"] == "retraction"


def test_code_running_pickle_is_refused_without_running_it(tmp_path):
    # control: the payload is live -- unrestricted unpickling does create the marker
    control, control_marker = _malicious(tmp_path, "control")
    torch.load(control / CHECKPOINT, weights_only=False)
    assert control_marker.exists()

    folder, marker = _malicious(tmp_path, "evil")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder)
    message = str(info.value)
    assert not marker.exists()
    assert str(folder / CHECKPOINT) in message and "arbitrary unpickling" in message and "system" in message


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_a_bare_pickle_payload_is_refused_without_running_it(tmp_path, protocol):
    """Not a zip archive (torch's pre-1.6 format, or pickle.dump): also refused unexecuted, saying why."""
    marker = tmp_path / "pwned"
    file = tmp_path / CHECKPOINT
    file.write_bytes(pickle.dumps({"config": asdict(_config()), "state_dict": {}, "history": [_Payload(marker)]},
                                  protocol=protocol))
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(tmp_path)
    assert not marker.exists()
    assert str(file) in str(info.value) and "arbitrary unpickling" in str(info.value) and "system" in str(info.value)


def test_certify_refuses_a_code_running_checkpoint(tmp_path, capsys):
    folder, marker = _malicious(tmp_path, "evil")
    assert main(["certify", "--checkpoint", str(folder), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert err.startswith("lipnet certify: error: refusing to load") and "arbitrary unpickling" in err


def _damaged_files(tmp_path):
    config = _config()
    good = save_checkpoint(tmp_path / "good", _tiny(config), config, [{"epoch": 1}])
    data = good.read_bytes()
    yield "random bytes", os.urandom(4096)
    yield "a text file", b"epoch 1: loss 2.5\nthis is not a checkpoint\n"
    yield "an empty file", b""
    yield "a truncated checkpoint", data[: len(data) // 2]
    yield "a checkpoint missing its last byte", data[:-1]


def test_damaged_or_foreign_files_get_a_clear_error(tmp_path, capsys):
    for i, (what, content) in enumerate(_damaged_files(tmp_path)):
        folder = tmp_path / f"bad{i}"
        folder.mkdir()
        (folder / CHECKPOINT).write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(folder)
        message = str(info.value)
        assert str(folder / CHECKPOINT) in message, what
        assert "PytorchStreamReader" not in message, what
        assert main(["certify", "--checkpoint", str(folder), "--no-progress"]) == 2, what
        err = capsys.readouterr().err
        assert err.startswith("lipnet certify: error: ") and str(folder / CHECKPOINT) in err, what
        assert "Traceback" not in err, what


def test_a_torch_file_that_is_not_a_checkpoint(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="not a lipnet checkpoint"):
        read_checkpoint(tmp_path / "tensor.pt")
    config = _config()
    cfg = {**asdict(config), "from_the_future": 1}
    torch.save({"config": cfg, "state_dict": {}}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="unknown config fields"):
        read_checkpoint(tmp_path / "future.pt")
    save_checkpoint(tmp_path / "other", _tiny(config), config)
    ckpt = torch.load(tmp_path / "other" / CHECKPOINT, weights_only=True)
    ckpt["config"]["model_config"]["width"] = 4  # weights of width 2
    torch.save(ckpt, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="do not fit mnist-convnet"):
        load_checkpoint(tmp_path / "mismatch.pt")


def test_save_refuses_what_loading_would_refuse(tmp_path):
    config = _config()
    model = _tiny(config)
    with pytest.raises(TypeError, match=r"history\[0\]\['note'\] is a .*_Payload"):
        save_checkpoint(tmp_path / "run", model, config, [{"epoch": 1, "note": _Payload(tmp_path / "m")}])
    config = dataclasses.replace(config, model_config={**config.model_config, "activation": torch.nn.ReLU})
    with pytest.raises(TypeError, match=r"config\['model_config'\]\['activation'\]"):
        save_checkpoint(tmp_path / "run", model, config)
    assert not (tmp_path / "run" / CHECKPOINT).exists()
    assert not list((tmp_path / "run").iterdir())  # no temporary file left behind


def test_an_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    config = _config()
    model = _tiny(config)
    path = save_checkpoint(tmp_path, model, config, [{"epoch": 1, "loss": 1.0}])
    before = path.read_bytes()
    real_save = torch.save

    def dies_halfway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt  # e.g. Ctrl-C while the file is being written

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model, config, [{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5}])
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "config.json"]
    assert load_checkpoint(tmp_path)[2] == [{"epoch": 1, "loss": 1.0}]
