"""Coefficient schedules for the odd polynomial iterations X <- a X + (b A + c A^2) X, A = X X^T.

Every iteration of this family acts on each singular value independently: sigma <- p(sigma) with
p(x) = a x + b x^3 + c x^5. So a schedule is fully described by the scalar map it composes, and
the singular-value band a method promises is a property of that scalar map (see
:func:`singular_value_band`).

Where the numbers come from
---------------------------
* ``KELLER_JORDAN_NS5``: Muon's quintic (3.4445, -4.7750, 2.0315), 5 times. Not convergent: it
  inflates small singular values fast and leaves the rest in about [0.68, 1.13].
* ``TURBO_SCHEDULE``: derived here, not copied. After AOL preconditioning every singular value is
  in (0, 1] (a guarantee, see :func:`lipnet.ortho.aol_rescale`), so the natural design target is the
  interval [lower, 1]. :func:`minimax_quintic_schedule` picks, step by step, the odd quintic that
  minimises max |1 - p(x)| over the current interval (the greedy minimax construction of Polar
  Express, Amsel et al. 2025, which is optimal for compositions), then moves to the image interval.
  We use ``lower = 3e-3`` and 4 steps: the band is [0.80, 1.20] for every AOL-scaled singular value
  >= 3e-3. Why 3e-3: among these greedy schedules it also (nearly) minimises the mean squared error
  |p(sigma) - 1|^2 over a log-uniform spread of singular values in [1e-3, 1] (checked with a free
  12-parameter optimisation, which landed on the same coefficients to 2 digits), i.e. it balances
  Gaussian-like spectra (most mass in [0.05, 0.4] after AOL) against gradient-like power-law
  spectra (mass near 1e-3). The public Turbo-Muon code instead drops the first tuple of Dion's
  5-step schedule; measured on a 1024x1024 power-law (sigma_i = 1/i) matrix that leaves the polar
  error 1.7x worse than Keller Jordan's ns5 (0.65 vs 0.39), because 4 of its steps lift singular
  values of 1e-3 only to 0.12. Ours stays within 10% of ns5 there and beats it on Gaussian inputs
  (``benchmarks/ortho.py`` measures both).
* ``CONVERGENT_SCHEDULE``: the same greedy minimax construction from ``lower = 1e-3``, 6 steps (the
  interval shrinks to [0.99908, 1.00092]), then the classical quintic Newton-Schulz step
  (15/8, -5/4, 3/8), third-order convergent at 1, which brings the error to the fp32 floor. Layers use
  it: they need sigma within 1e-3 of 1, not a band.
* ``BJORCK_STEP``: the cubic Newton-Schulz / Bjorck step (3/2, -1/2, 0). It maps [0, 1] into [0, 1],
  so after AOL preconditioning (sigma <= 1) no singular value ever exceeds 1 in exact arithmetic.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

Coefficients = tuple[float, float, float]

KELLER_JORDAN_NS5: tuple[Coefficients, ...] = ((3.4445, -4.7750, 2.0315),) * 5

# minimax_quintic_schedule(lower=3e-3, steps=4), rounded to 8 significant digits.
TURBO_LOWER = 3e-3
TURBO_SCHEDULE: tuple[Coefficients, ...] = (
    (8.3836739, -24.765907, 18.357083),
    (4.0434219, -3.0114063, 0.56951238),
    (3.5055736, -2.6266557, 0.52571949),
    (2.4901197, -1.8342783, 0.43683507),
)

NEWTON_SCHULZ_QUINTIC: Coefficients = (15 / 8, -10 / 8, 3 / 8)
BJORCK_STEP: Coefficients = (1.5, -0.5, 0.0)

# minimax_quintic_schedule(lower=1e-3, steps=6) + one convergent Newton-Schulz quintic.
CONVERGENT_LOWER = 1e-3
CONVERGENT_SCHEDULE: tuple[Coefficients, ...] = (
    (8.4703295, -25.108079, 18.629279),
    (4.1828387, -3.1087054, 0.5806075),
    (3.9618718, -2.9540742, 0.56297738),
    (3.2866221, -2.464747, 0.50736074),
    (2.2737797, -1.6446874, 0.41619389),
    (1.8887189, -1.2651602, 0.37651922),
    NEWTON_SCHULZ_QUINTIC,
)


def apply_scalar_map(sigma: np.ndarray, schedule: Sequence[Coefficients]) -> np.ndarray:
    """Image of singular values ``sigma`` under the composed odd polynomials of ``schedule``."""
    x = np.asarray(sigma, dtype=np.float64)
    for a, b, c in schedule:
        x2 = x * x
        x = x * (a + x2 * (b + c * x2))
    return x


def singular_value_band(
    schedule: Sequence[Coefficients], lower: float, upper: float = 1.0, points: int = 200_001
) -> tuple[float, float]:
    """(min, max) of the composed scalar map over [lower, upper], on a dense log+linear grid.

    For an input whose (pre-scaled) singular values all lie in [lower, upper], the output singular
    values of the iteration lie in this band in exact arithmetic. The grid is fine enough that the
    polynomial cannot move more than ~1e-6 between points for the schedules in this module.
    """
    if not 0 < lower <= upper:
        raise ValueError(f"need 0 < lower <= upper, got lower={lower}, upper={upper}")
    grid = np.unique(np.concatenate([np.geomspace(lower, upper, points), np.linspace(lower, upper, points)]))
    y = apply_scalar_map(grid, schedule)
    return float(y.min()), float(y.max())


def minimax_odd_quintic(lower: float, upper: float, points: int = 4000) -> tuple[Coefficients, float]:
    """Odd quintic p(x) = a x + b x^3 + c x^5 minimising max_{x in [lower, upper]} |1 - p(x)|.

    Solved as a linear program on a dense grid (scipy's HiGHS). Returns (coefficients, error).
    """
    from scipy.optimize import linprog  # only needed to re-derive schedules, not at import time

    x = np.concatenate([np.geomspace(lower, upper, points), np.linspace(lower, upper, points)])
    basis = np.stack([x, x**3, x**5], axis=1)
    ones = np.ones((len(x), 1))
    # variables (a, b, c, t): minimise t subject to -t <= 1 - p(x) <= t
    a_ub = np.block([[basis, -ones], [-basis, -ones]])
    b_ub = np.concatenate([np.ones(len(x)), -np.ones(len(x))])
    res = linprog([0, 0, 0, 1], A_ub=a_ub, b_ub=b_ub, bounds=[(None, None)] * 4, method="highs")
    if not res.success:
        raise RuntimeError(f"minimax LP failed on [{lower}, {upper}]: {res.message}")
    a, b, c, t = res.x
    return (float(a), float(b), float(c)), float(t)


def minimax_quintic_schedule(lower: float, steps: int) -> list[Coefficients]:
    """Greedy minimax schedule (Polar-Express construction) for singular values in [lower, 1].

    Step t solves :func:`minimax_odd_quintic` on the current interval, then replaces the interval by
    its image. This is how ``TURBO_SCHEDULE`` and ``CONVERGENT_SCHEDULE`` were derived.
    """
    lo, hi = float(lower), 1.0
    schedule = []
    for _ in range(steps):
        coefficients, _ = minimax_odd_quintic(lo, hi)
        schedule.append(coefficients)
        lo, hi = singular_value_band([coefficients], lo, hi, points=20_000)
    return schedule
