"""export(model): plain torch, same outputs, same bound; state_dict round trips; runs without lipnet."""

import io
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import lipnet.nn as ln


def small_model() -> nn.Sequential:
    return nn.Sequential(
        ln.OrthoConv2d(3, 8, 3), ln.MaxMin(), ln.OrthoConv2d(8, 16, 3, stride=2, padding=1), ln.BatchCentering(16),
        ln.GroupSort(2), ln.AOLConv2d(16, 16, 3), ln.Abs(), ln.L2NormPool2d(2), ln.OrthoConv2d(16, 32, 2, stride=2, padding=0),
        ln.HouseHolder(32), ln.ScaledAvgPool2d(2), ln.Flatten(), ln.OrthoLinear(32, 24),
        ln.ConvexResidual(ln.SLLBlock(24, 12), 0.5, learnable=True), ln.FullSort(),
        ln.AOLLinear(24, 16), ln.LayerCentering(16), ln.FirstChannels(10),
    )


def randomize(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


LAYERS = [
    (lambda: ln.OrthoLinear(5, 7), (3, 5)), (lambda: ln.AOLLinear(6, 4), (3, 6)),
    (lambda: ln.OrthoConv2d(4, 4, 3), (2, 4, 8, 8)),
    (lambda: ln.OrthoConv2d(4, 8, 3, stride=2, padding=1), (2, 4, 8, 8)),
    (lambda: ln.OrthoConv2d(4, 16, 2, stride=2, padding=0), (2, 4, 8, 8)),
    (lambda: ln.OrthoConv2d(4, 8, 3, groups=2, dilation=2, padding_mode="zeros"), (2, 4, 8, 8)),
    (lambda: ln.OrthoConv2d(8, 4, 3, stride=2, padding=1, transposed=True, output_padding=1), (2, 8, 4, 4)),
    (lambda: ln.OrthoConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1), (2, 8, 4, 4)),
    (lambda: ln.OrthoConvTranspose2d(8, 4, 2, stride=2, padding=0, parametrization="polar"), (2, 8, 4, 4)),
    (lambda: ln.AOLConv2d(4, 6, 3, stride=2, padding=1), (2, 4, 8, 8)),
    (lambda: ln.SLLBlock(6, 4), (3, 6)), (lambda: ln.SLLBlock(4, 6, kernel_size=3), (2, 4, 5, 5)),
    (lambda: ln.ConvexResidual(ln.OrthoLinear(4, 4), 0.3, learnable=True), (3, 4)),
]


@pytest.mark.parametrize("make,shape", LAYERS)
def test_every_layer_exports_exactly(make, shape):
    torch.manual_seed(0)
    layer = make()
    randomize(layer)
    layer.eval()
    x = torch.randn(shape)
    exported = ln.export(layer)
    assert not any(parametrize.is_parametrized(m) for m in exported.modules())
    assert not any(type(m).__module__.startswith("orthogonium") for m in exported.modules())
    torch.testing.assert_close(exported(x), layer(x), rtol=1e-5, atol=1e-6)
    assert ln.lipschitz_bound(exported) == pytest.approx(ln.lipschitz_bound(layer), rel=1e-9)


def test_whole_model_export_state_dict_round_trip_and_accuracy():
    torch.manual_seed(0)
    model = small_model()
    randomize(model)
    x = torch.rand(32, 3, 16, 16)
    model.train()
    model(x)  # updates BatchCentering's running mean
    model.eval()
    ref = model(x)
    # state_dict holds raw parameters only (no derived weights) and round-trips into a fresh model
    sd = model.state_dict()
    constrained = [k for k in sd if k.split(".")[0] in ("0", "2", "5", "8", "12", "15") and "weight" in k]
    assert constrained and all(k.endswith(".original") for k in constrained), constrained
    fresh = small_model()
    fresh.load_state_dict(sd)
    fresh.eval()
    torch.testing.assert_close(fresh(x), ref)
    exported = ln.export(fresh)
    torch.testing.assert_close(exported(x), ref, rtol=1e-5, atol=1e-6)
    assert (exported(x).argmax(1) == ref.argmax(1)).all()  # same predictions -> same accuracy
    assert model.training is False and fresh.training is False
    buffer = io.BytesIO()  # torch.save / torch.load of the exported module
    torch.save(exported, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), exported(x))
    kinds = {type(m) for m in exported.modules()}
    assert nn.Conv2d in kinds and nn.Linear in kinds and ln.OrthoConv2d not in kinds


def test_scripted_export_runs_without_lipnet(tmp_path):
    torch.manual_seed(0)
    model = small_model().eval()
    x = torch.rand(4, 3, 16, 16)
    ref = model(x)
    path = tmp_path / "model.pt"
    torch.jit.script(ln.export(model)).save(str(path))
    torch.save(x, tmp_path / "x.pt")
    torch.save(ref, tmp_path / "ref.pt")
    code = (
        "import sys; sys.modules['lipnet'] = None; sys.modules['orthogonium'] = None\n"
        "import torch\n"
        f"m = torch.jit.load(r'{path}')\n"
        f"x = torch.load(r'{tmp_path / 'x.pt'}'); ref = torch.load(r'{tmp_path / 'ref.pt'}')\n"
        "torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-6); print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_export_does_not_touch_the_model_and_refuses_unknown_parametrizations():
    model = small_model().train()
    ln.export(model)
    assert model.training
    odd = nn.Linear(3, 3)
    parametrize.register_parametrization(odd, "weight", nn.Identity())
    with pytest.raises(TypeError, match="no exporter"):
        ln.export(nn.Sequential(odd))


def test_export_gives_every_submodule_its_own_mode_back():
    model = nn.Sequential(ln.OrthoLinear(4, 4), nn.Dropout(0.5), ln.MaxMin(), ln.OrthoLinear(4, 2)).train()
    model[1].eval()  # deliberately kept in eval inside a train-mode model
    exported = ln.export(model)
    assert model.training and model[0].training and not model[1].training and model[3].training
    assert not exported.training and not any(m.training for m in exported.modules())
