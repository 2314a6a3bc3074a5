"""The one registry of model-family knowledge: what generic code asks a family.

Each family module (:mod:`~captum_chains.units.timm_cnn`,
:mod:`~captum_chains.units.timm_vit`, :mod:`~captum_chains.units.torch_attention`, the
transformer adapter in :mod:`~captum_chains.units.vit`) appends its rules to the lists
below when imported; discovery, masking and export consult only these lists. To support
a new architecture, write rules of these shapes (see ``docs/architecture.md``, "Where to add a
model family", and the how-to page "Your own model").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from captum_chains.units.base import Family, GateSpec, UnitLayer
from captum_chains.units.trace import Trace


@dataclass
class AdapterResult:
    """Units and gates an adapter found, and the module names it claims."""

    units: list[UnitLayer] = field(default_factory=list)
    gates: list[GateSpec] = field(default_factory=list)
    claimed: set[str] = field(default_factory=set)
    family: Family | None = None


Adapter = Callable[[nn.Module, Trace], "AdapterResult | None"]

ADAPTERS: list[Adapter] = []
"""Discovery rules ``adapter(model, trace) -> AdapterResult | None`` (``None``: not of the
adapter's family); the generic rules of :mod:`captum_chains.units.discovery` skip every
module an adapter claims."""

InputCheck = Callable[[nn.Module, tuple[torch.Tensor, ...]], None]

INPUT_CHECKS: list[InputCheck] = []
"""Checks run by ``discover`` before its forward pass; each raises ``ValueError`` for inputs
the model cannot take (e.g. an image size a ViT's patch embedding rejects)."""

SiteHook = Callable[[nn.Module, Callable[[torch.Tensor], torch.Tensor]], RemovableHandle]

SITE_HOOKS: dict[str, SiteHook] = {}
"""Unit-site hooks beyond ``"output"``/``"input"``: ``SITE_HOOKS[unit.hook](module,
transform)`` registers a hook on ``module`` that applies ``transform`` (the scores of the
unit layers at that site) to a tensor the module computes internally, and returns its
handle. The hook must act only in the registering thread
(:func:`captum_chains._utils.hooks.this_thread_only`). Used for the heads of
``nn.MultiheadAttention`` (see ``units/vit.py``)."""


FusedActivation = Callable[[nn.Module], "str | None"]

FUSED_ACTIVATIONS: list[FusedActivation] = []
"""Rules for fused norm + activation modules: ``rule(norm_module)`` returns the name of the
child that applies the activation after the normalization (timm's ``BatchNormAct2d``:
``"act"``), or ``None``. The scores of a convolution normalized by such a module act at
that child's input: after the normalization, before the activation (Eq. 3)."""


AttentionHeads = tuple["str | None", int, int, "tuple[int, ...]"]
AttentionRule = Callable[[nn.Module, "tuple[int, ...]"], "AttentionHeads | None"]

ATTENTION_HEADS: list[AttentionRule] = []
"""Rules ``rule(module, input_shape) -> (site hook or None, heads, head_dim, token dims)``
for attention modules whose heads are not reached through a child ``nn.Linear`` (e.g.
``nn.MultiheadAttention``, scored at a :data:`SITE_HOOKS` hook; ``None`` hook: the heads
cannot be scored); ``None``: not such a module."""

TokenPrefix = tuple[bool, int, "str | None"]
TokenRule = Callable[[nn.Module], "TokenPrefix | None"]

TOKEN_PREFIXES: list[TokenRule] = []
"""Rules ``rule(vit) -> (class token?, register tokens, pooling name or None)`` read from a
ViT's attributes (``None``: not a model of the rule's family);
:func:`~captum_chains.units.vit.token_layout` reads the grid and token count from the pass."""

PatchGeometry = tuple["tuple[int, int] | None", "tuple[int, int]", bool, bool]
PatchRule = Callable[[nn.Module], "PatchGeometry | None"]

PATCH_EMBEDDINGS: list[PatchRule] = []
"""Rules ``rule(module) -> (image size or None, patch size, strict size?, pads?)`` for the
patch embeddings of vision transformers (``None``: not one); the ViT input check and
adapter read them."""

# ------------------------------------------------------------------ export (captum_chains.export)
Canonicalizer = Callable[[nn.Module], "nn.Module | None"]

CANONICALIZERS: list[Canonicalizer] = []
"""Functions ``module -> replacement or None`` applied to every module of the export's
private copy before tracing; a replacement must compute the same function in eval mode and
keep the names of the children that unit sites refer to."""

SiteResolver = Callable[[UnitLayer], "tuple[str, str] | None"]

SITE_RESOLVERS: list[SiteResolver] = []
"""Functions ``unit -> (module name, "output" | "input") or None`` that place a unit
layer's scores in the export's graph when discovery's own ``(site, hook)`` cannot be used
directly (e.g. a site hook of :data:`SITE_HOOKS`); the first answer wins."""

LayerKind = Callable[[nn.Module], "type[nn.Module] | None"]

LAYER_KINDS: list[LayerKind] = []
"""Rules ``rule(module) -> torch layer type or None``: a library layer that computes
exactly what that torch layer computes with the same weights, apart from padding (timm's
``Conv2dSame`` -> ``nn.Conv2d``), so that the export may slice it as one."""

LeafModules = Callable[[], "tuple[type, ...]"]

LEAF_MODULES: list[LeafModules] = []
"""Functions ``() -> module types`` that the export's recording keeps as single operations
(a library's own list of layers not to look into, e.g. timm's)."""


def layer_kind(module: nn.Module) -> type[nn.Module] | None:
    """The torch layer type ``module`` computes as (:data:`LAYER_KINDS`), else ``None``."""
    for rule in LAYER_KINDS:
        kind = rule(module)
        if kind is not None:
            return kind
    return None


def as_pair(value: Any) -> tuple[int, int] | None:
    """``(a, b)`` from an int or a pair of ints (a layer's size attribute), else ``None``."""
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    return None


def register(registry: list[Any], rule: Any) -> None:
    """Append ``rule`` to ``registry`` once (importing a family module twice is harmless)."""
    if rule not in registry:
        registry.append(rule)
