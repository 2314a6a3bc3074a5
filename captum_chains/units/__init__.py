"""Discovery of scorable units (filters, heads, neurons) and gates (layers, blocks)."""

from captum_chains.units.adapters import ADAPTERS, AdapterResult
from captum_chains.units.base import GateSpec, ModelStructure, UnitLayer
from captum_chains.units.discovery import architecture_fingerprint, discover

__all__ = [
    "ADAPTERS",
    "AdapterResult",
    "GateSpec",
    "ModelStructure",
    "UnitLayer",
    "architecture_fingerprint",
    "discover",
]
