"""Frozen prefixes computed once (lipnet.privacy.precompute_frozen_prefix): same mechanism, sound bound."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lipnet.nn as ln
from lipnet.data import DATASETS, ImageDataset
from lipnet.models import mnist_convnet, scatter_net
from lipnet.privacy import PrivateTrainer, gradient_norm_bounds, precompute_frozen_prefix, split_frozen_prefix
from lipnet.privacy import private_trainable


def _digits(n: int = 300, seed: int = 0, size: int = 16) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    templates = torch.rand(10, 1, size, size, generator=torch.Generator().manual_seed(99))
    x = (0.7 * templates[labels] + 0.3 * torch.rand(n, 1, size, size, generator=g)).clamp(0, 1)
    return ImageDataset((x * 255).round().to(torch.uint8), labels, DATASETS["mnist"])


def test_split_frozen_prefix_stops_at_the_first_trainable_layer():
    model = scatter_net(image_size=16, J=2, L=4, hidden=8, head="ortho")
    prefix, head = split_frozen_prefix(model)
    assert [type(m) for m in prefix] == [ln.InputNormalization, ln.Scattering2d, ln.Flatten]
    assert head[0] is model[3] and len(prefix) + len(head) == len(model)
    with pytest.raises(TypeError, match="Sequential"):
        split_frozen_prefix(ln.MaxMin())


def test_features_are_the_prefix_outputs_and_their_bound_holds():
    data = _digits()
    model = scatter_net(image_size=16, J=2, L=4, input_radius=2.0)
    model.eval()
    frozen = precompute_frozen_prefix(model, data, input_bound=16.0, batch_size=64, progress=False)
    assert not any(m.training for m in model.modules())  # every layer's own mode is left as it was
    x = data.images.float() / 255
    prefix, _ = split_frozen_prefix(model)
    with torch.no_grad():
        assert torch.allclose(frozen.dataset.features, prefix(x), atol=1e-6)
    norms = frozen.dataset.features.flatten(1).norm(dim=1)
    assert norms.max() <= frozen.bound * (1 + 1e-6)
    assert norms.max() >= 0.5 * frozen.bound  # the projection to radius 2 is active: the bound is not vacuous
    assert frozen.bound <= 2.0 * (1 + 1e-5)   # Lip(scattering) <= 1 and S(0) = 0


def test_training_on_features_is_the_same_mechanism_as_on_the_whole_model():
    data = _digits(size=28)
    runs = []
    for cached in (False, True):
        torch.manual_seed(0)
        model = mnist_convnet(width=4, hidden=16, centering="none", input_radius=3.0).double()
        params = private_trainable(model, "dense", freeze_bias=True)  # convs frozen: a 16-layer frozen prefix
        opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)
        kw = dict(loss=ln.LipschitzCrossEntropy(0.1, 0.0), target_delta=1e-3, noise_multiplier=1.0, sample_rate=0.2,
                  seed=3, progress=False)
        if cached:
            frozen = precompute_frozen_prefix(model, data, 28.0, progress=False)
            trainer = PrivateTrainer(frozen.head, opt, frozen.dataset, input_bound=frozen.bound, input_shape=frozen.shape, **kw)
            whole = gradient_norm_bounds(model, 28.0, kw["loss"], (1, 28, 28))
            head = trainer.sensitivity()
            assert [b.bound for b in head.bounds] == pytest.approx([b.bound for b in whole.bounds], rel=1e-9)
        else:
            trainer = PrivateTrainer(model, opt, data, input_bound=28.0, **kw)
        for _ in range(2):
            trainer.train_epoch()
        runs.append(([p.detach().clone() for p in params], trainer.epsilon()))
    (a, eps_a), (b, eps_b) = runs
    assert eps_a == eps_b
    for pa, pb in zip(a, b):
        assert torch.allclose(pa, pb, atol=1e-9), float((pa - pb).abs().max())


def test_nothing_to_train_and_batch_coupled_prefixes_are_refused():
    data = _digits(50, size=28)
    model = nn.Sequential(ln.InputNormalization((0.1,)), ln.Flatten())
    with pytest.raises(ValueError, match="nothing to train"):
        precompute_frozen_prefix(model, data, 16.0, progress=False)
    model = mnist_convnet(width=4, hidden=16, centering="batch")
    private_trainable(model, "dense")
    with pytest.raises(TypeError, match="BatchCentering"):
        precompute_frozen_prefix(model, data, 16.0, progress=False)


def test_fit_private_evaluates_on_cached_test_features_with_the_whole_models_bound():
    # Per-epoch evaluation runs the head on test features computed once; the certificates must equal
    # those of the whole model on raw test images (radii need the prefix's Lipschitz bound too).
    from lipnet.certify import certified_accuracy
    from lipnet.data import BatchLoader
    from lipnet.presets import TrainConfig
    from lipnet.training import fit_private

    train, test = _digits(400, seed=0), _digits(120, seed=1)
    config = TrainConfig.from_preset("mnist", private=True, model="scatter-net", epochs=4, batch_size=100, lr=0.5,
                                     privacy={"epsilon": 1e3, "delta": 1e-3, "accountant": "rdp", "input_bound": 16.0},
                                     eval_eps=(0.05, 0.2))
    model = scatter_net(image_size=16, J=2, L=4, input_radius=4.0)
    history = fit_private(model, train, BatchLoader(test, 50), config, progress=False, log=lambda _: None)
    direct = certified_accuracy(model, BatchLoader(test, 50), config.eval_eps)
    assert history[-1]["clean"] == direct.clean and history[-1]["certified"] == direct.certified
    assert history[-1]["lipschitz_bound"] == direct.lipschitz_bound
    assert 0 < direct.certified[0.05] and direct.clean > 0.2   # something is certified: the comparison bites


def test_features_are_cached_once_and_any_change_gives_another_key(tmp_path, monkeypatch):
    data = _digits(64)
    model = scatter_net(image_size=16, J=2, L=4, input_radius=2.0, norm_groups=5)
    first = precompute_frozen_prefix(model, data, 16.0, progress=False, cache_dir=tmp_path)
    files = list(tmp_path.glob("frozen-*.pt"))
    assert len(files) == 1
    # a second call reads the file: the prefix runs only on the bound's zero probe (one sample)
    calls, forward = [], ln.Scattering2d.forward
    monkeypatch.setattr(ln.Scattering2d, "forward", lambda self, x: calls.append(len(x)) or forward(self, x))
    again = precompute_frozen_prefix(model, data, 16.0, progress=False, cache_dir=tmp_path)
    assert calls == [1] and torch.equal(again.dataset.features, first.dataset.features) and again.bound == first.bound
    monkeypatch.undo()
    # the bound is the prefix's, never the file's: GroupNormalization's sqrt(entries)
    assert first.bound == pytest.approx(ln.GroupNormalization.output_norm_bound((25, 4, 4)))
    assert (first.dataset.features.norm(dim=1) <= first.bound * (1 + 1e-6)).all()
    # other data, another bound or other filters: other keys, so other files
    precompute_frozen_prefix(model, _digits(64, seed=1), 16.0, progress=False, cache_dir=tmp_path)
    precompute_frozen_prefix(model, data, 8.0, progress=False, cache_dir=tmp_path)
    with torch.no_grad():
        model[2].phi_hat.mul_(0.5)
    precompute_frozen_prefix(model, data, 16.0, progress=False, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("frozen-*.pt"))) == 4
    # a truncated file is recomputed and replaced, not trusted
    files[0].write_bytes(files[0].read_bytes()[:100])
    with torch.no_grad():
        model[2].phi_hat.mul_(2.0)
    fresh = precompute_frozen_prefix(model, data, 16.0, progress=False, cache_dir=tmp_path)
    torch.testing.assert_close(fresh.dataset.features, first.dataset.features)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tmp") == []
