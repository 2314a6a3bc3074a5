"""Discovery of scorable units (filters, heads, neurons) and gates (layers, blocks).

Importing the package registers every model family (see :mod:`~captum_chains.units.adapters`).
"""

from captum_chains.units import timm_cnn, timm_vit, torch_attention  # noqa: F401  (register)
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
