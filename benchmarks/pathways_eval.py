"""Evaluation of critical pathways and the pathway gradient (Khakzar et al., CVPR 2021).

Prints, for the trained digits VGG and for EfficientNet-Lite0 (real ImageNet weights)
on real photos:

1. critical-pathway statistics: neurons, kept neurons, and how well the pathway
   network alone reproduces the prediction (masked forward);
2. the cascading-randomization sanity check (Adebayo et al. 2018): Spearman (signed,
   absolute) and SSIM between the trained and the fully randomized model's maps;
3. LeRF / MoRF pixel-perturbation AUCs;
4. Captum's infidelity and sensitivity_max;
5. the overlap of a NeuroChains chain with the critical pathways of the same region;

for the pathway gradient (NeuronMCT and NeuronIntGrad pathways) next to Saliency,
IntegratedGradients, Gradient x Input, GuidedBackprop and GradCAM.

Usage::

    python benchmarks/pathways_eval.py --model digits       # ~3 min of CPU
    python benchmarks/pathways_eval.py --model effnet --effnet-overlap 8
    python benchmarks/pathways_eval.py --model effnet --sections sanity --methods MCT,GradCAM

On EfficientNet most of the time (about 45 s per image and call on one core) goes to
NeuronIntGrad: its sanity check alone takes ~35 min; ``--sections`` and ``--methods``
run parts, ``--json`` keeps every number written so far.

Everything runs on CPU with ``--threads`` threads (default 1; the numbers do not
depend on it).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import (
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    Saliency,
)
from torch import Tensor, nn

from captum_chains.pathways import (
    CriticalPathways,
    PathwayGradient,
    captum_scores,
    cascading_randomization,
    pathway_chain_overlap,
    perturbation_curves,
)

Explain = Callable[[nn.Module, Tensor, Tensor], Tensor]


@dataclass
class Setup:
    name: str
    model: nn.Module
    inputs: Tensor
    target: Tensor
    sanity_inputs: Tensor
    sanity_layers: list[str] | None
    gradcam_layer: str
    ig_steps: int
    labels: list[str]


def _gradcam(layer: str) -> Explain:
    def explain(model: nn.Module, x: Tensor | tuple[Tensor, ...], target: Tensor) -> Tensor:
        x = x[0] if isinstance(x, tuple) else x  # captum's sensitivity_max passes tuples
        module = model.get_submodule(layer)
        cam = LayerGradCam(model, module).attribute(x, target=target, relu_attributions=True)
        return LayerAttribution.interpolate(cam.detach(), tuple(x.shape[-2:]), "bilinear")

    return explain


def _gradcam_for_sensitivity(model: nn.Module, layer: str) -> Callable[..., Tensor]:
    """GradCAM as an ``explanation_func`` for ``sensitivity_max``, shaped like the inputs."""

    def explain(inputs: Tensor | tuple[Tensor, ...], target: Tensor) -> Tensor | tuple[Tensor, ...]:
        # like a Captum attribution: a tuple for a tuple input. sensitivity_max iterates
        # over the explanation of its (tuple) inputs: a bare tensor would be iterated over
        # its batch dimension and silently broadcast into wrong numbers
        x = inputs[0] if isinstance(inputs, tuple) else inputs
        cam = _gradcam(layer)(model, x, target).expand_as(x).contiguous()
        return (cam,) if isinstance(inputs, tuple) else cam

    return explain


def methods(setup: Setup, percentile: float) -> dict[str, tuple[Explain, Callable, dict]]:
    """name -> (explain(model, x, target), attribute-function factory, extra kwargs)."""

    def pg(method: str) -> Explain:
        return lambda m, x, t: PathwayGradient(m).attribute(
            x, target=t, percentile=percentile, method=method, internal_batch_size=11
        )

    def captum(cls, **kw) -> Explain:
        return lambda m, x, t: cls(m).attribute(x.clone(), target=t, **kw).detach()

    return {
        "PathwayGrad (NeuronMCT)": (
            pg("taylor"),
            lambda m: PathwayGradient(m).attribute,
            {"percentile": percentile},
        ),
        "PathwayGrad (NeuronIntGrad)": (
            pg("integrated"),
            lambda m: PathwayGradient(m).attribute,
            {"percentile": percentile, "method": "integrated", "internal_batch_size": 11},
        ),
        "Saliency": (captum(Saliency, abs=False), lambda m: Saliency(m).attribute, {"abs": False}),
        "IntegratedGradients": (
            captum(IntegratedGradients, n_steps=setup.ig_steps, internal_batch_size=16),
            lambda m: IntegratedGradients(m).attribute,
            {"n_steps": setup.ig_steps, "internal_batch_size": 16},
        ),
        "Gradient x Input": (captum(InputXGradient), lambda m: InputXGradient(m).attribute, {}),
        "GuidedBackprop": (captum(GuidedBackprop), lambda m: GuidedBackprop(m).attribute, {}),
        "GradCAM": (
            _gradcam(setup.gradcam_layer),
            lambda m: _gradcam_for_sensitivity(m, setup.gradcam_layer),
            {},
        ),
    }


def digits_setup(n: int, n_sanity: int) -> Setup:
    from captum_chains.zoo import load_digits_data, train_digits_model

    model = train_digits_model("vgg")
    data = load_digits_data()
    with torch.no_grad():
        pred = model(data.x_test).argmax(1)
    correct = torch.nonzero(pred == data.y_test).squeeze(1)
    x = data.x_test[correct[:n]]
    y = data.y_test[correct[:n]]
    return Setup(
        name="digits VGG",
        model=model,
        inputs=x,
        target=y,
        sanity_inputs=x[:n_sanity],
        sanity_layers=None,  # every parameterized module, top first
        gradcam_layer="features.19",
        ig_steps=50,
        labels=[str(int(v)) for v in y],
    )


EFFNET_PHOTOS = ("chelsea", "coffee", "motorcycle_left", "rocket", "china", "astronaut")


def effnet_setup(n: int, n_sanity: int) -> Setup:
    from captum_chains.data import preprocess, sample_photo
    from captum_chains.pretrained import imagenet_categories, load_efficientnet_lite0

    model = load_efficientnet_lite0()
    x = torch.stack([preprocess(sample_photo(name)) for name in EFFNET_PHOTOS[:n]])
    with torch.no_grad():
        y = model(x).argmax(1)
    categories = imagenet_categories()
    layers = ["classifier", "bn2", "conv_head"]
    layers += [f"blocks.{i}" for i in range(len(model.blocks) - 1, -1, -1)]
    layers += ["bn1", "conv_stem"]
    return Setup(
        name="EfficientNet-Lite0",
        model=model,
        inputs=x,
        target=y,
        sanity_inputs=x[:n_sanity],
        sanity_layers=layers,
        gradcam_layer="bn2",
        ig_steps=32,
        labels=[categories[int(i)] for i in y],
    )


def pathway_stats(setup: Setup, percentiles: tuple[float, ...]) -> list[dict]:
    rows = []
    cp = CriticalPathways(setup.model)
    with torch.no_grad():
        base = setup.model(setup.inputs).softmax(1)
    base_p = base.gather(1, setup.target[:, None]).squeeze(1)
    for method in ("taylor", "integrated"):
        for p in percentiles:
            start = time.time()
            res = cp.attribute(
                setup.inputs,
                target=setup.target,
                percentile=p,
                method=method,
                internal_batch_size=11,
            )
            seconds = time.time() - start
            with torch.no_grad():
                masked = cp.masked_forward(setup.inputs, res).softmax(1)
            masked_p = masked.gather(1, setup.target[:, None]).squeeze(1)
            zeros = sum(int((c == 0).flatten(1).sum(1).sum()) for c in res.contributions.values())
            rows.append(
                {
                    "method": method,
                    "percentile": p,
                    "neurons": res.total_neurons,
                    "kept": res.kept_per_example,
                    "zero_contrib_frac": zeros / (res.total_neurons * res.batch_size),
                    "same_class": float((masked.argmax(1) == setup.target).float().mean()),
                    "prob_ratio": float((masked_p / base_p).mean()),
                    "seconds_per_input": seconds / res.batch_size,
                }
            )
    return rows


def sanity(setup: Setup, table: dict, out: dict, save: Callable[[], None]) -> None:
    for name, (explain, _, _) in table.items():
        start = time.time()
        res = cascading_randomization(
            setup.model,
            setup.sanity_inputs,
            explain,
            target=setup.target[: len(setup.sanity_inputs)],
            layers=setup.sanity_layers,
            seed=0,
        )
        summary = res.summary()
        out[name] = {
            **res.final(),
            "steps": len(res.steps) - 1,
            "curve_spearman_abs": [round(float(v), 3) for v in summary["spearman_abs"]],
            "seconds": time.time() - start,
        }
        save()
        print(f"  sanity {name}: {out[name]}", flush=True)


def perturbation_and_metrics(
    setup: Setup,
    table: dict,
    n_perturb: int,
    skip_sensitivity: set[str],
    out: dict,
    save: Callable[[], None],
    keep: dict | None = None,
) -> None:
    for name, (explain, attribute_factory, kwargs) in table.items():
        start = time.time()
        attr = explain(setup.model, setup.inputs, setup.target)
        attr_seconds = time.time() - start
        curves = perturbation_curves(setup.model, setup.inputs, attr, target=setup.target)
        if keep is not None:
            keep[name] = (attr.detach(), curves)
        row = {**curves.summary(), "attr_seconds_per_input": attr_seconds / len(setup.inputs)}
        if attribute_factory is not None:
            skipped = name in skip_sensitivity
            scores = captum_scores(
                setup.model,
                setup.inputs,
                None if skipped else attribute_factory(setup.model),
                attr.expand_as(setup.inputs),
                target=setup.target,
                n_perturb_samples=n_perturb,
                max_examples_per_batch=44,
                **({} if skipped else kwargs),
            )
            row["infidelity"] = float(scores["infidelity"].mean())
            row["sensitivity_max"] = float(scores["sensitivity_max"].mean())
        else:
            row["infidelity"] = row["sensitivity_max"] = float("nan")
        out[name] = row
        save()
        print(f"  {name}: {row}", flush=True)


def overlap(model: nn.Module, region: Tensor, percentile: float) -> dict:
    """A NeuroChains chain of the region vs the region's critical pathways."""
    from captum_chains.neurochains import ChainExtractor

    start = time.time()
    chain = ChainExtractor(model).attribute(region, progress=False, seed=0)
    chain_seconds = time.time() - start
    with torch.no_grad():
        target = model(region).argmax(1)
    out: dict = {"chain_seconds": chain_seconds, "region": len(region)}
    for method in ("taylor", "integrated"):
        pathways = CriticalPathways(model).attribute(
            region, target=target, percentile=percentile, method=method, internal_batch_size=11
        )
        result = pathway_chain_overlap(chain, pathways)
        kept = sum(int(v.sum()) for v in result.kept.values())
        total = sum(v.numel() for v in result.kept.values())
        out[method] = {
            **result.summary(),
            "mapped_layers": len(result.layers),
            "unmapped_layers": list(result.unmapped),
            "chain_kept": f"{kept}/{total}",
        }
    return out


def digits_region(n: int = 20, digit: int = 3) -> Tensor:
    from captum_chains.zoo import load_digits_data

    data = load_digits_data()
    return data.x_test[data.y_test == digit][:n]


def print_overlap(name: str, result: dict) -> None:
    print(
        f"\nOverlap with a NeuroChains chain ({name}, region of {result['region']} inputs, "
        f"chain in {result['chain_seconds']:.0f}s)"
    )
    print(
        "| pathways | chain kept (mapped layers) | chain on pathway | chance | pathway in chain "
        "| chance | unmapped layers |"
    )
    print("|---|---|---|---|---|---|---|")
    for method in ("taylor", "integrated"):
        r = result[method]
        print(
            f"| {method} | {r['chain_kept']} | {r['chain_on_pathway']:.3f} | "
            f"{r['chance_chain_on_pathway']:.3f} | {r['pathway_in_chain']:.3f} | "
            f"{r['chance_pathway_in_chain']:.3f} | {len(r['unmapped_layers'])} |"
        )


def print_tables(setup: Setup, stats: list[dict], sane: dict, pert: dict) -> None:
    print(f"\n### {setup.name}: {len(setup.inputs)} inputs ({', '.join(setup.labels)})")
    print("\nCritical pathways (masked network = pathway neurons only)")
    print(
        "| contribution | p | neurons/input | kept/input | zero contributions | same class "
        "| prob ratio | s/input |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in stats:
        print(
            f"| {r['method']} | {r['percentile']:g} | {r['neurons']} | {r['kept']} | "
            f"{r['zero_contrib_frac']:.3f} | {r['same_class']:.2f} | {r['prob_ratio']:.3f} | "
            f"{r['seconds_per_input']:.2f} |"
        )
    print(f"\nSanity check: full cascading randomization, {len(setup.sanity_inputs)} inputs")
    print("| method | Spearman | abs Spearman | SSIM | constant maps | steps |")
    print("|---|---|---|---|---|---|")
    for name, r in sane.items():
        print(
            f"| {name} | {r['spearman']:.3f} | {r['spearman_abs']:.3f} | {r['ssim']:.3f} | "
            f"{r['constant_maps']:.2f} | {r['steps']} |"
        )
    print("\nPixel perturbation (prob ratio AUC over 0-90% removed) and Captum metrics")
    print(
        "| method | LeRF AUC (higher) | MoRF AUC (lower) | LeRF-MoRF | infidelity "
        "| sensitivity_max | s/input |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in pert.items():
        print(
            f"| {name} | {r['lerf_auc']:.3f} | {r['morf_auc']:.3f} | {r['gap']:.3f} | "
            f"{r['infidelity']:.4g} | {r['sensitivity_max']:.3f} | "
            f"{r['attr_seconds_per_input']:.2f} |"
        )


def write_csvs(prefix: str, out: dict) -> None:
    """One CSV per section: ``<prefix>_stats.csv``, ``_sanity.csv``, ``_perturbation.csv``."""
    for section in ("stats", "sanity", "perturbation"):
        data = out.get(section)
        if not data:
            continue
        rows = data if isinstance(data, list) else [{"method": k, **v} for k, v in data.items()]
        rows = [
            {k: (json.dumps(v) if isinstance(v, list | dict) else v) for k, v in r.items()}
            for r in rows
        ]
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with open(f"{prefix}_{section}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


def save_figures(prefix: str, setup: Setup, kept: dict, show: int = 4) -> None:
    """Maps side by side (``<prefix>_maps.png``) and LeRF/MoRF curves (``_curves.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from captum_chains.pathways import max_magnitude_channel

    names = list(kept)
    rows = min(show, len(setup.inputs))
    fig, axes = plt.subplots(
        rows, len(names) + 1, figsize=(1.9 * (len(names) + 1), 1.9 * rows), squeeze=False
    )
    x = setup.inputs[:rows]
    if x.shape[1] == 3:
        from captum_chains.data import denormalize

        pics = denormalize(x).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    else:
        pics = x[:, 0].numpy()
    for i in range(rows):
        axes[i, 0].imshow(pics[i], cmap=None if pics.ndim == 4 else "gray")
        axes[i, 0].set_title(setup.labels[i][:14], fontsize=7)
        for j, name in enumerate(names, start=1):
            a = kept[name][0][i : i + 1]
            if a.shape[1] > 1:
                a = max_magnitude_channel(a)
            a = a[0, 0].numpy()
            lim = float(np.abs(a).max()) or 1.0
            axes[i, j].imshow(a, cmap="bwr", vmin=-lim, vmax=lim)
            if i == 0:
                axes[i, j].set_title(name.replace("PathwayGrad ", "PG "), fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(f"{prefix}_maps.png", dpi=110)
    plt.close(fig)
    fig, (ax_l, ax_m) = plt.subplots(1, 2, figsize=(10, 3.4))
    for name, (_, curves) in kept.items():
        ax_l.plot(curves.fractions, curves.prob_ratio("lerf").mean(1), label=name)
        ax_m.plot(curves.fractions, curves.prob_ratio("morf").mean(1), label=name)
    ax_l.set(title=f"LeRF ({setup.name})", xlabel="fraction removed", ylabel="prob ratio")
    ax_m.set(title=f"MoRF ({setup.name})", xlabel="fraction removed")
    ax_m.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{prefix}_curves.png", dpi=110)
    plt.close(fig)


SECTIONS = ("stats", "sanity", "perturbation", "overlap", "figures")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["digits", "effnet", "both"], default="both")
    parser.add_argument("--percentile", type=float, default=85.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--digits-n", type=int, default=32)
    parser.add_argument("--digits-sanity-n", type=int, default=8)
    parser.add_argument("--effnet-n", type=int, default=4)
    parser.add_argument("--effnet-sanity-n", type=int, default=2)
    parser.add_argument("--n-perturb", type=int, default=5)
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS[:-1]),
        help=f"comma-separated subset of {SECTIONS}",
    )
    parser.add_argument(
        "--methods", default="", help="comma-separated substrings selecting methods (default all)"
    )
    parser.add_argument(
        "--effnet-overlap",
        type=int,
        default=0,
        help="region size for the (slow) NeuroChains overlap on EfficientNet; 0 skips it",
    )
    parser.add_argument("--json", help="write all numbers to this JSON file (after every step)")
    parser.add_argument(
        "--prefix",
        help="write <prefix>_<model>_{stats,sanity,perturbation}.csv, _maps.png and _curves.png",
    )
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    unknown = sections - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results: dict = {}

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=float)

    setups = []
    if args.model in ("digits", "both"):
        setups.append(("digits", digits_setup(args.digits_n, args.digits_sanity_n)))
    if args.model in ("effnet", "both"):
        setups.append(("effnet", effnet_setup(args.effnet_n, args.effnet_sanity_n)))
    wanted = [w for w in args.methods.split(",") if w]
    for key, setup in setups:
        print(f"== {setup.name}", flush=True)
        table = {
            name: entry
            for name, entry in methods(setup, args.percentile).items()
            if not wanted or any(w in name for w in wanted)
        }
        is_effnet = key == "effnet"
        out = results.setdefault(key, {"stats": [], "sanity": {}, "perturbation": {}})
        if "stats" in sections:
            percentiles = (args.percentile,) if is_effnet else (70.0, 85.0, 95.0)
            out["stats"] = pathway_stats(setup, percentiles)
            save()
        if "sanity" in sections:
            sanity(setup, table, out["sanity"], save)
        if "perturbation" in sections:
            skip_sens = {"PathwayGrad (NeuronIntGrad)"} if is_effnet else set()
            kept: dict = {}
            perturbation_and_metrics(
                setup, table, args.n_perturb, skip_sens, out["perturbation"], save, kept
            )
            if args.prefix:
                save_figures(f"{args.prefix}_{key}", setup, kept)
        if "figures" in sections and "perturbation" not in sections and args.prefix:
            kept = {}  # maps and curves only, no Captum metrics
            for name, (explain, _, _) in table.items():
                attr = explain(setup.model, setup.inputs, setup.target).detach()
                curves = perturbation_curves(setup.model, setup.inputs, attr, target=setup.target)
                kept[name] = (attr, curves)
            save_figures(f"{args.prefix}_{key}", setup, kept)
        if args.prefix:
            write_csvs(f"{args.prefix}_{key}", out)
        print_tables(setup, out["stats"], out["sanity"], out["perturbation"])
        region = None
        if "overlap" in sections and key == "digits":
            region = digits_region()
        elif "overlap" in sections and args.effnet_overlap:
            from captum_chains.data import local_region, sample_photo

            region = local_region(sample_photo("chelsea"), n=args.effnet_overlap, seed=0)
        if region is not None:
            out["overlap"] = overlap(setup.model, region, args.percentile)
            save()
            print_overlap(setup.name, out["overlap"])


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
