"""The core's retraction (lipnet.ortho.retract): orthogonal to the working precision from any start,
the exact polar factor near the manifold, and the step counts and residual bound it relies on."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipnet.ortho import RETRACTION_TOLERANCE, orthogonalize, retract, retract_
from lipnet.ortho.retraction import QUINTIC_BASIN, SCALED_BASIN, _gram_residual, quintic_steps_for
from lipnet.ortho.schedules import NEWTON_SCHULZ_QUINTIC, apply_scalar_map


def orthogonality_error(W: torch.Tensor) -> float:
    return float((torch.linalg.svdvals(W.double()) - 1).abs().max())


def exact_polar(W: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return U @ Vh


def random_orthogonal(shape, generator) -> torch.Tensor:
    *batch, m, n = shape
    Q, _ = torch.linalg.qr(torch.randn(*batch, max(m, n), min(m, n), generator=generator))
    return Q if m >= n else Q.mT


@settings(max_examples=40, deadline=None)
@given(residual=st.floats(0, SCALED_BASIN), scaled=st.booleans())
def test_quintic_step_count_is_the_fewest_that_converge(residual, scaled):
    def err(steps, r, points=20001):  # worst |p^steps(sigma) - 1| over the interval sigma lies in
        lo, hi = (math.sqrt((1 - r) / (1 + r)), 1.0) if scaled else (math.sqrt(1 - r), math.sqrt(1 + r))
        x = np.linspace(lo, hi, points)
        return np.abs(apply_scalar_map(x, (NEWTON_SCHULZ_QUINTIC,) * steps) - 1).max()

    steps = quintic_steps_for(residual, scaled)
    assert err(steps, residual) <= RETRACTION_TOLERANCE * 1.01
    rounded_up = math.ceil(residual * 1e4) / 1e4  # what the count is computed for (conservative)
    assert steps == 0 or err(steps - 1, min(rounded_up, SCALED_BASIN), 4001) > RETRACTION_TOLERANCE


def test_quintic_step_count_refuses_outside_the_basin():
    with pytest.raises(ValueError, match="basin"):
        quintic_steps_for(1.3)
    with pytest.raises(ValueError, match="basin"):
        quintic_steps_for(0.99, scaled=True)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 24), scale=st.floats(1e-3, 1.0), seed=st.integers(0, 10_000))
def test_gram_residual_is_an_upper_bound(k, scale, seed):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(k, k, generator=g, dtype=torch.float64) * scale
    A = torch.eye(k, dtype=torch.float64) + (E + E.mT) / 2
    assert _gram_residual(A[None]) >= float(torch.linalg.matrix_norm(A - torch.eye(k, dtype=torch.float64), 2)) * (1 - 1e-12)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), m=st.integers(1, 40), n=st.integers(1, 40), noise=st.sampled_from([0.0, 1e-4, 1e-2, 0.1]),
       seed=st.integers(0, 10_000))
def test_near_orthogonal_inputs_go_to_their_polar_factor(batch, m, n, noise, seed):
    g = torch.Generator().manual_seed(seed)
    Q = random_orthogonal((batch, m, n), g)
    W = Q + noise * torch.randn(Q.shape, generator=g) / math.sqrt(max(m, n))
    R = retract(W)
    assert R.shape == W.shape and R.dtype == W.dtype
    assert orthogonality_error(R) <= 1e-5
    assert torch.allclose(R.double(), exact_polar(W), atol=1e-5)


@pytest.mark.parametrize("shape", [(512, 1024), (64, 256), (200, 64)])
def test_far_inputs_end_orthogonal(shape):
    """An Adam-sized sign update of a low-rank gradient (||D||_2 ~ 2) and ill-conditioned inputs:
    outside the quintic's basin, still orthogonal, and still the polar factor where the convergent
    schedule reaches it."""
    g = torch.Generator().manual_seed(0)
    Q = random_orthogonal(shape, g)
    m, n = shape
    gradient = torch.randn(m, 1, generator=g) @ torch.randn(1, n, generator=g)
    W = Q + 2 / math.sqrt(m * n) * gradient.sign()  # rank one, ||D||_2 = 2 (2e-3 per entry at 512 x 4096)
    A = (W @ W.mT) if m <= n else (W.mT @ W)
    assert _gram_residual(A[None]) > QUINTIC_BASIN  # this input exercises the fallback
    R = retract(W)
    assert orthogonality_error(R) <= 1e-5
    assert torch.allclose(R.double(), exact_polar(W), atol=1e-4)


@pytest.mark.parametrize("method", ["convergent", "bjorck", "svd"])
def test_ill_conditioned_and_rank_deficient_inputs_end_orthogonal(method):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(32, 32, generator=g) @ torch.diag(torch.logspace(-6, 1, 32))
    assert orthogonality_error(retract(W, method)) <= 1e-5
    low_rank = torch.randn(20, 3, generator=g) @ torch.randn(3, 30, generator=g)
    assert orthogonality_error(retract(low_rank, method)) <= 1e-5


def test_fp64_and_autocast():
    g = torch.Generator().manual_seed(2)
    W = random_orthogonal((3, 16, 48), g).double() + 1e-3 * torch.randn(3, 16, 48, generator=g, dtype=torch.float64)
    R = retract(W)
    assert R.dtype == torch.float64 and orthogonality_error(R) <= 1e-12
    W32 = W.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = retract(W32)
    assert inside.dtype == torch.float32 and torch.equal(inside, retract(W32))


def test_in_place_and_bad_input():
    g = torch.Generator().manual_seed(3)
    W = random_orthogonal((8, 5), g) + 0.01 * torch.randn(8, 5, generator=g)
    target = retract(W)
    same = retract_(W)
    assert same is W and torch.equal(W, target)
    with pytest.raises(ValueError, match="non-finite"):
        retract(torch.full((3, 3), math.nan))
    with pytest.raises(ValueError, match="zero matrix"):
        retract(torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="method"):
        retract(torch.eye(3), method="turbo")


def test_orthogonalize_ignores_autocast():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(4, 32, 64, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = orthogonalize(W, method="convergent")
    assert inside.dtype == torch.float32 and torch.equal(inside, orthogonalize(W, method="convergent"))
