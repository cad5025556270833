"""Clipping-free DP-SGD: try to break the per-sample gradient bound, check the accounting, the
sampling and the noise, and refuse bad input before training."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn

import lipnet.nn as ln
from helpers import blobs, small_model
from lipnet.data import BatchLoader
from lipnet.models import mnist_convnet
from lipnet.privacy import (BOUND_MARGIN, PoissonBatchLoader, PrivateTrainer, conv_reuse, gradient_norm_bounds, make_private,
                            noise_stds, per_sample_gradient_norms, private_trainable)

TOL = 1e-6  # the bounds carry BOUND_MARGIN = 1e-4; the audit is float64-normed float32 gradients


def _perturb(model: nn.Module, scale: float, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def _on_sphere(shape, radius: float, seed: int, batch: int) -> torch.Tensor:
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))
    radii = radius * torch.rand(batch, 1, generator=torch.Generator().manual_seed(seed + 1)).clamp_min(0.5)
    radii[0] = radius  # at least one sample on the sphere itself
    return x / x.flatten(1).norm(dim=1, keepdim=True).view(-1, *[1] * len(shape)) * radii.view(-1, *[1] * len(shape))


def _check(model, loss, x, y, radius) -> dict[str, float]:
    report = gradient_norm_bounds(model, radius, loss, tuple(x.shape[1:]))
    norms = per_sample_gradient_norms(model, report, x, y, loss)
    ratios = {}
    for b in report.bounds:
        assert norms[b.name].max() <= b.bound * (1 + TOL), (b.name, float(norms[b.name].max()), b.bound)
        ratios[b.name] = float(norms[b.name].max() / b.bound)
    assert norms["total"].max() <= report.total * (1 + TOL)
    ratios["total"] = float(norms["total"].max() / report.total)
    return ratios


@st.composite
def conv_models(draw):
    """Random small conv nets of every supported layer type, perturbed away from orthogonality."""
    c = draw(st.sampled_from([2, 4]))
    size = size0 = draw(st.sampled_from([4, 6, 8]))
    layers: list[nn.Module] = [ln.InputNormalization([draw(st.floats(-1, 1))] * 2,
                                                     [draw(st.floats(0.5, 2.0))] * 2)]
    if draw(st.booleans()):
        layers.append(ln.L2BallProjection(draw(st.floats(0.5, 5.0))))
    cin = 2
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["ortho", "ortho_strided", "aol", "plain", "residual", "transposed"]))
        k = draw(st.sampled_from([1, 2, 3]))
        mode = draw(st.sampled_from(["zeros", "circular"]))
        if kind == "ortho":
            layers.append(ln.OrthoConv2d(cin, c, max(k, 2), padding_mode=mode))
        elif kind == "ortho_strided":
            stride = 2 if size % 2 == 0 else 1
            layers.append(ln.OrthoConv2d(cin, c, 2, stride=stride, padding=0 if stride == 2 else "same",
                                         padding_mode=mode))
            size //= stride
        elif kind == "aol":
            dil = draw(st.sampled_from([1, 2]))
            layers.append(ln.AOLConv2d(cin, c, 3, padding=dil, dilation=dil, padding_mode=mode))
        elif kind == "plain":
            stride = draw(st.sampled_from([1, 2]))
            conv = nn.Conv2d(cin, c, 3, stride=stride, padding=1, padding_mode=mode,
                             groups=draw(st.sampled_from([1, 2])))
            layers.append(conv)
            size = (size + 2 - 3) // stride + 1
        elif kind == "transposed":
            layers.append(nn.ConvTranspose2d(cin, c, 3, stride=1, padding=1))
        else:
            layers.append(ln.ConvexResidual(nn.Sequential(ln.AOLConv2d(cin, cin, 3), ln.MaxMin()),
                                            alpha=draw(st.floats(0.1, 0.9)), learnable=True))
            c_out = cin
            layers.append(ln.LayerCentering(c_out))
            continue
        cin = c
        layers.append(draw(st.sampled_from([ln.MaxMin(), ln.Abs(), ln.LayerCentering(c)])))
    layers += [ln.Flatten(), draw(st.sampled_from([
        ln.OrthoLinear(cin * size * size, 3), ln.AOLLinear(cin * size * size, 3), nn.Linear(cin * size * size, 3)]))]
    model = _perturb(nn.Sequential(*layers), draw(st.sampled_from([0.0, 0.1, 0.5])), draw(st.integers(0, 10**6)))
    return model, (2, size0, size0)


@settings(max_examples=25, deadline=None)
@given(conv_models(), st.floats(0.5, 30.0), st.integers(0, 10**6),
       st.sampled_from(["lce", "hinge", "ce", "clipped"]))
def test_per_sample_gradients_never_exceed_the_bound_conv(model_shape, radius, seed, loss_name):
    model, shape = model_shape
    loss = {"lce": ln.LipschitzCrossEntropy(temperature=0.1), "hinge": ln.MultiMarginHinge(margin=2.0),
            "ce": nn.CrossEntropyLoss(),
            "clipped": ln.ClippedLossGradient(ln.LipschitzCrossEntropy(temperature=0.5), 0.05)}[loss_name]
    x = _on_sphere(shape, radius, seed, 12)
    y = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(seed))
    _check(model, loss, x, y, radius)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 6).map(lambda k: 2 * k), min_size=1, max_size=4), st.floats(0.1, 50.0), st.integers(0, 10**6),
       st.sampled_from([0.0, 0.3, 1.0]), st.booleans())
def test_per_sample_gradients_never_exceed_the_bound_dense(widths, radius, seed, scale, residual):
    torch.manual_seed(seed)
    layers: list[nn.Module] = [ln.InputNormalization([0.3] * 5, [0.7] * 5), ln.Flatten()]
    cin = 5
    for i, w in enumerate(widths):
        layers += [[ln.OrthoLinear, ln.AOLLinear, nn.Linear][i % 3](cin, w), [ln.MaxMin(), ln.Abs()][i % 2]]
        cin = w
        if residual:
            layers.append(ln.ConvexResidual(nn.Sequential(ln.AOLLinear(cin, cin), ln.Abs()), 0.4, learnable=True))
    layers += [ln.OrthoLinear(cin, 4)]
    model = _perturb(nn.Sequential(*layers), scale, seed)
    x = _on_sphere((5,), radius, seed, 16)
    y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(seed))
    _check(model, ln.LipschitzCrossEntropy(temperature=0.05, offset=1.0), x, y, radius)


def test_gradient_ascent_on_inputs_does_not_break_the_bound():
    """Maximize one sample's gradient norm over the input ball (double backprop on the plain copy)."""
    torch.manual_seed(0)
    model = _perturb(nn.Sequential(
        ln.OrthoConv2d(1, 4, 3), ln.MaxMin(), ln.AOLConv2d(4, 4, 3, padding_mode="circular"), ln.Abs(),
        ln.OrthoConv2d(4, 8, 2, stride=2, padding=0), ln.MaxMin(), ln.Flatten(), ln.OrthoLinear(8 * 16, 2)), 0.2, 1)
    loss, radius = ln.LipschitzCrossEntropy(temperature=0.05, offset=0.0), 4.0
    report = gradient_norm_bounds(model, radius, loss, (1, 8, 8))
    plain = ln.export(model)
    x = (torch.ones(1, 1, 8, 8) * radius / 8).requires_grad_(True)
    y = torch.tensor([0])
    best = 0.0
    for _ in range(60):
        out = loss.__class__(temperature=0.05, offset=0.0, reduction="sum")(plain(x), y)
        grads = torch.autograd.grad(out, list(plain.parameters()), create_graph=True)
        total = torch.sqrt(sum(g.square().sum() for g in grads))
        best = max(best, float(total.detach()))
        (gx,) = torch.autograd.grad(total, x)
        with torch.no_grad():
            x += 0.5 * gx / (gx.norm() + 1e-12)
            x *= min(1.0, radius / float(x.norm()))
    assert best <= report.total
    assert best > 0.05 * report.total  # the attack does reach a non-trivial fraction (bound not vacuous)


def test_bound_is_attained_by_a_dense_layer_and_a_circular_conv():
    """Tightness: the dense rule ||x|| * L_loss and the conv reuse factor sqrt(k^2) are attained."""
    radius = 3.0
    dense = nn.Sequential(nn.Linear(6, 2, bias=False))
    with torch.no_grad():
        dense[0].weight.copy_(torch.tensor([[1.0, 0, 0, 0, 0, 0], [-1.0, 0, 0, 0, 0, 0]]) / math.sqrt(2))
    loss = ln.LipschitzCrossEntropy(temperature=0.01, offset=0.0)
    x = torch.tensor([[radius, 0, 0, 0, 0, 0]])
    ratios = _check(dense, loss, x, torch.tensor([1]), radius)  # confidently wrong: ||p - e_y|| -> sqrt(2)
    assert ratios["0.weight"] > 0.999

    conv = nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular", bias=False)
    head = nn.Linear(64, 2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1 / 9)  # constant in, constant out; ||conv|| = 1 on the torus
        head.weight.copy_(torch.cat([torch.ones(1, 64), -torch.ones(1, 64)]) / math.sqrt(128))
    model = nn.Sequential(conv, nn.Flatten(), head)
    x = torch.full((1, 1, 8, 8), radius / 8)
    ratios = _check(model, loss, x, torch.tensor([1]), radius)
    assert conv_reuse(conv, (8, 8)) == (9, 64)
    assert ratios["0.weight"] > 0.99  # sqrt(R) = 3 is needed: a bound without it would be broken


def test_clipped_loss_gradient_gives_every_sample_the_full_bound():
    """Why ClippedLossGradient exists: with cross-entropy's own bound sqrt(2) a linear head's samples reach
    ||x|| ||p - e_y|| / (X sqrt(2)) of the bound; clipped at a small clip, every sample on the sphere that is
    not already fitted reaches the whole bound (what per-sample clipping gives opacus), none exceeds it."""
    torch.manual_seed(0)
    radius, head = 5.0, nn.Linear(12, 4, bias=False)
    x = _on_sphere((12,), radius, 0, 32)
    x = x / x.norm(dim=1, keepdim=True) * radius
    y = torch.randint(0, 4, (32,))
    plain = _check(head, ln.LipschitzCrossEntropy(temperature=1.0, offset=0.0), x, y, radius)
    assert plain["weight"] < 0.9
    clipped = ln.ClippedLossGradient(ln.LipschitzCrossEntropy(temperature=1.0, offset=0.0), 0.05)
    report = gradient_norm_bounds(head, radius, clipped, (12,))
    norms = per_sample_gradient_norms(head, report, x, y, clipped)["weight"]
    assert report.bounds[0].bound == pytest.approx(radius * 0.05 * (1 + BOUND_MARGIN), rel=1e-6)
    assert (norms <= report.bounds[0].bound).all() and (norms >= 0.999 * radius * 0.05).all()


def test_conv_reuse_counts():
    assert conv_reuse(nn.Conv2d(1, 1, 3, padding=1), (8, 8)) == (9, 64)
    assert conv_reuse(nn.Conv2d(1, 1, 2, stride=2), (8, 8)) == (1, 16)
    assert conv_reuse(nn.Conv2d(1, 1, 3, stride=2, padding=1), (8, 8)) == (4, 16)
    assert conv_reuse(nn.Conv2d(1, 1, 3, padding=2, dilation=2), (8, 8)) == (9, 64)
    # circular padding on a 2x2 map: a 3x3 window reads pixels twice through the wrap-around
    assert conv_reuse(nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular"), (2, 2))[0] == 9
    assert conv_reuse(nn.ConvTranspose2d(1, 1, 3, stride=2, padding=1), (4, 4))[0] == 4


def test_orthogonal_transposed_convs_get_a_gradient_bound_and_freeze_as_convs():
    model = nn.Sequential(ln.OrthoConv2d(1, 4, 2, stride=2, padding=0, padding_mode="zeros"), ln.MaxMin(),
                          ln.OrthoConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1), ln.MaxMin(),
                          ln.Flatten(), ln.OrthoLinear(2 * 8 * 8, 3))
    model = _perturb(model, 0.1, 0)
    x = _on_sphere((1, 8, 8), 2.0, 0, 12)
    y = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(0))
    ratios = _check(model, ln.LipschitzCrossEntropy(temperature=0.1), x, y, 2.0)
    assert any(name.startswith("2.") for name in ratios), ratios
    trainable = private_trainable(model)  # "dense": every convolution frozen, biases too
    assert {id(p) for p in trainable} == {id(p) for p in model[5].parameters() if p.requires_grad}
    assert not any(p.requires_grad for p in model[2].parameters())


def test_unsupported_layers_and_losses_are_refused():
    x_shape, loss = (1, 8, 8), ln.LipschitzCrossEntropy()
    with pytest.raises(TypeError, match="BatchCentering"):
        gradient_norm_bounds(nn.Sequential(ln.OrthoConv2d(1, 2, 3), ln.BatchCentering(2), ln.Flatten(),
                                           ln.OrthoLinear(128, 2)), 1.0, loss, x_shape)
    with pytest.raises(TypeError, match="SLLBlock"):
        gradient_norm_bounds(nn.Sequential(ln.Flatten(), ln.SLLBlock(64, 32), ln.OrthoLinear(64, 2)), 1.0, loss, x_shape)
    with pytest.raises(TypeError, match="BatchNorm2d"):
        gradient_norm_bounds(nn.Sequential(nn.BatchNorm2d(1), ln.Flatten(), ln.OrthoLinear(64, 2)), 1.0, loss, x_shape)
    with pytest.raises(TypeError, match="no Lipschitz bound rule"):
        gradient_norm_bounds(nn.Sequential(ln.Flatten(), nn.Tanh(), ln.OrthoLinear(64, 2)), 1.0, loss, x_shape)
    with pytest.raises(TypeError, match="Lipschitz constant"):
        gradient_norm_bounds(nn.Sequential(ln.Flatten(), ln.OrthoLinear(64, 2)), 1.0, nn.MSELoss(), x_shape)
    with pytest.raises(ValueError, match="input_bound"):
        gradient_norm_bounds(nn.Sequential(ln.Flatten(), ln.OrthoLinear(64, 2)), 0.0, loss, x_shape)
    # a frozen unsupported layer is fine: it releases nothing
    frozen = nn.Sequential(ln.Flatten(), ln.SLLBlock(64, 32).requires_grad_(False), ln.OrthoLinear(64, 2))
    assert [b.name for b in gradient_norm_bounds(frozen, 1.0, loss, x_shape).bounds] == ["2.weight", "2.bias"]


# ----------------------------------------------------------------------------- sampling, accounting


def test_poisson_batches_have_the_binomial_size_distribution():
    ds, q = blobs(1000), 0.05
    loader = PoissonBatchLoader(ds, q, generator=torch.Generator().manual_seed(0), steps=400)
    sizes = torch.tensor([len(y) for _, y in loader], dtype=torch.float64)
    assert len(loader) == 400 and len(sizes) == 400
    n = len(ds)
    assert abs(sizes.mean() - n * q) < 4 * math.sqrt(n * q * (1 - q) / 400)
    assert abs(sizes.var() / (n * q * (1 - q)) - 1) < 0.25
    assert len(PoissonBatchLoader(ds, 0.01)) == 100  # int(1/q) steps per epoch, as opacus accounts


@pytest.mark.parametrize("accountant, cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_equals_opacus_accountant(accountant, cls):
    ds = blobs(400)
    model = small_model()
    trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), ds, loss=ln.LipschitzCrossEntropy(),
                             input_bound=8.0, target_delta=1e-4, noise_multiplier=1.3, sample_rate=0.1,
                             accountant=accountant, progress=False)
    for _ in range(7):
        trainer.step(*next(iter(trainer.loader)))
    reference = cls()
    reference.history = [(1.3, 0.1, 7)]
    assert trainer.epsilon() == pytest.approx(reference.get_epsilon(delta=1e-4), rel=1e-6)


def test_calibrated_noise_spends_the_target_epsilon():
    ds = blobs(400)
    model = small_model()
    trainer = make_private(model, torch.optim.Adam(model.parameters(), lr=1e-2), BatchLoader(ds, 40), 2.0, 1e-4, 2,
                           loss=ln.LipschitzCrossEntropy(), input_bound=8.0, progress=False)
    assert trainer.sample_rate == pytest.approx(0.1) and len(trainer.loader) == 10
    reports = [trainer.train_epoch() for _ in range(2)]
    assert reports[-1].steps == 20
    assert reports[0].epsilon < reports[1].epsilon <= 2.0 + 0.011  # opacus' search tolerance
    assert reports[1].epsilon > 1.9


def test_noise_has_the_calibrated_std_and_zero_noise_gives_the_summed_gradient():
    torch.manual_seed(0)
    ds = blobs(400)
    x, y = ds.images[:37].float() / 255, ds.labels[:37]
    for sigma, check in ((1e-9, "exact"), (2.0, "std")):
        model = nn.Sequential(ln.InputNormalization((0.5,)), ln.Flatten(), nn.Linear(64, 2))
        reference = nn.Sequential(ln.InputNormalization((0.5,)), ln.Flatten(), nn.Linear(64, 2))
        reference.load_state_dict(model.state_dict())
        trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.0), ds,
                                 loss=ln.LipschitzCrossEntropy(), input_bound=8.0, target_delta=1e-4,
                                 noise_multiplier=sigma, sample_rate=0.1, progress=False)
        trainer.step(x, y)
        proj = ln.L2BallProjection(8.0)
        ln.LipschitzCrossEntropy(reduction="sum")(reference(proj(x)), y).backward()
        clean = reference[2].weight.grad / trainer.expected_batch_size
        noisy = model[2].weight.grad
        if check == "exact":
            torch.testing.assert_close(noisy, clean, rtol=1e-5, atol=1e-7)
        else:
            expected = sigma * trainer.sensitivity().total / trainer.expected_batch_size
            assert (noisy - clean).std().item() == pytest.approx(expected, rel=0.15)


def test_constrained_weights_get_the_chain_rule_of_the_noisy_effective_gradient():
    """With noise ~0 the raw parameters of orthogonal layers get exactly autograd's gradient of the
    summed loss / expected batch: the effective-weight gradient is pushed through J^T correctly."""
    torch.manual_seed(0)
    ds = blobs(400)
    x, y = ds.images[:25].float() / 255, ds.labels[:25]
    model = small_model()
    reference = small_model()
    reference.load_state_dict(model.state_dict())
    trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.0), ds, loss=ln.LipschitzCrossEntropy(),
                             input_bound=8.0, target_delta=1e-4, noise_multiplier=1e-12, sample_rate=0.1,
                             progress=False)
    trainer.step(x, y)
    ln.LipschitzCrossEntropy(reduction="sum")(reference(ln.L2BallProjection(8.0)(x)), y).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad / trainer.expected_batch_size, rtol=1e-4, atol=1e-7, msg=name)


def test_empty_poisson_batch_still_steps_and_is_accounted():
    ds = blobs(400)
    model = small_model()
    trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), ds, loss=ln.LipschitzCrossEntropy(),
                             input_bound=8.0, target_delta=1e-4, noise_multiplier=1.0, sample_rate=0.01,
                             progress=False)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.step(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    assert trainer.steps == 1 and trainer.epsilon() > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the noise moved them


def test_bad_privacy_parameters_are_refused_before_training():
    ds = blobs(400)
    model = small_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(loss=ln.LipschitzCrossEntropy(), input_bound=8.0, progress=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="1/n"):
        make_private(model, opt, BatchLoader(ds, 40), 1.0, 1 / 400, 1, **kw)
    with pytest.raises(ValueError, match="target_epsilon"):
        make_private(model, opt, BatchLoader(ds, 40), 0.0, 1e-4, 1, **kw)
    with pytest.raises(ValueError, match="target_epsilon"):
        make_private(model, opt, BatchLoader(ds, 40), -1.0, 1e-4, 1, **kw)
    with pytest.raises(TypeError, match="BatchCentering"):
        make_private(mnist_convnet(width=2, hidden=4), opt, BatchLoader(ds, 40), 1.0, 1e-4, 1,
                     loss=ln.LipschitzCrossEntropy(), input_bound=8.0, input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match="noise_multiplier"):
        PrivateTrainer(model, opt, ds, target_delta=1e-4, noise_multiplier=0.0, sample_rate=0.1, **kw)
    with pytest.raises(ValueError, match="sample_rate"):
        PrivateTrainer(model, opt, ds, target_delta=1e-4, noise_multiplier=1.0, sample_rate=1.5, **kw)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_private_training_learns_a_separable_task():
    torch.manual_seed(0)
    ds = blobs(2000)
    model = nn.Sequential(ln.InputNormalization((0.5,)), ln.Flatten(), ln.OrthoLinear(64, 16), ln.MaxMin(),
                          ln.OrthoLinear(16, 2))
    trainer = make_private(model, torch.optim.Adam(model.parameters(), lr=5e-2), BatchLoader(ds, 400), 4.0, 1e-4, 3,
                           loss=ln.LipschitzCrossEntropy(temperature=0.25, offset=0.5), input_bound=8.0,
                           progress=False)
    for _ in range(3):
        report = trainer.train_epoch()
    assert report.epsilon <= 4.0 + 0.011
    test = blobs(500, seed=1)
    with torch.no_grad():
        acc = (model(test.images.float() / 255).argmax(1) == test.labels).float().mean()
    assert acc > 0.9, float(acc)


def test_per_layer_noise_mode_scales_each_tensor():
    ds = blobs(400)
    model = small_model()
    trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), ds, loss=ln.LipschitzCrossEntropy(),
                             input_bound=8.0, target_delta=1e-4, noise_multiplier=1.5, sample_rate=0.1,
                             noise="per_layer", progress=False)
    report = trainer.sensitivity()
    stds = noise_stds([b.bound for b in report.bounds], [b.tensor().numel() for b in report.bounds], 1.5, "per_layer")
    assert stds == trainer._noise_stds(report)  # the trainer adds what the pure function allocates
    k = len(report.bounds)
    # whitened sensitivity sqrt(sum C_k^2 / std_k^2) = 1 / sigma: the same mechanism as global noise
    assert math.sqrt(sum((b.bound / s) ** 2 for b, s in zip(report.bounds, stds))) == pytest.approx(1 / 1.5)
    assert stds[0] == pytest.approx(1.5 * math.sqrt(k) * report.bounds[0].bound)


def test_min_energy_noise_keeps_the_mechanism_and_lowers_the_total_noise():
    ds = blobs(400)
    stds, reports = {}, {}
    for mode in ("global", "per_layer", "min_energy"):
        model = small_model()
        torch.manual_seed(0)
        trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), ds,
                                 loss=ln.LipschitzCrossEntropy(), input_bound=8.0, target_delta=1e-4,
                                 noise_multiplier=1.5, sample_rate=0.1, noise=mode, progress=False)
        reports[mode] = trainer.sensitivity()
        bounds = reports[mode].bounds
        stds[mode] = noise_stds([b.bound for b in bounds], [b.tensor().numel() for b in bounds], 1.5, mode)
    report = reports["min_energy"]
    dims = [b.tensor().numel() for b in report.bounds]
    whitened = math.sqrt(sum((b.bound / s) ** 2 for b, s in zip(report.bounds, stds["min_energy"])))
    assert whitened == pytest.approx(1 / 1.5)
    energy = {m: sum(d * s ** 2 for d, s in zip(dims, stds[m])) for m in stds}
    assert energy["min_energy"] <= min(energy["global"], energy["per_layer"]) * (1 + 1e-9)


def test_a_torch_dataloader_is_poisson_resampled_by_opacus():
    ds = blobs(400)
    data = torch.utils.data.TensorDataset(ds.images.float() / 255, ds.labels)
    loader = torch.utils.data.DataLoader(data, batch_size=40)
    model = small_model()
    trainer = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, 3.0, 1e-4, 1,
                           loss=ln.LipschitzCrossEntropy(), input_bound=8.0, progress=False)
    assert trainer.sample_rate == pytest.approx(0.1) and trainer.input_shape == (1, 8, 8)
    report = trainer.train_epoch()
    assert report.steps == len(trainer.loader) == 10 and 0 < report.epsilon <= 3.0 + 0.011


@pytest.mark.parametrize("layer", [lambda: ln.LPReLU(4), lambda: ln.PrescaledAdditiveResidual(ln.OrthoLinear(4, 4))])
def test_private_training_refuses_layers_without_a_sensitivity_rule(layer):
    model = nn.Sequential(ln.OrthoLinear(4, 4), layer(), ln.OrthoLinear(4, 3))
    with pytest.raises(TypeError, match="no .*rule|not supported|bound rule"):
        gradient_norm_bounds(model, 1.0, ln.LipschitzCrossEntropy(), (4,))


def test_a_trainer_state_continues_the_run_exactly_and_a_wrong_state_is_refused():
    def run(epochs_before_save=None):
        torch.manual_seed(0)
        model = nn.Sequential(ln.Flatten(), ln.OrthoLinear(64, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        make = lambda m, o: make_private(m, o, BatchLoader(blobs(400), 50), 2.0, 1e-4, 3, progress=False,
                                         loss=ln.LipschitzCrossEntropy(temperature=0.25, offset=0.5), input_bound=8.0)
        trainer = make(model, opt)
        for _ in range(3 if epochs_before_save is None else epochs_before_save):
            trainer.train_epoch()
        if epochs_before_save is None:
            return model, trainer
        state, weights, opt_state = trainer.state_dict(), model.state_dict(), opt.state_dict()
        torch.manual_seed(0)
        fresh = nn.Sequential(ln.Flatten(), ln.OrthoLinear(64, 2))
        fresh.load_state_dict(weights)
        opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
        opt2.load_state_dict(opt_state)
        resumed = make(fresh, opt2)
        resumed.load_state_dict(state)
        while resumed.epochs_done < 3:
            resumed.train_epoch()
        return fresh, resumed

    full_model, full = run()
    model, resumed = run(epochs_before_save=1)
    assert resumed.steps == full.steps and resumed.epsilon() == full.epsilon()
    for a, b in zip(full_model.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    state = full.state_dict()
    bad_history = dict(state, accountant=dict(state["accountant"], history=[(full.noise_multiplier, full.sample_rate, 1)]))
    with pytest.raises(ValueError, match="followed by the run's"):
        resumed.load_state_dict(bad_history)
    with pytest.raises(ValueError, match="noise_multiplier"):
        resumed.load_state_dict(dict(state, noise_multiplier=state["noise_multiplier"] * 1.5))
