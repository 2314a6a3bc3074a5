"""What NeuroChains can score and gate: unit layers, gates and the model structure.

A *unit layer* is a group of units that one tensor in the forward pass carries side by
side along a channel dimension: the filters of a convolution (scored after their
BatchNorm, Eq. 3 of the NeuroChains paper), the heads of an attention layer or the
hidden neurons of an MLP. A *gate* (Eq. 6-7) mixes a shape-preserving layer or block
with the identity: ``G * F(H) + (1 - G) * H``.

These classes only describe *where* scores and gates act; :mod:`captum_chains.masking`
applies them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

UnitKind = Literal["filter", "head", "neuron", "channel"]
HookPoint = Literal["output", "input"]
GateKind = Literal["block", "layer", "branch"]
GateMode = Literal["mix", "scale"]
Family = Literal["plain", "residual", "mobile", "vit"]


@dataclass(frozen=True)
class UnitLayer:
    """One layer of scorable units.

    Attributes
    ----------
    name : str
        Key of the layer in results: the qualified name of the module that produces the
        units (the convolution for filters, the attention module for heads, the MLP's
        first linear layer for neurons).
    kind : {"filter", "head", "neuron", "channel"}
        What one unit is.
    size : int
        Number of units.
    site : str
        Qualified name of the module at which the score multiplies the tensor.
    hook : str
        Whether the score multiplies the site module's ``"output"`` or its (first)
        ``"input"``, or the name of a site hook of
        :data:`~captum_chains.units.adapters.SITE_HOOKS` (e.g. ``"mha"``).
    channel_dim : int
        Dimension of the site tensor that holds the units (1 for NCHW, -1 for tokens).
    unit_width : int
        Consecutive channels that form one unit (the head dimension for heads, else 1).
    module_type : str
        Class name of the producing module, for display.
    depthwise : bool
        True for depthwise convolutions (each filter reads one input channel).
    spatial : tuple of int
        Spatial/token shape of the site tensor for one input (empty when there is none).
    block : str or None
        Name of the gated block that contains this layer, if any.
    norm : str or None
        The normalization module whose per-channel affine output the scores scale (the
        site itself, or the norm module of a fused norm + activation whose activation's
        input is the site); the optimization may fold the scores into its affine
        parameters. ``None`` when the scores act elsewhere.
    """

    name: str
    kind: UnitKind
    size: int
    site: str
    hook: HookPoint | str = "output"
    channel_dim: int = 1
    unit_width: int = 1
    module_type: str = ""
    depthwise: bool = False
    spatial: tuple[int, ...] = ()
    block: str | None = None
    norm: str | None = None

    def label(self, index: int) -> str:
        """Paper-style label of one unit, e.g. ``layer3.0.conv3.683``."""
        return f"{self.name}.{index}"


@dataclass(frozen=True)
class GateSpec:
    """A sigmoid gate over a shape-preserving layer, residual block or residual branch.

    Attributes
    ----------
    name : str
        Key of the gate in results: the block's module name, or for a layer gate the name
        of the unit layer it spans.
    kind : {"block", "layer", "branch"}
        ``block``: a residual block, ``output = G * block(H) + (1 - G) * H``.
        ``layer``: a conv (+ norm) layer, mixed at its score site with the conv's input.
        ``branch``: a residual branch whose output is scaled by ``G`` before the add.
    start : str
        Module whose first input is ``H`` (unused for ``scale`` gates).
    end : str
        Module at whose output (or input, see ``end_hook``) the gate acts.
    end_hook : {"output", "input"}
        Tensor of ``end`` that the gate rewrites.
    mode : {"mix", "scale"}
        ``mix``: ``G * y + (1 - G) * H``; ``scale``: ``G * y``.
    units : tuple of str
        Unit layers inside the gated part (removed with it).
    """

    name: str
    kind: GateKind
    start: str
    end: str
    end_hook: HookPoint = "output"
    mode: GateMode = "mix"
    units: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelStructure:
    """Everything NeuroChains discovered about a model.

    Attributes
    ----------
    units : tuple of UnitLayer
        Unit layers in execution order.
    gates : tuple of GateSpec
        Gates in execution order.
    fingerprint : str
        Architecture fingerprint (module names, types and parameter shapes).
    family : {"plain", "residual", "mobile", "vit"}
        Family used to pick default penalties.
    num_classes : int
        Width of the model's logits.
    input_shape : tuple of int
        Shape of one input (without the batch dimension) seen at discovery.
    """

    units: tuple[UnitLayer, ...]
    gates: tuple[GateSpec, ...]
    fingerprint: str
    family: Family
    num_classes: int
    input_shape: tuple[int, ...] = ()
    _index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._index.update({u.name: i for i, u in enumerate(self.units)})

    @property
    def total_units(self) -> int:
        """Number of units over all layers."""
        return sum(u.size for u in self.units)

    @property
    def unit_names(self) -> tuple[str, ...]:
        """Names of the unit layers in execution order."""
        return tuple(u.name for u in self.units)

    @property
    def gate_names(self) -> tuple[str, ...]:
        """Names of the gates in execution order."""
        return tuple(g.name for g in self.gates)

    def unit(self, name: str) -> UnitLayer:
        """The unit layer called ``name``."""
        try:
            return self.units[self._index[name]]
        except KeyError:
            raise KeyError(f"no unit layer named {name!r}") from None

    def offsets(self) -> dict[str, tuple[int, int]]:
        """Start and end of each unit layer in a flat vector of all units."""
        out, start = {}, 0
        for u in self.units:
            out[u.name] = (start, start + u.size)
            start += u.size
        return out

    def to_json(self) -> str:
        """Serialise to JSON (used inside saved SubNetwork files)."""
        payload: dict[str, Any] = {
            "units": [asdict(u) for u in self.units],
            "gates": [asdict(g) for g in self.gates],
            "fingerprint": self.fingerprint,
            "family": self.family,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
        }
        return json.dumps(payload)

    @classmethod
    def from_json(cls, text: str) -> ModelStructure:
        """Inverse of :meth:`to_json`."""
        payload = json.loads(text)
        units = tuple(UnitLayer(**{**u, "spatial": tuple(u["spatial"])}) for u in payload["units"])
        gates = tuple(GateSpec(**{**g, "units": tuple(g["units"])}) for g in payload["gates"])
        return cls(
            units=units,
            gates=gates,
            fingerprint=payload["fingerprint"],
            family=payload["family"],
            num_classes=int(payload["num_classes"]),
            input_shape=tuple(payload["input_shape"]),
        )
