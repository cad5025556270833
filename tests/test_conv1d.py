"""OrthoConv1d (1-D BCOP) and the nn.Conv1d bound rule: attacked bounds, orthogonality, exact
export, refusals."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import lipnet.nn as ln
from attacks import empirical_lipschitz


def attack(module: nn.Module, shape, seed=0) -> float:
    module = module.double().eval().requires_grad_(False)
    ln.set_input_checks(False)
    try:
        with parametrize.cached():
            return empirical_lipschitz(module, shape, seed=seed)
    finally:
        ln.set_input_checks(True)


def operator_singular_values(m: nn.Module, shape) -> torch.Tensor:
    x = torch.randn(shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(m, x).reshape(-1, x.numel())
    return torch.linalg.svdvals(jac)


@st.composite
def conv1d_configs(draw):
    groups = draw(st.sampled_from([1, 1, 2]))
    cin, cout = groups * draw(st.integers(1, 4)), groups * draw(st.integers(1, 4))
    k, s, d = draw(st.integers(1, 5)), draw(st.sampled_from([1, 1, 2, 3])), draw(st.sampled_from([1, 1, 2]))
    mode = draw(st.sampled_from(["circular", "zeros"]))
    padding = draw(st.sampled_from(["same", "valid", 0, 1, 2]))
    return dict(in_channels=cin, out_channels=cout, kernel_size=k, stride=s, dilation=d, groups=groups,
                padding=padding, padding_mode=mode)


def test_ortho_conv1d_bound_survives_attack_and_exports_exactly_or_config_is_refused():
    outcomes = {"built": 0, "refused": 0}

    @settings(max_examples=40, deadline=None)
    @given(cfg=conv1d_configs(), seed=st.integers(0, 1000))
    def check(cfg, seed):
        torch.manual_seed(seed)
        try:
            m = ln.OrthoConv1d(**cfg)
        except ValueError as err:
            assert str(err)
            outcomes["refused"] += 1
            return
        with torch.no_grad():  # random factors (retracted on the next access) and bias
            for p in m.parameters():
                p.normal_()
        m = m.double().eval()
        bound = ln.lipschitz_bound(m)
        assert bound <= 1 + 1e-4, (cfg, bound)
        shape = (1, cfg["in_channels"], 12)
        assert attack(m, shape, seed) <= bound * (1 + 1e-9)
        assert operator_singular_values(m, shape).max() <= bound * (1 + 1e-9)
        plain = ln.export(m)
        assert type(plain) is nn.Conv1d
        x = torch.randn(3, *shape[1:], dtype=torch.float64)
        assert torch.equal(plain(x), m(x))
        assert ln.lipschitz_bound(plain) <= 1 + 1e-4
        outcomes["built"] += 1

    check()
    assert outcomes["built"] >= 20, outcomes


@pytest.mark.parametrize("cin,cout,k,d", [(4, 4, 3, 1), (4, 8, 4, 1), (6, 6, 5, 2), (2, 2, 2, 1)])
def test_ortho_conv1d_is_orthogonal_on_circular_signals(cin, cout, k, d):
    torch.manual_seed(0)
    m = ln.OrthoConv1d(cin, cout, k, dilation=d, bias=False).double()
    sv = operator_singular_values(m, (1, cin, 12))
    assert torch.allclose(sv, torch.ones_like(sv), atol=1e-6), sv  # every singular value 1 (out >= in)


def test_row_orthogonal_when_out_is_smaller():
    torch.manual_seed(0)
    m = ln.OrthoConv1d(6, 2, 3, bias=False).double()
    sv = operator_singular_values(m, (1, 6, 10))
    assert sv.numel() == 20 and torch.allclose(sv, torch.ones_like(sv), atol=1e-6)


def test_ortho_conv1d_trains_and_stays_orthogonal():
    torch.manual_seed(0)
    model = nn.Sequential(ln.OrthoConv1d(2, 8, 3), ln.MaxMin(), ln.OrthoConv1d(8, 8, 3, stride=2), ln.Flatten(),
                          ln.OrthoLinear(8 * 8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 2, 16), torch.randint(0, 3, (16,))
    losses = []
    for _ in range(5):
        loss = ln.LipschitzCrossEntropy()(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert ln.lipschitz_bound(model) <= 1 + 1e-4
    report = ln.lipschitz_report(model, x[:2]).as_dict()
    # the empirical lower bound is measured in fp32: equal to the bound up to its rounding
    assert report["0"]["type"] == "OrthoConv1d" and report["0"]["lower"] <= report["0"]["bound"] * (1 + 1e-5)


def test_plain_conv1d_rule_is_sound_for_strided_zero_padding():
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 5, 4, stride=2, padding=2, dilation=2).double()
    bound = ln.lipschitz_bound(conv)
    assert operator_singular_values(conv, (1, 3, 16)).max() <= bound * (1 + 1e-9)
    assert attack(conv, (1, 3, 16)) <= bound * (1 + 1e-9)
    with pytest.raises(TypeError, match="repeats pixels"):
        ln.lipschitz_bound(nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(in_channels=1, out_channels=1, kernel_size=3), "shift"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, padding=2), "wrapped samples"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, padding_mode="reflect"), "padding_mode"),
    (dict(in_channels=4, out_channels=4, kernel_size=2, stride=2), "unevenly"),
    (dict(in_channels=3, out_channels=4, kernel_size=3, groups=2), "divisible"),
    (dict(in_channels=4, out_channels=4, kernel_size=0), "positive int"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, padding=-1), "padding"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, method="turbo"), "optimizer schedule"),
])
def test_ortho_conv1d_refuses_impossible_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ln.OrthoConv1d(**kwargs)


def test_ortho_conv1d_input_errors_and_privacy_refusal():
    m = ln.OrthoConv1d(4, 4, 3)
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="length"):
        m(torch.randn(2, 4, 0))
    from lipnet.privacy import gradient_norm_bounds
    with pytest.raises(TypeError, match="OrthoConv1d"):
        gradient_norm_bounds(nn.Sequential(m, ln.Flatten()), 1.0, ln.LipschitzCrossEntropy(), (4, 8))
