"""The convolution operator-norm bound must never be below the true norm (dense Jacobian SVD)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lipnet.nn.conv_norm import conv_operator_norm_bound, polyphase_kernel
from strategies import conv_geometry


def dense_conv_norm(kernel, n, stride, dilation, groups, padding_mode, padding):
    """Exact operator norm on an n x n input: SVD of the full Jacobian (float64)."""
    ci = kernel.shape[1] * groups

    def f(x):
        x = x.view(1, ci, n, n)
        if padding_mode == "circular":
            x, p = F.pad(x, (padding,) * 4, mode="circular"), 0
        else:
            p = padding
        return F.conv2d(x, kernel, stride=stride, padding=p, dilation=dilation, groups=groups).flatten()

    J = torch.autograd.functional.jacobian(f, torch.zeros(ci * n * n, dtype=torch.float64))
    return torch.linalg.matrix_norm(J, 2).item()


@st.composite
def conv_configs(draw):
    groups, ci, co, k, stride, dilation = draw(conv_geometry(max_per_group=3))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    g = torch.Generator().manual_seed(seed)
    kernel = scale * torch.randn(co, ci // groups, k, k, generator=g, dtype=torch.float64)
    if draw(st.booleans()):  # heavy-tailed / sparse kernels
        kernel = kernel**3 * (torch.rand(kernel.shape, generator=g, dtype=torch.float64) < 0.5)
    return kernel, stride, dilation, groups


@settings(max_examples=40, deadline=None)
@given(cfg=conv_configs(), n=st.sampled_from([4, 6, 8]))
def test_bound_above_exact_norm_zero_and_circular_padding(cfg, n):
    kernel, stride, dilation, groups = cfg
    bound = conv_operator_norm_bound(kernel, stride, dilation, groups)
    span = dilation * (kernel.shape[-1] - 1)
    exact = dense_conv_norm(kernel, n, stride, dilation, groups, "zeros", span // 2)
    assert bound >= exact * (1 - 1e-12), (bound, exact)
    if span // 2 < n:  # circular, as the layers allow it: n divisible by stride, <= n/stride outputs
        out = (n + 2 * (span // 2) - span - 1) // stride + 1
        if n % stride == 0 and out <= n // stride:
            exact_c = dense_conv_norm(kernel, n, stride, dilation, groups, "circular", span // 2)
            assert bound >= exact_c * (1 - 1e-12), (bound, exact_c)


@settings(max_examples=15, deadline=None)
@given(cfg=conv_configs())
def test_bound_is_tight_against_a_fine_frequency_grid(cfg):
    """grid max <= sup <= bound <= 1.0098 sup (+margin): compare with a 256 x 256 grid's exact max."""
    kernel, stride, dilation, groups = cfg
    bound = conv_operator_norm_bound(kernel, stride, dilation, groups)
    k = polyphase_kernel(kernel, stride, dilation)
    k = k.reshape(groups, k.shape[0] // groups, *k.shape[1:])
    sym = torch.fft.fft2(k, s=(256, 256)).permute(0, 3, 4, 1, 2)
    grid_max = torch.linalg.matrix_norm(sym, 2).max().item()
    assert grid_max <= bound * (1 + 1e-12)
    assert bound <= 1.011 * grid_max + 1e-300


def test_orthogonal_kernel_bound_is_tight():
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    kernel = torch.zeros(6, 6, 3, 3, dtype=torch.float64)
    kernel[:, :, 1, 1] = q  # an orthogonal 1x1 map hidden in a 3x3 kernel
    assert 1.0 <= conv_operator_norm_bound(kernel) <= 1 + 1e-5


def test_polyphase_is_an_equivalent_stride_one_conv():
    torch.manual_seed(0)
    kernel = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    y = F.conv2d(x, kernel, stride=2)
    xp = x.view(1, 2, 4, 2, 4, 2).permute(0, 1, 3, 5, 2, 4).reshape(1, 8, 4, 4)
    yp = F.conv2d(xp, polyphase_kernel(kernel, 2))
    assert torch.allclose(y, yp[..., : y.shape[-2], : y.shape[-1]])


def test_bad_kernels_raise():
    with pytest.raises(ValueError, match="4-D"):
        conv_operator_norm_bound(torch.randn(3, 3))
    with pytest.raises(ValueError, match="groups"):
        conv_operator_norm_bound(torch.randn(3, 1, 3, 3), groups=2)
    bad = torch.randn(2, 2, 3, 3)
    bad[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError):
        conv_operator_norm_bound(bad)
