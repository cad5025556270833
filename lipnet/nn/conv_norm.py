"""A sound upper bound on the L2 operator norm of a 2-D convolution, from its kernel.

The bound holds for every input size, for zero padding, and for circular padding under the
conditions ``OrthoConv2d`` / ``AOLConv2d`` check at run time (see :func:`check_circular_input`).

Derivation (all steps are exact identities or norm inequalities):

1. Dilation d is a stride-1 convolution with the kernel spread out by zeros (taps at d*a).
2. Stride s (polyphase): writing a = s*a1 + a0, the strided convolution of x with K equals the
   stride-1 convolution of the rearranged input X'[(c, a0, b0), m, n] = x[c, s*m + a0, s*n + b0]
   with the kernel K'[o, (c, a0, b0), a1, b1] = K[o, c, s*a1 + a0, s*b1 + b0]. The rearrangement
   is a permutation of pixels (an isometry) of the zero-extended input on Z^2, and of the torus
   Z_n^2 when s divides n.
3. Zero padding computes a window of the convolution on the infinite grid Z^2 with a zero-extended
   input; circular padding computes a window of the convolution on the torus (when no output
   position is computed twice). Restricting to a window does not increase the norm, so both are
   bounded by M = sup_w ||K'^(w)||_2, the supremum over all frequencies w in [-pi, pi]^2 of the
   spectral norm of the symbol K'^(w) = sum_a K'_a exp(-i <w, a>) (the norm of the operator on
   l2(Z^2); on a torus only a subset of frequencies occurs).
4. M is computed on an N x N frequency grid, with a rigorous correction for the points between
   grid nodes. H(w) = K'^(w)^H K'^(w) is a Hermitian trigonometric polynomial of degree
   d_i = k'_i - 1 in w_i. At a maximiser w*, with u a top eigenvector, p(w) = u^H H(w) u is a
   real trigonometric polynomial with |p| <= M^2 and grad p(w*) = 0. Bernstein's inequality
   (|T'| <= deg * sup|T| for trigonometric polynomials, applied per variable) bounds its Hessian,
   so at the grid node w_j nearest to w* (|w_i - w_j,i| <= pi / N):
       M^2 - p(w_j) <= c M^2,   c = 0.5 * (pi (d_1 + d_2) / N)^2,
   hence M^2 <= max_grid lambda_max(H) / (1 - c)  (the "direct" bound). The same argument on
   E(w) = H(w) - I gives sup ||E|| <= max_grid ||E|| / (1 - c) and M^2 <= 1 + that (the
   "near-orthogonal" bound, tight to ~||E|| for orthogonal convolutions, whose symbol is unitary).
   The result is the smaller of the two (and of step 6). A coarse grid N = 4 (d_1 + d_2) (c = 0.31) settles
   nearly orthogonal kernels (bound 1 + 1.45 max_grid ||E|| <= 1 + 1e-3); otherwise a fine grid
   N = 16 (d_1 + d_2) (c = 0.0193) puts the direct bound at most 1% above M.
5. Rounding: the symbol and eigenvalues are computed in float64 from the (exact) fp32/bf16 kernel;
   eigenvalues get an absolute margin of 1e-12 * (sum_taps ||K'_a||_F)^2 (>= 10^3 x the float64
   error of the FFT and of LAPACK's backward-stable ``eigvalsh``), and the result is multiplied by
   (1 + ``SAFETY_MARGIN``).

6. Weighted Schur test: T^T T is the stride-1 convolution with the Gram kernel P
   (``conv_gram_kernel``); with A_ij = sum_u |P_ij[u]| and any positive vector q,
   M^2 <= max_i (A q)_i / q_i. AOL's proof is this test with q = 1/d, so it certifies AOL kernels
   at 1 without the grid's slack; we take q from power iteration on A (any q is sound). (Sums of
   absolute values in float64: relative error <= n u, far below the margins.)

A 1x1 polyphase kernel (e.g. RKO, kernel == stride) is a plain matrix: the core's rigorous
``spectral_norm_bound`` is used directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ortho import SAFETY_MARGIN, spectral_norm_bound
from ..ortho.validation import check_matrices

_EIG_MARGIN = 1e-12


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def polyphase_kernel(
    kernel: torch.Tensor, stride: int | tuple[int, int] = 1, dilation: int | tuple[int, int] = 1
) -> torch.Tensor:
    """Stride-1, undilated kernel (out, in * sh * sw, k1', k2') equivalent to a strided, dilated one.

    ``kernel`` has the ``F.conv2d`` layout (out, in, kh, kw). See the module docstring, steps 1-2.
    """
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    co, ci, kh, kw = kernel.shape
    if dh > 1 or dw > 1:
        spread = kernel.new_zeros(co, ci, dh * (kh - 1) + 1, dw * (kw - 1) + 1)
        spread[..., ::dh, ::dw] = kernel
        kernel, kh, kw = spread, spread.shape[-2], spread.shape[-1]
    ph, pw = math.ceil(kh / sh) * sh, math.ceil(kw / sw) * sw
    kernel = torch.nn.functional.pad(kernel, (0, pw - kw, 0, ph - kh))
    k = kernel.reshape(co, ci, ph // sh, sh, pw // sw, sw)  # (o, c, a1, a0, b1, b0)
    return k.permute(0, 1, 3, 5, 2, 4).reshape(co, ci * sh * sw, ph // sh, pw // sw)


def conv_gram_kernel(kernel: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Kernel of T^T T for the stride-1, undilated convolution T with ``kernel`` (out, in/groups, k1, k2).

    Returns (in/groups, in, 2k1-1, 2k2-1) in conv-output layout: entry [i, (g, j), u] is
    sum_{o in group g} (K[o, i] correlated with K[o, j])[u], i.e. the Gram block of group g.
    A dilated convolution's Gram kernel is this one with its taps spread by the dilation (same
    entries); for strided/dilated operators use ``polyphase_kernel`` first.
    """
    co, cig, k1, k2 = kernel.shape
    x = kernel.transpose(0, 1)  # batch = input channel i, channels = all outputs o
    w = kernel.view(groups, co // groups, cig, k1, k2).transpose(1, 2).reshape(groups * cig, co // groups, k1, k2)
    return F.conv2d(x, w, groups=groups, padding=(k1 - 1, k2 - 1))


def default_grid_size(kernel_size: tuple[int, int]) -> int:
    """Frequency grid N for a stride-1 kernel of size (k1, k2): N = 16 (k1 + k2 - 2)."""
    return 16 * (kernel_size[0] + kernel_size[1] - 2)


@torch.no_grad()
def conv_operator_norm_bound(
    kernel: torch.Tensor,
    stride: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    *,
    grid_size: int | None = None,
) -> float:
    """Guaranteed upper bound on the L2 operator norm of ``F.conv2d(x, kernel, stride=..., ...)``.

    Valid for every input size with zero padding; with circular padding when the input size is a
    multiple of the stride and the output has at most size/stride positions per axis (checked by
    the lipnet layers at run time). Also a bound for ``conv_transpose2d`` with the same kernel (the
    adjoint has the same norm). ``grid_size`` (default: coarse, then fine if needed, see step 4)
    trades time for the tightness of the direct bound; every grid size gives a sound bound.
    Derivation and rounding analysis: module docstring.
    """
    if not isinstance(kernel, torch.Tensor) or kernel.dim() != 4:
        raise ValueError(f"kernel must be a 4-D tensor (out, in/groups, kh, kw), got {getattr(kernel, 'shape', kernel)}")
    if groups < 1 or kernel.shape[0] % groups:
        raise ValueError(f"out channels {kernel.shape[0]} not divisible by groups={groups}")
    check_matrices(kernel.flatten(1), "kernel", allow_zero=True)
    k = polyphase_kernel(kernel.detach().to(torch.float64), stride, dilation)
    co, ci, k1, k2 = k.shape

    # Step 6: weighted Schur test on the Gram kernel's absolute tap sums. Certifies AOL-rescaled
    # kernels at 1; tight where the grid bound keeps its 1% slack.
    gram = conv_gram_kernel(k, groups).abs()
    schur = math.sqrt(weighted_schur_bound(gram.view(ci, groups, ci, -1).sum(-1).transpose(0, 1)))
    schur *= 1 + SAFETY_MARGIN
    if k1 == 1 and k2 == 1:  # a plain (grouped) matrix: the core's rigorous bound, or AOL's certificate
        # (Gram iteration is loose by up to k^(1/128) where singular values are equal, which AOL's
        # rescaling makes common; the Schur test certifies those at 1)
        return min(schur, float(spectral_norm_bound(k.reshape(groups, co // groups, ci)).max()))

    k = k.reshape(groups, co // groups, ci, k1, k2)
    d1, d2 = k1 - 1, k2 - 1
    tap_frobenius_sum = k.flatten(3).norm(dim=(1, 2)).sum(-1).max().item()
    margin = _EIG_MARGIN * tap_frobenius_sum**2
    if grid_size is not None:
        return min(schur, *_grid_bound(k, int(grid_size), margin))
    # Coarse grid first: enough for (nearly) orthogonal kernels, whose near-orthogonal bound only
    # multiplies the tiny max ||E|| by 1/(1 - c); the fine grid only when that bound is not tight.
    direct, near_orthogonal = _grid_bound(k, 4 * (d1 + d2), margin)
    if near_orthogonal <= 1 + 1e-3:
        return min(schur, direct, near_orthogonal)
    return min(schur, direct, near_orthogonal, *_grid_bound(k, default_grid_size((k1, k2)), margin))


def weighted_schur_bound(a: torch.Tensor, iters: int = 50) -> float:
    """Upper bound on the spectral norm of symmetric operators with absolute tap sums ``a``
    (groups, c, c), float64: max_i (a q)_i / q_i for any positive q (weighted Schur test). q: the
    better of the Perron vector from ``eigh`` (exact up to rounding; a is symmetric) and power
    iteration, so the bound is the Perron root of a up to rounding. Any positive q is sound, so
    neither choice can make the bound wrong, only looser."""
    def ratio(q: torch.Tensor) -> float:
        q = q.abs() + 1e-12 * q.abs().amax(-1, keepdim=True) + 1e-300  # stays positive
        return ((a @ q[..., None])[..., 0] / q).amax(-1)

    _, vectors = torch.linalg.eigh(a)
    by_eigh = ratio(vectors[..., -1])
    q = torch.ones(a.shape[:-1], dtype=a.dtype)
    for _ in range(iters):
        aq = (a @ q[..., None])[..., 0]
        q = aq / aq.amax(-1, keepdim=True).clamp_min(1e-300) + 1e-12
    by_power = ratio(q)
    return torch.minimum(by_eigh, by_power).max().item() * (1 + _EIG_MARGIN)


def _grid_bound(k: torch.Tensor, n: int, margin: float) -> tuple[float, float]:
    """(direct, near-orthogonal) bounds of step 4 on an n x n grid, for a float64 polyphase kernel
    of shape (groups, co, ci, k1, k2)."""
    _, co, ci, k1, k2 = k.shape
    d1, d2 = k1 - 1, k2 - 1
    c = 0.5 * (math.pi * (d1 + d2) / n) ** 2
    if n < max(k1, k2) or c >= 0.5:
        raise ValueError(f"grid_size={n} too small for a {k1}x{k2} polyphase kernel")
    # Grid: all w1, w2 in [0, pi] (real kernel: the symbol at -w is the conjugate, same norm).
    sym = torch.fft.rfft2(k, s=(n if d1 else 1, n if d2 else 1))  # (g, co, ci, n1, n2)
    sym = sym.permute(0, 3, 4, 1, 2)
    gram = sym @ sym.mH if co <= ci else sym.mH @ sym
    eig = torch.linalg.eigvalsh(gram)
    direct = (eig.max().item() + margin) / (1 - c)
    near_orthogonal = 1 + ((eig - 1).abs().max().item() + margin) / (1 - c)
    return math.sqrt(direct) * (1 + SAFETY_MARGIN), math.sqrt(near_orthogonal) * (1 + SAFETY_MARGIN)


def check_circular_input(
    size: tuple[int, int], out_size: tuple[int, int], stride: tuple[int, int], layer: str
) -> None:
    """Raise ValueError unless circular padding keeps the conv a window of a torus convolution.

    Needed for the bound (and for orthogonality): each spatial size divisible by the stride, and at
    most size/stride output positions per axis (otherwise wrapped pixels are counted twice).
    """
    for axis, (n, m, s) in enumerate(zip(size, out_size, stride)):
        if n % s:
            raise ValueError(
                f"{layer}: circular padding with stride {s} needs spatial sizes divisible by the "
                f"stride; got size {n} on axis {axis}. Pad or crop the input, or use padding_mode='zeros'."
            )
        if m > n // s:
            raise ValueError(
                f"{layer}: circular padding produces {m} outputs on axis {axis} from {n} inputs at "
                f"stride {s}: wrapped pixels are used twice and the layer is not 1-Lipschitz. "
                "Use a smaller padding (kernel_size // 2)."
            )
