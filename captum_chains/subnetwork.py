"""SubNetwork: the thresholded network of a chain, runnable like any ``nn.Module``.

Calling a SubNetwork runs the original model with the kept filters multiplied by their
scores, removed filters zeroed and closed gates turned into the identity (the
thresholded network of the NeuroChains paper). It holds a *reference* to the original
model, not a copy; :meth:`SubNetwork.export` builds a standalone, physically smaller
module from exactly copied filters.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from captum_chains.masking import MaskState, apply_masks
from captum_chains.units.base import ModelStructure
from captum_chains.units.discovery import architecture_fingerprint

FILE_FORMAT = "captum-chains/subnetwork-v1"


class SubNetwork(nn.Module):
    """The sub-network of a chain.

    Parameters
    ----------
    model : nn.Module
        The original model (kept by reference; never modified).
    structure : ModelStructure
        Units and gates of ``model``.
    scores : Tensor
        Final scores of all units, flat ``[total_units]`` in ``structure`` order; 0 marks a
        removed unit.
    gates_open : Tensor
        Bool ``[num_gates]``: which gates stay open.

    Notes
    -----
    The model is not registered as a submodule, so ``subnetwork.train()``,
    ``.parameters()`` or ``.state_dict()`` never touch it; the SubNetwork's own state is
    two buffers, ``scores`` and ``gates_open``. Every call runs the model in eval mode and
    restores its mode afterwards.
    """

    scores: torch.Tensor
    gates_open: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        structure: ModelStructure,
        scores: torch.Tensor,
        gates_open: torch.Tensor,
    ) -> None:
        super().__init__()
        if scores.shape != (structure.total_units,):
            raise ValueError(
                f"scores must have shape [{structure.total_units}] (one per unit), got "
                f"{tuple(scores.shape)}"
            )
        if gates_open.shape != (len(structure.gates),):
            raise ValueError(
                f"gates_open must have shape [{len(structure.gates)}], "
                f"got {tuple(gates_open.shape)}"
            )
        object.__setattr__(self, "_model", model)
        self.structure = structure
        self.register_buffer("scores", scores.detach().clone().float())
        self.register_buffer("gates_open", gates_open.detach().clone().bool())

    # ------------------------------------------------------------------ running
    @property
    def model(self) -> nn.Module:
        """The original model this sub-network masks."""
        return cast(nn.Module, self._model)  # set via object.__setattr__, never a buffer

    def mask_state(self) -> MaskState:
        """Scores of every unit layer and a closed (0) value for every closed gate."""
        scores = {name: self.scores[a:b] for name, (a, b) in self.structure.offsets().items()}
        zero = torch.zeros((), device=self.scores.device)
        gates = {
            g.name: zero
            for g, is_open in zip(self.structure.gates, self.gates_open.tolist())
            if not is_open
        }
        return MaskState(scores=scores, gates=gates)

    def forward(self, *inputs: Any) -> torch.Tensor:
        """Run the thresholded network and return its logits."""
        with apply_masks(self.model, self.structure, self.mask_state(), freeze=False):
            return self.model(*inputs)

    # ------------------------------------------------------------------ views
    @property
    def importance(self) -> dict[str, torch.Tensor]:
        """Unit layer name -> final scores (0 for removed units)."""
        return {n: self.scores[a:b].clone() for n, (a, b) in self.structure.offsets().items()}

    @property
    def kept(self) -> dict[str, torch.Tensor]:
        """Unit layer name -> bool mask of kept units."""
        return {n: s > 0 for n, s in self.importance.items()}

    @property
    def num_filters(self) -> int:
        """Number of kept units."""
        return int((self.scores > 0).sum())

    @property
    def total_filters(self) -> int:
        """Number of units in the original model."""
        return self.structure.total_units

    @property
    def removed_gates(self) -> list[str]:
        """Names of the layers/blocks that were removed (closed gates)."""
        return [g.name for g, o in zip(self.structure.gates, self.gates_open.tolist()) if not o]

    def summary(self) -> str:
        """A table of kept/total units per layer and the removed layers/blocks."""
        removed = set(self.removed_gates)
        block_of = {u: g.name for g in self.structure.gates for u in g.units}
        rows = [("layer", "kind", "kept", "total", "status")]
        for unit, kept in zip(self.structure.units, self.kept.values()):
            gate = block_of.get(unit.name)
            status = (
                f"removed with {gate}" if gate in removed else ("empty" if not kept.any() else "")
            )
            rows.append((unit.name, unit.kind, str(int(kept.sum())), str(unit.size), status))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [
            f"SubNetwork of {type(self.model).__name__}: "
            f"{self.num_filters}/{self.total_filters} units kept "
            f"({100 * self.num_filters / max(self.total_filters, 1):.2f}%), "
            f"{len(removed)}/{len(self.structure.gates)} gated layers/blocks removed",
        ]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        if removed:
            lines.append("removed layers/blocks: " + ", ".join(self.removed_gates))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description: kept indices and scores per layer, gates, totals."""
        imp = self.importance
        return {
            "model": type(self.model).__name__,
            "fingerprint": self.structure.fingerprint,
            "num_filters": self.num_filters,
            "total_filters": self.total_filters,
            "layers": {
                name: {
                    "kept": torch.nonzero(s > 0).flatten().tolist(),
                    "scores": [round(float(v), 6) for v in s[s > 0]],
                    "total": int(s.numel()),
                }
                for name, s in imp.items()
            },
            "gates": {
                g.name: bool(o) for g, o in zip(self.structure.gates, self.gates_open.tolist())
            },
            "removed": self.removed_gates,
        }

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> None:
        """Write scores, gates and the structure to a safetensors file (no pickled code)."""
        from safetensors.torch import save_file

        metadata = {"format": FILE_FORMAT, "structure": self.structure.to_json()}
        save_file(
            {
                "scores": self.scores.cpu().contiguous(),
                "gates_open": self.gates_open.cpu().to(torch.uint8),
            },
            str(path),
            metadata=metadata,
        )

    @classmethod
    def load(cls, path: str | Path, model: nn.Module) -> SubNetwork:
        """Load a saved SubNetwork onto ``model``.

        Raises
        ------
        ValueError
            If the file is not a SubNetwork file, or ``model``'s architecture fingerprint
            differs from the one the chain was extracted on.
        """
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FILE_FORMAT:
                raise ValueError(f"{path} is not a captum-chains SubNetwork file")
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        structure = ModelStructure.from_json(metadata["structure"])
        check_same_architecture(structure, model)
        device = next((t.device for t in model.parameters()), torch.device("cpu"))
        return cls(
            model,
            structure,
            tensors["scores"].to(device),
            tensors["gates_open"].bool().to(device),
        )

    def export(self, **kwargs: Any) -> nn.Module:
        """A standalone, physically smaller module of exactly copied filters.

        See :func:`captum_chains.export.export_subnetwork`.
        """
        from captum_chains.export import export_subnetwork

        return export_subnetwork(self, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"model={type(self.model).__name__}, kept={self.num_filters}/{self.total_filters}, "
            f"removed_gates={len(self.removed_gates)}"
        )


def check_same_architecture(structure: ModelStructure, model: nn.Module) -> None:
    """Raise ``ValueError`` if ``model`` is not the architecture ``structure`` was found on."""
    found = architecture_fingerprint(model)
    if found != structure.fingerprint:
        raise ValueError(
            f"the chain was extracted on a model with architecture fingerprint "
            f"{structure.fingerprint}, but {type(model).__name__} has {found}; load it onto the "
            "same architecture (same module names, types and parameter shapes)"
        )


def subnetwork_from_mappings(
    model: nn.Module,
    structure: ModelStructure,
    importance: Mapping[str, torch.Tensor],
    open_gates: Mapping[str, bool] | None = None,
) -> SubNetwork:
    """Build a SubNetwork from per-layer scores and per-gate open flags (missing gates open)."""
    parts = []
    for unit in structure.units:
        s = importance[unit.name].detach().float().reshape(-1)
        if s.numel() != unit.size:
            raise ValueError(
                f"importance[{unit.name!r}] has {s.numel()} entries, expected {unit.size}"
            )
        parts.append(s)
    flat = torch.cat(parts) if parts else torch.zeros(0)
    open_gates = open_gates or {}
    gates = torch.tensor(
        [bool(open_gates.get(g.name, True)) for g in structure.gates], dtype=torch.bool
    )
    return SubNetwork(model, structure, flat, gates)
