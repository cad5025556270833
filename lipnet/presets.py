"""Training presets: per-dataset defaults, named presets, and the ``TrainConfig`` a run stores.

``TrainConfig.from_preset(dataset)`` is what ``lipnet train --dataset D`` trains; ``preset=`` picks a
named one (``NAMED_PRESETS``); ``private=True`` the private-training recipe of
:mod:`lipnet.privacy.recipe`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch

from .data import DATASETS
from .models import MODELS
from .nn.parametrizations import DEFAULT_PARAMETRIZATION
from .validate import finite_nonnegative, finite_positive, nonnegative_int, one_of, open_unit, positive_int, unit_interval


@dataclass
class Preset:
    """Per-dataset defaults: the model, its config, the certification radii to report, training."""

    model: str
    model_config: dict
    eval_eps: tuple[float, ...]
    epochs: int
    batch_size: int
    lr: float
    offset: float       # LipschitzCrossEntropy offset: asks for margin `offset`, radius offset/sqrt(2) at L=1
    temperature: float
    augment: bool
    amp: str | None = None  # mixed precision of the training steps (see amp_dtype)
    channels_last: bool = False  # image batches in channels-last memory format (TrainConfig.channels_last)
    optimizer: str = "adam"  # TrainConfig.optimizer (the Muon-type ones at DEFAULT_MATRIX_LR on the matrices)


PRESETS: dict[str, Preset] = {
    "mnist": Preset("mnist-convnet", {"mean": (0.1307,)}, (0.5, 1.0, 1.58), 10, 256, 2e-3, 2.5, 0.25, False),
    "fashion-mnist": Preset("mnist-convnet", {"mean": (0.2860,)}, (0.1, 0.5, 1.0), 10, 256, 2e-3, 1.0, 0.25, False),
    "cifar10": Preset("cifar-liresnet", {"mean": (0.4914, 0.4822, 0.4465), "width": 32, "blocks": (1, 1, 1),
                                         "hidden": 256},
                      (36 / 255, 72 / 255, 108 / 255), 30, 256, 2e-3, 0.45, 0.125, True,
                      channels_last=True, optimizer="turbomuon"),
    # the cifar10 recipe with CIFAR-100's statistics and 100 classes (not tuned for CIFAR-100)
    "cifar100": Preset("cifar-liresnet", {"mean": (0.5071, 0.4865, 0.4409), "width": 32, "blocks": (1, 1, 1),
                                          "hidden": 256, "num_classes": 100},
                       (36 / 255, 72 / 255, 108 / 255), 30, 256, 2e-3, 0.45, 0.125, True,
                       channels_last=True, optimizer="turbomuon"),
}
# The cifar10 preset is sized for 2 CPU cores: width 32, one residual block per stage and a 256-wide
# dense head (a 512-wide one's 8192x512 orthogonal factor dominates the step's retraction), fp32 steps
# on channels-last batches, TurboMuon on the matrices, margin 0.45 (chosen on a held-out split).
# Its timings and the choices' measurements: docs/certification.md#cifar-10-on-two-cpu-cores.

# Presets chosen by name (`lipnet train --preset NAME`), beyond each dataset's default: (dataset, preset).
NAMED_PRESETS: dict[str, tuple[str, Preset]] = {
    # the LiResNet-style network at its full size (width 64, two blocks per stage, 512-wide head),
    # fp32, 100 epochs: sized for a GPU (several times the cifar10 preset's time per epoch)
    "cifar10-gpu": ("cifar10", Preset("cifar-liresnet", {"mean": (0.4914, 0.4822, 0.4465)},
                                      (36 / 255, 72 / 255, 108 / 255), 100, 256, 1e-3, 0.3, 0.125, True)),
}


# `TrainConfig.optimizer` choices, and the matrices' peak lr of the Muon-type ones when none is given
# (chosen for TurboMuon on an MNIST held-out split: benchmarks/results/README.md#train-optimizer)
OPTIMIZERS = ("adam", "turbomuon", "schatten")
PRIVATE_OPTIMIZERS = ("sgd", "adam")   # private training: on the trainable parameters, noisy gradients
DEFAULT_MATRIX_LR = 0.05
# `TrainConfig.amp` names and their autocast dtypes ("fp32" on the command line: None, no autocast)
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_setting(value: str | None) -> str | None:
    """A ``--amp`` value as ``TrainConfig.amp`` stores it: "fp32" (no autocast) is None."""
    return None if value == "fp32" else value


def preset_names(dataset: str | None = None) -> list[str]:
    """Every preset name ``TrainConfig.from_preset(preset=...)`` accepts (those of ``dataset`` only,
    if given): the dataset names (their default presets) and ``NAMED_PRESETS``."""
    names = [d for d in PRESETS if dataset in (None, d)]
    return sorted(names + [n for n, (d, _) in NAMED_PRESETS.items() if dataset in (None, d)])


def takes_parametrization(model: str | None) -> bool:
    """Whether the named model builder has orthogonal layers with a ``parametrization`` choice."""
    return model in MODELS and "parametrization" in inspect.signature(MODELS[model]).parameters


@dataclass(frozen=True)
class PrivacyConfig:
    """The mechanism of a private run (``lipnet train --dp``, :func:`lipnet.training.fit_private`):
    noise calibrated to spend ``epsilon`` at ``delta`` over the run's epochs, inputs projected onto
    the L2 ball of radius ``input_bound`` (raw pixels), the opacus ``accountant``, the ``noise``
    calibration across tensors, which layers train (``trainable``, ``freeze_bias``), the SGD
    ``momentum`` (when ``TrainConfig.optimizer`` is "sgd"), and ``loss_clip`` (the per-sample
    logit-gradient norm the noise is calibrated to, :class:`lipnet.nn.ClippedLossGradient`; None or
    0: the loss' own bound). ``precompute``: run a frozen leading prefix once per example (the same
    mechanism, :func:`lipnet.privacy.precompute_frozen_prefix`)."""

    epsilon: float
    input_bound: float
    delta: float = 1e-5
    accountant: str = "rdp"
    noise: str = "per_layer"
    momentum: float = 0.0
    trainable: str = "dense"
    freeze_bias: bool = True
    loss_clip: float | None = None
    precompute: bool = True

    def __post_init__(self) -> None:
        from .privacy.engine import ACCOUNTANTS, NOISE_MODES  # lazily: lipnet.privacy imports opacus
        from .privacy.recipe import TRAINABLE

        finite_positive(self.epsilon, "epsilon")
        open_unit(self.delta, "delta")
        finite_positive(self.input_bound, "input_bound")
        one_of(self.accountant, ACCOUNTANTS, "accountant")
        one_of(self.noise, NOISE_MODES, "noise")
        one_of(self.trainable, TRAINABLE, "trainable")
        unit_interval(self.momentum, "momentum")
        if self.loss_clip is not None:
            finite_nonnegative(self.loss_clip, "loss_clip")
            if self.loss_clip == 0:
                object.__setattr__(self, "loss_clip", None)   # 0: no clipping, stored as None


@dataclass(frozen=True)
class TrainConfig:
    """Everything needed to re-run a training job (stored in the checkpoint), validated once here:
    a run trains exactly what its config says."""

    dataset: str
    epochs: int
    batch_size: int
    lr: float
    offset: float
    temperature: float
    augment: bool
    model: str
    model_config: dict = field(default_factory=dict)
    eval_eps: tuple[float, ...] = ()
    seed: int = 0
    limit: int | None = None
    # evaluate on this many training images (a fixed seed-0 permutation's last ones, left out of
    # training) instead of the test split: for choosing a recipe without looking at the test set
    holdout: int | None = None
    # private training's mechanism; None = not private
    privacy: PrivacyConfig | None = None
    # mixed precision of the training steps: "bf16", "fp16" (CUDA only) or None (fp32, also given as
    # "fp32"); evaluation is always fp32
    amp: str | None = None
    # training batches of images (4-D) in channels-last memory format: the same function (up to float
    # rounding order), faster convolutions on CPU (benchmarks/train_step.py)
    channels_last: bool = False
    # "adam": Adam on every parameter (lr); "turbomuon" / "schatten": TurboMuon / SchattenMuon (adaptive p)
    # on the hidden matrices at matrix_lr, Adam at lr on the rest (lipnet.training.build_optimizer).
    # Private runs: "sgd" (with privacy.momentum) or "adam" on the trainable parameters.
    optimizer: str = "adam"
    matrix_lr: float | None = None

    def __post_init__(self) -> None:
        positive_int(self.epochs, "epochs")
        positive_int(self.batch_size, "batch_size")
        finite_positive(self.lr, "lr")
        finite_nonnegative(self.offset, "offset")
        finite_positive(self.temperature, "temperature")
        nonnegative_int(self.seed, "seed")
        if self.limit is not None:
            positive_int(self.limit, "limit")
        if self.holdout is not None:
            positive_int(self.holdout, "holdout")
        object.__setattr__(self, "eval_eps", tuple(self.eval_eps))
        object.__setattr__(self, "amp", amp_setting(self.amp))
        if self.amp is not None:
            one_of(self.amp, AMP_DTYPES, "amp")
        if isinstance(self.privacy, dict):   # e.g. from a checkpoint's plain config
            object.__setattr__(self, "privacy", PrivacyConfig(**self.privacy))
        if self.privacy is not None:
            self._check_private()
        else:
            one_of(self.optimizer, OPTIMIZERS, "optimizer")
        if self.optimizer in ("turbomuon", "schatten"):
            object.__setattr__(self, "matrix_lr", DEFAULT_MATRIX_LR if self.matrix_lr is None
                               else finite_positive(self.matrix_lr, "matrix_lr"))
        elif self.matrix_lr is not None:
            raise ValueError(f"matrix_lr is the lr of the turbomuon / schatten optimizers' matrices; optimizer "
                             f"{self.optimizer!r} has one lr")

    def _check_private(self) -> None:
        if self.optimizer not in PRIVATE_OPTIMIZERS:
            raise ValueError(f"private training trains with one of {list(PRIVATE_OPTIMIZERS)} (noisy gradients on "
                             f"the trainable parameters), got optimizer {self.optimizer!r}")
        if self.amp is not None:
            raise ValueError("mixed precision (--amp) is not supported with private training (--dp): its gradient "
                             "bounds are computed for fp32")
        if self.holdout is not None:
            raise ValueError("holdout is not available with private training (benchmarks/privacy.py --tune searches "
                             "private recipes on a held-out split)")

    @property
    def private(self) -> bool:
        return self.privacy is not None

    @classmethod
    def from_preset(cls, dataset: str, private: bool = False, model: str | None = None, *,
                    preset: str | None = None, model_overrides: Mapping | None = None,
                    privacy: Mapping | None = None, **overrides) -> TrainConfig:
        """The dataset's preset (``preset``: a named one of that dataset, see :func:`preset_names`);
        ``private``: its private preset for ``model`` (default: the first listed in
        ``PRIVATE_PRESETS[dataset]``), with ``privacy`` giving the :class:`PrivacyConfig` fields the
        preset leaves open (``epsilon``; ``delta`` defaults to 1e-5) and any it overrides. ``model_overrides``:
        keywords of the model builder (e.g. width, block, parametrization), each checked to apply
        to the model. Keyword ``overrides`` set TrainConfig fields. None anywhere keeps the preset's."""
        if dataset not in PRESETS:
            raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(PRESETS)}")
        if preset is None or preset == dataset:
            p = asdict(PRESETS[dataset])
        elif preset in NAMED_PRESETS and NAMED_PRESETS[preset][0] == dataset:
            if private:
                raise ValueError(f"preset {preset!r} is not a private preset; private training uses "
                                 f"PRIVATE_PRESETS[{dataset!r}] (choose among them with model=)")
            p = asdict(NAMED_PRESETS[preset][1])
        else:
            raise ValueError(f"unknown preset {preset!r} for {dataset}; known: {preset_names(dataset)}")
        given = {k: v for k, v in (privacy or {}).items() if v is not None}
        if private:
            p.update(_private_preset(dataset, model, p["eval_eps"], given))
        elif given:
            raise ValueError(f"privacy options {sorted(given)} need private training (--dp)")
        elif model is not None and model != p["model"]:
            p.update(model=model, model_config={"mean": p["model_config"]["mean"]})
        p.update({k: v for k, v in overrides.items() if v is not None})
        p["model_config"] = _model_config(p["model"], p["model_config"], dataset, model_overrides or {})
        return cls(dataset=dataset, **p)


def _private_preset(dataset: str, model: str | None, eval_eps: tuple, privacy: dict) -> dict:
    """TrainConfig fields of ``dataset``'s private preset for ``model``, its PrivacyConfig built
    from the preset and ``privacy``."""
    from .privacy.recipe import PRIVATE_PRESETS  # lazily: lipnet.privacy imports opacus

    if dataset not in PRIVATE_PRESETS:
        raise ValueError(f"no private preset for {dataset}; private presets: {sorted(PRIVATE_PRESETS)}")
    models = PRIVATE_PRESETS[dataset]
    model = model or next(iter(models))
    if model not in models:
        raise ValueError(f"no private preset for model {model!r} on {dataset}; known: {sorted(models)}")
    q = models[model]
    mechanism = {"input_bound": q.input_bound, "noise": q.noise, "momentum": q.momentum if q.optimizer == "sgd" else 0.0,
                 "trainable": q.trainable, "freeze_bias": q.freeze_bias, "loss_clip": q.loss_clip, **privacy}
    if "epsilon" not in mechanism:
        raise ValueError("private training needs epsilon (the privacy budget)")
    return dict(model=model, model_config=dict(q.model_config), batch_size=q.batch_size, lr=q.lr,
                epochs=q.epochs, offset=q.offset, temperature=q.temperature, augment=False, amp=None,
                channels_last=False, optimizer=q.optimizer,
                # private models have small margins: report certificates at smaller radii
                eval_eps=tuple(e / 5 for e in eval_eps), privacy=PrivacyConfig(**mechanism))


def _model_config(model: str, config: dict, dataset: str, overrides: Mapping) -> dict:
    """``config`` with ``overrides`` (each a keyword of ``MODELS[model]``), the dataset's class
    count, and the parametrization recorded (a checkpoint always says how its factors are stored)."""
    builder = inspect.signature(MODELS[model]).parameters if model in MODELS else {}
    config = dict(config)
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in builder:
            raise ValueError(f"--{key} does not apply to {model}")
        config[key] = value
    classes = DATASETS[dataset].num_classes  # the class count comes from the data
    if "num_classes" in builder and builder["num_classes"].default != classes:
        config = {"num_classes": classes, **config}
    if takes_parametrization(model):
        config = {"parametrization": DEFAULT_PARAMETRIZATION, **config}
    return config


__all__ = ["AMP_DTYPES", "DEFAULT_MATRIX_LR", "NAMED_PRESETS", "OPTIMIZERS",
           "PRESETS", "PRIVATE_OPTIMIZERS", "Preset", "PrivacyConfig", "TrainConfig", "amp_setting",
           "preset_names", "takes_parametrization"]
