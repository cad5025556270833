"""Optimizers on the ``lipnet.ortho`` core.

* :class:`TurboMuon` -- momentum -> the core's Turbo orthogonalization -> update (Muon), with
  optional NorMuon normalization; same-shape matrices in one batched call, sharded under DDP.
* :func:`split_params` -- hidden matrices to TurboMuon, the rest (biases, embeddings, head) to AdamW.
"""

from .muon import ADJUST_LR, TurboMuon, lr_scale, normuon_normalize, split_params

__all__ = ["ADJUST_LR", "TurboMuon", "lr_scale", "normuon_normalize", "split_params"]
