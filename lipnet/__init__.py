"""lipnet: 1-Lipschitz / orthogonal neural networks that come with guarantees."""

from . import ortho
from .ortho import orthogonalize, power_iteration, spectral_norm_bound

__version__ = "0.1.0"

__all__ = ["ortho", "orthogonalize", "power_iteration", "spectral_norm_bound", "__version__"]
