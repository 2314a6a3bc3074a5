"""captum-chains: NeuroChains and related sub-network explanations as a Captum plugin.

Public API
----------
ChainExtractor, ChainConfig, Chain, SubNetwork
    NeuroChains (Wang, Zhou and Bilmes, TMLR 2022).
"""

from captum_chains.config import FAMILY_PENALTIES, ChainConfig
from captum_chains.neurochains import ChainExtractor
from captum_chains.result import Chain
from captum_chains.subnetwork import SubNetwork
from captum_chains.units import GateSpec, ModelStructure, UnitLayer, discover

__version__ = "0.1.0"

__all__ = [
    "FAMILY_PENALTIES",
    "Chain",
    "ChainConfig",
    "ChainExtractor",
    "GateSpec",
    "ModelStructure",
    "SubNetwork",
    "UnitLayer",
    "__version__",
    "discover",
]
