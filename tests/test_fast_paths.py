"""The eager fast paths of the activation-side layers against their composite definitions.

MaxMin (one output written in place of two ``where``s and a ``cat``), BatchCentering (its own
projection backward) and ConvexResidual (``lerp``) must compute the same function, gradient, second
derivative and forward-mode derivative as the plain formulas, in fp32, under bf16 autocast and in
channels-last memory format; training on channels-last batches must match contiguous ones."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

import lipnet.nn as ln
from lipnet.training import train_epoch


def _maxmin_reference(x: torch.Tensor, dim: int) -> torch.Tensor:
    a, b = x.split(x.shape[dim] // 2, dim=dim)
    return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=dim)


def _centering_reference(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    dims = [0] + list(range(2, x.dim()))
    out = x - x.mean(dim=dims, keepdim=True)
    return out if bias is None else out + bias.view([1, -1] + [1] * (x.dim() - 2))


def _forward_derivative(f, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with fwAD.dual_level():
        return fwAD.unpack_dual(f(fwAD.make_dual(x, t))).tangent


@pytest.mark.parametrize("dim,shape", [(1, (4, 8, 5, 5)), (-1, (3, 6)), (2, (2, 3, 4))])
def test_maxmin_matches_its_formula_in_value_and_every_derivative(dim, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    g, t = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    m = ln.MaxMin(dim)
    assert torch.equal(m(x), _maxmin_reference(x, dim))
    (grad,) = torch.autograd.grad(m(x), x, g)
    (ref,) = torch.autograd.grad(_maxmin_reference(x, dim), x, g)
    assert torch.equal(grad, ref)
    assert torch.equal(_forward_derivative(m, x.detach(), t), _forward_derivative(lambda z: _maxmin_reference(z, dim),
                                                                                 x.detach(), t))
    assert torch.autograd.gradgradcheck(m, (x,))


def test_maxmin_gradient_at_ties_is_a_permutation_of_the_output_gradient():
    x = torch.tensor([[1.0, 2.0, 1.0, -1.0]], requires_grad=True)  # pairs (1, 1) tie, (2, -1) do not
    g = torch.tensor([[3.0, 5.0, 7.0, 11.0]])
    (grad,) = torch.autograd.grad(ln.MaxMin(dim=1)(x), x, g)
    assert sorted(grad.flatten().tolist()) == sorted(g.flatten().tolist())
    assert grad.norm() == pytest.approx(g.norm().item())


def test_maxmin_keeps_channels_last_and_its_values():
    x = torch.randn(2, 6, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    out = ln.MaxMin()(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, _maxmin_reference(x.contiguous(), 1))
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, g)
    xc = x.detach().contiguous().requires_grad_(True)
    (ref,) = torch.autograd.grad(_maxmin_reference(xc, 1), xc, g)
    assert torch.equal(grad, ref)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 4, 3, 3), (6, 4)])
def test_batch_centering_training_map_matches_its_formula(bias, shape):
    torch.manual_seed(0)
    bc = ln.BatchCentering(4, momentum=0.25, bias=bias).double().train()
    if bias:
        with torch.no_grad():
            bc.bias.normal_()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True) + 3.0
    out = bc(x)
    ref = _centering_reference(x, bc.bias)
    torch.testing.assert_close(out, ref)
    dims = [0] + list(range(2, x.dim()))
    torch.testing.assert_close(bc.running_mean, 0.25 * x.detach().mean(dim=dims))
    g = torch.randn(shape, dtype=torch.float64)
    params = [x] + ([bc.bias] if bias else [])
    grads = torch.autograd.grad(out, params, g)
    refs = torch.autograd.grad(ref, params, g)
    for a, b in zip(grads, refs):
        torch.testing.assert_close(a, b)
    t = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(_forward_derivative(bc, x.detach(), t),
                               _forward_derivative(lambda z: _centering_reference(z, None), x.detach(), t))
    assert torch.autograd.gradgradcheck(lambda z: bc(z), (x,))


def test_batch_centering_under_autocast_keeps_the_composite_dtypes():
    """bf16 activations, an fp32 bias: the output is fp32 (as x - mean + bias promotes) and the input
    gradient comes back in the input's bf16."""
    bc = ln.BatchCentering(4).train()
    x = torch.randn(3, 4, 2, 2).bfloat16().requires_grad_(True)
    out = bc(x)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and bc.bias.grad.dtype == torch.float32
    bc.eval()
    assert bc(x).dtype == torch.float32
    assert ln.BatchCentering(4, bias=False).train()(x).dtype == torch.bfloat16


@pytest.mark.parametrize("learnable", [False, True])
def test_convex_residual_matches_its_formula_with_gradients(learnable):
    torch.manual_seed(0)
    f = nn.Sequential(ln.OrthoLinear(6, 6), ln.MaxMin())
    m = ln.ConvexResidual(f, alpha=0.3, learnable=learnable).double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    a = m.alpha()
    torch.testing.assert_close(m(x), (1 - a) * x + a * f(x))
    params = [x] + ([m.alpha_raw] if learnable else [])
    grads = torch.autograd.grad(m(x).square().sum(), params)
    refs = torch.autograd.grad(((1 - m.alpha()) * x + m.alpha() * f(x)).square().sum(), params)
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r)
    m, x = m.float(), x.detach().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # f(x) in bf16, x in fp32: the sum promotes
        assert m(x).dtype == ((1 - m.alpha()) * x + m.alpha() * f(x)).dtype == torch.float32


def test_training_on_channels_last_batches_matches_contiguous_batches():
    def run(channels_last: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(ln.OrthoConv2d(3, 8, 3), ln.BatchCentering(8), ln.MaxMin(),
                              ln.ConvexResidual(nn.Sequential(ln.OrthoConv2d(8, 8, 3), ln.MaxMin())),
                              ln.OrthoConv2d(8, 16, 2, stride=2, padding=0), ln.MaxMin(), ln.Flatten(),
                              ln.OrthoLinear(16 * 4 * 4, 10))
        data = [(torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(i)), torch.arange(16) % 10)
                for i in range(3)]
        formats = []
        model[0].register_forward_pre_hook(
            lambda _, args: formats.append(args[0].is_contiguous(memory_format=torch.channels_last)))
        optimizer = torch.optim.Adam(model.parameters(), 1e-2)
        train_epoch(model, data, optimizer, ln.LipschitzCrossEntropy(offset=0.3, temperature=0.125), progress=False,
                    channels_last=channels_last)
        assert formats == [channels_last] * len(data)
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
