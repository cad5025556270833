"""The certified models shipped in the package: they load safely, their bound is recomputed from
their weights, they reproduce their recorded accuracy, and attacks cannot beat their certificates."""

from __future__ import annotations

import json

import pytest
import torch

from lipnet import data as lipdata
from lipnet.certify import certified_radius, network_lipschitz_bound, pgd_l2
from lipnet.cli import main
from lipnet.pretrained import PRETRAINED, load_pretrained, pretrained, pretrained_names
from lipnet.pretrained import WEIGHTS_DIR, pretrained_path


def _first_test_images(name: str, data_root, n: int):
    test = lipdata.load_dataset(PRETRAINED[name].dataset, "test", data_root, limit=n, progress=False)
    return test.images.float() / 255 if test.images.dtype == torch.uint8 else test.images, test.labels


def test_the_package_ships_the_readme_models_within_25_mb():
    assert {"cifar10", "mnist", "fashion-mnist"} <= set(pretrained_names())
    sizes = [pretrained_path(name).stat().st_size for name in pretrained_names()]
    assert sum(sizes) <= 25 * 2**20
    assert sorted(p.name for p in WEIGHTS_DIR.glob("*.pt")) == sorted(PRETRAINED[n].file for n in PRETRAINED)


@pytest.mark.parametrize("name", pretrained_names())
def test_each_shipped_model_keeps_its_bound_and_its_accuracy(name, data_root):
    model, config = load_pretrained(name)
    assert config.dataset == PRETRAINED[name].dataset and not model.training
    bound = network_lipschitz_bound(model)
    assert bound <= 1 + 1e-4
    x, y = _first_test_images(name, data_root, 500)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).double().mean().item()
    assert abs(clean - PRETRAINED[name].clean_limit_500) <= 0.01


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known: \\[.*'cifar10'"):
        pretrained("cifar-10")
    with pytest.raises(ValueError, match="unknown pretrained model"):
        load_pretrained("../../etc/passwd")


def test_pgd_below_the_certified_radius_never_flips_the_shipped_cifar10_model(data_root):
    """The certificate of the shipped weights is sound: PGD (margin loss, 30 steps, whole ball) at
    0.99x each point's certified radius never changes a certified prediction."""
    model = pretrained("cifar10")
    model[0].input_range = None  # the whole ball: the certificate covers inputs outside the pixel box too
    x, y = _first_test_images("cifar10", data_root, 64)
    bound = network_lipschitz_bound(model)
    with torch.no_grad():
        logits = model(x)
    radius = certified_radius(logits, bound, x)
    pred = logits.argmax(1)
    certified = (radius > 0) & (pred == y)
    assert certified.sum() >= 20  # enough points for the attack to mean something
    adv = pgd_l2(model, x[certified], pred[certified], 0.99 * radius[certified], steps=30, clamp=None,
                 generator=torch.Generator().manual_seed(0))
    assert ((adv - x[certified]).flatten(1).norm(dim=1) <= radius[certified] * (1 + 1e-5)).all()
    with torch.no_grad():
        assert (model(adv).argmax(1) == pred[certified]).all()
    # the same attack with 3x the budget does flip some: it is strong enough to find a flip
    far = pgd_l2(model, x[certified], pred[certified], 3 * radius[certified] + 0.1, steps=30, clamp=None,
                 generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(far).argmax(1) != pred[certified]).any()


def test_certify_pretrained_from_the_command_line(tmp_path, data_root, capsys):
    result = tmp_path / "cert.json"
    rc = main(["certify", "--pretrained", "cifar10", "--limit", "100", "--pgd-steps", "0", "--json", str(result),
               "--plot", str(tmp_path / "c.png"), "--data-root", str(data_root), "--no-progress"])
    assert rc == 0
    res = json.loads(result.read_text())
    assert res["dataset"] == "cifar10" and res["n"] == 100 and res["lipschitz_bound"] <= 1 + 1e-4
    out = capsys.readouterr().out
    assert "sound upper bound" in out and "PGD" not in out  # no attack run, no attack column
    with pytest.raises(SystemExit):  # one model source, not both
        main(["certify", "--pretrained", "cifar10", "--checkpoint", str(tmp_path)])
