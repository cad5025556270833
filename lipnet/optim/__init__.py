"""Optimizers on the ``lipnet.ortho`` core.

* :class:`TurboMuon` -- momentum -> the core's Turbo orthogonalization -> update (Muon), with
  optional NorMuon normalization; same-shape matrices in one batched call, sharded under DDP.
* :class:`SchattenMuon` -- Schatten-p descent U S^(1/p) V^T (p = 1 SGD ... p = inf Muon), p fixed or
  chosen per layer by the paper's one-step regression criterion; optional Adam / MuAdam preconditioning;
  :class:`KappaPin`, the paper repository's step size (Muon's at p = inf, Adam's at p = 1).
* :func:`schatten_update` -- U S^(1/p) V^T of stacks of matrices from one small-side eigh.
* :func:`split_params` -- hidden matrices to TurboMuon, the rest (biases, embeddings, head) to AdamW.
* :class:`CombinedOptimizer` -- such a pair as one optimizer (one scheduler, one checkpoint).
"""

from .combined import CombinedOptimizer
from .muon import ADJUST_LR, TurboMuon, lr_scale, normuon_normalize, split_params
from .schatten import KappaPin, SchattenMuon, schatten_update

__all__ = ["ADJUST_LR", "CombinedOptimizer", "KappaPin", "SchattenMuon", "TurboMuon", "lr_scale", "normuon_normalize", "schatten_update",
           "split_params"]
