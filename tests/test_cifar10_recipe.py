"""The CIFAR-10 presets: the 2-core CPU recipe (the default) trains and certifies end to end; the
GPU-scale network stays available by name; --amp bf16 is recorded in the run (and warned about
where the CPU would emulate it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lipnet.cli
import lipnet.training
from lipnet.cli import main
from lipnet.models import build_model
from lipnet.checkpoints import load_checkpoint
from lipnet.presets import DEFAULT_MATRIX_LR, NAMED_PRESETS, TrainConfig, preset_names


def _train_one_epoch(out, data_root, *options: str):
    """`lipnet train ... --epochs 1 --out OUT` with ``options``; returns the run's (config, history)."""
    rc = main(["train", *options, "--epochs", "1", "--out", str(out), "--data-root", str(data_root), "--no-progress"])
    assert rc == 0
    _, config, history = load_checkpoint(out)
    return config, history


def test_the_cifar10_preset_trains_two_steps_and_certifies(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    config, history = _train_one_epoch(out, data_root, "--dataset", "cifar10", "--limit", "64", "--batch-size", "32")
    # the recipe: fp32 steps on channels-last batches, TurboMuon on the matrices, margin 0.45, crop + flip
    assert config.amp is None and config.channels_last and config.augment
    assert config.optimizer == "turbomuon" and config.matrix_lr == DEFAULT_MATRIX_LR and config.offset == 0.45
    assert config.model_config["width"] == 32 and config.model_config["hidden"] == 256
    assert config.model_config["parametrization"] == "retraction"
    assert len(history) == 1
    assert "in fp32, turbomuon at lr 0.05 on the matrices" in capsys.readouterr().out
    result = tmp_path / "cert.json"
    rc = main(["certify", "--checkpoint", str(out), "--limit", "64", "--pgd-steps", "2", "--pgd-points", "16",
               "--json", str(result), "--data-root", str(data_root), "--no-progress"])
    assert rc == 0
    res = json.loads(result.read_text())
    assert res["n"] == 64 and set(res["certified"]) == {str(e) for e in config.eval_eps}
    assert res["lipschitz_lower"] <= res["lipschitz_bound"] <= 1 + 1e-4
    for eps, acc in res["certified"].items():
        assert acc <= res["clean"]


def test_amp_bf16_is_recorded_and_kept_on_resume(tmp_path, data_root, monkeypatch):
    monkeypatch.setattr(lipnet.training, "native_bf16", lambda device: True)
    out = tmp_path / "run"
    config, _ = _train_one_epoch(out, data_root, "--dataset", "cifar10", "--limit", "32", "--batch-size", "32",
                                 "--amp", "bf16")
    assert config.amp == "bf16"
    # resuming it with --amp bf16 asks for what it is; --amp fp32 would change it
    assert main(["train", "--resume", str(out), "--amp", "bf16", "--data-root", str(data_root), "--no-progress"]) == 0
    assert main(["train", "--resume", str(out), "--amp", "fp32", "--data-root", str(data_root), "--no-progress"]) == 2


def test_bf16_on_a_cpu_without_bf16_instructions_warns(tmp_path, data_root, monkeypatch):
    monkeypatch.setattr(lipnet.training, "native_bf16", lambda device: False)
    with pytest.warns(RuntimeWarning, match="no native bf16"):
        config, _ = _train_one_epoch(tmp_path / "forced", data_root, "--dataset", "cifar10", "--limit", "32",
                                     "--batch-size", "32", "--amp", "bf16")
    assert config.amp == "bf16"


def test_native_bf16_answers_for_each_device_type(monkeypatch):
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux states the instructions oneDNN's answer rests on
        flags = set(cpuinfo.read_text().split())
        assert lipnet.training.native_bf16("cpu") == bool({"avx512_bf16", "amx_bf16"} & flags)
    assert lipnet.training.native_bf16("meta") is True

    def no_query():
        raise RuntimeError("no oneDNN")

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", no_query)
    assert lipnet.training.native_bf16("cpu") is True  # unknown: bf16 kept as asked


def test_the_gpu_scale_network_is_a_named_preset():
    assert "cifar10-gpu" in preset_names("cifar10") and "cifar10-gpu" not in preset_names("mnist")
    gpu = TrainConfig.from_preset("cifar10", preset="cifar10-gpu")
    cpu = TrainConfig.from_preset("cifar10")
    assert gpu.epochs == 100 and gpu.amp is None and "width" not in gpu.model_config  # width 64, blocks (2, 2, 2)
    assert gpu.model_config["parametrization"] == cpu.model_config["parametrization"] == "retraction"
    count = lambda c: sum(p.numel() for p in build_model(c.model, **c.model_config).parameters())  # noqa: E731
    assert count(gpu) > 3 * count(cpu)
    with pytest.raises(ValueError, match="known: \\['mnist'\\]"):
        TrainConfig.from_preset("mnist", preset="cifar10-gpu")
    with pytest.raises(ValueError, match="not a private preset"):
        TrainConfig.from_preset("cifar10", private=True, preset="cifar10-gpu")
    assert NAMED_PRESETS["cifar10-gpu"][0] == "cifar10"


def test_preset_option_names_its_dataset(tmp_path, data_root):
    config, _ = _train_one_epoch(tmp_path / "run", data_root, "--preset", "cifar10-gpu", "--limit", "16",
                                 "--batch-size", "16", "--width", "8")
    assert config.dataset == "cifar10" and config.epochs == 1 and config.lr == 1e-3 and config.amp is None
    assert config.model_config == {"parametrization": "retraction", "mean": (0.4914, 0.4822, 0.4465), "width": 8}


def test_block_option_swaps_the_residual_blocks_and_a_resumed_run_keeps_them(tmp_path, data_root, capsys):
    import lipnet.nn as ln

    out = tmp_path / "run"
    config, _ = _train_one_epoch(out, data_root, "--dataset", "cifar10", "--limit", "32", "--batch-size", "32",
                                 "--amp", "fp32", "--optimizer", "turbomuon", "--block", "sll")
    assert config.model_config["block"] == "sll"
    model, _, _ = load_checkpoint(out)
    assert sum(isinstance(m, ln.SLLBlock) for m in model) == 3
    assert not any(isinstance(m, ln.ConvexResidual) for m in model)
    common = ["--no-progress", "--data-root", str(data_root)]
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--block", "convex", *common]) == 2
    assert "--block convex (the run's: sll)" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--block", "sll", *common]) == 0


def test_block_option_is_refused_where_the_model_has_no_residual_blocks(tmp_path, data_root, capsys):
    assert main(["train", "--dataset", "mnist", "--epochs", "1", "--limit", "32", "--block", "sll", "--out",
                 str(tmp_path / "run"), "--data-root", str(data_root), "--no-progress"]) == 2
    assert "--block does not apply to mnist-convnet" in capsys.readouterr().err
