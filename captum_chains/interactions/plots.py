"""Figures for AND-OR interaction primitives (Chen et al., ICLR 2024, Figs. 4 and 5).

Every function builds a :class:`matplotlib.figure.Figure` without touching pyplot's
global state (no backend switch, no open windows) and returns it; save it with
``fig.savefig(path)``.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure

from captum_chains.interactions.result import KINDS, InteractionResult

_SHARED = "#3A87BC"
_DISTINCT = "#FF9230"


def plot_strength_by_order(
    result: InteractionResult,
    model: int = 0,
    sample: int | None = None,
    kinds: tuple[str, ...] = KINDS,
) -> Figure:
    """Interaction strength by order, positive up and negative down (Fig. 4).

    For each order ``|S|`` the summed ``I(S)`` of the model's salient interactions
    ``Ω^(i)`` (light) and of the shared ones ``Ω_shared`` (dark) are drawn; averaged over
    samples when ``sample`` is None.
    """
    fig = Figure(figsize=(5.0 * len(kinds), 3.6), layout="constrained")
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    orders = np.arange(result.n + 1)
    rows = slice(None) if sample is None else slice(sample, sample + 1)
    for ax, kind in zip(axes, kinds, strict=True):
        sal = result.salient(kind)
        shared = sal.all(dim=1, keepdim=True).expand_as(sal)
        for mask, label, alpha, offset in (
            (sal, "salient (this model)", 0.45, -0.2),
            (shared, "shared by all models", 1.0, 0.2),
        ):
            st = result.strength_by_order(kind, mask)[rows, model].mean(0).cpu().numpy()
            ax.bar(orders + offset, st[:, 0], width=0.4, color=_SHARED, alpha=alpha, label=label)
            ax.bar(orders + offset, st[:, 1], width=0.4, color=_DISTINCT, alpha=alpha)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel("order |S|")
        ax.set_ylabel("summed I(S)  (+ blue, − orange)")
        ax.set_title(f"{kind.upper()} interactions, {result.model_names[model]}")
        ax.set_xticks(orders)
        ax.legend(fontsize=8)
    return fig


def _image_array(image: torch.Tensor) -> np.ndarray:
    img = image.detach().float().cpu()
    if img.dim() == 3 and img.shape[0] in (1, 3):
        img = img.permute(1, 2, 0)
    if img.dim() == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else torch.zeros_like(img)
    return img.numpy()


def plot_top_interactions(
    result: InteractionResult,
    image: torch.Tensor,
    feature_mask: torch.Tensor,
    sample: int = 0,
    model: int = 0,
    kind: str = "and",
    k: int = 6,
    ncols: int = 3,
) -> Figure:
    """The ``k`` strongest interactions drawn on the image, players of ``S`` highlighted.

    Parameters
    ----------
    image : torch.Tensor
        ``[C, H, W]`` or ``[H, W]`` image of ``sample`` (any range; rescaled for display).
    feature_mask : torch.Tensor
        ``[H, W]`` (or broadcastable ``[1, H, W]``) player ids used for the result.
    """
    items = result.top(kind, sample=sample, model=model, k=k)
    ids = feature_mask.detach().cpu().long()
    while ids.dim() > 2:
        ids = ids[0]
    img = _image_array(image)
    rows = max(1, -(-len(items) // ncols))
    fig = Figure(figsize=(2.6 * ncols, 2.8 * rows), layout="constrained")
    axes = fig.subplots(rows, ncols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    cmap = "gray" if img.ndim == 2 else None
    for ax, item in zip(axes, items, strict=False):
        members = [result.player_names.index(p) for p in item.players]
        inside = torch.isin(ids, torch.tensor(members)).numpy()
        ax.imshow(img, cmap=cmap, vmin=0, vmax=1)
        shade = np.zeros((*inside.shape, 4))
        shade[~inside] = (1.0, 1.0, 1.0, 0.75)
        ax.imshow(shade)
        color = _SHARED if item.value > 0 else _DISTINCT
        ax.contour(inside.astype(float), levels=[0.5], colors=[color], linewidths=1.5)
        ax.set_title(f"{kind.upper()} {{{','.join(item.players)}}}\n{item.value:+.3g}", fontsize=8)
    fig.suptitle(f"top-{len(items)} {kind.upper()} interactions, {result.model_names[model]}")
    return fig


def plot_shared_vs_distinctive(
    result: InteractionResult,
    sample: int = 0,
    kind: str = "and",
    max_items: int = 12,
) -> Figure:
    """Each model's salient interactions side by side, shared vs distinctive (Fig. 5).

    One panel per model: horizontal bars of ``I(S)`` for its strongest salient
    interactions, blue when ``S`` is shared by all models, orange when distinctive.
    """
    m = result.num_models
    sal = result.salient(kind)[sample]
    shared = sal.all(dim=0)
    fig = Figure(figsize=(3.6 * m, 0.32 * max_items + 1.4), layout="constrained")
    axes = fig.subplots(1, m, squeeze=False)[0]
    for i, ax in enumerate(axes):
        items = result.listing(kind, sal[i], sample, i)[:max_items]
        labels = ["{" + ",".join(it.players) + "}" for it in items]
        vals = [it.value for it in items]
        colors = [_SHARED if bool(shared[it.subset]) else _DISTINCT for it in items]
        y = np.arange(len(items))[::-1]
        ax.barh(y, vals, color=colors)
        ax.set_yticks(y, labels, fontsize=7)
        ax.axvline(0.0, color="black", linewidth=0.8)
        s = float(result.generalization(kind)[sample, i])
        ax.set_title(f"{result.model_names[i]}\ns_{kind} = {s:.2f}", fontsize=9)
        ax.set_xlabel(f"I_{kind}(S)")
    fig.legend(
        handles=[
            _patch(_SHARED, "shared by all models"),
            _patch(_DISTINCT, "distinctive"),
        ],
        loc="outside lower center",
        ncols=2,
        fontsize=8,
    )
    return fig


def _patch(color: str, label: str):
    from matplotlib.patches import Patch

    return Patch(color=color, label=label)
