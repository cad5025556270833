"""The orthogonalization core. Every lipnet layer and optimizer calls these; nothing re-implements them.

* :func:`orthogonalize` -- approximate polar factor of stacks of matrices (turbo, ns5, convergent,
  bjorck, svd).
* :func:`retract` / :func:`retract_` -- back onto the orthogonal matrices from nearby (a few
  Newton-Schulz quintic steps, converging fallbacks far from them): the layers' stored factors.
* :func:`spectral_norm_bound` -- guaranteed upper bound on sigma_max (what certificates divide by).
* :func:`power_iteration` -- lower estimate of sigma_max, for comparison only.
* :func:`aol_rescale` -- AOL rescaling, spectral norm <= 1 by construction.
"""

from .bounds import SAFETY_MARGIN, power_iteration, spectral_norm_bound
from .polar import METHODS, POLAR_BACKWARD_METHODS, aol_rescale, orthogonalize
from .retraction import RETRACTION_TOLERANCE, retract, retract_, tangent_projection

__all__ = [
    "METHODS",
    "POLAR_BACKWARD_METHODS",
    "RETRACTION_TOLERANCE",
    "SAFETY_MARGIN",
    "aol_rescale",
    "orthogonalize",
    "power_iteration",
    "retract",
    "retract_",
    "spectral_norm_bound",
    "tangent_projection",
]
