"""``python tests/slow_train.py ARGS...``: ``lipnet ARGS...`` with every training batch handed out
``$SLOW_TRAIN_DELAY`` seconds late (the ordinary loader's and the private runs' Poisson batches), so that a test can stop a run in the middle of an epoch (the
results do not depend on the delay). The patch runs at import, so the processes that
``--nproc N`` spawns (which import this file again as their main module) are slowed too."""

from __future__ import annotations

import os
import sys
import time

import lipnet.cli as cli
from lipnet.privacy.sampling import PoissonBatchLoader

DELAY = float(os.environ.get("SLOW_TRAIN_DELAY") or 0)


class DelayedLoader:
    """The wrapped loader, each batch handed out ``DELAY`` seconds late; every other attribute
    (len, dataset, generator) is the wrapped loader's."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            time.sleep(DELAY)
            yield batch

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


_loaders = cli._loaders


def _slow_loaders(*args, **kwargs):
    train, test = _loaders(*args, **kwargs)
    return DelayedLoader(train), test


cli._loaders = _slow_loaders

_poisson_iter = PoissonBatchLoader.__iter__


def _slow_poisson_iter(self):
    for batch in _poisson_iter(self):  # private training (--dp) draws its batches here
        time.sleep(DELAY)
        yield batch


PoissonBatchLoader.__iter__ = _slow_poisson_iter

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
