"""Spectral norms: a guaranteed upper bound (for certificates) and a lower estimate (for comparison).

``spectral_norm_bound`` is the number every certificate divides by, so it must never be below the
true sigma_max. It is the smaller of two sound bounds, both computed in float64 with every rounding
error bounded explicitly:

1. Gram iteration (Delattre et al., 2023) on G = W W^T (short side):
   sigma_max^2 = ||G||_2 and, for symmetric S, ||S||_2 <= ||S^(2^t)||_F^(1/2^t). Tight for matrices
   with a dominant singular value; loose by up to k^(1/2^(t+1)) when many are equal.
2. Near-orthogonal bound: sigma_max^2 = 1 + lambda_max(G - I) <= 1 + ||G - I||_2, with ||G - I||_2
   bounded by Gram iteration again. Tight (error ~ ||G - I||^2) for the nearly orthogonal weights
   that layers use, where bound 1 is loose (all singular values are equal there).

Rounding: fp32/bf16 entries are exact in float64 and their products are exact, so the only errors
are float64 sums. For a matmul of k-term inner products, |fl(PQ) - PQ| <= gamma_k |P||Q| entrywise,
gamma_k = k u / (1 - k u), u = 2^-53, hence ||fl(PQ) - PQ||_2 <= gamma_k ||P||_F ||Q||_F. Each level
of the iteration uses ||N||_2^2 = ||N^T N||_2 <= ||fl(N^T N)||_2 + gamma_k ||N||_F^2, unwound from the
last level (bounded by its Frobenius norm). Finally the result is multiplied by
(1 + ``SAFETY_MARGIN``), which dwarfs all remaining O(u) terms (square roots, divisions, norms).
"""

from __future__ import annotations

import torch

from ..validate import nonnegative_int, positive_int
from .validation import check_matrices

SAFETY_MARGIN = 1e-6
_UNIT_ROUNDOFF_FP64 = 2.0**-53


def _gamma(n: int) -> float:
    nu = n * _UNIT_ROUNDOFF_FP64
    return nu / (1 - nu)


def _symmetric_norm_bound(S: torch.Tensor, n_iter: int) -> torch.Tensor:
    """Upper bound on ||S||_2 for a float64 stack of symmetric (B, k, k) matrices (Gram iteration).

    Levels: N_t = G_t / f_t with f_t = ||G_t||_F, G_{t+1} = fl(N_t N_t). Going back up,
    ||G_t||_2 <= f_t (||N_t||_2 + 2u) and ||N_t||_2 <= sqrt(||G_{t+1}||_2 + gamma_k ||N_t||_F^2),
    with ||N_t||_F <= 1 + 2u k; the deepest level is bounded by its Frobenius norm.
    """
    k = S.shape[-1]
    u = _UNIT_ROUNDOFF_FP64
    slack = _gamma(k) * (1 + 2 * u * k) ** 2
    frobenius_norms = []
    G = S
    for _ in range(n_iter):
        f = torch.linalg.matrix_norm(G)
        frobenius_norms.append(f)
        N = G / torch.where(f > 0, f, torch.ones_like(f))[..., None, None]
        G = N @ N
    bound = torch.linalg.matrix_norm(G) * (1 + 2 * u * k)
    for f in reversed(frobenius_norms):
        bound = f * (torch.sqrt(bound + slack) + 2 * u) * (1 + 4 * u)
    return bound


def spectral_norm_bound(W: torch.Tensor, n_iter: int = 6) -> torch.Tensor:
    """Guaranteed upper bound on sigma_max of each matrix in ``W`` of shape ``(..., m, n)``.

    Returns a float64 tensor of shape ``W.shape[:-2]`` on W's device, never below the true largest
    singular value of the matrices *as stored* (fp32, bf16, ...): all float64 rounding is bounded
    explicitly and a relative ``SAFETY_MARGIN`` of 1e-6 is added on top. For a matrix with
    ||W W^T - I|| = d (short side) the bound is about sqrt(1 + d), so an orthogonalized weight gets
    a bound within ~1e-6 of 1. Not differentiable (it is a certificate, computed on detached
    weights). A zero matrix gets bound 0.

    Args:
        n_iter: Gram-iteration depth; higher is tighter and costs one k x k float64 matmul more per
            level and per bound (k = min(m, n)).
    """
    check_matrices(W, allow_zero=True)
    nonnegative_int(n_iter, "n_iter")
    X = W.detach().to(torch.float64)
    if X.shape[-2] > X.shape[-1]:
        X = X.mT
    k, n = X.shape[-2:]
    X = X.reshape(-1, k, n)

    gram = X @ X.mT
    frob_sq = torch.linalg.matrix_norm(X) ** 2
    gram_rounding = _gamma(n) * frob_sq  # >= ||fl(X X^T) - X X^T||_2
    eye = torch.eye(k, dtype=torch.float64, device=X.device)
    deviation = gram - eye
    deviation_rounding = _UNIT_ROUNDOFF_FP64 * torch.linalg.matrix_norm(deviation)

    sigma_sq_gram = _symmetric_norm_bound(gram, n_iter) + gram_rounding
    sigma_sq_near_ortho = (
        1 + _symmetric_norm_bound(deviation, n_iter) + gram_rounding + deviation_rounding
    )
    sigma_sq = torch.minimum(sigma_sq_gram, sigma_sq_near_ortho)
    bound = torch.sqrt(sigma_sq) * (1 + SAFETY_MARGIN)
    return bound.reshape(W.shape[:-2])


def power_iteration(
    W: torch.Tensor, n_iter: int = 100, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Power-iteration *estimate* of sigma_max for each matrix in ``(..., m, n)`` (float64 result).

    It is ||W v|| for a unit vector v, hence a lower bound on sigma_max (up to rounding): the
    comparison point that shows how tight ``spectral_norm_bound`` is. Never use it in a certificate.
    """
    check_matrices(W, allow_zero=True)
    positive_int(n_iter, "n_iter")
    X = W.detach().to(torch.float64)
    X = X.reshape(-1, *X.shape[-2:])
    v = torch.randn(X.shape[0], X.shape[-1], 1, dtype=torch.float64, generator=generator)
    v = v.to(X.device)
    for _ in range(n_iter):
        v = X.mT @ (X @ v)
        v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(1e-300)
    return torch.linalg.vector_norm(X @ v, dim=(-2, -1)).reshape(W.shape[:-2])
