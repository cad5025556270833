"""Ready architectures: build, run, stay 1-Lipschitz (sound bound), export exactly, rebuild by name."""

from __future__ import annotations

import pytest
import torch

from lipnet.models import MODELS, RESIDUAL_BLOCKS, build_model, cifar_liresnet, liresnet, mnist_convnet
import lipnet.nn as ln
from lipnet.nn import InputNormalization, export, lipschitz_bound


@pytest.mark.parametrize("name,kw,shape,classes", [
    ("mnist-convnet", {"width": 8, "hidden": 32}, (3, 1, 28, 28), 10),
    ("cifar-liresnet", {"width": 16, "blocks": (1, 1, 1), "hidden": 64}, (3, 3, 32, 32), 10),
])
def test_small_models_are_one_lipschitz_and_export(name, kw, shape, classes):
    torch.manual_seed(0)
    model = build_model(name, **kw).eval()
    assert isinstance(model[0], InputNormalization)
    x = torch.rand(shape)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (shape[0], classes) and torch.isfinite(out).all()
    assert 0.99 < lipschitz_bound(model) <= 1.001
    plain = export(model)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block", RESIDUAL_BLOCKS)
def test_liresnet_blocks_are_one_lipschitz_and_export(block):
    torch.manual_seed(0)
    model = cifar_liresnet(width=8, blocks=(1, 1, 1), hidden=32, block=block)
    kinds = {"convex": ln.ConvexResidual, "sll": ln.SLLBlock}
    assert sum(isinstance(m, kinds[block]) for m in model) == 3
    for m in model.modules():  # weights away from their initialization, so the test is not of the init
        if isinstance(m, ln.SLLBlock):
            with torch.no_grad():
                m.weight.mul_(3.0).add_(0.1 * torch.randn_like(m.weight))
                m.bias.normal_()
                m.q.normal_()
    model.eval()
    bound = lipschitz_bound(model)
    assert bound <= 1.001
    x = torch.rand(16, 3, 32, 32)
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    with torch.no_grad():
        fx, fy = model(x), model(y)
        plain = export(model)
        torch.testing.assert_close(plain(x), fx, rtol=1e-4, atol=1e-5)
    ratio = (fx - fy).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert ratio.max() <= bound


def test_default_configs_build():
    assert set(MODELS) == {"mnist-convnet", "cifar-liresnet", "imagenet-liresnet", "scatter-net"}
    assert sum(p.numel() for p in mnist_convnet().parameters()) > 100_000
    assert sum(p.numel() for p in cifar_liresnet().parameters()) > 1_000_000


def test_scatter_net_shapes_and_bound():
    torch.manual_seed(0)
    for head, hidden in (("plain", 0), ("ortho", 32)):
        model = build_model("scatter-net", head=head, hidden=hidden, input_radius=8.0).eval()
        out = model(torch.rand(3, 1, 28, 28))
        assert out.shape == (3, 10) and torch.isfinite(out).all()
        bound = lipschitz_bound(model)
        if head == "ortho":  # every layer 1-Lipschitz
            assert bound <= 1.0 + 1e-4
        else:  # the plain head's spectral norm, nothing assumed
            assert bound >= torch.linalg.matrix_norm(model[-1].weight.detach(), ord=2) * (1 - 1e-6)
    cifar = build_model("scatter-net", in_channels=3, image_size=32, mean=(0.5, 0.5, 0.5))
    assert cifar(torch.rand(2, 3, 32, 32)).shape == (2, 10) and cifar[1].out_shape == (3 * 81, 8, 8)
    with pytest.raises(ValueError, match="head"):
        build_model("scatter-net", head="dense")


def test_imagenet_config_runs_a_forward_pass():
    torch.manual_seed(0)
    model = build_model("imagenet-liresnet").eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_std_normalization_enters_the_bound():
    model = mnist_convnet(width=4, hidden=8, mean=(0.1307,), std=(0.3081,)).eval()
    assert lipschitz_bound(model) == pytest.approx(1 / 0.3081, rel=2e-3)


def test_bad_configs():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet50")
    with pytest.raises(ValueError, match="divisible"):
        liresnet(image_size=30, stem_stride=4)
    with pytest.raises(ValueError, match="halved"):
        liresnet(image_size=12, blocks=(1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"block must be one of \('convex', 'sll'\), got 'cpl'"):
        liresnet(block="cpl")


def test_augment_batch_crops_and_flips_per_sample():
    from lipnet.training import augment_batch
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, g, pad=2)
    assert out.shape == x.shape
    for i in range(2):  # every output is a (possibly flipped) window of the zero-padded input
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        windows = [padded[:, a:a + 6, b:b + 6] for a in range(5) for b in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    outs = torch.stack([augment_batch(x, g, pad=2) for _ in range(20)])
    assert not all(torch.equal(o, outs[0]) for o in outs)


SMALL = {"mnist-convnet": ({"width": 4, "hidden": 16}, (2, 1, 28, 28)),
         "cifar-liresnet": ({"width": 4, "blocks": (1, 1, 1), "hidden": 16}, (2, 3, 32, 32)),
         "imagenet-liresnet": ({"width": 4, "blocks": (1, 1, 1, 1), "hidden": 16}, (1, 3, 224, 224)),
         "scatter-net": ({}, (2, 1, 28, 28))}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_refuses_inputs_outside_the_pixel_box_its_radii_are_stated_in(name):
    config, shape = SMALL[name]
    torch.manual_seed(0)
    model = build_model(name, **config).eval()
    norm = model[0]
    assert norm.input_range == (0.0, 1.0)
    x = torch.rand(shape)
    with torch.no_grad():
        model(x)
        model(x.round())  # the box's corners are inside
        for bad, says in ((x * 255, "divide by 255"), (x - 0.5, r"\[-0\.4"),
                          (x.masked_fill(x > 0.9, float("nan")), "nan")):
            with pytest.raises(ValueError, match=says):
                model(bad)
        with pytest.raises(TypeError, match="uint8"):
            model((x * 255).to(torch.uint8))
        with pytest.raises(ValueError, match="0-255"):
            export(model)(x * 255)  # the exported model keeps the check
        ln.set_input_checks(False)
        try:
            model(x * 255)  # the global switch turns every input check off
        finally:
            ln.set_input_checks(True)
        norm.input_range = None
        model(x - 0.5)  # an attack on the whole ball lifts the check


def test_input_range_is_validated():
    with pytest.raises(ValueError, match="input_range"):
        InputNormalization([0.5], input_range=(1.0, 0.0))
    with pytest.raises(ValueError, match="input_range"):
        InputNormalization([0.5], input_range=(0.0, float("inf")))
