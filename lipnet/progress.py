"""Progress bars: shown on a terminal or in a notebook, never written into a log file."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm as _auto_tqdm

# tqdm.auto picks its notebook widget inside a Jupyter kernel (the widget draws there, though the
# kernel's stderr is no terminal)
_NOTEBOOK = any(cls.__module__ == "tqdm.notebook" for cls in _auto_tqdm.__mro__)


def interactive() -> bool:
    """True when stderr is a terminal or the code runs in a notebook (tqdm's notebook widget).
    A redirected run (``> run.log``) gets False: every redraw of a bar would stay in the file,
    e.g. a ``0/8`` that a fast epoch never redraws before it clears the bar."""
    if _NOTEBOOK:
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(iterable=None, *, desc: str, enabled: bool = True, **kwargs) -> _auto_tqdm:
    """``tqdm(iterable, desc=desc, **kwargs)``, disabled unless ``enabled`` and :func:`interactive`.
    A disabled bar still iterates, counts and accepts ``set_postfix`` / ``update``."""
    return _auto_tqdm(iterable, desc=desc, disable=not (enabled and interactive()), **kwargs)
