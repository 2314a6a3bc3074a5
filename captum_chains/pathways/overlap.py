"""How far a NeuroChains chain and the critical pathways of the same inputs agree.

A NeuroChains chain scores conv filters (``importance[layer][f] > 0``: filter ``f``
of conv module ``layer`` is kept); a critical pathway keeps activation neurons
(channel x position) per input. To compare them we map filters to neurons through
the traced dataflow (:class:`~captum_chains.pathways.neurons.Producer`):

* filter ``f`` of conv ``L`` *feeds* channel ``f`` of every activation whose input
  is ``L``'s output passed through shape-preserving per-channel operations (BN,
  dropout, residual additions, pooling) - e.g. the ReLU6 inside timm's
  ``BatchNormAct2d`` that follows ``L``;
* filter ``f`` is **on the pathway of input** ``b`` when at least one neuron (any
  spatial position) of channel ``f`` of one of those activations is kept for ``b``.

Conv layers with no activation after them (e.g. EfficientNet's linear
``conv_pwl`` projections, followed by BN and a residual sum only) cannot be
mapped; they are listed in :attr:`PathwayChainOverlap.unmapped` and left out of
every fraction. For each input ``b``, with ``K`` the chain's kept filters and
``P_b`` the filters on ``b``'s pathway, both restricted to mapped layers:

.. math:: \\text{chain\\_on\\_pathway}_b = \\frac{|K \\cap P_b|}{|K|}, \\qquad
          \\text{pathway\\_in\\_chain}_b = \\frac{|K \\cap P_b|}{|P_b|}

and their *chance levels* - what a random kept set of the same size would score -
are :math:`|P_b| / F` and :math:`|K| / F` with :math:`F` the number of mapped
filters. Means over the region's inputs summarize the region.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from captum_chains.pathways.critical import CriticalPathwaysResult

__all__ = ["PathwayChainOverlap", "filters_on_pathway", "pathway_chain_overlap"]


@dataclass(frozen=True)
class PathwayChainOverlap:
    """Agreement of a chain's kept filters with per-input critical pathways.

    Attributes
    ----------
    layers : tuple of str
        Chain layers that could be mapped to activation neurons.
    unmapped : tuple of str
        Chain layers without a following activation (left out).
    chain_on_pathway : Tensor
        ``[N]``: fraction of the chain's kept filters that lie on input ``b``'s pathway.
    pathway_in_chain : Tensor
        ``[N]``: fraction of input ``b``'s pathway filters that the chain keeps.
    chance_chain_on_pathway : Tensor
        ``[N]``: fraction of all mapped filters on the pathway (random-chain level).
    chance_pathway_in_chain : float
        Fraction of all mapped filters kept by the chain (random-pathway level).
    on_pathway : dict of str to Tensor
        Per layer, ``[N, filters]`` booleans: filter on input ``b``'s pathway.
    kept : dict of str to Tensor
        Per layer, ``[filters]`` booleans: filter kept by the chain.
    """

    layers: tuple[str, ...]
    unmapped: tuple[str, ...]
    chain_on_pathway: Tensor
    pathway_in_chain: Tensor
    chance_chain_on_pathway: Tensor
    chance_pathway_in_chain: float
    on_pathway: dict[str, Tensor] = field(repr=False)
    kept: dict[str, Tensor] = field(repr=False)

    def summary(self) -> dict[str, float]:
        """Means over the inputs."""
        return {
            "chain_on_pathway": float(self.chain_on_pathway.nanmean()),
            "chance_chain_on_pathway": float(self.chance_chain_on_pathway.mean()),
            "pathway_in_chain": float(self.pathway_in_chain.nanmean()),
            "chance_pathway_in_chain": float(self.chance_pathway_in_chain),
        }

    def per_layer(self) -> Any:
        """A ``pandas.DataFrame`` with per-layer counts and fractions (means over inputs)."""
        import pandas as pd

        rows = []
        for layer in self.layers:
            on, kept = self.on_pathway[layer].double(), self.kept[layer].double()
            both = (on * kept).sum(1)
            rows.append(
                {
                    "layer": layer,
                    "filters": int(kept.numel()),
                    "kept_by_chain": int(kept.sum()),
                    "on_pathway": float(on.sum(1).mean()),
                    "kept_and_on_pathway": float(both.mean()),
                    "chain_on_pathway": float((both / kept.sum()).mean())
                    if kept.sum() > 0
                    else float("nan"),
                }
            )
        return pd.DataFrame(rows)


def filters_on_pathway(pathways: CriticalPathwaysResult) -> dict[str, Tensor]:
    """Per conv / linear module, ``[N, filters]`` booleans: filter feeds a kept neuron.

    Every activation site lists its producers (modules whose output channels reach
    it one-to-one); a filter is on input ``b``'s pathway when any neuron of its
    channel in any of those sites is kept.
    """
    result: dict[str, Tensor] = {}
    for site in pathways.sites:
        for producer in site.producers:
            channels = pathways.channels_on_pathway(site.name, producer.dim)
            if channels.shape[1] != producer.channels:  # pragma: no cover - traced invariant
                continue
            previous = result.get(producer.module)
            result[producer.module] = channels if previous is None else previous | channels
    return result


def pathway_chain_overlap(
    chain: Any,
    pathways: CriticalPathwaysResult,
    layers: Sequence[str] | None = None,
) -> PathwayChainOverlap:
    """Fraction of a chain's kept filters on the critical pathways, and vice versa.

    Parameters
    ----------
    chain : Chain or mapping of str to Tensor
        A NeuroChains result with ``.importance`` (duck-typed), or that mapping
        itself: conv module name -> per-filter scores, ``0`` meaning removed.
    pathways : CriticalPathwaysResult
        Critical pathways of the region's inputs (same model).
    layers : sequence of str, optional
        Restrict to these chain layers.

    Returns
    -------
    PathwayChainOverlap

    Raises
    ------
    ValueError
        When a layer's score count differs from its filter count, or when no chain
        layer can be mapped to activation neurons.
    """
    importance = getattr(chain, "importance", chain)
    if not isinstance(importance, Mapping):
        raise TypeError(
            "chain must have an `importance` mapping (layer -> per-filter scores) or be one, "
            f"got {type(chain).__name__}"
        )
    if not isinstance(pathways, CriticalPathwaysResult):
        raise TypeError(f"pathways must be a CriticalPathwaysResult, got {type(pathways).__name__}")
    names = list(layers) if layers is not None else list(importance)
    unknown = [n for n in names if n not in importance]
    if unknown:
        raise ValueError(f"layers {unknown} are not in the chain's importance")
    on_pathway_all = filters_on_pathway(pathways)
    mapped, unmapped = [], []
    on_pathway: dict[str, Tensor] = {}
    kept: dict[str, Tensor] = {}
    for name in names:
        scores = torch.as_tensor(importance[name]).detach().reshape(-1).cpu()
        if name not in on_pathway_all:
            unmapped.append(name)
            continue
        on = on_pathway_all[name].cpu()
        if scores.numel() != on.shape[1]:
            raise ValueError(
                f"chain layer {name!r} scores {scores.numel()} filters but the module has "
                f"{on.shape[1]} output channels"
            )
        mapped.append(name)
        on_pathway[name] = on
        kept[name] = scores > 0
    if not mapped:
        raise ValueError(
            f"none of the chain layers {names[:5]} feeds an activation of the model; "
            "check that the chain and the pathways come from the same model"
        )
    on_all = torch.cat([on_pathway[n] for n in mapped], dim=1).double()
    kept_all = torch.cat([kept[n] for n in mapped]).double()
    both = on_all @ kept_all
    n_kept = kept_all.sum()
    n_on = on_all.sum(1)
    total = kept_all.numel()
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return PathwayChainOverlap(
        layers=tuple(mapped),
        unmapped=tuple(unmapped),
        chain_on_pathway=both / n_kept if n_kept > 0 else nan.expand(len(both)).clone(),
        pathway_in_chain=torch.where(n_on > 0, both / n_on.clamp_min(1), nan),
        chance_chain_on_pathway=n_on / total,
        chance_pathway_in_chain=float(n_kept / total),
        on_pathway=on_pathway,
        kept=kept,
    )
