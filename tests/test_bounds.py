"""spectral_norm_bound is a bound: try to break it; power_iteration is below it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipnet.ortho import METHODS, orthogonalize, power_iteration, spectral_norm_bound
from strategies import any_matrix, matrix_with_spectrum, shapes, seeds


def true_sigma_max(W: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(W.to(torch.float64), ord=2)


@settings(max_examples=150, deadline=None)
@given(W=any_matrix())
def test_bound_is_never_below_sigma_max(W):
    bound = spectral_norm_bound(W)
    assert bound.shape == W.shape[:-2] and bound.dtype == torch.float64
    assert (bound >= true_sigma_max(W)).all()


@settings(max_examples=60, deadline=None)
@given(W=any_matrix(), method=st.sampled_from(METHODS))
def test_bound_holds_on_orthogonalized_weights(W, method):
    # The case layers care about: outputs of the core, nearly orthogonal or inside a band.
    if (torch.linalg.matrix_norm(W) == 0).any():
        return
    Q = orthogonalize(W, method)
    assert (spectral_norm_bound(Q) >= true_sigma_max(Q)).all()


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=seeds, eps=st.floats(0, 1e-2))
def test_bound_on_adversarial_near_orthogonal(shape, seed, eps):
    # sigma_max slightly above 1 with every other singular value exactly 1: the near-orthogonal
    # bound must see the single excess.
    m, n = shape
    sv = torch.ones(min(m, n), dtype=torch.float64)
    sv[0] += eps
    W = matrix_with_spectrum(m, n, sv, seed).float()
    assert spectral_norm_bound(W) >= true_sigma_max(W)
    assert spectral_norm_bound(W) <= (1 + eps) * (1 + 1e-4) + 1e-5


@settings(max_examples=40, deadline=None)
@given(W=any_matrix())
def test_bound_is_tight_as_gram_iteration_promises(W):
    # Gram iteration with t levels overestimates by at most k^(1/2^(t+1)) (k = short side).
    k = min(W.shape[-2:])
    sigma = true_sigma_max(W)
    assert (spectral_norm_bound(W, n_iter=6) <= sigma * k ** (1 / 128) * (1 + 1e-5) + 1e-30).all()


def test_bound_of_exactly_orthogonal_matrix_is_within_margin():
    Q = torch.linalg.qr(torch.randn(256, 256, dtype=torch.float64))[0].float()
    bound = spectral_norm_bound(Q).item()
    assert true_sigma_max(Q).item() <= bound <= 1 + 1e-5


def test_zero_matrix_has_zero_bound():
    assert spectral_norm_bound(torch.zeros(2, 3, 4)).eq(0).all()


def test_power_iteration_is_below_the_bound_and_close():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 30, 20, generator=g)
    estimate = power_iteration(W, generator=g)
    sigma = true_sigma_max(W)
    bound = spectral_norm_bound(W)
    assert (estimate <= sigma * (1 + 1e-12)).all()
    assert (estimate >= 0.95 * sigma).all()
    assert (bound >= sigma).all()


@pytest.mark.parametrize("fn", [spectral_norm_bound, power_iteration])
def test_bad_input_raises(fn):
    with pytest.raises(ValueError, match="non-finite"):
        fn(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="at least 2 dims"):
        fn(torch.ones(3))
    with pytest.raises(ValueError, match="n_iter"):
        fn(torch.ones(3, 3), n_iter=-1)
