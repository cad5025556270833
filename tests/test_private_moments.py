"""Private per-channel statistics: the clip bounds every sample's influence, the release is the
accounted Gaussian mechanism, and the trainer composes it with its own steps."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant
from scipy.stats import norm
from torch import nn

import lipnet.nn as ln
from helpers import blobs
from lipnet.data import BatchLoader
from lipnet.privacy import (GaussianRelease, PrivateTrainer, calibrate_noise_multiplier, channel_moment_clips,
                            private_channel_moments)
from lipnet.privacy.moments import clipped_moment_sums

# opacus' PRV evaluates log(1 - q) = -inf for a full-data release (q = 1); the result is still finite and checked here
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(1, 5), st.floats(1e-3, 1e6), st.floats(0.1, 10), st.floats(0.1, 10),
       st.integers(0, 10_000))
def test_removing_one_sample_moves_the_sums_by_at_most_the_clips(channels, side, scale, clip_mean, clip_sq, seed):
    # an adversarial extra sample: huge, spiky, or negative -- its influence is still clipped
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(9, channels, side, side, generator=g)
    extra = scale * torch.randn(1, channels, side, side, generator=g).sign() * torch.rand(1, channels, side, side,
                                                                                          generator=g)
    with_it = clipped_moment_sums(torch.cat([data, extra]), clip_mean, clip_sq)
    without = clipped_moment_sums(data, clip_mean, clip_sq)
    delta = (with_it - without).norm(dim=1)
    assert delta[0] <= clip_mean * (1 + 1e-9) and delta[1] <= clip_sq * (1 + 1e-9)


def test_never_clipping_clips_are_attained_and_never_exceeded():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, 4, 4, generator=g)
    x[0] = 0
    x[0, 1] = 1.0  # all energy in one channel, constant: ||m|| = ||x|| / sqrt(P), ||s|| = ||x||^2 / P
    x = x / x.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * 5.0
    clip_mean, clip_sq = channel_moment_clips(5.0, 3, 16)
    m, s = x.flatten(2).mean(2).norm(dim=1), x.flatten(2).square().mean(2).norm(dim=1)
    assert m.max() <= clip_mean * (1 + 1e-6) and s.max() <= clip_sq * (1 + 1e-6)
    assert m[0] == pytest.approx(clip_mean, rel=1e-5) and s[0] == pytest.approx(clip_sq, rel=1e-5)


def test_released_moments_are_the_noisy_sums_and_close_to_the_true_ones():
    g = torch.Generator().manual_seed(1)
    true_mean, true_std = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 0.5, 2.0])
    x = true_mean.view(1, 3, 1, 1) + true_std.view(1, 3, 1, 1) * torch.randn(20_000, 3, 2, 2, generator=g)
    released = private_channel_moments(x, clip_mean=20.0, clip_sq=60.0, noise_multiplier=4.0, min_var=1e-4,
                                       generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(released.mean, true_mean, atol=0.03, rtol=0)
    torch.testing.assert_close(released.std, true_std, atol=0.05, rtol=0)
    assert released.release == GaussianRelease(4.0, 1.0, 2)
    # the same generator state reproduces the noise: output = (clipped sums + sigma * clip * z) / n
    z = torch.randn(2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sums = clipped_moment_sums(x, 20.0, 60.0) + z * torch.tensor([[80.0], [240.0]], dtype=torch.float64)
    mean = sums[0] / len(x)
    torch.testing.assert_close(released.mean, mean.float())
    torch.testing.assert_close(released.std, (sums[1] / len(x) - mean ** 2).clamp_min(1e-4).sqrt().float())


def test_noise_std_is_sigma_times_the_clip_over_n():
    x = torch.zeros(100, 2, 3, 3)
    means = torch.stack([private_channel_moments(x, clip_mean=2.0, clip_sq=1.0, noise_multiplier=3.0, min_var=1.0,
                                                 generator=torch.Generator().manual_seed(k)).mean for k in range(400)])
    assert means.std().item() == pytest.approx(3.0 * 2.0 / 100, rel=0.1)


def test_bad_input_is_refused():
    x = torch.randn(10, 2, 3)
    for kwargs, match in ((dict(clip_mean=0.0), "clip_mean"), (dict(noise_multiplier=float("nan")), "noise_multiplier"),
                          (dict(min_var=0.0), "min_var")):
        with pytest.raises(ValueError, match=match):
            private_channel_moments(x, **{**dict(clip_mean=1.0, clip_sq=1.0, noise_multiplier=1.0, min_var=1e-3),
                                          **kwargs})
    with pytest.raises(ValueError, match="NaN"):
        private_channel_moments(x.clone().index_fill_(0, torch.tensor([3]), float("nan")), clip_mean=1.0, clip_sq=1.0,
                                noise_multiplier=1.0, min_var=1e-3)
    with pytest.raises(ValueError, match="non-empty float"):
        private_channel_moments(torch.ones(4, dtype=torch.int64), clip_mean=1.0, clip_sq=1.0, noise_multiplier=1.0,
                                min_var=1e-3)


def _gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon of a Gaussian mechanism of sensitivity/std mu at delta (Balle & Wang 2018)."""
    lo, hi = 0.0, 100.0
    for _ in range(200):
        eps = (lo + hi) / 2
        d = norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
        lo, hi = (eps, hi) if d > delta else (lo, eps)
    return hi


@pytest.mark.parametrize("accountant, cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_the_trainer_composes_the_prior_release_with_its_steps(accountant, cls):
    ds, release = blobs(400), GaussianRelease(3.0, 1.0, 2)
    model = nn.Sequential(ln.Flatten(), nn.Linear(64, 2))
    trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), ds, loss=ln.LipschitzCrossEntropy(),
                             input_bound=8.0, target_delta=1e-4, noise_multiplier=1.3, sample_rate=0.1,
                             accountant=accountant, progress=False, prior_releases=[release])
    alone = cls()
    alone.history = [release.as_history()]
    # before any step the statistics alone are spent: two full-data Gaussian releases = one of mu = sqrt(2)/3
    assert trainer.epsilon() == pytest.approx(alone.get_epsilon(delta=1e-4), rel=1e-6)
    exact = _gaussian_epsilon(math.sqrt(2) / 3.0, 1e-4)
    assert exact <= trainer.epsilon() * (1 + 1e-3)  # an accountant may only over-state epsilon
    if accountant == "prv":
        assert trainer.epsilon() == pytest.approx(exact, abs=0.02)
    for _ in range(5):
        trainer.step(*next(iter(trainer.loader)))
    reference = cls()
    reference.history = [release.as_history(), (1.3, 0.1, 5)]
    assert trainer.epsilon() == pytest.approx(reference.get_epsilon(delta=1e-4), rel=1e-6)
    assert trainer.state_dict()["accountant"]["history"][0] == release.as_history()


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibration_with_a_prior_release_spends_the_target_in_total(accountant):
    prior = (GaussianRelease(8.0, 1.0, 2),)
    sigma0 = calibrate_noise_multiplier(2.0, 1e-5, 0.05, 400, accountant)
    sigma = calibrate_noise_multiplier(2.0, 1e-5, 0.05, 400, accountant, prior)
    assert sigma > sigma0  # the statistics take part of the budget
    acct = (RDPAccountant if accountant == "rdp" else PRVAccountant)()
    acct.history = [prior[0].as_history(), (sigma, 0.05, 400)]
    assert 2.0 - 0.011 <= acct.get_epsilon(delta=1e-5) <= 2.0
    with pytest.raises(ValueError, match="prior releases alone"):
        calibrate_noise_multiplier(0.5, 1e-5, 0.05, 400, accountant, (GaussianRelease(0.5, 1.0, 2),))


def test_a_resumed_run_must_carry_the_same_prior_releases():
    prior = [GaussianRelease(6.0, 1.0, 2)]

    def make(releases):
        model = nn.Sequential(ln.Flatten(), nn.Linear(64, 2))
        # sigma given, not calibrated: a different prior would otherwise already change sigma (refused too)
        return PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), BatchLoader(blobs(400), 50),
                              loss=ln.LipschitzCrossEntropy(), input_bound=8.0, target_delta=1e-4, noise_multiplier=1.5,
                              progress=False, prior_releases=releases)

    trainer = make(prior)
    trainer.train_epoch()
    state = trainer.state_dict()
    resumed = make(prior)
    resumed.load_state_dict(state)
    assert resumed.steps == trainer.steps and resumed.epsilon() == trainer.epsilon()
    with pytest.raises(ValueError, match="prior releases"):
        make([GaussianRelease(7.0, 1.0, 2)]).load_state_dict(state)
    with pytest.raises(ValueError, match="prior releases"):
        make(prior).load_state_dict(dict(state, accountant=dict(state["accountant"],
                                                                history=state["accountant"]["history"][1:])))
    with pytest.raises(TypeError, match="GaussianRelease"):
        make([(6.0, 1.0, 2)])
