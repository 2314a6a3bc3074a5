"""Discovery of scorable units (filters, heads, neurons) and gates (layers, blocks)."""

from captum_chains.units import timm_cnn  # noqa: F401  (registers the timm rule)
from captum_chains.units.adapters import ADAPTERS, AdapterResult
from captum_chains.units.base import GateSpec, ModelStructure, UnitLayer
from captum_chains.units.discovery import architecture_fingerprint, discover
from captum_chains.units.vit import TokenLayout, token_layout  # registers the ViT adapter

__all__ = [
    "ADAPTERS",
    "AdapterResult",
    "GateSpec",
    "ModelStructure",
    "TokenLayout",
    "UnitLayer",
    "architecture_fingerprint",
    "discover",
    "token_layout",
]
