"""How many optimization steps does a chain need? Steps vs sparsity and fidelity.

Runs NeuroChains on K two-class regions of the digits test set (10 images: 5 + 5) with
different step budgets and stopping rules, all regions batched in one run
(``attribute_many``), and prints mean kept-units %, top-1 agreement, mean drop of the
original class probability and KL for each setting.

    python benchmarks/steps_quality.py --arch resnet --regions 6
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from captum_chains import ChainConfig, ChainExtractor
from captum_chains.zoo import load_digits_data, train_digits_model


def regions_of(data, k: int, per_class: int = 5) -> list[torch.Tensor]:
    pairs = list(itertools.combinations(range(10), 2))
    gen = torch.Generator().manual_seed(0)
    chosen = [pairs[i] for i in torch.randperm(len(pairs), generator=gen)[:k].tolist()]
    return [
        torch.cat(
            [data.x_test[data.y_test == a][:per_class], data.x_test[data.y_test == b][:per_class]]
        )
        for a, b in chosen
    ]


def evaluate(model, chains, regions) -> dict[str, float]:
    kept, agree, drop, kl = [], [], [], []
    for chain, x in zip(chains, regions):
        with torch.no_grad():
            p = model(x).softmax(1)
            q = chain.subnetwork(x).softmax(1)
        y = p.argmax(1, keepdim=True)
        kept.append(100 * chain.num_filters / chain.total_filters)
        agree.append(float((q.argmax(1, keepdim=True) == y).float().mean()))
        drop.append(float((p.gather(1, y) - q.gather(1, y)).mean()))
        kl.append(chain.kl)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"kept%": mean(kept), "agree": mean(agree), "drop": mean(drop), "kl": mean(kl)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet", choices=["vgg", "resnet"])
    parser.add_argument("--regions", type=int, default=6)
    parser.add_argument("--gate-penalty", type=float, default=0.05)
    args = parser.parse_args()
    model = train_digits_model(args.arch)
    regions = regions_of(load_digits_data(), args.regions)
    settings = [(s, 0.0, f"{s} steps, no early stop") for s in (50, 100, 150, 200, 300)]
    settings += [(300, 0.02, "300 steps, stop at |dL| < 0.02 over 10 steps (default)")]
    print(
        f"digits {args.arch}, {args.regions} regions x 10 images, gate_penalty={args.gate_penalty}"
    )
    columns = ("steps", "kept%", "agree", "drop", "KL", "s")
    widths = (6, 6, 6, 7, 7, 5)
    print(f"{'setting':58s} " + " ".join(f"{c:>{w}s}" for c, w in zip(columns, widths)))
    for steps, delta, label in settings:
        config = ChainConfig(steps=steps, early_stop_delta=delta, gate_penalty=args.gate_penalty)
        start = time.perf_counter()
        chains = ChainExtractor(model, config).attribute_many(regions, progress=False)
        seconds = time.perf_counter() - start
        used = sum(sum(r["phase"] == "optimize" for r in c.history) for c in chains) / len(chains)
        m = evaluate(model, chains, regions)
        print(
            f"{label:58s} {used:6.0f} {m['kept%']:6.1f} {m['agree']:6.2f} {m['drop']:7.3f} "
            f"{m['kl']:7.4f} {seconds:5.0f}"
        )


if __name__ == "__main__":
    main()
