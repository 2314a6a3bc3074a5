"""Choose lambda and lambda_g for ViTs, and check the chains of the digits ViT.

The paper's defaults (lambda, lambda_g) were tuned on VGG and ResNet; a ViT's units
(heads, MLP neurons, embedding channels) and branch gates need their own. This script
loads (or trains and caches) ``captum_chains.zoo.train_digits_model("vit")``, draws
``--regions`` regions with the paper's protocol (2 random classes, ``--per-class`` training
images of each that the model classifies correctly with confidence >= 0.95;
:func:`captum_chains.studies.sample_regions`), extracts one chain per region for every
(lambda, lambda_g) of the grid (the regions of one setting in batched ``attribute_many``
calls) and reports, per setting,

* kept heads / MLP neurons / embedding channels (median over regions and % of the total)
  and removed branches (branch gates closed);
* fidelity on the region: mean drop of the model's predicted-class probability, top-1
  agreement between sub-network and model, KL(model || sub-network);
* the same fidelity on the held-out test images of the region's two classes.

The chosen setting is the sparsest (fewest kept units) whose mean region agreement is
>= ``--min-agreement`` and mean region KL <= ``--max-kl``.

    OMP_NUM_THREADS=1 python benchmarks/vit_sweep.py                      # the grid
    OMP_NUM_THREADS=1 python benchmarks/vit_sweep.py --l1 0.002 --gate 0 --regions 24
    OMP_NUM_THREADS=1 python benchmarks/vit_sweep.py --defaults --regions 24 --region-seed 1
    python benchmarks/vit_sweep.py --out /tmp/vit_sweep.jsonl             # also per-region rows
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
from captum_chains.config import FAMILY_PENALTIES
from captum_chains.studies import sample_regions
from captum_chains.zoo import load_digits_data, train_digits_model

KINDS = ("head", "neuron", "channel")


def fidelity(model, sub, x: torch.Tensor) -> dict[str, float]:
    """Mean drop of the predicted-class probability, top-1 agreement, KL(model || sub)."""
    with torch.no_grad():
        log_p = F.log_softmax(model(x), 1)
        log_q = F.log_softmax(sub(x), 1)
    pred = log_p.argmax(1)
    p_pred = log_p.exp().gather(1, pred[:, None]).squeeze(1)
    q_pred = log_q.exp().gather(1, pred[:, None]).squeeze(1)
    return {
        "prob_drop": float((p_pred - q_pred).mean()),
        "agreement": float((log_q.argmax(1) == pred).float().mean()),
        "kl": float((log_p.exp() * (log_p - log_q)).sum(1).mean()),
    }


def run_setting(
    model,
    data,
    regions,
    l1: float | None,
    gate: float | None,
    *,
    steps: int,
    seed: int,
    chunk: int,
    **config: Any,
) -> list[dict[str, Any]]:
    """One chain per region at (l1, gate); per-region rows."""
    extractor = ChainExtractor(model, l1=l1, gate_penalty=gate, steps=steps, **config)
    start = time.perf_counter()
    chains = []
    for i in range(0, len(regions), chunk):
        part = [r.inputs for r in regions[i : i + chunk]]
        chains += extractor.attribute_many(part, progress=False, seed=seed)
    seconds = time.perf_counter() - start
    rows = []
    for region, chain in zip(regions, chains):
        sub = chain.subnetwork
        row: dict[str, Any] = {
            "l1": chain.config.l1,
            "gate_penalty": chain.config.gate_penalty,
            "region": region.region_id,
            "classes": list(region.classes),
        }
        for kind in KINDS:
            layers = [u for u in chain.structure.units if u.kind == kind]
            row[f"kept_{kind}s"] = sum(int(sub.kept[u.name].sum()) for u in layers)
            row[f"total_{kind}s"] = sum(u.size for u in layers)
        row |= {
            "kept_units": sub.num_filters,
            "total_units": sub.total_filters,
            "removed_branches": list(sub.removed_gates),
            "num_removed_branches": len(sub.removed_gates),
            "total_branches": len(chain.structure.gates),
            "steps": sum(1 for r in chain.history if r.get("phase") == "optimize"),
            "finetuned": chain.finetuned,
            "seconds_per_region": seconds / len(regions),
        }
        row |= {f"region_{k}": v for k, v in fidelity(model, sub, region.inputs).items()}
        held = torch.isin(data.y_test, torch.tensor(region.classes))
        row |= {f"heldout_{k}": v for k, v in fidelity(model, sub, data.x_test[held]).items()}
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the kept counts, means of the fidelity numbers."""
    out: dict[str, Any] = {
        "l1": rows[0]["l1"],
        "gate_penalty": rows[0]["gate_penalty"],
        "regions": len(rows),
    }
    for key in [f"kept_{k}s" for k in KINDS] + ["kept_units", "num_removed_branches", "steps"]:
        values = [float(r[key]) for r in rows]
        out[key] = statistics.median(values)
        out[key + "_mean"] = statistics.mean(values)
    for kind in KINDS:
        out[f"total_{kind}s"] = rows[0][f"total_{kind}s"]
    out["total_units"] = rows[0]["total_units"]
    out["total_branches"] = rows[0]["total_branches"]
    for part in ("region", "heldout"):
        for k in ("prob_drop", "agreement", "kl"):
            values = [float(r[f"{part}_{k}"]) for r in rows]
            out[f"{part}_{k}"] = statistics.mean(values)
            out[f"{part}_{k}_min" if k == "agreement" else f"{part}_{k}_max"] = (
                min(values) if k == "agreement" else max(values)
            )
    out["seconds_per_region"] = rows[0]["seconds_per_region"]
    return out


def _pct(s: dict[str, Any], kind: str) -> str:
    kept, total = s[f"kept_{kind}s"], s[f"total_{kind}s"]
    return f"{kept:g}/{total} ({100 * kept / total:.1f} %)"


def show(s: dict[str, Any]) -> str:
    """One markdown table row."""
    return (
        f"| {s['l1']:g} | {s['gate_penalty']:g} | {_pct(s, 'head')} | {_pct(s, 'neuron')} | "
        f"{_pct(s, 'channel')} | {s['num_removed_branches_mean']:.1f}/{s['total_branches']} | "
        f"{s['region_prob_drop']:.3f} | {s['region_agreement']:.3f} | {s['region_kl']:.3f} | "
        f"{s['heldout_agreement']:.3f} | {s['heldout_kl']:.3f} | {s['steps']:g} | "
        f"{s['seconds_per_region']:.1f} |"
    )


HEADER = (
    "| lambda | lambda_g | kept heads (median) | kept MLP neurons (median) | kept channels "
    "(median) | branches removed (mean) | region prob. drop | region agreement | region KL "
    "| held-out agreement | held-out KL | steps (median) | s / region |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--l1", type=float, nargs="+", default=[0.001, 0.002, 0.004, 0.0065])
    parser.add_argument("--gate", type=float, nargs="+", default=[0.0, 0.05, 0.9])
    parser.add_argument(
        "--defaults", action="store_true", help="run FAMILY_PENALTIES['vit'] only (ignores grid)"
    )
    parser.add_argument("--regions", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=12, help="regions per attribute_many call")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0, help="model and optimization seed")
    parser.add_argument(
        "--region-seed", type=int, default=0, help="seed of the region draw (0: the sweep's)"
    )
    parser.add_argument("--min-agreement", type=float, default=0.95)
    parser.add_argument("--max-kl", type=float, default=0.1)
    parser.add_argument("--out", default=None, help="append per-region rows as JSON lines")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = train_digits_model("vit", seed=args.seed)
    data = load_digits_data()
    regions = sample_regions(
        model,
        data.x_train,
        data.y_train,
        n_regions=args.regions,
        per_class=args.per_class,
        min_confidence=0.95,
        seed=args.region_seed,
    )
    print(
        f"digits ViT, {args.regions} regions of 2 classes x {args.per_class} training images "
        f"(confidence >= 0.95), held-out: the test images of the two classes; "
        f"threads={torch.get_num_threads()}"
    )
    grid = [(None, None)] if args.defaults else list(itertools.product(args.l1, args.gate))
    if args.defaults:
        print(f"FAMILY_PENALTIES['vit'] = {FAMILY_PENALTIES['vit']}")
    print(HEADER, flush=True)
    summaries = []
    for l1, gate in grid:
        rows = run_setting(
            model, data, regions, l1, gate, steps=args.steps, seed=args.seed, chunk=args.chunk
        )
        if args.out:
            with open(args.out, "a") as handle:
                for row in rows:
                    handle.write(json.dumps(row) + "\n")
        summaries.append(summarize(rows))
        print(show(summaries[-1]), flush=True)
    for s in summaries:
        print(
            f"l1={s['l1']:g} lg={s['gate_penalty']:g}: kept heads median {s['kept_heads']:g} "
            f"(mean {s['kept_heads_mean']:.1f}), neurons median {s['kept_neurons']:g} "
            f"(mean {s['kept_neurons_mean']:.1f}); worst region agreement "
            f"{s['region_agreement_min']:.2f}, worst region KL {s['region_kl_max']:.3f}"
        )
    ok = [
        s
        for s in summaries
        if s["region_agreement"] >= args.min_agreement and s["region_kl"] <= args.max_kl
    ]
    if ok:
        best = min(ok, key=lambda s: s["kept_units_mean"])
        print(f"chosen (sparsest with agreement >= {args.min_agreement}, KL <= {args.max_kl}):")
        print(show(best))
    else:
        print("no setting met the fidelity bar")


if __name__ == "__main__":
    main()
