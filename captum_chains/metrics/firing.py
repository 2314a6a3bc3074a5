"""Do the kept filters fire in the sub-network as they do in the original network?

NeuroChains keeps exact copies of the filters it retains, but their *inputs* change
when other filters are removed. For every kept unit, this module records its feature
map at the unit's score site (where its score multiplies it, see
:class:`captum_chains.units.UnitLayer`) in the original network and in the
sub-network, and reports their Pearson correlation over all inputs and positions
(``correlation``) and the mean of the per-input correlations
(``mean_input_correlation``). A score multiplies a map by a positive constant, which
does not change a correlation, so 1.0 means the filter's firing pattern is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from captum_chains._utils.hooks import this_thread_only
from captum_chains._utils.model_state import eval_mode
from captum_chains._utils.validation import format_additional_args
from captum_chains.masking import apply_masks
from captum_chains.metrics._common import ChainLike, as_subnetwork, region_inputs
from captum_chains.units.base import ModelStructure, UnitLayer


@dataclass(frozen=True)
class FiringResult:
    """Per-unit correlation of feature maps, original vs sub-network.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per kept unit: ``layer``, ``unit``, ``label``, ``score``,
        ``correlation`` (pooled over inputs and positions) and
        ``mean_input_correlation`` (average over inputs of the per-input correlation;
        NaN where a map is constant).
    """

    table: Any

    @property
    def mean_correlation(self) -> float:
        """Mean pooled correlation over the kept units (ignoring NaN)."""
        return float(self.table["correlation"].mean())


def _unit_maps(tensor: torch.Tensor, unit: UnitLayer, keep: torch.Tensor) -> torch.Tensor:
    """``[N, kept, P]`` maps of the kept units of ``unit`` from its site tensor."""
    t = tensor.detach().movedim(unit.channel_dim, 1)
    n = t.shape[0]
    t = t.reshape(n, unit.size, unit.unit_width, -1)[:, keep]
    return t.reshape(n, len(keep), -1).double()


@contextmanager
def _capture(
    model: nn.Module, structure: ModelStructure, kept: dict[str, torch.Tensor]
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the kept units' site tensors; hooks registered now run after earlier ones."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for unit in structure.units:
            keep = kept[unit.name]
            if len(keep) == 0:
                continue
            module = model.get_submodule(unit.site)

            def grab(t: torch.Tensor, unit: UnitLayer = unit, keep: torch.Tensor = keep) -> None:
                store[unit.name] = _unit_maps(t, unit, keep)

            if unit.hook == "output":
                handles.append(
                    module.register_forward_hook(this_thread_only(lambda m, a, o, g=grab: g(o)))
                )
            else:
                handles.append(
                    module.register_forward_pre_hook(this_thread_only(lambda m, a, g=grab: g(a[0])))
                )
        yield store
    finally:
        for h in handles:
            h.remove()


def _pearson(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    den = (a.square().sum(dim) * b.square().sum(dim)).sqrt()
    out = (a * b).sum(dim) / den
    return torch.where(den > 0, out, torch.full_like(out, float("nan")))


def firing_correlation(
    chain: ChainLike,
    inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    additional_forward_args: Any = None,
) -> FiringResult:
    """Correlation of each kept unit's feature map in the original network and the sub-network.

    Parameters
    ----------
    chain : Chain or SubNetwork
        The chain.
    inputs : Tensor or tuple of Tensor, optional
        Inputs; default the region stored in ``chain``.
    additional_forward_args : Any, optional
        Extra forward arguments (Captum convention).

    Returns
    -------
    FiringResult
        One row per kept unit.
    """
    import pandas as pd

    sub = as_subnetwork(chain)
    items = region_inputs(chain, inputs)
    extra = format_additional_args(additional_forward_args)
    model, structure = sub.model, sub.structure
    kept = {name: torch.nonzero(s > 0).flatten() for name, s in sub.importance.items()}
    with torch.no_grad():
        with eval_mode(model), _capture(model, structure, kept) as original:
            model(*items, *extra)
        with apply_masks(model, structure, sub.mask_state()):
            with _capture(model, structure, kept) as masked:
                model(*items, *extra)
    rows = []
    for unit in structure.units:
        if unit.name not in original:
            continue
        a, b = original[unit.name], masked[unit.name]
        pooled = _pearson(a.transpose(0, 1).flatten(1), b.transpose(0, 1).flatten(1), dim=1)
        per_input = _pearson(a, b, dim=2)
        scores = sub.importance[unit.name]
        for j, idx in enumerate(kept[unit.name].tolist()):
            rows.append(
                {
                    "layer": unit.name,
                    "unit": idx,
                    "label": unit.label(idx),
                    "score": float(scores[idx]),
                    "correlation": float(pooled[j]),
                    "mean_input_correlation": float(per_input[:, j].nanmean()),
                }
            )
    columns = ["layer", "unit", "label", "score", "correlation", "mean_input_correlation"]
    return FiringResult(table=pd.DataFrame(rows, columns=columns))
