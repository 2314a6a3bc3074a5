"""SubNetwork: the thresholded network of a chain, runnable like any ``nn.Module``.

Calling a SubNetwork runs the original model with the kept filters multiplied by their
scores, removed filters zeroed and closed gates turned into the identity (the
thresholded network of the NeuroChains paper). It holds a *reference* to the original
model, not a copy; :meth:`SubNetwork.export` builds a standalone, physically smaller
module from exactly copied filters.

A SubNetwork records a digest of the weights it was extracted from
(:func:`weights_digest`); :meth:`SubNetwork.load` and :meth:`SubNetwork.export` refuse a
model whose weights differ, unless asked not to check (``check_weights=False``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from captum_chains._utils.digest import weights_digest  # also public from this module
from captum_chains._utils.files import read_safetensors, write_safetensors
from captum_chains._utils.model_state import eval_mode
from captum_chains.masking import MaskState, apply_masks
from captum_chains.units.adapters import SITE_HOOKS
from captum_chains.units.base import GateSpec, ModelStructure, UnitLayer
from captum_chains.units.discovery import architecture_fingerprint

FILE_FORMAT = "captum-chains/subnetwork-v1"
_UNIT_KINDS = ("filter", "head", "neuron", "channel")
_GATE_KINDS = ("block", "layer", "branch")


def _home(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The floating dtype and the device of the model's first parameter (or buffer)."""
    tensors = [*model.parameters(), *model.buffers()]
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    device = tensors[0].device if tensors else torch.device("cpu")
    return dtype, device


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
        removed unit. Finite and non-negative.
    gates_open : Tensor
        Bool ``[num_gates]``: which gates stay open.
    digest : str, optional
        :func:`weights_digest` of ``model`` when the scores were computed (computed here
        when not given; pass it to skip the hashing when it is already known). Kept as
        the attribute ``weights_digest``.

    Notes
    -----
    The SubNetwork is an ``nn.Module`` whose own state is two buffers, ``scores`` and
    ``gates_open``, created in the model's dtype and on its device. The model is *not* a
    submodule, so ``.to()``, ``.double()``, ``.half()``, ``.train()`` or
    ``load_state_dict`` never touch it:

    * ``sub.to(device)`` / ``sub.double()`` / ``sub.half()`` move or cast the buffers, and
      from then on a call runs the model's forward through
      :func:`torch.func.functional_call` with its parameters and buffers cast to the
      SubNetwork's :attr:`dtype` and moved to its :attr:`device` (a per-call copy; the
      model keeps its own). At the model's own dtype and device the model runs as is.
    * Threads: at the model's dtype and device, a call masks the model only for the
      calling thread (other threads running the model, or other sub-networks of it, are
      unaffected). A cast sub-network's call swaps the model's tensors for its duration
      (that is how ``functional_call`` works), so it is refused with
      :class:`~captum_chains.ConcurrentUseError` while another thread runs the model
      through the package, and must not overlap a plain ``model(x)`` in another thread.
    * ``parameters()`` yields the model's parameters (named ``model.<name>``): the
      tensors the forward pass reads and gradients reach.
    * ``state_dict()`` holds what defines the sub-network *given* the model: ``scores``,
      ``gates_open`` and, as extra state, the weights digest; the weights themselves
      belong to the model and are identified by that digest, which
      ``load_state_dict`` checks.

    Every call runs the model in eval mode and restores its mode afterwards.
    """

    scores: torch.Tensor
    gates_open: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        structure: ModelStructure,
        scores: torch.Tensor,
        gates_open: torch.Tensor,
        *,
        digest: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(scores, torch.Tensor) or not isinstance(gates_open, torch.Tensor):
            raise TypeError("scores and gates_open must be tensors")
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
        if scores.is_complex() or not (scores.is_floating_point() or scores.numel() == 0):
            raise ValueError(f"scores must be a floating-point tensor, got {scores.dtype}")
        check_scores(scores.detach(), structure)
        dtype, device = _home(model)
        object.__setattr__(self, "_model", model)
        self.weights_digest: str
        object.__setattr__(self, "weights_digest", digest or weights_digest(model))
        self.structure = structure
        self.register_buffer("scores", scores.detach().to(device=device, dtype=dtype).clone())
        self.register_buffer("gates_open", gates_open.detach().to(device).bool().clone())

    # ------------------------------------------------------------------ running
    @property
    def model(self) -> nn.Module:
        """The original model this sub-network masks."""
        return cast(nn.Module, self._model)  # set via object.__setattr__, never a buffer

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype the sub-network computes in (that of ``scores``)."""
        return self.scores.dtype

    @property
    def device(self) -> torch.device:
        """The device the sub-network computes on (that of ``scores``)."""
        return self.scores.device

    def mask_state(self) -> MaskState:
        """Scores of every unit layer and a closed (0) value for every closed gate."""
        scores = {name: self.scores[a:b] for name, (a, b) in self.structure.offsets().items()}
        zero = torch.zeros((), device=self.scores.device, dtype=self.scores.dtype)
        gates = {
            g.name: zero
            for g, is_open in zip(self.structure.gates, self.gates_open.tolist())
            if not is_open
        }
        return MaskState(scores=scores, gates=gates)

    def runs_in_place(self) -> bool:
        """Whether a call runs the model itself (same dtype and device as the model)."""
        return _home(self.model) == (self.dtype, self.device)

    def _cast_tensors(self) -> dict[str, torch.Tensor]:
        """The model's parameters and buffers in the sub-network's dtype, on its device."""
        dtype, device = self.dtype, self.device
        out = {}
        for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]:
            out[name] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
        return out

    def forward(self, *inputs: Any) -> torch.Tensor:
        """Run the thresholded network and return its logits."""
        with apply_masks(self.model, self.structure, self.mask_state()):
            if self.runs_in_place():
                return self.model(*inputs)
            # functional_call swaps the model's tensors during the call: no other thread
            # may run the model through the package meanwhile
            with eval_mode(self.model, exclusive=True):
                return torch.func.functional_call(self.model, self._cast_tensors(), inputs)

    # ------------------------------------------------------------------ nn.Module state
    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """The model's parameters, named ``model.<name>`` (see the class notes)."""
        yield from self.model.named_parameters(
            prefix=f"{prefix}.model" if prefix else "model",
            recurse=recurse,
            remove_duplicate=remove_duplicate,
        )

    def get_extra_state(self) -> dict[str, Any]:
        """The weights digest, stored in ``state_dict()`` next to the buffers."""
        return {"weights_digest": self.weights_digest}

    def set_extra_state(self, state: Any) -> None:
        """Accept a state dict only if it was made on the same weights (see the digest)."""
        digest = state.get("weights_digest") if isinstance(state, Mapping) else None
        if digest is not None and digest != self.weights_digest:
            raise ValueError(
                f"the state dict belongs to a sub-network of other weights (digest "
                f"{str(digest)[:12]}..., this one {self.weights_digest[:12]}...); load it into "
                "a SubNetwork of the model it was extracted on"
            )

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
    def save(self, path: str | Path) -> Path:
        """Write scores, gates, the structure and the weights digest to a safetensors file.

        Nothing is pickled. The file is written under a temporary name and moved into
        place, so an interrupted save never leaves a half-written file; a missing folder
        is created.

        Parameters
        ----------
        path : str or Path
            The file (e.g. ``subnetwork.safetensors``).

        Returns
        -------
        Path
            The file written.

        Raises
        ------
        OSError
            If ``path`` is a folder or cannot be written (no permission, a file where a
            folder should be, disk full).
        """
        metadata = {
            "format": FILE_FORMAT,
            "structure": self.structure.to_json(),
            "weights_digest": self.weights_digest,
        }
        tensors = {"scores": self.scores, "gates_open": self.gates_open.to(torch.uint8)}
        return write_safetensors(path, tensors, metadata, "SubNetwork file")

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, *, check_weights: bool = True) -> SubNetwork:
        """Load a saved SubNetwork onto ``model``.

        Parameters
        ----------
        path : str or Path
            A file written by :meth:`save`.
        model : nn.Module
            The model the chain was extracted on. The buffers are put in its dtype and
            on its device.
        check_weights : bool
            Refuse a model whose :func:`weights_digest` differs from the one recorded in
            the file. ``False`` loads the scores onto other weights of the same
            architecture (the sub-network then computes something else than when it was
            extracted).

        Raises
        ------
        ValueError
            If the file is damaged, truncated or not a SubNetwork file, holds scores that
            are not finite and non-negative or a structure that does not fit ``model``
            (another architecture, a unit site or gate module it lacks), or ``model``'s
            weights differ from the recorded ones and ``check_weights`` is true.
        OSError
            If the file cannot be read.
        """
        tensors, metadata = read_safetensors(path, "SubNetwork file")
        if metadata.get("format") != FILE_FORMAT:
            raise ValueError(
                f"{path} is not a captum-chains SubNetwork file (format "
                f"{metadata.get('format')!r}, expected {FILE_FORMAT!r})"
            )
        structure = structure_from_json(metadata.get("structure"), f"{path}")
        check_same_architecture(structure, model)
        check_structure(structure, model)
        if set(tensors) != {"scores", "gates_open"}:
            raise ValueError(
                f"{path} holds the tensors {sorted(tensors)}; a SubNetwork file holds "
                "'scores' and 'gates_open'"
            )
        scores, gates = tensors["scores"], tensors["gates_open"]
        if not scores.is_floating_point() or scores.shape != (structure.total_units,):
            raise ValueError(
                f"{path}: the scores are {scores.dtype} of shape {tuple(scores.shape)}; the "
                f"structure needs floating-point scores of shape [{structure.total_units}]"
            )
        if gates.dtype not in (torch.uint8, torch.bool) or gates.shape != (len(structure.gates),):
            raise ValueError(
                f"{path}: gates_open is {gates.dtype} of shape {tuple(gates.shape)}; the "
                f"structure needs {len(structure.gates)} flags (uint8 0/1)"
            )
        if bool((gates.to(torch.uint8) > 1).any()):
            raise ValueError(f"{path}: gates_open holds values other than 0 and 1")
        check_scores(scores, structure, where=str(path))
        found = weights_digest(model)
        recorded = metadata.get("weights_digest")
        if check_weights and recorded is not None and recorded != found:
            raise ValueError(
                f"{path} was extracted from other weights than those of this "
                f"{type(model).__name__} (weights digest {recorded[:12]}... recorded, "
                f"{found[:12]}... now): load it onto the model with the weights it was "
                "extracted from, or pass check_weights=False to use these weights anyway"
            )
        return cls(model, structure, scores, gates.bool(), digest=found)

    def export(self, *, check_weights: bool = True, **kwargs: Any) -> nn.Module:
        """A standalone, physically smaller module of exactly copied filters.

        The export is built in the model's dtype and on its device (cast it afterwards,
        e.g. ``exported.double()``). See :func:`captum_chains.export.export_subnetwork`
        for the keyword arguments.

        Raises
        ------
        ValueError
            If the model's weights changed since the chain was extracted (its
            :func:`weights_digest` differs) and ``check_weights`` is true, or for the
            reasons of :func:`~captum_chains.export.export_subnetwork`.
        """
        from captum_chains.export import export_subnetwork

        sub = self
        if not self.runs_in_place():  # export the sub-network at the model's own dtype/device
            sub = SubNetwork(
                self.model, self.structure, self.scores, self.gates_open, digest=self.weights_digest
            )
        return export_subnetwork(sub, check_weights=check_weights, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"model={type(self.model).__name__}, kept={self.num_filters}/{self.total_filters}, "
            f"removed_gates={len(self.removed_gates)}"
        )


def check_scores(scores: torch.Tensor, structure: ModelStructure, where: str = "") -> None:
    """Raise ``ValueError`` naming the unit layer if ``scores`` are not finite and >= 0."""
    bad = ~torch.isfinite(scores) | (scores < 0)
    if not bool(bad.any()):
        return
    first = int(torch.nonzero(bad)[0])
    layer = next(n for n, (a, b) in structure.offsets().items() if a <= first < b)
    value = float(scores[first])
    raise ValueError(
        f"{where + ': ' if where else ''}the scores must be finite and non-negative, but "
        f"{int(bad.sum())} are not (first: {value} in layer {layer!r}); the file is damaged "
        "or the scores came from a failed optimization"
    )


def structure_from_json(text: Any, where: str) -> ModelStructure:
    """The :class:`ModelStructure` stored in a file; any malformation is a ``ValueError``."""
    if not isinstance(text, str):
        raise ValueError(f"{where} holds no model structure")
    try:
        structure = ModelStructure.from_json(text)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as err:
        raise ValueError(f"{where}: the stored model structure is malformed ({err!r})") from err
    _check_fields(structure, where)
    return structure


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_fields(structure: ModelStructure, where: str) -> None:
    """Types and values of every field of a structure read from a file."""
    problems = []
    if not isinstance(structure.fingerprint, str) or not _is_int(structure.num_classes, 1):
        problems.append("fingerprint or num_classes")
    if not all(_is_int(v, 1) for v in structure.input_shape):
        problems.append(f"input_shape {structure.input_shape}")
    for unit in structure.units:
        if not isinstance(unit, UnitLayer) or not (
            all(isinstance(v, str) for v in (unit.name, unit.site, unit.hook, unit.module_type))
            and unit.kind in _UNIT_KINDS
            and _is_int(unit.size, 1)
            and isinstance(unit.channel_dim, int)
            and not isinstance(unit.channel_dim, bool)
            and _is_int(unit.unit_width, 1)
            and all(_is_int(v, 0) for v in unit.spatial)
            and (unit.block is None or isinstance(unit.block, str))
        ):
            problems.append(f"unit layer {getattr(unit, 'name', unit)!r}")
    names = [u.name for u in structure.units]
    if len(set(names)) != len(names):
        problems.append("duplicate unit layer names")
    for gate in structure.gates:
        if not isinstance(gate, GateSpec) or not (
            all(isinstance(v, str) for v in (gate.name, gate.start, gate.end))
            and gate.kind in _GATE_KINDS
            and gate.mode in ("mix", "scale")
            and gate.end_hook in ("output", "input")
            and all(u in names for u in gate.units)
        ):
            problems.append(f"gate {getattr(gate, 'name', gate)!r}")
    if problems:
        raise ValueError(
            f"{where}: the stored model structure is malformed ({', '.join(problems)})"
        )


def check_structure(structure: ModelStructure, model: nn.Module) -> None:
    """Raise ``ValueError`` if a unit layer, site or gate of ``structure`` is not in ``model``."""
    modules = dict(model.named_modules())
    kind = type(model).__name__
    for unit in structure.units:
        for what, name in (("unit layer", unit.name), ("unit site", unit.site)):
            if name not in modules:
                raise ValueError(
                    f"{what} {name!r} is not a module of {kind}; the chain was extracted on "
                    "another model"
                )
        if unit.hook not in ("output", "input") and unit.hook not in SITE_HOOKS:
            raise ValueError(f"unit layer {unit.name!r} uses an unknown hook {unit.hook!r}")
        module = modules[unit.name]
        width = getattr(module, "out_channels", getattr(module, "out_features", None))
        if unit.kind == "filter" and isinstance(width, int) and width != unit.size:
            raise ValueError(
                f"unit layer {unit.name!r} has {width} filters in {kind} but {unit.size} in "
                "the chain; the chain was extracted on another model"
            )
    for gate in structure.gates:
        needed = (gate.start, gate.end) if gate.mode == "mix" else (gate.end,)
        for name in needed:
            if name not in modules:
                raise ValueError(
                    f"module {name!r} of gate {gate.name!r} is not a module of {kind}; the "
                    "chain was extracted on another model"
                )


def check_same_architecture(structure: ModelStructure, model: nn.Module) -> None:
    """Raise ``ValueError`` if ``model`` is not the architecture ``structure`` was found on."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
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
