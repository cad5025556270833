"""Dense 1-Lipschitz layers: ``nn.Linear`` constrained by :func:`~lipnet.nn.orthogonal` or :func:`~lipnet.nn.aol`."""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_input
from .parametrizations import DEFAULT_LAYER_METHOD, DEFAULT_PARAMETRIZATION, aol, orthogonal


class OrthoLinear(nn.Linear):
    """Linear layer with a (semi-)orthogonal weight kept by the core.

    Weight (out, in): orthonormal rows if out <= in, orthonormal columns otherwise, so ||W||_2 = 1
    up to the core's convergence. ``parametrization="retraction"`` (default): the parameter is the
    orthogonal factor, retracted in place after each change (within ~1e-6 of orthogonal in fp32,
    any input); ``"polar"``: weight = ``orthogonalize(raw, method, steps)`` on every access
    (``method="convergent"``: within 1e-3 for raw matrices whose AOL-scaled singular values are
    >= 1e-3). See :class:`lipnet.nn.parametrizations.CoreOrthogonalizer`. ``lipschitz_bound``
    certifies the actual weight. Under ``torch.autocast`` the weight is still computed in fp32
    (the core ignores autocast); the matmul runs in autocast's precision. ``state_dict`` holds
    ``parametrizations.weight.original`` and the bias.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 method: str = DEFAULT_LAYER_METHOD, steps: int | None = None,
                 parametrization: str = DEFAULT_PARAMETRIZATION) -> None:
        super().__init__(in_features, out_features, bias=bias)
        nn.init.orthogonal_(self.weight)
        if bias:
            nn.init.zeros_(self.bias)
        orthogonal(self, method=method, steps=steps, parametrization=parametrization)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, type(self).__name__, channels=self.in_features, ndims=(1, 2))
        return super().forward(x)


class AOLLinear(nn.Linear):
    """Linear layer with AOL rescaling: weight = raw * AOL scales, ||W||_2 <= 1 by construction
    (Prach & Lampert 2022). Cheaper than orthogonalization (one Gram matrix), not norm-preserving."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        nn.init.orthogonal_(self.weight)
        if bias:
            nn.init.zeros_(self.bias)
        aol(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, type(self).__name__, channels=self.in_features, ndims=(1, 2))
        return super().forward(x)
