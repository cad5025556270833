"""Schatten-p descent: schatten_update against the SVD, the adaptive criterion against direct
formulas, SchattenMuon against hand-written loops and TurboMuon."""

from __future__ import annotations

import copy
import importlib.util
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lipnet.optim import KappaPin, SchattenMuon, TurboMuon, schatten_update
from lipnet.optim.schatten import (activation_log_norms, alignment_ratio, choose_p, layer_features, p_grid,
                                   _gram_eigh)
from lipnet.ortho import orthogonalize

from strategies import matrix_with_spectrum


def _svd_power(M: torch.Tensor, p: float, floor: float = 0.0) -> torch.Tensor:
    """Reference U g(S) V^T from a full SVD, g(s) = s^(1/p) above floor * s_max, linear below."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    tau = floor * S[..., :1]
    g = torch.where(S >= tau, S ** (1 / p), S * tau.clamp_min(1e-300) ** (1 / p - 1))
    return (U * g.unsqueeze(-2)) @ Vh


@st.composite
def spectra(draw, max_condition=100.0):
    m, n = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    batch = draw(st.lists(st.integers(1, 3), max_size=2).map(tuple))
    kappa = draw(st.floats(1.0, max_condition))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    sv = scale * torch.logspace(0, -math.log10(kappa), min(m, n), dtype=torch.float64)
    return matrix_with_spectrum(m, n, sv, draw(st.integers(0, 2**31 - 1)), batch)


ps = st.one_of(st.floats(1.0, 50.0), st.sampled_from([1.0, 2.0, 3.0, 1e6]))


# ---- schatten_update -----------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(spectra(), ps)
def test_matches_svd_fp64(M, p):
    """Singular values above the floor (here all: condition <= 100 < 1 / floor): exact to 1e-9."""
    out = schatten_update(M, p)
    ref = _svd_power(M, p)
    assert out.shape == M.shape and out.dtype == M.dtype
    assert (out - ref).norm() <= 1e-9 * ref.norm() + 1e-300


@settings(max_examples=25, deadline=None)
@given(spectra(max_condition=30.0), st.floats(1.0, 20.0))
def test_matches_svd_fp32(M, p):
    out = schatten_update(M.float(), p)
    ref = _svd_power(M, p)
    assert out.dtype == torch.float32
    assert (out.double() - ref).norm() <= 2e-4 * ref.norm()


@settings(max_examples=20, deadline=None)
@given(st.integers(3, 10), st.integers(3, 10), st.floats(1.5, 20.0), st.integers(0, 2**31 - 1))
def test_below_floor_is_linear_continuation(m, n, p, seed):
    """Singular values under floor * s_max get s * tau^(1/p - 1): bounded and monotone, as documented."""
    k = min(m, n)
    sv = torch.logspace(0, -6, k, dtype=torch.float64)          # down to 1e-6 s_max, floor 1e-3
    M = matrix_with_spectrum(m, n, sv, seed)
    out = schatten_update(M, p, floor=1e-3)
    ref = _svd_power(M, p, floor=1e-3)
    assert (out - ref).norm() <= 1e-8 * ref.norm()
    out_sv = torch.linalg.svdvals(out)
    assert torch.all(out_sv[:-1] >= out_sv[1:] * (1 - 1e-9))   # order of singular values kept


def test_endpoints():
    M = torch.randn(3, 6, 10, dtype=torch.float64)
    assert schatten_update(M, 1) is M
    assert torch.equal(schatten_update(M, math.inf), orthogonalize(M, "turbo"))
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    assert torch.allclose(schatten_update(M, math.inf, polar="svd"), U @ Vh, atol=1e-12)
    # a tensor p: inf through the eigh route is the exact polar factor, 1 is M
    out = schatten_update(M, torch.tensor([1.0, math.inf, 2.0], dtype=torch.float64))
    assert torch.allclose(out[0], M[0], atol=1e-12) and torch.allclose(out[1], (U @ Vh)[1], atol=1e-10)
    assert torch.allclose(out[2], _svd_power(M[2], 2.0), atol=1e-10)
    assert torch.equal(schatten_update(torch.zeros(4, 5), 3.0), torch.zeros(4, 5))


def test_monotone_in_p():
    """cond(S_p) = cond(M)^(1/p) decreases with p; S_p / ||S_p||_2 approaches the polar factor."""
    M = matrix_with_spectrum(8, 12, torch.logspace(0, -1.5, 8), seed=3)
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    conds, dists = [], []
    for p in [1.0, 1.5, 2.0, 4.0, 8.0, 32.0, 1e4]:
        sv = torch.linalg.svdvals(schatten_update(M, p))
        conds.append((sv[0] / sv[-1]).item())
        S = schatten_update(M, p)
        dists.append((S / sv[0] - U @ Vh).norm().item())
    assert all(a > b for a, b in zip(conds, conds[1:])) and conds[0] == pytest.approx(10 ** 1.5, rel=1e-6)
    assert all(a > b for a, b in zip(dists, dists[1:])) and dists[-1] < 1e-3


def _optim_benchmark():
    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "optim.py"
    spec = importlib.util.spec_from_file_location("lipnet_benchmark_optim", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("p", [2, 3, 5])
def test_benchmark_newton_root_agrees(p):
    """The coupled Newton route that benchmarks/optim.py --roots measures against the eigh."""
    M = matrix_with_spectrum(6, 15, torch.logspace(0, -1, 6), seed=p).float()
    ref = _svd_power(M.double(), p)
    for X, R in ((M, ref), (M.mT, ref.mT)):
        out = _optim_benchmark().newton_power(X, p)
        assert (out.double() - R).norm() <= 1e-3 * R.norm()


def test_schatten_update_bad_input():
    M = torch.randn(4, 5)
    for p in (0.5, float("nan"), -1, "2", True):
        with pytest.raises(ValueError, match="p must"):
            schatten_update(M, p)
    with pytest.raises(ValueError, match="non-finite"):
        schatten_update(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 2.0)
    with pytest.raises(ValueError, match="every p"):
        schatten_update(M, torch.tensor(0.9))
    with pytest.raises(ValueError, match="floor"):
        schatten_update(M, 2.0, floor=1.0)
    with pytest.raises(ValueError, match="2 dims"):
        schatten_update(torch.randn(5), 2.0)


# ---- the criterion -----------------------------------------------------------------------------------

def test_activation_log_norms_direct():
    sv = torch.tensor([3.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    grid = torch.tensor([1.0, 1.5, 3.0, 9.0], dtype=torch.float64)
    got = activation_log_norms(sv, grid)
    for p, g in zip(grid.tolist(), got.tolist()):
        k = math.inf if p == 1 else 2 * (p + 1) / (p - 1)
        direct = 3.0 if k == math.inf else sum(s ** k for s in sv.tolist()) ** (1 / k)
        assert g == pytest.approx(math.log(direct), rel=1e-12)


def test_alignment_ratio_direct():
    g = torch.Generator().manual_seed(0)
    M, G = torch.randn(2, 5, 9, generator=g, dtype=torch.float64), torch.randn(2, 5, 9, generator=g, dtype=torch.float64)
    grid = p_grid(1.02, 10.0, 7)
    lam, lam_c, W = _gram_eigh(M, 1e-3)
    got = alignment_ratio(lam, lam_c, W, M, G, grid)
    for j, p in enumerate(grid.tolist()):
        S = _svd_power(M, p)
        sv = torch.linalg.svdvals(S)
        direct = (G * S).sum((-2, -1)) / (sv ** (p + 1)).sum(-1) ** (1 / (p + 1))
        assert torch.allclose(got[:, j], direct, rtol=1e-9)


def test_choose_p_extremes():
    """Rank-1 gradient (nothing to gain from flattening) + white activations -> pmin (SGD side);
    flat gradient spectrum + rank-1 activations (Frobenius = spectral) -> pmax (Muon side)."""
    grid = p_grid(1.02, 10.0, 16)
    n = 16
    u, v = torch.randn(8, 1, dtype=torch.float64), torch.randn(n, 1, dtype=torch.float64)
    rank1 = u @ v.mT
    flat = torch.linalg.qr(torch.randn(n, 8, dtype=torch.float64))[0].mT
    white = activation_log_norms(torch.ones(n, dtype=torch.float64), grid)
    spike = activation_log_norms(torch.tensor([1.0] + [0.0] * (n - 1), dtype=torch.float64), grid)
    prev = torch.tensor(5.0, dtype=torch.float64)
    for M, act, expect in [(rank1 + 1e-3 * flat, white, grid[0]), (flat, spike, grid[-1])]:
        lam, lam_c, W = _gram_eigh(M, 1e-3)
        ratio = alignment_ratio(lam, lam_c, W, M, M, grid)
        assert choose_p(ratio, act, grid, prev).item() == pytest.approx(expect.item())
    # no positive alignment: keep the previous p
    lam, lam_c, W = _gram_eigh(flat, 1e-3)
    assert choose_p(alignment_ratio(lam, lam_c, W, flat, -flat, grid), white, grid, prev).item() == 5.0


def test_layer_features_conv_and_linear():
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2, bias=False)
    x = torch.randn(2, 3, 6, 6)
    full = F.unfold(x, 3, padding=1, stride=2).mT.reshape(-1, 27)
    assert torch.equal(layer_features(conv, x, 10_000), full)
    sub = layer_features(conv, x, 5)
    assert sub.shape == (5, 27) and all(any(torch.equal(r, f) for f in full) for r in sub)
    assert layer_features(nn.Linear(7, 2), torch.randn(3, 4, 7), 100).shape == (12, 7)
    assert layer_features(nn.Conv2d(4, 4, 3, groups=2), torch.randn(1, 4, 5, 5), 10) is None


# ---- the optimizer -----------------------------------------------------------------------------------

SHAPES = [(6, 10), (6, 10), (10, 6), (4, 2, 3, 3), (5, 5)]


def _params(shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def _drive(opt, params, steps, start=0):
    for t in range(start, start + steps):
        for p, g in zip(params, _grads(params, t)):
            p.grad = g
        opt.step()


def test_p_inf_is_turbomuon():
    a, b = _params(), _params()
    _drive(SchattenMuon(a, lr=0.03, p=math.inf, weight_decay=0.1), a, 4)
    _drive(TurboMuon(b, lr=0.03, weight_decay=0.1), b, 4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("p,nesterov", [(2.0, True), (1.0, False), (5.5, True)])
def test_fixed_p_matches_reference_loop(p, nesterov):
    params = _params()
    ref = [q.detach().clone() for q in params]
    bufs = [torch.zeros_like(q) for q in ref]
    lr, beta, wd = 0.05, 0.9, 0.01
    opt = SchattenMuon(params, lr=lr, p=p, momentum=beta, nesterov=nesterov, weight_decay=wd)
    for t in range(3):
        _drive(opt, params, 1, start=t)
        for q, g, buf in zip(ref, _grads(ref, t), bufs):
            buf.mul_(beta).add_(g, alpha=1 - beta)
            u = (1 - beta) * g + beta * buf if nesterov else buf
            m, n = len(q), q[0].numel()
            s = _svd_power(u.reshape(m, n), p)
            s = s * math.sqrt(min(m, n)) / s.norm()
            q.mul_(1 - lr * wd).sub_(lr * math.sqrt(max(1, m / n)) * s.reshape(q.shape))
    for q, r in zip(params, ref):
        assert torch.allclose(q, r, atol=1e-10)


@pytest.mark.parametrize("kind", ["adam", "muadam"])
def test_preconditioned_endpoints(kind):
    """p = 1: Adam's direction m / sqrt(v_hat + eps) (both); p = inf: Muon ("adam": D = 1) or MuAdam
    D * polar(D * m) (fixed D = (v_hat + eps)^(-1/4)); Frobenius norm pinned to sqrt(min(m, n))."""
    for p in (1.0, math.inf):
        (w,) = _params([(6, 9)])
        w0 = w.detach().clone()
        opt = SchattenMuon([w], lr=1.0, p=p, momentum=0.0, precondition=kind, beta2=0.99, eps=1e-8)
        (g,) = _grads([w], 0)
        w.grad = g
        opt.step()
        D = (g.square() + 1e-8) ** (-0.25 if kind == "muadam" or p == 1 else 0.0)
        if p == 1:
            d = D * D * g
        else:
            U, _, Vh = torch.linalg.svd(D * g, full_matrices=False)
            d = D * (U @ Vh)
        d = d * math.sqrt(6) / d.norm()
        assert torch.allclose(w0 - w, d, atol=1e-9)


def _tiny_task(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(128, 12)
    y = torch.tanh(x @ torch.randn(12, 4))
    net = nn.Sequential(nn.Linear(12, 32, bias=False), nn.Tanh(), nn.Linear(32, 32, bias=False), nn.Tanh(),
                        nn.Linear(32, 4, bias=False)).double()
    return x.double(), y.double(), net


def _train(net, opt, x, y, steps):
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_adaptive_trains_and_p_in_range():
    x, y, net = _tiny_task()
    opt = SchattenMuon(net.parameters(), lr=0.02, pmin=1.1, pmax=8.0, p_every=1, act_every=5)
    assert len(opt.watch(net)) == 3
    assert opt.current_p() == [8.0] * len(list(net.parameters()))   # pmax before the first step
    history = []
    losses = []
    for _ in range(40):
        losses += _train(net, opt, x, y, 1)
        history.append(opt.current_p())
    assert losses[-1] < 0.5 * losses[0]
    flat = [p for row in history for p in row]
    grid = set(p_grid(1.1, 8.0, 32).float().tolist())
    assert all(1.1 - 1e-6 <= p <= 8.0 + 1e-6 for p in flat)
    assert all(any(abs(p - g) < 1e-5 for g in grid) for p in flat)
    assert all("act_log_norm" in opt.state[w] for w in net.parameters())
    assert len({round(p, 4) for p in flat}) > 1       # p actually moves


def _bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False)).double()


@pytest.mark.parametrize("center", ["batchnorm", True, False])
def test_watch_centers_the_features_of_layers_feeding_a_batchnorm(center):
    """The recorded spectrum is that of the centered features exactly for the layers the option names:
    ``"batchnorm"``: the conv (its output goes straight into BatchNorm2d), not the ReLU-fed linears."""
    net = _bn_net()
    conv, lin1, lin2 = net[0], net[4], net[6]
    opt = SchattenMuon([conv.weight, lin1.weight, lin2.weight], lr=0.0, p_every=1, act_every=1, act_rows=10_000)
    opt.watch(net, center=center)
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64) + 0.5          # a large mean feature
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o: inputs.__setitem__(m, i[0].detach())) for m in (conv, lin1, lin2)]
    F.cross_entropy(net(x), torch.tensor([0, 1, 2])).backward()
    opt.step()
    for h in hooks:
        h.remove()
    expect_centered = {"batchnorm": {conv}, True: {conv, lin1, lin2}, False: set()}[center]
    for m in (conv, lin1, lin2):
        A = layer_features(m, inputs[m], 10_000)
        for centered in (False, True):
            B = A - A.mean(0) if centered else A
            sv = torch.linalg.svdvals(B)
            expected = activation_log_norms(sv[sv > 1e-9 * sv[0]], opt.grid)
            close = torch.allclose(opt.state[m.weight]["act_log_norm"], expected, rtol=1e-6, atol=1e-6)
            assert close == (centered == (m in expect_centered)), (m, centered)
    with pytest.raises(ValueError, match="center"):
        opt.watch(net, center="yes")


def test_state_dict_round_trip():
    x, y, net = _tiny_task(1)
    opt = SchattenMuon(net.parameters(), lr=0.02, p_every=2, act_every=2)
    opt.watch(net)
    _train(net, opt, x, y, 5)
    twin = nn.Sequential(*[type(m)(*(m.in_features, m.out_features), bias=False).double() if isinstance(m, nn.Linear)
                           else nn.Tanh() for m in net])
    twin.load_state_dict(net.state_dict())
    opt2 = SchattenMuon(twin.parameters(), lr=0.02, p_every=2, act_every=2)
    opt2.watch(twin)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # state_dict() shares tensors
    assert opt2.current_p() == opt.current_p()
    _train(net, opt, x, y, 3)
    _train(twin, opt2, x, y, 3)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters()))
    assert opt2.current_p() == opt.current_p()


def test_zero_and_missing_grads():
    a, b = _params([(4, 6), (4, 6)])
    opt = SchattenMuon([a, b], lr=0.1, p=3.0)
    a0, b0 = a.detach().clone(), b.detach().clone()
    a.grad = torch.zeros_like(a)
    opt.step()
    assert torch.equal(a, a0) and torch.equal(b, b0)


def test_optimizer_bad_arguments():
    w = [nn.Parameter(torch.randn(3, 4))]
    bad = [dict(p=0.5), dict(p="fast"), dict(p=float("nan")), dict(lr=-1.0), dict(momentum=1.0),
           dict(pmin=5.0, pmax=2.0), dict(pmin=0.5), dict(p_points=1), dict(act_every=0), dict(floor=-0.1),
           dict(p_every=3, act_every=10), dict(p_every=0),
           dict(precondition="shampoo"), dict(adjust_lr="x"), dict(weight_decay=-1.0), dict(ns_steps=0)]
    for kw in bad:
        kw = {"lr": 0.1, **kw}
        with pytest.raises(ValueError):
            SchattenMuon(w, **kw)
    with pytest.raises(ValueError, match=">= 2 dims"):
        SchattenMuon([nn.Parameter(torch.randn(3))], lr=0.1)


def _kappa(adam_lr, lr, m, n, beta1=0.9, regime="noisy"):
    rho_adam = 1.0 if regime == "determ" else math.sqrt((1 - beta1) / (1 + beta1))
    return adam_lr * rho_adam * math.sqrt(max(m, n)) / lr  # (eta_adam rho_adam) / (eta_muon / sqrt(max(m, n)))


@pytest.mark.parametrize("p,regime", [(1.0, "noisy"), (2.0, "determ"), (5.5, "noisy"), (math.inf, "noisy")])
def test_kappa_pin_matches_the_hand_written_step(p, regime):
    params = _params()
    ref = [q.detach().clone() for q in params]
    lr, adam_lr = 0.05, 3e-3
    opt = SchattenMuon(params, lr=lr, p=p, momentum=0.0, pin=KappaPin(adam_lr, regime=regime))
    _drive(opt, params, 1)
    for q, r, g in zip(params, ref, _grads(ref, 0)):
        m, n = len(r), r[0].numel()
        if p == math.inf:  # kappa^0 = 1: the core's turbo polar factor itself, without adjust_lr's factor
            from lipnet.ortho import orthogonalize
            s = orthogonalize(g.reshape(1, m, n), "turbo", 4)[0]
        else:
            s = _svd_power(g.reshape(m, n), p)
            s = s * math.sqrt(min(m, n)) / s.norm()
        s = s * _kappa(adam_lr, lr, m, n, regime=regime) ** (1 / p)  # no adjust_lr factor
        torch.testing.assert_close(r - q.detach(), lr * s.reshape(r.shape), atol=1e-10, rtol=0)
    # p = 1: the per-entry RMS of the step is Adam's adam_lr * rho_adam
    if p == 1.0:
        for q, r in zip(params, ref):
            rms = (r - q.detach()).pow(2).mean().sqrt().item()
            rho = 1.0 if regime == "determ" else math.sqrt(0.1 / 1.9)
            assert rms == pytest.approx(adam_lr * rho * math.sqrt(min(q.shape[0], q[0].numel())
                                        * max(q.shape[0], q[0].numel()) / q.numel()), rel=1e-9)


def test_kappa_pin_with_adaptive_p_uses_each_matrix_p():
    params = _params([(6, 10), (5, 5)])
    ref = [q.detach().clone() for q in params]
    lr, adam_lr = 0.05, 1e-3
    opt = SchattenMuon(params, lr=lr, p="adaptive", momentum=0.0, pin=KappaPin(adam_lr), p_every=1)
    _drive(opt, params, 1)
    for q, r, p in zip(params, ref, opt.current_p()):
        m, n = len(r), r[0].numel()
        norm = (r - q.detach()).norm().item()
        assert norm == pytest.approx(lr * math.sqrt(min(m, n)) * _kappa(adam_lr, lr, m, n) ** (1 / p), rel=1e-6)


def test_kappa_pin_bad_arguments():
    w = [nn.Parameter(torch.randn(3, 4))]
    for pin in ("spectral", "kappa", None):
        with pytest.raises(ValueError, match="KappaPin"):
            SchattenMuon(w, lr=0.1, pin=pin)
    for kw, name in ((dict(adam_lr=-1.0), "adam_lr"), (dict(adam_lr=math.inf), "adam_lr"),
                     (dict(adam_lr=1e-3, beta1=1.0), "beta1"), (dict(adam_lr=1e-3, regime="calm"), "regime")):
        with pytest.raises(ValueError, match=name):
            KappaPin(**kw)
    assert KappaPin(2e-3, regime="determ").adam_step == 2e-3
    assert KappaPin(2e-3).adam_step == pytest.approx(2e-3 * math.sqrt(0.1 / 1.9), rel=1e-15)


@pytest.mark.parametrize("kind", ["adam", "muadam"])
def test_adaptive_p_with_preconditioning_matches_the_hand_written_steps(kind):
    (w,) = _params([(6, 9)])
    ref = w.detach().clone()
    beta2, eps, lr, pmax = 0.99, 1e-8, 0.1, 10.0
    opt = SchattenMuon([w], lr=lr, p="adaptive", momentum=0.0, precondition=kind, beta2=beta2, eps=eps,
                       p_every=1, pmax=pmax)
    v, p_in_force = torch.zeros_like(ref), pmax
    for t in range(2):
        (g,) = _grads([w], t)
        w.grad = g
        opt.step()
        (p_chosen,) = opt.current_p()
        v = beta2 * v + (1 - beta2) * g.square()
        e = 0.25 if kind == "muadam" else 1 / (2 * (p_in_force + 1))  # D from the p chosen before this step
        D = (v / (1 - beta2 ** (t + 1)) + eps) ** (-e)
        d = D * _svd_power(D * g, p_chosen, floor=1e-3)
        d = d * math.sqrt(6) / d.norm() * math.sqrt(max(1, 6 / 9))
        ref = ref - lr * d
        torch.testing.assert_close(w.detach(), ref, atol=1e-9, rtol=0)
        p_in_force = p_chosen
    assert 1.02 <= p_chosen <= pmax
