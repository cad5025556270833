"""Scattering2d: its Lipschitz bound is computed right (brute force), holds (random pairs, gradient
attacks, hypothesis over sizes/scales/orientations) and is nearly attained; it works inside lipnet
models, export and clipping-free DP-SGD."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lipnet.nn as ln
from lipnet.nn.scattering import Scattering2d, operator_norm_squared, scattering_filters
from lipnet.privacy import gradient_norm_bounds, per_sample_gradient_norms


def _ratio(S: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (S(x) - S(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)


def _attack(S: nn.Module, shape, seed: int, steps: int = 60, batch: int = 4) -> float:
    """Gradient ascent on ||S(x + d) - S(x)|| / ||d|| over x and d (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g, dtype=torch.float64).requires_grad_()
    d = (0.1 * torch.randn(batch, *shape, generator=g, dtype=torch.float64)).requires_grad_()
    opt = torch.optim.Adam([x, d], lr=0.05)
    best = 0.0
    for _ in range(steps):
        r = _ratio(S, x + d, x)
        best = max(best, float(r.detach().max()))
        opt.zero_grad()
        (-r.sum()).backward()
        opt.step()
    return best


def test_operator_norm_matches_the_brute_force_singular_value():
    # T: U -> (s (phi * U)[::s, ::s], psi_l * U) on a small circular grid, as an explicit matrix on real U.
    m, J, L = 8, 1, 3
    s = 2**J
    phi, psi = scattering_filters(m, m, J, L)
    phi, psi = phi * 1.7, psi * 0.8  # off the normalization, so the check is not 1 == 1

    def T(u: torch.Tensor) -> torch.Tensor:
        U = torch.fft.fft2(u.view(m, m))
        low = s * torch.fft.ifft2(U * phi).real[::s, ::s]
        band = torch.fft.ifft2(U * psi)
        return torch.cat([low.flatten(), torch.view_as_real(band).flatten()])

    A = torch.autograd.functional.jacobian(T, torch.zeros(m * m, dtype=torch.float64))
    brute = float(torch.linalg.matrix_norm(A, ord=2))
    assert math.isclose(math.sqrt(operator_norm_squared(phi, psi, s)), brute, rel_tol=1e-9)


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 2), st.integers(6, 20), st.integers(6, 20), st.integers(1, 2), st.integers(1, 6),
       st.integers(0, 10**6))
def test_lipschitz_bound_holds_on_random_pairs_and_attacks(channels, h, w, J, L, seed):
    S = Scattering2d(channels, (h, w), J=J, L=L).double()
    bound = ln.lipschitz_bound(S)
    assert bound <= 1.0 + 1e-5
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, channels, h, w, generator=g, dtype=torch.float64)
    y = x + torch.randn(16, channels, h, w, generator=g, dtype=torch.float64) * torch.logspace(-4, 1, 16).view(-1, 1, 1, 1).double()
    assert float(_ratio(S, x, y).max()) <= bound
    assert _attack(S, (channels, h, w), seed, steps=25) <= bound
    assert S(torch.zeros(1, channels, h, w, dtype=torch.float64)).abs().max() == 0


def test_bound_is_nearly_attained_and_features_keep_most_of_the_energy():
    S = Scattering2d(1, 28).double()
    assert _attack(S, (1, 28, 28), seed=0, steps=150) >= 0.9 * ln.lipschitz_bound(S)
    x = torch.rand(32, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) - 0.5
    kept = S(x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    assert kept.min() > 0.5  # a near-tight frame, not a bound that holds because everything is shrunk


def test_shapes_dtypes_and_export():
    S = Scattering2d(3, (32, 30), J=3, L=4)
    assert S.out_per_channel == 1 + 3 * 4 + 16 * 3
    x = torch.rand(2, 3, 32, 30)
    y = S(x)
    assert y.shape == (2, *S.out_shape) == (2, 3 * 61, 4, 4) and y.dtype == torch.float32
    assert torch.allclose(S(x[0]), y[0], atol=1e-6)  # an unbatched image
    E = ln.export(S)
    assert torch.equal(E(x), y) and ln.lipschitz_bound(E) == ln.lipschitz_bound(S)
    assert Scattering2d(3, (32, 30), J=3, L=4).double()(x.double()).dtype == torch.float64
    assert not list(S.parameters())


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="2\\^J"):
        Scattering2d(1, 8, J=4)
    with pytest.raises(ValueError, match="L must be"):
        Scattering2d(1, 28, L=0)
    S = Scattering2d(1, 28)
    with pytest.raises(ValueError, match="28x28"):
        S(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="channels"):
        S(torch.zeros(1, 3, 28, 28))
    with pytest.raises(ValueError, match="finite|NaN|non-finite"):
        S(torch.full((1, 1, 28, 28), float("nan")))


@pytest.mark.parametrize("head", ["ortho", "plain"])
def test_per_sample_gradients_through_scattering_never_exceed_the_private_bound(head):
    torch.manual_seed(0)
    S = Scattering2d(1, 12, J=2, L=4)
    d = math.prod(S.out_shape)
    last = ln.OrthoLinear(16, 10) if head == "ortho" else nn.Linear(16, 10)
    model = nn.Sequential(ln.InputNormalization((0.1,)), ln.L2BallProjection(3.0), S, ln.Flatten(),
                          ln.OrthoLinear(d, 16), ln.MaxMin(), last).double()
    x = torch.rand(24, 1, 12, 12, dtype=torch.float64) * 4
    y = torch.randint(0, 10, (24,))
    for loss in (ln.LipschitzCrossEntropy(0.1), nn.CrossEntropyLoss()):
        report = gradient_norm_bounds(model, 48.0, loss, (1, 12, 12))
        norms = per_sample_gradient_norms(model, report, x, y, loss)
        for b in report.bounds:
            assert norms[b.name].max() <= b.bound * (1 + 1e-6), (b.name, float(norms[b.name].max()), b.bound)
        assert norms["total"].max() <= report.total
