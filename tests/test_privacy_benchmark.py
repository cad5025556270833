"""The privacy benchmark's opacus side: its fast-gradient-clipping mode is the same DP-SGD as its hooks mode."""

from __future__ import annotations

import torch

from helpers import load_benchmark


def test_opacus_ghost_clipping_trains_the_same_weights_as_per_sample_hooks():
    bench = load_benchmark("privacy")
    train, _ = bench.get_data("synthetic", None, limit=256)
    cfg = dict(bench.OPACUS_SCATTER, batch=64, lr=2.0, max_grad_norm=0.1)
    bench.scatter_features(train, cfg)  # computed (and cached) before either side seeds its generator
    weights, initial = {}, {}
    for mode in ("hooks", "ghost"):
        side = bench.Opacus(dict(cfg, grad_sample_mode=mode), train, 3.0, 2, "cpu", seed=0)
        initial[mode] = [p.detach().clone() for p in side.model.parameters()]
        losses = [side.epoch() for _ in range(2)]
        assert all(torch.isfinite(torch.tensor(losses)))
        weights[mode] = [p.detach().clone() for p in side.model.parameters()]
        assert side.sigma() > 0 and 0 < side.epsilon() <= 3.0 + 1e-6
    moved = max(float((w - w0).abs().max()) for w, w0 in zip(weights["hooks"], weights["ghost"]))
    assert moved < 1e-5, f"ghost clipping trained other weights than per-sample hooks (max diff {moved:.2e})"
    assert any(not torch.allclose(w, w0) for w, w0 in zip(weights["hooks"], initial["hooks"])), "nothing trained"
