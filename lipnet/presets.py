"""Training presets: per-dataset defaults, named presets, and the ``TrainConfig`` a run stores.

``TrainConfig.from_preset(dataset)`` is what ``lipnet train --dataset D`` trains; ``preset=`` picks a
named one (``NAMED_PRESETS``); ``private=True`` the private-training recipe of
:mod:`lipnet.privacy.recipe`.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field

from .data import DATASETS
from .models import MODELS
from .nn.parametrizations import DEFAULT_PARAMETRIZATION
from .validate import finite_nonnegative, finite_positive, positive_int


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
# dense head (a 512-wide one's 8192x512 orthogonal factor costs a quarter of each step), fp32 steps
# on channels-last batches, TurboMuon on the matrices, margin 0.45 (chosen on a held-out split).
# Its timings and the choices' measurements: docs/certification.md.

# Presets chosen by name (`lipnet train --preset NAME`), beyond each dataset's default: (dataset, preset).
NAMED_PRESETS: dict[str, tuple[str, Preset]] = {
    # the LiResNet-style network at its full size (width 64, two blocks per stage, 512-wide head),
    # fp32, 100 epochs: sized for a GPU (several times the cifar10 preset's time per epoch)
    "cifar10-gpu": ("cifar10", Preset("cifar-liresnet", {"mean": (0.4914, 0.4822, 0.4465)},
                                      (36 / 255, 72 / 255, 108 / 255), 100, 256, 1e-3, 0.3, 0.125, True)),
}


# `TrainConfig.optimizer` choices, and the matrices' peak lr of the Muon-type ones when none is given
# (the best of 0.005 ... 0.2 for TurboMuon on an MNIST held-out split: benchmarks/results/README.md#train-optimizer)
OPTIMIZERS = ("adam", "turbomuon", "schatten")
DEFAULT_MATRIX_LR = 0.05


def preset_names(dataset: str | None = None) -> list[str]:
    """Every preset name ``TrainConfig.from_preset(preset=...)`` accepts (those of ``dataset`` only,
    if given): the dataset names (their default presets) and ``NAMED_PRESETS``."""
    names = [d for d in PRESETS if dataset in (None, d)]
    return sorted(names + [n for n, (d, _) in NAMED_PRESETS.items() if dataset in (None, d)])


def takes_parametrization(model: str | None) -> bool:
    """Whether the named model builder has orthogonal layers with a ``parametrization`` choice."""
    return model in MODELS and "parametrization" in inspect.signature(MODELS[model]).parameters


@dataclass
class TrainConfig:
    """Everything needed to re-run a training job (stored in the checkpoint)."""

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
    # private training: {"epsilon", "delta", "input_bound", "accountant", "noise"}; None = not private
    dp: dict | None = None
    # mixed precision of the training steps: "bf16", "fp16" (CUDA only) or None (fp32); evaluation is always fp32
    amp: str | None = None
    # training batches of images (4-D) in channels-last memory format: the same function (up to float
    # rounding order), faster convolutions on CPU (benchmarks/train_step.py)
    channels_last: bool = False
    # "adam": Adam on every parameter (lr); "turbomuon" / "schatten": TurboMuon / SchattenMuon (adaptive p)
    # on the hidden matrices at matrix_lr, Adam at lr on the rest (lipnet.training.build_optimizer)
    optimizer: str = "adam"
    matrix_lr: float | None = None

    def __post_init__(self) -> None:
        positive_int(self.epochs, "epochs")
        positive_int(self.batch_size, "batch_size")
        finite_positive(self.lr, "lr")
        finite_nonnegative(self.offset, "offset")
        finite_positive(self.temperature, "temperature")
        if self.limit is not None:
            positive_int(self.limit, "limit")
        if self.holdout is not None:
            positive_int(self.holdout, "holdout")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; known: {list(OPTIMIZERS)}")
        if self.optimizer == "adam":
            if self.matrix_lr is not None:
                raise ValueError("matrix_lr is the lr of the turbomuon / schatten optimizers' matrices; "
                                 "optimizer 'adam' has one lr")
        elif self.matrix_lr is None:
            self.matrix_lr = DEFAULT_MATRIX_LR
        elif not (isinstance(self.matrix_lr, (int, float)) and 0 < self.matrix_lr < float("inf")):
            raise ValueError(f"matrix_lr must be a positive number, got {self.matrix_lr!r}")
        if self.dp is not None and self.optimizer != "adam":
            raise ValueError("private training has its own optimizer (the private preset's); leave optimizer 'adam'")

    @classmethod
    def from_preset(cls, dataset: str, private: bool = False, model: str | None = None, *,
                    preset: str | None = None, **overrides) -> TrainConfig:
        """The dataset's preset (``preset``: a named one of that dataset, see :func:`preset_names`);
        ``private``: its private preset for ``model`` (default: the first listed in
        ``PRIVATE_PRESETS[dataset]``); keyword overrides (None = keep the preset's)."""
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
        if private:
            from .privacy.recipe import PRIVATE_PRESETS  # lazily: lipnet.privacy imports opacus

            if dataset not in PRIVATE_PRESETS:
                raise ValueError(f"no private preset for {dataset}; private presets: {sorted(PRIVATE_PRESETS)}")
            models = PRIVATE_PRESETS[dataset]
            model = model or next(iter(models))
            if model not in models:
                raise ValueError(f"no private preset for model {model!r} on {dataset}; known: {sorted(models)}")
            q = models[model]
            p.update(model=model, model_config=dict(q.model_config), batch_size=q.batch_size, lr=q.lr,
                     epochs=q.epochs, offset=q.offset, temperature=q.temperature, augment=False, amp=None,
                     channels_last=False, optimizer="adam",
                     # private models have small margins: report certificates at smaller radii
                     eval_eps=tuple(e / 5 for e in p["eval_eps"]),
                     dp={"input_bound": q.input_bound, "noise": q.noise, "optimizer": q.optimizer,
                         "momentum": q.momentum, "trainable": q.trainable, "freeze_bias": q.freeze_bias,
                         "loss_clip": q.loss_clip})
        elif model is not None and model != p["model"]:
            p.update(model=model, model_config={"mean": p["model_config"]["mean"]})
        p.update({k: v for k, v in overrides.items() if v is not None})
        classes = DATASETS[dataset].num_classes  # the class count comes from the data
        builder = inspect.signature(MODELS[p["model"]]).parameters if p["model"] in MODELS else {}
        if "num_classes" in builder and builder["num_classes"].default != classes:
            p["model_config"] = {"num_classes": classes, **p["model_config"]}
        if takes_parametrization(p["model"]):  # recorded, so a checkpoint always says how its factors are stored
            p["model_config"] = {"parametrization": DEFAULT_PARAMETRIZATION, **p["model_config"]}
        return cls(dataset=dataset, **p)


__all__ = ["DEFAULT_MATRIX_LR", "NAMED_PRESETS", "OPTIMIZERS", "PRESETS", "Preset", "TrainConfig", "preset_names",
           "takes_parametrization"]
