"""Choose lambda and lambda_g for ViTs: NeuroChains on the digits ViT over two-class regions.

The paper's defaults (lambda, lambda_g) were tuned on VGG and ResNet; a ViT's units
(heads, MLP neurons, embedding channels) and branch gates need their own. This script
trains (or loads from the cache) ``captum_chains.zoo.train_digits_model("vit")``, builds
``--regions`` two-class regions of ``--per-class`` test images of class a and as many of
class b, extracts one chain per region for every (lambda, lambda_g) of the grid
(all regions of one setting in one batched ``attribute_many`` call), and reports

* kept heads / MLP neurons / embedding channels and open branch gates;
* fidelity on the region: top-1 agreement between sub-network and model, the mean drop
  of the model's predicted-class probability, and KL(model || sub-network);
* the same fidelity on held-out test images of the region's two classes.

The chosen setting is the sparsest one (fewest kept units) whose mean region agreement
is >= ``--min-agreement`` and mean region KL <= ``--max-kl``.

    python benchmarks/vit_sweep.py                                   # the grid, 20 regions
    python benchmarks/vit_sweep.py --l1 0.0065 --gate 0.9 --regions 20  # one setting
    python benchmarks/vit_sweep.py --out /tmp/vit_sweep.jsonl        # also per-region rows
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from captum_chains import ChainExtractor
from captum_chains.zoo import load_digits_data, train_digits_model


def make_regions(
    y: torch.Tensor, regions: int, per_class: int, seed: int = 0
) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """(class a, class b, region indices, held-out indices) for ``regions`` class pairs."""
    gen = torch.Generator().manual_seed(seed)
    pairs = list(itertools.combinations(range(10), 2))
    order = torch.randperm(len(pairs), generator=gen).tolist()
    out = []
    for k in range(regions):
        a, b = pairs[order[k % len(pairs)]]
        chosen, held = [], []
        for c in (a, b):
            idx = torch.nonzero(y == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)]
            chosen.append(idx[:per_class])
            held.append(idx[per_class:])
        out.append((a, b, torch.cat(chosen), torch.cat(held)))
    return out


def fidelity(model, sub, x: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement, mean drop of the predicted-class probability, KL(model || sub)."""
    with torch.no_grad():
        log_p = F.log_softmax(model(x), 1)
        log_q = F.log_softmax(sub(x), 1)
    pred = log_p.argmax(1)
    p_pred = log_p.exp().gather(1, pred[:, None]).squeeze(1)
    q_pred = log_q.exp().gather(1, pred[:, None]).squeeze(1)
    return {
        "agreement": float((log_q.argmax(1) == pred).float().mean()),
        "prob_drop": float((p_pred - q_pred).mean()),
        "kl": float((log_p.exp() * (log_p - log_q)).sum(1).mean()),
    }


def run_setting(
    model, data, regions, l1: float, gate: float, steps: int, seed: int, **config: Any
) -> list[dict[str, Any]]:
    extractor = ChainExtractor(model, l1=l1, gate_penalty=gate, steps=steps, **config)
    start = time.perf_counter()
    chains = extractor.attribute_many(
        [data.x_test[idx] for _, _, idx, _ in regions], progress=False, seed=seed
    )
    seconds = time.perf_counter() - start
    rows = []
    for (a, b, idx, held), chain in zip(regions, chains):
        sub = chain.subnetwork
        kinds: dict[str, list[int]] = {"head": [0, 0], "neuron": [0, 0], "channel": [0, 0]}
        for unit in chain.structure.units:
            kept = int(sub.kept[unit.name].sum())
            kinds.setdefault(unit.kind, [0, 0])
            kinds[unit.kind][0] += kept
            kinds[unit.kind][1] += unit.size
        row: dict[str, Any] = {
            "l1": l1,
            "gate_penalty": gate,
            "classes": [a, b],
            "kept_heads": kinds["head"][0],
            "total_heads": kinds["head"][1],
            "kept_neurons": kinds["neuron"][0],
            "total_neurons": kinds["neuron"][1],
            "kept_channels": kinds["channel"][0],
            "total_channels": kinds["channel"][1],
            "kept_units": sub.num_filters,
            "removed_branches": sub.removed_gates,
            "open_gates": len(chain.structure.gates) - len(sub.removed_gates),
            "steps": sum(1 for r in chain.history if r["phase"] == "optimize"),
            "finetuned": chain.finetuned,
            "seconds_all_regions": seconds,
        }
        row |= {f"region_{k}": v for k, v in fidelity(model, sub, data.x_test[idx]).items()}
        row |= {f"heldout_{k}": v for k, v in fidelity(model, sub, data.x_test[held]).items()}
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [
        "kept_heads",
        "kept_neurons",
        "kept_channels",
        "kept_units",
        "open_gates",
        "region_agreement",
        "region_prob_drop",
        "region_kl",
        "heldout_agreement",
        "heldout_prob_drop",
        "heldout_kl",
        "steps",
    ]
    out: dict[str, Any] = {"l1": rows[0]["l1"], "gate_penalty": rows[0]["gate_penalty"]}
    for k in keys:
        values = [float(r[k]) for r in rows]
        out[k] = (statistics.mean(values), statistics.pstdev(values))
    out["totals"] = (
        rows[0]["total_heads"],
        rows[0]["total_neurons"],
        rows[0]["total_channels"],
        rows[0]["open_gates"] + len(rows[0]["removed_branches"]),
    )
    out["seconds"] = rows[0]["seconds_all_regions"]
    return out


def show(s: dict[str, Any]) -> str:
    def ms(k: str, fmt: str = ".1f") -> str:
        m, sd = s[k]
        return f"{m:{fmt}}±{sd:{fmt}}"

    th, tn, tc, tg = s["totals"]
    return (
        f"l1={s['l1']:<7g} lg={s['gate_penalty']:<5g} heads {ms('kept_heads')}/{th} "
        f"neurons {ms('kept_neurons')}/{tn} channels {ms('kept_channels')}/{tc} "
        f"gates {ms('open_gates')}/{tg} | region agree {ms('region_agreement', '.3f')} "
        f"drop {ms('region_prob_drop', '.3f')} KL {ms('region_kl', '.3f')} | held-out agree "
        f"{ms('heldout_agreement', '.3f')} drop {ms('heldout_prob_drop', '.3f')} | "
        f"{s['seconds']:.0f}s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--l1", type=float, nargs="+", default=[0.001, 0.002, 0.003, 0.005])
    parser.add_argument("--gate", type=float, nargs="+", default=[0.0, 0.003, 0.01])
    parser.add_argument("--regions", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-agreement", type=float, default=0.95)
    parser.add_argument("--max-kl", type=float, default=0.1)
    parser.add_argument(
        "--alpha-init", type=float, default=None, help="initial gate parameter (default: config)"
    )
    parser.add_argument("--no-gates", action="store_true", help="score units only (no gates)")
    parser.add_argument("--out", default=None, help="write per-region rows as JSON lines")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = train_digits_model("vit", seed=args.seed)
    data = load_digits_data()
    regions = make_regions(data.y_test, args.regions, args.per_class, args.seed)
    print(
        f"digits ViT, {args.regions} regions of {args.per_class}+{args.per_class} test images, "
        f"threads={torch.get_num_threads()}"
    )
    config: dict[str, Any] = {"use_gates": not args.no_gates}
    if args.alpha_init is not None:
        config["alpha_init"] = args.alpha_init
    print(f"config overrides: {config}")
    summaries = []
    handle = open(args.out, "w") if args.out else None
    try:
        for l1, gate in itertools.product(args.l1, args.gate):
            rows = run_setting(model, data, regions, l1, gate, args.steps, args.seed, **config)
            if handle is not None:
                for row in rows:
                    handle.write(json.dumps(row) + "\n")
                handle.flush()
            summaries.append(summarize(rows))
            print(show(summaries[-1]), flush=True)
    finally:
        if handle is not None:
            handle.close()
    ok = [
        s
        for s in summaries
        if s["region_agreement"][0] >= args.min_agreement and s["region_kl"][0] <= args.max_kl
    ]
    if ok:
        best = min(ok, key=lambda s: s["kept_units"][0])
        print(f"chosen (sparsest with agreement >= {args.min_agreement}, KL <= {args.max_kl}):")
        print(show(best))
    else:
        print("no setting met the fidelity bar")


if __name__ == "__main__":
    main()
