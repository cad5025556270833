"""The orthogonalization core. Every lipnet layer and optimizer calls these; nothing re-implements them.

* :func:`orthogonalize` -- approximate polar factor of stacks of matrices (turbo, ns5, convergent,
  bjorck, svd).
* :func:`spectral_norm_bound` -- guaranteed upper bound on sigma_max (what certificates divide by).
* :func:`power_iteration` -- lower estimate of sigma_max, for comparison only.
* :func:`aol_rescale` -- AOL rescaling, spectral norm <= 1 by construction.
"""

from .bounds import SAFETY_MARGIN, power_iteration, spectral_norm_bound
from .polar import METHODS, aol_rescale, orthogonalize

__all__ = [
    "METHODS",
    "SAFETY_MARGIN",
    "aol_rescale",
    "orthogonalize",
    "power_iteration",
    "spectral_norm_bound",
]
