"""The orthogonal layers' two parametrizations: a stored factor retracted after every change
("retraction", default) and the polar factor of a raw parameter ("polar"). Orthogonal at
initialization and after training, on the configurations where a fixed schedule did not converge;
bounds from the weights actually in use, also when a factor has drifted."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

import lipnet.nn as ln

PARAMETRIZATIONS = ["retraction", "polar"]


def conv_singular_values(conv: ln.OrthoConv2d, size: int = 8) -> torch.Tensor:
    """All singular values of the (bias-free, linear) convolution operator on size x size inputs:
    its matrix is its response to the basis images, one batched forward."""
    conv = conv.double().eval()
    n = conv.in_channels * size * size
    with torch.no_grad():
        columns = conv(torch.eye(n, dtype=torch.float64).view(n, conv.in_channels, size, size)).reshape(n, -1)
    return torch.linalg.svdvals(columns)


def train_steps(module: nn.Module, shape, steps: int = 5, lr: float = 1e-2) -> None:
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    for _ in range(steps):
        loss = module(torch.randn(shape, generator=g)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


# kernel 3 / stride 2 / 32 outputs with 2 or 4 inputs: a fixed 7-step schedule left sigma_min at 0.947
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("cin,seed", [(2, 0), (4, 0), (2, 3), (4, 7)])
def test_strided_aoc_is_orthogonal_at_init_and_after_training(parametrization, cin, seed):
    torch.manual_seed(seed)
    conv = ln.OrthoConv2d(cin, 32, 3, stride=2, padding=1, bias=False, parametrization=parametrization)
    sv = conv_singular_values(conv)
    assert (sv - 1).abs().max() <= 1e-3, (sv.min(), sv.max())
    conv = conv.float().train()
    train_steps(conv, (4, cin, 8, 8))
    sv = conv_singular_values(conv)
    assert (sv - 1).abs().max() <= 1e-3, (sv.min(), sv.max())


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_svd_layers_train(parametrization):
    """The SVD's own backward is undefined at equal singular values (an orthogonal init)."""
    for layer, shape in [(ln.OrthoLinear(16, 16, method="svd", parametrization=parametrization), (3, 16)),
                         (ln.OrthoConv2d(8, 8, 1, method="svd", parametrization=parametrization), (2, 8, 4, 4))]:
        layer(torch.randn(shape)).square().sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
        train_steps(layer, shape, steps=2)
        assert torch.isfinite(layer(torch.randn(shape))).all()
        assert ln.lipschitz_bound(layer.eval()) <= 1 + 1e-4


def test_retraction_follows_every_optimizer_step():
    torch.manual_seed(0)
    lin = ln.OrthoLinear(64, 32)
    factor = lin.parametrizations.weight.original
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    x = torch.randn(5, 64)
    for _ in range(3):
        lin(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        drifted = factor.detach().clone()
        assert (torch.linalg.svdvals(drifted) - 1).abs().max() > 1e-3  # the step left the manifold
        out = lin(x)
        assert torch.allclose(out, F.linear(x, factor.detach(), lin.bias.detach()))  # computes with the factor
        assert (torch.linalg.svdvals(factor.detach().double()) - 1).abs().max() <= 1e-5
        U, _, Vh = torch.linalg.svd(drifted.double(), full_matrices=False)
        assert torch.allclose(factor.detach().double(), U @ Vh, atol=1e-5)  # the nearest orthogonal matrix


def test_bound_and_forward_read_the_same_weights_in_eval():
    torch.manual_seed(0)
    model = nn.Sequential(ln.OrthoConv2d(4, 8, 3, stride=2, padding=1), ln.MaxMin(), ln.Flatten(), ln.OrthoLinear(8 * 4 * 4, 10))
    train_steps(model, (3, 4, 8, 8), steps=1)  # factors changed, not yet retracted
    model.eval()
    bound = ln.lipschitz_bound(model)  # retracts, then bounds
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(2, 4, 8, 8)
    model(x)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the forward changed nothing
    assert bound <= 1 + 1e-4
    exported = ln.export(model)
    assert torch.allclose(exported(x), model(x), atol=1e-6)


def test_a_drifted_factor_reports_its_actual_bound():
    """A write that bypasses the version counter is not retracted: the weight in use is the drifted
    factor and lipschitz_bound must say so (> 1), never 1; retract_ repairs it."""
    torch.manual_seed(0)
    lin = ln.OrthoLinear(8, 8, bias=False)
    factor = lin.parametrizations.weight.original
    factor.data.mul_(1.5)  # .data: no version bump
    lin.eval()
    bound = ln.lipschitz_bound(lin)
    assert bound >= 1.5 - 1e-6
    x = torch.randn(4, 8)
    assert torch.allclose(lin(x).norm(dim=1), 1.5 * x.norm(dim=1), rtol=1e-5)  # the forward really is 1.5x
    ln.retract_(lin)
    assert ln.lipschitz_bound(lin) <= 1 + 1e-5


def test_state_dict_round_trip_and_functional_calls():
    torch.manual_seed(0)
    src = ln.OrthoConv2d(4, 8, 3, stride=2, padding=1)
    train_steps(src, (2, 4, 8, 8), steps=2)
    x = torch.randn(2, 4, 8, 8)
    src.eval()
    expected = src(x)
    dst = ln.OrthoConv2d(4, 8, 3, stride=2, padding=1).eval()
    dst.load_state_dict(src.state_dict())
    assert torch.allclose(dst(x), expected, atol=1e-5)
    # torch.func: the given tensors are used as they are, the module's own factors are not touched
    params = {k: v.detach() * 1.0 for k, v in dst.named_parameters()}
    before = {k: v.detach().clone() for k, v in dst.named_parameters()}
    functional_call(dst, params, (x,))
    assert all(torch.equal(before[k], v) for k, v in dst.named_parameters())


def test_bad_parametrization_and_steps_are_refused():
    with pytest.raises(ValueError, match="parametrization"):
        ln.OrthoLinear(4, 4, parametrization="cayley")
    with pytest.raises(ValueError, match="steps applies to parametrization='polar'"):
        ln.OrthoConv2d(4, 4, 3, steps=3)
    assert ln.lipschitz_bound(ln.OrthoLinear(6, 4, parametrization="polar", steps=9).eval()) <= 1 + 1e-4


def test_orthogonal_and_aol_constrain_plain_torch_layers():
    """lipnet.nn.orthogonal / aol in torch.nn.utils.parametrizations' style: the plain layer keeps
    its class and shapes, computes with a constrained weight, is bounded soundly and exports exactly."""
    torch.manual_seed(0)
    lin = ln.orthogonal(nn.Linear(12, 5))
    w = lin.weight.detach()
    torch.testing.assert_close(w @ w.T, torch.eye(5), atol=1e-5, rtol=0)
    assert ln.lipschitz_bound(lin) <= 1 + 1e-5 and "parametrizations.weight.original" in lin.state_dict()
    opt = torch.optim.Adam(lin.parameters(), lr=0.05)
    for _ in range(3):  # it stays orthogonal through training steps
        opt.zero_grad()
        lin(torch.randn(8, 12)).square().sum().backward()
        opt.step()
    w = lin.weight.detach()
    torch.testing.assert_close(w @ w.T, torch.eye(5), atol=1e-5, rtol=0)
    assert isinstance(lin, nn.Linear)

    dense = ln.aol(nn.Linear(6, 9))
    conv = ln.aol(nn.Conv2d(3, 4, 3, padding=1, stride=2))
    with torch.no_grad():
        dense.parametrizations.weight.original.normal_()
        conv.parametrizations.weight.original.normal_()
    assert ln.lipschitz_bound(dense) <= 1 + 1e-6 and ln.lipschitz_bound(conv) <= 1 + 1e-6
    model = nn.Sequential(conv, nn.Flatten(), ln.orthogonal(nn.Linear(64, 6)), ln.MaxMin(), dense).eval()
    x = torch.randn(2, 3, 8, 8)
    plain = ln.export(model)
    torch.testing.assert_close(plain(x), model(x))
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())


def test_orthogonal_refuses_convolutions_and_other_modules():
    with pytest.raises(ValueError, match="not an orthogonal convolution"):
        ln.orthogonal(nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="nn.Linear"):
        ln.orthogonal(nn.ReLU())
    with pytest.raises(ValueError, match="optimizer schedule"):
        ln.orthogonal(nn.Linear(4, 4), method="turbo")
    with pytest.raises(ValueError, match="padding_mode"):
        ln.aol(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="nn.Linear or nn.Conv2d"):
        ln.aol(nn.Conv1d(2, 2, 3))
