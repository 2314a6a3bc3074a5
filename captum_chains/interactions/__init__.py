"""Generalizable AND-OR interaction primitives (Chen et al., ICLR 2024) as a Captum method.

Public API::

    from captum_chains.interactions import InteractionPrimitives, InteractionConfig
    from captum_chains.interactions import InteractionResult, SolverConfig
    from captum_chains.interactions import patch_grid_mask, slic_mask, token_mask
"""

from captum_chains.interactions.config import InteractionConfig
from captum_chains.interactions.optimize import SolverConfig, choose_solver
from captum_chains.interactions.players import patch_grid_mask, slic_mask, token_mask
from captum_chains.interactions.primitives import InteractionPrimitives
from captum_chains.interactions.result import Interaction, InteractionResult

__all__ = [
    "Interaction",
    "InteractionConfig",
    "InteractionPrimitives",
    "InteractionResult",
    "SolverConfig",
    "choose_solver",
    "patch_grid_mask",
    "slic_mask",
    "token_mask",
]
