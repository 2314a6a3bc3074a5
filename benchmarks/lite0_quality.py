"""NeuroChains quality on the real EfficientNet-Lite0 for one two-photo region.

Prints kept filters / total, layers/blocks removed, top-1 agreement, mean drop of the
original predicted class's probability, KL, steps and wall time for one configuration.
Used to choose the defaults and for the ablation of docs/defaults.md.

    python benchmarks/lite0_quality.py                       # package defaults
    python benchmarks/lite0_quality.py --paper               # ChainConfig.paper()
    python benchmarks/lite0_quality.py --set layer_gates=true --set lr=0.02
    python benchmarks/lite0_quality.py --photos astronaut rocket --seed 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from lite0_probe_row import probe_row  # same folder

from captum_chains import ChainConfig, ChainExtractor
from captum_chains.data import local_region, sample_photo
from captum_chains.pretrained import load_efficientnet_lite0


def parse_setting(text: str) -> tuple[str, object]:
    """``name=value`` with the value typed like the ChainConfig field."""
    name, _, raw = text.partition("=")
    kinds = {f.name: f.type for f in dataclasses.fields(ChainConfig)}
    if name not in kinds:
        raise SystemExit(f"unknown ChainConfig field {name!r}")
    kind = str(kinds[name])
    value: object
    if raw.lower() in ("none", "null"):
        value = None
    elif "Literal" in kind:
        value = raw
    elif "bool" in kind:
        value = raw.lower() in ("1", "true", "yes")
    elif kind.startswith("int"):
        value = int(raw)
    elif "float" in kind:
        value = float(raw)
    else:
        value = raw
    return name, value


def score_after_activation(extractor: ChainExtractor) -> None:
    """Move the scores of fused norm+activation modules (timm ``BatchNormAct2d``) from the
    activation's input to its output, the site of a plain implementation that scales the
    output of every BatchNorm module."""
    discover = extractor._structure

    def moved(*args, **kwargs):
        structure = discover(*args, **kwargs)
        units = tuple(
            dataclasses.replace(u, hook="output")
            if u.hook == "input" and u.site.endswith(".act")
            else u
            for u in structure.units
        )
        gates = tuple(
            dataclasses.replace(g, end_hook="output")
            if g.end_hook == "input" and g.end.endswith(".act")
            else g
            for g in structure.gates
        )
        return dataclasses.replace(structure, units=units, gates=gates)

    extractor._structure = moved  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper", action="store_true", help="start from ChainConfig.paper()")
    parser.add_argument("--set", action="append", default=[], help="field=value override")
    parser.add_argument("--photos", nargs=2, default=["chelsea", "coffee"])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fidelity", type=float, default=None, help="min top-1 agreement (path)")
    parser.add_argument("--label", default="", help="a name for the row")
    parser.add_argument(
        "--post-activation",
        action="store_true",
        help="ablation: score fused norm+activation modules after the activation",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="append a JSON line with the results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_efficientnet_lite0()
    inputs = local_region([sample_photo(p) for p in args.photos], n=args.n, seed=args.seed)
    config = ChainConfig.paper() if args.paper else ChainConfig()
    config = config.replace(**dict(parse_setting(s) for s in args.set))
    extractor = ChainExtractor(model, config)
    if args.post_activation:
        score_after_activation(extractor)
    start = time.perf_counter()
    if args.fidelity is None:
        chain = extractor.attribute(inputs, progress=False)
    else:
        chain = extractor.attribute(inputs, progress=False, fidelity=args.fidelity)
    seconds = time.perf_counter() - start
    result = {
        "label": args.label,
        "photos": args.photos,
        "seed": args.seed,
        "settings": args.set,
        "paper": args.paper,
        "l1": chain.config.l1,
        "gate_penalty": chain.config.gate_penalty,
        "removed": chain.subnetwork.removed_gates,
        "gates": len(chain.structure.gates),
        **probe_row(model, inputs, chain, seconds),
        "threads": torch.get_num_threads(),
    }
    with torch.no_grad():
        p = model(inputs).softmax(1)
    result["classes"] = int(p.argmax(1).unique().numel())
    result["median_confidence"] = round(float(p.max(1).values.median()), 3)
    kept_scores = torch.cat([s[s > 0] for s in chain.importance.values()])
    result["score_quantiles"] = [
        round(float(q), 3) for q in kept_scores.quantile(torch.tensor([0.1, 0.5, 0.9, 1.0]))
    ]
    print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
