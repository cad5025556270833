"""The GPU check: lipnet's core, optimizer, training step, soundness and epoch time on one device.

    python benchmarks/gpu_check.py                            # on cuda: ~5 min on an H100-class GPU
    python benchmarks/gpu_check.py --device cpu --quick       # the same code on tiny shapes (CI runs it)

Writes ``<out-dir>/gpu_<device-name>.json`` and ``.md`` (default out-dir: benchmarks/results), with
the device name, torch, CUDA and driver versions. Every section catches its own failure and records
it (``"error"``) instead of stopping the others.

1. ``core``: ``orthogonalize`` turbo / ns5 / convergent (fp32), turbo with its bf16 steps, and
   orthogonium's orthogonalizer (3 power iterations + 12 Bjorck steps), at 1024^2, 4096^2,
   16 x 1024^2 and the stacked orthogonal-factor shapes of the cifar10 preset, on inputs of
   condition number 10 (benchmarks/ortho.py's "wellcond"); median time
   (CUDA events after warm-up), max |sigma - 1| of the output and its distance to the exact polar
   factor of the input (turbo and convergent converge to that of the AOL-rescaled input, hence a
   distance of a few percent at sigma within 1e-7 of 1). The Turbo-Muon paper's anchor (up to 2.8x over Muon's Newton-Schulz, with Triton
   kernels) is stated beside our turbo/ns5 ratio.
2. ``optimizer``: one step of TurboMuon and of ``torch.optim.Muon`` on the matrices of
   benchmarks/optim.py's task network.
3. ``train_step``: the cifar10 preset's network and ``cifar_liresnet(32, (1, 1, 1))``, lipnet
   layers against the plain twin (``export``) and orthogonium's layers, fp32 and bf16 autocast,
   batch 256; inference of the lipnet model in eval mode against its export.
4. ``soundness``: ``spectral_norm_bound`` computed on the device never below the float64 SVD norm
   (random, ill-conditioned, nearly orthogonal matrices); the shipped CIFAR-10 model certified on
   the device: radii against the CPU's for the same weights and images, and PGD at 0.99x each
   device radius never flips a certified point.
5. ``epoch_time``: training steps of the cifar10 and cifar10-gpu presets (augmentation, forward,
   backward, their optimizer), extrapolated to one epoch of 50,000 images (labelled as such).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
import lipnet.nn as ln  # noqa: E402
from lipnet.ortho import orthogonalize, spectral_norm_bound  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness and benchmarks beside this script
from _harness import machine_info, median  # noqa: E402

TURBO_MUON_PAPER_SPEEDUP = 2.8  # "up to 2.8x" over Muon's Newton-Schulz (Triton kernels)


# -------------------------------------------------------------------------------------- timing
def timed(fn, device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds of ``fn()``: CUDA events on a GPU (after synchronizing), the wall clock on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return median(times)


def section(fn, *args) -> dict:
    """``fn(*args)``'s result, or its failure recorded (the other sections still run)."""
    start = time.perf_counter()
    try:
        result = fn(*args)
    except Exception as err:  # a section's failure is a result of the check, not its end
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=8)}
    result["seconds"] = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------------- 1 core
def preset_factor_shapes(quick: bool) -> list[tuple[int, ...]]:
    """The orthogonal factors of the cifar10 preset's network, stacked by shape (as the layers' own
    batched retraction sees them)."""
    from lipnet.models import build_model
    from lipnet.presets import PRESETS

    config = dict(PRESETS["cifar10"].model_config)
    if quick:
        config.update(width=4, hidden=16)
    model = build_model(PRESETS["cifar10"].model, **config)
    counts: dict[tuple[int, ...], int] = {}
    for name, p in model.named_parameters():
        if "parametrizations" in name and p.dim() >= 2:
            shape = tuple(p.shape[-2:])
            counts[shape] = counts.get(shape, 0) + math.prod(p.shape[:-2])
    return [(n, *s) for s, n in sorted(counts.items(), key=lambda kv: -kv[1] * math.prod(kv[0]))][:4]


def core(device: torch.device, quick: bool, repeats: int, warmup: int) -> dict:
    from ortho import make_input, orthogonium_peer

    shapes = [(64, 64), (4, 32, 32)] if quick else [(1024, 1024), (4096, 4096), (16, 1024, 1024)]
    shapes += preset_factor_shapes(quick)
    g = torch.Generator().manual_seed(0)
    rows = []
    for shape in shapes:
        W = make_input("wellcond", shape, g).to(device)  # condition number 10, as a layer's raw weight
        exact = _exact_polar(W)
        cases = {
            "ns5": lambda: orthogonalize(W, "ns5", low_precision=False, validate=False),
            "turbo": lambda: orthogonalize(W, "turbo", low_precision=False, validate=False),
            "turbo-bf16": lambda: orthogonalize(W, "turbo", low_precision=True, validate=False),
            "convergent": lambda: orthogonalize(W, "convergent", low_precision=False, validate=False),
            "orthogonium": orthogonium_peer(W),
        }
        times = {name: timed(fn, device, repeats, warmup) for name, fn in cases.items()}
        for name, fn in cases.items():
            Q = fn().double()
            sigma = torch.linalg.svdvals(Q)
            rows.append({"shape": list(shape), "method": name, "seconds": times[name],
                         "speedup_vs_ns5": times["ns5"] / times[name],
                         "max_sigma_error": float((sigma - 1).abs().max()),
                         "sigma_band": [float(sigma.min()), float(sigma.max())],
                         "polar_distance": float((Q - exact).norm() / exact.norm())})
    return {"rows": rows, "anchor": f"Turbo-Muon paper: up to {TURBO_MUON_PAPER_SPEEDUP}x over Muon's Newton-Schulz "
                                    "(Triton kernels); ours: turbo vs ns5 above, plain torch ops"}


def _exact_polar(W: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return U @ Vh


# ---------------------------------------------------------------------------------- 2 optimizer
def optimizer(device: torch.device, quick: bool, repeats: int, warmup: int) -> dict:
    import optim as optim_benchmark
    from lipnet.optim import TurboMuon, split_params

    widths = (8, 16, 32) if quick else (32, 64, 128)
    rows = []
    for name in ("turbomuon", "torch-muon"):
        torch.manual_seed(0)
        net = optim_benchmark.make_net(widths).to(device)
        hidden, _ = split_params(net)
        for p in hidden:
            p.grad = torch.randn_like(p)
        if name == "turbomuon":
            opt = TurboMuon(hidden, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, adjust_lr="spectral")
        else:
            opt = torch.optim.Muon(hidden, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0,
                                   adjust_lr_fn="original")
        rows.append({"optimizer": name, "matrices": len(hidden), "seconds": timed(opt.step, device, repeats, warmup)})
    rows[0]["speedup_vs_torch_muon"] = rows[1]["seconds"] / rows[0]["seconds"]
    return {"rows": rows}


# ---------------------------------------------------------------------------------- 3 train step
def _networks(quick: bool) -> dict:
    from lipnet.models import build_model, cifar_liresnet
    from lipnet.presets import PRESETS

    preset = dict(PRESETS["cifar10"].model_config)
    if quick:
        preset.update(width=4, hidden=16)
    width = 4 if quick else 32
    return {"cifar10-preset": lambda: build_model(PRESETS["cifar10"].model, **preset),
            f"cifar_liresnet({width}, (1, 1, 1))": lambda: cifar_liresnet(width=width, blocks=(1, 1, 1))}


def _step(model, x, y, amp: bool, device: torch.device):
    criterion = ln.LipschitzCrossEntropy(temperature=0.125, offset=0.45)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = criterion(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def train_step(device: torch.device, quick: bool, repeats: int, warmup: int) -> dict:
    from train_step import orthogonium_twin

    batch = 8 if quick else 256
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    rows, inference = [], []
    for net, make in _networks(quick).items():
        torch.manual_seed(0)
        lipnet_model = make().to(device)
        models = {"lipnet": lipnet_model, "plain": ln.export(lipnet_model).train()}
        torch.manual_seed(0)
        models["orthogonium"] = orthogonium_twin(make()).to(device)
        for amp in (False, True):
            times = {name: timed(_step(m, x, y, amp, device), device, repeats, warmup) for name, m in models.items()}
            for name, s in times.items():
                rows.append({"network": net, "batch": batch, "precision": "bf16" if amp else "fp32", "model": name,
                             "seconds": s, "ratio_to_plain": s / times["plain"]})
        exported = ln.export(lipnet_model)
        lipnet_model.eval()
        with torch.no_grad():
            t_lipnet = timed(lambda: lipnet_model(x), device, repeats, warmup)
            t_export = timed(lambda: exported(x), device, repeats, warmup)
        inference.append({"network": net, "batch": batch, "lipnet_eval_seconds": t_lipnet,
                          "exported_seconds": t_export, "ratio": t_lipnet / t_export})
    return {"rows": rows, "inference": inference}


# ---------------------------------------------------------------------------------- 4 soundness
def _matrices(count: int, quick: bool, g: torch.Generator) -> list[torch.Tensor]:
    out = []
    for i in range(count):
        m, n = (int(v) for v in torch.randint(2, 24 if quick else 160, (2,), generator=g))
        kind = i % 3
        if kind == 0:
            out.append(torch.randn(m, n, generator=g))
        else:
            k = min(m, n)
            U, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
            V, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
            sv = torch.logspace(0, -6, k) if kind == 1 else 1 + 1e-6 * torch.randn(k, generator=g)
            out.append(((U * sv) @ V.mT).float())
    return out


def soundness(device: torch.device, quick: bool, repeats: int, warmup: int) -> dict:
    from lipnet.certify import certified_radius, network_lipschitz_bound, pgd_l2
    from lipnet.pretrained import pretrained

    g = torch.Generator().manual_seed(0)
    mats = _matrices(40 if quick else 200, quick, g)
    ratios = []
    for W in mats:
        bound = float(spectral_norm_bound(W.to(device)))
        exact = float(torch.linalg.matrix_norm(W.double(), 2))
        ratios.append(bound / exact)
    violations = sum(r < 1 for r in ratios)

    model_cpu = pretrained("cifar10")
    model_dev = pretrained("cifar10", map_location=device)
    n = 16 if quick else 512
    x, source = _cifar_images(n, g)
    with torch.no_grad():
        z_cpu, z_dev = model_cpu(x), model_dev(x.to(device))
    bound_cpu, bound_dev = network_lipschitz_bound(model_cpu), network_lipschitz_bound(model_dev)
    r_cpu = certified_radius(z_cpu, bound_cpu, x)
    r_dev = certified_radius(z_dev, bound_dev, x.to(device)).cpu()
    pred = z_dev.argmax(1)
    certified = (r_dev > 0).to(device)
    flips = 0
    if certified.any():
        adv = pgd_l2(model_dev, x.to(device)[certified], pred[certified], 0.99 * r_dev.to(device)[certified],
                     steps=10 if quick else 30, clamp=None, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            flips = int((model_dev(adv).argmax(1) != pred[certified]).sum())
    larger = r_dev > r_cpu
    return {"matrices": len(mats), "bound_below_svd_norm": violations, "min_bound_over_norm": min(ratios),
            "max_bound_over_norm": max(ratios), "images": n, "image_source": source,
            "lipschitz_bound_cpu": bound_cpu, "lipschitz_bound_device": bound_dev,
            "radii_device_larger_than_cpu": int(larger.sum()),
            "max_radius_excess": float((r_dev - r_cpu).clamp_min(0).max()),
            "max_radius_difference": float((r_dev - r_cpu).abs().max()),
            "certified_on_device": int(certified.sum()), "pgd_flips_below_device_radius": flips,
            "ok": violations == 0 and flips == 0}


def _cifar_images(n: int, g: torch.Generator) -> tuple[torch.Tensor, str]:
    """The first ``n`` CIFAR-10 test images where a data root holds them, else uniform noise images."""
    from lipnet.data import DataError, load_dataset

    try:
        test = load_dataset("cifar10", "test", limit=n, progress=False)
        return test.images.float() / 255, "cifar10 test split"
    except (DataError, ValueError, OSError):
        return torch.rand(n, 3, 32, 32, generator=g), "uniform noise (no CIFAR-10 under the data root)"


# --------------------------------------------------------------------------------- 5 epoch time
def epoch_time(device: torch.device, quick: bool, repeats: int, warmup: int) -> dict:
    from lipnet.models import build_model
    from lipnet.presets import TrainConfig
    from lipnet.training import augment_batch, build_optimizer

    steps = 3 if quick else 100
    rows = []
    for preset in ("cifar10", "cifar10-gpu"):
        config = TrainConfig.from_preset("cifar10", preset=preset)
        model_config = dict(config.model_config)
        if quick:
            model_config.update(width=4, hidden=16)
        torch.manual_seed(0)
        model = build_model(config.model, **model_config).to(device)
        batch = 8 if quick else config.batch_size
        per_epoch = math.ceil(50_000 / batch)
        opt, scheduler = build_optimizer(model, config, total_steps=per_epoch)
        criterion = ln.LipschitzCrossEntropy(config.temperature, config.offset)
        g = torch.Generator().manual_seed(0)
        x = torch.rand(batch, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        fmt = torch.channels_last if config.channels_last else torch.contiguous_format

        def step():
            xb = augment_batch(x).to(device).contiguous(memory_format=fmt)
            loss = criterion(model(xb), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            scheduler.step()
        model.train()
        for _ in range(warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        per_step = (time.perf_counter() - start) / steps
        rows.append({"preset": preset, "batch": batch, "steps_timed": steps, "seconds_per_step": per_step,
                     "steps_per_epoch": per_epoch, "epoch_seconds_extrapolated": per_step * per_epoch,
                     "epochs": config.epochs, "run_minutes_extrapolated": per_step * per_epoch * config.epochs / 60})
    return {"rows": rows, "note": "extrapolated from the timed steps (synthetic batches, no data loading)"}


# --------------------------------------------------------------------------------------- output
def device_info(device: torch.device) -> dict:
    info = machine_info(device)
    info["cuda"] = torch.version.cuda
    info["driver"] = None
    if device.type == "cuda":
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    info["name"] = info["gpu"] or f"cpu {info['cpu']}"
    return info


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def markdown(result: dict) -> str:
    info = result["device"]
    out = [f"# GPU check: {info['name']}", "",
           f"torch {info['torch']}, CUDA {info['cuda']}, driver {info['driver']}, {info['date']}"
           f"{' (--quick: tiny shapes)' if result['quick'] else ''}; command: `{result['command']}`", ""]
    for key, title in (("core", "1. Core: orthogonalize"), ("optimizer", "2. Optimizer step"),
                       ("train_step", "3. Training step"), ("soundness", "4. Soundness on the device"),
                       ("epoch_time", "5. Epoch time (extrapolated)")):
        part = result[key]
        out += [f"## {title}", ""]
        if "error" in part:
            out += [f"**failed**: `{part['error']}`", ""]
            continue
        if key == "core":
            out += ["| shape | method | ms | speed-up vs ns5 | max abs(sigma-1) | sigma band | distance to polar |",
                    "|---|---|---|---|---|---|---|"]
            out += [f"| {'x'.join(map(str, r['shape']))} | {r['method']} | {1e3 * r['seconds']:.3f} | "
                    f"{r['speedup_vs_ns5']:.2f}x | {r['max_sigma_error']:.2e} | "
                    f"[{r['sigma_band'][0]:.3f}, {r['sigma_band'][1]:.3f}] | {r['polar_distance']:.2e} |"
                    for r in part["rows"]]
            out += ["", part["anchor"]]
        elif key == "optimizer":
            out += ["| optimizer | matrices | ms per step |", "|---|---|---|"]
            out += [f"| {r['optimizer']} | {r['matrices']} | {1e3 * r['seconds']:.3f} |" for r in part["rows"]]
            out += ["", f"TurboMuon / torch.optim.Muon: {part['rows'][0]['speedup_vs_torch_muon']:.2f}x faster"]
        elif key == "train_step":
            out += ["| network | batch | precision | model | ms | ratio to plain |", "|---|---|---|---|---|---|"]
            out += [f"| {r['network']} | {r['batch']} | {r['precision']} | {r['model']} | {1e3 * r['seconds']:.2f} | "
                    f"{r['ratio_to_plain']:.2f}x |" for r in part["rows"]]
            out += ["", "| network | batch | lipnet eval ms | exported ms | ratio |", "|---|---|---|---|---|"]
            out += [f"| {r['network']} | {r['batch']} | {1e3 * r['lipnet_eval_seconds']:.2f} | "
                    f"{1e3 * r['exported_seconds']:.2f} | {r['ratio']:.2f}x |" for r in part["inference"]]
        elif key == "soundness":
            out += [f"* spectral_norm_bound on the device, {part['matrices']} matrices: "
                    f"{part['bound_below_svd_norm']} below the fp64 SVD norm; bound / norm in "
                    f"[{part['min_bound_over_norm']:.7f}, {part['max_bound_over_norm']:.4f}]",
                    f"* shipped cifar10 model, {part['images']} images ({part['image_source']}): bound "
                    f"{part['lipschitz_bound_device']:.6f} on the device, {part['lipschitz_bound_cpu']:.6f} on CPU; "
                    f"{part['radii_device_larger_than_cpu']} device radii above the CPU's (max excess "
                    f"{part['max_radius_excess']:.2e}, max difference {part['max_radius_difference']:.2e}); "
                    f"PGD at 0.99x the device radius flipped {part['pgd_flips_below_device_radius']} of "
                    f"{part['certified_on_device']} certified points", f"* sound: {part['ok']}"]
        else:
            out += ["| preset | batch | s per step | steps per epoch | epoch s (extrapolated) | run min (extrapolated) |",
                    "|---|---|---|---|---|---|"]
            out += [f"| {r['preset']} | {r['batch']} | {r['seconds_per_step']:.4f} | {r['steps_per_epoch']} | "
                    f"{r['epoch_seconds_extrapolated']:.1f} | {r['run_minutes_extrapolated']:.1f} |" for r in part["rows"]]
            out += ["", part["note"]]
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (runs on CPU in CI)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--sections", nargs="+", default=["core", "optimizer", "train_step", "soundness", "epoch_time"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it where one is, or pass --device cpu --quick", file=sys.stderr)
        return 2
    checks = ln.input_checks_enabled()
    ln.set_input_checks(False)   # timed steps without the per-batch host syncs, as lipnet train runs
    try:
        return _run(args, device, argv)
    finally:
        ln.set_input_checks(checks)


def _run(args, device: torch.device, argv) -> int:
    repeats, warmup = (2, 1) if args.quick else (10, 3)
    functions = {"core": core, "optimizer": optimizer, "train_step": train_step, "soundness": soundness,
                 "epoch_time": epoch_time}
    given = sys.argv[1:] if argv is None else list(argv)
    result = {"device": device_info(device), "quick": args.quick,
              "command": " ".join(["python", "benchmarks/gpu_check.py", *given])}
    for name in functions:
        if name in args.sections:
            print(f"gpu_check: {name} ...", flush=True)
            result[name] = section(functions[name], device, args.quick, repeats, warmup)
        else:
            result[name] = {"error": "not run (--sections)"}
    stem = f"gpu_{slug(result['device']['name'])}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (args.out_dir / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {args.out_dir / stem}.json and .md")
    failed = [n for n in functions if n in args.sections and "error" in result[n]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
