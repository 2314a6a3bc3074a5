"""Model-family adapters: rules that claim modules before the generic discovery runs.

An adapter is a callable ``adapter(model, trace) -> AdapterResult | None``. It returns
``None`` when the model is not of its family. The generic rules of
:mod:`captum_chains.units.discovery` skip every module an adapter claims. To support a
new architecture, write a function of this shape and append it to :data:`ADAPTERS`
(see the how-to page "Your own model").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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
