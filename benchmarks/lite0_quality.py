"""NeuroChains quality on the real EfficientNet-Lite0 with 20 crops of chelsea + coffee.

Prints kept filters / total, layers/blocks removed, top-1 agreement, mean drop of the
original predicted class's probability, KL and wall time, for one (lambda, lambda_g)
setting. Used to choose the "mobile" family defaults (docs/defaults.md).

    python benchmarks/lite0_quality.py --l1 0.0065 --gate-penalty 0.9
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from captum_chains import ChainExtractor
from captum_chains.data import local_region, sample_photo
from captum_chains.pretrained import load_efficientnet_lite0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--l1", type=float, default=None)
    parser.add_argument("--gate-penalty", type=float, default=None)
    parser.add_argument("--gate-penalty-on", default="alpha", choices=["alpha", "gate"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--no-gates", action="store_true")
    parser.add_argument("--out", default=None, help="append a JSON line with the results")
    args = parser.parse_args()

    model = load_efficientnet_lite0()
    inputs = local_region([sample_photo("chelsea"), sample_photo("coffee")], n=args.n, seed=0)
    extractor = ChainExtractor(
        model,
        l1=args.l1,
        gate_penalty=args.gate_penalty,
        gate_penalty_on=args.gate_penalty_on,
        steps=args.steps,
        use_gates=not args.no_gates,
    )
    start = time.perf_counter()
    chain = extractor.attribute(inputs, progress=True)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        p = model(inputs).softmax(1)
        q = chain.subnetwork(inputs).softmax(1)
    y = p.argmax(1, keepdim=True)
    result = {
        "l1": chain.config.l1,
        "gate_penalty": chain.config.gate_penalty,
        "gate_penalty_on": args.gate_penalty_on,
        "use_gates": not args.no_gates,
        "kept": chain.num_filters,
        "total": chain.total_filters,
        "kept_pct": round(100 * chain.num_filters / chain.total_filters, 2),
        "removed": chain.subnetwork.removed_gates,
        "gates": len(chain.structure.gates),
        "agreement": float((q.argmax(1, keepdim=True) == y).float().mean()),
        "drop": float((p.gather(1, y) - q.gather(1, y)).mean()),
        "kl": chain.kl,
        "finetuned": chain.finetuned,
        "steps": len(chain.history),
        "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    print(chain.summary())
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
