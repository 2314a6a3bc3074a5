"""captum-chains: NeuroChains and related sub-network explanations as a Captum plugin.

Public API
----------
ChainExtractor, ChainConfig, Chain, SubNetwork
    NeuroChains (Wang, Zhou and Bilmes, TMLR 2022).
ChainPath, PathPoint, FidelityTarget
    The sparsity-fidelity path (``ChainExtractor.path``) and fidelity targets
    (``attribute(..., fidelity=...)``).
export_subnetwork, verify, ExportReport
    A standalone, physically smaller copy of a SubNetwork (``SubNetwork.export()``).
chain_graph, strongest_paths
    Filter -> filter chains as a networkx graph (``Chain.graph()``, ``Chain.paths(k)``).
CriticalPathways, PathwayGradient
    Critical pathways and the pathway gradient (Khakzar et al., CVPR 2021).
InteractionPrimitives, InteractionResult, InteractionConfig
    Generalizable AND-OR interaction primitives (Chen et al., ICLR 2024).
ConcurrentUseError
    Raised instead of switching a training-mode model to eval mode while another thread
    runs it through the package.

Subpackages: ``metrics`` (fidelity, faithfulness, stability, quotient, robustness),
``studies`` (many-region studies), ``visualization`` (figures), ``export`` (standalone
sub-networks), ``chains`` (filter -> filter graphs), ``data``/``pretrained``/``zoo``.
"""

from typing import TYPE_CHECKING

from captum_chains._utils.lazy import attach

if TYPE_CHECKING:  # what type checkers see; the same names as in attach() below
    from captum_chains._utils.model_state import ConcurrentUseError
    from captum_chains.chains import chain_graph, strongest_paths
    from captum_chains.config import FAMILY_PENALTIES, ChainConfig
    from captum_chains.export import ExportReport, export_subnetwork, verify
    from captum_chains.interactions import (
        InteractionConfig,
        InteractionPrimitives,
        InteractionResult,
    )
    from captum_chains.neurochains import ChainExtractor
    from captum_chains.path import ChainPath, FidelityTarget, PathPoint
    from captum_chains.pathways import CriticalPathways, PathwayGradient
    from captum_chains.result import Chain
    from captum_chains.subnetwork import SubNetwork
    from captum_chains.units import GateSpec, ModelStructure, UnitLayer, discover

__version__ = "0.1.0"

# Nothing heavy is imported here: each name imports its module (and torch, timm, ...) on
# first use, so ``import captum_chains`` and ``captum-chains --help`` start fast.
__getattr__, __dir__ = attach(
    __name__,
    {
        "_utils.model_state": ["ConcurrentUseError"],
        "chains": ["chain_graph", "strongest_paths"],
        "config": ["FAMILY_PENALTIES", "ChainConfig"],
        "export": ["ExportReport", "export_subnetwork", "verify"],
        "interactions": ["InteractionConfig", "InteractionPrimitives", "InteractionResult"],
        "neurochains": ["ChainExtractor"],
        "path": ["ChainPath", "FidelityTarget", "PathPoint"],
        "pathways": ["CriticalPathways", "PathwayGradient"],
        "result": ["Chain"],
        "subnetwork": ["SubNetwork"],
        "units": ["GateSpec", "ModelStructure", "UnitLayer", "discover"],
    },
    submodules=[
        "cli",
        "data",
        "demo",
        "export",
        "interactions",
        "metrics",
        "pathways",
        "pretrained",
        "studies",
        "units",
        "visualization",
        "zoo",
    ],
)

__all__ = [
    "FAMILY_PENALTIES",
    "Chain",
    "ChainConfig",
    "ChainExtractor",
    "ChainPath",
    "ConcurrentUseError",
    "CriticalPathways",
    "ExportReport",
    "FidelityTarget",
    "GateSpec",
    "InteractionConfig",
    "InteractionPrimitives",
    "InteractionResult",
    "ModelStructure",
    "PathPoint",
    "PathwayGradient",
    "SubNetwork",
    "UnitLayer",
    "__version__",
    "chain_graph",
    "discover",
    "export_subnetwork",
    "strongest_paths",
    "verify",
]
