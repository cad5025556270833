"""What the ``lipnet`` command prints and writes: plain-text tables, the certified-accuracy and
conformal plots (matplotlib, imported only when a plot is drawn), and result files whose write
errors become one clear message."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def format_table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
    """Plain-text table (right-aligned numbers)."""
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_certified(radii: torch.Tensor, pgd: dict[float, float], path: Path, title: str) -> None:
    """PNG at ``path``: certified accuracy against the L2 radius (the fraction of points whose
    certified radius exceeds it; ``radii`` is 0 where the prediction is wrong), PGD accuracies as
    points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    top = max(float(radii.max()) if radii.numel() else 0.0, max(pgd, default=0.0)) * 1.1 or 1.0
    grid = torch.linspace(0, top, 200, dtype=torch.float64)
    curve = [(radii > e).double().mean().item() if e > 0 else (radii > 0).double().mean().item() for e in grid]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(grid.numpy(), curve, label="certified (sound)")
    if pgd:
        ax.plot(list(pgd), list(pgd.values()), "o", label="PGD (empirical)")
    ax.set_xlabel("L2 radius eps (pixels in [0, 1])")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PLOT_HINT = " (choose another path with --plot)"


class OutputError(OSError):
    """A result file (--json, the plot) that could not be written."""


def write_output(path: Path, what: str, write, hint: str = "") -> None:
    """``write(path)``, an OSError turned into an OutputError naming ``what``, the path and ``hint``."""
    try:
        write(path)
    except OSError as err:
        raise OutputError(f"cannot write {what} to {path}: {err.strerror or err}{hint}") from err


def plot_conformal(rows: list[dict], path: Path, title: str) -> None:
    """PNG at ``path``: mean set size and coverage (guaranteed, and under PGD where measured) of
    vanilla and robust conformal sets against the attack budget, one row of ``rows`` per budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    eps = [r["eps"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(eps, [r["vanilla_size"] for r in rows], "o-", label="vanilla CP")
    left.plot(eps, [r["robust_size"] for r in rows], "s-", label="robust CP (sound)")
    left.set_xlabel("L2 budget eps (pixels in [0, 1])")
    left.set_ylabel("mean set size")
    right.plot(eps, [r["vanilla_coverage_bound"] for r in rows], "o--", label="vanilla: guaranteed (lower bound)")
    if rows[0].get("vanilla_attacked_coverage") is not None:
        right.plot(eps, [r["vanilla_attacked_coverage"] for r in rows], "o-", label="vanilla under PGD")
        right.plot(eps, [r["robust_attacked_coverage"] for r in rows], "s-", label="robust under PGD")
    right.axhline(1 - rows[0]["alpha"], color="gray", lw=0.8, label="1 - alpha")
    right.set_xlabel("L2 budget eps (pixels in [0, 1])")
    right.set_ylabel("coverage")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["OutputError", "PLOT_HINT", "format_table", "plot_certified", "plot_conformal", "write_output"]
