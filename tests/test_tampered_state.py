"""A bound computed from the tensors in use: every buffer / parameter of the exported and fixed
layers is tampered with through ``load_state_dict``, and the result is attacked.

A rule that trusted a stored number (an exported SLL's ``t_inv``, a fixed residual's alpha, a
normalization's std) would report ~1 while the attack below reaches the tampered layer's real
constant."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lipnet.nn as ln
from attacks import empirical_lipschitz


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


# (name, builder of the layer as a user would hold it after export / with fixed buffers, input shape)
LAYERS = [
    ("exported SLL", lambda: ln.export(_randomize(ln.SLLBlock(6, 8))), (3, 6)),
    ("exported conv SLL", lambda: ln.export(_randomize(ln.SLLBlock(3, 4, kernel_size=3))), (2, 3, 5, 5)),
    ("exported CPL", lambda: ln.export(_randomize(ln.ConvexPotentialLayer(6, 8))), (3, 6)),
    ("exported conv CPL", lambda: ln.export(_randomize(ln.ConvexPotentialLayer(3, 4, kernel_size=3))), (2, 3, 5, 5)),
    ("fixed ConvexResidual", lambda: ln.ConvexResidual(ln.OrthoLinear(5, 5), 0.4, learnable=False), (3, 5)),
    ("exported ConvexResidual", lambda: ln.export(_randomize(ln.ConvexResidual(ln.OrthoLinear(5, 5), 0.4,
                                                                                 learnable=True))), (3, 5)),
    ("fixed PrescaledAdditiveResidual", lambda: ln.PrescaledAdditiveResidual(ln.OrthoLinear(5, 5), 0.7,
                                                                              learnable=False), (3, 5)),
    ("InputNormalization", lambda: ln.InputNormalization([0.1, 0.2], [0.5, 0.25]), (3, 2, 4, 4)),
    ("exported LPReLU", lambda: ln.export(ln.LPReLU(4)), (3, 4)),
    ("exported OrthoLinear", lambda: ln.export(ln.OrthoLinear(5, 4)), (3, 5)),
    ("exported OrthoConv2d", lambda: ln.export(ln.OrthoConv2d(2, 4, 3)), (2, 2, 6, 6)),
    ("BatchCentering", lambda: ln.BatchCentering(3), (2, 3, 4, 4)),
]

TAMPERS = [("x50", lambda t: t * 50), ("x-2", lambda t: t * -2), ("+3", lambda t: t + 3),
           ("x1e-3", lambda t: t * 1e-3)]


def _tampered(make, key: str, tamper) -> nn.Module:
    torch.manual_seed(0)
    layer = make().double().eval()
    state = layer.state_dict()
    state[key] = tamper(state[key])
    layer.load_state_dict(state)
    return layer


def _cases():
    for name, make, shape in LAYERS:
        keys = [k for k, v in make().state_dict().items() if v.is_floating_point()]
        for key in keys:
            for tamper_name, tamper in TAMPERS:
                yield pytest.param(make, shape, key, tamper, id=f"{name}-{key}-{tamper_name}")


@pytest.mark.parametrize("make,shape,key,tamper", list(_cases()))
def test_a_tampered_buffer_gets_the_bound_it_earns(make, shape, key, tamper):
    layer = _tampered(make, key, tamper)
    bound = ln.lipschitz_bound(layer)
    assert math.isfinite(bound) and bound > 0
    attacked = empirical_lipschitz(layer, shape)
    assert attacked <= bound * (1 + 1e-6), f"attack reached {attacked:.6f} > bound {bound:.6f}"


@pytest.mark.parametrize("name,make,shape", LAYERS, ids=[n for n, _, _ in LAYERS])
def test_a_non_finite_buffer_is_refused_not_bounded(name, make, shape):
    weighted = {k for k, v in make().state_dict().items() if v.is_floating_point()}
    # biases and means shift the output without changing its constant; the rest enter the bound
    for key in sorted(k for k in weighted if "bias" not in k and "mean" not in k):
        layer = _tampered(make, key, lambda t: torch.full_like(t, float("nan")))
        with pytest.raises(ValueError, match="(?i)non-finite|nan"):
            ln.lipschitz_bound(layer)


def test_the_issue_examples_are_bounded_by_what_an_attack_reaches():
    torch.manual_seed(0)
    ex = ln.export(nn.Sequential(ln.SLLBlock(8, 16)).double().eval())
    state = ex.state_dict()
    state["0.t_inv"] *= 50
    ex.load_state_dict(state)
    attacked = empirical_lipschitz(ex, (4, 8))
    assert attacked > 10  # the tampered block is far from 1-Lipschitz ...
    assert ln.lipschitz_bound(ex) >= attacked  # ... and its bound says so

    fixed = ln.ConvexResidual(ln.OrthoLinear(4, 4), 0.5).double().eval()
    fixed.alpha_raw.fill_(3.0)
    assert ln.lipschitz_bound(fixed) >= empirical_lipschitz(fixed, (3, 4)) > 4.5  # |1 - 3| + 3 = 5


def test_export_keeps_the_bound_of_trained_residual_blocks():
    """The recomputed bound of an exported block is not looser than its theorem's 1 (+margin)."""
    for block in (ln.SLLBlock(16, 32), ln.SLLBlock(8, 16, kernel_size=3), ln.ConvexPotentialLayer(16, 32),
                  ln.ConvexPotentialLayer(8, 16, kernel_size=3)):
        _randomize(block, seed=3)
        assert ln.lipschitz_bound(ln.export(block)) == pytest.approx(ln.lipschitz_bound(block), abs=1e-9)
