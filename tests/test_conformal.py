"""Robust conformal prediction: coverage, soundness of the score bounds under attack, the
simultaneous coverage bound for vanilla CP, and bad input."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lipnet.nn as ln
from lipnet.certify import ConformalClassifier, network_lipschitz_bound, pgd_l2
from lipnet.certify.conformal import (class_scores, conformal_quantile, coverage_radii, min_calibration_size,
                                      probability_bounds, score_bounds, score_lipschitz,
                                      simultaneous_miss_upper_bound)

# ------------------------------------------------------------------------------------ helpers


def synthetic_logits(n: int, k: int, generator: torch.Generator, sep: float = 2.0):
    """Logits of a noisy classifier: the true class gets +sep on average."""
    y = torch.randint(0, k, (n,), generator=generator)
    z = torch.randn(n, k, generator=generator, dtype=torch.float64) * 1.5
    z[torch.arange(n), y] += sep
    return z, y


def clusters(n: int, generator: torch.Generator, dim: int = 8, k: int = 4, spread: float = 0.9):
    centers = torch.eye(k, dim) * 2.0
    y = torch.randint(0, k, (n,), generator=generator)
    return centers[y] + spread * torch.randn(n, dim, generator=generator), y


@pytest.fixture(scope="module")
def small_model():
    """A 1-Lipschitz MLP trained briefly on overlapping Gaussian clusters (accuracy ~85-90%)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(ln.OrthoLinear(8, 32), ln.MaxMin(), ln.OrthoLinear(32, 32), ln.MaxMin(), ln.OrthoLinear(32, 4))
    x, y = clusters(2000, g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = ln.LipschitzCrossEntropy(temperature=0.25, offset=1.0)
    for _ in range(60):
        idx = torch.randint(0, len(y), (256,), generator=g)
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


# ------------------------------------------------------------------------------------ quantile

def test_quantile_is_the_exact_order_statistic():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6], dtype=torch.float64)
    # n = 9, alpha = 0.1: ceil(10 * 0.9) = 9 -> the largest (a float product would say 10 > n).
    assert conformal_quantile(scores, 0.1) == 0.9
    assert conformal_quantile(scores, 0.5) == 0.5  # ceil(10 * 0.5) = 5 -> 5th smallest
    s = torch.rand(101, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for alpha in (0.05, 0.1, 0.2, 0.33):
        k = math.ceil(102 * (1 - alpha) - 1e-9)
        assert conformal_quantile(s, alpha) == float(s.sort().values[k - 1])


def test_min_calibration_size():
    assert min_calibration_size(0.1) == 9
    assert min_calibration_size(0.05) == 19
    assert min_calibration_size(0.3) == 3
    for alpha in (0.1, 0.05, 0.013, 0.3):
        n = min_calibration_size(alpha)
        conformal_quantile(torch.zeros(n), alpha)
        with pytest.raises(ValueError, match=f"need n >= {n}"):
            conformal_quantile(torch.zeros(n - 1), alpha)


@pytest.mark.parametrize("score,randomized", [("lac", False), ("aps", False), ("aps", True)])
def test_split_coverage_over_random_splits(score, randomized):
    """Marginal coverage >= 1 - alpha (and, with continuous scores, <= 1 - alpha + 1/(n+1))."""
    alpha, n_cal, n_test, splits = 0.1, 200, 200, 150
    g = torch.Generator().manual_seed(3)
    covs = []
    for _ in range(splits):
        z, y = synthetic_logits(n_cal + n_test, 5, g)
        u = torch.rand(len(y), generator=g, dtype=torch.float64) if randomized else torch.ones(len(y), dtype=torch.float64)
        s = class_scores(z, score, 0.5, u).gather(1, y[:, None])[:, 0]
        q = conformal_quantile(s[:n_cal], alpha)
        covs.append(float((s[n_cal:] <= q).double().mean()))
    mean, se = float(np.mean(covs)), float(np.std(covs) / math.sqrt(splits))
    assert mean >= 1 - alpha - 3 * se, (mean, se)
    if score == "lac" or randomized:  # continuous scores: coverage is also at most 1 - alpha + 1/(n+1)
        assert mean <= 1 - alpha + 1 / (n_cal + 1) + 3 * se, (mean, se)


# ------------------------------------------------------------------------- score bounds: sound

logit_arrays = st.integers(2, 7).flatmap(lambda k: st.lists(
    st.floats(-8, 8, allow_nan=False), min_size=k, max_size=k))


@settings(max_examples=120, deadline=None)
@given(z=logit_arrays, r=st.floats(0.0, 3.0), temperature=st.sampled_from([0.1, 0.25, 1.0, 3.0]),
       score=st.sampled_from(["lac", "aps"]), u=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_score_bounds_contain_every_score_in_the_ball(z, r, temperature, score, u, seed):
    logits = torch.tensor([z], dtype=torch.float64)
    k = logits.shape[1]
    lo, hi = score_bounds(logits, r, score, temperature, u)
    s = class_scores(logits, score, temperature, u)
    assert (lo <= s + 1e-12).all() and (s <= hi + 1e-12).all()
    g = torch.Generator().manual_seed(seed)
    # random directions, and the extreme ones: +-r/sqrt2 (e_i - e_j) move one difference by sqrt2 r
    dirs = [torch.randn(k, generator=g, dtype=torch.float64) for _ in range(16)]
    dirs += [torch.eye(k, dtype=torch.float64)[i] - torch.eye(k, dtype=torch.float64)[j]
             for i in range(k) for j in range(k) if i != j]
    for d in dirs:
        for scale in (1.0, 0.5):
            delta = d / d.norm() * r * scale
            moved = class_scores(logits + delta, score, temperature, u)
            assert (lo <= moved + 1e-12).all() and (moved <= hi + 1e-12).all()


def test_probability_bounds_are_exact_for_two_classes():
    z = torch.tensor([[1.0, -0.5], [0.3, 0.2]], dtype=torch.float64)
    r = 0.7
    lo, hi = probability_bounds(z, r, 0.5)
    worst_up = z + r / math.sqrt(2) * torch.tensor([1.0, -1.0], dtype=torch.float64)
    worst_down = z - r / math.sqrt(2) * torch.tensor([1.0, -1.0], dtype=torch.float64)
    assert torch.allclose(hi[:, 0], torch.softmax(worst_up / 0.5, 1)[:, 0], atol=1e-12)
    assert torch.allclose(lo[:, 0], torch.softmax(worst_down / 0.5, 1)[:, 0], atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(z=logit_arrays, r=st.floats(0.01, 2.0), temperature=st.sampled_from([0.25, 1.0]))
def test_our_bounds_are_tighter_than_the_full_shift(z, r, temperature):
    """lip-rcp shifts every logit by r (differences by 2r); we shift differences by sqrt(2) r."""
    logits = torch.tensor([z], dtype=torch.float64)
    _, hi = probability_bounds(logits, r, temperature)
    k = logits.shape[1]
    shifted = logits.expand(k, k) - r + 2 * r * torch.eye(k, dtype=torch.float64)
    theirs = torch.softmax(shifted / temperature, 1).diagonal()
    assert (hi[0] <= theirs + 1e-12).all()


@settings(max_examples=60, deadline=None)
@given(z=logit_arrays, temperature=st.sampled_from([0.1, 0.5, 2.0]))
def test_lac_lipschitz_constant_bounds_the_gradient(z, temperature):
    logits = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(logits / temperature, 0)
    for k in range(len(z)):
        (grad,) = torch.autograd.grad(p[k], logits, retain_graph=True)
        assert grad.norm() <= score_lipschitz("lac", temperature) * (1 + 1e-12)


def test_lac_lipschitz_constant_is_attained():
    logits = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # two classes, p = 1/2
    (grad,) = torch.autograd.grad(torch.softmax(logits / 0.5, 0)[0], logits)
    assert grad.norm() == pytest.approx(score_lipschitz("lac", 0.5), rel=1e-12)
    lo, hi = score_bounds(logits.detach()[None], 0.1, "lac", 0.5, bound="lipschitz")
    llo, lhi = score_bounds(logits.detach()[None], 0.1, "lac", 0.5, bound="local")
    assert (lo <= llo + 1e-12).all() and (lhi <= hi + 1e-12).all()  # the local bound is inside the global one


# ------------------------------------------------------------------- the classifier on a model

def _loader(x, y, batch=250):
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]


def test_eps_zero_is_vanilla_split_cp_exactly(small_model):
    g = torch.Generator().manual_seed(5)
    xc, yc = clusters(500, g)
    xt, yt = clusters(300, g)
    for mode in ("inference", "calibration"):
        clf = ConformalClassifier(small_model, "lac", alpha=0.1, eps=0.0, temperature=0.25, mode=mode).calibrate(_loader(xc, yc))
        with torch.no_grad():
            s_cal = 1 - torch.softmax(small_model(xc).double() / 0.25, 1)
            q = float(s_cal.gather(1, yc[:, None])[:, 0].sort().values[math.ceil(501 * 0.9) - 1])
            manual = (1 - torch.softmax(small_model(xt).double() / 0.25, 1)) <= q
        assert clf.quantile() == q
        assert torch.equal(clf.predict_sets(xt), manual)


@pytest.mark.parametrize("score", ["lac", "aps"])
@pytest.mark.parametrize("mode", ["inference", "calibration"])
def test_robust_sets_keep_coverage_under_attack(small_model, score, mode):
    """Attack every test point (PGD maximizing the true label's score against the set rule, 3
    seeds' worth of random starts): the pointwise guarantee never fails, coverage stays >= 1-alpha."""
    alpha, eps = 0.1, 0.3
    g = torch.Generator().manual_seed(11)
    xc, yc = clusters(1000, g)
    xt, yt = clusters(600, g)
    robust = ConformalClassifier(small_model, score, alpha, eps, temperature=0.25, mode=mode).calibrate(_loader(xc, yc))
    vanilla = ConformalClassifier(small_model, score, alpha, 0.0, temperature=0.25).calibrate(_loader(xc, yc))
    L = robust.lipschitz
    assert L == network_lipschitz_bound(small_model) and L <= 1.0001
    with torch.no_grad():
        z_clean = small_model(xt).double()
    if mode == "inference":   # covered clean by the vanilla set => covered after any attack
        must_cover = vanilla.sets_from_logits(z_clean).gather(1, yt[:, None])[:, 0]
    else:                      # upper score of the label <= robust q_hat => covered after any attack
        _, upper = score_bounds(z_clean, eps * L, score, 0.25)
        must_cover = upper.gather(1, yt[:, None])[:, 0] <= robust.quantile()
    assert must_cover.double().mean() >= 1 - alpha - 0.05
    vanilla_attacked = []
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        adv = pgd_l2(small_model, xt, yt, eps, 30, loss=robust.attack_objective(), clamp=None, generator=gen)
        assert ((adv - xt).norm(dim=1) <= eps * (1 + 1e-5)).all()
        sets = robust.predict_sets(adv)
        covered = sets.gather(1, yt[:, None])[:, 0]
        assert not (must_cover & ~covered).any(), "a robust set lost a label the guarantee covers"
        assert covered.double().mean() >= 1 - alpha - 0.04
        adv_v = pgd_l2(small_model, xt, yt, eps, 30, loss=vanilla.attack_objective(), clamp=None, generator=gen)
        vanilla_attacked.append(float(vanilla.predict_sets(adv_v).gather(1, yt[:, None])[:, 0].double().mean()))
        assert sets.sum(1).double().mean() >= vanilla.predict_sets(xt).sum(1).double().mean() - 1e-9
    # the attack is real: it pushes vanilla CP below its clean coverage
    clean_v = vanilla.evaluate(_loader(xt, yt)).coverage
    assert max(vanilla_attacked) < clean_v - 0.05, (vanilla_attacked, clean_v)


@settings(max_examples=40, deadline=None)
@given(z=st.lists(st.lists(st.floats(-8, 8, allow_nan=False), min_size=4, max_size=4), min_size=3, max_size=3),
       eps=st.floats(0.0, 1.0), score=st.sampled_from(["lac", "aps"]))
def test_robust_set_contains_vanilla_set(small_model, z, eps, score):
    clf = ConformalClassifier(small_model, score, 0.2, eps, temperature=0.5)
    g = torch.Generator().manual_seed(0)
    zc, yc = synthetic_logits(50, 4, g)
    clf.calibrate_logits(zc, yc)
    logits = torch.tensor(z, dtype=torch.float64)
    robust, vanilla = clf.sets_from_logits(logits), clf.sets_from_logits(logits, eps=0.0)
    assert (robust | ~vanilla).all()


def test_evaluate_reports_sizes_and_pgd(small_model):
    g = torch.Generator().manual_seed(2)
    xc, yc = clusters(500, g)
    xt, yt = clusters(250, g)
    clf = ConformalClassifier(small_model, "aps", 0.1, 0.2, temperature=0.25, randomized=True).calibrate(_loader(xc, yc))
    rep = clf.evaluate(_loader(xt, yt))
    sets = clf.predict_sets(xt)
    assert rep.n == 250 and 0 <= rep.empty_rate <= rep.singleton_rate + rep.empty_rate <= 1
    assert 0.5 < rep.mean_size < 4 and abs(rep.mean_size - sets.sum(1).double().mean()) < 0.5
    attacked = clf.evaluate(_loader(xt, yt), attack="pgd", attack_steps=5, clamp=None)
    assert attacked.attack_eps == 0.2 and attacked.coverage >= 0.85


# ---------------------------------------------------------------- vanilla coverage under attack

def test_simultaneous_miss_bound_holds_in_simulation():
    """Over 400 draws of n = 60 radii, the band fails (somewhere on a fine eps grid) in <= delta."""
    rng = np.random.default_rng(0)
    delta, n, grid = 0.1, 60, np.linspace(0, 3, 61)
    true_miss = 1 - np.exp(-grid)  # E ~ Exp(1): P(E < eps)
    failures = 0
    for _ in range(400):
        bound = simultaneous_miss_upper_bound(rng.exponential(size=n), grid, delta)
        failures += bool((bound < true_miss - 1e-12).any())
    assert failures / 400 <= delta
    b = simultaneous_miss_upper_bound(rng.exponential(size=n), grid, delta)
    assert np.all(np.diff(b) >= 0) and b[-1] <= 1 and b[0] >= 0


def test_vanilla_coverage_lower_bound_is_never_violated(small_model):
    g = torch.Generator().manual_seed(21)
    xc, yc = clusters(800, g)
    xh, yh = clusters(1500, g)
    xt, yt = clusters(500, g)
    clf = ConformalClassifier(small_model, "lac", 0.1, 0.0, temperature=0.25).calibrate(_loader(xc, yc))
    clf.fit_coverage_bound(_loader(xh, yh), delta=0.05)
    eps_grid = [0.0, 0.05, 0.1, 0.2, 0.4]
    bounds = clf.vanilla_coverage_lower_bound(eps_grid)
    assert np.all(np.diff(bounds) <= 1e-12) and bounds[0] > 0.8 and bounds[-1] < bounds[0]
    with torch.no_grad():
        radii = coverage_radii(small_model(xt).double(), yt, clf.quantile(), clf.lipschitz, "lac", 0.25)
    for e, b in zip(eps_grid, bounds):
        if e == 0:
            covered = clf.predict_sets(xt).gather(1, yt[:, None])[:, 0]
        else:
            adv = pgd_l2(small_model, xt, yt, e, 20, loss=clf.attack_objective(), clamp=None)
            assert ((adv - xt).norm(dim=1) <= e * (1 + 1e-5)).all()
            covered = clf.predict_sets(adv).gather(1, yt[:, None])[:, 0]
        assert not ((radii >= e) & ~covered).any()  # pointwise: a point certified at e stays covered
        # the bound is on the population coverage: allow the test sample's binomial noise
        tolerance = 3 * math.sqrt(b * (1 - b) / len(yt))
        assert covered.double().mean() >= b - tolerance, (e, float(covered.double().mean()), b)
    # a scalar eps gives that grid point's value, as a float
    scalar = clf.vanilla_coverage_lower_bound(0.1)
    assert isinstance(scalar, float) and scalar == float(bounds[eps_grid.index(0.1)])


# -------------------------------------------------------------------------------- bad input

def test_bad_input(small_model):
    for alpha in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            ConformalClassifier(small_model, alpha=alpha)
    with pytest.raises(ValueError, match="eps"):
        ConformalClassifier(small_model, eps=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        ConformalClassifier(small_model, temperature=0.0)
    with pytest.raises(ValueError, match="score"):
        ConformalClassifier(small_model, score="raps")
    with pytest.raises(ValueError, match="mode"):
        ConformalClassifier(small_model, mode="both")
    with pytest.raises(ValueError, match="lipschitz"):
        ConformalClassifier(small_model, score="aps", bound="lipschitz")
    with pytest.raises(ValueError, match="randomized"):
        ConformalClassifier(small_model, score="lac", randomized=True)
    with pytest.raises(ValueError, match="no Lipschitz constant"):
        score_lipschitz("aps")
    clf = ConformalClassifier(small_model, alpha=0.1)
    with pytest.raises(RuntimeError, match="calibrate"):
        clf.predict_sets(torch.zeros(2, 8))
    g = torch.Generator().manual_seed(0)
    x, y = clusters(8, g)
    with pytest.raises(ValueError, match="need n >= 9"):
        clf.calibrate([(x, y)])
    with pytest.raises(ValueError, match="empty"):
        clf.calibrate([])
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        clf.calibrate([(x, y)])
    x, y = clusters(50, g)
    clf.calibrate([(x, y)])
    with pytest.raises(ValueError, match="eps"):
        clf.predict_sets(x, eps=-1.0)
    with pytest.raises(ValueError, match="attack"):
        clf.evaluate([(x, y)], attack="fgsm")
    with pytest.raises(RuntimeError, match="fit_coverage_bound"):
        clf.vanilla_coverage_lower_bound(0.1)
    with pytest.raises(ValueError, match="delta"):
        clf.fit_coverage_bound([(x, y)], delta=1.0)
    with pytest.raises(ValueError, match="radius"):
        score_bounds(torch.zeros(1, 3), -1.0)


def test_bad_logits_and_labels_are_refused_not_scored(small_model):
    g = torch.Generator().manual_seed(0)
    zc, yc = synthetic_logits(50, 4, g)
    clf = ConformalClassifier(small_model, "lac", 0.2, 0.1, temperature=0.5)
    with pytest.raises(ValueError, match="50 rows of logits but 49 labels"):
        clf.calibrate_logits(zc, yc[:49])
    out_of_range = yc.clone()
    out_of_range[0] = 4
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        clf.calibrate_logits(zc, out_of_range)
    clf.calibrate_logits(zc, yc)
    for bad in (float("nan"), float("inf")):
        z = torch.zeros(2, 4, dtype=torch.float64)
        z[1, 2] = bad
        with pytest.raises(ValueError, match="NaN or inf"):  # an empty set would look like a prediction
            clf.sets_from_logits(z)
    x, y = clusters(20, g)
    with pytest.raises(ValueError, match="labels must lie"):
        clf.evaluate([(x, y + 4)])


def test_the_float_slack_of_robust_sets_grows_with_the_inputs(small_model):
    """Robust sets built with the inputs' norms are never smaller than those built from the logits
    alone (the slack only widens the eps-ball) and grow for huge inputs."""
    g = torch.Generator().manual_seed(1)
    zc, yc = synthetic_logits(200, 4, g)
    clf = ConformalClassifier(small_model, "lac", 0.1, 0.05, temperature=0.5).calibrate_logits(zc, yc)
    z, _ = synthetic_logits(100, 4, g)
    plain = clf.sets_from_logits(z)
    small = clf.sets_from_logits(z, inputs=1.0)
    huge = clf.sets_from_logits(z, inputs=1e6)
    assert (small | ~plain).all() and (huge | ~small).all()
    assert huge.sum() > small.sum()
