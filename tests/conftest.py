import os

from hypothesis import settings

# CI runs a fixed, reproducible set of examples; local runs explore new ones each time.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


import pathlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_root() -> pathlib.Path:
    """The datasets the tests read (MNIST, Fashion-MNIST, CIFAR-10): $LIPNET_DATA (CI sets it),
    else ../shared/datasets beside the repo, else lipnet's default data root, which
    `lipnet download mnist fashion-mnist cifar10` fills."""
    from lipnet.data import default_data_root

    env = os.environ.get("LIPNET_DATA")
    shared = pathlib.Path(__file__).resolve().parents[2] / "shared" / "datasets"
    root = pathlib.Path(env) if env else shared if shared.is_dir() else default_data_root()
    assert (root / "MNIST").is_dir(), (f"MNIST not found under {root}: set LIPNET_DATA, or run "
                                       "`lipnet download mnist fashion-mnist cifar10` once")
    return root


@pytest.fixture(autouse=True)
def _input_checks_stay_on():
    """A test that turns the layers' input checks off must turn them on again: later tests rely on them."""
    yield
    import lipnet.nn as ln

    if not ln.input_checks_enabled():
        ln.set_input_checks(True)
        pytest.fail("the test left lipnet.nn's input checks off (set_input_checks(False) without restoring)")


@pytest.fixture
def lipnet_cli(data_root):
    """``lipnet_cli(*args)``: the exit code of ``lipnet ARGS --data-root <the test data> --no-progress``,
    run in this process (capsys sees its output)."""
    from lipnet.cli import main

    def run(*args) -> int:
        return main([*map(str, args), "--data-root", str(data_root), "--no-progress"])

    return run
