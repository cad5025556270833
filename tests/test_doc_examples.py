"""Every ```python block of README.md and docs/*.md runs as written, on the datasets of the data root.

Each block is executed on its own, in a fresh namespace and an empty working directory, so a
block that leans on a name from another block or on a file of the repository fails here.
"""

from __future__ import annotations

import re
import shlex
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```", re.S | re.M)   # also indented (in a list item)


def _blocks() -> list:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in _BLOCK.finditer(text):
            line = text[:match.start()].count("\n") + 2
            found.append(pytest.param(textwrap.dedent(match.group(2)), id=f"{page.relative_to(ROOT)}:{line}"))
    return found


def test_the_pages_have_examples():
    assert len(_blocks()) >= 8


@pytest.mark.parametrize("code", _blocks())
def test_block_runs_as_written(code: str, data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIPNET_DATA", str(data_root))
    torch.manual_seed(0)
    assert "\n...\n" not in f"\n{code}" and "...  " not in code, "a block with an elided step cannot run as written"
    exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc_example__"})


_BASH = re.compile(r"^( *)```bash\n(.*?)^\1```", re.S | re.M)


def _commands() -> list:
    found = []
    for page in PAGES:
        for match in _BASH.finditer(page.read_text()):
            for line in match.group(2).splitlines():
                for command in line.split("#")[0].split("&&"):
                    words = shlex.split(command)
                    if words and words[0] == "lipnet":
                        found.append(pytest.param(words[1:], id=f"{page.relative_to(ROOT)}: {' '.join(words[1:4])}"))
    return found


@pytest.mark.parametrize("argv", _commands())
def test_command_is_valid(argv: list[str]):
    """Each ``lipnet`` command of the pages parses, and a ``train`` command builds its run's
    configuration (every rule between its options holds) -- without running the hours of training."""
    from lipnet.cli import _parser, _train_config

    args = _parser().parse_args(argv)
    if args.command == "train" and args.resume is None:
        config = _train_config(args)
        assert config.dataset == args.dataset and config.private == args.dp
