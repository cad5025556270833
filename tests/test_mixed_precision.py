"""Training under torch.autocast (CPU bf16 here; CUDA fp16/bf16 take the same code path): every layer
runs, buffers and parameters keep their dtype, the constrained weights are built in fp32, and
certification is fp32 whatever context it is called from."""

import pytest
import torch
from torch import nn

import lipnet.nn as ln
from lipnet.certify import certified_accuracy, network_lipschitz_bound
from lipnet.models import cifar_liresnet, mnist_convnet

IMAGE = (4, 4, 8, 8)


def layers():
    """(name, module, input shape): every lipnet.nn layer kind with parameters or buffers, and the glue."""
    conv_in = IMAGE
    return [
        ("OrthoLinear", ln.OrthoLinear(12, 6), (4, 12)),
        ("OrthoLinear-polar", ln.OrthoLinear(12, 6, parametrization="polar"), (4, 12)),
        ("AOLLinear", ln.AOLLinear(12, 6), (4, 12)),
        ("OrthoConv2d", ln.OrthoConv2d(4, 4, 3), conv_in),
        ("OrthoConv2d-strided", ln.OrthoConv2d(4, 8, 3, stride=2, padding=1), conv_in),
        ("OrthoConv2d-rko", ln.OrthoConv2d(4, 16, 2, stride=2, padding=0), conv_in),
        ("OrthoConv2d-polar", ln.OrthoConv2d(4, 4, 3, parametrization="polar"), conv_in),
        ("OrthoConv2d-transposed", ln.OrthoConv2d(4, 4, 3, transposed=True, padding_mode="zeros"), conv_in),
        ("AOLConv2d", ln.AOLConv2d(4, 4, 3), conv_in),
        ("SLLBlock-dense", ln.SLLBlock(12, 8), (4, 12)),
        ("SLLBlock-conv", ln.SLLBlock(4, 6, kernel_size=3), conv_in),
        ("BatchCentering", ln.BatchCentering(4), conv_in),
        ("LayerCentering", ln.LayerCentering(4), conv_in),
        ("ConvexResidual", ln.ConvexResidual(nn.Sequential(ln.OrthoConv2d(4, 4, 3), ln.MaxMin()), learnable=True), conv_in),
        ("pools", nn.Sequential(ln.L2NormPool2d(2), ln.ScaledAvgPool2d(2), ln.GlobalL2NormPool2d(), ln.Flatten()), conv_in),
        ("glue", nn.Sequential(ln.InputNormalization((0.5,) * 4), ln.L2BallProjection(3.0), ln.Abs(), ln.FirstChannels(2)), conv_in),
        ("GroupNormalization", nn.Sequential(ln.GroupNormalization(2, 4, eps=1.0), ln.OrthoConv2d(4, 4, 3)), conv_in),
    ]


@pytest.mark.parametrize("name,module,shape", layers(), ids=[n for n, _, _ in layers()])
def test_every_layer_trains_under_bf16_autocast(name, module, shape):
    torch.manual_seed(0)
    dtypes = {k: v.dtype for k, v in module.state_dict().items()}
    x = torch.randn(shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert torch.isfinite(out).all()
    params = [p for p in module.parameters() if p.requires_grad]
    if params:
        out.float().square().mean().backward()
        assert all(p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all() for p in params)
        torch.optim.Adam(params, lr=1e-3).step()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module(x)  # after a step: the retraction of the stored factors runs under autocast too
    assert {k: v.dtype for k, v in module.state_dict().items()} == dtypes  # buffers and parameters keep their dtype
    # AOL is 1-Lipschitz by its theorem, its certified bound may exceed 1 by the Gram iteration's k^(1/256)
    assert ln.lipschitz_bound(module.eval()) <= (1.01 if name.startswith("AOL") else 1 + 1e-4)


def test_constrained_weights_are_built_in_fp32_under_autocast():
    torch.manual_seed(0)
    conv = ln.OrthoConv2d(4, 8, 3, stride=2, padding=1, parametrization="polar")
    seen = []
    original = torch.nn.functional.conv2d

    def spy(x, w, *args, **kw):
        seen.append(w.dtype)
        return original(x, w, *args, **kw)

    torch.nn.functional.conv2d = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(torch.randn(IMAGE))
    finally:
        torch.nn.functional.conv2d = original
    # the kernel handed to the convolution is fp32 (autocast casts it at the call, not before)
    assert torch.float32 in seen and out.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ln.lipschitz_bound(conv.eval())
    assert inside == ln.lipschitz_bound(conv)


@pytest.mark.parametrize("build,shape", [(lambda: cifar_liresnet(width=8, blocks=(1, 1, 1)), (16, 3, 32, 32)),
                                         (lambda: mnist_convnet(width=4, hidden=32), (16, 1, 28, 28))],
                         ids=["cifar_liresnet", "mnist_convnet"])
def test_a_model_trained_under_autocast_certifies_as_in_fp32(build, shape):
    torch.manual_seed(0)
    model = build()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g)
    loss_fn = ln.LipschitzCrossEntropy(temperature=0.25, offset=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert all(p.dtype == torch.float32 for p in model.parameters())
    batches = [(x, y)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = certified_accuracy(model, batches, [0.1, 0.5])
    outside = certified_accuracy(model, batches, [0.1, 0.5])
    assert torch.equal(inside.radii, outside.radii) and inside.lipschitz_bound == outside.lipschitz_bound
    assert outside.lipschitz_bound == network_lipschitz_bound(model) <= 1 + 1e-4
