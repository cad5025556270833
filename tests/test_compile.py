"""torch.compile on lipnet networks: no graph break in the layers' forward, compiled training
steps land on the eager steps' weights (with retract_after_step), certificates unchanged."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

import lipnet.nn as ln
from lipnet.models import build_model
from lipnet.training import build_optimizer
from lipnet.presets import TrainConfig


def _models():
    return {
        "mnist-convnet": (lambda: build_model("mnist-convnet", mean=(0.13,), width=4), (8, 1, 28, 28)),
        "cifar-liresnet": (lambda: build_model("cifar-liresnet", width=8, blocks=(1, 1, 1), hidden=16), (8, 3, 32, 32)),
        "cifar-liresnet-sll": (lambda: build_model("cifar-liresnet", width=8, blocks=(1, 1, 1), hidden=16, block="sll"),
                               (8, 3, 32, 32)),
    }


@pytest.mark.parametrize("name", list(_models()))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_forward_pass_compiles_into_one_graph(name, mode):
    make, shape = _models()[name]
    torch.manual_seed(0)
    model = getattr(make(), mode)()
    dynamo.reset()
    explanation = dynamo.explain(model)(torch.rand(shape))
    reasons = [str(b.reason).splitlines()[0] for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons


def test_the_orthogonal_transposed_convolution_compiles_into_one_graph():
    """No model preset holds an OrthoConvTranspose2d: a down-up pair of its own (default
    parametrization, as the presets), in training mode."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(ln.OrthoConv2d(2, 8, 2, stride=2, padding=0), ln.MaxMin(),
                                ln.OrthoConvTranspose2d(8, 2, 3, stride=2, padding=1, output_padding=1))
    x = torch.rand(4, 2, 8, 8)
    dynamo.reset()
    explanation = dynamo.explain(model)(x)
    reasons = [str(b.reason).splitlines()[0] for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    dynamo.reset()
    torch.testing.assert_close(torch.compile(model, backend="aot_eager")(x), model(x))


@pytest.mark.parametrize("optimizer", ["adam", "turbomuon"])
def test_compiled_training_steps_match_eager_ones(optimizer):
    torch.manual_seed(0)
    eager = build_model("mnist-convnet", mean=(0.13,), width=4)
    compiled_model = build_model("mnist-convnet", mean=(0.13,), width=4)
    compiled_model.load_state_dict(eager.state_dict())
    config = TrainConfig.from_preset("mnist", optimizer=optimizer)
    loss_fn = ln.LipschitzCrossEntropy()
    opt_eager, _ = build_optimizer(eager, config, total_steps=3)
    opt_compiled, _ = build_optimizer(compiled_model, config, total_steps=3)
    handle = ln.retract_after_step(opt_compiled, compiled_model)
    dynamo.reset()
    compiled = torch.compile(compiled_model, backend="aot_eager")  # dynamo + AOT autograd, no C++ build
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.rand(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
        for model, opt in ((eager, opt_eager), (compiled, opt_compiled)):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    handle.remove()
    eager.eval()
    compiled_model.eval()
    x = torch.rand(16, 1, 28, 28, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
    assert ln.lipschitz_bound(compiled_model) == pytest.approx(ln.lipschitz_bound(eager), rel=1e-5)


def test_inductor_trains_and_certifies_a_small_network():
    """The default backend (inductor, C++ on CPU): steps run, the bound of the weights in use
    holds against the compiled function."""
    torch.manual_seed(0)
    model = build_model("mnist-convnet", mean=(0.13,), width=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ln.retract_after_step(opt, model)
    dynamo.reset()
    compiled = torch.compile(model)
    loss_fn = ln.LipschitzCrossEntropy()
    for _ in range(2):
        x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
        opt.zero_grad()
        loss = loss_fn(compiled(x), y)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    model.eval()
    bound = ln.lipschitz_bound(model)
    x = torch.rand(32, 1, 28, 28)
    delta = 1e-2 * torch.randn_like(x)
    with torch.no_grad():
        ratio = (compiled(x + delta) - compiled(x)).flatten(1).norm(dim=1) / delta.flatten(1).norm(dim=1)
    assert bound <= 1.001 and (ratio <= bound * (1 + 1e-4)).all()
