"""TurboMuon / NorMuon / split_params: against hand-written references, not against themselves."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lipnet.nn as ln
import lipnet.optim.muon as muon_mod
from lipnet.optim import TurboMuon, split_params
from lipnet.ortho import orthogonalize

SHAPES = [(8, 3, 3, 3), (8, 3, 3, 3), (16, 27), (6, 20), (20, 6), (6, 20), (4, 4)]


def _params(shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]


def _grads(params, step, seed=1):
    g = torch.Generator().manual_seed(seed + 1000 * step)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def _reference_muon(params, grads_per_step, lr, momentum, nesterov, wd, steps, adjust_lr, normuon=False, beta2=0.95):
    """Keller Jordan's muon.py loop, one parameter at a time, with the core's turbo orthogonalizer."""
    params = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros(len(p), 1, dtype=p.dtype) for p in params]
    for grads in grads_per_step:
        for p, g, buf, v in zip(params, grads, bufs, vs):
            buf.mul_(momentum).add_(g, alpha=1 - momentum)
            u = (1 - momentum) * g + momentum * buf if nesterov else buf
            m, n = len(p), p[0].numel()
            o = orthogonalize(u.reshape(m, n), "turbo", steps)
            if normuon:
                v.mul_(beta2).add_((1 - beta2) * (o * o).mean(dim=1, keepdim=True))
                o_hat = o / (v.sqrt() + 1e-10)
                o = o_hat * o.norm() / (o_hat.norm() + 1e-10)
            scale = math.sqrt(max(1, m / n)) if adjust_lr == "spectral" else 0.2 * math.sqrt(max(m, n))
            p.mul_(1 - lr * wd).sub_(lr * scale * o.reshape(p.shape))
    return params


def _run(opt_params, grads_per_step, **kw):
    opt = TurboMuon(opt_params, **kw)
    for grads in grads_per_step:
        for p, g in zip(opt_params, grads):
            p.grad = g.clone()
        opt.step()
    return opt


@pytest.mark.parametrize("nesterov,wd,adjust_lr,ns_steps,normuon", [
    (True, 0.0, "spectral", 4, False), (False, 0.1, "rms", 4, False), (True, 0.05, "spectral", 6, False),
    (True, 0.0, "spectral", 4, True), (False, 0.1, "rms", 5, True)])
def test_step_equals_handwritten_reference(nesterov, wd, adjust_lr, ns_steps, normuon):
    params = _params()
    grads = [_grads(params, t) for t in range(3)]
    expected = _reference_muon(params, grads, 0.03, 0.9, nesterov, wd, ns_steps, adjust_lr, normuon)
    _run(params, grads, lr=0.03, momentum=0.9, nesterov=nesterov, weight_decay=wd, ns_steps=ns_steps,
         adjust_lr=adjust_lr, normuon=normuon)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-7, atol=1e-9)
    # the test is not vacuous: parameters moved
    assert all(not torch.equal(p.detach(), q) for p, q in zip(params, _params()))


def test_same_shapes_are_one_stacked_call_equal_to_per_parameter(monkeypatch):
    calls = []
    real = muon_mod.orthogonalize

    def counting(X, *args, **kw):
        calls.append(tuple(X.shape))
        return real(X, *args, **kw)

    monkeypatch.setattr(muon_mod, "orthogonalize", counting)
    params = _params([(8, 27), (8, 3, 3, 3), (8, 27), (5, 7)], seed=3)
    grads = [_grads(params, t) for t in range(2)]
    _run(params, grads, lr=0.02, normuon=True)
    assert sorted(calls) == sorted([(3, 8, 27), (1, 5, 7)] * 2)
    singles = _params([(8, 27), (8, 3, 3, 3), (8, 27), (5, 7)], seed=3)
    for i, p in enumerate(singles):
        _run([p], [[g[i]] for g in grads], lr=0.02, normuon=True)
    for p, q in zip(params, singles):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-12)


def test_normuon_rows_equalized_and_frobenius_norm_kept():
    """After one step v = (1-beta2) * rowmean(O^2), so every row of O / sqrt(v) has norm sqrt(n/(1-beta2)):
    NorMuon's update has equal row norms and the Frobenius norm of the plain Muon update."""
    p0 = torch.randn(12, 40, dtype=torch.float64)
    g = torch.randn(12, 40, dtype=torch.float64) * torch.logspace(-2, 1, 12, dtype=torch.float64)[:, None]
    plain, nor = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    _run([plain], [[g]], lr=1.0, momentum=0.0, nesterov=False)
    _run([nor], [[g]], lr=1.0, momentum=0.0, nesterov=False, normuon=True, beta2=0.9)
    d_plain, d_nor = (p0 - plain.detach()), (p0 - nor.detach())
    rows = d_nor.norm(dim=1)
    torch.testing.assert_close(rows, rows.mean().expand(12), rtol=1e-5, atol=0)
    assert d_plain.norm(dim=1).std() / d_plain.norm(dim=1).mean() > 1e-3  # plain rows differ: not vacuous
    torch.testing.assert_close(d_nor.norm(), d_plain.norm(), rtol=1e-5, atol=0)


def test_zero_and_missing_gradients():
    a, b = nn.Parameter(torch.randn(6, 9)), nn.Parameter(torch.randn(6, 9))
    a0, b0 = a.detach().clone(), b.detach().clone()
    a.grad = torch.zeros(6, 9)
    TurboMuon([a, b], lr=0.1, normuon=True).step()
    assert torch.equal(a.detach(), a0) and torch.equal(b.detach(), b0)


def test_state_dict_roundtrip_continues_identically():
    params = _params([(6, 10), (6, 10)], seed=5)
    grads = [_grads(params, t) for t in range(4)]
    full = _run(params, grads, lr=0.02, normuon=True)
    other = _params([(6, 10), (6, 10)], seed=5)
    first = _run(other, grads[:2], lr=0.02, normuon=True)
    resumed = TurboMuon(other, lr=0.02, normuon=True)
    resumed.load_state_dict(first.state_dict())
    for gs in grads[2:]:
        for p, g in zip(other, gs):
            p.grad = g.clone()
        resumed.step()
    for p, q in zip(params, other):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
    assert set(full.state[params[0]]) == {"momentum_buffer", "second_moment"}


def test_trains_a_small_regression():
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = torch.tanh(x @ torch.randn(16, 4))
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    hidden, rest = split_params(model)
    opts = [TurboMuon(hidden, lr=0.02), torch.optim.AdamW(rest, lr=3e-3)]
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(model(x), y)
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]


@pytest.mark.parametrize("kw,match", [
    (dict(lr=-0.1), "lr"), (dict(lr=0.1, momentum=1.0), "momentum"), (dict(lr=0.1, momentum=-0.1), "momentum"),
    (dict(lr=0.1, adjust_lr="adam"), "adjust_lr"), (dict(lr=0.1, ns_steps=0), "ns_steps"),
    (dict(lr=0.1, ns_steps=2.0), "ns_steps"), (dict(lr=0.1, weight_decay=-1), "weight_decay"),
    (dict(lr=0.1, beta2=1.0), "beta2")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        TurboMuon([nn.Parameter(torch.randn(3, 3))], **kw)


def test_rejects_vectors():
    with pytest.raises(ValueError, match="split_params"):
        TurboMuon([nn.Parameter(torch.randn(3))], lr=0.1)


def test_split_params_plain_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.conv = nn.Conv2d(8, 8, 3)
            self.body = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 16))
            self.head = nn.Linear(16, 5)
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

    net = Net()
    muon, adamw = split_params(net)
    assert [id(p) for p in muon] == [id(net.conv.weight), id(net.body[0].weight), id(net.body[2].weight)]
    expected_adamw = {id(net.embed.weight), id(net.conv.bias), id(net.body[0].bias), id(net.body[1].weight),
                      id(net.body[1].bias), id(net.body[2].bias), id(net.head.weight), id(net.head.bias)}
    assert {id(p) for p in adamw} == expected_adamw and len(adamw) == len(expected_adamw)
    muon, adamw = split_params(net, head=None)
    assert id(net.head.weight) in {id(p) for p in muon}
    muon, adamw = split_params(net, head=net.body[2])
    assert id(net.body[2].weight) in {id(p) for p in adamw} and id(net.head.weight) in {id(p) for p in muon}
    with pytest.raises(ValueError, match="head"):
        split_params(net, head="first")


def test_split_params_lipnet_model_trains_raw_parametrized_weights():
    model = nn.Sequential(ln.OrthoConv2d(3, 8, 3, padding="same", padding_mode="zeros"), ln.MaxMin(),
                          ln.AOLConv2d(8, 8, 3, padding=1), ln.Flatten(), ln.OrthoLinear(8 * 8 * 8, 32),
                          ln.MaxMin(), ln.OrthoLinear(32, 10))
    muon, adamw = split_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(n.endswith("original") for n in map(names.get, map(id, muon))) and len(muon) == 3
    assert {names[id(p)] for p in adamw} >= {"6.parametrizations.weight.original", "6.bias"}
    opt = TurboMuon(muon, lr=0.05)
    before = [p.detach().clone() for p in muon]
    model(torch.rand(4, 3, 8, 8)).square().sum().backward()
    opt.step()
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, muon))


# --------------------------------------------------------------------------- CombinedOptimizer
def _pair(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    matrices, rest = split_params(model)
    return model, matrices, rest


def _one_cycle(optimizer, peaks):
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=12, cycle_momentum=False)


def _train_steps(model, optimizer, scheduler, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        optimizer.zero_grad(set_to_none=True)
        (model(x) - y).square().mean().backward()
        optimizer.step()
        scheduler.step()


def test_combined_optimizer_is_its_parts_with_one_scheduler():
    """One OneCycleLR over the combination (one peak per group) moves the weights exactly as two
    separately scheduled optimizers do."""
    from lipnet.optim import CombinedOptimizer

    model_a, mat_a, rest_a = _pair()
    muon_a, adam_a = TurboMuon(mat_a, lr=0.05), torch.optim.Adam(rest_a, lr=0.01)
    combined = CombinedOptimizer([muon_a, adam_a])
    assert [id(g) for g in combined.param_groups] == [id(g) for o in (muon_a, adam_a) for g in o.param_groups]
    _train_steps(model_a, combined, _one_cycle(combined, [0.05, 0.01]), 6)

    model_b, mat_b, rest_b = _pair()
    muon_b, adam_b = TurboMuon(mat_b, lr=0.05), torch.optim.Adam(rest_b, lr=0.01)
    s1, s2 = _one_cycle(muon_b, 0.05), _one_cycle(adam_b, 0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        muon_b.zero_grad(), adam_b.zero_grad()
        (model_b(x) - y).square().mean().backward()
        muon_b.step(), adam_b.step(), s1.step(), s2.step()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert muon_a.param_groups[0]["lr"] == muon_b.param_groups[0]["lr"] != adam_a.param_groups[0]["lr"]


def test_combined_optimizer_state_dict_resumes_exactly():
    from lipnet.optim import CombinedOptimizer

    model, mat, rest = _pair()
    combined = CombinedOptimizer([TurboMuon(mat, lr=0.05), torch.optim.Adam(rest, lr=0.01)])
    scheduler = _one_cycle(combined, [0.05, 0.01])
    _train_steps(model, combined, scheduler, 5)
    # optimizer state dicts reference the live state tensors
    saved = copy.deepcopy([model.state_dict(), combined.state_dict(), scheduler.state_dict()])
    _train_steps(model, combined, scheduler, 4, seed=2)

    fresh, mat2, rest2 = _pair(seed=7)
    fresh.load_state_dict(saved[0])
    resumed = CombinedOptimizer([TurboMuon(mat2, lr=0.05), torch.optim.Adam(rest2, lr=0.01)])
    sched2 = _one_cycle(resumed, [0.05, 0.01])  # built first, as fit does: building one resets the lr
    resumed.load_state_dict(saved[1])
    # the groups are the owners' new ones: the scheduler's steps reach the optimizers that step
    assert [id(g) for g in resumed.param_groups] == [id(g) for o in resumed.optimizers for g in o.param_groups]
    sched2.load_state_dict(saved[2])
    _train_steps(fresh, resumed, sched2, 4, seed=2)
    for a, b in zip(model.parameters(), fresh.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_combined_optimizer_refuses_shared_parameters_and_foreign_states():
    from lipnet.optim import CombinedOptimizer

    _, mat, rest = _pair()
    with pytest.raises(ValueError, match="must be disjoint"):
        CombinedOptimizer([TurboMuon(mat, lr=0.1), torch.optim.Adam(mat + rest)])
    with pytest.raises(ValueError, match="at least one"):
        CombinedOptimizer([])
    with pytest.raises(TypeError, match="Optimizer instances"):
        CombinedOptimizer([mat[0]])
    combined = CombinedOptimizer([TurboMuon(mat, lr=0.1), torch.optim.Adam(rest)])
    with pytest.raises(ValueError, match="not one of a CombinedOptimizer"):
        combined.load_state_dict(torch.optim.Adam(rest).state_dict())
    with pytest.raises(ValueError, match="not one of a CombinedOptimizer"):
        combined.load_state_dict(CombinedOptimizer([torch.optim.Adam(mat), torch.optim.Adam(rest)]).state_dict())
