"""The model's architecture with the chain on it (Fig. 1 top, Fig. 4 left of NeuroChains).

One row per unit layer in execution order. Each row is the layer's filter axis
(filter ``i`` of ``C`` at ``x = (i + 0.5) / C``); every kept filter is a mark coloured
by its score (shared colour bar), the row's right end reads ``kept/total`` and layers
removed by a closed gate (or inside a removed block) are greyed and marked "removed".
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from captum_chains.visualization._common import (
    chain_scores,
    evenly,
    new_figure,
    removed_layers,
    resolve,
    short_name,
)


def plot_architecture(
    chain: Any,
    *,
    max_layers: int = 80,
    max_filters: int = 4000,
    cmap: str = "viridis",
    title: str | None = None,
    row_height: float = 0.17,
    width: float = 8.0,
) -> Figure:
    """Draw every layer of the model with the chain's kept filters coloured by score.

    Parameters
    ----------
    chain : Chain or SubNetwork
        The chain to draw.
    max_layers : int
        At most this many rows; with more unit layers, the layers with kept filters are
        shown (evenly thinned if they alone exceed the limit) and the title says how many
        are hidden.
    max_filters : int
        At most this many marks; with more kept filters, the highest-scoring ones are drawn
        (the ``kept/total`` counts stay exact).
    cmap : str
        Matplotlib colour map of the scores.
    title : str, optional
        Figure title (default: model name and kept/total counts).
    row_height, width : float
        Inches per layer row and figure width.

    Returns
    -------
    Figure
        One axes with one mark per drawn kept filter (a single scatter collection) and a
        colour bar.
    """
    sub, _ = resolve(chain)
    if max_filters < 1:
        raise ValueError(f"max_filters must be >= 1, got {max_filters}")
    structure = sub.structure
    importance = chain_scores(sub)
    removed = removed_layers(sub)
    units = list(structure.units)
    hidden = 0
    if len(units) > max_layers:
        with_kept = [u for u in units if bool((importance[u.name] > 0).any())]
        shown = evenly(with_kept or units, max_layers)
        if len(shown) < max_layers:
            others = [u for u in units if u not in shown]
            extra = evenly(others, max_layers - len(shown)) if others else []
            keep = {u.name for u in shown} | {u.name for u in extra}
            shown = [u for u in units if u.name in keep]
        hidden = len(units) - len(shown)
        units = shown

    # all kept filters of the drawn layers: (row, x, score)
    rows, xs, scores = [], [], []
    for r, u in enumerate(units):
        s = importance[u.name].float()
        idx = torch.nonzero(s > 0).flatten()
        rows.append(np.full(idx.numel(), r))
        xs.append((idx.numpy() + 0.5) / u.size)
        scores.append(s[idx].numpy())
    row_a = np.concatenate(rows) if rows else np.zeros(0)
    x_a = np.concatenate(xs) if xs else np.zeros(0)
    s_a = np.concatenate(scores) if scores else np.zeros(0)
    total_kept = len(s_a)
    if total_kept > max_filters:
        best = np.sort(np.argsort(-s_a, kind="stable")[:max_filters])
        row_a, x_a, s_a = row_a[best], x_a[best], s_a[best]

    n = len(units)
    height = n * row_height + 1.4
    fig = new_figure(width, height)
    bottom, span = 0.9 / height, 1 - 1.4 / height
    ax = fig.add_axes((0.25, bottom, 0.56, span))
    cax = fig.add_axes((0.935, bottom + 0.1 * span, 0.018, 0.8 * span))
    blocks = [u.block or u.name.rsplit(".", 1)[0] for u in units]
    shade = 0
    for r, u in enumerate(units):
        if r > 0 and blocks[r] != blocks[r - 1]:
            shade ^= 1
        if shade:
            ax.axhspan(r - 0.5, r + 0.5, color="#f1f1f1", zorder=0, lw=0)
        gone = u.name in removed
        ax.plot(
            [0, 1],
            [r, r],
            color="#c8c8c8" if gone else "#9a9a9a",
            lw=2.6 if gone else 0.8,
            zorder=1,
            solid_capstyle="butt",
        )
        k = int((importance[u.name] > 0).sum())
        label = "removed" if gone else f"{k}/{u.size}"
        ax.text(
            1.02,
            r,
            label,
            va="center",
            ha="left",
            fontsize=6.5,
            color="#a0a0a0" if gone else ("black" if k else "#777777"),
            transform=ax.get_yaxis_transform(),
        )
    vmax = float(s_a.max()) if len(s_a) else 1.0
    norm = Normalize(vmin=0.0, vmax=max(vmax, 1e-6))
    marker_h = max(4.0, min(9.0, row_height * 72 * 0.8))
    scatter = ax.scatter(
        x_a,
        row_a,
        c=s_a,
        cmap=colormaps[cmap],
        norm=norm,
        marker="|",
        s=marker_h**2,
        linewidths=0.9,
        zorder=3,
    )
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(0, 1)
    ax.set_yticks(range(n))
    ax.set_yticklabels([short_name(u.name, 34) for u in units], fontsize=6.5 if n > 30 else 8)
    for tick, u in zip(ax.get_yticklabels(), units):
        if u.name in removed:
            tick.set_color("#a0a0a0")
    ax.set_xticks([0, 0.5, 1])
    ax.set_xticklabels(["0", "filter index / layer width", "1"], fontsize=7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    cbar = fig.colorbar(scatter, cax=cax)
    cbar.set_label("score", fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    model_name = type(sub.model).__name__
    n_chain = sum(int((s > 0).sum()) for s in importance.values())
    notes = []
    if hidden:
        notes.append(f"{hidden} layers without kept filters hidden")
    if total_kept > max_filters:
        notes.append(f"top {max_filters} of {total_kept} kept filters drawn")
    fig.suptitle(
        title
        or (
            f"{model_name}: {n_chain}/{sub.total_filters} filters kept, "
            f"{len(sub.removed_gates)}/{len(structure.gates)} layers/blocks removed"
            + (f"\n({'; '.join(notes)})" if notes else "")
        ),
        fontsize=9,
    )
    return fig
