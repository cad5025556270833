"""Multi-process training with ``torch.distributed``, torchrun-compatible.

* :func:`init_distributed` / :func:`destroy_distributed` -- the process group from torchrun's
  environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); nccl on GPU, gloo on CPU.
  Without WORLD_SIZE (or WORLD_SIZE=1) nothing is initialized: single-process code runs unchanged.
* :func:`launch` -- run a function in N local processes with that same environment (what
  ``torchrun --nproc-per-node N`` does), for ``lipnet train --nproc N`` and the tests.
* :class:`ShardedBatchLoader` -- every rank's share of the same global batches.
* :func:`shard_bounds` / :func:`compute_sharded` -- this rank's share of a stack of matrices,
  computed here and all-gathered (the optimizers' sharded steps).
* :func:`wrap_ddp`, :func:`all_gather_stack`, :func:`all_reduce_mean`, :func:`world`.
"""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .validate import positive_int

_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size`` (0 of 1 when not distributed)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        """True on the rank that logs, evaluates and writes checkpoints (rank 0)."""
        return self.rank == 0


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) when none is initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str | torch.device = "cpu", backend: str | None = None) -> DistributedContext:
    """Initialize the default process group from torchrun's environment variables.

    With WORLD_SIZE unset or 1, returns a single-process context and initializes nothing. Otherwise
    every torchrun variable must be set (ValueError naming the missing ones); ``device="cuda"``
    becomes ``cuda:LOCAL_RANK`` (and is made current); ``backend`` defaults to nccl for CUDA, gloo
    otherwise. Idempotent: an already initialized group is reused.
    """
    device = torch.device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistributedContext(0, 1, 0, device, None)
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set "
                         "(start with torchrun or lipnet.distributed.launch)")
    rank, world_size, local_rank = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return DistributedContext(rank, world_size, local_rank, device, dist.get_backend())


def destroy_distributed(*, barrier: bool = True) -> None:
    """Tear down the default process group if one is initialized (safe to call always).
    With ``barrier`` (the success path) all ranks meet first: a rank that destroys its group while
    a peer's collective is still in flight leaves gloo worker threads to die at interpreter exit
    (SIGABRT). Pass ``barrier=False`` on an error path, where a peer may never arrive."""
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launched(local_rank: int, fn: Callable, nproc: int, port: int, args: Sequence) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fn(*args)
    gc.collect()  # DDP reducers still referencing the group go before it does
    destroy_distributed()


def launch(fn: Callable, nproc: int, args: Sequence = (), *, port: int | None = None) -> None:
    """Run ``fn(*args)`` in ``nproc`` fresh local processes (spawned) with torchrun's environment,
    so ``fn`` calls :func:`init_distributed` exactly as under ``torchrun --nproc-per-node nproc``.
    ``fn`` and ``args`` must be picklable (a module-level function). Blocks until all exit; an
    exception in any process is re-raised here (``torch.multiprocessing.ProcessRaisedException``)."""
    positive_int(nproc, "nproc")
    port = _free_port() if port is None else port
    torch.multiprocessing.spawn(_launched, args=(fn, nproc, port, tuple(args)), nprocs=nproc, join=True)


def wrap_ddp(model: nn.Module, ctx: DistributedContext) -> nn.Module:
    """``DistributedDataParallel(model)`` on ``ctx.device`` when distributed, else ``model`` itself.
    DDP broadcasts rank 0's parameters (the raw ones of parametrized layers) and buffers (e.g.
    ``BatchCentering.running_mean``) at wrapping and its buffers at every forward."""
    if ctx.world_size == 1:
        return model
    model = model.to(ctx.device)
    return nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def all_gather_stack(x: torch.Tensor) -> torch.Tensor:
    """Concatenation along dim 0 of ``x`` from every rank, in rank order (``x`` itself when not
    distributed). ``x`` must have the same shape and dtype on every rank."""
    _, world_size = world()
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def shard_bounds(count: int) -> tuple[int, int, int]:
    """(chunk, lo, hi): this rank computes matrices lo .. hi - 1 of a stack of ``count``, rank r the
    r-th run of chunk = ceil(count / world_size) (the last ranks' runs may be short or empty)."""
    rank, world_size = world()
    chunk = -(-count // world_size)
    return chunk, min(rank * chunk, count), min((rank + 1) * chunk, count)


def compute_sharded(U: torch.Tensor, dtype: torch.dtype, compute: Callable) -> torch.Tensor:
    """``compute(part, lo, hi)`` (results in ``dtype``) on this rank's share U[lo:hi] of the stack U
    (B, m, n), the shares all-gathered in rank order: every rank gets all B results."""
    chunk, lo, hi = shard_bounds(len(U))
    # a rank with nothing to compute still takes part in the collective gather
    part = compute(U[lo:hi], lo, hi).to(dtype) if hi > lo else U.new_zeros(0, *U.shape[1:], dtype=dtype)
    if len(part) < chunk:
        part = torch.cat([part, part.new_zeros(chunk - len(part), *part.shape[1:])])
    return all_gather_stack(part)[:len(U)]


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenation along dim 0 of ``x`` from every rank, in rank order, where the ranks' ``x`` may
    differ in their first dimension only (``x`` itself when not distributed)."""
    _, world_size = world()
    if world_size == 1:
        return x
    sizes = all_gather_stack(torch.tensor([len(x)], device=x.device)).tolist()
    padded = torch.cat([x, x.new_zeros(max(sizes) - len(x), *x.shape[1:])]) if len(x) < max(sizes) else x
    parts = all_gather_stack(padded).split(max(sizes))
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def all_reduce_mean(value: float) -> float:
    """Mean of a Python number over the ranks (the number itself when not distributed)."""
    _, world_size = world()
    if world_size == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / world_size


class ShardedBatchLoader:
    """This rank's share of the global batches that ``lipnet.data.BatchLoader`` would produce.

    Every rank draws the same permutation (same ``seed``, one draw per epoch), cuts it into global
    batches of ``batch_size`` and takes its contiguous part (``tensor_split``: rank r gets the r-th
    of ``world_size`` near-equal parts). With DDP's gradient averaging and a mean loss, a step then
    uses the gradient of the whole global batch -- exactly when parts are equal, hence
    ``batch_size % world_size == 0`` is required; a final partial batch may split unevenly and is
    dropped if it has fewer than ``world_size`` examples (or always, with ``drop_last``).
    ``len()`` (number of batches) is the same on every rank. Yields float32 images in [0, 1].
    """

    def __init__(self, dataset, batch_size: int, rank: int | None = None, world_size: int | None = None, *,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                 device: str | torch.device = "cpu") -> None:
        default_rank, default_world = world()
        rank = default_rank if rank is None else rank
        world_size = default_world if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size <= 0 or batch_size % world_size:
            raise ValueError(f"batch_size must be a positive multiple of world_size={world_size}, got {batch_size}")
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.shuffle, self.drop_last, self.device = shuffle, drop_last, device
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.dataset)
        full, rest = divmod(n, self.batch_size)
        return full + (1 if rest >= self.world_size and not self.drop_last else 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.dataset)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size].tensor_split(self.world_size)[self.rank]
            x = self.dataset.images[idx].to(self.device, non_blocking=True).float().div_(255)
            yield x, self.dataset.labels[idx].to(self.device, non_blocking=True)


__all__ = ["DistributedContext", "ShardedBatchLoader", "all_gather_rows", "all_gather_stack", "all_reduce_mean",
           "compute_sharded", "destroy_distributed", "init_distributed", "launch", "shard_bounds", "world", "wrap_ddp"]
