"""The sparsity-fidelity path on the real EfficientNet-Lite0, and its cost against one chain.

One region (20 crops of two photos), in one process: one chain with the defaults, then the
path over 8 lambdas (``ChainExtractor.path``), then the chain a fidelity target selects.
Prints the path's table, both wall times and their ratio; writes the path figure to
``benchmarks/results/lite0_path_<photos>.png`` and a JSON line to
``benchmarks/results/lite0_path.jsonl``.

    OMP_NUM_THREADS=1 python benchmarks/lite0_path.py --photos chelsea coffee
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from captum_chains import ChainExtractor, FidelityTarget
from captum_chains.data import local_region, sample_photo
from captum_chains.pretrained import load_efficientnet_lite0

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", nargs=2, default=["chelsea", "coffee"])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-agreement", type=float, default=1.0)
    parser.add_argument("--max-drop", type=float, default=0.02)
    parser.add_argument("--skip-chain", action="store_true", help="only the path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import matplotlib

    matplotlib.use("Agg")

    model = load_efficientnet_lite0()
    inputs = local_region([sample_photo(p) for p in args.photos], n=args.n, seed=args.seed)
    extractor = ChainExtractor(model)
    chain_seconds = None
    if not args.skip_chain:
        start = time.perf_counter()
        chain = extractor.attribute(inputs, progress=False, seed=0)
        chain_seconds = time.perf_counter() - start
        print(f"one chain: {chain.num_filters} kept, {chain_seconds:.1f} s", flush=True)
    start = time.perf_counter()
    path = extractor.path(inputs, progress=False, seed=0)
    path_seconds = time.perf_counter() - start
    target = FidelityTarget(min_agreement=args.min_agreement, max_drop=args.max_drop)
    chosen = path.sparsest(target)
    frame = path.to_frame()
    with torch.no_grad():
        confidence = float(model(inputs).softmax(1).max(1).values.median())
    print(frame.to_string(float_format=lambda v: f"{v:.4g}"))
    name = "_".join(args.photos)
    path.plot(fidelity=target).savefig(RESULTS / f"lite0_path_{name}.png", dpi=120)
    row = {
        "photos": args.photos,
        "seed": args.seed,
        "path": frame.to_dict(orient="records"),
        "path_seconds": round(path_seconds, 1),
        "chain_seconds": None if chain_seconds is None else round(chain_seconds, 1),
        "ratio": None if chain_seconds is None else round(path_seconds / chain_seconds, 3),
        "target": {"min_agreement": args.min_agreement, "max_drop": args.max_drop},
        "chosen": None
        if chosen is None
        else {"l1": chosen.l1, "kept": chosen.kept, "kept_fraction": chosen.kept_fraction},
        "median_confidence": round(confidence, 3),
    }
    print(json.dumps({k: v for k, v in row.items() if k != "path"}), flush=True)
    with open(RESULTS / "lite0_path.jsonl", "a") as handle:
        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
