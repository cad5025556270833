"""lipnet.certify: certified robustness from sound Lipschitz bounds (installed as ``lipnet.certify``).

``network_lipschitz_bound`` (sound) and ``lipschitz_lower_bound`` (empirical, beside it);
``certified_radius`` = margin / (sqrt(2) L); ``certified_accuracy`` over a loader; ``pgd_l2``, an
L2 attack for empirical robustness and soundness checks. ``ConformalClassifier``: split conformal
prediction sets that keep coverage under L2 attacks (``lipnet.certify.conformal``).
"""

from lipnet.certify.attacks import pgd_l2, robust_accuracy
from lipnet.certify.conformal import ConformalClassifier, ConformalReport
from lipnet.certify.lipschitz import network_lipschitz_bound
from lipnet.nn.report import lipschitz_lower_bound
from lipnet.certify.radius import CertificationReport, certified_accuracy, certified_radius, float_evaluation_slack

__all__ = ["CertificationReport", "ConformalClassifier", "ConformalReport", "certified_accuracy", "certified_radius",
           "float_evaluation_slack", "lipschitz_lower_bound",
           "network_lipschitz_bound", "pgd_l2", "robust_accuracy"]
