"""GroupNormalization: its data-independent output bound and Lipschitz bound survive attacks, and the
privacy analysis' gradient bound through it holds for real per-sample gradients of any input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lipnet.nn as ln
from lipnet.privacy import gradient_norm_bounds, per_sample_gradient_norms

TOL = 1e-6


def _adversarial_batch(shape, seed: int, scale: float) -> torch.Tensor:
    """Random samples, near-constant ones (groups of tiny variance: the hardest case for the
    Lipschitz bound) and huge ones, all in one float64 batch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, *shape, generator=g, dtype=torch.float64) * scale
    x[1] = 3.0 + 1e-4 * x[1]              # nearly constant
    x[2] = 1e6 * x[2]                      # huge
    x[3] = 0.0                             # zero
    return x


def test_it_is_torch_group_norm_without_affine_and_refuses_bad_arguments():
    x = torch.randn(3, 6, 4, 4)
    torch.testing.assert_close(ln.GroupNormalization(3, 6)(x), nn.GroupNorm(3, 6, affine=False)(x))
    for args, match in (((4, 6), "divisible"), ((0, 6), "num_groups"), ((2, 6.0), "num_channels")):
        with pytest.raises(ValueError, match=match):
            ln.GroupNormalization(*args)
    with pytest.raises(ValueError, match="eps"):
        ln.GroupNormalization(2, 6, eps=0.0)
    with pytest.raises(ValueError, match="expected"):
        ln.GroupNormalization(2, 6)(torch.randn(3, 4, 2, 2))


@settings(max_examples=30, deadline=None)
@given(groups=st.sampled_from([1, 2, 4]), seed=st.integers(0, 10_000), scale=st.floats(1e-4, 1e4),
       eps=st.sampled_from([1e-5, 1e-2, 1.0]))
def test_every_output_norm_is_within_sqrt_of_the_entries(groups, seed, scale, eps):
    shape = (4, 3, 5)
    x = _adversarial_batch(shape, seed, scale)
    y = ln.GroupNormalization(groups, 4, eps=eps)(x)
    bound = ln.GroupNormalization.output_norm_bound(shape)
    assert bound == math.sqrt(60)
    assert (y.flatten(1).norm(dim=1) <= bound * (1 + TOL)).all()
    # attained by a sample whose groups have variance >> eps
    big = 1e3 * torch.randn(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assert float(ln.GroupNormalization(groups, 4, eps=eps)(big).norm()) >= 0.999 * bound


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), spread=st.floats(1e-4, 10.0), eps=st.sampled_from([1e-3, 0.1, 1.0]))
def test_the_jacobian_never_exceeds_one_over_sqrt_eps_and_reaches_it_near_constant_groups(seed, spread, eps):
    layer = ln.GroupNormalization(2, 4, eps=eps)
    bound = ln.lipschitz_bound(layer)
    assert bound == pytest.approx(1 / math.sqrt(eps), rel=1e-5)
    x = 2.0 + spread * torch.randn(1, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    jac = torch.autograd.functional.jacobian(lambda v: layer(v.view(1, 4, 2, 2)).flatten(), x.flatten())
    assert float(torch.linalg.matrix_norm(jac, ord=2)) <= bound * (1 + TOL)
    constant = torch.full((1, 4, 2, 2), 2.0, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v.view(1, 4, 2, 2)).flatten(), constant.flatten())
    assert float(torch.linalg.matrix_norm(jac, ord=2)) >= 0.999 * bound / (1 + 1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e5), bias=st.booleans(),
       clip=st.sampled_from([None, 0.05]))
def test_per_sample_gradients_after_it_stay_within_the_bound_for_inputs_of_any_norm(seed, scale, bias, clip):
    """The input bound handed to the analysis is tiny compared with the inputs' norms (up to 1e6 times):
    the bound after the layer comes from sqrt(entries) alone, so it must hold regardless."""
    torch.manual_seed(seed)
    shape = (4, 3, 3)
    model = nn.Sequential(ln.GroupNormalization(2, 4), nn.Flatten(), nn.Linear(36, 5, bias=bias)).double()
    with torch.no_grad():
        model[2].weight.mul_(20.0)  # saturate the loss: per-sample logit gradients near their bound
    loss = ln.LipschitzCrossEntropy(temperature=1.0, offset=0.0)
    if clip:
        loss = ln.ClippedLossGradient(loss, clip)
    x = _adversarial_batch(shape, seed, scale)
    y = torch.randint(0, 5, (len(x),), generator=torch.Generator().manual_seed(seed))
    report = gradient_norm_bounds(model, 1.0, loss, shape)
    assert report.bounds[0].bound <= math.sqrt(36) * report.loss_lipschitz * (1 + 2e-4)
    norms = per_sample_gradient_norms(model, report, x, y, loss)
    for b in report.bounds:
        assert norms[b.name].max() <= b.bound * (1 + TOL), (b.name, float(norms[b.name].max()), b.bound)
    assert norms["total"].max() <= report.total * (1 + TOL)
    if clip:  # a saturated, unfitted sample on a full-norm feature vector takes ~ the whole bound
        assert float(norms[report.bounds[0].name].max()) >= 0.9 * report.bounds[0].bound
