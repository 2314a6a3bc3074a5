"""Short schedules on the Lite0 demo region, with Adam's betas as a knob.

A probe for issue 15's "a tenth of the steps": one chain with ``ChainConfig(lr=LR,
steps=STEPS, finetune_steps=10)`` and the proximal Adam's ``betas`` set to ``(B1, B2)``,
on the README demo's region (20 crops of chelsea + coffee, seed 0). Appends one JSON row
(kept, agreement, drop, KL, the kept count every 5 steps) to
``benchmarks/results/lite0_fast_probe.jsonl``.

    OMP_NUM_THREADS=1 python benchmarks/lite0_fast_probe.py 0.025 60 0.9 0.999
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from captum_chains import ChainConfig, ChainExtractor, neurochains
from captum_chains.data import local_region, sample_photo
from captum_chains.metrics import fidelity
from captum_chains.pretrained import load_efficientnet_lite0

OUT = Path(__file__).parent / "results" / "lite0_fast_probe.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lr", type=float)
    parser.add_argument("steps", type=int)
    parser.add_argument("beta1", type=float)
    parser.add_argument("beta2", type=float)
    args = parser.parse_args()
    torch.set_num_threads(1)
    build = neurochains._Optimization._optimizer

    def with_betas(self, scores, alphas, use_gates):  # the optimizer, with the probe's betas
        optimizer = build(self, scores, alphas, use_gates)
        for group in optimizer.param_groups:
            group["betas"] = (args.beta1, args.beta2)
        return optimizer

    neurochains._Optimization._optimizer = with_betas
    model = load_efficientnet_lite0()
    x = local_region([sample_photo("chelsea"), sample_photo("coffee")], n=20, seed=0)
    config = ChainConfig(lr=args.lr, steps=args.steps, finetune_steps=10)
    start = time.perf_counter()
    chain = ChainExtractor(model, config).attribute(x, progress=False)
    seconds = time.perf_counter() - start
    fid = fidelity(chain)
    kept = [row["kept"] for row in chain.history if row["phase"] == "optimize"]
    row = {
        "lr": args.lr,
        "steps": args.steps,
        "betas": [args.beta1, args.beta2],
        "seconds": round(seconds, 1),
        "kept": chain.num_filters,
        "percent": round(100 * chain.num_filters / chain.total_filters, 2),
        "agreement": float(fid.agreement_rate),
        "mean_drop": round(float(fid.mean_drop), 4),
        "kl": round(chain.kl, 4),
        "kept_every_5_steps": kept[::5],
    }
    print(json.dumps(row), flush=True)
    with OUT.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
