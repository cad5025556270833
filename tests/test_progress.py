"""Progress bars show on a terminal and stay out of redirected output (a log keeps every redraw)."""

from __future__ import annotations

import io
import sys

from lipnet.progress import interactive, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_draws_on_a_terminal_and_not_into_a_file(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert interactive()
    assert list(progress_bar(range(8), desc="steps", file=terminal, mininterval=0)) == list(range(8))
    assert "8/8" in terminal.getvalue()
    assert progress_bar(range(3), desc="off", enabled=False).disable   # --no-progress wins

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    assert not interactive()
    bar = progress_bar(range(8), desc="steps")
    assert list(bar) == list(range(8)) and bar.disable
    assert log.getvalue() == ""
