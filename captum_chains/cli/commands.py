"""The commands: each takes the parsed arguments and a Console and returns an exit code."""

from __future__ import annotations

import argparse
import difflib
import json
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captum_chains.cli.exporting import SUFFIXES, save_onnx, save_program
from captum_chains.cli.folder import (
    REPORT_FILE,
    fidelity_line,
    fidelity_summary,
    load_chain,
    read_summary,
    write_chain,
    write_csv,
)
from captum_chains.cli.images import Preprocessing, find_images, load_photos
from captum_chains.cli.models import (
    build_model,
    categories_for,
    default_preprocessing,
    parse_device,
    resolve_model,
    weights_hash,
)
from captum_chains.cli.output import CLIError, Console

if TYPE_CHECKING:
    import torch
    from torch import nn

    from captum_chains.config import ChainConfig
    from captum_chains.path import FidelityTarget


def parse_target(
    text: str | None, model: nn.Module, inputs: torch.Tensor, categories: list[str] | None
) -> Any:
    """``--target``: none, ``predicted``, a class index, one index per input, or a class name."""
    import torch

    if text is None:
        return None
    text = text.strip()
    if text.lower() == "predicted":
        with torch.no_grad():
            return model(inputs).argmax(1).tolist()
    parts = [p.strip() for p in text.split(",")]
    if all(p.lstrip("-").isdigit() for p in parts):
        values = [int(p) for p in parts]
        if len(values) == 1:
            return values[0]
        if len(values) != inputs.shape[0]:
            raise CLIError(
                f"--target lists {len(values)} classes but there are {inputs.shape[0]} inputs; "
                "give one class for all inputs or one per input"
            )
        return values
    if categories is None:
        raise CLIError(
            f"--target {text!r}: class names are known for ImageNet models only; give a class "
            "index, one index per input, or 'predicted'"
        )
    lowered = [c.lower() for c in categories]
    if text.lower() not in lowered:
        hint = difflib.get_close_matches(text, categories, n=3)
        raise CLIError(
            f"--target {text!r} is no ImageNet class name"
            + (f"; did you mean {', '.join(hint)}?" if hint else "")
        )
    return lowered.index(text.lower())


def cmd_extract(args: argparse.Namespace, console: Console) -> int:
    import torch

    from captum_chains import ChainExtractor

    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {args.out} is a file, not a folder")
    if (out / "subnetwork.safetensors").exists() and not args.force:
        raise CLIError(f"{args.out} already holds a chain; pass --force to replace it")
    files = find_images(args.images)
    photos = load_photos(files, console)
    device = parse_device(args.device)
    spec = resolve_model(args.model, args.weights, args.arch, args.num_classes)
    torch.manual_seed(args.seed)
    console.info(f"loading {spec.name}")
    model = build_model(spec, console, trust_pickle=args.trust_pickle).to(device)
    prep = default_preprocessing(spec, model)
    prep = Preprocessing(
        args.size or prep.size,
        prep.channels,
        tuple(args.mean) if args.mean else prep.mean,
        tuple(args.std) if args.std else prep.std,
    )
    spec.preprocessing = prep
    spec.weights_hash = weights_hash(model)
    inputs = prep.inputs(photos, args.n_crops, args.seed)
    if inputs.shape[0] < 2:
        console.warn("a region of one input; NeuroChains explains groups of 10-50 similar inputs")
    inputs = inputs.to(device)
    extractor = ChainExtractor(model, _config(args))
    structure = extractor.discover(inputs, layers=args.layers, gates=not args.no_gates)
    categories = categories_for(structure.num_classes)
    target = parse_target(args.target, model, inputs, categories)
    console.info(
        f"extracting the chain of {spec.name} on {inputs.shape[0]} inputs "
        f"({structure.total_units} units, {len(structure.gates)} gates, family {structure.family})"
    )
    start = time.perf_counter()
    chain = extractor.attribute(
        inputs,
        target=target,
        layers=args.layers,
        gates=not args.no_gates,
        progress=not console.quiet,
        seed=args.seed,
        fidelity=_fidelity_target(args),
    )
    seconds = time.perf_counter() - start
    numbers, rows = fidelity_summary(chain.subnetwork, inputs, args.batch_size)
    with torch.no_grad():
        predicted = model(inputs).argmax(1).tolist()
    summary = {
        "model": spec.name,
        "model_class": type(model).__name__,
        "family": structure.family,
        "kept_filters": chain.num_filters,
        "total_filters": chain.total_filters,
        "kept_percent": 100 * chain.num_filters / max(chain.total_filters, 1),
        "removed_layers_blocks": chain.subnetwork.removed_gates,
        "num_gates": len(structure.gates),
        "kl": chain.kl,
        "finetuned": chain.finetuned,
        "steps": len(chain.history),
        "seconds": seconds,
        "fidelity": numbers,
        "target": target,
        "predicted": [categories[c] if categories else c for c in predicted],
        "images": [str(p) for p in files],
        "n_inputs": int(inputs.shape[0]),
        "n_crops": args.n_crops,
        "seed": args.seed,
        "device": str(device),
        "config": chain.config.to_dict(),
    }
    write_chain(out, spec, chain, summary, inputs, rows)
    text = chain.summary() + "\n" + fidelity_line(numbers)
    if not console.quiet:
        print(text)
        print(
            f"\nkept {chain.num_filters}/{chain.total_filters} units "
            f"({summary['kept_percent']:.2f}%) in {seconds:.0f} s; wrote {out}"
        )
    return 0


def _config(args: argparse.Namespace) -> ChainConfig:
    """``ChainConfig()`` (or ``ChainConfig.paper()`` with ``--paper``) with the options set."""
    from captum_chains.config import ChainConfig

    overrides: dict[str, Any] = {}
    names = ("steps", "finetune_steps", "l1", "gate_penalty", "lr", "inputs_per_step", "free_rate")
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            overrides["batch_size" if name == "inputs_per_step" else name] = value
    if args.no_gates:
        overrides["use_gates"] = False
    if args.compile:
        overrides["compile"] = True
    if getattr(args, "no_compact", False):
        overrides["compact_below"] = None
    base = ChainConfig.paper() if getattr(args, "paper", False) else ChainConfig()
    return base.replace(**overrides)


def _fidelity_target(args: argparse.Namespace) -> FidelityTarget | None:
    """The ``--fidelity`` / ``--max-kl`` / ``--max-drop`` target, or None."""
    from captum_chains.path import FidelityTarget

    limits = (getattr(args, "max_kl", None), getattr(args, "max_drop", None))
    if getattr(args, "fidelity", None) is None:
        if any(v is not None for v in limits):
            raise CLIError("--max-kl and --max-drop refine --fidelity; pass --fidelity too")
        return None
    return FidelityTarget(min_agreement=args.fidelity, max_kl=limits[0], max_drop=limits[1])


def cmd_show(args: argparse.Namespace, console: Console) -> int:
    loaded = load_chain(args, console)
    summary = read_summary(loaded.folder)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(loaded.subnetwork.summary())
    if summary:
        try:
            lines = [
                f"KL(original || sub-network) on the region: {float(summary['kl']):.4f}",
                fidelity_line(summary["fidelity"]),
                f"region: {int(summary['n_inputs'])} inputs from {len(summary['images'])} "
                f"image(s); target: {summary['target']}; {int(summary['steps'])} steps in "
                f"{float(summary['seconds']):.0f} s",
            ]
        except (KeyError, TypeError, ValueError, OverflowError):
            console.warn(f"{loaded.folder / 'summary.json'} is incomplete; not shown")
        else:
            print("\n".join(lines))
    return 0


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    import torch

    from captum_chains.export import export_subnetwork

    loaded = load_chain(args, console)
    region = loaded.region()
    console.info("exporting the sub-network")
    exported = export_subnetwork(loaded.subnetwork, check_inputs=region)
    shape = loaded.subnetwork.structure.input_shape
    example = region[:2] if region is not None else torch.randn(2, *shape, device=loaded.device)
    suffix = SUFFIXES[args.format]
    out = Path(args.output).expanduser() if args.output else loaded.folder / f"exported{suffix}"
    if out.is_dir():
        raise CLIError(f"--output {args.output} is a folder; give a file name such as x{suffix}")
    if out.parent.exists() and not out.parent.is_dir():
        raise CLIError(f"--output {args.output}: {out.parent} is a file, not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    save = save_program if args.format == "pt" else save_onnx
    diff = save(exported, example, out, loaded.subnetwork)
    report = getattr(exported, "report", None)
    if report is not None:
        print(report)
        (out.parent / f"{out.stem}_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    check = "not checked (install onnxruntime)" if diff is None else f"{diff:.3g}"
    print(f"wrote {out}; max |file - SubNetwork| on the region = {check}")
    return 0


def cmd_evaluate(args: argparse.Namespace, console: Console) -> int:
    files = find_images(args.images) if args.images is not None else None
    loaded = load_chain(args, console)
    if files is not None:
        prep = loaded.spec.preprocessing or default_preprocessing(loaded.spec, loaded.model)
        inputs = prep.inputs(load_photos(files, console), args.n_crops, args.seed)
        inputs = inputs.to(loaded.device)
        where = f"{inputs.shape[0]} inputs from {len(files)} image(s)"
    else:
        region = loaded.region()
        if region is None:
            raise CLIError(f"{args.dir} stores no region; pass --images")
        inputs, where = region, f"the chain's region ({region.shape[0]} inputs)"
    numbers, rows = fidelity_summary(loaded.subnetwork, inputs, args.batch_size)
    out = Path(args.out).expanduser() if args.out else loaded.folder / "evaluation"
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps({"inputs": where, **numbers}, indent=2))
    write_csv(out / "fidelity.csv", rows)
    print(f"fidelity on {where}:")
    for key, value in numbers.items():
        print(f"  {key:<12} {value:.4f}")
    console.info(f"wrote {out / 'fidelity.json'}")
    return 0


def cmd_study(args: argparse.Namespace, console: Console) -> int:
    from captum_chains.studies import METRICS, plot_study, run_study, sample_regions

    device = parse_device(args.device)
    spec = resolve_model(args.model, args.weights, args.arch, args.num_classes)
    model = build_model(spec, console, trust_pickle=args.trust_pickle).to(device)
    pool = pool_labels = labels = None
    if args.data == "digits":
        if spec.source != "digits":
            raise CLIError("--data digits needs a digits model (digits_vgg, digits_resnet, ...)")
        from captum_chains.zoo import load_digits_data

        data = load_digits_data()
        candidates, labels = data.x_train, data.y_train
        pool, pool_labels = data.x_test, data.y_test
    else:
        prep = default_preprocessing(spec, model)
        photos = load_photos(find_images(args.data), console)
        candidates = prep.stack(photos)
    metrics = tuple(args.metrics.split(",")) if args.metrics else METRICS
    if pool is None and "stability" in metrics:
        if args.metrics:
            raise CLIError("the stability metric needs --data digits (a held-out pool)")
        metrics = tuple(m for m in metrics if m != "stability")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise CLIError(f"--metrics: unknown {unknown}; choose from {', '.join(METRICS)}")
    regions = sample_regions(
        model,
        candidates.to(device),
        None if labels is None else labels.to(device),
        n_regions=args.regions,
        classes_per_region=args.classes_per_region,
        per_class=args.per_class,
        min_confidence=args.min_confidence,
        seed=args.seed,
    )
    result = run_study(
        model,
        regions,
        args.out,
        config=_config(args),
        pool=None if pool is None else pool.to(device),
        pool_labels=None if pool_labels is None else pool_labels.to(device),
        backend=args.backend,
        num_workers=args.workers,
        device=device,
        progress=not console.quiet,
        metrics=metrics,
    )
    spec.weights_hash = weights_hash(model)
    spec.preprocessing = None if args.data == "digits" else default_preprocessing(spec, model)
    (Path(args.out) / "model.json").write_text(spec.to_json())
    with warnings.catch_warnings():  # figures of metrics left out have empty legends
        warnings.filterwarnings("ignore", message="No artists with labels found")
        plot_study(result, Path(args.out) / "figures")
    for key, value in result.summary().items():
        print(f"{key:<34} {value:.4f}")
    console.info(f"wrote {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    from captum_chains.demo import run_demo

    run_demo(args.out, n=args.n_crops, steps=args.steps, seed=args.seed, progress=not console.quiet)
    return 0


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    import torch

    loaded = load_chain(args, console)
    if loaded.chain is None:
        raise CLIError(
            f"{args.dir} was written by an older captum-chains (no chain.json); extract the "
            "chain again to write a report"
        )
    out = Path(args.output).expanduser() if args.output else loaded.folder / REPORT_FILE
    if out.is_dir():
        raise CLIError(f"--output {args.output} is a folder; give a file name such as report.html")
    prep = loaded.spec.preprocessing
    denormalize = None
    if prep is not None and prep.channels in (1, 3):
        mean = torch.tensor(prep.mean, device=loaded.device).reshape(1, -1, 1, 1)
        std = torch.tensor(prep.std, device=loaded.device).reshape(1, -1, 1, 1)

        def denormalize(x: torch.Tensor) -> torch.Tensor:
            return (x * std.to(x.device) + mean.to(x.device)).clamp(0, 1)

    summary = read_summary(loaded.folder)
    info = {"model name": loaded.spec.name}
    images = summary.get("images")
    if isinstance(images, list) and images and all(isinstance(p, str) for p in images):
        info["images"] = ", ".join(Path(p).name for p in images[:8])
    if isinstance(summary.get("target"), (int, str, list)):
        info["target"] = summary["target"]
    categories = categories_for(loaded.chain.structure.num_classes)
    console.info("drawing the report (activation maximization takes a while)")
    path = loaded.chain.report(
        out,
        title=args.title or f"Chain of {loaded.spec.name}",
        max_inputs=args.max_inputs,
        max_filters=args.max_filters,
        filter_steps=args.filter_steps,
        denormalize=denormalize,
        class_names=categories,
        info=info,
    )
    print(f"wrote {path}")
    return 0
