"""The migration examples rebuild deel-torchlip's and orthogonium's networks from lipnet names,
train them briefly and certify them (docs/migration.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _run(name: str, *args: str) -> str:
    res = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_port_torchlip_trains_with_hkr_certifies_and_exports(data_root):
    out = _run("port_torchlip.py", "--data-root", str(data_root), "--epochs", "1", "--limit", "300")
    bound = float(re.search(r"sound bound ([0-9.]+)", out).group(1))
    assert bound <= 1 + 1e-4 and "certified at eps=0.5" in out
    assert "exported model agrees: True" in out


def test_port_orthogonium_trains_and_certifies_on_cifar10(data_root):
    out = _run("port_orthogonium.py", "--data-root", str(data_root), "--epochs", "1", "--limit", "128",
               "--width", "4")
    bound = float(re.search(r"sound Lipschitz bound ([0-9.]+)", out).group(1))
    assert bound <= 1 + 1e-4 and "certified (VRA) at eps=36/255" in out
