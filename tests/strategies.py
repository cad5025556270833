"""Hypothesis strategies for stacks of matrices with controlled spectra."""

from __future__ import annotations

import torch
from hypothesis import strategies as st


def matrix_with_spectrum(m: int, n: int, singular_values: torch.Tensor, seed: int, batch=()) -> torch.Tensor:
    """Random U diag(singular_values) V^T of shape (*batch, m, n), float64 then cast by the caller."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64))
    return (U * singular_values.to(torch.float64)) @ V.mT


shapes = st.tuples(st.integers(1, 40), st.integers(1, 40))
batch_dims = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)
seeds = st.integers(0, 2**31 - 1)


@st.composite
def well_conditioned(draw, max_condition: float = 100.0):
    """(W fp32, condition number): singular values log-spaced in [scale / kappa, scale]."""
    m, n = draw(shapes)
    batch = draw(batch_dims)
    kappa = draw(st.floats(1.0, max_condition))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    k = min(m, n)
    sv = scale * torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), k, dtype=torch.float64)
    return matrix_with_spectrum(m, n, sv, draw(seeds), batch).float(), kappa


@st.composite
def any_matrix(draw):
    """Gaussian, ill-conditioned (kappa up to 1e7), low-rank, near-orthogonal or heavy-entry matrices."""
    m, n = draw(shapes)
    batch = draw(batch_dims)
    seed = draw(seeds)
    kind = draw(st.sampled_from(["gaussian", "ill", "low_rank", "near_orthogonal", "heavy"]))
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    if kind == "gaussian":
        W = torch.randn(*batch, m, n, generator=g, dtype=torch.float64)
    elif kind == "ill":
        sv = torch.logspace(0, -draw(st.floats(1, 7)), k, dtype=torch.float64)
        W = matrix_with_spectrum(m, n, sv, seed, batch)
    elif kind == "low_rank":
        r = draw(st.integers(1, k))
        W = torch.randn(*batch, m, r, generator=g, dtype=torch.float64) @ torch.randn(
            *batch, r, n, generator=g, dtype=torch.float64
        )
    elif kind == "near_orthogonal":
        sv = 1 + draw(st.floats(-1e-3, 1e-3)) * torch.rand(k, generator=g, dtype=torch.float64)
        W = matrix_with_spectrum(m, n, sv, seed, batch)
    else:
        W = torch.randn(*batch, m, n, generator=g, dtype=torch.float64) ** 3
    scale = draw(st.sampled_from([1e-4, 1.0, 1e4]))
    return (W * scale).float()


@st.composite
def conv_geometry(draw, max_per_group: int, dilations=st.integers(1, 2)):
    """(groups, in_channels, out_channels, kernel, stride, dilation) of a small 2-D convolution."""
    groups = draw(st.sampled_from([1, 1, 2]))
    cin = groups * draw(st.integers(1, max_per_group))
    cout = groups * draw(st.integers(1, max_per_group))
    return groups, cin, cout, draw(st.integers(1, 4)), draw(st.integers(1, 2)), draw(dilations)


def strided_padding(kernel: int, stride: int, dilation: int) -> int:
    """Padding that gives size / stride outputs for even sizes (what circular padding allows)."""
    return (dilation * (kernel - 1) - stride + 2) // 2
