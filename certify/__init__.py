"""lipnet.certify: certified robustness from sound Lipschitz bounds (installed as ``lipnet.certify``).

Certified radii, certified accuracy, network Lipschitz bounds and robust conformal prediction land
here (issues #4, #5); they divide by :func:`lipnet.ortho.spectral_norm_bound`-based bounds.
"""
