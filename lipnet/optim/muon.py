"""Turbo-Muon (and NorMuon) on the ``lipnet.ortho`` core.

One step, for every parameter W (viewed as an (m, n) matrix: ``W.reshape(len(W), -1)``, so a conv
kernel (out, in, k, k) is (out, in*k*k)) with gradient G:

    B = beta B + (1 - beta) G                       momentum buffer (as ``torch.optim.Muon``)
    U = (1 - beta) G + beta B   if nesterov else B
    O = orthogonalize(U, "turbo", ns_steps)         the core: AOL preconditioning + Newton-Schulz
    (normuon) v = beta2 v + (1 - beta2) mean_j O_ij^2;  O <- O / (sqrt(v_i) + 1e-10), rescaled to its
              Frobenius norm before the division  (NorMuon: per-neuron second moment, row i = neuron)
    W = (1 - lr * weight_decay) W - lr * scale(m, n) * O
    scale = sqrt(max(1, m / n))  ("spectral", Keller Jordan's Muon)  or  0.2 sqrt(max(m, n))  ("rms":
            the update's RMS matches AdamW's, Moonshot / torch.optim.Muon "match_rms_adamw")

Matrices of the same (m, n) are stacked and orthogonalized in one batched call; under
``torch.distributed`` each rank orthogonalizes its share of every stack and the results are
all-gathered (see :func:`lipnet.distributed.compute_sharded`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

from ..distributed import compute_sharded, world
from ..ortho import orthogonalize
from ..validate import finite_nonnegative, positive_int, unit_interval

ADJUST_LR = ("spectral", "rms")
NORMUON_EPS = 1e-10


def lr_scale(m: int, n: int, adjust_lr: str) -> float:
    """Per-matrix factor on ``lr`` for an (m, n) update (see the module docstring)."""
    if adjust_lr == "spectral":
        return math.sqrt(max(1.0, m / n))
    if adjust_lr == "rms":
        return 0.2 * math.sqrt(max(m, n))
    raise ValueError(f"unknown adjust_lr {adjust_lr!r}; expected one of {ADJUST_LR}")


def normuon_normalize(O: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon's neuron-wise normalization of orthogonalized updates ``O`` (..., m, n), in place on
    ``second_moment`` (..., m, 1): v <- beta2 v + (1 - beta2) mean_j O_ij^2, then O / (sqrt(v) + 1e-10)
    rescaled so each matrix keeps the Frobenius norm O had. Returns the new update, computed in
    float32 for half-precision inputs (v is kept in the parameter's dtype, as torch optimizers do)."""
    O = O.float() if O.dtype in (torch.float16, torch.bfloat16) else O
    second_moment.lerp_(O.square().mean(dim=-1, keepdim=True).to(second_moment.dtype), 1 - beta2)
    norm = torch.linalg.matrix_norm(O, keepdim=True)
    O = O / (second_moment.sqrt().to(O.dtype) + NORMUON_EPS)
    return O * (norm / (torch.linalg.matrix_norm(O, keepdim=True) + NORMUON_EPS))


def momentum_directions(state: dict, params: list[torch.Tensor], grads: list[torch.Tensor], beta: float,
                        nesterov: bool) -> list[torch.Tensor]:
    """B = beta B + (1 - beta) G in ``state[p]["momentum_buffer"]`` (as ``torch.optim.Muon``); returns
    the update directions (1 - beta) G + beta B (nesterov) or the buffers B themselves."""
    for p in params:  # not setdefault: its default argument would allocate a buffer every step
        if "momentum_buffer" not in state[p]:
            state[p]["momentum_buffer"] = torch.zeros_like(p)
    bufs = [state[p]["momentum_buffer"] for p in params]
    torch._foreach_lerp_(bufs, grads, 1 - beta)
    return torch._foreach_lerp(grads, bufs, beta) if nesterov else bufs


def same_shape_stacks(params: list[torch.Tensor]) -> dict[tuple, list[int]]:
    """{(m, n, dtype, device): indices of the parameters viewed as (m, n) matrices}: one batched
    orthogonalization per key."""
    stacks: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        stacks[(len(p), p[0].numel(), p.dtype, p.device)].append(i)
    return stacks


def apply_updates(params: list[torch.Tensor], O: torch.Tensor, lr: float, weight_decay: float,
                  scale: float) -> None:
    """W = (1 - lr * weight_decay) W - lr * scale * O_i for each parameter and matrix O_i of the stack O."""
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_add_(params, [o.view_as(p).to(p.dtype) for o, p in zip(O.unbind(), params)], alpha=-lr * scale)


class TurboMuon(torch.optim.Optimizer):
    """Muon with the core's Turbo orthogonalization (AOL-preconditioned Newton-Schulz, 4 steps),
    optionally NorMuon's neuron-wise normalization. For parameters with >= 2 dims only (use
    :func:`split_params` and AdamW for the rest).

    Guarantees: the update of each matrix is ``scale * orthogonalize(U, "turbo", ns_steps)``
    (singular values in the core's turbo band, [0.778, 1.222] for AOL-scaled singular values
    >= 3e-3) -- computed per matrix even though same-shape matrices share one batched call; under
    ``torch.distributed`` the result equals the single-process one to float tolerance, *assuming
    gradients are identical on every rank* (as after DDP's all-reduce). Parameters whose ``grad``
    is None are skipped (under DDP this must hold on all ranks alike). A zero gradient gives a zero
    update; no host synchronization happens inside ``step``.

    Args:
        lr: learning rate (>= 0). momentum: beta in [0, 1). nesterov: Nesterov momentum.
        weight_decay: decoupled, W *= 1 - lr * weight_decay (>= 0).
        ns_steps: Newton-Schulz steps (positive int; 4 = the derived Turbo schedule).
        normuon: add NorMuon's per-neuron second-moment normalization (``beta2``).
        adjust_lr: ``"spectral"`` (sqrt(max(1, m/n)), Keller Jordan's) or ``"rms"`` (0.2 sqrt(max(m, n))).
        low_precision: passed to the core (default: bf16 steps on CUDA, fp32 on CPU).
        distributed: shard the orthogonalization over the default process group (default: when
            ``torch.distributed`` is initialized with more than one rank).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float, momentum: float = 0.95,
                 nesterov: bool = True, weight_decay: float = 0.0, ns_steps: int = 4, normuon: bool = False,
                 adjust_lr: str = "spectral", *, beta2: float = 0.95, low_precision: bool | None = None,
                 distributed: bool | None = None) -> None:
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"lr must be a number >= 0, got {lr!r}")
        unit_interval(momentum, "momentum")
        unit_interval(beta2, "beta2")
        finite_nonnegative(weight_decay, "weight_decay")
        positive_int(ns_steps, "ns_steps")
        if adjust_lr not in ADJUST_LR:
            raise ValueError(f"unknown adjust_lr {adjust_lr!r}; expected one of {ADJUST_LR}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                        normuon=normuon, adjust_lr=adjust_lr, beta2=beta2)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"TurboMuon needs parameters with >= 2 dims, got shape {tuple(p.shape)}; "
                                     "give biases / 1-D parameters to AdamW (see lipnet.optim.split_params)")
        self.low_precision, self.distributed = low_precision, distributed

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        shard = world()[1] > 1 and self.distributed is not False
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
            updates = momentum_directions(self.state, params, [p.grad for p in params], beta, group["nesterov"])
            for (m, n, _, _), idx in same_shape_stacks(params).items():
                U = torch.stack([updates[i].reshape(m, n) for i in idx])
                O = self._orthogonalize(U, group["ns_steps"], shard)
                if group["normuon"]:
                    v = torch.stack([self.state[params[i]].setdefault(
                        "second_moment", torch.zeros(m, 1, dtype=params[i].dtype, device=O.device)) for i in idx])
                    O = normuon_normalize(O, v, group["beta2"])
                    for i, vi in zip(idx, v.unbind()):
                        self.state[params[i]]["second_moment"] = vi
                apply_updates([params[i] for i in idx], O, lr, wd, lr_scale(m, n, group["adjust_lr"]))
        return loss

    def _orthogonalize(self, U: torch.Tensor, steps: int, shard: bool) -> torch.Tensor:
        """The core's turbo polar factor of each matrix of the stack U (B, m, n); sharded: each rank
        computes its share (:func:`lipnet.distributed.shard_bounds`) and the results are all-gathered."""
        ortho = lambda X: orthogonalize(X, "turbo", steps, low_precision=self.low_precision, validate=False)
        if not shard:
            return ortho(U)
        return compute_sharded(U, U.dtype, lambda part, lo, hi: ortho(part))


def _layer_name(param_name: str) -> str:
    """'features.3.parametrizations.weight.original' -> 'features.3'; 'fc.weight' -> 'fc'."""
    if param_name.startswith("parametrizations."):
        return ""
    if ".parametrizations." in param_name:
        return param_name.split(".parametrizations.")[0]
    return param_name.rpartition(".")[0]


def split_params(model: nn.Module, *, head: str | nn.Module | None = "last"
                 ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split ``model``'s trainable parameters into (TurboMuon params, AdamW params), as Muon users do.

    AdamW gets: parameters with < 2 dims (biases, gains, scalars), every parameter of an
    ``nn.Embedding`` / ``nn.EmbeddingBag``, and the head's parameters -- ``head="last"``: the layer
    owning the last >= 2-D parameter in registration order (the output layer of a ``Sequential``);
    a module: that module; None: no head. TurboMuon gets every other >= 2-D parameter (raw
    parametrized weights included). Guarantee: each trainable parameter appears exactly once
    (shared parameters once), frozen ones nowhere.
    """
    if head is not None and head != "last" and not isinstance(head, nn.Module):
        raise ValueError(f"head must be 'last', an nn.Module or None, got {head!r}")
    adamw_ids = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            adamw_ids.update(id(p) for p in module.parameters())
    if isinstance(head, nn.Module):
        adamw_ids.update(id(p) for p in head.parameters())
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if head == "last":
        matrices = [name for name, p in named if p.dim() >= 2]
        if matrices:
            head_layer = _layer_name(matrices[-1])
            adamw_ids.update(id(p) for name, p in named if _layer_name(name) == head_layer)
    muon, adamw = [], []
    for _, p in named:
        (adamw if p.dim() < 2 or id(p) in adamw_ids else muon).append(p)
    return muon, adamw
