import os

from hypothesis import settings

# CI runs a fixed, reproducible set of examples; local runs explore new ones each time.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


import pathlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_root() -> pathlib.Path:
    """The shared datasets: $LIPNET_DATA (CI sets it), else ../shared/datasets beside the repo."""
    env = os.environ.get("LIPNET_DATA")
    root = pathlib.Path(env) if env else pathlib.Path(__file__).resolve().parents[2] / "shared" / "datasets"
    assert (root / "MNIST").is_dir(), f"MNIST not found under {root}: set LIPNET_DATA"
    return root
