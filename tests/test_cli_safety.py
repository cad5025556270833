"""`lipnet` loses nothing and says what to do: locked and never silently overwritten run
directories, results written before plots, signals answered with the resume command, and bad
options refused before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lipnet.checkpoints import CHECKPOINT, CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from lipnet.cli import main
from lipnet.models import build_model
from lipnet.presets import TrainConfig
from lipnet.run_dir import claim_run_dir


def _train(out, data_root, *extra) -> list[str]:
    return ["train", "--dataset", "mnist", "--epochs", "1", "--limit", "64", "--width", "4", "--batch-size", "32",
            "--no-progress", "--out", str(out), "--data-root", str(data_root), *extra]


def test_a_second_run_on_the_same_directory_is_refused_while_the_first_holds_it(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    held = claim_run_dir(out)  # what a running `lipnet train --out run` holds
    try:
        assert main(_train(out, data_root)) == 2
        err = capsys.readouterr().err
        assert "in use by another lipnet train" in err and "pid" in err
        assert not (out / CHECKPOINT).exists()
    finally:
        held.release()
    assert main(_train(out, data_root)) == 0  # released (or its process gone): the directory is free


def test_an_earlier_run_is_not_overwritten_without_overwrite(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    assert main(_train(out, data_root)) == 0
    before = (out / CHECKPOINT).read_bytes()
    assert main(_train(out, data_root, "--seed", "1")) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (out / CHECKPOINT).read_bytes() == before
    (out / CHECKPOINT).unlink()  # a config.json alone is an earlier run too
    assert main(_train(out, data_root, "--seed", "1")) == 2
    assert main(_train(out, data_root, "--seed", "1", "--overwrite")) == 0
    assert read_checkpoint(out).config.seed == 1


def test_an_unwritable_out_is_found_before_any_data_is_read(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # the data root does not exist either: the directory check comes first, so no data is read
    assert main(_train(blocker / "run", tmp_path / "no-data")) == 2
    err = capsys.readouterr().err
    assert "cannot write to the output directory" in err and "a-file" in err


def test_certify_writes_its_json_even_where_the_plot_cannot_go(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    assert main(_train(out, data_root)) == 0
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = tmp_path / "cert.json"
    rc = main(["certify", "--checkpoint", str(out), "--eps", "0.5", "--limit", "50", "--pgd-steps", "0", "--json",
               str(result), "--plot", str(blocker / "plot.png"), "--data-root", str(data_root), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 2 and "cannot write the plot to" in captured.err and "Traceback" not in captured.err
    assert "certified" in captured.out  # the table was printed
    assert json.loads(result.read_text())["n"] == 50


def test_bad_numbers_are_refused_before_training(tmp_path, data_root, capsys):
    for extra, message in ((["--lr", "0"], "lr must be finite and > 0"), (["--lr", "nan"], "lr"),
                           (["--batch-size", "0"], "batch_size"), (["--offset", "-1"], "offset")):
        assert main(_train(tmp_path / "x", data_root, *extra)) == 2
        assert message in capsys.readouterr().err
    assert main(_train(tmp_path / "run", data_root)) == 0
    rc = main(["certify", "--checkpoint", str(tmp_path / "run"), "--eps", "0.5", "--pgd-steps", "-1",
               "--data-root", str(data_root), "--no-progress"])
    assert rc == 2 and "pgd_steps must be a non-negative int" in capsys.readouterr().err


def test_a_crafted_model_config_is_refused_before_it_allocates(tmp_path):
    config = TrainConfig.from_preset("mnist", model_config={"mean": (0.1307,), "width": 4})
    model = build_model(config.model, **config.model_config)
    save_checkpoint(tmp_path, model, config)
    load_checkpoint(tmp_path)  # the honest file loads
    for key, value in (("hidden", 10**9), ("num_classes", 10**8), ("width", 10**7)):
        crafted = TrainConfig.from_preset("mnist", model_config={"mean": (0.1307,), "width": 4, key: value})
        save_checkpoint(tmp_path, model, crafted)
        start = time.perf_counter()
        with pytest.raises(CheckpointError, match=f"{key}={value} cannot describe the stored weights"):
            load_checkpoint(tmp_path)
        assert time.perf_counter() - start < 5


@pytest.mark.parametrize("sig,code,name", [(signal.SIGINT, 130, "interrupt"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_prints_the_last_checkpoint_and_the_resume_command(tmp_path, data_root, sig, code, name):
    out = tmp_path / "run"
    slow_train = os.path.join(os.path.dirname(__file__), "slow_train.py")  # late training batches
    argv = [sys.executable, slow_train, "train", "--dataset", "mnist", "--epochs", "3", "--limit", "128",
            "--width", "4", "--batch-size", "32", "--no-progress", "--out", str(out), "--data-root", str(data_root)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLOW_TRAIN_DELAY": "0.3"}
    # a run started from a background job inherits SIGINT ignored, so Python would install no
    # KeyboardInterrupt handler: give the child the default disposition a terminal gives it
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while not (out / "config.json").is_file():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert f"stopped by {name}" in line and f"{out / CHECKPOINT} (epoch 1)" in line
    assert f"lipnet train --resume {out}" in line
    assert read_checkpoint(out).epoch == 1


def test_training_refuses_labels_the_model_has_no_class_for():
    from lipnet.nn import LipschitzCrossEntropy
    from lipnet.training import train_epoch

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    batches = [(torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 2, 3, 1]))]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        train_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), LipschitzCrossEntropy(),
                    progress=False)
