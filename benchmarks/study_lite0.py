"""A small study on the real ImageNet EfficientNet-Lite0 with real photos.

Each region pairs two bundled photos of different ImageNet classes (the paper's "2
classes") and holds ``--crops`` random resized crops, half of each photo
(:func:`captum_chains.data.local_region`). The unseen pool for stability is made of
crops of all bundled photos drawn with another seed. Faithfulness evaluates a random
subset of ``--faithfulness-units`` kept filters per region (each removal is a Lite0
forward pass over the region). Results go to
``benchmarks/results/study_lite0/`` and the statistics to
``benchmarks/results/study_lite0_summary.csv``.

This is heavy on a CPU (each chain is a few hundred Lite0 forward/backward passes over
the crops); run it in the background::

    OMP_NUM_THREADS=1 nohup python benchmarks/study_lite0.py --regions 5 --crops 8 \
        > benchmarks/results/study_lite0.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from captum_chains.data import IMAGENET_MEAN, IMAGENET_STD, local_region, sample_photo
from captum_chains.pretrained import load_efficientnet_lite0
from captum_chains.studies import Region, plot_study, run_study

RESULTS = Path(__file__).parent / "results"
PAIRS = (
    ("chelsea", "coffee"),
    ("astronaut", "rocket"),
    ("motorcycle_left", "flower"),
    ("china", "coffee"),
    ("rocket", "chelsea"),
    ("flower", "astronaut"),
    ("coffee", "motorcycle_left"),
    ("china", "rocket"),
)
POOL_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle_left", "china", "flower")


def regions(n_regions: int, crops: int) -> list[Region]:
    out = []
    for i, (a, b) in enumerate(PAIRS[:n_regions]):
        x = local_region([sample_photo(a), sample_photo(b)], n=crops, seed=100 + i)
        out.append(Region(f"{a}__{b}", x))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--regions", type=int, default=5)
    parser.add_argument("--crops", type=int, default=8)
    parser.add_argument("--pool-per-photo", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.015)
    parser.add_argument("--faithfulness-units", type=int, default=48)
    parser.add_argument("--backend", default="serial", choices=["serial", "ray"])
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS / "study_lite0"))
    args = parser.parse_args()
    if args.regions > len(PAIRS):
        parser.error(f"at most {len(PAIRS)} regions (photo pairs) are defined")
    torch.set_num_threads(1)
    model = load_efficientnet_lite0()
    pool = torch.cat(
        [local_region(sample_photo(p), n=args.pool_per_photo, seed=999) for p in POOL_PHOTOS]
    )
    # Valid normalized range over the three channels (loose box for the attacks).
    lower = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
    upper = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
    start = time.perf_counter()
    result = run_study(
        model,
        regions(args.regions, args.crops),
        args.out,
        config={"steps": args.steps, "lr": args.lr, "finetune_steps": 20},
        pool=pool,
        ks=(1, 5, 10),
        epsilon=2 / 255 / 0.226,  # a 2/255 pixel budget in normalized units
        lower_bound=lower,
        upper_bound=upper,
        pgd_steps=5,
        faithfulness_max_units=args.faithfulness_units,
        batch_size=32,
        backend=args.backend,
        num_workers=args.workers,
        progress=True,
    )
    seconds = time.perf_counter() - start
    summary = {"model": "efficientnet_lite0", **result.summary(ks=(1, 5, 10))}
    summary["run_seconds"] = seconds
    print(json.dumps(summary, indent=1), flush=True)
    pd.DataFrame([summary]).to_csv(RESULTS / "study_lite0_summary.csv", index=False)
    import matplotlib

    matplotlib.use("Agg")
    plot_study({"lite0": result}, save_dir=Path(args.out) / "figures")


if __name__ == "__main__":
    main()
