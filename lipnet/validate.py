"""Argument checks shared by every public entry point: each raises ``ValueError`` naming the
argument and the value it got, and returns the value in its plain Python type.

Public functions and constructors validate their arguments once, with these; the helpers they
call trust what they are handed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def _real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def positive_int(value, name: str) -> int:
    """``value`` if it is an int >= 1 (bool refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def nonnegative_int(value, name: str) -> int:
    """``value`` if it is an int >= 0 (bool refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def finite_positive(value, name: str) -> float:
    """``value`` as a float if it is finite and > 0."""
    v = _real(value, name)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return v


def finite_nonnegative(value, name: str) -> float:
    """``value`` as a float if it is finite and >= 0."""
    v = _real(value, name)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return v


def open_unit(value, name: str) -> float:
    """``value`` as a float if it lies in the open interval (0, 1)."""
    v = _real(value, name)
    if not 0 < v < 1:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return v


def unit_interval(value, name: str, *, closed_low: bool = True, closed_high: bool = False) -> float:
    """``value`` as a float if it lies in [0, 1) (default; ``closed_low`` / ``closed_high`` choose
    which ends belong to the interval), e.g. a momentum."""
    v = _real(value, name)
    low_ok = v >= 0 if closed_low else v > 0
    high_ok = v <= 1 if closed_high else v < 1
    if not (low_ok and high_ok):
        raise ValueError(f"{name} must be in {'[' if closed_low else '('}0, 1{']' if closed_high else ')'}, "
                         f"got {value!r}")
    return v


def one_of(value: T, choices: Iterable[T], name: str) -> T:
    """``value`` if it is one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")
    return value


def class_labels(labels, classes: int, name: str):
    """``labels`` as a 1-D int64 tensor if every entry is an integer class index in [0, ``classes``):
    a label outside that range would be scored as a silent miss (or crash an index deep inside)."""
    import torch  # the argument checks above stay importable without torch

    t = torch.as_tensor(labels)
    if t.dtype == torch.bool or t.is_complex() or (t.is_floating_point() and not torch.equal(t, t.round())):
        raise ValueError(f"{name}: labels must be integer class indices, got dtype {t.dtype}")
    t = t.reshape(-1).long()
    low, high = torch.stack([t.min(), t.max()]).tolist() if t.numel() else (0, 0)  # one host sync
    if low < 0 or high >= classes:
        bad = t[(t < 0) | (t >= classes)]
        raise ValueError(f"{name}: labels must lie in [0, {classes}), got {bad[:5].tolist()}"
                         f"{' ...' if bad.numel() > 5 else ''} ({bad.numel()} out of range)")
    return t


__all__ = ["class_labels", "finite_nonnegative", "finite_positive", "nonnegative_int", "one_of", "open_unit", "positive_int",
           "unit_interval"]
