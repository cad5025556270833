"""Clipping-free DP-SGD on two gloo ranks: one Poisson batch split across ranks, noise added once
(in distribution), gradients summed, identical weights everywhere."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lipnet.nn as ln
from lipnet.distributed import destroy_distributed, init_distributed, launch
from lipnet.privacy import PrivateTrainer, precompute_frozen_prefix
from helpers import blobs, small_model

SIGMA = 3.0


def _trainer(model: nn.Module, sigma: float, lr: float) -> PrivateTrainer:
    return PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=lr), blobs(400),
                          loss=ln.LipschitzCrossEntropy(), input_bound=8.0, target_delta=1e-4, noise_multiplier=sigma,
                          sample_rate=0.1, seed=3, progress=False)


def _noiseless_run() -> tuple[dict, list[int]]:
    model = small_model().double()  # fp64: the comparison with one process is not drowned by fp32 rounding
    trainer = _trainer(model, 1e-12, 0.5)
    sizes = []
    for _, (x, y) in zip(range(3), trainer.loader):
        sizes.append(len(y))
        trainer.step(x, y)
    return {k: v.clone() for k, v in model.state_dict().items()}, sizes


def _linear() -> nn.Sequential:
    torch.manual_seed(5)
    return nn.Sequential(ln.InputNormalization((0.5,)), ln.Flatten(), nn.Linear(64, 2))


def _rank_job(out_dir: str) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed()
    torch.manual_seed(100 + ctx.rank)  # different init per rank: the trainer must broadcast rank 0's
    state, sizes = _noiseless_run()
    # noise: lr 0, one step on this rank's half of a fixed batch
    ds = blobs(400)
    x, y = ds.images[:64].float() / 255, ds.labels[:64]
    model = _linear()
    trainer = _trainer(model, SIGMA, 0.0)
    trainer.step(x[ctx.rank::2], y[ctx.rank::2])
    # a frozen prefix initialized differently on each rank: its features must still be rank 0's everywhere
    torch.manual_seed(200 + ctx.rank)
    frozen_model = nn.Sequential(ln.InputNormalization((0.5,)), nn.Conv2d(1, 2, 3, padding=1).requires_grad_(False),
                                 ln.Flatten(), nn.Linear(128, 2))
    features = precompute_frozen_prefix(frozen_model, ds, 8.0, progress=False).dataset.features[:8]
    torch.save({"state": state, "sizes": sizes, "grad": model[2].weight.grad.clone(),
                "total": trainer.sensitivity().total, "expected": trainer.expected_batch_size, "features": features},
               f"{out_dir}/rank{ctx.rank}.pt")
    destroy_distributed()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dp_ddp")
    launch(_rank_job, 2, args=(str(out),))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_ranks_equal_one_process_without_noise(ranks):
    torch.manual_seed(100)
    state, sizes = _noiseless_run()
    assert [a + b for a, b in zip(ranks[0]["sizes"], ranks[1]["sizes"])] == sizes  # one Poisson batch, split
    for k, v in state.items():
        torch.testing.assert_close(ranks[1]["state"][k], ranks[0]["state"][k], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["state"][k], v, rtol=1e-9, atol=1e-10)


def test_two_ranks_add_the_noise_of_one_step(ranks):
    ds = blobs(400)
    x, y = ds.images[:64].float() / 255, ds.labels[:64]
    reference = _linear()
    ln.LipschitzCrossEntropy(reduction="sum")(reference(ln.L2BallProjection(8.0)(x)), y).backward()
    clean = reference[2].weight.grad / ranks[0]["expected"]
    torch.testing.assert_close(ranks[0]["grad"], ranks[1]["grad"], rtol=0, atol=0)  # summed: the same on both
    std = (ranks[0]["grad"] - clean).std().item()
    assert std == pytest.approx(SIGMA * ranks[0]["total"] / ranks[0]["expected"], rel=0.15)
    assert not math.isclose(std, SIGMA * ranks[0]["total"] / ranks[0]["expected"] * math.sqrt(2), rel_tol=0.15)


def test_frozen_prefix_features_agree_across_ranks(ranks):
    torch.testing.assert_close(ranks[0]["features"], ranks[1]["features"], rtol=0, atol=0)
    assert ranks[0]["features"].abs().sum() > 0
