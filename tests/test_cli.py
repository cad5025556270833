"""The `lipnet` command end to end on a tiny subset: train -> checkpoint -> certify (table, JSON, PNG)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lipnet import data as lipdata
from lipnet.cli import main
from lipnet.models import build_model
from lipnet.nn import GroupNormalization, Scattering2d
from lipnet.checkpoints import CHECKPOINT, load_checkpoint, read_checkpoint, save_checkpoint
from lipnet.presets import TrainConfig
from lipnet.training import fit


def test_train_then_certify(tmp_path, data_root, capsys, lipnet_cli):
    out = tmp_path / "run"
    rc = lipnet_cli("train", "--dataset", "mnist", "--epochs", "1", "--limit", "300", "--width", "4",
               "--out", str(out))
    assert rc == 0
    assert (out / "checkpoint.pt").is_file() and (out / "config.json").is_file()
    model, config, history = load_checkpoint(out)
    assert config.dataset == "mnist" and config.model_config["width"] == 4 and len(history) == 1
    assert "clean" in capsys.readouterr().out
    result = tmp_path / "cert.json"
    rc = lipnet_cli("certify", "--checkpoint", str(out), "--eps", "0.5", "1.0", "--limit", "200", "--pgd-steps", "3",
               "--json", str(result))
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
    monkeypatch.setenv("LIPNET_CACHE", str(tmp_path / "cache"))  # an empty default data root
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


def test_conformal_command(tmp_path, data_root, capsys, lipnet_cli):
    out = tmp_path / "run"
    assert lipnet_cli("train", "--dataset", "mnist", "--epochs", "1", "--limit", "400", "--width", "4",
                 "--out", str(out)) == 0
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


def test_train_with_two_processes(tmp_path, data_root, capsys, lipnet_cli):
    out = tmp_path / "ddp"
    rc = lipnet_cli("train", "--dataset", "mnist", "--epochs", "1", "--limit", "256", "--width", "4", "--batch-size", "64",
               "--nproc", "2", "--out", str(out))
    assert rc == 0 and (out / "checkpoint.pt").is_file()
    model, config, history = load_checkpoint(out)
    assert len(history) == 1 and config.batch_size == 64
    # rank 0 wrote every rank's random streams (the augmentation generators are seeded per rank)
    training = read_checkpoint(out).training
    assert training["world_size"] == 2 and all(len(training["rng"][s]) == 2 for s in ("torch", "augment", "loader"))
    assert not torch.equal(*training["rng"]["augment"])
    common = ["--no-progress", "--data-root", str(data_root)]
    assert main(["train", "--resume", str(out), *common]) == 2
    assert "resume it with --nproc 2" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--nproc", "2", *common]) == 0
    assert "all 1 epochs are done" in capsys.readouterr().out
    assert lipnet_cli("train", "--dataset", "mnist", "--epochs", "1", "--limit", "64", "--batch-size", "63", "--nproc", "2",
                 "--out", str(tmp_path / "bad")) == 2
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
    assert config.privacy.epsilon == 2.0 and config.privacy.delta == 1e-4
    assert config.optimizer == "sgd" and config.privacy.momentum == 0.9   # what the run trained with
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
    assert config.privacy.loss_clip == 0.2
    # one linear head on scattering features of norm <= 8: C = 8 * 0.2 (not 8 * sqrt(2)), up to BOUND_MARGIN
    assert sensitivity == pytest.approx(8 * 0.2, rel=2e-3)


def test_cifar10_private_default_is_the_measured_scatter_recipe():
    import torch

    from lipnet.models import build_model
    from lipnet.nn import ClippedLossGradient, LipschitzCrossEntropy
    from lipnet.privacy import gradient_norm_bounds, split_frozen_prefix

    config = TrainConfig.from_preset("cifar10", private=True, privacy={"epsilon": 3.0})
    assert config.model == "scatter-net" and (config.lr, config.temperature, config.offset) == (0.00625, 1.0, 0.0)
    assert (config.batch_size, config.epochs, config.model_config["norm_groups"]) == (8192, 60, 81)
    assert config.privacy.loss_clip == 0.25 and not config.privacy.freeze_bias and config.privacy.noise == "global"
    model = build_model(config.model, **config.model_config)
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    # raw pixels in [0, 1]^3072 lie in the input ball (the trainer's projection is a no-op) and the
    # scattering and its group normalization are the frozen prefix: only the linear head is trained, and
    # its bound is the data-independent clip * sqrt(features + 1) (every feature vector has norm <= sqrt(15552))
    assert config.privacy.input_bound >= x[0].numel() ** 0.5
    prefix, head = split_frozen_prefix(model)
    assert isinstance(prefix[2], Scattering2d) and isinstance(prefix[3], GroupNormalization) and len(head) == 1
    loss = ClippedLossGradient(LipschitzCrossEntropy(config.temperature, config.offset), config.privacy.loss_clip)
    report = gradient_norm_bounds(model, config.privacy.input_bound, loss, (3, 32, 32))
    assert set(report.as_dict()) == {"5.weight", "5.bias"}
    assert report.total == pytest.approx(0.25 * (15552 + 1) ** 0.5, rel=2e-4)


def test_train_dp_errors(tmp_path, data_root, capsys):
    base = ["train", "--dataset", "mnist", "--out", str(tmp_path / "x"), "--data-root", str(data_root), "--limit", "200",
            "--batch-size", "50"]
    for extra, message in ((["--dp"], "--dp needs --epsilon"),
                           (["--dp", "--epsilon", "1", "--delta", "0.01", "--no-progress"], "1/n"),
                           (["--dp", "--epsilon", "0", "--no-progress"], "epsilon must be"),
                           (["--dp", "--epsilon", "1", "--batch-size", "500"], "training set"),
                           (["--epsilon", "1"], "need private training (--dp)"),
                           (["--dp", "--epsilon", "1", "--loss-clip", "-1"], "loss_clip must be"),
                           (["--dp", "--epsilon", "1", "--amp", "bf16"], "not supported with private training"),
                           (["--dp", "--epsilon", "1", "--optimizer", "turbomuon"], "private training trains with"),
                           (["--dp", "--epsilon", "1", "--holdout", "50"], "holdout is not available"),
                           (["--accountant", "prv"], "need private training"),
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
    assert len(history) == 1 and 0 < history[-1]["epsilon"] <= 3.0 + 0.011 and history[0]["steps"] == 4
    assert config.model == "mnist-convnet" and config.privacy.trainable == "dense" and config.model_config["width"] == 2


def test_dp_example_runs(tmp_path, data_root):
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "dp_mnist.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, example, "--data-root", str(data_root), "--epochs", "1", "--limit", "300",
                          "--batch-size", "100", "--delta", "1e-4"], capture_output=True, text=True, timeout=300,
                         env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "privacy report: (" in res.stdout and "-DP" in res.stdout


# --------------------------------------------------------------------------- resumable runs, --amp
SLOW_TRAIN = os.path.join(os.path.dirname(__file__), "slow_train.py")  # lipnet with late training batches


def _train_argv(out, data_root, *extra, slow: bool = False) -> list[str]:
    return [sys.executable, *([SLOW_TRAIN] if slow else ["-m", "lipnet.cli"]), "train", "--dataset", "mnist", "--epochs", "3", "--limit", "256",
            "--width", "4", "--batch-size", "32", "--no-progress", "--out", str(out), "--data-root", str(data_root),
            *extra]


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _checkpointed_epoch(folder) -> int:
    return read_checkpoint(folder).epoch if (folder / CHECKPOINT).is_file() else 0


def _kill_in_epoch_two(proc: subprocess.Popen, folder) -> None:
    """SIGKILL ``proc`` 0.6 s after its checkpoint of epoch 1 appears in ``folder`` (with 0.25 s late
    batches, inside epoch 2); the process is never left running."""
    try:
        deadline = time.monotonic() + 240
        while _checkpointed_epoch(folder) < 1:  # every poll also reads a checkpoint that is being rewritten
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint after epoch 1"
            time.sleep(0.05)
        time.sleep(0.6)
        assert proc.poll() is None, "the run was not killed mid-epoch: it had already ended"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path, data_root):
    a, b = tmp_path / "A", tmp_path / "B"
    done = subprocess.run(_train_argv(a, data_root), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # 8 steps per epoch, each handed its batch 0.25 s late (tests/slow_train.py): epoch 2 lasts > 2 s,
    # so the kill 0.6 s after epoch 1's checkpoint lands inside it
    proc = subprocess.Popen(_train_argv(b, data_root, slow=True), env=_env(SLOW_TRAIN_DELAY="0.25"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _kill_in_epoch_two(proc, b)
    assert proc.returncode == -signal.SIGKILL
    killed = read_checkpoint(b)  # what the kill left is complete: it loads, with epoch 1's state
    assert killed.epoch == 1 and killed.resumable and [r["epoch"] for r in killed.history] == [1]
    assert sorted(p.name for p in b.iterdir()) == [".lipnet.lock", "checkpoint.pt", "config.json"]  # no temporary file
    assert json.loads((b / "config.json").read_text())["epoch"] == 1

    resumed = subprocess.run([sys.executable, "-m", "lipnet.cli", "train", "--resume", str(b), "--no-progress",
                              "--data-root", str(data_root)], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after epoch 1/3" in resumed.stdout and re.findall(r"^epoch (\d)/3", resumed.stdout, re.M) == ["2", "3"]
    full, final = read_checkpoint(a), read_checkpoint(b)
    assert final.epoch == full.epoch == 3 and final.config == full.config
    assert final.state_dict.keys() == full.state_dict.keys()
    for name, tensor in full.state_dict.items():
        torch.testing.assert_close(final.state_dict[name], tensor, msg=lambda m, name=name: f"{name}: {m}")
    assert [r["loss"] for r in final.history] == pytest.approx([r["loss"] for r in full.history], rel=1e-5)
    for stream in ("torch", "augment", "loader"):  # the runs end in the same random state too
        assert all(torch.equal(x, y) for x, y in zip(final.training["rng"][stream], full.training["rng"][stream]))
    # the resumed run's checkpoint serves certify / conformal like any other
    model, config, history = load_checkpoint(b)
    assert config.epochs == 3 and len(history) == 3 and not model.training


def test_a_private_run_killed_mid_epoch_resumes_to_the_same_weights_and_epsilon(tmp_path, data_root):
    """The accountant's history, the Poisson-sampling and noise generators and the optimizer are
    checkpointed with the weights: the resumed run spends exactly the uninterrupted run's epsilon and
    ends with its weights (a noise generator restarted from its seed would give other weights)."""
    a, b = tmp_path / "A", tmp_path / "B"

    def argv(out, slow=False):
        return [sys.executable, *([SLOW_TRAIN] if slow else ["-m", "lipnet.cli"]), "train", "--dataset", "mnist",
                "--dp", "--epsilon", "2.0", "--delta", "1e-4", "--epochs", "3", "--limit", "256", "--batch-size", "32",
                "--no-progress", "--out", str(out), "--data-root", str(data_root)]
    env = _env(LIPNET_CACHE=str(tmp_path / "cache"))  # the scattering features are cached there once
    done = subprocess.run(argv(a), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((tmp_path / "cache" / "features").glob("frozen-*.pt"))
    proc = subprocess.Popen(argv(b, slow=True), env={**env, "SLOW_TRAIN_DELAY": "0.25"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _kill_in_epoch_two(proc, b)
    killed = read_checkpoint(b)
    assert killed.epoch == 1 and killed.resumable and killed.training["private"]["steps"] == 8
    resumed = subprocess.run([sys.executable, "-m", "lipnet.cli", "train", "--resume", str(b), "--no-progress",
                              "--data-root", str(data_root)], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after epoch 1/3" in resumed.stdout and re.findall(r"^epoch (\d)/3", resumed.stdout, re.M) == ["2", "3"]
    full, final = read_checkpoint(a), read_checkpoint(b)
    assert final.epoch == full.epoch == 3 and final.config == full.config
    for name, tensor in full.state_dict.items():
        torch.testing.assert_close(final.state_dict[name], tensor, msg=lambda m, name=name: f"{name}: {m}")
    assert [r["epsilon"] for r in final.history] == [r["epsilon"] for r in full.history]
    assert final.history[-1]["epsilon"] == pytest.approx(2.0, abs=0.05)
    assert final.training["private"]["accountant"] == full.training["private"]["accountant"]
    # a resume that changes the budget is refused before anything runs
    assert main(["train", "--resume", str(b), "--epochs", "4", "--epsilon", "3", "--data-root", str(data_root),
                 "--no-progress"]) == 2


def test_a_two_process_run_resumes_to_the_same_weights(tmp_path, data_root, lipnet_cli):
    """--nproc 2: rank 0 checkpoints every rank's random streams; resuming epoch 1's checkpoint with
    2 processes ends where the uninterrupted run does."""
    run, copy = tmp_path / "run", tmp_path / "copy"
    argv = [sys.executable, SLOW_TRAIN, "train", "--dataset", "mnist", "--epochs", "2", "--limit", "128",
            "--width", "2", "--batch-size", "32", "--nproc", "2", "--no-progress", "--out", str(run),
            "--data-root", str(data_root)]
    # 4 steps per epoch, 0.3 s late each (tests/slow_train.py): epoch 1's checkpoint stays current for > 1 s
    proc = subprocess.Popen(argv, env=_env(SLOW_TRAIN_DELAY="0.3"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while _checkpointed_epoch(run) < 1:
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint after epoch 1"
            time.sleep(0.05)
        copy.mkdir()
        shutil.copy(run / CHECKPOINT, copy / CHECKPOINT)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert read_checkpoint(copy).epoch == 1
    assert lipnet_cli("train", "--resume", str(copy), "--nproc", "2") == 0
    full, resumed = read_checkpoint(run), read_checkpoint(copy)
    assert resumed.epoch == full.epoch == 2 and resumed.training["world_size"] == 2
    for name, tensor in full.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[name], tensor, msg=lambda m, name=name: f"{name}: {m}")


def test_resume_keeps_the_run_configuration(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    common = ["--no-progress", "--data-root", str(data_root)]
    assert main(["train", "--dataset", "mnist", "--epochs", "1", "--limit", "64", "--width", "2", "--batch-size",
                 "32", "--out", str(out), *common]) == 0
    capsys.readouterr()
    assert read_checkpoint(out).resumable
    # finished: nothing to do; options equal to the run's are accepted
    for extra in ([], ["--dataset", "mnist", "--epochs", "1", "--width", "2", "--seed", "0", "--device", "cpu"]):
        assert main(["train", "--resume", str(out), *extra, *common]) == 0
        assert "all 1 epochs are done" in capsys.readouterr().out
    for extra, message in ((["--lr", "0.5"], "--lr 0.5 (the run's: 0.002) would change the run"),
                           (["--epochs", "5", "--width", "8"], "--epochs 5 (the run's: 1), --width 8 (the run's: 2)"),
                           (["--amp", "bf16"], "--amp bf16 (the run's: None)"),
                           (["--nproc", "2"], "trained by 1 process(es); resume it with --nproc 1"),
                           (["--dp", "--epsilon", "1"], "--dp (the run is not private) would change the run")):
        assert main(["train", "--resume", str(out), *extra, *common]) == 2
        assert message in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing"), *common]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    # a private run's checkpoint without its trainer state, and a weights-only one, cannot be resumed
    private = TrainConfig.from_preset("mnist", private=True, privacy={"epsilon": 1.0, "delta": 1e-5})
    save_checkpoint(tmp_path / "dp", build_model("mnist-convnet", width=2, hidden=16), private)
    assert main(["train", "--resume", str(tmp_path / "dp"), *common]) == 2
    assert "holds weights only" in capsys.readouterr().err
    model, config, history = load_checkpoint(out)
    save_checkpoint(tmp_path / "weights", model, config, history)
    assert main(["train", "--resume", str(tmp_path / "weights"), *common]) == 2
    assert "holds weights only" in capsys.readouterr().err
    # without --resume, --dataset and --out stay required
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "mnist", *common])
    assert "--out required" in capsys.readouterr().err


def test_train_with_bf16_autocast(tmp_path, data_root, capsys):
    """Depends on the layers being autocast-safe (lipnet/nn, lipnet/ortho under torch.autocast)."""
    out = tmp_path / "amp"
    common = ["--dataset", "mnist", "--epochs", "1", "--limit", "128", "--width", "4", "--data-root", str(data_root),
              "--no-progress"]
    assert main(["train", *common, "--amp", "bf16", "--out", str(out)]) == 0
    assert "with bf16 autocast" in capsys.readouterr().out
    ckpt = read_checkpoint(out)
    assert ckpt.config.amp == "bf16" and ckpt.resumable
    assert all(t.dtype == torch.float32 for t in ckpt.state_dict.values() if t.is_floating_point())
    assert 0 < ckpt.history[0]["lipschitz_bound"] <= 1.001
    assert main(["train", *common, "--amp", "fp16", "--out", str(tmp_path / "fp16")]) == 2
    assert "--amp fp16 needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "fp16").exists()


def test_amp_runs_the_training_forward_under_autocast_and_evaluation_in_fp32(data_root):
    """Depends on the layers being autocast-safe (lipnet/nn, lipnet/ortho under torch.autocast)."""
    config = TrainConfig.from_preset("mnist", epochs=1, batch_size=32, limit=64, amp="bf16",
                                     model_overrides={"width": 2, "hidden": 16})
    torch.manual_seed(0)
    model = build_model(config.model, **config.model_config)
    seen = []
    model[-1].register_forward_hook(lambda module, inputs, output: seen.append((module.training, output.dtype)))
    train = lipdata.load_dataset("mnist", "train", data_root, limit=64, progress=False)
    test = lipdata.load_dataset("mnist", "test", data_root, limit=64, progress=False)
    history = fit(model, lipdata.BatchLoader(train, 32, shuffle=True), lipdata.BatchLoader(test, 32), config,
                  progress=False, log=lambda _: None)
    assert len(history) == 1
    assert {dtype for training, dtype in seen if training} == {torch.bfloat16}
    assert {dtype for training, dtype in seen if not training} == {torch.float32}


def test_train_parametrization_option(tmp_path, data_root, lipnet_cli):
    from lipnet.nn.parametrizations import CoreOrthogonalizer

    out = tmp_path / "polar"
    assert lipnet_cli("train", "--dataset", "mnist", "--epochs", "1", "--limit", "64", "--width", "2", "--batch-size", "32",
                 "--parametrization", "polar", "--out", str(out)) == 0
    model, config, _ = load_checkpoint(out)
    assert config.model_config["parametrization"] == "polar"
    kinds = {m.parametrization for m in model.modules() if isinstance(m, CoreOrthogonalizer)}
    assert kinds == {"polar"}
    # a resumed run keeps it: asking for the other one is refused
    assert main(["train", "--resume", str(out), "--parametrization", "retraction", "--no-progress",
                 "--data-root", str(data_root)]) == 2


def test_train_with_a_holdout_evaluates_on_training_images_left_out(tmp_path, data_root, capsys, lipnet_cli):
    from lipnet import data as lipdata
    out = tmp_path / "held"
    rc = lipnet_cli("train", "--dataset", "mnist", "--epochs", "1", "--limit", "300", "--holdout", "100", "--width", "4",
               "--out", str(out))
    assert rc == 0
    assert "200 train / 100 held-out train" in capsys.readouterr().out
    model, config, history = load_checkpoint(out)
    assert config.holdout == 100 and len(history) == 1
    train = lipdata.load_dataset("mnist", "train", data_root, limit=300, progress=False)
    fit_part, held = lipdata.holdout_split(train, 100)
    assert len(fit_part) == 200 and len(held) == 100
    rows = {tuple(r) for r in fit_part.images.flatten(1).tolist()}
    assert not any(tuple(r) in rows for r in held.images.flatten(1).tolist())  # disjoint
    with torch.no_grad():  # the reported clean accuracy is the held-out one
        clean = (model(held.images.float() / 255).argmax(1) == held.labels).double().mean().item()
    assert history[0]["clean"] == pytest.approx(clean, abs=1e-9)
    common = ["--no-progress", "--data-root", str(data_root)]
    assert main(["train", "--resume", str(out), "--holdout", "50", *common]) == 2
    assert "--holdout 50" in capsys.readouterr().err
    assert main(["train", "--dataset", "mnist", "--holdout", "300", "--limit", "300", "--out", str(tmp_path / "x"),
                 *common]) == 2
    assert "no training examples" in capsys.readouterr().err
    assert main(["train", "--dataset", "mnist", "--dp", "--epsilon", "1", "--holdout", "10", "--out",
                 str(tmp_path / "y"), *common]) == 2
    assert "holdout is not available with private training" in capsys.readouterr().err


def test_version_help_and_hints(tmp_path, capsys, lipnet_cli):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert capsys.readouterr().out.strip() == f"lipnet {version}"
    with pytest.raises(SystemExit):
        main(["certify", "--help"])
    assert "./certified-NAME.png" in " ".join(capsys.readouterr().out.split())  # the default plot path
    # a private run on a --limit smaller than the preset's expected batch says which option to pass
    assert lipnet_cli("train", "--dataset", "mnist", "--dp", "--epsilon", "1", "--limit", "100",
                      "--out", tmp_path / "dp") == 2
    assert "pass a --batch-size of at most 100" in capsys.readouterr().err


def test_reports_print_without_their_tensors(tmp_path):
    from lipnet.certify import CertificationReport

    report = CertificationReport(n=3, clean=1.0, certified={0.5: 1.0}, lipschitz_bound=1.0,
                                 radii=torch.arange(3.0))
    assert "radii" not in repr(report) and "certified={0.5: 1.0}" in repr(report)
    config = TrainConfig.from_preset("mnist", epochs=1, limit=8, model_overrides={"width": 2, "hidden": 4})
    save_checkpoint(tmp_path, build_model(config.model, **config.model_config), config, [{"epoch": 1}])
    assert "tensor" not in repr(read_checkpoint(tmp_path))
