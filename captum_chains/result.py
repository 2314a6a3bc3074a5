"""The result of a NeuroChains extraction."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

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
        ``open_gates`` and ``time`` (seconds since the start).
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
        """
        from safetensors.torch import save_file

        folder = Path(path).expanduser()
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
        save_file(tensors, str(folder / CHAIN_TENSORS), metadata={"format": CHAIN_FORMAT})
        self.subnetwork.save(folder / SUBNETWORK_FILE)
        (folder / CHAIN_JSON).write_text(text)
        return folder

    @classmethod
    def load(
        cls, path: str | Path, model: nn.Module, device: torch.device | str | None = None
    ) -> Chain:
        """Reopen a folder written by :meth:`save` on ``model``.

        Parameters
        ----------
        path : str or Path
            The folder.
        model : nn.Module
            The model the chain was extracted on (same architecture: the fingerprint is
            checked; the weights are the caller's responsibility).
        device : torch.device or str, optional
            Where to put the tensors (default: the device of ``model``'s parameters).

        Returns
        -------
        Chain
            Equal, tensor by tensor and value by value, to the chain that was saved.

        Raises
        ------
        ValueError
            If the folder holds no chain, a chain of another format version, a config with
            fields this version of :class:`ChainConfig` does not know, or ``model`` is
            another architecture.
        """
        from safetensors import safe_open

        folder = Path(path).expanduser()
        missing = [
            f for f in (CHAIN_JSON, CHAIN_TENSORS, SUBNETWORK_FILE) if not (folder / f).is_file()
        ]
        if missing:
            raise ValueError(
                f"{folder} holds no saved Chain (missing {', '.join(missing)}); write one with "
                "Chain.save(path)"
            )
        document = json.loads((folder / CHAIN_JSON).read_text())
        if document.get("format") != CHAIN_FORMAT:
            raise ValueError(
                f"{folder / CHAIN_JSON} has format {document.get('format')!r}; this version of "
                f"captum-chains reads {CHAIN_FORMAT!r}"
            )
        if device is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
        subnetwork = SubNetwork.load(folder / SUBNETWORK_FILE, model).to(device)
        with safe_open(str(folder / CHAIN_TENSORS), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        names = document["importance"]
        importance = {name: tensors[f"importance/{i}"].to(device) for i, name in enumerate(names)}
        inputs = tensors["inputs"].to(device) if document["has_inputs"] else None
        return cls(
            importance=importance,
            gates={name: float(value) for name, value in _decode(document["gates"]).items()},
            subnetwork=subnetwork,
            history=_decode(document["history"]),
            structure=subnetwork.structure,
            config=_config_from(document["config"]),
            kl=float(_decode(document["kl"])),
            finetuned=bool(document["finetuned"]),
            inputs=inputs,
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
    try:
        return ChainConfig(**values)
    except TypeError as err:
        raise ValueError(
            f"the saved config does not fit this version of ChainConfig ({err}); saved "
            f"fields: {sorted(values)}"
        ) from err
