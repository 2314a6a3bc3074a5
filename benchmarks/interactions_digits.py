"""Real check of generalizable AND-OR interactions (Chen et al., ICLR 2024) on digits CNNs.

Several small CNNs trained on scikit-learn's digits (10 classes, ``[N, 1, 32, 32]``)
explain the same correctly classified test digits. Players are a patch grid; a masked
patch takes the blank-background value. For each digit we extract interactions with the
shared method (Eq. 6, all models jointly) and with the single-model method (Eq. 4 per
model) from the same ``2**n`` forward passes, and report

* generalization power ``s_and`` / ``s_or`` (top-k salient sets, k = 5 / 10 / 20 % of the
  ``2**n - 1`` subsets; the paper's claim: the shared method raises them),
* sparsity (fraction of interactions with ``|I| > 0.05 max |I|``),
* reconstruction error of ``v`` on all ``2**n`` masks (relative to ``|v(x_N) - v(x_∅)|``;
  bounded by the 2 % noise term) and the exact universal-matching error,
* time per sample (forward passes, optimisation).

Usage::

    python benchmarks/interactions_digits.py --grid 3x3 --samples 20 \\
        --models vgg:0,resnet:0,vgg:1 --out out/interactions_digits
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from captum_chains.interactions import InteractionPrimitives, SolverConfig, patch_grid_mask
from captum_chains.interactions.plots import (
    plot_shared_vs_distinctive,
    plot_strength_by_order,
    plot_top_interactions,
)
from captum_chains.zoo import load_digits_data, train_digits_model


def _stats(x: torch.Tensor) -> str:
    return f"{float(x.mean()):.3f} ± {float(x.std()):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vgg:0,resnet:0,vgg:1")
    parser.add_argument("--grid", default="3x3", help="patch rows x cols (n = rows * cols)")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--solver", default="pdhg")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="out/interactions_digits")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, cols = (int(s) for s in args.grid.lower().split("x"))
    specs = [(a, int(s)) for a, s in (m.split(":") for m in args.models.split(","))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    models = [train_digits_model(arch, seed=seed) for arch, seed in specs]
    names = [f"{arch}-s{seed}" for arch, seed in specs]
    data = load_digits_data()
    with torch.no_grad():
        ok = torch.stack([m(data.x_test).argmax(1) == data.y_test for m in models]).all(0)
    idx = ok.nonzero().flatten()[: args.samples]
    x, y = data.x_test[idx], data.y_test[idx]
    mask = patch_grid_mask(32, 32, rows, cols)
    n = rows * cols
    print(
        f"models {names}, n = {n} patches ({rows}x{cols}), {len(idx)} test digits, "
        f"torch threads {torch.get_num_threads()}"
    )

    ip = InteractionPrimitives(models, model_names=names)
    t0 = time.perf_counter()
    values = ip.compute_values(x, baselines="min", target=y, feature_mask=mask)
    t_eval = time.perf_counter() - t0
    solver = SolverConfig(method=args.solver, iterations=args.iterations)
    results = {}
    for method in ("shared", "single"):
        t0 = time.perf_counter()
        results[method] = ip.extract(values, method=method, solver=solver)
        results[method].timings["optimization"] = time.perf_counter() - t0

    report: dict[str, object] = {
        "models": names,
        "n": n,
        "samples": len(idx),
        "threads": torch.get_num_threads(),
        "evaluation_s_per_sample": t_eval / len(idx),
    }
    lines = [
        "| method | k | s_and | s_or |",
        "|---|---|---|---|",
    ]
    for method, res in results.items():
        opt_s = res.timings["optimization"] / len(idx)
        report[f"{method}_optimization_s_per_sample"] = opt_s
        report[f"{method}_sparsity"] = float(res.sparsity().mean())
        report[f"{method}_relative_reconstruction_error_max"] = float(
            res.relative_reconstruction_error.max()
        )
        report[f"{method}_matching_error_max"] = float(res.matching_error.max())
        report[f"{method}_loss_mean"] = float(res.loss.mean())
        for frac in (0.05, 0.10, 0.20):
            s_and = res.generalization("and", fraction=frac)
            s_or = res.generalization("or", fraction=frac)
            report[f"{method}_s_and@{frac}"] = float(s_and.mean())
            report[f"{method}_s_or@{frac}"] = float(s_or.mean())
            lines.append(f"| {method} | {frac:.0%} | {_stats(s_and)} | {_stats(s_or)} |")
    print("\n".join(lines))
    for method in results:
        print(
            f"{method}: sparsity {report[f'{method}_sparsity']:.3f}, "
            f"max relative reconstruction error "
            f"{report[f'{method}_relative_reconstruction_error_max']:.4f}, "
            f"matching error {report[f'{method}_matching_error_max']:.2e}, "
            f"optimisation {report[f'{method}_optimization_s_per_sample']:.2f} s/sample"
        )
    print(
        f"evaluation (forward passes, {len(models)} models x 2^{n}): "
        f"{report['evaluation_s_per_sample']:.2f} s/sample"
    )
    (out / "report.json").write_text(json.dumps(report, indent=2))
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "method",
                "top_k",
                "s_and_mean",
                "s_and_std",
                "s_or_mean",
                "s_or_std",
                "sparsity",
                "rel_reconstruction_error_max",
                "matching_error_max",
                "optimization_s_per_sample",
                "evaluation_s_per_sample",
                "n",
                "samples",
            ]
        )
        for method, res in results.items():
            for frac in (0.05, 0.10, 0.20):
                s_and = res.generalization("and", fraction=frac)
                s_or = res.generalization("or", fraction=frac)
                writer.writerow(
                    [
                        method,
                        frac,
                        float(s_and.mean()),
                        float(s_and.std()),
                        float(s_or.mean()),
                        float(s_or.std()),
                        report[f"{method}_sparsity"],
                        report[f"{method}_relative_reconstruction_error_max"],
                        report[f"{method}_matching_error_max"],
                        report[f"{method}_optimization_s_per_sample"],
                        report["evaluation_s_per_sample"],
                        n,
                        len(idx),
                    ]
                )

    shared = results["shared"]
    for method, res in results.items():
        plot_strength_by_order(res, model=0).savefig(out / f"strength_by_order_{method}.png")
        plot_shared_vs_distinctive(res, sample=0, kind="and").savefig(
            out / f"shared_vs_distinctive_and_{method}.png"
        )
        plot_shared_vs_distinctive(res, sample=0, kind="or").savefig(
            out / f"shared_vs_distinctive_or_{method}.png"
        )
    plot_top_interactions(shared, x[0], mask, sample=0, model=0, kind="and", k=6).savefig(
        out / "top_and_sample0.png"
    )
    plot_top_interactions(shared, x[0], mask, sample=0, model=0, kind="or", k=6).savefig(
        out / "top_or_sample0.png"
    )
    print(f"report and figures in {out}")


if __name__ == "__main__":
    main()
