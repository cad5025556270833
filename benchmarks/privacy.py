"""Clipping-free DP-SGD (lipnet.privacy) vs opacus' DP-SGD with per-sample clipping, side by side.

    LIPNET_DATA=/work/shared/datasets python benchmarks/privacy.py --dataset mnist --eps 1 3 8 --epochs 3 \
        --threads 1 --json benchmarks/results/privacy_cpu.json --md benchmarks/results/privacy_cpu.md
    python benchmarks/privacy.py --quick          # smoke test (< 1 min; synthetic data if no data root)
    python benchmarks/privacy.py --tune ...       # our hyperparameter search on a held-out part of TRAIN

Both sides: the same data, the same Poisson-sampled expected batch size, epochs, epsilon budgets
(delta = 1e-5), threads, and the same architecture family -- ``mnist_convnet``'s layer shapes:
3x3 conv (w) -> 3x3 conv (w) -> 2x2/s2 conv (2w) -> 3x3 conv (2w) -> 2x2/s2 conv (4w) -> dense
(hidden) -> dense (10), MaxMin (GroupSort-2) activations on both sides.

* ours: ``lipnet.models.mnist_convnet`` (orthogonal convs/dense through their parametrizations),
  ``lipnet.privacy.make_private`` (analytic per-sample gradient bound, no clipping), Lipschitz
  cross-entropy; the input is projected onto an L2 ball after mean subtraction (``input_radius``).
* opacus: the same layer shapes as plain ``nn.Conv2d`` / ``nn.Linear`` (opacus cannot take per-sample
  gradients through orthogonal parametrizations) with MaxMin (parameter-free, so opacus' hooks on
  Conv2d/Linear see the same graph), ``PrivacyEngine.make_private_with_epsilon`` (Poisson sampling,
  RDP accountant, per-sample clipping at ``max_grad_norm``), cross-entropy.

Throughput / memory (``--perf-batches``): each (side, batch) measurement runs in a fresh subprocess,
with the configurations of the accuracy runs but every layer trained (``train="all"``) on both sides.
Poisson batches are drawn before the clock starts (data loading is not timed on either side), a few
warm-up steps, then ``--perf-steps`` timed steps; samples/s = drawn samples / wall time of the timed
steps. Peak memory on CPU: VmHWM of the process after the steps, with the high-water mark reset
(``echo 5 > /proc/self/clear_refs``) just before the first (warm-up) step; ``+train`` is that peak minus
the RSS before that step (model, data and batches loaded). On CUDA: ``torch.cuda.max_memory_allocated``
(``+train`` = over the allocation before the first step). Sides alternate, ``--perf-repeats`` times;
the medians are reported, with ratios ours/opacus. With ``--arch scatter`` (needs ``--feature-cache``)
both sides train the linear head on the cached scattering features, the only trainable part of that
family; the features sit in memory before the clock and the high-water-mark reset, so "peak" includes
them on both sides and ``+train`` is the training's own memory.

Accuracy: train each side to each epsilon (sigma calibrated by each side's accountant for the
planned epochs; the epsilon actually spent is read back from the accountant), test accuracy on the
official test split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install
import lipnet.nn as ln  # noqa: E402
from lipnet.data import DATASETS, BatchLoader, ImageDataset, load_dataset  # noqa: E402
from lipnet.models import mnist_convnet, scatter_net  # noqa: E402
from lipnet.privacy import private_loss, private_trainable  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this script
from _harness import machine_info, median, sync  # noqa: E402

warnings.filterwarnings("ignore", message=".*Optimal order is the largest alpha.*")
warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
warnings.filterwarnings("ignore", message=".*full_backward_hook.*")

DELTA = 1e-5

# Our configuration, chosen by ``--tune`` on MNIST (train on 50k, accuracy on the other 10k of the TRAIN
# split, eps=3, 1 epoch; rounds in benchmarks/results/privacy_tune_mnist_*.md). The convolutions stay at their
# random orthogonal initialization (train="dense"): their analytic bounds are 25-40x their actual per-sample
# gradient norms, so noise calibrated to them drowns their gradients, and not training them leaves the whole
# budget to the dense layers (85.2% vs 81.3% held-out, best all-layer configuration).
OURS = dict(width=8, hidden=128, centering="none", input_radius=8.0, freeze_bias=True, batch=1024, lr=0.2,
            optimizer="sgd", momentum=0.9, temperature=0.1, offset=0.0, noise="per_layer", train="dense")
# opacus: its MNIST example's recipe (plain SGD, max_grad_norm 1.0); lr from the same held-out search
# (0.5: 60.2%, 2.0: 86.5%, Adam 3e-3: 86.5%, 4.0: 91.7%, 8.0: diverged; frozen convs at lr 4: 24.5%).
OPACUS = dict(width=8, hidden=128, activation="maxmin", batch=1024, lr=4.0, optimizer="sgd", momentum=0.0,
              max_grad_norm=1.0, train="all")
# --arch scatter: fixed Scattering2d features (J=2, L=8: 81 x 7 x 7 per image, computed once, shared by both
# sides) and a linear head trained privately (Tramer & Boneh 2021's ScatterNet + linear). Chosen by --tune on the
# held-out split (eps=3): benchmarks/results/privacy_tune_scatter_mnist.md.
SCATTER = dict(arch="scatter", J=2, L=8, input_radius=8.0, hidden=0)
OURS_SCATTER = dict(SCATTER, head="plain", freeze_bias=True, batch=4096, lr=0.5, optimizer="sgd", momentum=0.9,
                    temperature=1.0, offset=0.0, noise="per_layer")
OPACUS_SCATTER = dict(SCATTER, batch=4096, lr=8.0, optimizer="sgd", momentum=0.9, max_grad_norm=1.0)


# ----------------------------------------------------------------------------------------------- data
def synthetic(n: int, seed: int = 0) -> ImageDataset:
    """10 classes of 28x28 blobs (a fixed template per class plus noise), for --quick without data."""
    g = torch.Generator().manual_seed(1234)
    templates = torch.rand(10, 1, 28, 28, generator=g)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    x = (0.6 * templates[labels] + 0.4 * torch.rand(n, 1, 28, 28, generator=g)).clamp(0, 1)
    info = dataclasses.replace(DATASETS["mnist"], name="synthetic", mean=(0.5,))
    return ImageDataset((x * 255).round().to(torch.uint8), labels, info)


def get_data(dataset: str, data_root: str | None, holdout: int = 0, limit: int | None = None):
    """(train, eval) ImageDatasets. holdout > 0: eval = the last ``holdout`` examples of a fixed permutation
    of TRAIN, train = the rest (hyperparameter search); else eval = the official test split."""
    if dataset == "synthetic":
        return synthetic(limit or 2000, 0), synthetic(500, 1)
    train = load_dataset(dataset, "train", data_root, progress=False)
    if holdout:
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
        parts = train.subset(perm[:-holdout]), train.subset(perm[-holdout:])
        for part, index in zip(parts, (perm[:-holdout], perm[-holdout:])):
            _PARENT[id(part)] = (train, index)   # --arch scatter: index the full split's (cached) features
        return parts
    test = load_dataset(dataset, "test", data_root, progress=False)
    if limit:
        train = train.subset(torch.arange(min(limit, len(train))))
    return train, test


class FloatDataset(torch.utils.data.Dataset):
    """The same images as float tensors (opacus' DPDataLoader indexes a map-style dataset)."""

    def __init__(self, ds: ImageDataset) -> None:
        self.x, self.y = ds.images.float().div_(255), ds.labels

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


_FEATURES: dict[tuple, tuple] = {}
_PARENT: dict[int, tuple] = {}   # id(subset) -> (full dataset, indices), set by get_data(holdout=...)
FEATURE_CACHE: str | None = None


def hash_images(ds: ImageDataset) -> str:
    import hashlib
    h = hashlib.sha1(ds.images.numpy().tobytes())
    h.update(ds.labels.numpy().tobytes())
    return h.hexdigest()[:12]


def scatter_features(ds: ImageDataset, cfg: dict, device="cpu"):
    """(FeatureDataset of InputNormalization -> L2BallProjection -> Scattering2d of every image, norm bound),
    computed once per dataset and configuration with lipnet.privacy.precompute_frozen_prefix."""
    from lipnet.privacy import FeatureDataset, precompute_frozen_prefix
    # feature_norm="sphere" (a search option only): every feature vector rescaled to the bound, so each sample's
    # ||x|| is the one the noise is calibrated to. Not offered by the library: x -> R x / ||x|| is not Lipschitz,
    # so the model would lose its certificates.
    if cfg.get("feature_norm", "none") == "group":
        # lipnet.nn.GroupNormalization per sample on the scattering channels: every feature vector has norm
        # <= sqrt(entries) whatever the data (the bound the analysis uses), and close to it in practice
        base, _ = scatter_features(ds, dict(cfg, feature_norm="none"), device)
        key = (id(ds), cfg["J"], cfg["L"], cfg["input_radius"], "group", cfg["norm_groups"])
        if key not in _FEATURES:
            f = base.features.view(len(base.features), -1, *_scatter_hw(ds, cfg))
            norm = ln.GroupNormalization(cfg["norm_groups"], f.shape[1])
            out = torch.cat([norm(f[i:i + 4096]) for i in range(0, len(f), 4096)]).flatten(1)
            _FEATURES[key] = (FeatureDataset(out, base.labels), norm.output_norm_bound(f.shape[1:]))
        return _FEATURES[key]
    if cfg.get("feature_norm", "none") == "sphere":
        base, bound = scatter_features(ds, dict(cfg, feature_norm="none"), device)
        key = (id(ds), cfg["J"], cfg["L"], cfg["input_radius"], "sphere")
        if key not in _FEATURES:
            f = base.features
            norms = f.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (f.dim() - 1))
            _FEATURES[key] = (FeatureDataset(f * (bound / norms), base.labels), bound)
        return _FEATURES[key]
    key = (id(ds), cfg["J"], cfg["L"], cfg["input_radius"])
    if key in _FEATURES:
        return _FEATURES[key]
    if id(ds) in _PARENT:  # a held-out split of TRAIN: the features are per image, so index the full split's
        parent, index = _PARENT[id(ds)]
        full, bound = scatter_features(parent, cfg, device)
        _FEATURES[key] = (FeatureDataset(full.features[index], full.labels[index]), bound)
        return _FEATURES[key]
    # on-disk cache (--feature-cache): keyed by the images themselves and the configuration
    path = None
    if FEATURE_CACHE:
        digest = f"{ds.info.name}-{len(ds)}-{hash_images(ds)}-J{cfg['J']}-L{cfg['L']}-r{cfg['input_radius']}"
        path = Path(FEATURE_CACHE) / f"scatter-{digest}.pt"
    if path is not None and path.is_file():
        # plain tensors and a float, loaded without unpickling code: a planted file cannot run anything
        saved = torch.load(path, weights_only=True)
        _FEATURES[key] = (FeatureDataset(saved["features"], saved["labels"]), float(saved["bound"]))
    else:
        start = time.perf_counter()
        c, h, _ = ds.images.shape[1:]
        model = scatter_net(in_channels=c, image_size=h, J=cfg["J"], L=cfg["L"], mean=ds.info.mean[:c],
                            input_radius=cfg["input_radius"])
        d = math.prod(ds.images.shape[1:])  # raw pixels in [0,1]^d: the raw projection is a no-op
        frozen = precompute_frozen_prefix(model.to(device), ds, math.sqrt(d), batch_size=512, device=device,
                                          progress=False)
        _FEATURES[key] = (frozen.dataset, frozen.bound)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"features": frozen.dataset.features, "labels": frozen.dataset.labels,
                        "bound": float(frozen.bound)}, path)
        print(f"  scattering features of {len(ds)} images: {frozen.shape}, norm <= {frozen.bound:.4g} "
              f"({time.perf_counter() - start:.0f}s, computed once, shared by both sides)", flush=True)
    return _FEATURES[key]


def _scatter_hw(ds: ImageDataset, cfg: dict) -> tuple[int, int]:
    s = 2 ** cfg["J"]
    return -(-ds.images.shape[2] // s), -(-ds.images.shape[3] // s)


def feature_head(cfg: dict, features: int, ortho: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    if cfg["hidden"]:
        layers += [ln.OrthoLinear(features, cfg["hidden"]) if ortho else nn.Linear(features, cfg["hidden"]), ln.MaxMin()]
        features = cfg["hidden"]
    layers.append(ln.OrthoLinear(features, 10) if ortho and cfg.get("head") == "ortho" else nn.Linear(features, 10))
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------------- models
def ours_model(cfg: dict, mean: float) -> nn.Sequential:
    model = mnist_convnet(width=cfg["width"], hidden=cfg["hidden"], mean=(mean,), centering=cfg["centering"],
                          input_radius=cfg["input_radius"])
    private_trainable(model, cfg.get("train", "all"), freeze_bias=cfg["freeze_bias"])
    return model


def opacus_model(cfg: dict, mean: float) -> nn.Sequential:
    """mnist_convnet's layer shapes, plain layers (no orthogonality), the chosen activation."""
    w, act = cfg["width"], {"maxmin": ln.MaxMin, "tanh": nn.Tanh, "relu": nn.ReLU}[cfg["activation"]]

    def conv(cin, cout, k, s):
        return [nn.Conv2d(cin, cout, k, stride=s, padding="same" if s == 1 else 0), act()]

    model = nn.Sequential(ln.InputNormalization((mean,), None), *conv(1, w, 3, 1), *conv(w, w, 3, 1),
                          *conv(w, 2 * w, 2, 2), *conv(2 * w, 2 * w, 3, 1), *conv(2 * w, 4 * w, 2, 2),
                          nn.Flatten(), nn.Linear(4 * w * 49, cfg["hidden"]), act(), nn.Linear(cfg["hidden"], 10))
    private_trainable(model, cfg.get("train", "all"), freeze_bias=False)
    return model


def _optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=cfg["lr"])
    return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg.get("momentum", 0.0))


# ----------------------------------------------------------------------------------------------- sides
class Ours:
    name = "ours (lipnet.privacy)"

    def __init__(self, cfg, train, eps, epochs, device, seed=0):
        from lipnet.privacy import make_private
        torch.manual_seed(seed)
        loss = private_loss(cfg["temperature"], cfg["offset"], cfg.get("loss_clip"))
        if cfg.get("arch") == "scatter":
            self.scatter_cfg = cfg
            features, bound = scatter_features(train, cfg, device)
            self.post, releases = None, ()
            if cfg.get("data_norm"):
                features, bound, releases = self._private_data_norm(features, train, cfg, seed)
            self.model = feature_head(cfg, features.features[0].numel(), ortho=True).to(device)
            private_trainable(self.model, "all", freeze_bias=cfg["freeze_bias"])
            self.trainer = make_private(self.model, _optimizer(self.model.parameters(), cfg), features, eps, DELTA,
                                        epochs, loss=loss, input_bound=bound, noise=cfg["noise"], device=device, seed=seed,
                                        progress=False, sample_rate=cfg["batch"] / len(features),
                                        prior_releases=releases)
            self.loader, self.device = self.trainer.loader, device
            return
        self.model = ours_model(cfg, train.info.mean[0]).to(device)
        loader = BatchLoader(train, cfg["batch"])
        # input_bound = sqrt(d): every image in [0,1]^d already lies in that ball (the projection is a no-op);
        # the model's own L2BallProjection(input_radius) after mean subtraction is what bounds the first layer.
        d = math.prod(train.images.shape[1:])
        self.trainer = make_private(self.model, _optimizer(self.model.parameters(), cfg), loader, eps, DELTA, epochs,
                                    loss=loss, input_bound=math.sqrt(d), noise=cfg["noise"], device=device, seed=seed,
                                    progress=False)
        self.loader, self.device = self.trainer.loader, device

    def _private_data_norm(self, features, train, cfg, seed):
        """data_norm (after feature_norm="group"): each channel standardized with its mean and variance
        released by lipnet.privacy.private_channel_moments (composed into the accountant), then every sample
        rescaled by GroupNormalization(1) so that its norm bound sqrt(entries) holds whatever the statistics."""
        from lipnet.privacy import FeatureDataset, private_channel_moments
        if cfg.get("feature_norm") != "group":
            raise ValueError("data_norm needs feature_norm='group' (its clips assume entries of unit scale)")
        hw = _scatter_hw(train, cfg)
        f = features.features.view(len(features.features), -1, *hw)
        c = f.shape[1]
        # GroupNormalization output: ||m_i|| <= sqrt(C) always; ||s_i|| is sqrt(C) when a sample's channels have
        # equal energy, at most C: the clips are multiples of sqrt(C), fixed before the data is seen
        moments = private_channel_moments(f, clip_mean=cfg.get("data_clip_mean", 1.0) * math.sqrt(c),
                                          clip_sq=cfg.get("data_clip_sq", 2.0) * math.sqrt(c),
                                          noise_multiplier=cfg.get("data_noise", 8.0), min_var=cfg.get("data_min_var", 1e-2),
                                          generator=torch.Generator().manual_seed(10_000 + seed))
        self.post = nn.Sequential(ln.InputNormalization(moments.mean, moments.std), ln.GroupNormalization(1, c))
        self.post_shape = (c, *hw)
        out = self._apply_post(features.features)
        return FeatureDataset(out, features.labels), self.post[1].output_norm_bound(self.post_shape), (moments.release,)

    def _apply_post(self, flat):
        return torch.cat([self.post(flat[i:i + 4096].view(-1, *self.post_shape)).flatten(1)
                          for i in range(0, len(flat), 4096)])

    def step(self, x, y):
        self.trainer.step(x, y)

    def epoch(self):
        decays = self.scatter_cfg.get("ema", 0.0) if hasattr(self, "scatter_cfg") else 0.0
        if not decays:
            return self.trainer.train_epoch().loss
        # weight averaging: a function of the released (noisy) updates only, so post-processing, free of privacy cost.
        # "ema": one decay or a list (the first is the reported model; the others are measured beside it)
        decays = decays if isinstance(decays, list) else [decays]
        if not hasattr(self, "ema_models"):
            import copy
            self.ema_models = {d: copy.deepcopy(self.model) for d in decays}
            self.ema_model, self.ema_steps, self.use_ema = self.ema_models[decays[0]], 0, True
        total, count = 0.0, 0
        for x, y in self.trainer.loader:
            total += self.trainer.step(x, y)
            count += len(y)
            self.ema_steps += 1
            with torch.no_grad():
                for decay, ema in self.ema_models.items():
                    d = min(decay, (1 + self.ema_steps) / (10 + self.ema_steps))  # warm-up: early weights fade fast
                    for a, p in zip(ema.parameters(), self.model.parameters()):
                        a.lerp_(p, 1 - d)
        self.trainer.epochs_done += 1
        return total / max(count, 1)

    def epsilon(self):
        return self.trainer.epsilon()

    def sigma(self):
        return self.trainer.noise_multiplier

    def predict(self, x):
        model = self.ema_model if getattr(self, "use_ema", False) else self.model
        return model(self._apply_post(x) if getattr(self, "post", None) is not None else x)


class Opacus:
    name = "opacus (per-sample clipping)"

    def __init__(self, cfg, train, eps, epochs, device, seed=0):
        from opacus import PrivacyEngine
        torch.manual_seed(seed)
        if cfg.get("arch") == "scatter":
            self.scatter_cfg = cfg
            data, _ = scatter_features(train, cfg, device)
            model = feature_head(cfg, data.features[0].numel(), ortho=False).to(device)
        else:
            model = opacus_model(cfg, train.info.mean[0]).to(device)
            data = FloatDataset(train)
        loader = torch.utils.data.DataLoader(data, batch_size=cfg["batch"])
        self.engine = PrivacyEngine(accountant="rdp")
        # grad_sample_mode "ghost" (opacus' fast gradient clipping): the same per-sample norms and clipped sum
        # as "hooks" without materializing per-sample gradients -- the same DP-SGD, faster on a wide linear head
        mode = cfg.get("grad_sample_mode", "hooks")
        made = self.engine.make_private_with_epsilon(
            module=model, optimizer=_optimizer(model.parameters(), cfg), data_loader=loader, target_epsilon=eps,
            target_delta=DELTA, epochs=epochs, max_grad_norm=cfg["max_grad_norm"], grad_sample_mode=mode,
            criterion=nn.CrossEntropyLoss(), noise_generator=torch.Generator(device=device).manual_seed(seed + 1))
        if mode == "ghost":
            self.model, self.opt, self.criterion, self.loader = made
        else:
            (self.model, self.opt, self.loader), self.criterion = made, nn.CrossEntropyLoss()
        self.device = device

    def step(self, x, y):
        x, y = x.to(self.device), y.to(self.device)
        self.opt.zero_grad(set_to_none=True)
        loss = self.criterion(self.model(x), y)
        loss.backward()
        self.opt.step()
        return float(loss.detach()) * len(y)

    def epoch(self):
        self.model.train()
        total, count = 0.0, 0
        for x, y in self.loader:
            total += self.step(x, y)
            count += len(y)
        return total / max(count, 1)

    def epsilon(self):
        return float(self.engine.get_epsilon(DELTA))

    def sigma(self):
        return float(self.opt.noise_multiplier)

    def predict(self, x):
        return self.model(x)


SIDES = {"ours": Ours, "opacus": Opacus}


@torch.no_grad()
def accuracy(side, ds: ImageDataset, device, batch: int = 2000) -> float:
    model = side.model
    model.eval()
    correct = 0
    cfg = getattr(side, "scatter_cfg", None)
    features = scatter_features(ds, cfg, device)[0].features if cfg else None
    for i in range(0, len(ds), batch):
        x = features[i:i + batch] if cfg else ds.images[i:i + batch].to(device).float().div_(255)
        correct += int((side.predict(x).argmax(1).cpu() == ds.labels[i:i + batch]).sum())
    model.train()
    return correct / len(ds)


# ----------------------------------------------------------------------------------------------- perf
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def perf_worker(args) -> dict:
    """One (side, batch) measurement in this (fresh) process."""
    torch.set_num_threads(args.threads)
    device = args.device
    if args.arch == "scatter":  # the head on the cached features: what either side trains in this family
        base = OURS_SCATTER if args.side == "ours" else OPACUS_SCATTER
    else:
        base = OURS if args.side == "ours" else OPACUS
    cfg = dict(base, **json.loads(args.cfg or "{}"))
    cfg["batch"] = args.batch
    if args.perf_train == "all" and args.arch == "cnn":
        cfg["train"] = "all"  # the whole network is trained on both sides
    train, _ = get_data(args.dataset, args.data_root, limit=args.limit)
    side = SIDES[args.side](cfg, train, 3.0, 1, device)
    it = iter(side.loader)
    batches = [next(it) for _ in range(args.warmup + args.steps)]
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    cuda = str(device).startswith("cuda")
    if cuda:
        sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _status_kb("VmRSS") * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")
            reset = True
        except OSError:
            reset = False
    for x, y in batches[:args.warmup]:  # inside the memory window (they are training steps), outside the clock
        side.step(x, y)
    # one clock around all timed steps (not per step): the throughput of back-to-back steps
    sync(device)
    samples = 0
    start = time.perf_counter()
    for x, y in batches[args.warmup:]:
        side.step(x, y)
        samples += len(y)
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") * 1024
    return dict(side=args.side, batch=args.batch, steps=args.steps, samples=samples, seconds=seconds,
                samples_per_s=samples / seconds, peak_mb=peak / 2**20, train_mb=(peak - base) / 2**20,
                hwm_reset=True if cuda else reset, threads=args.threads, device=str(device))


def run_perf(args) -> list[dict]:
    """Alternate the sides in fresh subprocesses; medians per (side, batch); ratios ours / opacus."""
    raw = []
    for batch in args.perf_batches:
        for r in range(args.perf_repeats):
            order = ["ours", "opacus"] if r % 2 == 0 else ["opacus", "ours"]
            for side in order:
                cmd = [sys.executable, __file__, "--_perf-worker", side, "--batch", str(batch), "--steps",
                       str(args.perf_steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
                       "--dataset", args.dataset, "--device", args.device, "--perf-train", args.perf_train]
                if args.data_root:
                    cmd += ["--data-root", args.data_root]
                if args.limit:
                    cmd += ["--limit", str(args.limit)]
                if args.arch == "scatter":
                    cmd += ["--arch", "scatter", "--feature-cache", args.feature_cache]
                overrides = args.ours_cfg if side == "ours" else args.opacus_cfg
                if overrides:  # the accuracy runs' configuration of that side (--ours-cfg / --opacus-cfg)
                    cmd += ["--cfg", overrides]
                env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode:
                    raise RuntimeError(f"perf worker failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row["repeat"] = r
                raw.append(row)
                print(f"  perf {side:6s} batch {batch:5d} rep {r}: {row['samples_per_s']:8.1f} samples/s, "
                      f"peak {row['peak_mb']:7.1f} MB (+{row['train_mb']:.1f} MB training)", flush=True)
    rows = []
    for batch in args.perf_batches:
        med = {}
        for side in ("ours", "opacus"):
            rs = [r for r in raw if r["side"] == side and r["batch"] == batch]
            med[side] = {k: median(r[k] for r in rs) for k in ("samples_per_s", "peak_mb", "train_mb")}
        rows.append(dict(kind="perf", dataset=args.dataset, batch=batch, threads=args.threads, device=args.device,
                         trained="linear head on fixed scattering features, both sides" if args.arch == "scatter"
                         else "all layers, both sides" if args.perf_train == "all" else
                         f"ours: {OURS.get('train', 'all')} layers, opacus: {OPACUS.get('train', 'all')} layers",
                         steps=args.perf_steps, repeats=args.perf_repeats,
                         ours_samples_per_s=med["ours"]["samples_per_s"],
                         opacus_samples_per_s=med["opacus"]["samples_per_s"],
                         speedup=med["ours"]["samples_per_s"] / med["opacus"]["samples_per_s"],
                         ours_peak_mb=med["ours"]["peak_mb"], opacus_peak_mb=med["opacus"]["peak_mb"],
                         peak_ratio=med["ours"]["peak_mb"] / med["opacus"]["peak_mb"],
                         ours_train_mb=med["ours"]["train_mb"], opacus_train_mb=med["opacus"]["train_mb"],
                         train_mem_ratio=med["ours"]["train_mb"] / max(med["opacus"]["train_mb"], 1e-9),
                         raw=[r for r in raw if r["batch"] == batch]))
    return rows


# ----------------------------------------------------------------------------------------------- accuracy
def train_eval(side_name: str, cfg: dict, train, evalset, eps: float, epochs: int, device, seed=0,
               label: str = "") -> dict:
    start = time.perf_counter()
    side = SIDES[side_name](cfg, train, eps, epochs, device, seed)
    losses = []
    for e in range(epochs):
        losses.append(side.epoch())
        if not math.isfinite(losses[-1]):
            break
    sync(device)
    seconds = time.perf_counter() - start
    acc = accuracy(side, evalset, device)
    row = dict(kind="accuracy", side=side_name, target_epsilon=eps, epsilon=side.epsilon(), delta=DELTA,
               sigma=side.sigma(), epochs=epochs, batch=cfg["batch"], accuracy=acc, train_loss=losses[-1],
               seconds=seconds, n_train=len(train), n_eval=len(evalset), config=cfg, label=label, seed=seed)
    extra = ""
    if getattr(side, "use_ema", False):  # the same run's last (not averaged) weights, for the averaging's gain
        chosen = side.ema_model
        row["accuracy_ema"] = {}
        for decay, ema in side.ema_models.items():
            side.ema_model = ema
            row["accuracy_ema"][str(decay)] = accuracy(side, evalset, device)
        side.ema_model, side.use_ema = chosen, False
        row["accuracy_last"] = accuracy(side, evalset, device)
        side.use_ema = True
        extra = f" (last weights {row['accuracy_last']:.4f}; ema {row['accuracy_ema']})"
    print(f"  {side_name:6s} eps {eps:g} ({row['epsilon']:.3f} spent, sigma {row['sigma']:.3f}) {label}: "
          f"acc {acc:.4f}{extra}, loss {losses[-1]:.4f}, {seconds:.0f}s", flush=True)
    return row


def tune_grid(quick: bool, grid: str | None = None, arch: str = "cnn"):
    """A small coordinate search for our side (one knob at a time from a base), and opacus' lr.
    ``grid``: a JSON list of overrides (each one a configuration) of the base config of each side in --sides."""
    base, opacus_base = (OURS, OPACUS) if arch == "cnn" else (OURS_SCATTER, OPACUS_SCATTER)
    ours = [dict(base)]
    if grid:
        return [dict(base, **o) for o in json.loads(grid)], [dict(opacus_base, **o) for o in json.loads(grid)]
    if not quick:
        for k, vals in [("batch", [256]), ("freeze_bias", [False]), ("input_radius", [3.0, 20.0]),
                        ("temperature", [0.03, 0.3]), ("lr", [3e-3, 3e-2]), ("noise", ["per_layer"]),
                        ("centering", ["layer"]), ("width", [16])]:
            for v in vals:
                ours.append(dict(base, **{k: v}))
    opac = [dict(OPACUS)] + ([] if quick else [dict(OPACUS, lr=v) for v in (0.1, 2.0)]
                             + [dict(OPACUS, optimizer="adam", lr=1e-3)])
    return ours, opac


def markdown(rows: list[dict], meta: dict) -> str:
    out = [f"# Clipping-free DP-SGD vs opacus ({meta['dataset']})", "",
           f"machine: {meta['machine']}, torch {meta['torch']}, opacus {meta['opacus']}, threads {meta['threads']}, "
           f"device {meta['device']}", "", f"command: `{meta['command']}`", ""]
    perf = [r for r in rows if r["kind"] == "perf"]
    if perf:
        out += ["## Throughput and peak memory (training steps, same expected batch, medians)", "",
                "| dataset | trained | batch | ours samples/s | opacus samples/s | speedup | ours peak MB | opacus peak MB | "
                "peak ratio | ours +train MB | opacus +train MB | +train ratio |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in perf:
            out.append(f"| {r['dataset']} | {r.get('trained', 'all layers, both sides')} | {r['batch']} | "
                       f"{r['ours_samples_per_s']:.0f} | {r['opacus_samples_per_s']:.0f} | "
                       f"{r['speedup']:.2f}x | {r['ours_peak_mb']:.0f} | {r['opacus_peak_mb']:.0f} | "
                       f"{r['peak_ratio']:.2f} | {r['ours_train_mb']:.0f} | {r['opacus_train_mb']:.0f} | "
                       f"{r['train_mem_ratio']:.2f} |")
        out.append("")
    acc = [r for r in rows if r["kind"] == "accuracy"]
    if acc:
        out += ["## Accuracy at epsilon (delta = 1e-5)", "",
                "| dataset | side | target eps | eps spent | sigma | epochs | batch | accuracy | train s | eval on |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in acc:
            out.append(f"| {r.get('dataset', '')} | {r['side']} | {r['target_epsilon']:g} | {r['epsilon']:.3f} | "
                       f"{r['sigma']:.3f} | {r['epochs']} | {r['batch']} | {100 * r['accuracy']:.2f} | "
                       f"{r['seconds']:.0f} | {r['label']} ({r['n_eval']}) |")
        out.append("")
        cfgs = {r["side"]: r["config"] for r in acc}
        for side, cfg in cfgs.items():
            out.append(f"- {side} config: `{json.dumps(cfg)}`")
        out.append("")
    tune = [r for r in rows if r["kind"] == "tune"]
    if tune:
        out += ["## Hyperparameter search (held-out part of TRAIN)", "",
                "| side | eps | epochs | change from base | held-out acc | s |", "|---|---|---|---|---|---|"]
        for r in tune:
            out.append(f"| {r['side']} | {r['target_epsilon']:g} | {r['epochs']} | {r['change']} | "
                       f"{100 * r['accuracy']:.2f} | {r['seconds']:.0f} |")
        out.append("")
        for r in tune:
            if r["change"] == "base":
                out.append(f"- base ({r['side']}): `{json.dumps(r['config'])}`")
        out.append("")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist", "cifar10", "synthetic"],
                   help="cifar10: --arch scatter only (the cnn family is mnist_convnet's 28x28 shapes)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--eps", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    p.add_argument("--arch", choices=["cnn", "scatter"], default="cnn",
                   help="cnn: mnist_convnet's layer shapes; scatter: fixed Scattering2d features + linear head (both sides)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=None, help="override both sides' expected batch size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sides", nargs="+", default=["ours", "opacus"], choices=list(SIDES))
    p.add_argument("--perf-batches", type=int, nargs="*", default=[256, 1024])
    p.add_argument("--perf-steps", type=int, default=12)
    p.add_argument("--perf-train", choices=["all", "config"], default="all",
                   help="all: every layer trained on both sides; config: as in the accuracy runs")
    p.add_argument("--perf-repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-perf", action="store_true")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--tune", action="store_true", help="hyperparameter search on a held-out part of TRAIN")
    p.add_argument("--tune-eps", type=float, default=3.0)
    p.add_argument("--grid", default=None, help="--tune: JSON list of overrides of our config to try")
    p.add_argument("--holdout", type=int, default=10000)
    p.add_argument("--limit", type=int, default=None, help="use only this many training examples")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 min)")
    p.add_argument("--merge", nargs="+", default=None, help="combine the rows of these --json files into --json/--md")
    p.add_argument("--ours-cfg", default=None, help='JSON overrides of our config for the accuracy runs, e.g. \'{"lr": 0.25}\'')
    p.add_argument("--opacus-cfg", default=None, help="JSON overrides of opacus' config for the accuracy runs")
    p.add_argument("--seed", type=int, default=0, help="seed of both sides' initialization, sampling and noise")
    p.add_argument("--feature-cache", default=None, help="--arch scatter: keep computed features in this folder")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--_perf-worker", dest="perf_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cfg", default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=10, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.merge:
        rows, metas = [], []
        for path in args.merge:
            d = json.loads(Path(path).read_text())
            rows += d["rows"]
            metas.append(d["meta"])
        meta = dict(metas[0], dataset=", ".join(dict.fromkeys(m["dataset"] for m in metas)),
                    command=" ; ".join(m["command"] for m in metas))
        if args.json:
            Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        if args.md:
            Path(args.md).write_text(markdown(rows, meta))
        return
    global FEATURE_CACHE
    FEATURE_CACHE = args.feature_cache
    if args.perf_worker:
        args.side = args.perf_worker
        print(json.dumps(perf_worker(args)))
        return
    torch.set_num_threads(args.threads)
    if args.dataset == "cifar10" and args.arch != "scatter":
        p.error("--dataset cifar10 needs --arch scatter (the cnn family is mnist_convnet's 28x28 shapes)")
    if args.arch == "scatter" and not args.no_perf and not args.feature_cache:
        # each perf measurement is a fresh process: without a disk cache each would recompute the features
        p.error("--arch scatter throughput runs need --feature-cache DIR (or --no-perf)")
    if args.quick:
        from lipnet.data import resolve_data_root
        try:
            resolve_data_root(args.data_root)
            load_dataset(args.dataset, "train", args.data_root, progress=False, limit=10)
        except Exception:  # no data in this checkout: synthetic blobs
            args.dataset = "synthetic"
        args.limit = args.limit or 2048
        args.eps, args.epochs, args.perf_batches, args.perf_steps, args.perf_repeats, args.warmup = [3.0], 1, [256], 2, 1, 1
        OURS["batch"] = OPACUS["batch"] = OURS_SCATTER["batch"] = OPACUS_SCATTER["batch"] = 256

    import opacus
    info = machine_info(args.device)
    meta = dict(dataset=args.dataset, machine=f"{info['host']} {info['cpu']}, {info['cpus']} cores", torch=info["torch"],
                opacus=opacus.__version__, threads=args.threads, device=args.device,
                command="python benchmarks/privacy.py " + " ".join(sys.argv[1:]), machine_info=info)
    rows: list[dict] = []

    def save():
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        if args.md:
            Path(args.md).parent.mkdir(parents=True, exist_ok=True)
            Path(args.md).write_text(markdown(rows, meta))

    if args.tune:
        train, held = get_data(args.dataset, args.data_root, holdout=args.holdout if not args.quick else 500,
                               limit=args.limit)
        ours, opac = tune_grid(args.quick, args.grid, args.arch)
        bases = (OURS, OPACUS) if args.arch == "cnn" else (OURS_SCATTER, OPACUS_SCATTER)
        for side, cfgs, base in (("ours", ours, bases[0]), ("opacus", opac, bases[1])):
            if side not in args.sides:
                continue
            for cfg in cfgs:
                change = ", ".join(f"{k}={v}" for k, v in cfg.items() if base.get(k) != v) or "base"
                row = train_eval(side, cfg, train, held, args.tune_eps, args.epochs, args.device, args.seed, label=change)
                row.update(kind="tune", change=change, dataset=args.dataset)
                rows.append(row)
                save()
        return

    if not args.no_perf:
        print(f"throughput / memory ({args.dataset}, threads {args.threads}, {args.device}):", flush=True)
        rows += run_perf(args)
        save()
    if not args.no_accuracy:
        train, test = get_data(args.dataset, args.data_root, limit=args.limit)
        print(f"accuracy ({args.dataset}: {len(train)} train, {len(test)} test, epochs {args.epochs}):", flush=True)
        for eps in args.eps:
            for side in args.sides:
                cfg = dict({("ours", "cnn"): OURS, ("opacus", "cnn"): OPACUS, ("ours", "scatter"): OURS_SCATTER,
                            ("opacus", "scatter"): OPACUS_SCATTER}[side, args.arch])
                cfg.update(json.loads((args.ours_cfg if side == "ours" else args.opacus_cfg) or "{}"))
                if args.batch:
                    cfg["batch"] = args.batch
                row = train_eval(side, cfg, train, test, eps, args.epochs, args.device, args.seed,
                                 label="test" if not args.seed else f"test, seed {args.seed}")
                row["dataset"] = args.dataset
                rows.append(row)
                save()
    save()
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
