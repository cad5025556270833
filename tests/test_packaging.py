"""certify/ and privacy/ install as lipnet.certify / lipnet.privacy, never as top-level modules."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import lipnet

REPO = Path(__file__).resolve().parents[1]


def test_installed_mapping_resolves_to_the_repository_folders(tmp_path):
    # Run from an unrelated folder so the repository root is not on sys.path: only the installed
    # (editable, in CI) mapping can resolve these names.
    probe = (
        "import importlib.util, json, lipnet.certify, lipnet.privacy, lipnet.ortho;"
        "print(json.dumps({'certify': lipnet.certify.__file__, 'privacy': lipnet.privacy.__file__,"
        "'top_certify': importlib.util.find_spec('certify') is not None,"
        "'top_privacy': importlib.util.find_spec('privacy') is not None}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    found = json.loads(out.stdout)
    assert Path(found["certify"]).resolve() == REPO / "certify" / "__init__.py"
    assert Path(found["privacy"]).resolve() == REPO / "privacy" / "__init__.py"
    assert not found["top_certify"] and not found["top_privacy"]


def test_wheel_nests_certify_and_privacy_under_lipnet(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = tmp_path.glob("lipnet-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ["lipnet/__init__.py", "lipnet/ortho/polar.py", "lipnet/certify/__init__.py",
                   "lipnet/privacy/__init__.py"]:
        assert module in names
    assert not any(n.startswith(("certify/", "privacy/")) for n in names)


def test_version_is_exposed():
    assert lipnet.__version__ == "0.1.0"
