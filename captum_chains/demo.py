"""The README's main job: a NeuroChains chain of the real EfficientNet-Lite0 on real photos.

Builds a local region of random crops of scikit-image's ``chelsea`` (Egyptian cat) and
``coffee`` (espresso), extracts the chain, prints which filters and layers it keeps and
its fidelity, and writes a PNG of the kept-filter scores per layer.

    python -m captum_chains.demo --out demo_out
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from captum_chains.config import ChainConfig
from captum_chains.data import local_region, sample_photo
from captum_chains.neurochains import ChainExtractor
from captum_chains.pretrained import imagenet_categories, load_efficientnet_lite0
from captum_chains.result import Chain


def fidelity_numbers(
    model: torch.nn.Module, chain: Chain, inputs: torch.Tensor
) -> dict[str, float]:
    """Top-1 agreement, mean drop of the original class probability, and KL on ``inputs``."""
    with torch.no_grad():
        p = model(inputs).softmax(1)
        q = chain.subnetwork(inputs).softmax(1)
    y = p.argmax(1, keepdim=True)
    kl = (p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum(1).mean()
    return {
        "agreement": float((q.argmax(1, keepdim=True) == y).float().mean()),
        "probability_drop": float((p.gather(1, y) - q.gather(1, y)).mean()),
        "kl": float(kl),
    }


def plot_layer_scores(chain: Chain, path: Path) -> None:
    """Per-layer kept-filter scores (one column of dots per layer) and kept/total counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(chain.importance)
    removed = set(chain.subnetwork.removed_gates)
    block_of = {u: g.name for g in chain.structure.gates for u in g.units}
    fig, (ax_scores, ax_counts) = plt.subplots(
        2, 1, figsize=(max(8, 0.22 * len(names)), 7), sharex=True, height_ratios=(3, 1.4)
    )
    vmax = max(float(s.max()) for s in chain.importance.values()) or 1.0
    for i, name in enumerate(names):
        s = chain.importance[name]
        kept = s[s > 0]
        if kept.numel():
            points = ax_scores.scatter(
                torch.full((kept.numel(),), float(i)) + (torch.rand(kept.numel()) - 0.5) * 0.5,
                kept,
                c=kept,
                cmap="viridis",
                vmin=0,
                vmax=vmax,
                s=10,
            )
        gone = block_of.get(name) in removed
        ax_counts.bar(i, s.numel(), color="0.88")
        ax_counts.bar(i, int((s > 0).sum()), color="0.6" if gone else "tab:blue")
    if "points" in locals():
        fig.colorbar(points, ax=ax_scores, label="score")
    ax_scores.set_ylabel("score of kept filter")
    ax_scores.set_title(
        f"NeuroChains on {type(chain.subnetwork.model).__name__}: "
        f"{chain.num_filters}/{chain.total_filters} filters kept, "
        f"{len(removed)}/{len(chain.structure.gates)} gated layers/blocks removed"
    )
    ax_counts.set_yscale("log")
    ax_counts.set_ylabel("kept / total")
    ax_counts.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def run_demo(
    out: str | Path = "demo_out",
    n: int = 20,
    steps: int | None = None,
    photos: tuple[str, ...] = ("chelsea", "coffee"),
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Extract and report the chain; returns the printed numbers as a dict.

    ``steps=None`` keeps the default of :class:`~captum_chains.ChainConfig`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_efficientnet_lite0()
    categories = imagenet_categories()
    inputs = local_region([sample_photo(p) for p in photos], n=n, seed=seed)
    with torch.no_grad():
        classes = model(inputs).argmax(1).tolist()
    names = sorted({categories[c] for c in classes})
    print(f"region: {n} crops of {', '.join(photos)}; the model predicts {names}")
    start = time.perf_counter()
    config = ChainConfig() if steps is None else ChainConfig(steps=steps)
    chain = ChainExtractor(model, config).attribute(inputs, progress=progress, seed=seed)
    seconds = time.perf_counter() - start
    print(chain.summary())
    numbers = fidelity_numbers(model, chain, inputs)
    report: dict[str, Any] = {
        "kept_filters": chain.num_filters,
        "total_filters": chain.total_filters,
        "kept_percent": 100 * chain.num_filters / chain.total_filters,
        "removed_layers_blocks": chain.subnetwork.removed_gates,
        "steps": len(chain.history),
        "seconds": seconds,
        **numbers,
    }
    print(
        f"\nkept {report['kept_filters']}/{report['total_filters']} filters "
        f"({report['kept_percent']:.2f}%), removed {len(report['removed_layers_blocks'])} "
        f"layers/blocks; top-1 agreement {numbers['agreement']:.2f}, mean drop of the "
        f"original class probability {numbers['probability_drop']:.3f}, KL {numbers['kl']:.4f}; "
        f"{report['steps']} steps in {seconds:.0f} s"
    )
    plot_layer_scores(chain, out / "chain_layer_scores.png")
    chain.subnetwork.save(out / "chain.safetensors")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(
        f"wrote {out / 'chain_layer_scores.png'}, {out / 'chain.safetensors'}, "
        f"{out / 'report.json'}"
    )
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="NeuroChains demo on EfficientNet-Lite0 and real photos"
    )
    parser.add_argument("--out", default="demo_out", help="output folder")
    parser.add_argument("--n", type=int, default=20, help="number of crops in the region")
    parser.add_argument(
        "--steps", type=int, default=None, help="optimization steps (default: ChainConfig's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    run_demo(args.out, n=args.n, steps=args.steps, seed=args.seed, progress=not args.quiet)


if __name__ == "__main__":
    main()
