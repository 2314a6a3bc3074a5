"""The result of a NeuroChains extraction."""

from __future__ import annotations

import errno
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from captum_chains._utils.files import atomic_write, read_json, read_safetensors, write_safetensors
from captum_chains._utils.optional import require
from captum_chains.config import ChainConfig
from captum_chains.subnetwork import SubNetwork
from captum_chains.units.base import ModelStructure

if TYPE_CHECKING:
    from torch import nn

CHAIN_FORMAT = "captum-chains/chain-v1"
CHAIN_JSON = "chain.json"
CHAIN_TENSORS = "chain.safetensors"
SUBNETWORK_FILE = "subnetwork.safetensors"
_TUPLE = "__tuple__"


@dataclass
class Chain:
    """A local reasoning chain: which units and layers carry the model's decision on a region.

    Attributes
    ----------
    importance : dict of str to Tensor
        Unit layer name -> final score per unit; 0 for removed units (also for units of a
        removed layer or block).
    gates : dict of str to float
        Gate name -> gate value ``sigmoid(alpha / T)`` at the end of the optimization; gates
        below ``config.gate_threshold`` were closed.
    subnetwork : SubNetwork
        The runnable thresholded network.
    history : list of dict
        One row per optimization step: ``phase`` ("optimize" or "finetune"), ``step``,
        ``loss``, ``kl``, ``l1``, ``gate_penalty``, ``kept`` (units with score >= tau),
        ``open_gates``, ``computed`` (filters the step computed: all of them, or those of
        a compact step, see ``ChainConfig.compact_below``) and ``time`` (seconds since the
        start).
    structure : ModelStructure
        The model's units and gates.
    config : ChainConfig
        The hyperparameters used (with the family defaults filled in).
    kl : float
        KL divergence of the final sub-network on the region's inputs.
    finetuned : bool
        Whether the surviving scores were fine-tuned.
    inputs : Tensor or None
        The region's inputs (kept for graphs and figures; ``None`` if not stored).
    """

    importance: dict[str, torch.Tensor]
    gates: dict[str, float]
    subnetwork: SubNetwork
    history: list[dict[str, Any]]
    structure: ModelStructure
    config: ChainConfig
    kl: float
    finetuned: bool
    inputs: torch.Tensor | None = field(default=None, repr=False)

    @property
    def kept(self) -> dict[str, torch.Tensor]:
        """Unit layer name -> bool mask of kept units."""
        return {name: s > 0 for name, s in self.importance.items()}

    @property
    def num_filters(self) -> int:
        """Number of kept units."""
        return self.subnetwork.num_filters

    @property
    def total_filters(self) -> int:
        """Number of units of the model."""
        return self.subnetwork.total_filters

    def summary(self) -> str:
        """See :meth:`SubNetwork.summary`."""
        return (
            self.subnetwork.summary()
            + f"\nKL(original || sub-network) on the region: {self.kl:.4f}"
        )

    def history_frame(self) -> Any:
        """The history as a ``pandas.DataFrame`` (needs the ``studies`` extra)."""
        pd = require("pandas", "Chain.history_frame()")
        return pd.DataFrame(self.history)

    def graph(self, inputs: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Filter -> filter graph of the chain (see :func:`captum_chains.chains.chain_graph`)."""
        require("networkx", "Chain.graph()")
        from captum_chains.chains import chain_graph

        return chain_graph(self, self.inputs if inputs is None else inputs, **kwargs)

    def paths(self, k: int = 5, inputs: torch.Tensor | None = None) -> list[str]:
        """The ``k`` strongest input-to-output chains as readable strings."""
        from captum_chains.chains import strongest_paths

        return strongest_paths(self.graph(inputs), k)

    def report(self, path: str | Path, **kwargs: Any) -> Path:
        """Write one self-contained HTML page about the chain (needs the ``viz`` extra).

        Summary and fidelity, architecture with scores, chain graph with the strongest
        paths, SMOE maps, filter pictures, firing, and Integrated Gradients / Grad-CAM side
        by side; see :func:`captum_chains.report.chain_report` for the options.
        """
        from captum_chains.report import chain_report

        return chain_report(self, path, **kwargs)

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write the whole chain to a folder: safetensors for tensors, JSON for the rest.

        The folder holds ``chain.json`` (format, config, soft gate values, history, KL,
        ``finetuned``), ``chain.safetensors`` (importance per layer and the region's inputs,
        bit-exact) and ``subnetwork.safetensors`` (:meth:`SubNetwork.save`: scores, open
        gates and the model structure). Nothing is pickled, so loading runs no code.
        Files of the same names already in the folder are replaced.

        Parameters
        ----------
        path : str or Path
            The folder (created if missing).

        Returns
        -------
        Path
            The folder.

        Raises
        ------
        ValueError
            If the config, history or gates hold values JSON cannot store exactly.
        OSError
            If ``path`` is a file or cannot be written (no permission, disk full). Each
            file is written under a temporary name and moved into place, so none is ever
            half-written.
        """
        folder = Path(path).expanduser()
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(
                errno.ENOTDIR,
                "Chain.save writes a folder, but this path is a file; give a folder name",
                str(folder),
            )
        folder.mkdir(parents=True, exist_ok=True)
        config = _encode(self.config.to_dict())
        if _config_from(config) != self.config:
            raise ValueError(
                f"{self.config!r} does not survive a JSON round trip; give ChainConfig fields "
                "JSON values (numbers, strings, booleans, None, lists or tuples of them)"
            )
        document = {
            "format": CHAIN_FORMAT,
            "config": config,
            "gates": _encode({name: float(value) for name, value in self.gates.items()}),
            "history": _encode(self.history),
            "kl": _encode(float(self.kl)),
            "finetuned": bool(self.finetuned),
            "importance": list(self.importance),
            "has_inputs": self.inputs is not None,
        }
        try:
            text = json.dumps(document, indent=1, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"the chain holds a value JSON cannot store: {err}") from err
        tensors = {
            f"importance/{i}": score.detach().cpu().contiguous()
            for i, score in enumerate(self.importance.values())
        }
        if self.inputs is not None:
            tensors["inputs"] = self.inputs.detach().cpu().contiguous()
        write_safetensors(folder / CHAIN_TENSORS, tensors, {"format": CHAIN_FORMAT}, "chain file")
        self.subnetwork.save(folder / SUBNETWORK_FILE)
        atomic_write(folder / CHAIN_JSON, text, "chain file")  # last: marks a complete chain
        return folder

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: nn.Module,
        device: torch.device | str | None = None,
        *,
        check_weights: bool = True,
    ) -> Chain:
        """Reopen a folder written by :meth:`save` on ``model``.

        Parameters
        ----------
        path : str or Path
            The folder.
        model : nn.Module
            The model the chain was extracted on (same architecture and, unless
            ``check_weights=False``, the same weights: both are checked).
        device : torch.device or str, optional
            Where to put the tensors (default: the device of ``model``'s parameters).
        check_weights : bool
            See :meth:`SubNetwork.load`.

        Returns
        -------
        Chain
            Equal, tensor by tensor and value by value, to the chain that was saved.

        Raises
        ------
        ValueError
            If the folder holds no chain, a chain of another format version, a config with
            fields this version of :class:`ChainConfig` does not know, a damaged,
            truncated or inconsistent file, or ``model`` is another architecture or holds
            other weights (see :meth:`SubNetwork.load`).
        OSError
            If a file cannot be read.
        """
        folder = Path(path).expanduser()
        missing = [
            f for f in (CHAIN_JSON, CHAIN_TENSORS, SUBNETWORK_FILE) if not (folder / f).is_file()
        ]
        if missing:
            raise ValueError(
                f"{folder} holds no saved Chain (missing {', '.join(missing)}); write one with "
                "Chain.save(path)"
            )
        document = read_json(folder / CHAIN_JSON, "chain file")
        if not isinstance(document, dict) or document.get("format") != CHAIN_FORMAT:
            found = document.get("format") if isinstance(document, dict) else None
            raise ValueError(
                f"{folder / CHAIN_JSON} has format {found!r}; this version of "
                f"captum-chains reads {CHAIN_FORMAT!r}"
            )
        if device is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
        subnetwork = SubNetwork.load(folder / SUBNETWORK_FILE, model, check_weights=check_weights)
        tensors, metadata = read_safetensors(folder / CHAIN_TENSORS, "chain file")
        if metadata.get("format") != CHAIN_FORMAT:
            raise ValueError(f"{folder / CHAIN_TENSORS} is not a captum-chains chain file")
        try:
            return cls._from_parts(document, tensors, subnetwork.to(device), device)
        except (
            KeyError,
            TypeError,
            AttributeError,
            IndexError,
            OverflowError,
            RecursionError,
        ) as err:
            raise ValueError(
                f"{folder / CHAIN_JSON} is damaged or inconsistent with its tensors "
                f"({type(err).__name__}: {err})"
            ) from err

    @classmethod
    def _from_parts(
        cls,
        document: dict[str, Any],
        tensors: dict[str, torch.Tensor],
        subnetwork: SubNetwork,
        device: torch.device | str,
    ) -> Chain:
        """The Chain of a parsed ``chain.json``, its tensors and its loaded SubNetwork."""
        structure = subnetwork.structure
        names = document["importance"]
        if names != list(structure.unit_names):
            raise ValueError(
                f"chain.json lists the unit layers {names!r} but the sub-network has "
                f"{list(structure.unit_names)}"
            )
        importance = {}
        for i, unit in enumerate(structure.units):
            score = tensors[f"importance/{i}"]
            if not score.is_floating_point() or score.shape != (unit.size,):
                raise ValueError(
                    f"importance of {unit.name!r} is {score.dtype} of shape "
                    f"{tuple(score.shape)}; expected {unit.size} floating-point scores"
                )
            importance[unit.name] = score.to(device)
        has_inputs = document["has_inputs"]
        if not isinstance(has_inputs, bool) or has_inputs != ("inputs" in tensors):
            raise ValueError("chain.json and chain.safetensors disagree on the stored inputs")
        gates = _decode(document["gates"])
        history = _decode(document["history"])
        kl = _decode(document["kl"])
        finetuned = document["finetuned"]
        if (
            not isinstance(gates, dict)
            or set(gates) != set(structure.gate_names)
            or not all(isinstance(v, (int, float)) for v in gates.values())
            or not isinstance(history, list)
            or not all(isinstance(row, dict) for row in history)
            or not isinstance(kl, (int, float))
            or not isinstance(finetuned, bool)
        ):
            raise ValueError(
                "chain.json holds gates, history, kl or finetuned of the wrong type or gates "
                "that are not the sub-network's"
            )
        return cls(
            importance=importance,
            gates={name: float(value) for name, value in gates.items()},
            subnetwork=subnetwork,
            history=history,
            structure=structure,
            config=_config_from(document["config"]),
            kl=float(kl),
            finetuned=finetuned,
            inputs=tensors["inputs"].to(device) if has_inputs else None,
        )


def _encode(value: Any) -> Any:
    """``value`` as JSON data; tuples are tagged so that they come back as tuples."""
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    return value


def _decode(value: Any) -> Any:
    """Inverse of :func:`_encode`."""
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {_TUPLE}:
            return tuple(_decode(v) for v in value[_TUPLE])
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: _decode(v) for k, v in value.items()}
    return value


def _config_from(encoded: dict[str, Any]) -> ChainConfig:
    """The ChainConfig of an encoded ``to_dict()``; unknown fields raise ``ValueError``."""
    values = _decode(json.loads(json.dumps(encoded)))
    if not isinstance(values, dict):
        raise ValueError(f"the saved config is not a mapping of fields: {values!r:.80}")
    try:
        return ChainConfig(**values)
    except TypeError as err:
        raise ValueError(
            f"the saved config does not fit this version of ChainConfig ({err}); saved "
            f"fields: {sorted(values)}"
        ) from err
