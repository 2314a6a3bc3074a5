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

from torch import nn

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
