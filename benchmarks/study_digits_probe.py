"""Probe the digits studies' settings on their first regions (fidelity only).

Extracts one chain per region (the study's draw, ``seed=0``) with the study's config of
``study_digits.digits_config`` changed by ``--set field=value``, and prints the median kept
units, median fidelity drop, regions in full top-1 agreement and mean agreement; the summary
row is appended to ``benchmarks/results/study_digits_v3_sweep.jsonl``.

    OMP_NUM_THREADS=1 python benchmarks/study_digits_probe.py resnet --set l1=0.03 \\
        --set finetune_steps=300 --label ft300

The third wave's rows were run before ``DIGITS_FINETUNE`` joined ``digits_config``, i.e. with
the paper's 50 fine-tuning steps unless a row sets ``finetune_steps``: to reproduce a row
without that setting, add ``--set finetune_steps=50 --set finetune_kl=0.1``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from lite0_quality import parse_setting  # same folder
from study_digits import digits_config

from captum_chains import ChainConfig, ChainExtractor
from captum_chains.metrics import fidelity
from captum_chains.studies import sample_regions
from captum_chains.zoo import load_digits_data, train_digits_model

OUT = Path(__file__).parent / "results" / "study_digits_v3_sweep.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("arch", choices=["vgg", "resnet", "vit"])
    parser.add_argument("--regions", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], help="field=value override")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = load_digits_data()
    model = train_digits_model(args.arch)
    regions = sample_regions(model, data.x_train, data.y_train, n_regions=args.regions, seed=0)
    config = digits_config(args.arch)
    config.update(dict(parse_setting(s) for s in args.set))
    extractor = ChainExtractor(model, ChainConfig(**config))
    rows, start = [], time.perf_counter()
    for region in regions:
        chain = extractor.attribute(region.inputs, progress=False)
        result = fidelity(chain, region.inputs)
        rows.append(
            {
                "kept": chain.num_filters / chain.total_filters,
                "drop": float(result.mean_drop),
                "agreement": float(result.agreement_rate),
            }
        )
        print(json.dumps({k: round(v, 4) for k, v in rows[-1].items()}), flush=True)
    summary = {
        "arch": args.arch,
        "label": args.label,
        "set": args.set,
        "median_kept": round(100 * statistics.median(r["kept"] for r in rows), 1),
        "median_drop": round(statistics.median(r["drop"] for r in rows), 3),
        "full_agree": sum(r["agreement"] >= 1 for r in rows),
        "mean_agree": round(statistics.mean(r["agreement"] for r in rows), 3),
        "sec_per_region": round((time.perf_counter() - start) / len(rows), 1),
    }
    print(json.dumps(summary), flush=True)
    with OUT.open("a") as f:
        f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
