"""A fixed, 1-Lipschitz wavelet scattering transform (Mallat's scattering, order 2).

Why it is here: a data-independent feature extractor with a *proven* Lipschitz bound. Tramer &
Boneh ("Differentially private learning needs better features", 2021) showed that scattering
features plus a trained head beat end-to-end CNNs under differential privacy; in lipnet the
transform has no trainable parameters, so private training (``lipnet.privacy``) spends the whole
noise budget on the head, and certificates go through it like through any other layer.

    S0 = s * (phi * x)[::s, ::s]                        s = 2^J
    S1 = s * (phi * |psi_l1 * x|)[::s, ::s]             l1 = (j1, theta1), J * L paths
    S2 = s * (phi * ||psi_l1 * x| * psi_l2|)[::s, ::s]  j2 > j1, L^2 J (J - 1) / 2 paths

per input channel; output (B, C * (1 + J L + L^2 J (J-1) / 2), ceil(H / s), ceil(W / s)).
Convolutions are circular on an M_h x M_w grid (M >= H + 3 * 2^J, a multiple of s) applied to the
zero-extended input and cropped back to H x W -- i.e. zero-padded convolutions.

Lipschitz bound (L2, real inputs): let T be the linear map U -> (s (phi * U)[::s, ::s], psi_l * U
for every l). If ||T|| <= 1 then, with || |a| - |b| || <= ||a - b|| for the complex modulus, each
layer splits the energy of its input difference into an output part and the parts it passes on
(U -> |psi_l * U|) without creating any; summing the parts over the two orders gives
||S x - S y|| <= ||T|| ||x - y|| (Mallat 2012, Prop. 2.5, here with the subsampled low-pass).
Cropping / zero extension are coordinate restrictions and embeddings (norm 1), so the bound for
the M grid covers the H x W map. ||T||^2 is computed exactly: T^T T is block-diagonal in the
Fourier basis, one s^2 x s^2 block per class of frequencies aliased by the subsampling, equal to
diag(sum_l sym|psi_l^|^2) + v v^T with v = phi^ on the class (sym: the average of w and -w, exact
for real inputs since |x^(w)| = |x^(-w)|); its largest eigenvalue is taken in float64. The filters
are scaled so that ||T|| <= 1 / (1 + 1e-6), and ``lipschitz_bound`` reports ||T|| recomputed from the
stored (float32-rounded) filters, times (1 + 1e-6) for eigvalsh's rounding. As for every lipnet layer,
the bound is for the map in exact arithmetic; the FFTs' float32 rounding is not part of it.

Filters: Morlet-like wavelets defined in the Fourier domain (sigma 0.8, centre 3 pi / 4 at scale
2^j, L orientations in [0, pi), aspect 0.5, zero mean), a Gaussian low-pass at scale 2^J, then
divided by the square root of their Littlewood-Paley sum (floored) so the bank is close to a tight
frame -- features keep most of the input's energy, which keeps the bound tight (adversarial pairs
reach >= 0.9 of it in tests/test_scattering.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._checks import check_input

SIGMA, XI, SLANT = 0.8, 3 * math.pi / 4, 0.5
ROUNDING_MARGIN = 1e-6


def _grid_size(n: int, scale: int) -> int:
    """Smallest M >= n + 3 * scale, a multiple of ``scale``, with only factors 2, 3, 5 (fast FFTs)."""
    m = n + 3 * scale
    while True:
        m += (-m) % scale
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += scale


def _frequencies(m_h: int, m_w: int) -> tuple[torch.Tensor, torch.Tensor]:
    wy = torch.fft.fftfreq(m_h, dtype=torch.float64) * 2 * math.pi
    wx = torch.fft.fftfreq(m_w, dtype=torch.float64) * 2 * math.pi
    return torch.meshgrid(wy, wx, indexing="ij")


def _negate_frequency(t: torch.Tensor) -> torch.Tensor:
    """t(w) -> t(-w) on the FFT grid (index k -> -k mod M)."""
    return torch.roll(torch.flip(t, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))


def _raw_filters(m_h: int, m_w: int, J: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    wy, wx = _frequencies(m_h, m_w)
    psis = []
    for j in range(J):
        vy, vx = wy * 2**j, wx * 2**j
        for theta in (math.pi * l / L for l in range(L)):
            u1 = vx * math.cos(theta) + vy * math.sin(theta)     # along the wave vector
            u2 = -vx * math.sin(theta) + vy * math.cos(theta)    # along the edge
            gabor = torch.exp(-(SIGMA**2 / 2) * ((u1 - XI) ** 2 + (u2 / SLANT) ** 2))
            envelope = torch.exp(-(SIGMA**2 / 2) * (u1**2 + (u2 / SLANT) ** 2))
            psis.append(gabor - math.exp(-(SIGMA**2 / 2) * XI**2) * envelope)  # psi^(0) = 0
    phi = torch.exp(-(SIGMA**2 * 4**J / 2) * (wy**2 + wx**2))
    return phi, torch.stack(psis)


def _alias_blocks(t: torch.Tensor, s: int) -> torch.Tensor:
    """(M_h, M_w) -> ((M_h/s)(M_w/s), s*s): the values on each class of frequencies that subsampling by
    s folds onto one (indices a + (M/s) k, k = 0..s-1, per axis)."""
    m_h, m_w = t.shape
    c_h, c_w = m_h // s, m_w // s
    return t.reshape(s, c_h, s, c_w).permute(1, 3, 0, 2).reshape(c_h * c_w, s * s)


def operator_norm_squared(phi: torch.Tensor, psi: torch.Tensor, s: int) -> float:
    """||T||^2 for T: U -> (s (phi * U)[::s, ::s], psi_l * U), U real on the circular grid (float64,
    exact up to eigvalsh's rounding): the largest eigenvalue of the alias blocks (module docstring)."""
    phi, psi = phi.double(), psi.to(torch.complex128)
    energy = psi.abs().square()
    d = 0.5 * (energy + _negate_frequency(energy)).sum(0)
    D, V = _alias_blocks(d, s), _alias_blocks(phi, s)
    blocks = torch.diag_embed(D) + V.unsqueeze(-1) * V.unsqueeze(-2)
    return float(torch.linalg.eigvalsh(blocks).max())


def scattering_filters(m_h: int, m_w: int, J: int, L: int, floor: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """(phi^, psi^) in float64 on the M_h x M_w FFT grid, scaled so that ||T|| <= 1 / (1 + 1e-6)."""
    phi, psi = _raw_filters(m_h, m_w, J, L)
    lp = phi**2 + 0.5 * (psi**2 + _negate_frequency(psi) ** 2).sum(0)   # Littlewood-Paley sum (real input)
    # Dividing by it makes the bank nearly tight; the floor keeps the few frequencies no wavelet covers
    # (the corners near (pi, pi)) from being amplified into the filters.
    lp = lp.clamp_min(floor * float(lp.max())).sqrt()
    phi, psi = phi / lp, (psi / lp).to(torch.complex128)
    norm = math.sqrt(operator_norm_squared(phi, psi, 2**J))
    return phi / (norm * (1 + ROUNDING_MARGIN)), psi / (norm * (1 + ROUNDING_MARGIN))


class Scattering2d(nn.Module):
    """Fixed order-2 wavelet scattering of (B, C, H, W) (or one (C, H, W)) images; no trainable parameters.

    Guarantee: ``lipschitz_bound(self) <= 1`` is a sound L2 Lipschitz bound for real inputs (proof
    in the module docstring), ``self(0) = 0``. Output (B, C * out_per_channel, ceil(H/2^J), ceil(W/2^J)).

    Args:
        in_channels: C (each channel is scattered separately).
        image_size: (H, W) or an int for square images; inputs must have exactly this size.
        J: number of scales (the output is subsampled by 2^J). L: orientations per scale.
    """

    def __init__(self, in_channels: int, image_size: int | tuple[int, int], J: int = 2, L: int = 8) -> None:
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        for name, v, lo in (("in_channels", in_channels, 1), ("J", J, 1), ("L", L, 1), ("H", h, 1), ("W", w, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"Scattering2d: {name} must be an int >= {lo}, got {v!r}")
        if 2**J > min(h, w):
            raise ValueError(f"Scattering2d: 2^J = {2**J} exceeds the image size {h}x{w}; use a smaller J")
        self.in_channels, self.image_size, self.J, self.L = in_channels, (h, w), J, L
        self.scale = 2**J
        self.grid = (_grid_size(h, self.scale), _grid_size(w, self.scale))
        phi, psi = scattering_filters(*self.grid, J, L)
        self.register_buffer("phi_hat", phi.float())
        self.register_buffer("psi_hat", torch.view_as_real(psi.to(torch.complex64)).contiguous())

    @property
    def out_per_channel(self) -> int:
        J, L = self.J, self.L
        return 1 + J * L + L * L * J * (J - 1) // 2

    @property
    def out_shape(self) -> tuple[int, int, int]:
        s = self.scale
        return (self.in_channels * self.out_per_channel, -(-self.image_size[0] // s), -(-self.image_size[1] // s))

    def _low(self, spectrum: torch.Tensor) -> torch.Tensor:
        """s (phi * U)[::s, ::s] cropped to ceil(H/s) x ceil(W/s), from U's spectrum: the subsampled
        signal's spectrum is the sum of the aliased copies / s^2 (an ifft of size M/s, not M)."""
        s, (m_h, m_w) = self.scale, self.grid
        f = spectrum * self.phi_hat
        f = f.reshape(*f.shape[:-2], s, m_h // s, s, m_w // s).sum(dim=(-4, -2))
        out = torch.fft.ifft2(f).real / s
        return out[..., : self.out_shape[1], : self.out_shape[2]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, "Scattering2d", channels=self.in_channels, ndims=(3, 4))
        if x.dim() == 3:  # one unbatched image (C, H, W), e.g. under torch.func.vmap
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(f"Scattering2d: built for {self.image_size[0]}x{self.image_size[1]} images, "
                             f"got shape {tuple(x.shape)}")
        (h, w), (m_h, m_w), J, L = self.image_size, self.grid, self.J, self.L
        psi = torch.view_as_complex(self.psi_hat)                        # (J L, M_h, M_w)
        X = torch.fft.fft2(x, s=(m_h, m_w))                              # (B, C, M_h, M_w)
        U1 = torch.fft.ifft2(X.unsqueeze(2) * psi).abs()[..., :h, :w]    # (B, C, J L, H, W)
        U1_hat = torch.fft.fft2(U1, s=(m_h, m_w))
        parts = [self._low(X).unsqueeze(2), self._low(U1_hat)]
        for j1 in range(J - 1):  # second order: wavelets of coarser scales j2 > j1 on |psi_(j1, .) * x|
            paths = U1_hat[:, :, j1 * L:(j1 + 1) * L].unsqueeze(3) * psi[(j1 + 1) * L:]   # (B, C, L, (J-j1-1) L, ...)
            U2 = torch.fft.ifft2(paths).abs()[..., :h, :w]
            parts.append(self._low(torch.fft.fft2(U2, s=(m_h, m_w))).flatten(2, 3))
        out = torch.cat(parts, dim=2)                                    # (B, C, paths, H/s, W/s)
        return out.flatten(1, 2)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, image_size={self.image_size}, J={self.J}, L={self.L}"
