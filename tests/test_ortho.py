"""The orthogonalization core: shapes, bands, convergence, gradients, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipnet.ortho import METHODS, aol_rescale, orthogonalize, spectral_norm_bound
from lipnet.ortho.schedules import (
    CONVERGENT_SCHEDULE,
    DION_LAST4_SCHEDULE,
    DOCUMENTED_BANDS,
    KELLER_JORDAN_NS5,
    ROUNDING_SLACK,
    TURBO_SCHEDULE,
    apply_scalar_map,
    minimax_quintic_schedule,
    singular_value_band,
)
from strategies import any_matrix, batch_dims, seeds, shapes, well_conditioned

SCHEDULES = {"ns5": KELLER_JORDAN_NS5, "turbo": TURBO_SCHEDULE, "convergent": CONVERGENT_SCHEDULE}


def svdvals64(W: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(W.to(torch.float64))


def prescaled_singular_values(W: torch.Tensor, method: str) -> torch.Tensor:
    """Singular values the polynomial iteration starts from (per matrix, float64)."""
    W = W.to(torch.float64)
    if method == "ns5":
        return svdvals64(W) / (torch.linalg.matrix_norm(W)[..., None] + 1e-7)
    return svdvals64(aol_rescale(W))


def orthogonality_error(Q: torch.Tensor) -> float:
    Q = Q.to(torch.float64)
    if Q.shape[-2] > Q.shape[-1]:
        Q = Q.mT
    eye = torch.eye(Q.shape[-2], dtype=torch.float64)
    return torch.linalg.matrix_norm(Q @ Q.mT - eye, ord=2).max().item()


# ---------------------------------------------------------------- documented bands and schedules


@pytest.mark.parametrize("method", ["ns5", "turbo", "convergent"])
def test_documented_band_contains_scalar_map(method):
    lower, band_min, band_max = DOCUMENTED_BANDS[method]
    lo, hi = singular_value_band(SCHEDULES[method], lower)
    assert band_min <= lo and hi <= band_max, (lo, hi)


def test_turbo_schedule_is_its_minimax_derivation():
    derived = np.array(minimax_quintic_schedule(3e-3, 4, slack=ROUNDING_SLACK))
    np.testing.assert_allclose(derived, np.array(TURBO_SCHEDULE), rtol=1e-3, atol=1e-4)


def test_convergent_schedule_is_its_minimax_derivation():
    derived = np.array(minimax_quintic_schedule(1e-3, 6, slack=ROUNDING_SLACK))
    np.testing.assert_allclose(derived, np.array(CONVERGENT_SCHEDULE[:6]), rtol=1e-3, atol=1e-4)


def test_turbo_lifts_small_singular_values_faster_than_dropping_dions_first_step():
    # The reason we derived our own schedule: 4 of Dion's 5 tuples leave 1e-3 at ~0.12.
    x = np.array([3e-3])
    assert apply_scalar_map(x, TURBO_SCHEDULE)[0] > 0.8 > apply_scalar_map(x, DION_LAST4_SCHEDULE)[0]


# ---------------------------------------------------------------- shapes, dtypes


@settings(max_examples=30, deadline=None)
@given(shape=shapes, batch=batch_dims, method=st.sampled_from(METHODS), seed=seeds)
def test_shape_and_dtype_preserved(shape, batch, method, seed):
    W = torch.randn(*batch, *shape, generator=torch.Generator().manual_seed(seed))
    Q = orthogonalize(W, method)
    assert Q.shape == W.shape and Q.dtype == W.dtype
    assert torch.isfinite(Q).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes(dtype):
    W = torch.randn(2, 12, 20).to(dtype)
    Q = orthogonalize(W, "convergent")
    assert Q.dtype == dtype
    tol = 1e-6 if dtype == torch.float64 else 3e-2  # bf16 storage rounds to ~4e-3 per entry
    assert orthogonality_error(Q) < tol


# ---------------------------------------------------------------- bands: ns5 and turbo


@settings(max_examples=40, deadline=None)
@given(case=well_conditioned(max_condition=10.0), method=st.sampled_from(["ns5", "turbo"]),
       form=st.sampled_from(["direct", "gram"]))
def test_output_singular_values_follow_the_scalar_map_and_band(case, method, form):
    W, _ = case
    start = prescaled_singular_values(W, method)
    lower, band_min, band_max = DOCUMENTED_BANDS[method]
    assert start.min() >= lower  # well-conditioned inputs are inside the documented region
    out = svdvals64(orthogonalize(W, method, form=form))
    expected = torch.from_numpy(apply_scalar_map(start.numpy(), SCHEDULES[method]))
    # the polynomial need not be monotone, so compare sorted values
    torch.testing.assert_close(out.sort(-1).values, expected.sort(-1).values, atol=2e-4, rtol=0)
    assert out.min() >= band_min - 2e-4 and out.max() <= band_max + 2e-4


@settings(max_examples=40, deadline=None)
@given(W=any_matrix(), method=st.sampled_from(["ns5", "turbo"]), form=st.sampled_from(["direct", "gram"]))
def test_band_max_holds_for_any_input(W, method, form):
    # Below the documented lower threshold values are not lifted into the band, but nothing grows
    # past the supremum of the scalar map over (0, 1] (prescaling guarantees sigma <= 1).
    _, sup = singular_value_band(SCHEDULES[method], 1e-9)
    assert sup < 1.23
    out = svdvals64(orthogonalize(W, method, form=form))
    assert out.max() <= sup + 2e-4


def _conditioned(k: int, n: int, condition: float, batch: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(batch, k, k, dtype=torch.float64, generator=g))[0]
    V = torch.linalg.qr(torch.randn(batch, n, k, dtype=torch.float64, generator=g))[0]
    return ((U * torch.logspace(0, -math.log10(condition), k, dtype=torch.float64)) @ V.mT).float()


@pytest.mark.parametrize("method", ["ns5", "turbo"])
@pytest.mark.parametrize("shape", [(32, 288), (64, 576), (576, 64), (16, 16)])
@pytest.mark.parametrize("condition", [1.0, 1e2, 1e3])
def test_gram_form_matches_direct_form(method, shape, condition):
    # Same polynomial steps on the k x k side: equal to the direct form up to fp32 rounding,
    # compared with the fp64 direct iteration as reference.
    W = _conditioned(min(shape), max(shape), condition)
    W = W.mT if shape[0] > shape[1] else W
    ref = orthogonalize(W.double(), method, form="direct")
    for form, tol in [("direct", 1e-4), ("gram", 1e-3)]:
        err = torch.linalg.matrix_norm(orthogonalize(W, method, form=form).double() - ref) / torch.linalg.matrix_norm(ref)
        assert err.max() < tol, (form, err.max().item())


def test_auto_form_picks_gram_for_wide_fp32_optimizer_methods_only():
    W = torch.randn(3, 16, 64)
    assert torch.equal(orthogonalize(W, "turbo"), orthogonalize(W, "turbo", form="gram"))
    assert torch.equal(orthogonalize(W.mT, "ns5"), orthogonalize(W.mT, "ns5", form="gram"))
    assert torch.equal(orthogonalize(W, "convergent"), orthogonalize(W, "convergent", form="direct"))
    square = torch.randn(16, 16)
    assert torch.equal(orthogonalize(square, "turbo"), orthogonalize(square, "turbo", form="direct"))
    assert torch.equal(orthogonalize(W, "turbo", low_precision=True),
                       orthogonalize(W, "turbo", low_precision=True, form="direct"))


def test_gram_form_gradients_match_direct_form():
    W = torch.randn(2, 8, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    target = torch.randn(2, 8, 40, dtype=torch.float64)
    grads = []
    for form in ["direct", "gram"]:
        Wf = W.clone().requires_grad_(True)
        (orthogonalize(Wf, "turbo", form=form) * target).sum().backward()
        grads.append(Wf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- convergent methods (layers)


@settings(max_examples=40, deadline=None)
@given(case=well_conditioned(max_condition=100.0), method=st.sampled_from(["convergent", "bjorck"]))
def test_convergent_methods_reach_orthogonality(case, method):
    W, _ = case
    Q = orthogonalize(W, method)
    assert orthogonality_error(Q) <= 1e-3
    sv = svdvals64(Q)
    assert (sv - 1).abs().max() <= 1e-3
    assert spectral_norm_bound(Q).max() <= 1 + 1e-3


@settings(max_examples=40, deadline=None)
@given(W=any_matrix())
def test_bjorck_never_exceeds_one(W):
    assert svdvals64(orthogonalize(W, "bjorck")).max() <= 1 + 1e-5


def test_low_precision_path_keeps_convergence():
    # bf16 for the early steps, fp32 for the last two; runs on CPU too.
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    W = U * torch.linspace(0.1, 1.0, 64)
    Q = orthogonalize(W, "convergent", low_precision=True)
    assert orthogonality_error(Q) <= 1e-3
    assert spectral_norm_bound(Q).item() <= 1 + 1e-3


def test_svd_is_exact_polar_factor():
    W = torch.randn(3, 10, 7, dtype=torch.float64)
    Q = orthogonalize(W, "svd")
    assert orthogonality_error(Q) < 1e-12
    # polar factor: Q^T W is symmetric positive semi-definite
    P = Q.mT @ W
    torch.testing.assert_close(P, P.mT)
    assert torch.linalg.eigvalsh(P).min() > -1e-12


def test_convergent_matches_svd_on_orthogonal_rows():
    # AOL leaves matrices with orthogonal rows unscaled, so every method hits the exact polar factor.
    W = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))[0] * 3.0
    for method in ["convergent", "bjorck"]:
        torch.testing.assert_close(orthogonalize(W, method), orthogonalize(W, "svd"), atol=1e-6, rtol=0)


def test_steps_override():
    W = torch.randn(16, 16)
    assert not torch.equal(orthogonalize(W, "turbo", steps=2), orthogonalize(W, "turbo"))
    # more steps than the derived schedule continue with convergent Newton-Schulz steps
    well = torch.linalg.qr(torch.randn(16, 16))[0] * torch.linspace(0.5, 1, 16)
    assert orthogonality_error(orthogonalize(well, "turbo", steps=8)) < 1e-4


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(8, 8), (5, 12), (12, 5), (2, 1, 9)])
def test_gradients_are_finite(method, shape):
    W = torch.randn(*shape, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    W.requires_grad_(True)
    target = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    (orthogonalize(W, method) * target).sum().backward()
    assert torch.isfinite(W.grad).all() and W.grad.abs().sum() > 0


def test_gradient_matches_finite_differences():
    W = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: orthogonalize(w, "convergent"), (W,))


@settings(max_examples=25, deadline=None)
@given(case=well_conditioned(max_condition=50.0), method=st.sampled_from(["convergent", "bjorck"]))
def test_polar_backward_matches_the_iteration(case, method):
    """backward="polar" (implicit derivative of the exact polar factor) equals autograd through the
    converged iteration, in fp64, for inputs the schedule converges on, relative to the derivative's
    scale ||G|| / sigma_min(W). Not relative to ||g_iter||: for a (near-)orthogonal W and a G mostly
    normal to the manifold g_iter is small, and the convergent schedule's own derivative keeps a
    residual there (its composed polynomial's slope near sigma = 1 is ~1e-5, not 0; up to 1.4e-4 of
    the scale was seen for kappa = 1.01), which the exact derivative does not have."""
    W, _ = case
    W = W.double().requires_grad_(True)
    G = torch.randn(W.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (g_iter,) = torch.autograd.grad(orthogonalize(W, method), W, G)
    Q = orthogonalize(W, method, backward="polar")
    (g_polar,) = torch.autograd.grad(Q, W, G)
    assert torch.equal(Q.detach(), orthogonalize(W.detach(), method))  # same forward
    scale = G.norm() / torch.linalg.svdvals(W.detach()).min()
    assert (g_polar - g_iter).norm() <= 1e-3 * scale


def test_polar_backward_options():
    W = torch.randn(3, 8, 5, requires_grad=True)
    (orthogonalize(W, "convergent", backward="polar", low_precision=True) ** 3).sum().backward()
    assert torch.isfinite(W.grad).all()
    with pytest.raises(ValueError, match="converging method"):
        orthogonalize(W, "turbo", backward="polar")
    with pytest.raises(ValueError, match="backward must be"):
        orthogonalize(W, "convergent", backward="implicit")


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "W, message",
    [
        (torch.randn(5), "at least 2 dims"),
        (torch.tensor(1.0), "at least 2 dims"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "non-finite"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), "non-finite"),
        (torch.zeros(4, 4), "zero matrix"),
        (torch.stack([torch.eye(3), torch.zeros(3, 3)]), "zero matrix"),
        (torch.ones(3, 3, dtype=torch.int64), "floating-point"),
        (torch.empty(0, 3), "empty"),
    ],
)
def test_bad_matrices_raise(W, message):
    with pytest.raises(ValueError, match=message):
        orthogonalize(W)


@pytest.mark.parametrize("steps", [0, -1, 1.5, True, "4"])
def test_bad_steps_raise(steps):
    with pytest.raises(ValueError, match="steps"):
        orthogonalize(torch.randn(4, 4), "turbo", steps=steps)


def test_bad_form_raises():
    with pytest.raises(ValueError, match="form must be one of"):
        orthogonalize(torch.randn(4, 8), "turbo", form="fast")
    with pytest.raises(ValueError, match="fp32/fp64 only"):
        orthogonalize(torch.randn(4, 8), "turbo", form="gram", low_precision=True)


def test_unknown_method_and_svd_steps_raise():
    with pytest.raises(ValueError, match="unknown method"):
        orthogonalize(torch.randn(4, 4), "qr")
    with pytest.raises(ValueError, match="svd"):
        orthogonalize(torch.randn(4, 4), "svd", steps=3)
    with pytest.raises(TypeError):
        orthogonalize([[1.0, 0.0], [0.0, 1.0]])


@pytest.mark.parametrize("method", ["ns5", "turbo", "convergent", "bjorck"])
def test_zero_matrix_without_validation_maps_to_zero(method):
    # The optimizer skips validation (no host sync); an all-zero gradient must not become NaN.
    W = torch.stack([torch.zeros(4, 6), torch.randn(4, 6)])
    Q = orthogonalize(W, method, validate=False)
    assert torch.isfinite(Q).all() and torch.equal(Q[0], torch.zeros(4, 6))
    Qg = orthogonalize(W, method, validate=False, form="gram")
    assert torch.isfinite(Qg).all() and torch.equal(Qg[0], torch.zeros(4, 6))
    assert math.isclose(svdvals64(Q[1]).max().item(), svdvals64(orthogonalize(W[1], method)).max().item(), rel_tol=1e-5)
