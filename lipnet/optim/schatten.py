"""Schatten-p descent: the family from SGD (p = 1) to Muon (p = inf), with per-layer adaptive p.

Massena, Friedrich, Serrurier, "From SGD to Muon: Adaptive Optimization via Schatten-p Norms"
(arXiv 2605.19781; blog "Adaptive Schatten-p Norm Descent"; code: deel-ai-papers/schatten-muon).
For a momentum matrix M = U S V^T the update direction is

    schatten_update(M, p) = U S^(1/p) V^T        p = 1: M (SGD),  p -> inf: U V^T (Muon)

the steepest-descent direction for the Schatten-(p+1) norm. Computed on the short side, never with
an SVD of M: with X the wide orientation of M (k <= n rows) and A = X X^T = W diag(lam) W^T (one
k x k ``eigh``), U S^(1/p) V^T = A^((1/p - 1)/2) X. Singular values below ``floor * sigma_max``
(where fp32 Gram eigenvalues are noise) are continued linearly: g(s) = s * tau^(1/p - 1), tau =
floor * sigma_max, so the map stays bounded and monotone. p = inf goes to the ``lipnet.ortho`` core
(Turbo-Muon). benchmarks/optim.py (``--roots``) measures the alternatives: the coupled Newton
inverse-root iteration (Guo & Higham 2006) is slower and less accurate than the eigh on CPU, and
Q (Q^T M)^(1/p) with Q = orthogonalize(M) needs Q = U V^T exactly, but the core's converging methods
(turbo/convergent/bjorck) return the polar factor of the AOL-rescaled diag(s) M, and ns5 does not
converge: that route is off by 3e-2 (convergent) to 2e-1 (turbo) relative error and slower than
the one Gram eigh.

Adaptive p (the paper's criterion, as implemented in its repository, smuon/svs/momentum_exact.py):
view the layer as a random-feature regression y = W a on its input features A (rows = samples, the
im2col patches for a conv). One step W - eta S of that quadratic decreases the loss by at least
max_eta [eta <G, S> - eta^2/2 ||S A^T||_F^2] >= <G, S>^2 / (2 ||S||_{S_(p+1)}^2 ||A||_{S_k}^2), by
Hoelder with 1/2 = 1/(p+1) + 1/k, i.e. k(p) = 2(p+1)/(p-1). So each layer takes

    p* = argmax_{p in [pmin, pmax]}  f(p),   f(p) = relu(<G, S_p> / ||S_p||_{S_(p+1)})^2 / ||A||_{S_k(p)}^2

with S_p = schatten_update(M, p), G the gradient. p -> 1 weighs A by its spectral norm (SGD's
curvature), p -> inf by its Frobenius norm (Muon's). Our choices (the repository uses full SVDs and
scipy's bounded scalar search every 100 steps): f is evaluated every ``p_every`` steps on a
geometric grid of ``p_points`` values, from the eigh the update needs anyway (no extra SVD, no host
sync); the numerator ratio is an EMA over evaluations (``stat_beta``); the activation spectrum comes
from <= ``act_rows`` sampled rows every ``act_every`` steps (forward hooks, :meth:`SchattenMuon.watch`),
EMA'd the same way; a layer with no recorded activations assumes white ones (||A||_{S_k} = n^(1/k)).
Features of a layer whose output goes straight into a BatchNorm are centered first (``watch``'s
``center="batchnorm"``): the BatchNorm removes W's response to the mean feature.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_gather_rows, all_gather_stack, compute_sharded, shard_bounds, world
from ..ortho import orthogonalize
from ..ortho.validation import check_matrices
from ..validate import finite_nonnegative, finite_positive, one_of, positive_int, unit_interval
from .muon import ADJUST_LR, apply_updates, lr_scale, momentum_directions, same_shape_stacks

PRECONDITIONERS = (None, "adam", "muadam")
KAPPA_REGIMES = ("noisy", "determ")
CENTER = (True, False, "batchnorm")


def _check_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p) or p < 1:
        raise ValueError(f"p must be a number in [1, inf], got {p!r}")
    return float(p)


def _wide(X: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return (X.mT, True) if X.shape[-2] > X.shape[-1] else (X, False)


def _gram_eigh(X: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """X wide (..., k, n): eigenpairs of A = X X^T (ascending) and the eigenvalues clamped at
    (floor * sigma_max)^2 (the floor of the power; sigma_max^2 = the largest eigenvalue)."""
    lam, W = torch.linalg.eigh(X @ X.mT)
    lam = lam.clamp_min(0)
    tiny = torch.finfo(lam.dtype).tiny
    lam_c = lam.clamp_min((floor ** 2 * lam[..., -1:]).clamp_min(tiny))
    return lam, lam_c, W


def _gram_power(X: torch.Tensor, lam_c: torch.Tensor, W: torch.Tensor, exponent) -> torch.Tensor:
    """(W diag(lam_c^exponent) W^T) X, i.e. A^exponent X for A = X X^T = W diag(lam) W^T; ``exponent``
    broadcasts against lam_c (..., k). The k x k product first: one pass over the long side, not two."""
    return ((W * lam_c.pow(exponent).unsqueeze(-2)) @ W.mT) @ X


def schatten_update(M: torch.Tensor, p: float | torch.Tensor, *, polar: str = "turbo", floor: float = 1e-3,
                    validate: bool = True) -> torch.Tensor:
    """U g(S) V^T for each matrix M = U S V^T of a stack (..., m, n), g(s) = s^(1/p).

    Guarantees (exact arithmetic): g(s) = s^(1/p) for every singular value s >= floor * sigma_max(M),
    g(s) = s * (floor * sigma_max)^(1/p - 1) below (bounded, monotone); p = 1 returns M itself; a
    float p = inf returns ``orthogonalize(M, polar)`` (the core's polar factor; singular values in
    the method's band, see ``lipnet.ortho.orthogonalize``). A zero matrix maps to zero. ``p`` may be
    a tensor broadcasting against the batch dims (one p per matrix; then every p, inf included, goes
    through the eigh route). Output dtype = input dtype; computation in fp32 (fp64 for fp64 inputs).
    """
    unit_interval(floor, "floor")
    if validate:
        check_matrices(M, "M", allow_zero=True)
    elif M.ndim < 2:
        raise ValueError(f"M must have at least 2 dims (..., m, n), got shape {tuple(M.shape)}")
    if isinstance(p, torch.Tensor):
        if validate and (torch.isnan(p).any() or (p < 1).any()):
            raise ValueError("every p must be in [1, inf]")
    else:
        p = _check_p(p)
        if p == 1:
            return M
        if p == math.inf:
            return orthogonalize(M, polar, validate=False)
    dtype = torch.float64 if M.dtype == torch.float64 else torch.float32
    X, transposed = _wide(M.to(dtype))
    _, lam_c, W = _gram_eigh(X, floor)
    p = torch.as_tensor(p, dtype=dtype, device=X.device)
    S = _gram_power(X, lam_c, W, ((1 / p - 1) / 2)[..., None])   # a tensor p: one exponent per matrix
    return (S.mT if transposed else S).to(M.dtype)


# ---- the adaptive criterion -------------------------------------------------------------------------

def p_grid(pmin: float, pmax: float, points: int) -> torch.Tensor:
    """The candidate p values: ``points`` geometrically spaced in [pmin, pmax] (float64)."""
    return torch.logspace(math.log10(pmin), math.log10(pmax), points, dtype=torch.float64)


def activation_log_norms(singular_values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """log ||A||_{S_k(p)} for every p of ``grid`` (k(p) = 2(p+1)/(p-1); p = 1: the spectral norm),
    from A's singular values (..., r). Zero singular values are ignored."""
    grid = grid.to(singular_values)
    log_s = singular_values.clamp_min(torch.finfo(singular_values.dtype).tiny).log().unsqueeze(-1)
    k = torch.where(grid > 1, 2 * (grid + 1) / (grid - 1).clamp_min(1e-12), torch.inf)
    finite = torch.isfinite(k)
    k_safe = torch.where(finite, k, torch.ones_like(k))
    schatten = torch.logsumexp(k_safe * log_s, dim=-2) / k_safe
    return torch.where(finite, schatten, log_s.amax(dim=-2))


def alignment_ratio(lam: torch.Tensor, lam_c: torch.Tensor, W: torch.Tensor, X: torch.Tensor, G: torch.Tensor,
                    grid: torch.Tensor) -> torch.Tensor:
    """<G, S_p> / ||S_p||_{S_(p+1)} for every p of ``grid`` (..., P), S_p = schatten_update(X, p), from
    the eigenpairs of X X^T that the update computes (X, G wide, same orientation)."""
    grid = grid.to(lam)
    exponent = (1 / grid - 1) / 2                                           # (P,)
    log_gain = lam_c.log().unsqueeze(-1) * exponent                          # (..., k, P)
    d = ((W.mT @ (X @ G.mT)) * W.mT).sum(-1)                                # (..., k) = <G, u_i s_i v_i^T>
    numerator = (d.unsqueeze(-2) @ log_gain.exp()).squeeze(-2)              # <G, S_p>
    log_sv = 0.5 * lam.clamp_min(torch.finfo(lam.dtype).tiny).log().unsqueeze(-1) + log_gain
    log_norm = torch.logsumexp((grid + 1) * log_sv, dim=-2) / (grid + 1)    # log ||S_p||_{S_(p+1)}
    return numerator * torch.exp(-log_norm)


def choose_p(alignment: torch.Tensor, act_log_norm: torch.Tensor, grid: torch.Tensor,
             previous: torch.Tensor) -> torch.Tensor:
    """argmax over the grid of relu(alignment)^2 / ||A||_{S_k(p)}^2; ``previous`` where no p has a
    positive alignment (no guaranteed decrease for any p)."""
    log_f = 2 * alignment.clamp_min(0).log() - 2 * act_log_norm
    best = log_f.argmax(dim=-1)
    return torch.where(alignment.amax(dim=-1) > 0, grid.to(previous)[best], previous)


def layer_features(module: nn.Module, x: torch.Tensor, max_rows: int) -> torch.Tensor | None:
    """At most ``max_rows`` rows (evenly strided) of the feature matrix of ``module``'s input: x
    itself for ``nn.Linear``, the im2col patches (rows = (image, position), cols = in * kh * kw) for
    a groups=1 ``nn.Conv2d`` with integer padding. None for other modules."""
    if isinstance(module, nn.Linear):
        A = x.reshape(-1, x.shape[-1])
    elif isinstance(module, nn.Conv2d) and module.groups == 1 and not isinstance(module.padding, str) \
            and module.padding_mode == "zeros" and x.ndim == 4:
        out_hw = [(x.shape[2 + i] + 2 * module.padding[i] - module.dilation[i] * (module.kernel_size[i] - 1) - 1)
                  // module.stride[i] + 1 for i in (0, 1)]
        images = min(len(x), max(1, -(-max_rows // (out_hw[0] * out_hw[1]))))
        x = x[torch.linspace(0, len(x) - 1, images).long()]
        A = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride).mT.reshape(
            -1, x.shape[1] * module.kernel_size[0] * module.kernel_size[1])
    else:
        return None
    if len(A) > max_rows:
        A = A[torch.linspace(0, len(A) - 1, max_rows).long()]
    return A


# ---- the optimizer ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class KappaPin:
    """``SchattenMuon(pin=KappaPin(adam_lr))``: the paper repository's step size, which follows p from
    Muon's step at p = inf to the per-entry step of the AdamW (lr ``adam_lr``, first-moment decay
    ``beta1``) that trains the other parameters at p = 1: ||dW||_F = lr sqrt(min(m, n)) kappa^(1/p),
    kappa = adam_step sqrt(max(m, n)) / lr, adam_step = adam_lr rho_adam.

    ``regime`` sets rho_adam, the RMS of Adam's per-entry direction m / sqrt(v): ``"noisy"``
    sqrt((1 - beta1) / (1 + beta1)) (zero-mean noise gradients: the RMS of their beta1-EMA relative to
    theirs), ``"determ"`` 1 (consistent gradients: |m / sqrt(v)| = 1).
    """

    adam_lr: float
    beta1: float = 0.9
    regime: str = "noisy"

    def __post_init__(self) -> None:
        finite_positive(self.adam_lr, "adam_lr")
        unit_interval(self.beta1, "beta1")
        one_of(self.regime, KAPPA_REGIMES, "regime")

    @property
    def adam_step(self) -> float:
        """adam_lr rho_adam: Adam's per-entry step, the target of the step at p = 1."""
        rho_adam = 1.0 if self.regime == "determ" else math.sqrt((1 - self.beta1) / (1 + self.beta1))
        return self.adam_lr * rho_adam


class SchattenMuon(torch.optim.Optimizer):
    """Schatten-p descent with momentum; p fixed or chosen per layer by the paper's criterion.

    One step, for every parameter W viewed as (m, n) (as :class:`~lipnet.optim.TurboMuon`):

        B = beta B + (1 - beta) G;  U = (1 - beta) G + beta B (nesterov) else B
        (precondition) v = beta2 v + (1 - beta2) G^2;  D = (v / (1 - beta2^t) + eps)^(-e);  U <- D * U
        S = schatten_update(U, p);  (precondition) S <- D * S
        W = (1 - lr wd) W - lr * scale(m, n) * sqrt(min(m, n)) * S / ||S||_F

    ``pin="frobenius"`` (default): the Frobenius norm is pinned to that of U V^T, sqrt(min(m, n)), so
    one lr serves every p; p = inf is exactly :class:`TurboMuon` (the core's turbo polar factor, not
    pinned). ``pin=KappaPin(adam_lr)`` (the paper repository's default): sqrt(min(m, n)) kappa^(1/p),
    so the step is Muon's at p = inf and Adam's per-entry step at p = 1 (see :class:`KappaPin`);
    ``adjust_lr``'s factor is then not applied (kappa already carries the shape), as in the repository.
    ``precondition``: ``"adam"`` (e = 1/(2(p+1)): p = 1 is Adam's direction m / sqrt(v + eps), p -> inf
    Muon) or ``"muadam"`` (e = 1/4: p = 1 Adam, p -> inf MuAdam); both from the paper's repository
    (moments "padam" / "adam"). With adaptive p, D takes e from the p in force when the step starts
    and the criterion runs on D * U (its gradient term on the raw gradient).

    Adaptive p (``p="adaptive"``): at steps 1, 1 + p_every, ... each matrix takes the grid p
    maximizing the module docstring's f(p) (its ``<G, S_p>`` ratio averaged over evaluations with
    ``stat_beta``; activation spectra recorded by :meth:`watch` every ``act_every`` steps, a multiple
    of ``p_every``, else white activations); the p is kept in between. Starts at ``pmax``.
    Guarantees: p stays in [pmin, pmax] (a grid value); no host synchronization in ``step``;
    same-shape matrices share one batched eigh.

    Under ``torch.distributed`` (``distributed=None``: whenever more than one rank is initialized),
    *given gradients identical on every rank* (as after DDP's all-reduce): each rank computes its
    share of every same-shape stack (as TurboMuon) and the results and the adaptive state (p, the
    alignment and activation statistics) are all-gathered; the layer inputs recorded by
    :meth:`watch` are all-gathered in rank order before their statistics are taken, so every rank
    sees the global batch (``lipnet.distributed.ShardedBatchLoader``'s contiguous parts) and picks
    the p one process would. ``distributed=False``: every rank computes every matrix (the inputs
    are still gathered).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float, p: float | str = "adaptive",
                 momentum: float = 0.95, nesterov: bool = True, weight_decay: float = 0.0,
                 adjust_lr: str = "spectral", *, pmin: float = 1.02, pmax: float = 10.0, p_points: int = 32,
                 p_every: int = 50, stat_beta: float = 0.9, act_every: int = 200, act_rows: int = 256,
                 floor: float = 1e-3, precondition: str | None = None, beta2: float = 0.999, eps: float = 1e-8,
                 ns_steps: int = 4, low_precision: bool | None = None, distributed: bool | None = None,
                 pin: str | KappaPin = "frobenius") -> None:
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"lr must be a number >= 0, got {lr!r}")
        if p != "adaptive":
            if isinstance(p, str):
                raise ValueError(f"p must be 'adaptive' or a number in [1, inf], got {p!r}")
            p = _check_p(p)
        for name, v in (("momentum", momentum), ("beta2", beta2), ("stat_beta", stat_beta)):
            unit_interval(v, name)
        finite_nonnegative(weight_decay, "weight_decay")
        finite_nonnegative(eps, "eps")
        one_of(adjust_lr, ADJUST_LR, "adjust_lr")
        if not (1 <= pmin < pmax < math.inf):
            raise ValueError(f"need 1 <= pmin < pmax < inf, got pmin={pmin!r}, pmax={pmax!r}")
        for name, v in dict(p_points=p_points, p_every=p_every, act_every=act_every, act_rows=act_rows,
                            ns_steps=ns_steps).items():
            positive_int(v, name)
        if p_points < 2:
            raise ValueError(f"p_points must be >= 2, got {p_points!r}")
        if act_every % p_every:
            raise ValueError(f"act_every ({act_every}) must be a multiple of p_every ({p_every})")
        unit_interval(floor, "floor")
        one_of(precondition, PRECONDITIONERS, "precondition")
        kappa = isinstance(pin, KappaPin)
        if not (kappa or (isinstance(pin, str) and pin == "frobenius")):
            raise ValueError(f"pin must be 'frobenius' or a KappaPin(adam_lr=...), got {pin!r}")
        # the param groups hold plain values: a state_dict loads with torch.load(weights_only=True)
        defaults = dict(lr=lr, p=p, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        adjust_lr=adjust_lr, precondition=precondition, beta2=beta2, eps=eps,
                        pin="kappa" if kappa else "frobenius", adam_step=pin.adam_step if kappa else None)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for param in group["params"]:
                if param.dim() < 2:
                    raise ValueError(f"SchattenMuon needs parameters with >= 2 dims, got shape {tuple(param.shape)}")
        self.pmin, self.pmax, self.floor, self.stat_beta = float(pmin), float(pmax), floor, stat_beta
        self.p_every, self.act_every, self.act_rows = p_every, act_every, act_rows
        self.ns_steps, self.low_precision, self.distributed = ns_steps, low_precision, distributed
        self.grid = p_grid(pmin, pmax, p_points)
        self._pending: dict[nn.Parameter, tuple[nn.Module, torch.Tensor]] = {}
        # feature centering (watch): the weights whose layer feeds a BatchNorm, found in the first forward
        self._centered: set[nn.Parameter] = set()
        self._probing, self._outputs = False, {}
        # per same-shape stack: the exponent (1/p - 1)/2 of its matrices' current p (dropped when p may change)
        self._exponents: dict[tuple, torch.Tensor] = {}

    # -- activation statistics ---------------------------------------------------------------------

    def watch(self, model: nn.Module, center: bool | str = "batchnorm") -> list[torch.utils.hooks.RemovableHandle]:
        """Forward hooks on the ``nn.Linear`` / ``nn.Conv2d`` modules of ``model`` whose weight this
        optimizer trains with adaptive p: in a grad-enabled forward before every ``act_every``-th step
        they keep a reference to the input (which autograd keeps anyway); the next ``step`` samples
        <= ``act_rows`` feature rows from it and updates the layer's activation spectrum (so the cost
        is inside ``step``). Returns the hook handles (``.remove()`` to stop).

        ``center``: which layers' feature rows are centered (their sample mean subtracted) before
        the spectrum is taken. ``"batchnorm"`` (default): the layers whose output tensor goes
        unchanged into a BatchNorm (seen at the first grad-enabled forward) -- the BatchNorm removes
        W's response to the mean feature, so the mean direction carries no curvature of the loss;
        uncentered, that one direction (large after a ReLU) dominates ||A||_{S_k} and drives p to
        pmax. ``True``: every watched layer; ``False``: none (the paper repository's choice)."""
        one_of(center, CENTER, "center")
        adaptive = {param for g in self.param_groups if g["p"] == "adaptive" for param in g["params"]}
        handles = []
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, (nn.Linear, nn.Conv2d)) and weight is not None and weight in adaptive:
                handles.append(module.register_forward_hook(self._record_hook))
                if center is True:
                    self._centered.add(weight)
        if center == "batchnorm":
            self._probing = True
            handles += [m.register_forward_pre_hook(self._batchnorm_probe) for m in model.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        return handles

    def _record_hook(self, module: nn.Module, inputs: tuple, output) -> None:
        if not torch.is_grad_enabled():
            return
        if self._probing:
            self._outputs[module] = output
        if self.state[module.weight].get("step", 0) % self.act_every:
            return
        self._pending[module.weight] = (module, inputs[0].detach())   # features computed in step()

    def _batchnorm_probe(self, module: nn.Module, inputs: tuple) -> None:
        if self._probing and torch.is_grad_enabled():
            self._centered.update(m.weight for m, out in self._outputs.items() if out is inputs[0])

    def _gather_pending(self) -> None:
        """Replace each recorded layer input by the concatenation of every rank's (rank order), in the
        parameters' order: the same collectives on every rank."""
        for group in self.param_groups:
            for q in group["params"]:
                if q in self._pending:
                    module, x = self._pending[q]
                    self._pending[q] = (module, all_gather_rows(x))

    def _activation_log_norms(self, param: nn.Parameter, n: int, dtype: torch.dtype) -> torch.Tensor:
        state, pending = self.state[param], self._pending.pop(param, None)
        A = None if pending is None else layer_features(pending[0], pending[1], self.act_rows)
        if A is not None and A.shape[-1] == n:
            A = A.to(dtype)
            if param in self._centered:
                A = A - A.mean(0)
            gram = A @ A.mT if len(A) <= A.shape[-1] else A.mT @ A
            sv = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
            fresh = activation_log_norms(sv, self.grid)
            if "act_log_norm" in state:
                state["act_log_norm"].lerp_(fresh.to(state["act_log_norm"]), 1 - self.stat_beta)
            else:
                state["act_log_norm"] = fresh
        if "act_log_norm" in state:
            return state["act_log_norm"].to(dtype)
        k = 2 * (self.grid + 1) / (self.grid - 1)                              # white activations
        return (math.log(n) / k).to(dtype)

    # -- the step -------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._probing and self._outputs:         # the first forward has been seen: centering is decided
            self._probing, self._outputs = False, {}
        if self._pending and world()[1] > 1:
            self._gather_pending()
        shard = world()[1] > 1 and self.distributed is not False
        for group in self.param_groups:
            params = [q for q in group["params"] if q.grad is not None]
            if not params:
                continue
            beta, lr, wd, p = group["momentum"], group["lr"], group["weight_decay"], group["p"]
            grads = [q.grad for q in params]
            updates = momentum_directions(self.state, params, grads, beta, group["nesterov"])
            for q in params:
                self.state[q]["step"] = self.state[q].get("step", 0) + 1
            D = self._preconditioners(group, params, grads) if group["precondition"] else None
            if D is not None:
                updates = torch._foreach_mul(updates, D)
            for (m, n, _, _), idx in same_shape_stacks(params).items():
                U = torch.stack([updates[i].reshape(m, n) for i in idx])
                stack = [params[i] for i in idx]
                if p == math.inf and D is None:       # TurboMuon
                    O = self._shared(U, shard, U.dtype, lambda part, lo, hi: orthogonalize(
                        part, "turbo", self.ns_steps, low_precision=self.low_precision, validate=False))
                else:
                    dtype = torch.float64 if U.dtype == torch.float64 else torch.float32  # what _schatten returns
                    O = self._shared(U, shard, dtype, lambda part, lo, hi: self._schatten(part, p, stack[lo:hi], n))
                    if p == "adaptive" and shard:
                        self._share_adaptive_state(stack, O.dtype)
                    if D is not None:
                        O = O * torch.stack([D[i].reshape(m, n) for i in idx]).to(O.dtype)
                    O = O * (math.sqrt(min(m, n)) / (torch.linalg.matrix_norm(O, keepdim=True) + 1e-12))
                if group["pin"] == "kappa":       # kappa carries the shape: no adjust_lr factor
                    O = O * self._kappa_power(group, m, n, p, stack, O.dtype)
                    scale = 1.0
                else:
                    scale = lr_scale(m, n, group["adjust_lr"])
                apply_updates([params[i] for i in idx], O, lr, wd, scale)
        self._pending.clear()  # inputs of matrices another rank computed: consumed there
        return loss

    @staticmethod
    def _shared(U: torch.Tensor, shard: bool, dtype: torch.dtype, compute) -> torch.Tensor:
        """``compute(part, lo, hi)`` of the stack U: on this rank's share when sharded (all-gathered)."""
        return compute_sharded(U, dtype, compute) if shard else compute(U, 0, len(U))

    def _share_adaptive_state(self, stack: list, dtype: torch.dtype) -> None:
        """After a sharded step: every rank takes each matrix's p, alignment and activation
        statistics from the rank that computed it (absent entries travel as NaN; reading them back
        is the one host synchronization of a distributed step besides the collectives)."""
        count, g = len(stack), len(self.grid)
        chunk, lo, hi = shard_bounds(count)
        device = stack[0].device
        local = torch.full((chunk, 1 + 2 * g), math.nan, dtype=dtype, device=device)
        for row, q in enumerate(stack[lo:hi]):
            state = self.state[q]
            local[row, 0] = state["p"]
            for col, key in ((1, "alignment"), (1 + g, "act_log_norm")):
                if key in state:
                    local[row, col:col + g] = state[key]
        rows = all_gather_stack(local)[:count]
        for q, row in zip(stack, rows):
            state = self.state[q]
            state["p"] = row[0].clone()
            for col, key in ((1, "alignment"), (1 + g, "act_log_norm")):
                if not torch.isnan(row[col]):
                    state[key] = row[col:col + g].clone()

    def _kappa_power(self, group: dict, m: int, n: int, p, stack: list, dtype: torch.dtype):
        """kappa^(1/p) per matrix, kappa = adam_step / (lr rho_muon), rho_muon = 1/sqrt(max(m, n))
        (:class:`KappaPin`): the update's Frobenius norm moves from Muon's sqrt(min(m, n)) at p = inf
        to Adam's per-entry step at p = 1."""
        if group["lr"] <= 0:
            return 1.0
        kappa = max(group["adam_step"] * math.sqrt(max(m, n)) / group["lr"], 1e-12)
        if p == "adaptive":
            p_vec = torch.stack([self.state[q]["p"] for q in stack]).to(dtype)
            return torch.pow(kappa, 1 / p_vec)[:, None, None]
        return kappa ** (1 / p)

    def _preconditioners(self, group: dict, params: list, grads: list) -> list[torch.Tensor]:
        """D = (v_hat + eps)^(-e) per parameter; adaptive p: e from the p in force when the step
        starts (the one chosen at the last criterion evaluation; pmax before the first)."""
        beta2, eps, p = group["beta2"], group["eps"], group["p"]
        out = []
        for q, g in zip(params, grads):
            state = self.state[q]
            if "second_moment" not in state:
                state["second_moment"] = torch.zeros_like(q)
            v = state["second_moment"]
            v.lerp_(g.square(), 1 - beta2)
            if group["precondition"] == "muadam":
                exponent = -0.25
            elif p == "adaptive":  # a tensor exponent: no host synchronization
                exponent = -1 / (2 * (state["p"].to(v.dtype) + 1)) if "p" in state else -1 / (2 * (self.pmax + 1))
            else:
                exponent = -1 / (2 * (p + 1))
            out.append((v / (1 - beta2 ** state["step"]) + eps).pow(exponent))
        return out

    def _schatten(self, U: torch.Tensor, p: float | str, params: list, n: int) -> torch.Tensor:
        """U S^(1/p) V^T of the stack U (B, m, n) (fp32/fp64), p fixed or chosen per matrix."""
        if p == 1:
            return U.float() if U.dtype in (torch.float16, torch.bfloat16) else U
        dtype = torch.float64 if U.dtype == torch.float64 else torch.float32
        X, transposed = _wide(U.to(dtype))
        lam, lam_c, W = _gram_eigh(X, self.floor)
        if p == "adaptive":
            states = [self.state[q] for q in params]
            for s in states:
                if "p" not in s:
                    s["p"] = torch.full((), self.pmax, dtype=dtype, device=X.device)
            due = [(s["step"] - 1) % self.p_every == 0 for s in states]
            key = (tuple(map(id, params)), dtype)
            if any(due):                                   # the criterion, every p_every steps
                G, _ = _wide(torch.stack([q.grad.reshape(U.shape[-2:]) for q in params]).to(dtype))
                ratio = alignment_ratio(lam, lam_c, W, X, G, self.grid)
                for s, r, d in zip(states, ratio.unbind(), due):
                    if d:
                        s["alignment"] = s["alignment"].lerp_(r.to(s["alignment"]), 1 - self.stat_beta) \
                            if "alignment" in s else r * (1 - self.stat_beta)
                act = torch.stack([self._activation_log_norms(q, n, dtype) for q in params])
                previous = torch.stack([s["p"].to(dtype) for s in states])
                chosen = choose_p(torch.stack([s.get("alignment", torch.zeros_like(self.grid)).to(dtype)
                                               for s in states]), act, self.grid, previous)
                for s, pi, d in zip(states, chosen.unbind(), due):
                    if d:
                        s["p"] = pi
                self._exponents.pop(key, None)
            if key not in self._exponents:                 # p only changes at the criterion's steps
                p_vec = torch.stack([s["p"].to(dtype) for s in states])
                self._exponents[key] = ((1 / p_vec - 1) / 2)[:, None]
            exponent = self._exponents[key]
        else:
            exponent = (1 / p - 1) / 2
        S = _gram_power(X, lam_c, W, exponent)
        return S.mT if transposed else S

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._exponents.clear()

    def current_p(self) -> list[float]:
        """p of every parameter (in param-group order): the group's fixed p, or under adaptive p the
        choice in force -- ``pmax`` before the first step (the criterion's starting point), then
        the choice of the latest criterion evaluation (the first runs at the first step, before its
        update, and one every ``p_every`` steps after). One host sync."""
        out = []
        for group in self.param_groups:
            for q in group["params"]:
                if group["p"] != "adaptive":
                    out.append(float(group["p"]))
                else:
                    v = self.state[q].get("p")
                    out.append(float(self.pmax) if v is None else float(v))
        return out
