"""The result of a NeuroChains extraction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from captum_chains.config import ChainConfig
from captum_chains.subnetwork import SubNetwork
from captum_chains.units.base import ModelStructure


@dataclass
class Chain:
    """A local reasoning chain: which units and layers carry the model's decision on a region.

    Attributes
    ----------
    importance : dict of str to Tensor
        Unit layer name -> final score per unit; 0 for removed units (also for units of a
        removed layer or block).
    gates : dict of str to float
        Gate name -> gate value ``sigmoid(alpha / T)`` at the end of the optimization; gates
        below ``config.gate_threshold`` were closed.
    subnetwork : SubNetwork
        The runnable thresholded network.
    history : list of dict
        One row per optimization step: ``phase`` ("optimize" or "finetune"), ``step``,
        ``loss``, ``kl``, ``l1``, ``gate_penalty``, ``kept`` (units with score >= tau),
        ``open_gates`` and ``time`` (seconds since the start).
    structure : ModelStructure
        The model's units and gates.
    config : ChainConfig
        The hyperparameters used (with the family defaults filled in).
    kl : float
        KL divergence of the final sub-network on the region's inputs.
    finetuned : bool
        Whether the surviving scores were fine-tuned.
    inputs : Tensor or None
        The region's inputs (kept for graphs and figures; ``None`` if not stored).
    """

    importance: dict[str, torch.Tensor]
    gates: dict[str, float]
    subnetwork: SubNetwork
    history: list[dict[str, Any]]
    structure: ModelStructure
    config: ChainConfig
    kl: float
    finetuned: bool
    inputs: torch.Tensor | None = field(default=None, repr=False)

    @property
    def kept(self) -> dict[str, torch.Tensor]:
        """Unit layer name -> bool mask of kept units."""
        return {name: s > 0 for name, s in self.importance.items()}

    @property
    def num_filters(self) -> int:
        """Number of kept units."""
        return self.subnetwork.num_filters

    @property
    def total_filters(self) -> int:
        """Number of units of the model."""
        return self.subnetwork.total_filters

    def summary(self) -> str:
        """See :meth:`SubNetwork.summary`."""
        return (
            self.subnetwork.summary()
            + f"\nKL(original || sub-network) on the region: {self.kl:.4f}"
        )

    def history_frame(self) -> Any:
        """The history as a ``pandas.DataFrame``."""
        import pandas as pd

        return pd.DataFrame(self.history)

    def graph(self, inputs: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Filter -> filter graph of the chain (see :func:`captum_chains.chains.chain_graph`)."""
        from captum_chains.chains import chain_graph

        return chain_graph(self, self.inputs if inputs is None else inputs, **kwargs)

    def paths(self, k: int = 5, inputs: torch.Tensor | None = None) -> list[str]:
        """The ``k`` strongest input-to-output chains as readable strings."""
        from captum_chains.chains import strongest_paths

        return strongest_paths(self.graph(inputs), k)
