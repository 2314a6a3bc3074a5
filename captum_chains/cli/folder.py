"""Chain folders: what ``extract`` writes and ``show/export/evaluate`` reload."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captum_chains.cli.models import (
    ModelSpec,
    build_model,
    existing_file,
    parse_device,
    resolve_model,
    weights_hash,
)
from captum_chains.cli.output import CLIError, Console, one_line

if TYPE_CHECKING:
    import torch
    from torch import nn

    from captum_chains.result import Chain
    from captum_chains.subnetwork import SubNetwork

CHAIN_FILES = ("model.json", "subnetwork.safetensors")
REPORT_FILE = "report.html"


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise CLIError(f"cannot read {path}: {one_line(err, 160)}") from err


def read_summary(folder: Path) -> dict[str, Any]:
    """``summary.json`` of a chain folder, or ``{}`` when it is missing or malformed."""
    path = folder / "summary.json"
    if not path.is_file():
        return {}
    summary = read_json(path)
    return summary if isinstance(summary, dict) else {}


def chain_folder(path: str) -> Path:
    """A chain folder written by ``extract``, checked for its files."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CLIError(f"chain folder {path} does not exist")
    missing = [f for f in CHAIN_FILES if not (folder / f).is_file()]
    if missing:
        raise CLIError(
            f"{path} is not a chain folder (missing {', '.join(missing)}); create one with "
            "`captum-chains extract`"
        )
    return folder


@dataclass
class LoadedChain:
    """A chain folder reloaded: the rebuilt model, its SubNetwork and the whole Chain.

    ``chain`` is ``None`` for folders written before :meth:`Chain.save` existed (a
    SubNetwork file and ``region.safetensors`` only).
    """

    folder: Path
    spec: ModelSpec
    model: nn.Module
    subnetwork: SubNetwork
    device: torch.device
    chain: Chain | None = None

    def region(self) -> torch.Tensor | None:
        if self.chain is not None:
            return self.chain.inputs
        path = self.folder / "region.safetensors"
        if not path.is_file():
            return None
        from captum_chains._utils.files import read_safetensors

        try:
            tensors, _ = read_safetensors(path, "region file")
        except ValueError as err:
            raise CLIError(one_line(err, 300)) from err
        inputs = tensors.get("inputs")
        if inputs is None or not inputs.is_floating_point() or inputs.ndim < 2:
            raise CLIError(f"{path} holds no region inputs (a floating tensor 'inputs')")
        return inputs.to(self.device)


def load_chain(args: argparse.Namespace, console: Console) -> LoadedChain:
    """Rebuild the model of a chain folder (or the ``--model`` override) and its Chain."""
    from captum_chains.result import CHAIN_JSON, Chain
    from captum_chains.subnetwork import SubNetwork

    folder = chain_folder(args.dir)
    try:
        text = (folder / "model.json").read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise CLIError(f"{folder / 'model.json'} is not a model description (not text)") from err
    spec = ModelSpec.from_json(text, folder / "model.json")
    stored_hash, stored_prep = spec.weights_hash, spec.preprocessing
    if args.model is not None:
        spec = resolve_model(args.model, args.weights, args.arch, args.num_classes)
        spec.preprocessing = stored_prep
    elif args.weights is not None:
        spec.weights = existing_file(args.weights, "weights file")
    elif spec.weights is not None and not Path(spec.weights).is_file():
        raise CLIError(
            f"the weights file {spec.weights} recorded in {folder / 'model.json'} does not exist; "
            "pass its new location with --weights"
        )
    device = parse_device(args.device)
    console.info(f"loading {spec.name}")
    model = build_model(spec, console, trust_pickle=args.trust_pickle).to(device)
    chain = None
    try:
        if (folder / CHAIN_JSON).is_file():
            chain = Chain.load(folder, model, device)
            subnetwork = chain.subnetwork
        else:
            subnetwork = SubNetwork.load(folder / "subnetwork.safetensors", model)
    except ValueError as err:
        raise CLIError(f"the chain in {folder} does not match model {spec.name}: {err}") from err
    found = weights_hash(model)
    if stored_hash is not None and found != stored_hash:
        raise CLIError(
            f"the chain in {folder} was extracted on other weights of {spec.name} (weights hash "
            f"{stored_hash}, this model has {found}); pass the original weights with --weights"
        )
    loaded = LoadedChain(folder, spec, model, subnetwork, device, chain)
    _probe(loaded)
    return loaded


def _probe(loaded: LoadedChain) -> None:
    """Run the sub-network on one input, so that a crafted structure fails here, clearly."""
    import torch

    region = loaded.region()
    shape = loaded.subnetwork.structure.input_shape
    if region is not None:
        example = region[:1]
    elif shape:
        example = torch.zeros(1, *shape, device=loaded.device)
    else:
        return
    try:
        with torch.no_grad():
            out = loaded.subnetwork(example)
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            raise ValueError(f"the sub-network returned {type(out).__name__}, not logits")
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as err:
        raise CLIError(
            f"the chain in {loaded.folder} does not run on model {loaded.spec.name} (damaged or "
            f"crafted files?): {one_line(err, 240)}"
        ) from err


def fidelity_summary(
    subnetwork: SubNetwork, inputs: torch.Tensor, batch_size: int
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Averages and per-input rows of :func:`captum_chains.metrics.fidelity`."""
    import torch

    from captum_chains.metrics import fidelity

    result = fidelity(subnetwork, inputs, batch_size=batch_size)
    columns = {
        f.name: getattr(result, f.name).tolist()
        for f in dataclasses.fields(result)
        if isinstance(getattr(result, f.name), torch.Tensor)
        and getattr(result, f.name).shape == (inputs.shape[0],)
    }
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    return result.summary(), rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows (dicts, keys in first-seen order) as a CSV file; no pandas needed."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def fidelity_line(numbers: Mapping[str, float]) -> str:
    return (
        f"top-1 agreement {numbers['agreement']:.2f}, mean drop of the original class "
        f"probability {numbers['mean_drop']:.3f}, KL {numbers['kl']:.4f}"
    )


def write_chain(
    out: Path,
    spec: ModelSpec,
    chain: Chain,
    summary: dict[str, Any],
    inputs: torch.Tensor,
    rows: list[dict[str, Any]],
) -> None:
    """The chain folder: :meth:`Chain.save` plus the model description and readable files."""
    from captum_chains.demo import plot_layer_scores
    from captum_chains.visualization import plot_architecture, save_figure

    if chain.inputs is None:
        chain = dataclasses.replace(chain, inputs=inputs)
    chain.save(out)  # chain.json, chain.safetensors, subnetwork.safetensors
    (out / "model.json").write_text(spec.to_json())
    importance = {
        "layers": {n: [round(float(v), 6) for v in s] for n, s in chain.importance.items()},
        "gates": {n: round(float(v), 6) for n, v in chain.gates.items()},
        "removed": chain.subnetwork.removed_gates,
    }
    (out / "importance.json").write_text(json.dumps(importance, indent=1))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.txt").write_text(
        chain.summary() + "\n" + fidelity_line(summary["fidelity"]) + "\n"
    )
    write_csv(out / "history.csv", chain.history)
    write_csv(out / "fidelity.csv", rows)
    plot_layer_scores(chain, out / "layer_scores.png")
    save_figure(plot_architecture(chain), out / "architecture.png")
