"""Soft-HKR, log-sum-exp HKR and tau-BCE: values against a direct per-sample computation of their
formulas, Lipschitz constants never exceeded (autograd, gradient-norm ascent, value pairs) and
attained where stated, privacy accepting them, bad arguments refused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lipnet.nn as ln
from lipnet.privacy import loss_lipschitz


def _lse_direct(z, y, alpha, m, temperature, penalty):
    out = []
    for row, label in zip(z * temperature, y.tolist()):
        others = torch.cat([row[:label], row[label + 1:]])
        if len(others) == 1:
            neg = others[0]
        else:
            t = math.log(len(others)) / (penalty * m / 2)
            neg = torch.logsumexp(t * others, 0) / t  # the formula's log-sum-exp, without exp's overflow
        pos = row[label]
        out.append((1 - alpha) * (neg - pos) + alpha * (F.relu(m / 2 - pos) + F.relu(m / 2 + neg)))
    return torch.stack(out)


def _soft_direct(z, y, alpha, m, temperature):
    out = []
    for row, label in zip(z, y.tolist()):
        others = torch.cat([row[:label], row[label + 1:]])
        w = torch.exp(temperature * others) / torch.exp(temperature * others).sum()
        pos = row[label]
        kr = (w * others).sum() - pos
        hinge = F.relu(m / 2 - pos) + (w * F.relu(m / 2 + others)).sum()
        out.append((1 - alpha) * kr + alpha * hinge)
    return torch.stack(out)


def _per_sample_gradient_norms(loss, z, y):
    z = z.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(z, y).sum(), z)  # reduction "none": row i depends on z_i only
    return grad.norm(dim=1)


def _losses(k, alpha, m, temperature):
    return [ln.LseHKRLoss(k, alpha, m, temperature, reduction="none"),
            ln.SoftHKRLoss(k, alpha, m, temperature, reduction="none")]


@settings(max_examples=25, deadline=None)
@given(k=st.integers(2, 6), alpha=st.floats(0, 1), m=st.floats(0.1, 3), temperature=st.floats(0.1, 5),
       penalty=st.floats(0.2, 3), seed=st.integers(0, 1000))
def test_values_match_the_formulas_for_indices_and_one_hot(k, alpha, m, temperature, penalty, seed):
    g = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(8, k, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (8,), generator=g)
    lse = ln.LseHKRLoss(k, alpha, m, temperature, penalty, reduction="none")
    assert torch.allclose(lse(z, y), _lse_direct(z, y, alpha, m, temperature, penalty))
    soft = ln.SoftHKRLoss(k, alpha, m, temperature, reduction="none")
    assert torch.allclose(soft(z, y), _soft_direct(z, y, alpha, m, temperature))
    one_hot = F.one_hot(y, k)
    assert torch.equal(lse(z, one_hot), lse(z, y)) and torch.equal(soft(z, y.int()), soft(z, y))
    assert torch.allclose(ln.SoftHKRLoss(k, alpha, m, temperature)(z, y), soft(z, y).mean())


@settings(max_examples=25, deadline=None)
@given(k=st.integers(2, 8), alpha=st.floats(0, 1), m=st.floats(0.1, 3), temperature=st.floats(0.05, 10),
       scale=st.sampled_from([0.1, 1.0, 10.0]), seed=st.integers(0, 1000))
def test_gradients_and_value_differences_never_exceed_the_stated_constant(k, alpha, m, temperature, scale, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (64,), generator=g)
    for loss in _losses(k, alpha, m, temperature):
        lip = loss.lipschitz
        # random logits, then gradient-norm ascent from them
        z = (scale * torch.randn(64, k, generator=g, dtype=torch.float64)).requires_grad_()
        opt = torch.optim.Adam([z], lr=0.1 * scale)
        worst = 0.0
        for _ in range(30):
            zz = z.clone()
            (grad,) = torch.autograd.grad(loss(zz, y).sum(), zz, create_graph=True)
            norms = grad.norm(dim=1)
            worst = max(worst, norms.max().item())
            opt.zero_grad()
            (-norms.sum()).backward()
            opt.step()
        assert worst <= lip * (1 + 1e-9), (type(loss).__name__, worst, lip)
        # the value itself: |l(a) - l(b)| <= L ||a - b||
        a = scale * torch.randn(64, k, generator=g, dtype=torch.float64)
        b = a + scale * torch.randn(64, k, generator=g, dtype=torch.float64)
        ratio = (loss(a, y) - loss(b, y)).abs() / (a - b).norm(dim=1)
        assert ratio.max() <= lip * (1 + 1e-9)


@pytest.mark.parametrize("k", [2, 5, 10])
def test_lse_constant_is_approached(k):
    # true logit below m/2, one other logit dominating: gradient -e_y + e_j, times the temperature
    z = torch.zeros(1, k, dtype=torch.float64)
    z[0, 1] = 50.0
    for temperature in (0.5, 2.0):
        loss = ln.LseHKRLoss(k, alpha=0.5, min_margin=1.0, temperature=temperature, reduction="none")
        norm = _per_sample_gradient_norms(loss, z, torch.tensor([0])).item()
        assert norm >= 0.999 * loss.lipschitz


def test_soft_hkr_constant_is_attained_for_two_classes():
    loss = ln.SoftHKRLoss(2, alpha=0.5, temperature=3.0, reduction="none")
    z = torch.tensor([[-5.0, 5.0]], dtype=torch.float64)
    assert math.isclose(_per_sample_gradient_norms(loss, z, torch.tensor([0])).item(), math.sqrt(2), rel_tol=1e-9)
    assert math.isclose(loss.lipschitz, math.sqrt(2))


@pytest.mark.parametrize("k", [1, 4])
def test_tau_bce_is_deel_torchlips_formula_with_its_constant(k):
    g = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(16, k, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (16, k), generator=g) * 2 - 1  # {-1, +1}
    tau = 3.0
    loss = ln.TauBCEWithLogitsLoss(tau, classes=k)
    expected = F.binary_cross_entropy_with_logits(tau * z, (y > 0).double()) / tau
    assert torch.allclose(loss(z, y), expected)
    per_sample = ln.TauBCEWithLogitsLoss(tau, classes=k, reduction="none")
    assert (_per_sample_gradient_norms(per_sample, z, y) < per_sample.lipschitz).all()
    wrong = -40 * y.double()  # every logit far on the wrong side: each partial derivative -> 1/K
    assert _per_sample_gradient_norms(per_sample, wrong, y).min() >= 0.999 / math.sqrt(k)
    if k == 1:  # (batch,) logits and labels too
        assert torch.allclose(loss(z[:, 0], y[:, 0]), expected)


def test_privacy_accepts_the_stated_constants():
    for loss in (ln.LseHKRLoss(10, temperature=2.0), ln.SoftHKRLoss(10), ln.TauBCEWithLogitsLoss(2.0, classes=4)):
        assert loss_lipschitz(loss) == loss.lipschitz


@pytest.mark.parametrize("make,match", [
    (lambda: ln.LseHKRLoss(1), "classes must be >= 2"),
    (lambda: ln.SoftHKRLoss(1), "classes must be >= 2"),
    (lambda: ln.SoftHKRLoss(3, alpha=1.5), "alpha"),
    (lambda: ln.LseHKRLoss(3, temperature=0), "temperature"),
    (lambda: ln.LseHKRLoss(3, penalty=-1), "penalty"),
    (lambda: ln.LseHKRLoss(3, min_margin=0), "min_margin"),
    (lambda: ln.TauBCEWithLogitsLoss(0.0), "tau"),
    (lambda: ln.SoftHKRLoss(3, reduction="avg"), "reduction"),
])
def test_bad_arguments_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_targets_are_refused():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="built for 3"):
        ln.SoftHKRLoss(3)(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        ln.LseHKRLoss(3)(z, torch.zeros(4))
    with pytest.raises(ValueError, match="shape"):
        ln.TauBCEWithLogitsLoss(1.0, classes=3)(z, torch.zeros(4))
