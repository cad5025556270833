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
  in (0, 1] (a guarantee, see :func:`lipnet.ortho.aol_rescale`), so the design target is the
  interval [lower, 1]. :func:`minimax_quintic_schedule` picks, step by step, the odd quintic that
  minimises max |1 - p(x)| over the current interval (the greedy minimax construction of Polar
  Express, Amsel et al. 2025, optimal for compositions), then moves to the image interval. Each
  interval is widened by 1% (``ROUNDING_SLACK``): without it the composed map is so steep at the
  interval ends that bf16-sized perturbations blow singular values up (to 7e10,
  ``benchmarks/schedule_probe.py``), with it any 1% error per step stays inside the band. We use
  ``lower = 3e-3`` and 4 steps: the band is [0.779, 1.221] for every AOL-scaled singular value
  >= 3e-3. Why 3e-3: it balances Gaussian-like spectra (mass in [0.05, 0.4] after AOL; a higher
  ``lower`` is better for them) against gradient-like power-law spectra (mass near 1e-3; a lower
  ``lower`` is better). Measured polar error on 1024^2 (fp32): 0.166 vs ns5's 0.211 on Gaussian,
  0.416 vs 0.386 on sigma_i = 1/i, 0.168 vs 0.166 on sigma_i = i^-0.5. The public Turbo-Muon code instead drops the first tuple of Dion's 5-step schedule: it is better on Gaussian
  (0.101) and i^-0.5 (0.061) inputs but 1.7x worse than ns5 on sigma_i = 1/i (0.646; its 4 steps lift
  1e-3 only to 0.12), and it was designed without rounding slack. ``benchmarks/schedule_probe.py``
  reproduces these numbers and the 7e10 blow-up; ``benchmarks/ortho.py`` measures the rest.
* ``CONVERGENT_SCHEDULE``: the same construction from ``lower = 1e-3``, 6 steps with 1% slack (the
  interval shrinks to [0.998, 1.002]), then the classical quintic Newton-Schulz step
  (15/8, -5/4, 3/8), third-order convergent at 1, which ends within 2e-8 of 1. Layers use it: they
  need sigma within 1e-3 of 1, not a band.
* ``BJORCK_STEP``: the cubic Newton-Schulz / Bjorck step (3/2, -1/2, 0). It maps [0, 1] into [0, 1],
  so after AOL preconditioning (sigma <= 1) no singular value ever exceeds 1 in exact arithmetic.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

Coefficients = tuple[float, float, float]

KELLER_JORDAN_NS5: tuple[Coefficients, ...] = ((3.4445, -4.7750, 2.0315),) * 5

ROUNDING_SLACK = 1e-2

# minimax_quintic_schedule(lower=3e-3, steps=4, slack=ROUNDING_SLACK), rounded to 8 significant digits.
TURBO_LOWER = 3e-3
TURBO_SCHEDULE: tuple[Coefficients, ...] = (
    (8.3031917, -24.047315, 17.473752),
    (4.0121771, -2.9303526, 0.54313374),
    (3.5082302, -2.5812233, 0.5053565),
    (2.5298068, -1.8450844, 0.42773307),
)

# For comparison only (not used by any method): the public Turbo-Muon code's 4 steps, Dion's
# 5-step per-step schedule without its first tuple.
DION_LAST4_SCHEDULE: tuple[Coefficients, ...] = (
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

NEWTON_SCHULZ_QUINTIC: Coefficients = (15 / 8, -10 / 8, 3 / 8)
BJORCK_STEP: Coefficients = (1.5, -0.5, 0.0)

# minimax_quintic_schedule(lower=1e-3, steps=6, slack=ROUNDING_SLACK) + one convergent Newton-Schulz quintic.
CONVERGENT_LOWER = 1e-3
CONVERGENT_SCHEDULE: tuple[Coefficients, ...] = (
    (8.387322, -24.372971, 17.727707),
    (4.1445884, -3.0199455, 0.55286996),
    (3.9396076, -2.880908, 0.5377664),
    (3.3113209, -2.4405349, 0.49024249),
    (2.3198192, -1.6691042, 0.41010974),
    (1.895208, -1.2699038, 0.3749624),
    NEWTON_SCHULZ_QUINTIC,
)

# (lower, band_min, band_max): for every pre-scaled singular value >= lower, the output singular
# value lies in [band_min, band_max] in exact arithmetic (checked by tests against the scalar map).
# Pre-scaling is G / (||G||_F + 1e-7) for ns5 and AOL (``lipnet.ortho.aol_rescale``) for the others.
DOCUMENTED_BANDS: dict[str, tuple[float, float, float]] = {
    "ns5": (1e-2, 0.68, 1.14),
    "turbo": (TURBO_LOWER, 0.778, 1.222),
    "convergent": (CONVERGENT_LOWER, 1 - 1e-7, 1 + 1e-7),
}


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


def minimax_quintic_schedule(lower: float, steps: int, slack: float = 0.0) -> list[Coefficients]:
    """Greedy minimax schedule (Polar-Express construction) for singular values in [lower, 1].

    Step t solves :func:`minimax_odd_quintic` on the current interval widened by a relative
    ``slack`` on both ends, then replaces the interval by the image of the widened one. The slack
    makes the composition robust to rounding: without it the composed map is so steep at the top
    of each interval that bf16-sized perturbations (4e-3) explode singular values (to 7e10 in
    ``benchmarks/schedule_probe.py``); with ``slack=1e-2`` any 1% perturbation per step stays inside the band. This is how
    ``TURBO_SCHEDULE`` and ``CONVERGENT_SCHEDULE`` were derived.
    """
    lo, hi = float(lower), 1.0
    schedule = []
    for _ in range(steps):
        lo, hi = lo * (1 - slack), hi * (1 + slack)
        coefficients, _ = minimax_odd_quintic(lo, hi)
        schedule.append(coefficients)
        lo, hi = singular_value_band([coefficients], lo, hi, points=20_000)
    return schedule
