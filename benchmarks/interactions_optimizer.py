"""Optimisers for the sparsest AND-OR decomposition (Chen et al., ICLR 2024, Eqs. 4 and 6).

Values ``v(x_T)`` come from digits CNNs (as in ``interactions_digits.py``) on a patch grid.
For each problem the exact optimum is computed by linear programming (HiGHS), and every
optimiser is reported as its loss gap to that optimum and its CPU time:

* ``sgd`` — the reference code's optimiser: SGD, momentum 0.9, 20 000 iterations, lr
  1e-7 / 1e-6 / 1e-5 (log-decayed to lr/10 for Eq. 4, constant for Eq. 6), run here on
  the fast transforms (the reference also pays for dense 2^n x 2^n products, see
  ``interactions_transform.py``);
* ``adam`` — projected Adam in the AND-interaction parametrisation, cosine schedule;
* ``pdhg`` — the package default, preconditioned primal-dual steps;
* ``lp`` — exact, for reference.

All first-order solvers run batched over samples and models; times are CPU seconds per
problem (one sample x one model for Eq. 4, one sample x all models for Eq. 6).

Usage::

    python benchmarks/interactions_optimizer.py --grid 2x5 --samples 4 --threads 1
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from captum_chains.interactions import InteractionPrimitives, patch_grid_mask
from captum_chains.interactions.optimize import Problem, SolverConfig, problem_loss, solve
from captum_chains.zoo import load_digits_data, train_digits_model


def _values(models: list, grid: str, samples: int, cache: Path) -> torch.Tensor:
    if cache.exists():
        return torch.load(cache)
    rows, cols = (int(s) for s in grid.split("x"))
    data = load_digits_data()
    with torch.no_grad():
        ok = torch.stack([m(data.x_test).argmax(1) == data.y_test for m in models]).all(0)
    idx = ok.nonzero().flatten()[:samples]
    ip = InteractionPrimitives(models)
    values = ip.compute_values(
        data.x_test[idx],
        baselines="min",
        target=data.y_test[idx],
        feature_mask=patch_grid_mask(32, 32, rows, cols),
    )
    values = values - values[..., :1]
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(values, cache)
    return values


def _problem(values: torch.Tensor, shared: bool) -> Problem:
    spread = (values[..., -1] - values[..., 0]).abs()
    if shared:
        return Problem(values, 0.02 * spread, 0.5 * spread.mean(0), shared=True, alpha=0.1)
    batch, m, size = values.shape
    flat = values.reshape(batch * m, 1, size)
    return Problem(flat, 0.02 * spread.reshape(-1, 1), None, shared=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vgg:0,resnet:0,vgg:1")
    parser.add_argument("--grid", default="2x5")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--objectives", default="single,shared")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="out/interactions_optimizer")
    parser.add_argument("--sgd-lrs", default="1e-7,1e-6,1e-5", help="'' to skip SGD")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    specs = [(a, int(s)) for a, s in (m.split(":") for m in args.models.split(","))]
    models = [train_digits_model(arch, seed=seed) for arch, seed in specs]
    out = Path(args.out)
    values = _values(models, args.grid, args.samples, out / f"values_{args.grid}.pt")
    n = values.shape[-1].bit_length() - 1
    runs = [("lp", SolverConfig("lp"))]
    for lr in (float(s) for s in args.sgd_lrs.split(",") if s):
        runs.append((f"sgd lr={lr:g}", SolverConfig("sgd", lr=lr)))
    runs += [
        ("adam 3000", SolverConfig("adam", iterations=3000)),
        ("pdhg 3000", SolverConfig("pdhg", iterations=3000, tol=0.0)),
        ("pdhg 10000", SolverConfig("pdhg", iterations=10_000, tol=0.0)),
        ("pdhg default", SolverConfig("pdhg")),
    ]
    report = {}
    for objective in args.objectives.split(","):
        problem = _problem(values, objective == "shared")
        count = problem.values.shape[0]
        print(
            f"\n## Eq. {'6' if objective == 'shared' else '4'} ({objective}), n = {n}, "
            f"{count} problems, torch threads {torch.get_num_threads()}"
        )
        print("| optimiser | mean loss | gap to LP (mean / max) | CPU s per problem |")
        print("|---|---|---|---|")
        exact = None
        for name, cfg in runs:
            c0, w0 = time.process_time(), time.perf_counter()
            sol = solve(problem, cfg, progress=False)
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            loss = problem_loss(problem, sol.gamma, sol.noise)
            if exact is None:
                exact = loss
            gap = (loss - exact) / exact * 100
            report[f"{objective}/{name}"] = {
                "loss": float(loss.mean()),
                "gap_mean_pct": float(gap.mean()),
                "gap_max_pct": float(gap.max()),
                "cpu_s_per_problem": cpu / count,
                "wall_s_per_problem": wall / count,
            }
            print(
                f"| {name} | {float(loss.mean()):.3f} | {float(gap.mean()):.2f} % / "
                f"{float(gap.max()):.2f} % | {cpu / count:.2f} |",
                flush=True,
            )
    (out / f"report_{args.grid}.json").write_text(json.dumps(report, indent=2))
    with open(out / f"report_{args.grid}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        keys = ["loss", "gap_mean_pct", "gap_max_pct", "cpu_s_per_problem", "wall_s_per_problem"]
        writer.writerow(["objective", "optimiser", *keys])
        for name, row in report.items():
            writer.writerow([*name.split("/", 1), *(row[k] for k in keys)])


if __name__ == "__main__":
    main()
