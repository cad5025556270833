"""torch.func through every layer and loss of lipnet.nn, in both parametrizations.

Per layer: ``jacrev`` and ``jacfwd`` over the input equal ``torch.autograd.functional.jacobian``;
the Jacobian's largest singular value is within ``lipschitz_bound``; ``vmap`` over samples equals
the batched call; ``jvp`` equals J v; ``grad`` of a loss through ``functional_call`` equals
autograd's parameter gradients, and ``vmap(grad(...))`` per-sample gradients sum to the batch's."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap

import lipnet.nn as ln

P = ("retraction", "polar")
# (id, builder, per-sample input shape); each is a function of one sample (vmap adds the batch)
LAYERS = [
    *[(f"OrthoLinear-{p}", lambda p=p: ln.OrthoLinear(5, 4, parametrization=p), (5,)) for p in P],
    *[(f"OrthoConv2d-{p}", lambda p=p: ln.OrthoConv2d(2, 4, 3, parametrization=p), (2, 5, 5)) for p in P],
    *[(f"OrthoConv2d-strided-{p}", lambda p=p: ln.OrthoConv2d(2, 8, 2, stride=2, padding=0, parametrization=p),
       (2, 4, 4)) for p in P],
    *[(f"OrthoConvTranspose2d-{p}", lambda p=p: ln.OrthoConvTranspose2d(4, 2, 3, parametrization=p), (4, 5, 5))
      for p in P],
    *[(f"OrthoConvTranspose2d-strided-{p}",
       lambda p=p: ln.OrthoConvTranspose2d(8, 2, 2, stride=2, padding=0, parametrization=p), (8, 2, 2)) for p in P],
    *[(f"OrthoConv1d-{p}", lambda p=p: ln.OrthoConv1d(2, 4, 3, parametrization=p), (2, 6)) for p in P],
    *[(f"orthogonal(nn.Linear)-{p}", lambda p=p: ln.orthogonal(nn.Linear(4, 4), parametrization=p), (4,)) for p in P],
    ("AOLLinear", lambda: ln.AOLLinear(5, 4), (5,)),
    ("AOLConv2d", lambda: ln.AOLConv2d(2, 3, 3), (2, 5, 5)),
    ("aol(nn.Conv2d)", lambda: ln.aol(nn.Conv2d(2, 2, 3, padding=1)), (2, 4, 4)),
    ("SLLBlock", lambda: ln.SLLBlock(4, 6), (4,)),
    ("SLLBlock-conv", lambda: ln.SLLBlock(2, 3, kernel_size=3), (2, 4, 4)),
    ("ConvexPotentialLayer", lambda: ln.ConvexPotentialLayer(4, 6), (4,)),
    ("ConvexPotentialLayer-conv", lambda: ln.ConvexPotentialLayer(2, 3, kernel_size=3), (2, 4, 4)),
    ("MaxMin", lambda: ln.MaxMin(), (6,)),
    ("Abs", lambda: ln.Abs(), (6,)),
    ("GroupSort", lambda: ln.GroupSort(3), (6,)),
    ("FullSort", lambda: ln.FullSort(), (6,)),
    ("HouseHolder", lambda: ln.HouseHolder(6), (6,)),
    ("LPReLU", lambda: ln.LPReLU(6), (6,)),
    ("L2NormPool2d", lambda: ln.L2NormPool2d(2), (2, 4, 4)),
    ("ScaledAvgPool2d", lambda: ln.ScaledAvgPool2d(2), (2, 4, 4)),
    ("GlobalL2NormPool2d", lambda: ln.GlobalL2NormPool2d(), (2, 4, 4)),
    ("InvertibleDownSampling", lambda: ln.InvertibleDownSampling(2), (2, 4, 4)),
    ("InvertibleUpSampling", lambda: ln.InvertibleUpSampling(2), (8, 2, 2)),
    ("InputNormalization", lambda: ln.InputNormalization([0.1, 0.2], [0.5, 0.4]), (2, 3, 3)),
    ("L2BallProjection", lambda: ln.L2BallProjection(1.0), (6,)),
    ("GroupNormalization", lambda: ln.GroupNormalization(2, 4, eps=0.1), (4, 3, 3)),
    ("Flatten", lambda: ln.Flatten(), (2, 3, 3)),
    ("FirstChannels", lambda: ln.FirstChannels(3), (6,)),
    ("BatchCentering", lambda: ln.BatchCentering(3), (3, 4, 4)),
    ("LayerCentering", lambda: ln.LayerCentering(3), (3, 4, 4)),
    ("ConvexResidual", lambda: ln.ConvexResidual(ln.OrthoLinear(4, 4), 0.3, learnable=True), (4,)),
    ("ConcatResidual", lambda: ln.ConcatResidual(ln.OrthoLinear(2, 2)), (4,)),
    ("L2NormResidual", lambda: ln.L2NormResidual(ln.OrthoLinear(4, 4)), (4,)),
    ("PrescaledAdditiveResidual", lambda: ln.PrescaledAdditiveResidual(ln.OrthoLinear(4, 4)), (4,)),
    ("Scattering2d", lambda: ln.Scattering2d(1, 8, J=1, L=2), (1, 8, 8)),
    ("network", lambda: nn.Sequential(ln.OrthoConv2d(2, 4, 3), ln.MaxMin(), ln.BatchCentering(4), ln.Flatten(),
                                      ln.OrthoLinear(64, 5)), (2, 4, 4)),
]


def _layer(make) -> nn.Module:
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():  # away from the initialization (alpha 0.5, theta pi/2, zero biases)
        for name, p in layer.named_parameters():
            if "parametrizations" not in name:
                p.add_(0.2 * torch.randn_like(p))
    return layer.double().eval()


def _single(layer: nn.Module):
    return lambda x: layer(x[None])[0]


@pytest.mark.parametrize("name,make,shape", LAYERS, ids=[n for n, _, _ in LAYERS])
def test_jacobians_of_the_input_agree_and_stay_within_the_bound(name, make, shape):
    layer = _layer(make)
    x = torch.randn(shape, dtype=torch.float64) + 0.1
    f = _single(layer)
    reference = torch.autograd.functional.jacobian(f, x)
    for transform in (jacrev, jacfwd):
        torch.testing.assert_close(transform(f)(x), reference, rtol=1e-9, atol=1e-12)
    out = f(x)
    matrix = reference.reshape(out.numel(), x.numel())
    assert torch.linalg.matrix_norm(matrix, 2) <= ln.lipschitz_bound(layer) * (1 + 1e-9)
    v = torch.randn_like(x)
    _, jv = jvp(f, (x,), (v,))
    torch.testing.assert_close(jv.reshape(-1), matrix @ v.reshape(-1), rtol=1e-9, atol=1e-12)
    batch = torch.randn((3, *shape), dtype=torch.float64)
    torch.testing.assert_close(vmap(f)(batch), layer(batch), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(vmap(jacrev(f))(batch), torch.stack([jacrev(f)(b) for b in batch]))


def _parameter_loss(layer: nn.Module):
    def loss(params: dict, x: torch.Tensor) -> torch.Tensor:
        return (functional_call(layer, params, (x[None],)) ** 2).sum()
    return loss


@pytest.mark.parametrize("name,make,shape", [c for c in LAYERS if any(True for _ in _layer(c[1]).parameters())],
                         ids=[n for n, m, _ in LAYERS if any(True for _ in _layer(m).parameters())])
def test_parameter_gradients_through_functional_call_and_per_sample_vmap(name, make, shape):
    layer = _layer(make)
    batch = torch.randn((4, *shape), dtype=torch.float64)
    layer(batch)  # a stored factor changed by .double() is retracted on first use; the test starts after it
    params = {k: v.detach() for k, v in layer.named_parameters()}
    loss = _parameter_loss(layer)
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, batch)
    layer.zero_grad()
    (layer(batch) ** 2).sum().backward()
    for key, p in layer.named_parameters():
        assert per_sample[key].shape == (4, *p.shape)
        torch.testing.assert_close(per_sample[key].sum(0), p.grad, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(grad(loss)(params, batch[1]), {k: v[1] for k, v in per_sample.items()})


LOSSES = [
    ("LipschitzCrossEntropy", lambda: ln.LipschitzCrossEntropy(), 4),
    ("MultiMarginHinge", lambda: ln.MultiMarginHinge(), 4),
    ("KRLoss", lambda: ln.KRLoss(4), 4),
    ("NegKRLoss", lambda: ln.NegKRLoss(4), 4),
    ("HingeMarginLoss", lambda: ln.HingeMarginLoss(4), 4),
    ("HKRLoss", lambda: ln.HKRLoss(4, 0.5), 4),
    ("TauCrossEntropyLoss", lambda: ln.TauCrossEntropyLoss(2.0), 4),
    ("LseHKRLoss", lambda: ln.LseHKRLoss(4), 4),
    ("SoftHKRLoss", lambda: ln.SoftHKRLoss(4), 4),
    ("TauBCEWithLogitsLoss", lambda: ln.TauBCEWithLogitsLoss(2.0), 1),
    ("ClippedLossGradient", lambda: ln.ClippedLossGradient(ln.LipschitzCrossEntropy(), 0.5), 4),
]


@pytest.mark.parametrize("name,make,classes", LOSSES, ids=[n for n, _, _ in LOSSES])
def test_losses_under_jacrev_and_per_sample_vmap(name, make, classes):
    loss = make()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, classes, generator=g, dtype=torch.float64)
    if classes == 1:
        target = torch.randint(0, 2, (5, 1), generator=g).double()
    else:
        target = torch.randint(0, classes, (5,), generator=g)

    def one(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss(z[None], y[None])

    reference = torch.autograd.functional.jacobian(lambda z: loss(z, target), logits)
    torch.testing.assert_close(jacrev(lambda z: loss(z, target))(logits), reference)
    per_sample = vmap(grad(one))(logits, target)
    rows = torch.stack([torch.autograd.functional.jacobian(lambda z, i=i: one(z, target[i]), logits[i])
                        for i in range(5)])
    torch.testing.assert_close(per_sample, rows)


@pytest.mark.parametrize("method", ["convergent", "svd"])
def test_the_polar_derivative_is_the_same_in_forward_and_reverse_mode(method):
    """orthogonalize(..., backward="polar"): jacfwd (its jvp rule) equals jacrev (its backward),
    both the derivative of the function computed (checked by central differences), and vmap
    batches it. "convergent" computes the polar factor of the AOL-rescaled matrix and stops within
    ~1e-7 of it, so its two modes agree to that order, "svd" (the exact factor) to rounding."""
    from lipnet.ortho import orthogonalize

    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 5, generator=g, dtype=torch.float64)

    def polar(w: torch.Tensor) -> torch.Tensor:
        return orthogonalize(w, method=method, backward="polar", validate=False)

    tolerance = dict(rtol=0, atol=1e-12 if method == "svd" else 1e-5)
    forward, reverse = jacfwd(polar)(W), jacrev(polar)(W)
    torch.testing.assert_close(forward, reverse, **tolerance)
    eps = 1e-6
    direction = torch.randn(3, 5, generator=g, dtype=torch.float64)
    difference = (polar(W + eps * direction) - polar(W - eps * direction)) / (2 * eps)
    torch.testing.assert_close(torch.einsum("ijkl,kl->ij", forward, direction), difference,
                               rtol=0, atol=1e-7 if method == "svd" else 1e-3)
    stack = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(vmap(jacrev(polar))(stack), torch.stack([jacrev(polar)(w) for w in stack]),
                               rtol=1e-9, atol=1e-12)
