"""What every benchmark script shares: the machine record, CUDA-aware interleaved timing, output files.

    from _harness import machine_info, time_interleaved, median, sync, write_outputs

Scripts run as ``python benchmarks/X.py`` and put their own folder on ``sys.path`` to import this.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import torch

K = TypeVar("K")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo's 'model name', what lscpu shows), or platform.processor()
    where /proc/cpuinfo is absent or has no such line (e.g. macOS, some ARM kernels)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: str | torch.device | None = None) -> dict:
    """The machine a measurement ran on: torch version, torch threads, CPU count and model, platform,
    device (``"cpu"`` when none is given), the GPU's name when that device is CUDA, and the UTC date."""
    dev = torch.device(device if device is not None else "cpu")
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "cpu": cpu_model(), "arch": platform.machine(), "host": platform.node(),
            "platform": platform.platform(), "device": str(dev),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def describe(info: dict) -> str:
    """One line naming what ran the computation: the GPU, or the CPU model and thread count."""
    if info["gpu"] is not None:
        return info["gpu"]
    return f"cpu: {info['cpu']}, {info['threads']} threads"


def sync(device: str | torch.device | None) -> None:
    """Wait for the device's queued kernels (CUDA launches return before the work is done, so a clock
    read without this measures the launch); a no-op on the CPU or when no device is given."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(cases: Mapping[K, Callable[[], object]], repeats: int, warmup: int,
                     device: str | torch.device | None = None, rotate: bool = True) -> dict[K, list[float]]:
    """Wall seconds of each zero-argument case, ``repeats`` per case after ``warmup`` untimed rounds.

    Every repeat runs each case once (round-robin), so drifts in the machine's load hit all cases
    alike and their ratios stay meaningful; with ``rotate`` the order is rotated by one each repeat
    so that no case always runs first. On CUDA the device is synchronized before and after each
    timed call, so a case is charged for its own kernels and none of another's.
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times: dict[K, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names) if rotate and names else 0
        for name in names[shift:] + names[:shift]:
            sync(device)
            start = time.perf_counter()
            cases[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: Iterable[float]) -> float:
    """The median (the mean of the middle two for an even count): robust to a few slow, preempted runs."""
    return statistics.median(xs)


def write_outputs(result: dict, markdown: str, json_path: Path | None, md_path: Path | None) -> None:
    """``result`` as JSON and ``markdown`` under the command that produced it (the running script's
    own command line), each only if its path is given."""
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1))
        print(f"wrote {json_path}")
    if md_path:
        script = f"benchmarks/{Path(sys.argv[0]).name}"
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(f"# {script}\n\n```\n{' '.join(['python', script] + sys.argv[1:])}\n```\n\n{markdown}\n")
        print(f"wrote {md_path}")
