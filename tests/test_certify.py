"""Certification: radii are sound (attacks inside them never flip a prediction), accuracies are
consistent, bounds sit above empirical lower bounds, bad input raises."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lipnet.nn as ln
from lipnet import certify
from lipnet.data import BatchLoader, load_dataset
from lipnet.models import mnist_convnet
from lipnet.nn import InputNormalization, LipschitzCrossEntropy, OrthoLinear
from lipnet.training import train_epoch


@pytest.fixture(scope="module")
def trained(data_root):
    """A small 1-Lipschitz MNIST net trained for 2 short epochs on 2,000 images (~10 s)."""
    torch.manual_seed(0)
    model = mnist_convnet(width=8, hidden=64)
    train = load_dataset("mnist", "train", data_root, limit=2000, progress=False)
    test = load_dataset("mnist", "test", data_root, limit=300, progress=False)
    loader = BatchLoader(train, 100, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(2):
        train_epoch(model, loader, opt, LipschitzCrossEntropy(offset=1.5), progress=False)
    model.eval()
    x, y = test.images.float() / 255, test.labels
    return model, x, y


def test_certified_radius_formula_and_errors():
    logits = torch.tensor([[3.0, 1.0, 0.0], [2.0, 2.0, -1.0]])
    r = certify.certified_radius(logits, lipschitz=2.0, inputs=1.0)
    assert r[0].item() == pytest.approx(2.0 / (math.sqrt(2) * 2.0), rel=1e-4)
    assert r[0].item() < 2.0 / (math.sqrt(2) * 2.0)  # the float slack only ever shrinks it
    assert r[1].item() == 0.0
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lipschitz"):
            certify.certified_radius(logits, bad, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        certify.certified_radius(torch.tensor([[float("nan"), 0.0]]), 1.0, 1.0)
    with pytest.raises(ValueError, match="batch, classes"):
        certify.certified_radius(torch.zeros(3), 1.0, 1.0)
    with pytest.raises(ValueError, match="real floating-point"):
        certify.certified_radius(torch.tensor([[3, 1]]), 1.0, 1.0)
    with pytest.raises(ValueError, match="real floating-point"):
        certify.certified_radius(torch.tensor([[3 + 1j, 1]]), 1.0, 1.0)
    with pytest.raises(ValueError, match="do not match"):
        certify.certified_radius(logits, 1.0, torch.ones(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        certify.certified_radius(logits, 1.0, torch.tensor([[float("nan")], [1.0]]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_attacks_inside_the_certified_radius_never_flip(trained, seed):
    model, x, y = trained
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)[:120]
    x, y = x[idx], y[idx]
    lip = certify.network_lipschitz_bound(model)
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(1)
    r = certify.certified_radius(logits, lip, x)
    keep = r > 1e-3
    assert keep.sum() >= 60, "the trained model should certify most points"
    x, pred, r = x[keep], pred[keep], r[keep].float()
    eps = 0.99 * r
    model = copy.deepcopy(model)
    model[0].input_range = None  # unclamped: a certificate covers the whole ball, not only the pixel box
    for loss in ("margin", "ce"):
        adv = certify.pgd_l2(model, x, pred, eps, steps=40, loss=loss, clamp=None, generator=g)
        assert ((adv - x).flatten(1).norm(dim=1) <= eps * (1 + 1e-5)).all()
        with torch.no_grad():
            assert torch.equal(model(adv).argmax(1), pred), f"{loss} PGD flipped a certified prediction"
    # Linear margin attack: step straight along the gradient of z_runner-up - z_top.
    xr = x.clone().requires_grad_(True)
    out = model(xr)
    runner = out.scatter(1, pred[:, None], float("-inf")).argmax(1)
    gap = out.gather(1, runner[:, None]) - out.gather(1, pred[:, None])
    (grad,) = torch.autograd.grad(gap.sum(), xr)
    step = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    with torch.no_grad():
        assert torch.equal(model(x + eps.view(-1, 1, 1, 1) * step).argmax(1), pred)
    # The same attack is not toothless: with 4x the budget it flips some of these points.
    adv = certify.pgd_l2(model, x, pred, 4 * r + 0.5, steps=40, clamp=None, generator=g)
    with torch.no_grad():
        assert (model(adv).argmax(1) != pred).any()


def test_attack_breaks_a_false_certificate():
    """A wrong Lipschitz claim is caught: a 20x-scaled linear model 'certified' with L=1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    with torch.no_grad():
        model[1].weight.mul_(20)
    x = torch.rand(64, 1, 4, 4)
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(1)
    r = certify.certified_radius(logits, lipschitz=1.0, inputs=x).float()
    adv = certify.pgd_l2(model, x, pred, 0.99 * r, steps=20, clamp=None)
    with torch.no_grad():
        assert (model(adv).argmax(1) != pred).float().mean() > 0.5


def test_certified_accuracy_is_consistent(trained):
    model, x, y = trained
    data = list(zip(x.split(100), y.split(100)))
    eps = [0.0, 0.3, 1.0, 1.58]
    rep = certify.certified_accuracy(model, data, eps, pgd_steps=10)
    assert rep.n == len(x)
    assert rep.clean > 0.8
    assert rep.certified[0.0] <= rep.clean
    certs = [rep.certified[e] for e in eps]
    assert certs == sorted(certs, reverse=True)
    for e in eps:  # an attack can never beat a certificate
        assert rep.pgd[e] >= rep.certified[e]
    assert rep.radii.shape == (len(x),)
    assert rep.as_dict()["lipschitz_bound"] == rep.lipschitz_bound and rep.pgd_n == len(x)
    sub = certify.certified_accuracy(model, data, [1.0], pgd_steps=5, pgd_points=150)
    assert sub.pgd_n == 150 and sub.n == len(x)
    assert sub.pgd[1.0] >= certify.certified_accuracy(model, data[:1] + [(x[100:150], y[100:150])], [1.0]).certified[1.0]


def test_bounds_upper_above_lower(trained):
    model, x, _ = trained
    upper = certify.network_lipschitz_bound(model)
    lower = certify.lipschitz_lower_bound(model, x[:64])
    assert 0.3 < lower <= upper <= 1.001
    assert certify.network_lipschitz_bound(model, input_std=[0.5, 0.25]) == pytest.approx(4 * upper)
    with pytest.raises(ValueError, match="input_std"):
        certify.network_lipschitz_bound(model, input_std=[0.0])


def test_normalization_is_part_of_the_bound():
    """A model whose first layer divides by std=0.25 is 4x less robust in raw pixels: the bound says so."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Flatten(), OrthoLinear(16, 4))
    scaled = nn.Sequential(InputNormalization([0.0], [0.25]), nn.Flatten(), OrthoLinear(16, 4))
    scaled[2].load_state_dict(plain[1].state_dict())
    assert certify.network_lipschitz_bound(scaled) == pytest.approx(4 * certify.network_lipschitz_bound(plain), rel=1e-5)
    x = torch.rand(32, 1, 4, 4)
    lower = certify.lipschitz_lower_bound(scaled, x)
    assert lower > 3.9  # the attack sees the 1/std factor too


def test_bad_input(trained):
    model, x, y = trained
    data = [(x[:10], y[:10])]
    with pytest.raises(ValueError, match="eps"):
        certify.certified_accuracy(model, data, [0.5, -0.1])
    with pytest.raises(ValueError, match="eps"):
        certify.certified_accuracy(model, data, [])
    with pytest.raises(ValueError, match="empty"):
        certify.certified_accuracy(model, [], [0.5])
    bad = x[:10].clone()
    bad[3, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        certify.certified_accuracy(model, [(bad, y[:10])], [0.5])
    with pytest.raises(ValueError, match="NaN"):
        certify.lipschitz_lower_bound(model, bad)
    with pytest.raises(ValueError, match="eps"):
        certify.pgd_l2(model, x[:2], y[:2], -1.0)


def test_eval_mode_gives_every_layer_its_own_mode_back():
    # A model with one layer kept in eval mode on purpose: certification must not switch it to train.
    from torch import nn

    from lipnet.modes import eval_mode
    from lipnet.modes import training_mode

    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Linear(2, 2))
    model.train()
    model[1].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model] == [True, False, True] and model.training
    with training_mode(model, True):
        assert all(m.training for m in model.modules())
    assert [m.training for m in model] == [True, False, True]


def test_certified_radius_slack_follows_the_models_precision_not_the_logits_dtype():
    """Logits computed in fp32 and handed over as float64 keep fp32's error allowance (2^29 x
    float64's); a float64 model says so; bf16 logits get bf16's; conformal uses the same rule."""
    from lipnet.certify import float_evaluation_slack

    torch.manual_seed(0)
    z = torch.randn(6, 10) * 5
    certified_radius = certify.certified_radius
    r32 = certified_radius(z, 1.0, 0.0)
    assert torch.equal(certified_radius(z.double(), 1.0, 0.0), r32)
    assert torch.equal(float_evaluation_slack(z.double()), float_evaluation_slack(z))
    assert (float_evaluation_slack(z.double(), torch.float64) < float_evaluation_slack(z) * 1e-8).all()
    assert (certified_radius(z.double(), 1.0, 0.0, precision=torch.float64) >= r32).all()
    assert (float_evaluation_slack(z.bfloat16()) > float_evaluation_slack(z) * 1e4).all()


def test_huge_inputs_in_a_heads_null_space_get_no_radius_from_rounding():
    """An OrthoLinear head fed 1e7-norm inputs from its null space has exact logits = its bias
    (all equal here: margin 0, radius 0); fp32 rounding of the 1e7-scale sums gives a spurious
    margin, which the slack (scaled by L ||x||) must absorb -- a positive radius is a wrong
    certificate."""
    g = torch.Generator().manual_seed(0)
    wrong = 0
    for trial in range(200):
        d = (16, 64, 256)[trial % 3]
        head = ln.export(ln.OrthoLinear(d, 10, bias=False)).eval()
        w = head.weight.detach().double()
        x = torch.randn(8, d, generator=g, dtype=torch.float64)
        x = x - x @ w.T @ w  # the orthogonal projector's complement: W x = 0 exactly
        x = (x * (1e7 / x.norm(dim=1, keepdim=True))).float()
        with torch.no_grad():
            z = head(x)
        assert z.abs().max() > 0  # rounding does produce spurious logits ...
        bound = ln.lipschitz_bound(head)
        wrong += int((certify.certified_radius(z, bound, x) > 0).sum())
        r_float = certify.certified_radius(z, bound, float(x.norm(dim=1).max()))
        wrong += int((r_float > 0).sum())
    assert wrong == 0  # ... and none of it is certified


def test_certified_accuracy_refuses_labels_outside_the_classes_and_bad_pgd_options(trained):
    model, x, y = trained
    bad = y[:8].clone()
    bad[3] = 10
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        certify.certified_accuracy(model, [(x[:8], bad)], [0.5])
    with pytest.raises(ValueError, match="pgd_steps"):
        certify.certified_accuracy(model, [(x[:8], y[:8])], [0.5], pgd_steps=-1)
    report = certify.certified_accuracy(model, [(x[:8], y[:8])], [0.5], pgd_steps=2, pgd_points=0)
    assert report.pgd == {} and report.pgd_n == 0  # no point attacked: no PGD column, not 0%


def test_the_empirical_lower_bound_never_exceeds_the_sound_one():
    """lipschitz_report / lipschitz_lower_bound: ratios of real input pairs in float64 on the
    weights in use; fp32 finite differences once put an OrthoLinear's "lower" at 1.000023 above
    its bound 1.000001."""
    torch.manual_seed(0)
    model = nn.Sequential(InputNormalization([0.5]), ln.OrthoConv2d(1, 4, 3), ln.MaxMin(), ln.BatchCentering(4),
                          ln.Flatten(), OrthoLinear(4 * 8 * 8, 32), ln.GroupSort(2), ln.SLLBlock(32, 16),
                          ln.ConvexResidual(OrthoLinear(32, 32), 0.3), OrthoLinear(32, 10)).eval()
    x = torch.rand(64, 1, 8, 8)
    report = ln.lipschitz_report(model, x)
    for row in report.rows:
        assert row.lower is not None and row.lower <= row.bound, row
    head = OrthoLinear(64, 64).eval()  # square orthogonal: its constant is 1 up to the retraction's 1e-7
    lower = certify.lipschitz_lower_bound(head, torch.randn(128, 64))
    assert 1 - 1e-6 < lower <= ln.lipschitz_bound(head)


def test_integer_pixels_are_refused_not_scored():
    from lipnet.pretrained import pretrained

    model = pretrained("mnist")
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    with pytest.raises(TypeError, match=r"x.float\(\) / 255"):
        model(images)
    with pytest.raises(ValueError, match="uint8"):
        certify.certified_accuracy(model, [(images, torch.zeros(4, dtype=torch.long))], [0.5])
    clf = certify.ConformalClassifier(model, alpha=0.2)
    with pytest.raises(ValueError, match="uint8"):
        clf.logits(images)
