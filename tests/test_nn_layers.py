"""Every lipnet.nn layer against an adversary: empirical Lipschitz constants (Jacobian power
iteration + pair ascent) must never exceed ``lipschitz_bound``; impossible configs raise ValueError."""

import contextlib
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import lipnet.nn as ln
from attacks import empirical_lipschitz
from strategies import conv_geometry, strided_padding


@contextlib.contextmanager
def no_input_checks():
    ln.set_input_checks(False)  # torch.func transforms cannot branch on tensor values
    try:
        yield
    finally:
        ln.set_input_checks(True)


def attack(module: nn.Module, shape, seed=0) -> float:
    module = module.double().eval().requires_grad_(False)  # gradients w.r.t. inputs only
    with no_input_checks(), parametrize.cached():  # weights are fixed during the attack
        return empirical_lipschitz(module, shape, seed=seed)


def assert_bound_holds(module: nn.Module, shape, seed=0) -> tuple[float, float]:
    module = module.double().eval()
    bound = ln.lipschitz_bound(module)
    low = attack(module, shape, seed)
    assert low <= bound * (1 + 1e-9), f"{module}: empirical {low} > bound {bound}"
    return low, bound


@st.composite
def ortho_conv_configs(draw):
    groups, cin, cout, k, s, d = draw(conv_geometry(max_per_group=4, dilations=st.sampled_from([1, 1, 2])))
    transposed = draw(st.booleans())
    padding = "same" if s == 1 and not transposed else strided_padding(k, s, d)
    return dict(in_channels=cin, out_channels=cout, kernel_size=k, stride=s, dilation=d, groups=groups,
                transposed=transposed, padding=padding, padding_mode=None if transposed else draw(st.sampled_from(["circular", "zeros"])))


def test_ortho_conv_bound_survives_attack_or_config_is_refused():
    outcomes = {"built": 0, "refused": 0}

    @settings(max_examples=40, deadline=None)
    @given(cfg=ortho_conv_configs(), seed=st.integers(0, 1000))
    def check(cfg, seed):
        torch.manual_seed(seed)
        try:
            m = ln.OrthoConv2d(**cfg)
            m(torch.randn(1, cfg["in_channels"], 8, 8))  # circular shape checks happen here
        except ValueError as err:
            assert str(err)  # refused with a message, never another exception type
            outcomes["refused"] += 1
            return
        with torch.no_grad():  # random raw weights, not just the orthogonal init
            for p in m.parameters():
                p.normal_()
        low, bound = assert_bound_holds(m, (1, cfg["in_channels"], 8, 8), seed)
        assert bound <= 1 + 1e-3, f"orthogonal conv bound {bound} for {cfg}"
        outcomes["built"] += 1

    check()
    # the property is about built layers: a strategy whose draws were all refused would test nothing
    assert outcomes["built"] >= 20, outcomes


@pytest.mark.parametrize("cin,cout,k,s,pad", [(4, 4, 3, 1, "same"), (6, 6, 5, 1, "same"), (4, 16, 2, 2, 0), (8, 8, 1, 1, 0)])
def test_ortho_conv_preserves_norms(cin, cout, k, s, pad):
    torch.manual_seed(0)
    m = ln.OrthoConv2d(cin, cout, k, stride=s, padding=pad, bias=False)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    x = torch.randn(3, cin, 8, 8)
    ratio = m(x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    assert torch.allclose(ratio, torch.ones(3), atol=1e-3), ratio


@pytest.mark.parametrize("method,parametrization", [("convergent", "retraction"), ("convergent", "polar"),
                                                    ("bjorck", "polar"), ("svd", "polar"), ("svd", "retraction")])
def test_ortho_linear(method, parametrization):
    torch.manual_seed(1)
    for fin, fout in [(7, 7), (5, 11), (12, 3)]:
        m = ln.OrthoLinear(fin, fout, method=method, parametrization=parametrization)
        with torch.no_grad():
            m.parametrizations.weight.original.normal_()
        low, bound = assert_bound_holds(m, (2, fin))
        assert bound <= 1 + 1e-3
        w = m.weight.detach()
        small = w @ w.mT if fout <= fin else w.mT @ w
        assert torch.allclose(small, torch.eye(min(fin, fout), dtype=w.dtype), atol=1e-3)


@pytest.mark.parametrize("method", ["turbo", "ns5"])
def test_optimizer_schedules_are_refused_for_layers(method):
    # turbo's band [0.78, 1.22] is no orthogonal weight: an AOC conv with groups=2 had sigma_max 17 on it
    with pytest.raises(ValueError, match="optimizer schedule"):
        ln.OrthoLinear(4, 4, method=method)
    with pytest.raises(ValueError, match="optimizer schedule"):
        ln.OrthoConv2d(8, 8, 3, groups=2, method=method)


def test_ortho_linear_square_preserves_norms():
    m = ln.OrthoLinear(16, 16, bias=False)
    x = torch.randn(5, 16)
    assert torch.allclose(m(x).norm(dim=1), x.norm(dim=1), rtol=1e-3)


@settings(max_examples=20, deadline=None)
@given(fin=st.integers(1, 12), fout=st.integers(1, 12), scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 1000))
@example(fin=4, fout=2, scale=1e-3, seed=1000)  # two nearly equal top singular values: bound 1.00046
def test_aol_linear(fin, fout, scale, seed):
    torch.manual_seed(seed)
    m = ln.AOLLinear(fin, fout)
    with torch.no_grad():
        m.parametrizations.weight.original.normal_().mul_(scale)
    low, bound = assert_bound_holds(m, (2, fin), seed)
    assert torch.linalg.matrix_norm(m.weight.detach().double(), 2) <= 1 + 1e-6  # AOL's theorem
    # the certified bound may exceed 1 only by the Gram iteration's own slack: 6 squarings bound
    # sigma^2 by ||G^64||_F^(1/64) <= k^(1/128) sigma^2 (k = the short side), i.e. sigma by k^(1/256)
    assert bound <= (1 + 1e-5) * min(fin, fout) ** (1 / 256)


@settings(max_examples=20, deadline=None)
@given(groups=st.sampled_from([1, 2]), cin=st.integers(1, 3), cout=st.integers(1, 3), k=st.integers(1, 4),
       s=st.integers(1, 2), d=st.integers(1, 2), mode=st.sampled_from(["zeros", "circular"]), seed=st.integers(0, 1000))
# Found by a local (random) run: the AOL scales were computed on a wrongly dilated Gram kernel, and
# this dilated layer was 1.134-Lipschitz (FFT of the kernel).
@example(groups=1, cin=1, cout=1, k=3, s=1, d=2, mode="zeros", seed=72)
# Found by the 10x-examples hunt: a grouped 1x1 AOL kernel got only the Gram-iteration bound (1.0014,
# loose where AOL makes singular values equal), not AOL's own Schur certificate.
@example(groups=2, cin=2, cout=2, k=1, s=1, d=1, mode="zeros", seed=1)
def test_aol_conv(groups, cin, cout, k, s, d, mode, seed):
    torch.manual_seed(seed)
    padding = "same" if s == 1 else strided_padding(k, s, d)
    m = ln.AOLConv2d(groups * cin, groups * cout, k, stride=s, padding=padding, dilation=d, groups=groups, padding_mode=mode)
    with torch.no_grad():
        m.parametrizations.weight.original.normal_()
    low, bound = assert_bound_holds(m, (1, groups * cin, 8, 8), seed)
    assert bound <= 1 + 1e-5


@settings(max_examples=15, deadline=None)
@given(features=st.integers(1, 8), inner=st.integers(1, 8), k=st.sampled_from([None, 1, 3]), seed=st.integers(0, 1000))
def test_sll_block(features, inner, k, seed):
    torch.manual_seed(seed)
    m = ln.SLLBlock(features, inner, kernel_size=k)
    with torch.no_grad():
        m.weight.normal_()
        m.q.normal_()
        m.bias.normal_()
    shape = (2, features) if k is None else (1, features, 6, 6)
    assert_bound_holds(m, shape, seed)


@settings(max_examples=15, deadline=None)
@given(features=st.integers(1, 8), inner=st.integers(1, 8), k=st.sampled_from([None, 1, 3]), seed=st.integers(0, 1000),
       scale=st.sampled_from([0.1, 1.0, 10.0]))
def test_convex_potential_layer(features, inner, k, seed, scale):
    torch.manual_seed(seed)
    m = ln.ConvexPotentialLayer(features, inner, kernel_size=k)
    with torch.no_grad():
        m.weight.normal_().mul_(scale)
        m.bias.normal_()
    shape = (2, features) if k is None else (1, features, 6, 6)
    low, bound = assert_bound_holds(m, shape, seed)
    assert bound <= 1 + 1e-5


def test_convex_potential_layer_with_an_overestimated_norm_would_still_hold_and_exports_exactly():
    """The step 2/h^2 uses an upper bound h: a smaller step than 2/||W||^2 is still non-expansive;
    a step above 2/||W||^2 is not -- the attack finds that (the theorem's condition matters)."""
    torch.manual_seed(0)
    m = ln.ConvexPotentialLayer(6, 6).double()
    with torch.no_grad():
        m.weight.copy_(torch.diag(torch.tensor([3.0, 1, 1, 1, 1, 1], dtype=torch.float64)))
        m.bias.fill_(1.0)
    x = torch.randn(4, 6, dtype=torch.float64)
    exact = float(torch.linalg.matrix_norm(m.weight.detach(), 2))
    assert m.norm_bound() >= exact
    # the same map with twice the allowed step: x - (4/||W||^2) W^T relu(W x + b) expands along e_0
    big = lambda v: v - (4 / exact**2) * torch.relu(v @ m.weight.T + m.bias) @ m.weight  # noqa: E731
    e0 = torch.zeros(1, 6, dtype=torch.float64)
    e0[0, 0] = 1.0
    assert (big(e0 * 2) - big(e0)).norm() > 1.5 * e0.norm()
    assert (m(e0 * 2) - m(e0)).norm() <= e0.norm() * (1 + 1e-9)
    for layer, shape in ((m, (4, 6)), (ln.ConvexPotentialLayer(3, 5, kernel_size=3).double(), (2, 3, 6, 6))):
        x = torch.randn(*shape, dtype=torch.float64)
        torch.testing.assert_close(ln.export(layer)(x), layer(x))


@pytest.mark.parametrize("module,shape", [
    (ln.MaxMin(), (2, 6, 3, 3)), (ln.Abs(), (2, 5)), (ln.L2NormPool2d(2), (1, 3, 6, 6)),
    (ln.L2NormPool2d(3, stride=1), (1, 2, 6, 6)), (ln.ScaledAvgPool2d(2), (1, 3, 6, 6)),
    (ln.ScaledAvgPool2d(3, stride=2), (1, 2, 7, 7)), (ln.GlobalL2NormPool2d(), (2, 3, 4, 4)),
    (ln.FirstChannels(2), (2, 5)), (ln.Flatten(), (2, 3, 2, 2)), (ln.LayerCentering(3), (2, 3, 4, 4)),
    (ln.BatchCentering(3), (2, 3, 4, 4)), (ln.InputNormalization([0.5, 0.4, 0.3], [0.2, 0.25, 0.3]), (2, 3, 4, 4)),
    (ln.GroupSort(2), (2, 6, 3, 3)), (ln.GroupSort(3), (2, 6)), (ln.FullSort(), (2, 5)),
    (nn.MaxPool2d(2), (1, 2, 6, 6)), (nn.MaxPool2d(3, stride=1), (1, 1, 6, 6)),
    (nn.MaxPool2d(3, stride=2, padding=1), (1, 1, 7, 7)), (nn.Softmax(dim=1), (2, 5)),
    (ln.InvertibleDownSampling(2), (2, 3, 4, 6)), (ln.InvertibleUpSampling(2), (2, 8, 3, 3)),
    (ln.GroupNormalization(2, 4, eps=0.5), (2, 4, 3, 3)),
])
def test_parameter_free_layers(module, shape):
    low, bound = assert_bound_holds(module, shape)
    # bounds that are attained: a bound of 1e9 must not pass (the attack has to reach it)
    exact = (ln.MaxMin, ln.Abs, ln.Flatten, ln.BatchCentering, ln.InputNormalization, ln.FirstChannels,
             ln.LayerCentering, ln.GlobalL2NormPool2d, ln.GroupSort, ln.FullSort, ln.InvertibleDownSampling,
             ln.InvertibleUpSampling)
    pooled = (isinstance(module, (ln.ScaledAvgPool2d, ln.L2NormPool2d, nn.MaxPool2d))
              and module.stride == module.kernel_size)
    if isinstance(module, exact) or pooled:
        assert low >= 0.99 * bound, f"{module}: bound {bound} loose vs {low}"


def test_sorting_activations_and_householder_preserve_norms_and_refuse_bad_shapes():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    for act in (ln.GroupSort(2), ln.GroupSort(3), ln.GroupSort(6), ln.FullSort()):
        y = act(x)
        assert torch.allclose(y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))
    assert torch.equal(ln.GroupSort(6)(x), ln.FullSort()(x))
    pair = torch.tensor([[3.0, 1.0, -2.0, 5.0]])
    assert torch.equal(ln.GroupSort(2)(pair), torch.tensor([[1.0, 3.0, -2.0, 5.0]]))  # adjacent pairs
    with pytest.raises(ValueError, match="multiple of group_size"):
        ln.GroupSort(4)(x)
    h = ln.HouseHolder(6).double()
    a, b = x[:, :3], x[:, 3:]
    assert torch.allclose(h(x), torch.cat([torch.minimum(a, b), torch.maximum(a, b)], 1))  # theta = pi/2
    with torch.no_grad():
        h.theta.uniform_(-4, 4)
    assert torch.allclose(h(x).flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))
    low, bound = assert_bound_holds(h, (2, 6, 3, 3))
    assert bound == 1.0 and low >= 0.99
    with pytest.raises(ValueError, match="even"):
        ln.HouseHolder(5)
    with pytest.raises(ValueError, match="expected 6 channels"):
        h(torch.randn(2, 4, dtype=torch.float64))


def test_max_pool_bound_counts_the_windows_a_pixel_is_in():
    assert ln.lipschitz_bound(nn.MaxPool2d(2)) == 1.0
    assert ln.lipschitz_bound(nn.MaxPool2d(3, stride=1)) == pytest.approx(3.0)
    assert ln.lipschitz_bound(nn.MaxPool2d(3, stride=2)) == pytest.approx(2.0)
    assert ln.lipschitz_bound(nn.MaxPool2d((3, 2), stride=(1, 2))) == pytest.approx(math.sqrt(3))
    # a constant image with one raised pixel: every window holding it moves by the same amount
    pool = nn.MaxPool2d(3, stride=1)
    x = torch.zeros(1, 1, 7, 7, dtype=torch.float64)
    y = x.clone()
    y[0, 0, 3, 3] = 1.0
    assert (pool(y) - pool(x)).norm() == pytest.approx(ln.lipschitz_bound(pool))


def test_input_normalization_bound_and_errors():
    norm = ln.InputNormalization([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    assert ln.lipschitz_bound(norm) == pytest.approx(5.0, rel=1e-5) and ln.lipschitz_bound(norm) >= 5.0
    assert ln.lipschitz_bound(ln.InputNormalization([0.1307])) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="std"):
        ln.InputNormalization([0.5], [0.0])
    with pytest.raises(ValueError, match="same non-zero length"):
        ln.InputNormalization([0.5, 0.5], [0.2])
    with pytest.raises(ValueError, match="expected"):
        norm(torch.zeros(2, 1, 4, 4))


def test_scaled_avg_pool_is_tight_and_maxmin_preserves_norms():
    for pool in (ln.ScaledAvgPool2d(2), ln.ScaledAvgPool2d(3, stride=2), ln.ScaledAvgPool2d((2, 3), stride=1)):
        assert ln.lipschitz_bound(pool) == pytest.approx(1.0, abs=1e-5)
    x = torch.ones(1, 1, 4, 4)  # non-overlapping windows preserve the norm of constant inputs
    assert ln.ScaledAvgPool2d(2)(x).norm() == pytest.approx(x.norm().item(), rel=1e-5)
    x = torch.randn(4, 8, 5, 5)
    assert torch.allclose(ln.MaxMin()(x).norm(), x.norm())


@pytest.mark.parametrize("dim,shape", [(1, (4, 8, 5, 5)), (-1, (3, 6))])
def test_maxmin_fast_backward_matches_autograd(dim, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)  # no ties almost surely
    g = torch.randn(shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad(ln.MaxMin(dim)(x), x, g)
    a, b = x.split(shape[dim] // 2, dim=dim)
    (ref,) = torch.autograd.grad(torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=dim), x, g)
    assert torch.equal(grad, ref)
    assert torch.autograd.gradcheck(ln.MaxMin(dim), (x,))


@pytest.mark.parametrize("alpha,learnable", [(0.3, False), (0.7, True), (1.0, False)])
def test_convex_residual(alpha, learnable):
    torch.manual_seed(0)
    f = nn.Sequential(ln.AOLLinear(6, 6), ln.MaxMin())
    m = ln.ConvexResidual(f, alpha=alpha, learnable=learnable)
    low, bound = assert_bound_holds(m, (2, 6))
    assert bound == pytest.approx((1 - alpha) + alpha * ln.lipschitz_bound(f), rel=1e-6)
    twice = ln.ConvexResidual(nn.Sequential(ln.OrthoLinear(4, 4), ln.OrthoLinear(4, 4)), alpha=0.5)
    with torch.no_grad():  # scale up: f is now 3-Lipschitz-ish, the convex rule must follow
        twice.f[0].parametrizations.weight.original.mul_(1.0)
    assert_bound_holds(twice, (2, 4))


def test_sequential_bound_is_the_product_and_is_attacked():
    torch.manual_seed(0)
    model = nn.Sequential(ln.OrthoConv2d(3, 8, 3), ln.MaxMin(), ln.AOLConv2d(8, 8, 3), ln.L2NormPool2d(2),
                          ln.Flatten(), ln.AOLLinear(8 * 4 * 4, 10))
    parts = [ln.lipschitz_bound(m) for m in model]
    assert ln.lipschitz_bound(model) == pytest.approx(math.prod(parts))
    assert_bound_holds(model, (1, 3, 8, 8))


def test_bad_inputs_raise_clear_errors():
    conv = ln.OrthoConv2d(4, 4, 3)
    with pytest.raises(ValueError, match="channels"):
        conv(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        conv(torch.full((1, 4, 8, 8), math.nan))
    one_bad = torch.randn(1, 4, 8, 8)
    for bad in (math.inf, -math.inf, math.nan):
        one_bad[0, 2, 3, 3] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            conv(one_bad)
    huge = torch.full((1, 4, 8, 8), 3e38)  # finite entries whose sum overflows: accepted
    assert conv(huge).shape == huge.shape
    with pytest.raises(ValueError, match="divisible by the stride"):
        ln.OrthoConv2d(4, 8, 3, stride=2, padding=1)(torch.randn(1, 4, 7, 7))
    with pytest.raises(ValueError, match="used twice"):
        ln.OrthoConv2d(4, 4, 1, padding=1)(torch.randn(1, 4, 4, 4))
    lin = ln.OrthoLinear(3, 3)
    with torch.no_grad():
        lin.parametrizations.weight.original[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN|finite"):
        lin(torch.randn(2, 3))
    with pytest.raises(ValueError, match="features"):
        ln.OrthoLinear(3, 3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="even"):
        ln.MaxMin()(torch.randn(2, 3))
    with pytest.raises(TypeError, match="no Lipschitz bound rule"):
        ln.lipschitz_bound(nn.Sequential(ln.OrthoLinear(3, 3), nn.Softplus()))
    with pytest.raises(TypeError, match="repeats pixels"):
        ln.lipschitz_bound(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="temperature"):
        ln.LipschitzCrossEntropy(temperature=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_size=(3, 5)), "square"),
    (dict(kernel_size=1, stride=2, padding=0), "kernel_size=1 < stride=2"),
    (dict(kernel_size=3, groups=3), "divisible by groups"),
    (dict(kernel_size=3, transposed=True, padding_mode="circular"), "zero padding only"),
    (dict(kernel_size=3, padding_mode="reflect"), "padding_mode"),
    (dict(kernel_size=3, padding=(0, 1)), "square"),
    (dict(kernel_size=3, method="qr"), "unknown orthogonalization method"),
    (dict(kernel_size=0), "positive int"),
])
def test_impossible_ortho_conv_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ln.OrthoConv2d(4, 8, **kwargs)


def test_core_is_injected_into_orthogonium():
    from lipnet.nn.parametrizations import CoreOrthogonalizer, NoSpectralNormalization
    conv = ln.OrthoConv2d(8, 16, 3, stride=2, padding=1)
    kinds = {type(m) for m in conv.modules()}
    assert CoreOrthogonalizer in kinds and NoSpectralNormalization in kinds
    assert not any("Bjorck" in k.__name__ or "PowerIteration" in k.__name__ for k in kinds)


@pytest.mark.parametrize("k,s,d", [(3, 2, 1), (2, 2, 1), (4, 2, 1), (5, 2, 1), (3, 3, 1)])
def test_strided_same_padding_gives_n_over_stride_outputs(k, s, d):
    torch.manual_seed(0)
    conv = ln.OrthoConv2d(4, 8, k, stride=s, dilation=d, padding_mode="zeros")
    for n in (6 * s, 4 * s):
        assert conv(torch.randn(1, 4, n, n)).shape[-1] == n // s
    if k % 2 and s == 2 and d == 1:  # odd kernel, stride 2: ceil(n / 2) for every n
        assert conv(torch.randn(1, 4, 7, 7)).shape[-1] == 4
    assert ln.lipschitz_bound(conv) <= 1 + 1e-3


def test_output_padding_is_validated_at_construction():
    with pytest.raises(ValueError, match="output_padding must be a non-negative int"):
        ln.OrthoConv2d(8, 4, 2, stride=2, padding=0, transposed=True, output_padding=None)
    with pytest.raises(ValueError, match="smaller than the stride"):
        ln.OrthoConv2d(4, 4, 3, stride=1, transposed=True, output_padding=5)
    with pytest.raises(ValueError, match="transposed convolutions only"):
        ln.OrthoConv2d(4, 4, 3, output_padding=1)
    up = ln.OrthoConv2d(8, 4, 2, stride=2, padding=0, transposed=True, output_padding=1)
    assert up(torch.randn(1, 8, 4, 4)).shape[-1] == 9


@pytest.mark.parametrize("kwargs,keys", [
    (dict(in_channels=8, out_channels=4, kernel_size=3, stride=2, padding=1, output_padding=1),
     ["conv.bias", "conv.parametrizations.weight_1.original", "conv.parametrizations.weight_2.original"]),
    (dict(in_channels=4, out_channels=4, kernel_size=3), ["conv.bias", "conv.parametrizations.weight.original"]),
    (dict(in_channels=8, out_channels=4, kernel_size=2, stride=2, padding=0, parametrization="polar"),
     ["conv.bias", "conv.parametrizations.weight.original"]),
    (dict(in_channels=4, out_channels=8, kernel_size=3, groups=2, dilation=2),
     ["conv.bias", "conv.parametrizations.weight.original"]),
])
def test_ortho_conv_transpose_is_the_transposed_flag_s_layer(kwargs, keys):
    """OrthoConv2d(..., transposed=True) builds an OrthoConvTranspose2d: the same state_dict keys
    (checkpoints load), the same parameters for one seed, bound and plain nn.ConvTranspose2d export."""
    torch.manual_seed(0)
    flagged = ln.OrthoConv2d(**kwargs, transposed=True)
    torch.manual_seed(0)
    layer = ln.OrthoConvTranspose2d(**kwargs)
    assert type(flagged) is ln.OrthoConvTranspose2d and layer.transposed and not isinstance(layer, ln.OrthoConv2d)
    sd = flagged.state_dict()
    assert list(sd) == list(layer.state_dict()) == keys
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in sd.items())
    fresh = ln.OrthoConvTranspose2d(**kwargs)
    with torch.no_grad():
        sd = {k: v + 0.1 * torch.randn_like(v) for k, v in sd.items()}  # away from the shared init
    flagged.load_state_dict(sd)
    fresh.load_state_dict(sd)
    flagged.eval(), fresh.eval()
    x = torch.randn(2, kwargs["in_channels"], 5, 5)
    torch.testing.assert_close(fresh(x), flagged(x), rtol=0, atol=0)
    assert ln.lipschitz_bound(fresh) == ln.lipschitz_bound(flagged) <= 1 + 1e-3
    exported = ln.export(fresh)
    op = kwargs.get("output_padding", 0)
    assert type(exported) is nn.ConvTranspose2d and exported.output_padding == (op, op)
    torch.testing.assert_close(exported(x), fresh(x), rtol=1e-5, atol=1e-6)
    assert ln.lipschitz_bound(exported) == pytest.approx(ln.lipschitz_bound(fresh), rel=1e-9)


@pytest.mark.parametrize("kwargs,match", [
    (dict(padding_mode="circular"), "zero padding only"),
    (dict(padding=2, output_padding=1), "smaller than the stride"),
    (dict(kernel_size=2), "odd dilated kernel"),
    (dict(padding=(0, 1)), "square"),
])
def test_impossible_ortho_conv_transpose_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ln.OrthoConvTranspose2d(8, 4, **{"kernel_size": 3, **kwargs})


def test_a_subclass_of_ortho_conv2d_refuses_transposed():
    class Sub(ln.OrthoConv2d):
        pass

    with pytest.raises(ValueError, match="OrthoConvTranspose2d"):
        Sub(4, 4, 3, transposed=True)
    assert type(Sub(4, 4, 3)) is Sub


def test_batch_centering_in_training_mode_runs_under_torch_func():
    """jacrev of the training map (the batch-mean projection): the Jacobian of x -> x - mean_batch(x)
    is I - (1/B) 1 1^T per channel and position; the running mean is left alone under the transform."""
    bc = ln.BatchCentering(2).double().train()
    x = torch.randn(3, 2, dtype=torch.float64)
    before = bc.running_mean.clone()
    jac = torch.func.jacrev(bc)(x)  # (3, 2, 3, 2)
    expected = torch.einsum("ij,kl->ikjl", torch.eye(3, dtype=torch.float64) - 1 / 3, torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(jac, expected)
    assert torch.equal(bc.running_mean, before)
    bc(x)  # an ordinary call still updates it
    assert not torch.equal(bc.running_mean, before)


def test_invertible_sampling_round_trips_and_refuses_bad_shapes():
    x = torch.randn(2, 3, 4, 6)
    down, up = ln.InvertibleDownSampling(2), ln.InvertibleUpSampling(2)
    assert down(x).shape == (2, 12, 2, 3) and torch.equal(up(down(x)), x)
    assert torch.allclose(down(x).norm(), x.norm())
    with pytest.raises(ValueError, match="multiples of 2"):
        down(torch.randn(1, 1, 5, 4))
    with pytest.raises(ValueError, match="multiple of 4"):
        up(torch.randn(1, 6, 2, 2))
    with pytest.raises(ValueError, match="factor"):
        ln.InvertibleDownSampling(0)


def test_lipschitz_report_lists_every_layer_with_its_sound_and_empirical_bound():
    from lipnet.certify import network_lipschitz_bound

    torch.manual_seed(0)
    model = nn.Sequential(ln.OrthoConv2d(3, 8, 3), ln.MaxMin(), nn.Sequential(ln.AOLConv2d(8, 8, 3), ln.Abs()),
                          ln.Flatten(), ln.OrthoLinear(8 * 6 * 6, 10)).train()
    x = torch.rand(16, 3, 6, 6)
    report = ln.lipschitz_report(model, x)
    assert [r.name for r in report.rows] == ["0", "1", "2.0", "2.1", "3", "4"]
    assert [r.type for r in report.rows][2] == "AOLConv2d"
    assert report.bound == pytest.approx(network_lipschitz_bound(model), rel=1e-9)
    for r in report.rows:
        assert 0 < r.lower <= r.bound * (1 + 1e-4), r
    assert report.rows[1].lower >= 0.99  # MaxMin's 1 is reached at real inputs
    text = str(report)
    assert "AOLConv2d" in text and "product of the bounds" in text
    assert set(report.as_dict()) == {"0", "1", "2.0", "2.1", "3", "4"}
    assert model.training and all(m.training for m in model.modules())  # modes restored
    assert ln.lipschitz_report(model).rows[0].lower is None  # no data: bounds only
    with pytest.raises(TypeError, match="no Lipschitz bound rule"):
        ln.lipschitz_report(nn.Sequential(nn.Tanhshrink()))


def test_concat_and_l2_norm_residuals_hold_their_bounds_and_the_unhalved_merge_is_caught():
    torch.manual_seed(0)
    concat = ln.ConcatResidual(nn.Sequential(ln.OrthoLinear(3, 3), ln.Abs()))
    low, bound = assert_bound_holds(concat, (4, 6))
    assert bound <= 1 + 1e-5 and low >= 0.99
    merge = ln.L2NormResidual(ln.OrthoLinear(6, 6))
    low, bound = assert_bound_holds(merge, (4, 6))
    assert bound <= 1 + 1e-4 and low >= 0.95

    class Unhalved(ln.L2NormResidual):  # sqrt(x^2 + f(x)^2): the sqrt(2)-Lipschitz merge
        def forward(self, x):
            out = self.f(x)
            return torch.sqrt(x * x + out * out + self.eps)

    wrong = Unhalved(nn.Identity())
    empirical = attack(wrong, (4, 6))
    assert empirical > 1.3 * ln.lipschitz_bound(wrong)  # the bound rule of the halved merge does not hold for it
    for m, shape in ((concat, (2, 6)), (merge, (2, 6))):
        x = torch.randn(*shape, dtype=torch.float64)
        torch.testing.assert_close(ln.export(m)(x), m.eval()(x))
    with pytest.raises(ValueError, match="even size"):
        concat(torch.randn(2, 5, dtype=torch.float64))


@pytest.mark.parametrize("cin,cout,groups", [(1, 2, 1), (4, 8, 4), (1, 4, 1)])
def test_strided_depthwise_ortho_conv_is_row_orthogonal_and_exports_exactly(cin, cout, groups):
    # orthogonium's depthwise downsampling: one input channel per group, kernel 3, stride 2
    torch.manual_seed(0)
    m = ln.OrthoConv2d(cin, cout, 3, stride=2, groups=groups).double().eval()
    x = torch.randn(1, cin, 8, 8, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(m, x).reshape(-1, x.numel())
    sv = torch.linalg.svdvals(jac)
    bound = ln.lipschitz_bound(m)
    assert sv.max() <= bound * (1 + 1e-9) and bound <= 1 + 1e-4
    assert torch.allclose(sv, torch.ones_like(sv), atol=1e-5)  # every output direction kept: row-orthogonal
    assert torch.equal(ln.export(m)(x), m(x))


def test_one_channel_per_group_is_refused_where_only_a_shift_is_orthogonal():
    with pytest.raises(ValueError, match="pure shift"):
        ln.OrthoConv2d(2, 2, 3, groups=2)
    with pytest.raises(ValueError, match="not constructible"):  # 1 -> 1 per group at stride 2: orthogonium has none
        ln.OrthoConv2d(2, 2, 3, stride=2, groups=2)


@pytest.mark.parametrize("alpha", [0.0, 0.3, -2.0, 5.0])
def test_prescaled_additive_residual_holds_its_bound_for_every_alpha(alpha):
    torch.manual_seed(0)
    m = ln.PrescaledAdditiveResidual(nn.Sequential(ln.OrthoLinear(6, 6), ln.MaxMin()), alpha=alpha)
    low, bound = assert_bound_holds(m, (4, 6))
    assert bound <= 1 + 1e-4
    x = torch.randn(3, 6, dtype=torch.float64)
    assert torch.allclose(m(x), (x + m.f(alpha * x)) / (1 + abs(alpha)))
    # a 3-Lipschitz branch: the rule gives (1 + 3|a|) / (1 + |a|); for a >= 0 the attack reaches it
    tripled = ln.PrescaledAdditiveResidual(nn.PReLU(1, init=3.0), alpha=alpha, learnable=False)
    low, bound = assert_bound_holds(tripled, (4, 6))
    assert math.isclose(bound, (1 + 3 * abs(alpha)) / (1 + abs(alpha)), rel_tol=1e-5)
    assert alpha < 0 or low >= 0.99 * bound
    torch.testing.assert_close(ln.export(m)(x), m.eval()(x))
    assert ln.export(m).alpha.item() == m.alpha.item() and "alpha" not in dict(ln.export(m).named_parameters())
    with pytest.raises(ValueError, match="finite"):
        ln.PrescaledAdditiveResidual(nn.Identity(), alpha=float("nan"))


def test_lprelu_clamps_its_slopes_and_exports_to_a_plain_prelu():
    m = ln.LPReLU(4)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.25, -3.0, 2.0, -0.5]))
    low, bound = assert_bound_holds(m, (2, 4, 3, 3))
    assert bound == 1.0 and low >= 0.99  # slopes clamped to 0.25, -1, 1, -0.5
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    plain = ln.export(m)
    assert type(plain) is nn.PReLU and torch.equal(plain(x), m(x))
    assert ln.lipschitz_bound(plain) == 1.0
    raw = nn.PReLU(1, init=-3.0)  # a plain PReLU's rule: max(1, max |a|)
    assert ln.lipschitz_bound(raw) == 3.0 and attack(raw, (2, 5)) <= 3.0 * (1 + 1e-9)


@settings(max_examples=15, deadline=None)
@given(features=st.integers(1, 8), alpha=st.floats(-4, 4), per_channel=st.booleans(), seed=st.integers(0, 1000))
def test_lprelu_and_prescaled_residual_bounds_survive_attack_on_random_shapes(features, alpha, per_channel, seed):
    torch.manual_seed(seed)
    act = ln.LPReLU(features if per_channel else 1)
    with torch.no_grad():
        act.weight.normal_(0, 2)  # raw slopes beyond [-1, 1]: the clamp must hold the bound
    low, bound = assert_bound_holds(act, (3, features, 2), seed)
    assert bound == 1.0
    res = ln.PrescaledAdditiveResidual(nn.Sequential(ln.OrthoLinear(features, features), act), alpha=alpha)
    low, bound = assert_bound_holds(res, (3, features), seed)
    assert bound <= 1 + 1e-4
    x = torch.randn(4, features, dtype=torch.float64)
    assert torch.equal(ln.export(res)(x), res.eval()(x))
