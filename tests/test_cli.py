"""The `lipnet` command end to end on a tiny subset: train -> checkpoint -> certify (table, JSON, PNG)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from lipnet.cli import main
from lipnet.nn import Scattering2d
from lipnet.training import TrainConfig, load_checkpoint


def test_train_then_certify(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "mnist", "--epochs", "1", "--limit", "300", "--width", "4",
               "--out", str(out), "--data-root", str(data_root), "--no-progress"])
    assert rc == 0
    assert (out / "checkpoint.pt").is_file() and (out / "config.json").is_file()
    model, config, history = load_checkpoint(out)
    assert config.dataset == "mnist" and config.model_config["width"] == 4 and len(history) == 1
    assert "clean" in capsys.readouterr().out
    result = tmp_path / "cert.json"
    rc = main(["certify", "--checkpoint", str(out), "--eps", "0.5", "1.0", "--limit", "200", "--pgd-steps", "3",
               "--json", str(result), "--data-root", str(data_root), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "certified" in text and "sound upper bound" in text and "PGD-3" in text
    res = json.loads(result.read_text())
    assert res["dataset"] == "mnist" and res["n"] == 200
    assert set(res["certified"]) == {"0.5", "1.0"} and set(res["pgd"]) == {"0.5", "1.0"}
    assert res["lipschitz_lower"] <= res["lipschitz_bound"] <= 1.001
    for eps in ("0.5", "1.0"):
        assert res["certified"][eps] <= res["pgd"][eps] <= res["clean"]
    assert (out / "certified.png").stat().st_size > 1000


def test_errors_are_clear(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LIPNET_DATA", raising=False)
    rc = main(["train", "--dataset", "mnist", "--epochs", "1", "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--data-root" in err and "LIPNET_DATA" in err
    rc = main(["certify", "--checkpoint", str(tmp_path / "nothing")])
    assert rc == 2 and "no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "imagenet", "--out", str(tmp_path)])


def test_console_script_is_installed():
    exe = shutil.which("lipnet", path=os.path.dirname(sys.executable)) or shutil.which("lipnet")
    assert exe, "the `lipnet` console script is not installed (pip install -e .)"
    res = subprocess.run([exe, "certify", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--eps" in res.stdout


def test_example_runs(tmp_path, data_root):
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "certified_mnist.py")
    plot = tmp_path / "cert.png"
    res = subprocess.run([sys.executable, example, "--data-root", str(data_root), "--epochs", "1", "--limit", "200",
                          "--plot", str(plot)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "sound bound" in res.stdout and "certified" in res.stdout and plot.stat().st_size > 1000


def test_conformal_command(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "mnist", "--epochs", "1", "--limit", "400", "--width", "4",
                 "--out", str(out), "--data-root", str(data_root), "--no-progress"]) == 0
    result = tmp_path / "conformal.json"
    rc = main(["conformal", "--checkpoint", str(out), "--alpha", "0.2", "--eps", "0", "0.3", "--limit", "300",
               "--pgd-steps", "3", "--pgd-points", "60", "--json", str(result), "--data-root", str(data_root),
               "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "robust size" in text and "vanilla guaranteed" in text
    res = json.loads(result.read_text())
    assert res["n_calibration"] == 150 and res["n_test"] == 150 and len(res["rows"]) == 2
    zero, attacked = res["rows"]
    assert zero["robust_size"] == zero["vanilla_size"] and zero["robust_coverage"] == zero["vanilla_coverage"]
    assert attacked["robust_size"] >= zero["vanilla_size"] and attacked["robust_coverage"] >= zero["vanilla_coverage"]
    assert attacked["vanilla_coverage_bound"] <= zero["vanilla_coverage_bound"] <= 1
    assert (out / "conformal.png").stat().st_size > 1000
    assert main(["conformal", "--checkpoint", str(out), "--alpha", "1.5", "--limit", "300",
                 "--data-root", str(data_root), "--no-progress"]) == 2
    assert "alpha" in capsys.readouterr().err
    # 20 calibration points cannot give a finite quantile at alpha = 0.01 (needs 99)
    assert main(["conformal", "--checkpoint", str(out), "--alpha", "0.01", "--limit", "40",
                 "--data-root", str(data_root), "--no-progress"]) == 2
    assert "need n >= 99" in capsys.readouterr().err


def test_robust_conformal_example_runs(tmp_path, data_root):
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "robust_conformal.py")
    plot = tmp_path / "rcp.png"
    res = subprocess.run([sys.executable, example, "--data-root", str(data_root), "--limit", "300",
                          "--alpha", "0.2", "--plot", str(plot)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "robust sets size" in res.stdout and "guaranteed" in res.stdout and plot.stat().st_size > 1000


def test_train_with_two_processes(tmp_path, data_root, capsys):
    out = tmp_path / "ddp"
    rc = main(["train", "--dataset", "mnist", "--epochs", "1", "--limit", "256", "--width", "4", "--batch-size", "64",
               "--nproc", "2", "--out", str(out), "--data-root", str(data_root), "--no-progress"])
    assert rc == 0 and (out / "checkpoint.pt").is_file()
    model, config, history = load_checkpoint(out)
    assert len(history) == 1 and config.batch_size == 64
    assert main(["train", "--dataset", "mnist", "--epochs", "1", "--limit", "64", "--batch-size", "63", "--nproc", "2",
                 "--out", str(tmp_path / "bad"), "--data-root", str(data_root), "--no-progress"]) == 2
    assert "divisible" in capsys.readouterr().err


def test_train_dp_reports_epsilon_per_epoch(tmp_path, data_root, capsys):
    out = tmp_path / "dp"
    assert main(["train", "--dataset", "mnist", "--dp", "--epsilon", "2.0", "--delta", "1e-4", "--epochs", "2",
                 "--limit", "400", "--batch-size", "100", "--out", str(out), "--data-root",
                 str(data_root), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "private training of scatter-net" in text and "frozen prefix computed once" in text
    spent = [float(m) for m in re.findall(r"eps spent ([0-9.]+)", text)]
    assert len(spent) == 2 and 0 < spent[0] < spent[1] <= 2.0 + 0.011
    assert "-DP after 8 steps" in text
    model, config, history = load_checkpoint(out)
    assert config.model == "scatter-net" and isinstance(model[2], Scattering2d)
    assert config.dp["epsilon"] == 2.0 and config.dp["epsilon_spent"] == pytest.approx(spent[1], abs=1e-3)
    assert [h["epsilon"] for h in history] == pytest.approx(spent, abs=1e-3)


def test_train_dp_loss_clip_calibrates_the_noise_to_the_clip(tmp_path, data_root, capsys):
    out = tmp_path / "dpclip"
    assert main(["train", "--dataset", "mnist", "--dp", "--epsilon", "2.0", "--delta", "1e-4", "--epochs", "1",
                 "--limit", "400", "--batch-size", "100", "--loss-clip", "0.2", "--out", str(out), "--data-root",
                 str(data_root), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"loss Lipschitz 0\.2\b", text)
    sensitivity = float(re.findall(r"C=([0-9.e+-]+)", text)[0])
    _, config, _ = load_checkpoint(out)
    assert config.dp["loss_clip"] == 0.2
    # one linear head on scattering features of norm <= 8: C = 8 * 0.2 (not 8 * sqrt(2)), up to BOUND_MARGIN
    assert sensitivity == pytest.approx(8 * 0.2, rel=2e-3)


def test_cifar10_private_default_is_the_measured_scatter_recipe():
    import torch

    from lipnet.models import build_model
    from lipnet.nn import ClippedLossGradient, LipschitzCrossEntropy
    from lipnet.privacy import gradient_norm_bounds, split_frozen_prefix

    config = TrainConfig.from_preset("cifar10", private=True)
    assert config.model == "scatter-net" and (config.lr, config.temperature, config.offset) == (1.0, 1.0, 0.0)
    assert config.dp["loss_clip"] == 0.25
    model = build_model(config.model, **config.model_config)
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    # raw pixels in [0, 1]^3072 lie in the input ball (the trainer's projection is a no-op) and the
    # scattering is the frozen prefix: only the linear head is trained, with a finite bound
    assert config.dp["input_bound"] >= x[0].numel() ** 0.5
    prefix, head = split_frozen_prefix(model)
    assert isinstance(prefix[2], Scattering2d) and len(head) == 1
    loss = ClippedLossGradient(LipschitzCrossEntropy(config.temperature, config.offset), config.dp["loss_clip"])
    report = gradient_norm_bounds(model, config.dp["input_bound"], loss, (3, 32, 32))
    assert set(report.as_dict()) == {"4.weight", "4.bias"} and 0 < report.total < float("inf")


def test_train_dp_errors(tmp_path, data_root, capsys):
    base = ["train", "--dataset", "mnist", "--out", str(tmp_path / "x"), "--data-root", str(data_root), "--limit", "200",
            "--batch-size", "50"]
    for extra, message in ((["--dp"], "--dp needs --epsilon"),
                           (["--dp", "--epsilon", "1", "--delta", "0.01", "--no-progress"], "1/n"),
                           (["--dp", "--epsilon", "0", "--no-progress"], "target_epsilon"),
                           (["--dp", "--epsilon", "1", "--batch-size", "500"], "training set"),
                           (["--epsilon", "1"], "only meaningful with --dp"),
                           (["--dp", "--epsilon", "1", "--loss-clip", "-1"], "--loss-clip must be >= 0"),
                           (["--dp", "--epsilon", "1", "--width", "4"], "--width does not apply to scatter-net")):
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_train_dp_with_two_processes(tmp_path, data_root, capsys):
    out = tmp_path / "dp2"
    assert main(["train", "--dataset", "mnist", "--dp", "--epsilon", "3.0", "--delta", "1e-4", "--epochs", "1",
                 "--limit", "400", "--batch-size", "100", "--model", "mnist-convnet", "--width", "2", "--nproc", "2",
                 "--out", str(out),
                 "--data-root", str(data_root), "--no-progress"]) == 0
    model, config, history = load_checkpoint(out)
    assert len(history) == 1 and 0 < config.dp["epsilon_spent"] <= 3.0 + 0.011 and history[0]["steps"] == 4
    assert config.model == "mnist-convnet" and config.dp["trainable"] == "dense" and config.model_config["width"] == 2


def test_dp_example_runs(tmp_path, data_root):
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "dp_mnist.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, example, "--data-root", str(data_root), "--epochs", "1", "--limit", "300",
                          "--batch-size", "100", "--delta", "1e-4"], capture_output=True, text=True, timeout=300,
                         env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "privacy report: (" in res.stdout and "-DP" in res.stdout
