"""Why the turbo schedule is ours: the two measurements quoted in lipnet/ortho/schedules.py.

    python benchmarks/schedule_probe.py

1. Rounding robustness of the scalar map: every step's input is perturbed by a random relative
   error of 4e-3 (bf16-sized); the max output over [3e-3, 1] with and without the 1% design slack.
2. Polar error on 1024x1024 matrices (fp32): Keller Jordan's ns5, turbo with our schedule, and turbo
   with the public code's schedule (Dion's 5-step schedule without its first tuple).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lipnet.ortho import orthogonalize  # noqa: E402
from lipnet.ortho import polar as core  # noqa: E402
from lipnet.ortho.schedules import (  # noqa: E402
    DION_LAST4_SCHEDULE,
    ROUNDING_SLACK,
    TURBO_SCHEDULE,
    apply_scalar_map,
    minimax_quintic_schedule,
)


def perturbed_max(schedule, relative_error=4e-3, trials=20, seed=0) -> float:
    rng = np.random.default_rng(seed)
    xs = np.geomspace(3e-3, 1, 20001)
    worst = 0.0
    for _ in range(trials):
        x = xs.copy()
        for step in schedule:
            x = apply_scalar_map(x * (1 + rng.uniform(-relative_error, relative_error, x.shape)), [step])
        worst = max(worst, float(x.max()))
    return worst


def turbo_with(schedule, G: torch.Tensor) -> torch.Tensor:
    original = core.TURBO_SCHEDULE
    core.TURBO_SCHEDULE = schedule  # _schedule() reads the module attribute
    try:
        return orthogonalize(G, "turbo")
    finally:
        core.TURBO_SCHEDULE = original


def main() -> None:
    print("1. max output over [3e-3, 1] with 4e-3 relative noise per step")
    for slack in [0.0, ROUNDING_SLACK]:
        print(f"   slack {slack:g}: {perturbed_max(minimax_quintic_schedule(3e-3, 4, slack=slack)):.4g}")
    print("2. polar error ||Q - UV^T||_F / ||UV^T||_F, 1024x1024, fp32")
    g = torch.Generator().manual_seed(0)
    n = 1024
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    inputs = {"gaussian": torch.randn(n, n, generator=g)}
    for alpha in [0.5, 1.0]:
        inputs[f"sigma_i = i^-{alpha}"] = (U * torch.arange(1, n + 1.0) ** -alpha) @ V.mT
    for name, G in inputs.items():
        Us, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
        P = Us @ Vh
        err = lambda Q: (torch.linalg.matrix_norm(Q.double() - P) / torch.linalg.matrix_norm(P)).item()
        print(f"   {name:16s} ns5 {err(orthogonalize(G, 'ns5')):.3f}  turbo(ours) "
              f"{err(turbo_with(TURBO_SCHEDULE, G)):.3f}  turbo(Dion last 4) {err(turbo_with(DION_LAST4_SCHEDULE, G)):.3f}")


if __name__ == "__main__":
    main()
