"""Eq. 8's objective and the kept-unit count against steps: the paper's schedule vs ours.

One region of the real EfficientNet-Lite0 (20 crops of chelsea + coffee, the README demo's
region), two runs in one process on the same inputs and the same penalties:

* ``paper``: ``ChainConfig.paper()`` (Adam lr 0.005 on the whole loss, alpha 0, all gates,
  300 + 50 steps, the paper's stopping rule);
* ``default``: ``ChainConfig()`` (proximal Adam at the paper's rate, gates on residual
  blocks only).

Writes one JSON line per run (objective and kept count per step, wall time, final chain)
to ``benchmarks/results/optimizer_trace.jsonl`` and a figure
``benchmarks/results/optimizer_trace.png``; prints the wall-time ratio.

    OMP_NUM_THREADS=1 python benchmarks/optimizer_trace.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from captum_chains import ChainConfig, ChainExtractor
from captum_chains.data import local_region, sample_photo
from captum_chains.metrics import fidelity
from captum_chains.pretrained import load_efficientnet_lite0

RESULTS = Path(__file__).parent / "results"


def trace(model: torch.nn.Module, inputs: torch.Tensor, name: str, config: ChainConfig) -> dict:
    start = time.perf_counter()
    chain = ChainExtractor(model, config).attribute(inputs, progress=False)
    seconds = time.perf_counter() - start
    fid = fidelity(chain)
    return {
        "run": name,
        "l1": chain.config.l1,
        "gate_penalty": chain.config.gate_penalty,
        "seconds": round(seconds, 1),
        "steps": len(chain.history),
        "objective": [round(row["loss"], 5) for row in chain.history if row["phase"] == "optimize"],
        "kept_by_step": [row["kept"] for row in chain.history if row["phase"] == "optimize"],
        "finetune_steps": sum(row["phase"] == "finetune" for row in chain.history),
        "kept": chain.num_filters,
        "total": chain.total_filters,
        "removed_gates": chain.subnetwork.removed_gates,
        "kl": round(chain.kl, 5),
        "agreement": float(fid.agreement_rate),
        "mean_drop": round(float(fid.mean_drop), 5),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for row in rows:
        steps = range(1, len(row["objective"]) + 1)
        left.plot(steps, row["objective"], label=f"{row['run']} ({row['seconds']:.0f} s)")
        right.plot(steps, [100 * k / row["total"] for k in row["kept_by_step"]], label=row["run"])
    # the gate penalty is linear in alpha, so the objective goes below 0 once gates close
    left.set(xlabel="step", ylabel="Eq. 8 objective", title="objective")
    left.set_yscale("symlog", linthresh=1.0)
    left.axhline(0.0, color="0.7", lw=0.8)
    right.set(xlabel="step", ylabel="units with score >= tau (%)", title="kept units")
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--runs", nargs="+", default=["default", "paper"])
    parser.add_argument("--out", default=str(RESULTS / "optimizer_trace.jsonl"))
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw the figure from the last two rows"
    )
    args = parser.parse_args()
    if args.plot_only:
        rows = [json.loads(line) for line in Path(args.out).read_text().splitlines()[-2:]]
        plot(rows, Path(args.out).with_suffix(".png"))
        return
    torch.set_num_threads(1)
    model = load_efficientnet_lite0()
    inputs = local_region([sample_photo("chelsea"), sample_photo("coffee")], n=args.n, seed=0)
    configs = {"default": ChainConfig(), "paper": ChainConfig.paper()}
    rows = []
    for name in args.runs:
        row = trace(model, inputs, name, configs[name])
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("objective", "kept_by_step")}))
        with open(args.out, "a") as handle:
            handle.write(json.dumps(row) + "\n")
    if len(rows) == 2:
        ratio = rows[0]["seconds"] / rows[1]["seconds"]
        print(f"wall time {rows[0]['run']} / {rows[1]['run']}: {ratio:.3f}")
    plot(rows, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
