"""Side-by-side benchmark of the orthogonalization core and orthogonium's reparametrizer.

    python benchmarks/ortho.py                       # full run (sizes 256..2048 + 16x512x512)
    python benchmarks/ortho.py --sizes 256 --json out.json

Per method, input family and shape: median wall time over ``--repeats`` runs (after one warm-up),
speed-up relative to ``ns5`` measured in the same run, max |sigma - 1| over all singular values of
the output, and the relative Frobenius distance ||Q - U V^T||_F / ||U V^T||_F to the exact polar
factor of the input (float64 SVD). Inputs:

* ``gaussian``: i.i.d. N(0, 1) entries (sigma_min ~ 0: nothing converges fully, bands matter).
* ``powerlaw``: U diag(i^-1) V^T, the heavy-tailed spectrum of gradient/momentum matrices.
* ``wellcond``: U diag(logspace(0, -1)) V^T, condition number 10, like a layer's raw weight.

Peer: what an orthogonium user runs today, its ``BatchedPowerIteration`` (3 iterations) then
``BatchedBjorckOrthogonalization`` (beta 0.5, 12 iterations), the default of ``OrthoParams``. On
``wellcond`` inputs we also run it with as many Bjorck iterations as it needs to match our
``convergent`` method's orthogonality error ("equal orthogonality error").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from lipnet.ortho import orthogonalize  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this script
from _harness import describe, machine_info, median, time_interleaved  # noqa: E402

OURS = ["svd", "ns5", "turbo", "convergent", "bjorck"]


def make_input(kind: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    *batch, m, n = shape
    if kind == "gaussian":
        return torch.randn(*shape, generator=generator)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*batch, m, k, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, k, generator=generator))
    if kind == "powerlaw":
        sv = torch.arange(1, k + 1, dtype=torch.float32).reciprocal()
    elif kind == "wellcond":
        sv = torch.logspace(0, -1, k)
    else:
        raise ValueError(f"unknown input kind {kind!r}")
    return (U * sv) @ V.mT


def orthogonium_peer(W: torch.Tensor, bjorck_iters: int = 12) -> torch.Tensor:
    from orthogonium.reparametrizers import BatchedBjorckOrthogonalization, BatchedPowerIteration

    power = BatchedPowerIteration(W.shape, power_it_niter=3).to(W.device)
    bjorck = BatchedBjorckOrthogonalization(W.shape, beta=0.5, niters=bjorck_iters)
    return lambda: bjorck(power(W))


def timed_side_by_side(cases: dict, repeats: int, device: torch.device) -> tuple[dict, dict]:
    """Median seconds (no grad, CUDA synchronized) and output per case; the cases are interleaved
    round-robin in every repeat so that the machine's load drifts hit all of them alike (ratios are
    what we report)."""
    with torch.no_grad():
        outputs = {name: fn() for name, fn in cases.items()}  # warm-up, and the output whose quality we measure
        times = time_interleaved(cases, repeats, warmup=0, device=device, rotate=False)
    return {name: median(t) for name, t in times.items()}, outputs


def max_sigma_err(Q: torch.Tensor) -> float:
    return (torch.linalg.svdvals(Q.to(torch.float64)) - 1).abs().max().item()


def quality(Q: torch.Tensor, polar: torch.Tensor) -> tuple[float, float]:
    Q = Q.to(torch.float64)
    sigma_err = max_sigma_err(Q)
    polar_err = (torch.linalg.matrix_norm(Q - polar) / torch.linalg.matrix_norm(polar)).max().item()
    return sigma_err, polar_err


def exact_polar(W: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(W.to(torch.float64), full_matrices=False)
    return U @ Vh


def run(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    precisions = ["fp32"] if device.type == "cpu" else ["bf16", "fp32"]
    shapes = [(s, s) for s in args.sizes] + [tuple(b) for b in args.batched]
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for shape in shapes:
        for kind in args.inputs:
            W = make_input(kind, shape, generator).to(device)
            polar = exact_polar(W)
            for precision in precisions:
                low = precision == "bf16"
                cases = {m: (lambda m=m: orthogonalize(W, m, low_precision=low)) for m in OURS
                         if not (m == "svd" and low)}
                if precision == "fp32":
                    cases["orthogonium"] = orthogonium_peer(W)
                    if kind == "wellcond":  # orthogonium at our convergent method's orthogonality error
                        target = max_sigma_err(orthogonalize(W, "convergent"))
                        iters = matching_bjorck_iters(W, target)
                        if iters is not None and iters != 12:  # 12 = the default row already there
                            cases[f"orthogonium ({iters} Bjorck it.)"] = orthogonium_peer(W, iters)
                seconds, outputs = timed_side_by_side(cases, args.repeats, device)
                new_rows = []
                for name in cases:
                    sigma_err, polar_err = quality(outputs[name], polar)
                    new_rows.append(dict(method=name, input=kind, shape=list(shape), dtype=precision,
                                         seconds=seconds[name], speedup_vs_ns5=seconds["ns5"] / seconds[name],
                                         max_sigma_err=sigma_err, polar_err=polar_err))
                print_rows(new_rows)
                rows += new_rows
    info = machine_info(device)
    return {"device": describe(info), "torch": info["torch"], "threads": info["threads"], "rows": rows,
            "machine_info": info}


def matching_bjorck_iters(W: torch.Tensor, target: float, max_iters: int = 200) -> int | None:
    """Fewest orthogonium Bjorck iterations whose max |sigma - 1| is <= max(target, 1e-6)."""
    target = max(target, 1e-6)
    with torch.no_grad():
        for iters in [12, 16, 20, 25, 30, 40, 50, 60, 80, 100, 150, 200]:
            if iters > max_iters:
                break
            Q = orthogonium_peer(W, iters)()
            if max_sigma_err(Q) <= target:
                return iters
    return None


ROW_HEADER = ("| method | input | shape | dtype | median s | speed-up vs ns5 | max abs(sigma-1) | polar err |\n"
              "|---|---|---|---|---|---|---|---|")


def print_rows(rows):
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(f"| {r['method']} | {r['input']} | {shape} | {r['dtype']} | {r['seconds']:.4f} | "
              f"{r['speedup_vs_ns5']:.2f}x | {r['max_sigma_err']:.2e} | {r['polar_err']:.3f} |",
              flush=True)


def summarize(rows) -> None:
    """One line per (shape, input, dtype): the comparisons the README quotes."""
    print("| shape | input | ns5 s | turbo speed-up vs ns5 | polar err turbo / ns5 | convergent max abs(sigma-1) "
          "| convergent speed-up vs orthogonium | orthogonium max abs(sigma-1) |")
    print("|---|---|---|---|---|---|---|---|")
    groups = {}
    for r in rows:
        groups.setdefault(("x".join(map(str, r["shape"])), r["input"], r["dtype"]), {})[r["method"]] = r
    for (shape, kind, dtype), g in groups.items():
        ns5, turbo, conv = g["ns5"], g["turbo"], g["convergent"]
        peer = g.get("orthogonium")
        peer_cols = (f"{peer['seconds'] / conv['seconds']:.2f}x | {peer['max_sigma_err']:.1e}" if peer else "- | -")
        print(f"| {shape} | {kind}{'' if dtype == 'fp32' else ' ' + dtype} | {ns5['seconds']:.3f} | "
              f"{ns5['seconds'] / turbo['seconds']:.2f}x | {turbo['polar_err']:.3f} / {ns5['polar_err']:.3f} | "
              f"{conv['max_sigma_err']:.1e} | {peer_cols} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 512, 1024, 2048])
    parser.add_argument("--batched", type=int, nargs=3, action="append", default=None,
                        metavar=("B", "M", "N"), help="batched shapes (default: 16 512 512)")
    parser.add_argument("--inputs", nargs="+", default=["gaussian", "powerlaw", "wellcond"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write {'device':..., 'rows':[...]} here")
    parser.add_argument("--summarize", type=Path, help="print the summary table of a saved --json file and exit")
    args = parser.parse_args(argv)
    if args.summarize:
        saved = json.loads(args.summarize.read_text())
        print(f"device: {saved['device']}, torch {saved['torch']}\n")
        summarize(saved["rows"])
        return
    if args.batched is None:
        args.batched = [[16, 512, 512]]
    print(ROW_HEADER)
    result = run(args)
    print(f"\ndevice: {result['device']}, torch {result['torch']}\n")
    summarize(result["rows"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
