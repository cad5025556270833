"""benchmarks/gpu_check.py cannot rot: its --device cpu --quick run (the same code on tiny shapes)
completes every section and writes its JSON and Markdown."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_the_quick_cpu_run_completes_every_section(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (json_file,) = tmp_path.glob("gpu_*.json")
    result = json.loads(json_file.read_text())
    for name in ("core", "optimizer", "train_step", "soundness", "epoch_time"):
        assert "error" not in result[name], (name, result[name].get("traceback"))
    assert {r["method"] for r in result["core"]["rows"]} == {"ns5", "turbo", "turbo-bf16", "convergent", "orthogonium"}
    assert all(r["max_sigma_error"] < 1e-3 for r in result["core"]["rows"] if r["method"] == "convergent")
    sound = result["soundness"]
    assert sound["bound_below_svd_norm"] == 0 and sound["pgd_flips_below_device_radius"] == 0 and sound["ok"]
    assert {r["preset"] for r in result["epoch_time"]["rows"]} == {"cifar10", "cifar10-gpu"}
    assert json_file.with_suffix(".md").read_text().startswith("# GPU check: cpu")


def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    def broken(*args):
        raise RuntimeError("simulated CUDA-only failure")

    monkeypatch.setattr(gpu_check, "optimizer", broken)
    code = gpu_check.main(["--device", "cpu", "--quick", "--out-dir", str(tmp_path), "--sections", "core", "optimizer"])
    result = json.loads(next(tmp_path.glob("gpu_*.json")).read_text())
    assert code == 1 and "simulated CUDA-only failure" in result["optimizer"]["error"]
    assert "error" not in result["core"] and result["core"]["rows"]
    assert "failed" in next(tmp_path.glob("gpu_*.md")).read_text()
