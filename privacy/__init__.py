"""lipnet.privacy: clipping-free DP-SGD (installed as ``lipnet.privacy``).

Analytic per-sample gradient-norm bounds, Poisson sampling and opacus accounting land here (issue #6).
"""
