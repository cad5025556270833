"""KR / hinge / HKR / tau-CE losses: values as defined (checked against a direct per-class
computation), every label encoding, Lipschitz constants never exceeded and attained (autograd),
privacy refusing the batch-coupled KR, bad arguments refused."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lipnet.nn as ln
from lipnet.privacy import loss_lipschitz


def _per_class_kr(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean_k (E[z_k | y = k] - E[z_k | y != k]), class by class with explicit masks."""
    terms = []
    for k in range(z.shape[1]):
        pos, neg = y == k, y != k
        terms.append(z[pos, k].mean() - z[neg, k].mean())
    return torch.stack(terms).mean()


def test_batch_kr_is_the_per_class_wasserstein_estimate_and_balanced_equals_it_on_balanced_batches():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (40,), generator=g)
    y[:4] = torch.arange(4)  # every class present
    assert torch.allclose(ln.KRLoss(4, frequencies="batch")(z, y), _per_class_kr(z, y))
    balanced_y = torch.arange(40) % 4
    assert torch.allclose(ln.KRLoss(4)(z, balanced_y), _per_class_kr(z, balanced_y))
    assert torch.allclose(ln.NegKRLoss(4)(z, balanced_y), -_per_class_kr(z, balanced_y))
    # binary: E[z | +] - E[z | -]
    zb, yb = z[:, :1], (torch.arange(40) % 2)
    assert torch.allclose(ln.KRLoss(1)(zb, yb), zb[yb == 1].mean() - zb[yb == 0].mean())


def test_hinge_is_zero_exactly_when_every_margin_holds():
    hinge = ln.HingeMarginLoss(3, min_margin=1.0, reduction="none")
    y = torch.tensor([0, 2])
    ok = torch.tensor([[0.5, -0.5, -0.6], [-0.7, -0.5, 0.9]])
    assert torch.equal(hinge(ok, y), torch.zeros(2))
    bad = ok.clone()
    bad[0, 0] = 0.4  # the true logit below m/2
    assert hinge(bad, y)[0] == pytest.approx((3 - 1) * 0.1 / 3) and hinge(bad, y)[1] == 0
    # binary, labels {0, 1} and {-1, +1} alike
    b = ln.HingeMarginLoss(1, min_margin=2.0, reduction="none")
    z = torch.tensor([[0.5], [-3.0]])
    assert torch.allclose(b(z, torch.tensor([1, 0])), torch.tensor([0.5, 0.0]))
    assert torch.equal(b(z, torch.tensor([1, 0])), b(z, torch.tensor([[1.0], [-1.0]])))


def test_hkr_mixes_hinge_and_kr():
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(12, 5, generator=g), torch.arange(12) % 5
    alpha = 0.7
    expected = alpha * ln.HingeMarginLoss(5, 0.5)(z, y) - (1 - alpha) * ln.KRLoss(5)(z, y)
    assert torch.allclose(ln.HKRLoss(5, alpha, 0.5)(z, y), expected)


def test_every_label_encoding_gives_the_same_loss():
    g = torch.Generator().manual_seed(2)
    z, y = torch.randn(8, 4, generator=g), torch.randint(0, 4, (8,), generator=g)
    onehot = torch.nn.functional.one_hot(y, 4)
    for loss in (ln.KRLoss(4), ln.HingeMarginLoss(4), ln.HKRLoss(4, 0.5), ln.LipschitzCrossEntropy(),
                 ln.MultiMarginHinge(), ln.TauCrossEntropyLoss(4.0)):
        ref = loss(z, y)
        for target in (y.int(), y.to(torch.int16), onehot, onehot.float()):
            assert torch.allclose(loss(z, target), ref), (type(loss).__name__, target.dtype)


def test_tau_cross_entropy_is_tempered_cross_entropy():
    z, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    tau = 5.0
    ref = torch.nn.functional.cross_entropy(tau * z, y) / tau
    assert torch.allclose(ln.TauCrossEntropyLoss(tau)(z, y), ref)


def _per_sample_grad_norms(loss, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    def one(zi, yi):
        return loss(zi[None], yi[None]).sum()
    return torch.func.vmap(torch.func.grad(one))(z, y).norm(dim=1)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 8), seed=st.integers(0, 10_000), alpha=st.floats(0, 1), scale=st.sampled_from([0.1, 1.0, 10.0]))
def test_per_sample_gradients_never_exceed_the_stated_constant(k, seed, alpha, scale):
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(16, k, generator=g, dtype=torch.float64)
    y = torch.randint(0, max(k, 2), (16,), generator=g)
    for loss in (ln.KRLoss(k, reduction="sum"), ln.HingeMarginLoss(k, 1.0, reduction="sum"),
                 ln.HKRLoss(k, alpha, 1.0, reduction="sum")):
        norms = _per_sample_grad_norms(loss, z, y)
        assert (norms <= loss.lipschitz * (1 + 1e-12)).all(), (type(loss).__name__, k, float(norms.max()))


@pytest.mark.parametrize("k", [1, 2, 10])
def test_the_constants_are_attained(k):
    # the true class (binary: the positive one) far below its margin, every other logit far above
    y = torch.full((1,), 1 if k == 1 else 0, dtype=torch.long)
    far = torch.full((1, k), 5.0, dtype=torch.float64)
    far[0, 0] = -5.0
    for loss in (ln.KRLoss(k, reduction="sum"), ln.HingeMarginLoss(k, reduction="sum"),
                 ln.HKRLoss(k, 0.5, reduction="sum")):
        norm = float(_per_sample_grad_norms(loss, far, y)[0])
        if isinstance(loss, ln.HKRLoss):  # the triangle bound: attained when both gradients align
            assert norm <= loss.lipschitz * (1 + 1e-12)
        else:
            assert norm == pytest.approx(loss.lipschitz, rel=1e-12), type(loss).__name__
    # HKR: there the hinge and -KR gradients are parallel, so the triangle bound is attained too
    hkr = ln.HKRLoss(k, 0.5, reduction="sum")
    assert float(_per_sample_grad_norms(hkr, far, y)[0]) == pytest.approx(hkr.lipschitz, rel=1e-12)


def test_privacy_takes_the_per_sample_losses_and_refuses_the_batch_coupled_kr():
    assert loss_lipschitz(ln.KRLoss(10)) == pytest.approx(math.sqrt(10 / 9))
    assert loss_lipschitz(ln.HKRLoss(10, 0.9)) == pytest.approx(0.9 * math.sqrt(0.9) + 0.1 * math.sqrt(10 / 9))
    with pytest.raises(TypeError, match="no Lipschitz constant"):
        loss_lipschitz(ln.KRLoss(10, frequencies="batch"))
    with pytest.raises(TypeError, match="no Lipschitz constant"):
        loss_lipschitz(ln.HKRLoss(10, 0.5, frequencies="batch"))
    assert loss_lipschitz(ln.HKRLoss(10, 1.0, frequencies="batch")) == pytest.approx(math.sqrt(0.9))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="alpha"):
        ln.HKRLoss(10, 1.5)
    with pytest.raises(ValueError, match="reduction"):
        ln.KRLoss(10, reduction="mena")
    with pytest.raises(ValueError, match="frequencies"):
        ln.KRLoss(10, frequencies="uniform")
    with pytest.raises(ValueError, match="classes"):
        ln.HingeMarginLoss(0)
    with pytest.raises(ValueError, match="min_margin"):
        ln.HingeMarginLoss(3, min_margin=-1.0)
    with pytest.raises(ValueError, match="tau"):
        ln.TauCrossEntropyLoss(0.0)
    with pytest.raises(ValueError, match="built for 3"):
        ln.KRLoss(3)(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer class indices"):
        ln.KRLoss(3)(torch.randn(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="integers"):
        ln.LipschitzCrossEntropy()(torch.randn(2, 3), torch.tensor([0.0, 1.0]))
