"""Robust conformal prediction, side by side in one run: vanilla split CP, lip-rcp's rule, our
robust CP (inference and calibration variants) and randomized-smoothing robust CP (RSCP, Gendler et
al. 2022, written here as the peer) on one checkpoint, same calibration/test split.

    lipnet train --dataset mnist --epochs 3 --out runs/mnist
    python benchmarks/conformal.py --checkpoint runs/mnist --json benchmarks/results/conformal_mnist.json

Per eps and method: coverage and mean set size on clean test points, the coverage each method
*guarantees* under any L2 attack of size eps, coverage under a PGD set-exclusion attack (first
--pgd-points test points; ours and vanilla), and wall-clock time (calibration + test sets, model
forward passes included). Guarantees:
  * ours, lip-rcp: >= 1 - alpha for every attacked point (sound Lipschitz bound; lip-rcp's rule
    shifts every logit by eps L -- pairwise differences by 2 eps L -- ours by sqrt(2) eps L);
  * vanilla: the simultaneous lower bound of ConformalClassifier.vanilla_coverage_lower_bound
    (hold-out = the test split, delta = 0.05);
  * RSCP: 1 - alpha *if* the Monte-Carlo estimates of the smoothed score were exact (Gendler et
    al. ignore the MC error; RSCP+ (Yan et al. 2024) corrects it at a further cost). The smoothed
    score Phi^-1(E s(x + sigma N)) is 1/sigma-Lipschitz, so the threshold grows by eps / sigma.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from scipy.stats import norm

from lipnet import data as lipdata
from lipnet.certify import ConformalClassifier
from lipnet.certify.conformal import class_scores, conformal_quantile, probability_bounds
from lipnet.nn import set_input_checks
from lipnet.checkpoints import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this script
from _harness import machine_info  # noqa: E402


def logits_of(model, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)]).double()


def lip_rcp_sets(z_cal, y_cal, z_test, alpha, eps, lipschitz, temperature):
    """lip-rcp's propagated LAC rule: calibrate on clean softmax scores, include k if
    softmax((z + r (2 e_k - 1)) / T)_k >= tau, r = eps L (every difference shifted by 2 r)."""
    q = conformal_quantile(class_scores(z_cal, "lac", temperature).gather(1, y_cal[:, None])[:, 0], alpha)
    _, p_hi = probability_bounds(z_test, math.sqrt(2.0) * eps * lipschitz, temperature)  # shift 2r
    return (1.0 - p_hi) <= q


def smoothed_scores(model, x: torch.Tensor, sigma: float, n_mc: int, temperature: float,
                    generator: torch.Generator, batch: int = 1000) -> torch.Tensor:
    """RSCP's smoothed LAC (HPS) score of every class: Phi^-1(mean over n_mc noise draws of
    1 - softmax(f(x + sigma N) / T)), a 1/sigma-Lipschitz function of x."""
    per = max(1, batch // n_mc)
    chunks = []
    for i in range(0, len(x), per):
        xb = x[i:i + per]
        noisy = xb.repeat_interleave(n_mc, 0)
        noisy = noisy + sigma * torch.randn(noisy.shape, generator=generator)
        with torch.no_grad():
            s = class_scores(model(noisy), "lac", temperature).view(len(xb), n_mc, -1).mean(1)
        chunks.append(s)
    return torch.from_numpy(norm.ppf(torch.cat(chunks).clamp(1e-12, 1 - 1e-12).numpy()))


def coverage_size(sets: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    return float(sets.gather(1, y[:, None])[:, 0].double().mean()), float(sets.sum(1).double().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.03, 0.1, 36 / 255, 0.5])
    ap.add_argument("--temperature", type=float, default=None, help="default: the training loss' temperature")
    ap.add_argument("--n-cal", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--n-mc", type=int, default=128, help="RSCP Monte-Carlo noise draws per point")
    ap.add_argument("--sigma-factor", type=float, default=2.0, help="RSCP sigma = factor * eps (Gendler et al.)")
    ap.add_argument("--pgd-steps", type=int, default=10)
    ap.add_argument("--pgd-points", type=int, default=500)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    set_input_checks(False)
    model, config, _ = load_checkpoint(args.checkpoint)
    model.eval()
    T = config.temperature if args.temperature is None else args.temperature
    test = lipdata.load_dataset(config.dataset, "test", args.data_root)
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
    cal_idx, test_idx = perm[:args.n_cal], perm[args.n_cal:args.n_cal + args.n_test]
    x_cal, y_cal = test.images[cal_idx].float() / 255, test.labels[cal_idx]
    x_test, y_test = test.images[test_idx].float() / 255, test.labels[test_idx]
    attacked = [(x_test[:args.pgd_points], y_test[:args.pgd_points])]

    t = time.perf_counter()
    z_cal, z_test = logits_of(model, x_cal), logits_of(model, x_test)
    forward_s = time.perf_counter() - t
    base = ConformalClassifier(model, "lac", args.alpha, temperature=T)
    lip = base.lipschitz
    info = machine_info()
    base.calibrate_logits(z_cal, y_cal).fit_coverage_bound_logits(z_test, y_test, delta=0.05)
    print(f"{config.dataset}: {args.n_cal} calibration / {args.n_test} test points, alpha={args.alpha}, T={T:g}, "
          f"Lipschitz bound {lip:.6f}, {info['threads']} threads, {info['cpu']}")
    rows = []
    for eps in args.eps:
        # Our methods cost one forward pass per point: timed again for each eps, right beside RSCP's
        # run, so the ratio is measured side by side (the shared box's speed drifts between eps).
        t = time.perf_counter()
        logits_of(model, x_cal), logits_of(model, x_test)
        forward_s = time.perf_counter() - t
        def ours(mode, score="lac"):
            t0 = time.perf_counter()
            clf = ConformalClassifier(model, score, args.alpha, eps, temperature=T, mode=mode, lipschitz=lip,
                                      randomized=score == "aps")
            sets = clf.calibrate_logits(z_cal, y_cal).sets_from_logits(z_test)
            return clf, sets, time.perf_counter() - t0 + forward_s

        results = {}
        t0 = time.perf_counter()
        v_sets = base.sets_from_logits(z_test, eps=0.0)
        results["vanilla CP"] = (v_sets, time.perf_counter() - t0 + forward_s, base.vanilla_coverage_lower_bound(eps),
                                 base, 0.0)
        t0 = time.perf_counter()
        lr_sets = lip_rcp_sets(z_cal, y_cal, z_test, args.alpha, eps, lip, T)
        results["lip-rcp rule (2r shift)"] = (lr_sets, time.perf_counter() - t0 + forward_s, 1 - args.alpha, None, eps)
        for mode in ("inference", "calibration"):
            clf, sets, sec = ours(mode)
            results[f"ours, robust {mode}"] = (sets, sec, 1 - args.alpha, clf, eps)
        clf, sets, sec = ours("calibration", "aps")
        results["ours, robust calibration, rand. APS"] = (sets, sec, 1 - args.alpha, clf, eps)
        sigma = args.sigma_factor * eps
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(1)
        s_cal = smoothed_scores(model, x_cal, sigma, args.n_mc, T, gen)
        q = conformal_quantile(s_cal.gather(1, y_cal[:, None])[:, 0], args.alpha)
        rscp_sets = smoothed_scores(model, x_test, sigma, args.n_mc, T, gen) <= q + eps / sigma
        results[f"RSCP (sigma={sigma:.3g}, {args.n_mc} MC)"] = (rscp_sets, time.perf_counter() - t0, 1 - args.alpha, None, eps)
        ours_time = results["ours, robust inference"][1]
        for name, (sets, sec, guaranteed, clf, set_eps) in results.items():
            cov, size = coverage_size(sets, y_test)
            pgd = None
            if clf is not None and args.pgd_steps > 0 and eps > 0:
                pgd = clf.evaluate(attacked, eps=set_eps, attack="pgd", attack_eps=eps, attack_steps=args.pgd_steps).coverage
            row = {"eps": eps, "method": name, "coverage": cov, "mean_size": size, "guaranteed_coverage": guaranteed,
                   "pgd_coverage": pgd, "seconds": sec, "time_vs_ours": sec / ours_time}
            rows.append(row)
            print(f"eps={eps:.4g}  {name:34s} cov {cov:.3f}  size {size:.3f}  guaranteed {guaranteed:.3f}  "
                  f"PGD cov {'-' if pgd is None else f'{pgd:.3f}'}  {sec:.2f}s ({sec / ours_time:.1f}x ours)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "dataset": config.dataset, "alpha": args.alpha, "temperature": T, "lipschitz_bound": lip,
            "n_cal": args.n_cal, "n_test": args.n_test, "n_mc": args.n_mc, "pgd_steps": args.pgd_steps,
            "pgd_points": args.pgd_points, "threads": info["threads"], "machine": info["arch"],
            "rows": rows, "machine_info": info}, indent=2))


if __name__ == "__main__":
    main()
