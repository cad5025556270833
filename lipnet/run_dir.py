"""The output directory of a training run: checked writable before any work, locked against a
second run, and never overwritten without being asked.

``claim_run_dir(out, resume=..., overwrite=...)`` returns a :class:`RunDirLock` held until
``release()`` (or the process's exit: the lock is an ``flock`` on ``out/.lipnet.lock``, which the
kernel drops with the process, so a killed run leaves no stale lock behind).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from .checkpoints import CHECKPOINT

LOCK = ".lipnet.lock"
RUN_FILES = (CHECKPOINT, "config.json")

try:  # POSIX; on other systems the directory is checked but not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class RunDirError(ValueError):
    """An output directory that cannot be used: not writable, in use by another run, or holding
    an earlier run that neither ``--resume`` nor ``--overwrite`` allows to replace."""


class RunDirLock:
    """An exclusive claim on a run directory (see :func:`claim_run_dir`)."""

    def __init__(self, path: Path, handle, created: bool = False) -> None:
        self.path, self._handle, self.created = path, handle, created

    def release(self) -> None:
        """Give the directory up. One this claim created and nothing was written to (the run failed
        before its first checkpoint) is removed again, so a refused run leaves no trace."""
        if self._handle is None:
            return
        with contextlib.suppress(OSError):
            if self.created and [p.name for p in self.path.iterdir()] == [LOCK]:
                (self.path / LOCK).unlink()
                self.path.rmdir()
        with contextlib.suppress(OSError):
            if fcntl is not None:
                fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
        self._handle = None


def claim_run_dir(out: str | Path, *, resume: bool = False, overwrite: bool = False) -> RunDirLock:
    """Create ``out`` if needed and claim it for one training run.

    RunDirError (a ValueError) naming the directory if it cannot be written (checked by creating
    the lock file, before any data is read or any epoch trained), if another process holds it
    (its pid is named), or if it holds an earlier run's ``checkpoint.pt`` / ``config.json`` while
    neither ``resume`` (continue that run) nor ``overwrite`` (replace it) is set."""
    out = Path(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK, "a+")
    except OSError as err:
        raise RunDirError(f"cannot write to the output directory {out}: {err.strerror or err}") from err
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunDirError(f"{out} is in use by another lipnet train (pid {owner}); wait for it to finish or "
                                  "choose another --out") from err
            raise RunDirError(f"cannot lock {out / LOCK}: {err.strerror or err}") from err
    lock = RunDirLock(out, handle, created)
    earlier = [name for name in RUN_FILES if (out / name).exists()]
    if earlier and not (resume or overwrite):
        lock.release()
        raise RunDirError(f"{out} already holds a run ({', '.join(earlier)}); continue it with --resume {out}, replace "
                          "it with --overwrite, or choose another --out")
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return lock


__all__ = ["LOCK", "RunDirError", "RunDirLock", "claim_run_dir"]
