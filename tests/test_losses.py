"""The losses' stated Lipschitz constants (what certificates and private training rely on) hold
per sample, and ClippedLossGradient clips each sample's logit gradient to its bound."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lipnet.nn as ln


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 6), seed=st.integers(0, 1000), temperature=st.floats(0.05, 4.0), offset=st.floats(0, 3))
def test_loss_lipschitz_constants(n, seed, temperature, offset):
    g = torch.Generator().manual_seed(seed)
    z = (5 * torch.randn(8, n, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, n, (8,), generator=g)
    for loss in (ln.LipschitzCrossEntropy(temperature, offset, reduction="none"), ln.MultiMarginHinge(offset, reduction="none")):
        grads = torch.autograd.grad(loss(z, y).sum(), z)[0]  # row i: gradient of sample i's loss
        assert (grads.norm(dim=1) <= loss.lipschitz * (1 + 1e-12)).all()
        z2 = z.detach() + torch.randn(8, n, generator=g, dtype=torch.float64)
        diff = (loss(z.detach(), y) - loss(z2, y)).abs()
        assert (diff <= loss.lipschitz * (z.detach() - z2).norm(dim=1) + 1e-12).all()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 6), seed=st.integers(0, 1000), temperature=st.floats(0.05, 4.0), offset=st.floats(0, 3),
       clip=st.floats(0.01, 2.0), hinge=st.booleans())
def test_clipped_loss_gradient_clips_each_sample_and_keeps_the_value(n, seed, temperature, offset, clip, hinge):
    g = torch.Generator().manual_seed(seed)
    z = (5 * torch.randn(8, n, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, n, (8,), generator=g)
    base = ln.MultiMarginHinge(offset, reduction="none") if hinge else ln.LipschitzCrossEntropy(temperature, offset, reduction="none")
    clipped = ln.ClippedLossGradient(base, clip)
    assert clipped.lipschitz == clip and clipped.reduction == "none"
    values = clipped(z, y)
    torch.testing.assert_close(values, base(z, y))
    raw = torch.autograd.grad(base(z, y).sum(), z)[0]
    weights = torch.rand(8, generator=g, dtype=torch.float64)   # any upstream per-sample weights (mean: 1/B)
    got = torch.autograd.grad((values * weights).sum(), z)[0]
    norms = raw.norm(dim=1, keepdim=True)
    expected = weights[:, None] * raw * torch.where(norms > clip, clip / norms.clamp_min(1e-300), torch.ones_like(norms))
    torch.testing.assert_close(got, expected)
    assert (got.norm(dim=1) <= weights * clip * (1 + 1e-12)).all()
    for reduction, scale in (("mean", 1 / 8), ("sum", 1.0)):
        reduced = ln.ClippedLossGradient(base, clip, reduction=reduction)
        out = reduced(z, y)
        torch.testing.assert_close(out, base(z, y).sum() * scale)
        torch.testing.assert_close(torch.autograd.grad(out, z)[0], expected / weights[:, None] * scale)
    assert base.reduction == "none"  # the wrapper leaves the wrapped loss' own reduction alone


def test_clipped_loss_gradient_bounds_each_row_even_for_a_batch_coupled_loss():
    class Coupled(nn.Module):  # each value depends on the whole batch (through the batch mean)
        reduction = "none"

        def forward(self, z, y):
            return F.cross_entropy(z - 3 * z.mean(0, keepdim=True), y, reduction=self.reduction)

    z = (4 * torch.randn(16, 5, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, 5, (16,))
    coupled = Coupled()
    raw = torch.autograd.grad(coupled(z, y).sum(), z)[0]
    assert raw.norm(dim=1).max() > 0.5       # the batch call's own rows exceed the clip
    grads = torch.autograd.grad(ln.ClippedLossGradient(coupled, 0.5)(z, y).sum(), z)[0]
    assert (grads.norm(dim=1) <= 0.5 * (1 + 1e-12)).all()


def test_clipped_loss_gradient_refuses_bad_arguments():
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="clip must be finite and > 0"):
            ln.ClippedLossGradient(ln.LipschitzCrossEntropy(), bad)
    with pytest.raises(TypeError, match="no `reduction`"):
        ln.ClippedLossGradient(lambda z, y: z.sum(), 1.0)
    with pytest.raises(ValueError, match="logits must be"):
        ln.ClippedLossGradient(ln.LipschitzCrossEntropy(), 1.0)(torch.randn(4), torch.zeros(4, dtype=torch.long))
