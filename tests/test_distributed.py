"""Two gloo ranks on CPU (one launch for the whole module) against single-process runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipnet.nn as ln
import lipnet.optim.muon as muon_mod
from lipnet.data import BatchLoader, ImageDataset
from lipnet.distributed import (ShardedBatchLoader, all_gather_stack, all_reduce_mean, destroy_distributed,
                                init_distributed, launch, world, wrap_ddp)
from lipnet.optim import SchattenMuon, TurboMuon, split_params

WORLD = 2
OPT_SHAPES = [(6, 10), (6, 10), (6, 10), (5, 2, 2, 2), (7, 3), (7, 3)]  # stacks of 3 (padded), 1 (< ranks), 2
STEPS = 3


# ------------------------------------------------------------------ shared by the ranks and the reference
def _optimizer_run(normuon: bool) -> list[torch.Tensor]:
    """TurboMuon on fixed params with gradients identical on every rank (as after DDP's all-reduce)."""
    g = torch.Generator().manual_seed(7)
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in OPT_SHAPES]
    opt = TurboMuon(params, lr=0.05, weight_decay=0.01, normuon=normuon)
    for _ in range(STEPS):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params]


def _layer_model(centering: bool) -> nn.Sequential:
    layers = [ln.InputNormalization((0.5, 0.5)), ln.OrthoConv2d(2, 4, 3, padding="same", padding_mode="zeros")]
    layers += [ln.BatchCentering(4)] if centering else []
    layers += [ln.MaxMin(), ln.AOLConv2d(4, 4, 3, padding=1), ln.MaxMin(), ln.L2NormPool2d(2), ln.Flatten(),
               ln.SLLBlock(16, 8), ln.AOLLinear(16, 12), ln.MaxMin(), ln.OrthoLinear(12, 3)]
    return nn.Sequential(*layers).double()  # fp64: the comparison with one process is not drowned by fp32 rounding


def _layer_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.rand(STEPS, 8, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (STEPS, 8), generator=g)


def _train(model: nn.Module, forward: nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> None:
    hidden, rest = split_params(model)
    opts = [TurboMuon(hidden, lr=0.05), torch.optim.AdamW(rest, lr=1e-2)]
    for x, y in zip(xs, ys):
        loss = F.cross_entropy(forward(x), y)
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()


def _schatten_model() -> nn.Sequential:
    torch.manual_seed(5)  # same init everywhere (no DDP broadcast needed)
    return nn.Sequential(nn.Linear(12, 32, bias=False), nn.Tanh(), nn.Linear(32, 32, bias=False), nn.Tanh(),
                         nn.Linear(32, 32, bias=False), nn.Tanh(), nn.Linear(32, 4, bias=False)).double()


def _schatten_data() -> tuple[torch.Tensor, torch.Tensor]:
    """A regression whose two half-batches (the ranks' parts) have very different input spectra:
    rank 0's inputs are multiples of one vector, rank 1's white -- alone, each half drives p elsewhere."""
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(STEPS, 64, 12, generator=g, dtype=torch.float64)
    xs[:, :32] = xs[:, :1] * torch.randn(STEPS, 32, 1, generator=g, dtype=torch.float64)
    return xs, torch.tanh(xs @ torch.randn(12, 4, generator=g, dtype=torch.float64))


def _schatten_train(model: nn.Module, forward: nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> list[float]:
    """Adaptive-p SchattenMuon with the criterion and the activation statistics at every step;
    returns the p each matrix chose last."""
    opt = SchattenMuon(model.parameters(), lr=0.02, p="adaptive", pmin=1.1, pmax=8.0, p_every=1, act_every=1,
                       act_rows=64)
    opt.watch(model)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        F.mse_loss(forward(x), y).backward()
        opt.step()
    return opt.current_p()


# ------------------------------------------------------------------------------------- the rank's job
def _rank_job(out_dir: str) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed()
    calls = []
    real = muon_mod.orthogonalize
    muon_mod.orthogonalize = lambda X, *a, **k: calls.append(tuple(X.shape)) or real(X, *a, **k)
    result = {"rank": ctx.rank, "world": world(), "backend": ctx.backend,
              "opt": {normuon: _optimizer_run(normuon) for normuon in (False, True)}, "calls": list(calls)}
    muon_mod.orthogonalize = real
    gathered = all_gather_stack(torch.full((1, 2), float(ctx.rank)))
    result["gathered"], result["mean"] = gathered, all_reduce_mean(ctx.rank + 1.0)
    xs, ys = _layer_data()
    part = slice(ctx.rank * 4, (ctx.rank + 1) * 4)  # this rank's half of every global batch
    for centering in (False, True):
        torch.manual_seed(100 + ctx.rank)  # different init per rank: DDP must broadcast rank 0's
        model = _layer_model(centering)
        ddp = wrap_ddp(model, ctx)
        _train(model, ddp, xs[:, part], ys[:, part])
        trained = {k: v.clone() for k, v in model.state_dict().items()}
        ddp.eval()
        with torch.no_grad():
            ddp(xs[0, part])  # a DDP forward broadcasts rank 0's buffers
        result[f"layers_{centering}"] = (trained, model.state_dict())
    model = _schatten_model()
    computed = []
    real_schatten = SchattenMuon._schatten
    SchattenMuon._schatten = lambda self, U, *a: computed.append(len(U)) or real_schatten(self, U, *a)
    xs, ys = _schatten_data()
    half = slice(ctx.rank * 32, (ctx.rank + 1) * 32)
    p_chosen = _schatten_train(model, wrap_ddp(model, ctx), xs[:, half], ys[:, half])
    SchattenMuon._schatten = real_schatten
    result["schatten"] = ({k: v.clone() for k, v in model.state_dict().items()}, p_chosen, computed)
    torch.save(result, f"{out_dir}/rank{ctx.rank}.pt")
    destroy_distributed()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    launch(_rank_job, WORLD, args=(str(out),))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_launch_gives_each_rank_torchrun_env_and_gloo(ranks):
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == (r["rank"], 2) for r in ranks)
    assert all(r["backend"] == "gloo" for r in ranks)
    for r in ranks:
        assert torch.equal(r["gathered"], torch.tensor([[0.0, 0.0], [1.0, 1.0]])) and r["mean"] == 1.5


@pytest.mark.parametrize("normuon", [False, True])
def test_turbomuon_sharded_equals_single_process(ranks, normuon):
    single = _optimizer_run(normuon)
    for r in ranks:
        for got, want in zip(r["opt"][normuon], single):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # each rank orthogonalized only its share: ceil(3/2), ceil(1/2), ceil(2/2) matrices per stack
    assert sorted(ranks[0]["calls"]) == sorted([(2, 6, 10), (1, 5, 8), (1, 7, 3)] * STEPS * 2)


@pytest.mark.parametrize("centering", [False, True])
def test_lipnet_layers_train_under_ddp_identically_across_ranks(ranks, centering):
    trained = [r[f"layers_{centering}"][0] for r in ranks]
    keys = [k for k in trained[0] if "running_mean" not in k]
    assert any(k.endswith("original") for k in keys)
    for k in keys:  # parameters (raw parametrized ones included) stay identical on both ranks
        torch.testing.assert_close(trained[1][k], trained[0][k], rtol=0, atol=0)
    synced = [r[f"layers_{centering}"][1] for r in ranks]
    for k in synced[0]:  # after a DDP forward every buffer equals rank 0's
        torch.testing.assert_close(synced[1][k], synced[0][k], rtol=0, atol=0)
    if centering:  # each rank updated its running mean on its own half-batch: they differed before the sync
        assert not torch.equal(trained[0]["2.running_mean"], trained[1]["2.running_mean"])
        return
    # no batch coupling: 2 ranks x half-batches == one process on the full batches
    torch.manual_seed(100)
    model = _layer_model(False)
    xs, ys = _layer_data()
    _train(model, model, xs, ys)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(trained[0][k], v, rtol=1e-9, atol=1e-10)


def test_schatten_muon_sharded_with_gathered_activations_equals_one_process(ranks):
    model = _schatten_model()
    xs, ys = _schatten_data()
    p_single = _schatten_train(model, model, xs, ys)
    assert len({round(p, 4) for p in p_single}) > 1  # the criterion moved: the comparison means something
    for r in ranks:
        weights, p_chosen, _ = r["schatten"]
        assert p_chosen == p_single  # every rank picks the p one process picks
        for k, v in model.state_dict().items():
            torch.testing.assert_close(weights[k], v, rtol=1e-9, atol=1e-10)
    # stacks of 1, 2 and 1 matrices: rank 0 computes one of each, rank 1 only one of the pair
    assert ranks[0]["schatten"][2] == [1, 1, 1] * STEPS and ranks[1]["schatten"][2] == [1] * STEPS


# --------------------------------------------------------------------------------- no process group
def _dataset(n: int) -> ImageDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ImageDataset(images, torch.arange(n), None)


@pytest.mark.parametrize("n,batch", [(20, 6), (23, 4), (9, 4)])
def test_sharded_loader_parts_make_up_the_global_batches(n, batch):
    data = _dataset(n)
    reference = list(BatchLoader(data, batch, shuffle=True, generator=torch.Generator().manual_seed(3)))
    shards = [list(ShardedBatchLoader(data, batch, r, 2, shuffle=True, seed=3)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(ShardedBatchLoader(data, batch, 0, 2))
    for b, (x, y) in enumerate(reference[:len(shards[0])]):
        torch.testing.assert_close(torch.cat([shards[0][b][0], shards[1][b][0]]), x)
        assert torch.equal(torch.cat([shards[0][b][1], shards[1][b][1]]), y)
        if len(y) == batch:
            assert len(shards[0][b][1]) == len(shards[1][b][1]) == batch // 2
    assert len(shards[0]) == len(reference) - (1 if 0 < n % batch < 2 else 0)


def test_sharded_loader_reshuffles_each_epoch_and_checks_arguments():
    loader = ShardedBatchLoader(_dataset(16), 4, 0, 2, shuffle=True, seed=0)
    first, second = [y for _, y in loader], [y for _, y in loader]
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(ValueError, match="multiple"):
        ShardedBatchLoader(_dataset(16), 5, 0, 2)
    with pytest.raises(ValueError, match="rank"):
        ShardedBatchLoader(_dataset(16), 4, 2, 2)


def test_init_distributed_without_torchrun_env_is_single_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main) == (0, 1, None, True)
    model = nn.Linear(2, 2)
    assert wrap_ddp(model, ctx) is model and world() == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK"):
        init_distributed()
    with pytest.raises(ValueError, match="nproc"):
        launch(print, 0)
