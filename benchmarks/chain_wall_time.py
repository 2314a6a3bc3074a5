"""Wall time of one whole chain on the real EfficientNet-Lite0: the defaults against the
issue-15 baseline, in one process.

The baseline is the chain issue 15 measured ("today: 350 steps"): 300 optimization and 50
fine-tuning steps on the whole model in the inputs' own layout
(``ChainConfig(steps=300, channels_last=False, compact_below=None, free_rate=1)``). The candidate is
the package defaults, or the defaults with ``--set name=value`` changes. The two run one
after the other in the same process (``--rounds`` times, alternating), so that the
machine's load affects both alike; the ratio of their median wall times is printed with
each chain's size and fidelity on the region.

    OMP_NUM_THREADS=1 python benchmarks/chain_wall_time.py
    OMP_NUM_THREADS=1 python benchmarks/chain_wall_time.py --set compact_below=none
    OMP_NUM_THREADS=1 python benchmarks/chain_wall_time.py --candidate-first

Rows go to ``benchmarks/results/chain_wall_time.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from lite0_probe_row import probe_row  # same folder
from lite0_quality import parse_setting  # same folder

from captum_chains import ChainConfig, ChainExtractor
from captum_chains.data import local_region, sample_photo
from captum_chains.pretrained import load_efficientnet_lite0

RESULTS = Path(__file__).parent / "results"
BASELINE = {"steps": 300, "channels_last": False, "compact_below": None, "free_rate": 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", nargs=2, default=["chelsea", "coffee"])
    parser.add_argument("--set", action="append", default=[], help="candidate change")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--candidate-first", action="store_true", help="run the candidate before the baseline"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_efficientnet_lite0()
    x = local_region([sample_photo(p) for p in args.photos], n=20, seed=0)
    changes = dict(parse_setting(s) for s in args.set)
    configs = {"candidate": ChainConfig(**changes)}
    if not args.skip_baseline:
        baseline = {"baseline": ChainConfig(**BASELINE)}
        configs = {**configs, **baseline} if args.candidate_first else {**baseline, **configs}
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, config in configs.items():
            start = time.perf_counter()
            chain = ChainExtractor(model, config).attribute(x, progress=False)
            seconds[name].append(time.perf_counter() - start)
            row = {
                "run": name,
                "settings": BASELINE if name == "baseline" else changes,
                "photos": args.photos,
                "computed_steps": sum(r["computed"] for r in chain.history) / chain.total_filters,
                **probe_row(model, x, chain, seconds[name][-1]),
            }
            print(json.dumps(row), flush=True)
            with open(RESULTS / "chain_wall_time.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    if "baseline" in seconds:
        ratio = statistics.median(seconds["candidate"]) / statistics.median(seconds["baseline"])
        print(f"candidate / baseline wall time: {ratio:.3f}")


if __name__ == "__main__":
    main()
