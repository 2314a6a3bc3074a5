"""Do kept filters fire the same in the sub-network? (Figs. 6-7 of NeuroChains.)

For a few kept filters, the filter's map (ReLU of its score-site tensor) in the original
network is drawn beside the same filter's map in the sub-network, on the same colour
scale, with the Pearson correlation of the two maps. A faithful chain keeps the firing
pattern (high correlation) even though most other filters are gone; the scale may differ
by the filter's score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from captum_chains.visualization._common import (
    Denormalize,
    chain_kept,
    chain_scores,
    display_images,
    evenly,
    new_figure,
    pick_units,
    require_inputs,
    resolve,
    site_maps,
    spatial_units,
)


def firing_maps(
    chain: Any, inputs: torch.Tensor | None, layer: str, filters: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU maps ``[N, F, h, w]`` of ``filters`` of ``layer``: original, then sub-network."""
    sub, x = resolve(chain, inputs)
    x = require_inputs(x, "firing_maps")
    unit = sub.structure.unit(layer)
    idx = [int(f) for f in filters]
    if not idx or min(idx) < 0 or max(idx) >= unit.size:
        raise ValueError(f"filters must be indices in [0, {unit.size}) for {layer!r}, got {idx}")
    orig = site_maps(sub, x, [unit], "original")[layer][:, idx].clamp_min(0).float().cpu()
    subm = site_maps(sub, x, [unit], "subnetwork")[layer][:, idx].clamp_min(0).float().cpu()
    return orig, subm


def map_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation over the trailing two (spatial) dimensions; NaN for constant maps."""
    a = a.flatten(-2).double()
    b = b.flatten(-2).double()
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    denom = (a.square().sum(-1) * b.square().sum(-1)).sqrt()
    out = (a * b).sum(-1) / denom
    return torch.where(denom > 0, out, torch.full_like(out, float("nan"))).float()


def _choose(
    sub: Any, layers: Sequence[str] | str | None, max_filters: int
) -> list[tuple[str, int]]:
    kept = chain_kept(sub)
    pool = [u for u in spatial_units(sub.structure) if bool(kept[u.name].any())]
    if not pool:
        raise ValueError("the chain keeps no convolutional filter; nothing to compare")
    units = pick_units(sub.structure, layers, pool) if layers is not None else evenly(pool, 3)
    per = max(1, math.ceil(max_filters / len(units)))
    imp = chain_scores(sub)
    out: list[tuple[str, int]] = []
    for u in units:
        s = imp[u.name]
        order = torch.argsort(s, descending=True, stable=True)
        out.extend((u.name, int(i)) for i in order[:per] if s[i] > 0)
    return out[:max_filters]


def plot_firing(
    chain: Any,
    inputs: torch.Tensor | None = None,
    layers: Sequence[str] | str | None = None,
    filters: Sequence[int] | None = None,
    *,
    max_filters: int = 6,
    max_inputs: int = 3,
    denormalize: Denormalize | None = None,
    cmap: str = "magma",
    panel_size: float = 1.45,
) -> Figure:
    """Kept filters' maps in the original network beside the sub-network's.

    Parameters
    ----------
    chain : Chain or SubNetwork
        The chain.
    inputs : Tensor, optional
        Inputs (default the chain's region; at most ``max_inputs`` are drawn).
    layers : str or sequence of str, optional
        Layers to take filters from; default up to three kept layers, evenly spaced.
    filters : sequence of int, optional
        Filters of a single layer; default the highest-scoring kept filters.
    max_filters : int
        At most this many filter rows.

    Returns
    -------
    Figure
        A top row of inputs, then one row per filter with ``2 * inputs`` panels
        (original | sub-network per input), titled with their correlation.
    """
    sub, x = resolve(chain, inputs)
    x = require_inputs(x, "plot_firing")[:max_inputs]
    if max_filters < 1:
        raise ValueError(f"max_filters must be >= 1, got {max_filters}")
    if filters is not None:
        if layers is None or (not isinstance(layers, str) and len(layers) != 1):
            raise ValueError("give exactly one layer together with filters=[...]")
        name = layers if isinstance(layers, str) else layers[0]
        chosen = [(name, int(f)) for f in list(filters)[:max_filters]]
    else:
        chosen = _choose(sub, layers, max_filters)
    maps: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for name in dict.fromkeys(n for n, _ in chosen):
        ids = [f for n, f in chosen if n == name]
        o, s = firing_maps(sub, x, name, ids)
        for j, f in enumerate(ids):
            maps[(name, f)] = (o[:, j], s[:, j])
    images = display_images(x, denormalize)
    n = x.shape[0]
    rows = len(chosen) + 1
    fig = new_figure(2 * n * panel_size + 1.6, rows * panel_size + 0.6)
    axes = np.atleast_2d(fig.subplots(rows, 2 * n, squeeze=False))
    for i in range(n):
        axes[0, 2 * i].imshow(images[i])
        axes[0, 2 * i].set_title(f"input {i}", fontsize=8)
        axes[0, 2 * i + 1].axis("off")
    importance = chain_scores(sub)
    for r, (name, f) in enumerate(chosen, start=1):
        o, s = maps[(name, f)]
        corr = map_correlation(o, s)
        for i in range(n):
            vmax = max(float(o[i].max()), float(s[i].max()), 1e-12)
            for j, m in enumerate((o[i], s[i])):
                ax = axes[r, 2 * i + j]
                ax.imshow(m.numpy(), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
                r_txt = "n/a" if torch.isnan(corr[i]) else f"{float(corr[i]):.2f}"
                who = "original" if j == 0 else f"sub-net  r={r_txt}"
                ax.set_title(who, fontsize=6.5)
        axes[r, 0].set_ylabel(f"{name}.{f}\nscore {float(importance[name][f]):.2f}", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Kept filters firing: original network vs sub-network", fontsize=10)
    fig.tight_layout()
    return fig
