"""Retraction onto the (semi-)orthogonal matrices: how a layer keeps its stored factor orthogonal.

A layer in ``parametrization="retraction"`` stores its orthogonal factor Q itself and computes with
it directly (no orthogonalization in the autograd graph). After an optimizer step Q + D is close
to orthogonal, and :func:`retract` maps it back with Newton-Schulz quintic steps
p(x) = (15 x - 10 x^3 + 3 x^5) / 8, third-order convergent at 1:

    A = X X^T;   r = a Gram-iteration bound on ||A - I||_2   (>= |sigma^2 - 1| for every singular value)
    steps = the fewest quintic steps whose scalar map sends [sqrt(1 - r), sqrt(1 + r)] to within
            ``RETRACTION_TOLERANCE`` of 1 (exact arithmetic; ``quintic_steps_for``)

For wide matrices (N >= 2k) the steps run on the k x k Gram side, P_t = p(A_t) / A_t,
A_{t+1} = P_t A_t P_t, X <- (P_{T-1} ... P_0) X: the (k, N) matrix is read twice (A and the final
product) whatever the number of steps. Up to r < ``SCALED_BASIN`` (a large optimizer step) X is
first scaled by 1 / sqrt(1 + r), which puts every singular value in [sqrt((1 - r) / (1 + r)), 1],
and the quintic steps converge from there. A factor further away (a fresh random initialization,
weights set by hand: the condition number is then unknown) is scaled likewise and taken through the
convergent schedule (convergent for sigma / sigma_max >= 1e-3; on the Gram side for wide
matrices) -- or the layer's own ``method`` if it is not "convergent" -- and, if that has not
converged either, to the exact polar factor (SVD). So every retraction ends orthogonal to the
working precision, whatever its input.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from .polar import POLAR_BACKWARD_METHODS, iterate, iterate_gram, orthogonalize
from .schedules import CONVERGENT_SCHEDULE, NEWTON_SCHULZ_QUINTIC, apply_scalar_map
from .validation import check_matrices

# Exact-arithmetic target of the quintic steps: |sigma - 1| <= this for every singular value.
RETRACTION_TOLERANCE = 1e-7
# Residual bounds r >= ||A - I||_2 and how each is handled. r <= QUINTIC_BASIN: quintic steps as they
# are (p's basin ends near sigma = 1.53; 5 steps at r = 0.9). r < SCALED_BASIN: sigma^2 is still in
# [1 - r, 1 + r] with 1 - r > 0, so after scaling by 1 / sqrt(1 + r) every sigma is in
# [sqrt((1 - r) / (1 + r)), 1] (a condition number <= 14 at r = 0.98: the Gram-side steps stay
# accurate) and the quintic steps converge from there (8 steps at 0.98). Beyond: the converging fallbacks.
QUINTIC_BASIN = 0.9
SCALED_BASIN = 0.98
_MAX_QUINTIC_STEPS = 12
# ||A - I||_2 bounds below which a factor counts as orthogonal to the working precision and is left
# bit for bit as it is (|sigma - 1| <= half of it): a reloaded or re-read factor does not move by an
# ulp at every retraction. fp32 factors retracted at N = 8192 measure 5e-7 to 8e-7; a larger threshold
# lets factors settle further from orthogonal (2e-5 left BCOP kernels at bound 1 + 6e-5).
ALREADY_ORTHOGONAL = {torch.float32: 2e-6, torch.float64: 1e-12}
_GRAM_MIN_ASPECT = 2


def quintic_steps_for(residual: float, scaled: bool = False) -> int:
    """Fewest quintic Newton-Schulz steps that bring every singular value within
    ``RETRACTION_TOLERANCE`` of 1 (exact arithmetic, on a dense grid), for sigma in
    [sqrt(1 - r), sqrt(1 + r)] (``scaled=False``) or, after the scaling by 1 / sqrt(1 + r), in
    [sqrt((1 - r) / (1 + r)), 1] (``scaled=True``), r = ``residual``. r is rounded up to a multiple
    of 1e-4 first (conservative: the count grows with r), so each answer is computed once."""
    limit = SCALED_BASIN if scaled else 1.25
    if not 0 <= residual <= limit:
        raise ValueError(f"residual must be in [0, {limit}] (the quintic's basin), got {residual}")
    return _quintic_steps_for_rounded(min(limit, math.ceil(residual * 1e4) / 1e4), scaled)


@lru_cache(maxsize=None)
def _quintic_steps_for_rounded(residual: float, scaled: bool) -> int:
    if scaled:
        lo, hi = math.sqrt((1 - residual) / (1 + residual)), 1.0
    else:
        lo, hi = math.sqrt(max(0.0, 1 - residual)), math.sqrt(1 + residual)
    x = np.linspace(lo, hi, 4001)
    for steps in range(_MAX_QUINTIC_STEPS + 1):
        if np.abs(apply_scalar_map(x, (NEWTON_SCHULZ_QUINTIC,) * steps) - 1).max() <= RETRACTION_TOLERANCE:
            return steps
    raise ValueError(f"residual {residual} needs more than {_MAX_QUINTIC_STEPS} quintic steps")


def _gram_residual(A: torch.Tensor, squarings: int = 5) -> float:
    """Upper bound (exact arithmetic) on max over the stack of ||A - I||_2 >= max |sigma_i^2 - 1|.

    Gram iteration on the symmetric S = A - I: ||S||_2 = f_0 ||S/f_0||_2 and ||N||_2 = ||N N||_2^(1/2),
    so ||S||_2 <= f_0 (f_1 (... ||S_t||_F)^(1/2) ...)^(1/2) with f_t the Frobenius norm of level t.
    Five squarings (5 k^3 flops) overestimate by at most k^(1/64) (1.10x at k = 512), where the
    row-sum or Frobenius norm of a dense perturbation overestimate by ~sqrt(k) / 2 (11x there) and
    would send an ordinary optimizer step to the fallback path. Rounding only perturbs the choice of
    steps.
    """
    S = A - torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    norms = []
    for _ in range(squarings):
        f = torch.linalg.matrix_norm(S, keepdim=True)
        norms.append(f)
        S = S / f.clamp_min(torch.finfo(S.dtype).tiny)
        S = S @ S
    bound = torch.linalg.matrix_norm(S, keepdim=True)
    for f in reversed(norms):
        bound = f * bound.sqrt()
    return float(bound.amax())


def _iterate_short_side(X: torch.Tensor, A: torch.Tensor, schedule: tuple) -> torch.Tensor:
    """The core's polynomial steps on a (B, k, N) stack whose Gram matrices are A: on the k x k
    Gram side for wide matrices (``polar.iterate_gram``), directly otherwise (``polar.iterate``)."""
    if not schedule:
        return X
    if X.shape[-1] >= _GRAM_MIN_ASPECT * X.shape[-2]:
        return iterate_gram(X, A, schedule)
    return iterate(X, A, schedule, 0, X.dtype)


def _quintic_steps(X: torch.Tensor, A: torch.Tensor, steps: int) -> torch.Tensor:
    return _iterate_short_side(X, A, (NEWTON_SCHULZ_QUINTIC,) * steps)


def _converge_from_far(X: torch.Tensor, A: torch.Tensor, residual: float) -> torch.Tensor:
    """Far from orthogonal: scale by 1 / sqrt(1 + residual) (every sigma <= 1, as the convergent
    schedule assumes; lambda_max(A) <= 1 + ||A - I||_2) and run ``CONVERGENT_SCHEDULE``, on the Gram
    side for wide matrices (no pass over the long side per step)."""
    scale = (1 + residual) ** -0.5
    return _iterate_short_side(X * scale, A * scale**2, CONVERGENT_SCHEDULE)


def _retract_short_side(X: torch.Tensor, method: str) -> torch.Tensor:
    A = X @ X.mT
    residual = _gram_residual(A)
    if residual <= ALREADY_ORTHOGONAL[X.dtype]:
        return X
    if residual <= QUINTIC_BASIN:
        return _quintic_steps(X, A, quintic_steps_for(residual))
    if residual < SCALED_BASIN:
        scale = (1 + residual) ** -0.5
        return _quintic_steps(X * scale, A * scale**2, quintic_steps_for(residual, scaled=True))
    # far (condition number unknown): converge, then check on a fresh Gram matrix, since the
    # Gram-side iterate does not correct its own rounding
    X = _converge_from_far(X, A, residual) if method == "convergent" else orthogonalize(X, method=method)
    A = X @ X.mT
    residual = _gram_residual(A)
    if residual > QUINTIC_BASIN:  # not converged (sigma_min / sigma_max < ~1e-3): exact polar factor
        U, _, Vh = torch.linalg.svd(X.double(), full_matrices=False)
        X = (U @ Vh).to(X.dtype)
        A = X @ X.mT
        residual = min(_gram_residual(A), QUINTIC_BASIN)
    return _quintic_steps(X, A, quintic_steps_for(residual))


def retract(W: torch.Tensor, method: str = "convergent") -> torch.Tensor:
    """A semi-orthogonal matrix for each matrix of ``W`` ``(..., m, n)``: its polar factor (the
    nearest one) when ``W`` is near orthogonal, as after an optimizer step on an orthogonal factor.

    Guarantee (exact arithmetic): every singular value of the result is within
    ``RETRACTION_TOLERANCE`` of 1, for any finite input without zero matrices, except inputs
    already within ``ALREADY_ORTHOGONAL[dtype] / 2`` of it (1e-6 in fp32), which are returned
    unchanged, bit for bit (so retracting twice changes nothing): inputs with
    ``||W W^T - I||_2`` (short side; bounded by Gram iteration) <= ``QUINTIC_BASIN`` by the quintic steps alone
    (converging to the polar factor of W), others through the convergent schedule (``method``
    "convergent", the polar factor of W again) or ``orthogonalize(W, method)`` and, where that has
    not converged, the SVD polar factor. fp32 results are orthogonal to
    ~1e-6. No autograd (the result replaces a stored factor), autocast disabled: the retraction
    runs in fp32 (fp64 for fp64 inputs) whatever the surrounding precision. One host sync per call
    (two or three on the fallback path). A ``W`` that needs no step is returned as it is (the
    same tensor).
    """
    check_matrices(W)
    if method not in POLAR_BACKWARD_METHODS:
        raise ValueError(f"retract: method must be one of {POLAR_BACKWARD_METHODS}, got {method!r}")
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    transpose = W.shape[-2] > W.shape[-1]
    X = W.mT if transpose else W
    batch_shape, (k, n) = X.shape[:-2], X.shape[-2:]
    with torch.no_grad(), torch.autocast(W.device.type, enabled=False):
        X = _retract_short_side(X.reshape(-1, k, n).to(dtype), method).reshape(*batch_shape, k, n)
    return (X.mT if transpose else X).to(W.dtype)


def tangent_projection(Q: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Projection of ``G`` onto the tangent space of the (semi-)orthogonal matrices at ``Q`` (both
    ``(..., m, n)``), on the short side: G - sym(G Q^T) Q with sym(M) = (M + M^T) / 2 (Q wide).

    At an orthogonal Q this is the derivative of the polar factor (``orthogonalize(...,
    backward="polar")`` at P = I), so a stored factor trained through it gets the gradient its
    polar parametrization would get at that point: the normal part, which the retraction would undo
    anyway, does not reach the optimizer (or Adam's second moments). Runs in ``G``'s precision
    (fp32 at least), autocast disabled.
    """
    transpose = Q.shape[-2] > Q.shape[-1]
    if transpose:
        Q, G = Q.mT, G.mT
    with torch.autocast(G.device.type, enabled=False):
        Qf = Q.to(G.dtype)
        M = G @ Qf.mT
        out = G - ((M + M.mT) / 2) @ Qf
    return out.mT if transpose else out


def retract_(W: torch.Tensor, method: str = "convergent") -> torch.Tensor:
    """In-place :func:`retract` of a stored factor (a parameter or a view of one); returns ``W``."""
    retracted = retract(W, method)
    if retracted.data_ptr() != W.data_ptr():
        with torch.no_grad():
            W.copy_(retracted)
    return W
