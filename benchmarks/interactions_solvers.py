"""Which solver for the sparsest AND-OR decomposition, by size (Chen et al., ICLR 2024).

Two modes.

``--mode table``: for n = 6 ... 16 players and for one model (Eq. 4) and m = 3 models
(Eq. 6), the values ``v(x_T)`` of small tabular MLPs trained here (16 features, players
are the first ``n`` features, the rest kept) are decomposed by every solver:

* ``lp`` — exact (HiGHS interior point through scipy), stopped at ``--lp-limit`` seconds;
* ``pdhg`` — the first-order solver with its default settings (10 000 steps at most,
  stops on a certified 0.1 % gap or a stall), which also reports a certified lower
  bound from its dual iterate;
* ``sgd`` — the reference code's optimiser (20 000 steps; above ``--sgd-full-max``
  players its time is extrapolated from ``--sgd-probe`` steps and no gap is given).

Each row gives seconds per sample (one thread) and the objective gap to the LP optimum
where the LP finished. The rows feed ``AUTO_RULE`` in
``captum_chains/interactions/optimize.py``: the fastest solver within 0.1 % of the
optimum at that size.

``--mode markdown`` prints the table of finished ``--mode table`` runs (the one in
``docs/interactions.md``; ``--out a,b``: rows of ``b`` replace those of ``a``).

``--mode n16``: one end-to-end ``attribute()`` call on a tabular MLP with 16 players
(65 536 masked inputs per sample) with the default (``auto``) configuration, timed by
part: model evaluations and solver.

Usage::

    python benchmarks/interactions_solvers.py --mode table --threads 1 \\
        --out benchmarks/results/interactions_solvers
    python benchmarks/interactions_solvers.py --mode n16 --threads 1 --samples 2
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from torch import nn

from captum_chains.interactions import InteractionConfig, InteractionPrimitives
from captum_chains.interactions.optimize import SolverConfig, choose_solver

FEATURES = 16


def tabular_data(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """16 standard-normal features; the label mixes ANDs, ORs and a linear part."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(count, FEATURES, generator=gen)
    pos = x > 0
    score = (
        (pos[:, 0] & pos[:, 1]).float()
        + (pos[:, 2] | pos[:, 3]).float()
        + (pos[:, 4] & pos[:, 5] & pos[:, 6]).float()
        + 0.5 * x[:, 7:].sum(1) / 3
        - 1.2
    )
    return x, (score > 0).long()


def train_mlp(seed: int, x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> nn.Module:
    """A 16-64-64-2 MLP trained with Adam (full batch), deterministic for ``seed``."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def player_mask(n: int) -> torch.Tensor:
    """Features ``0 .. n-1`` are players; the others keep their value (``-1``)."""
    mask = torch.full((FEATURES,), -1, dtype=torch.long)
    mask[:n] = torch.arange(n)
    return mask


def _solve(ip: InteractionPrimitives, values: torch.Tensor, solver: SolverConfig) -> dict:
    cfg = InteractionConfig(solver=solver)
    start = time.perf_counter()
    res = ip.extract(values, config=cfg, progress=False)
    seconds = time.perf_counter() - start
    out = {"loss": float(res.loss.mean()), "seconds": seconds / values.shape[0]}
    if res.lower_bound is not None:
        out["bound"] = float(res.lower_bound.mean())
    return out


def run_table(args: argparse.Namespace) -> None:
    x, y = tabular_data(2048)
    models = [train_mlp(seed, x, y) for seed in range(3)]
    base = x.mean(0, keepdim=True)
    sample = x[-1:]  # one held-out row; per-sample times
    with torch.no_grad():
        target = models[0](sample).argmax(1)
    warm = InteractionPrimitives(models[:2]).compute_values(
        sample, base, target, feature_mask=player_mask(4), progress=False
    )
    for name in ("lp", "pdhg", "sgd"):  # imports and first-call costs out of the timings
        _solve(InteractionPrimitives(models[:2]), warm, SolverConfig(name, iterations=10))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["n", "models", "solver", "seconds", "loss", "lp_loss", "gap_pct", "cert_gap_pct"]
    fields += ["note"]
    with open(f"{out}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for m in (int(s) for s in args.models.split(",")):
            ip = InteractionPrimitives(models[:m])
            for n in (int(s) for s in args.sizes.split(",")):
                values = ip.compute_values(
                    sample, base, target, feature_mask=player_mask(n), progress=False
                )
                rows = []
                lp_loss = None
                if n <= (args.lp_max_single if m == 1 else args.lp_max_shared):
                    try:
                        r = _solve(ip, values, SolverConfig("lp", time_limit=args.lp_limit))
                        lp_loss = r["loss"]
                        rows.append(("lp", r, ""))
                    except RuntimeError as err:  # HiGHS hit the time limit
                        note = f"did not finish in {args.lp_limit:g} s"
                        rows.append(("lp", {"seconds": args.lp_limit}, note))
                        print(f"# n={n} m={m}: lp {note} ({err})", flush=True)
                else:
                    rows.append(("lp", {}, "not run (larger than a finished LP)"))
                rows.append(("pdhg", _solve(ip, values, SolverConfig("pdhg")), ""))
                if n <= args.sgd_full_max:
                    rows.append(("sgd", _solve(ip, values, SolverConfig("sgd")), ""))
                else:
                    probe = _solve(ip, values, SolverConfig("sgd", iterations=args.sgd_probe))
                    est = {"seconds": probe["seconds"] * 20_000 / args.sgd_probe}
                    rows.append(("sgd", est, f"time extrapolated from {args.sgd_probe} steps"))
                for name, r, note in rows:
                    row = {"n": n, "models": m, "solver": name, "note": note}
                    row["seconds"] = f"{r['seconds']:.3g}" if "seconds" in r else ""
                    if "loss" in r:
                        row["loss"] = f"{r['loss']:.6g}"
                        if lp_loss is not None:
                            row["lp_loss"] = f"{lp_loss:.6g}"
                            row["gap_pct"] = f"{100 * (r['loss'] - lp_loss) / lp_loss:.3g}"
                    if "bound" in r:
                        row["cert_gap_pct"] = f"{100 * (r['loss'] - r['bound']) / r['loss']:.3g}"
                    writer.writerow(row)
                    handle.flush()
                    print(row, flush=True)


def run_n16(args: argparse.Namespace) -> None:
    x, y = tabular_data(2048)
    model = train_mlp(0, x, y)
    base = x.mean(0, keepdim=True)
    ip = InteractionPrimitives(model)
    for k in range(args.samples):
        sample = x[-1 - k :][:1]
        start = time.perf_counter()
        res = ip.attribute(
            sample,
            baselines=base,
            target=int(model(sample).argmax(1)),
            feature_mask=torch.arange(FEATURES),
            progress=False,
        )
        total = time.perf_counter() - start
        t = res.timings
        gap = float((res.loss - res.lower_bound) / res.loss) if res.lower_bound is not None else 0
        print(
            f"sample {k}: total {total:.1f} s = evaluation {t['evaluation']:.2f} s "
            f"(65536 masked inputs) + solver {t['optimization']:.1f} s "
            f"({res.solver}); loss {float(res.loss[0]):.4g}, certified gap {100 * gap:.2f} %",
            flush=True,
        )
        print("  strongest:", ", ".join(str(i) for i in res.top("and", k=3)), flush=True)


def _pct(text: str) -> str:
    value = float(text)
    return f"{value:.2g}" if value < 10 else f"{value:.0f}"


def _cell(row: dict | None) -> str:
    if row is None or not row["seconds"]:
        return "—"
    if row["note"].startswith("did not finish"):
        return f"> {float(row['seconds']):.0f} s"
    est = "~" if row["note"].startswith("time extrapolated") else ""
    out = f"{est}{float(row['seconds']):.3g} s"
    parts = []
    if row["solver"] != "lp" and row["gap_pct"]:
        parts.append(f"{_pct(row['gap_pct'])} %")
    if row["solver"] == "pdhg" and row["cert_gap_pct"]:
        parts.append(f"cert. {_pct(row['cert_gap_pct'])} %")
    return out + (f" ({', '.join(parts)})" if parts else "")


def render(csv_paths: list[str]) -> str:
    """Markdown table of ``--mode table`` CSVs (later files replace earlier rows)."""
    rows = []
    for path in csv_paths:
        with open(path) as handle:
            rows += list(csv.DictReader(handle))
    cell = {(int(r["n"]), int(r["models"]), r["solver"]): r for r in rows}
    sizes = sorted({int(r["n"]) for r in rows})
    head = "| n | 1 model: LP | PDHG | SGD (reference) | auto | 3 models: LP | PDHG | SGD | auto |"
    lines = [head, "|" + "---|" * 9]
    for n in sizes:
        parts = [str(n)]
        for m in (1, 3):
            for solver in ("lp", "pdhg", "sgd"):
                parts.append(_cell(cell.get((n, m, solver))))
            parts.append(f"`{choose_solver(n, m > 1)}`")
        lines.append("| " + " | ".join(parts) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("table", "n16", "markdown"), default="table")
    parser.add_argument("--sizes", default="6,7,8,9,10,11,12,13,14,15,16")
    parser.add_argument("--models", default="1,3")
    parser.add_argument("--lp-limit", type=float, default=300.0)
    parser.add_argument("--lp-max-single", type=int, default=12)
    parser.add_argument("--lp-max-shared", type=int, default=11)
    parser.add_argument("--sgd-full-max", type=int, default=8)
    parser.add_argument("--sgd-probe", type=int, default=500)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="out/interactions_solvers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.mode == "markdown":
        print(render([f"{path}.csv" for path in args.out.split(",")]))
    elif args.mode == "table":
        run_table(args)
    else:
        run_n16(args)


if __name__ == "__main__":
    main()
