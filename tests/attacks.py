"""Adversarial lower bounds on a module's L2 Lipschitz constant (to try to break ``lipschitz_bound``)."""

from __future__ import annotations

import torch
from torch.func import jvp, vjp


def jacobian_power_iteration(f, x: torch.Tensor, iters: int = 30) -> float:
    """||J_f(x)||_2 estimated by power iteration on J^T J (a lower bound up to convergence)."""
    v = torch.randn_like(x)
    v /= v.norm()
    sigma = 0.0
    for _ in range(iters):
        _, jv = jvp(f, (x,), (v,))
        _, pullback = vjp(f, x)
        (w,) = pullback(jv)
        sigma = jv.norm().item()
        if w.norm() == 0:
            break
        v = w / w.norm()
    return sigma


def pair_ascent(f, shape, steps: int = 40, seed: int = 0, dtype=torch.float64) -> float:
    """max ||f(x) - f(y)|| / ||x - y|| found by Adam ascent from random pairs (with a close pair)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype).requires_grad_()
    y = (x.detach() + 1e-2 * torch.randn(shape, generator=g, dtype=dtype)).requires_grad_()
    opt = torch.optim.Adam([x, y], lr=1e-2)
    best = 0.0
    for _ in range(steps):
        ratio = (f(x) - f(y)).norm() / (x - y).norm()
        best = max(best, ratio.item())
        opt.zero_grad()
        (-ratio).backward()
        opt.step()
    return best


def empirical_lipschitz(f, shape, seed: int = 0, dtype=torch.float64) -> float:
    """Largest of: Jacobian power iteration at two random points, and pair ascent."""
    g = torch.Generator().manual_seed(seed + 1)
    lows = [pair_ascent(f, shape, seed=seed, dtype=dtype)]
    for _ in range(2):
        x = torch.randn(shape, generator=g, dtype=dtype)
        lows.append(jacobian_power_iteration(f, x))
    return max(lows)
