"""Per-layer SMOE scale saliency of a chain (Fig. 1 middle of the NeuroChains paper).

SMOE scale (Mundhenk, Chen and Friedland, "Efficient Saliency Maps for Explainable AI",
2019, arXiv:1911.11293) summarises the C non-negative feature maps ``x_c`` of a layer
at every spatial position ``p`` by

.. math::

    m(p) = \\frac{1}{C} \\sum_c x_c(p), \\qquad
    \\mathrm{SMOE}(p) = m(p) \\Big[\\log_2 m(p) - \\frac{1}{C} \\sum_c \\log_2 x_c(p)\\Big],

with ``x_c <- x_c + eps`` to avoid ``log 0`` (the mean times the log ratio of the
arithmetic to the geometric mean: large where the maps are strong *and* a few filters
dominate). Maps of several layers are combined (their Eq. for the combined map) by
normalizing each layer's map with the normal CDF of its per-image z-scores, upsampling
bilinearly to the input size and taking a weighted average.

For a chain, the C maps of a layer are those of its *kept* filters; the sub-network's
maps are taken after the filter scores, the original network's from the unmasked model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from captum.attr import visualization as viz
from matplotlib.figure import Figure

from captum_chains.units.base import UnitLayer
from captum_chains.visualization._common import (
    Denormalize,
    Network,
    chain_kept,
    display_images,
    evenly,
    new_figure,
    pick_units,
    require_inputs,
    resolve,
    site_maps,
    spatial_units,
    upsample,
)

Filters = Literal["kept", "all"]
LayerChoice = Literal["scales", "last", "kept"]

SMOE_EPS = 1e-7


def smoe_scale(maps: torch.Tensor, dim: int = 1, eps: float = SMOE_EPS) -> torch.Tensor:
    """SMOE scale of non-negative feature maps along the channel dimension.

    ``SMOE = m * (log2(m) - mean_c(log2(x)))`` with ``m = mean_c(x)`` and ``x <- x + eps``
    (Mundhenk et al. 2019).

    Parameters
    ----------
    maps : Tensor
        Non-negative maps, e.g. ``[N, C, H, W]`` after a ReLU.
    dim : int
        The channel dimension (reduced).
    eps : float
        Added to every value before the logarithms.

    Returns
    -------
    Tensor
        ``maps`` without ``dim`` (e.g. ``[N, H, W]``); non-negative (AM >= GM).
    """
    if maps.numel() and float(maps.min()) < 0:
        raise ValueError(
            f"SMOE scale needs non-negative maps (min {float(maps.min()):.3g}); apply a ReLU "
            "first (e.g. maps.clamp_min(0))"
        )
    if maps.shape[dim] == 0:
        raise ValueError("SMOE scale needs at least one channel; the layer has no kept filters")
    x = maps.double() + eps
    m = x.mean(dim=dim)
    out = m * (torch.log2(m) - torch.log2(x).mean(dim=dim))
    return out.clamp_min(0).to(maps.dtype if maps.is_floating_point() else torch.float32)


def gauss_norm(maps: torch.Tensor) -> torch.Tensor:
    """Normal-CDF normalization of ``[N, H, W]`` maps: ``Phi((s - mean) / std)`` per image.

    The per-layer normalization Mundhenk et al. use before combining layers (std with
    Bessel's correction, over the spatial positions of one image). Constant maps give 0.5.
    """
    flat = maps.reshape(maps.shape[0], -1).double()
    mean = flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1, keepdim=True) if flat.shape[1] > 1 else torch.zeros_like(mean)
    z = (flat - mean) / std.clamp_min(1e-12)
    out = 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))
    return out.reshape(maps.shape).to(torch.float32)


def combine_maps(
    maps: Sequence[torch.Tensor],
    size: Sequence[int],
    weights: Sequence[float] | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Combine per-layer ``[N, h_l, w_l]`` maps into one ``[N, H, W]`` map.

    Each map is Gauss-normalized (:func:`gauss_norm`, if ``normalize``), upsampled
    bilinearly to ``size`` and the results averaged with ``weights`` (default equal):
    ``S = sum_l w_l up(norm(S_l)) / sum_l w_l``.
    """
    if not maps:
        raise ValueError("no maps to combine; the chain keeps no filter in the chosen layers")
    w = [1.0] * len(maps) if weights is None else [float(v) for v in weights]
    if len(w) != len(maps) or sum(w) <= 0 or min(w) < 0:
        raise ValueError(
            f"weights must be {len(maps)} non-negative numbers with a positive sum, got {weights}"
        )
    total = torch.zeros(maps[0].shape[0], *size)
    for m, wl in zip(maps, w):
        total += wl * upsample(gauss_norm(m) if normalize else m.float(), size)
    return total / sum(w)


def _activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return x.clamp_min(0)
    if activation == "abs":
        return x.abs()
    raise ValueError(f"activation must be 'relu' or 'abs', got {activation!r}")


def smoe_layer_maps(
    chain: Any,
    inputs: torch.Tensor | None = None,
    layers: Sequence[str] | str | None = None,
    *,
    network: Network = "subnetwork",
    filters: Filters = "kept",
    activation: str = "relu",
) -> dict[str, torch.Tensor]:
    """SMOE scale map of each kept layer on each input.

    Parameters
    ----------
    chain : Chain or SubNetwork
        The chain to draw.
    inputs : Tensor, optional
        ``[N, C, H, W]`` inputs; default the chain's region.
    layers : str or sequence of str, optional
        Unit layers (or module prefixes); default every spatial layer with a kept filter.
    network : {"subnetwork", "original"}
        Maps of the thresholded network (after the scores) or of the original model.
    filters : {"kept", "all"}
        SMOE over the layer's kept filters, or over all its filters.
    activation : {"relu", "abs"}
        How the score-site tensor (after BatchNorm, before or at the non-linearity) is
        made non-negative.

    Returns
    -------
    dict of str to Tensor
        Layer name -> ``[N, h, w]`` maps at the layer's own resolution. Layers without a
        kept filter are left out when ``filters="kept"``.
    """
    sub, x = resolve(chain, inputs)
    x = require_inputs(x, "smoe_layer_maps")
    if filters not in ("kept", "all"):
        raise ValueError(f"filters must be 'kept' or 'all', got {filters!r}")
    kept = chain_kept(sub)
    units = pick_units(sub.structure, layers, spatial_units(sub.structure))
    if filters == "kept":
        units = [u for u in units if bool(kept[u.name].any())]
    acts = site_maps(sub, x, units, network)
    out = {}
    for u in units:
        a = _activate(acts[u.name].float(), activation)
        if filters == "kept":
            a = a[:, kept[u.name].to(a.device)]
        out[u.name] = smoe_scale(a).cpu()
    return out


def saliency_layers(chain: Any, layers: LayerChoice | Sequence[str] = "scales") -> list[str]:
    """Which kept layers make up the combined map.

    ``"scales"``: the last kept layer of each spatial resolution (as Mundhenk et al. take
    one layer per scale); ``"last"``: only the deepest kept layer; ``"kept"``: all.
    """
    sub, _ = resolve(chain)
    kept = chain_kept(sub)
    pool = [u for u in spatial_units(sub.structure) if bool(kept[u.name].any())]
    if not isinstance(layers, str):
        return [u.name for u in pick_units(sub.structure, layers, pool)]
    if not pool:
        raise ValueError("the chain keeps no filter in a spatial [N, C, H, W] layer")
    if layers == "last":
        return [pool[-1].name]
    if layers == "kept":
        return [u.name for u in pool]
    if layers == "scales":
        last_of: dict[tuple[int, ...], UnitLayer] = {}
        for u in pool:
            last_of[u.spatial] = u
        chosen = {u.name for u in last_of.values()}
        return [u.name for u in pool if u.name in chosen]
    raise ValueError(f"layers must be 'scales', 'last', 'kept' or a list of names, got {layers!r}")


def smoe_saliency(
    chain: Any,
    inputs: torch.Tensor | None = None,
    layers: LayerChoice | Sequence[str] = "scales",
    *,
    weights: Sequence[float] | None = None,
    network: Network = "subnetwork",
    filters: Filters = "kept",
) -> torch.Tensor:
    """NeuroChains' input-level map: combined SMOE scale of kept layers, ``[N, H, W]``.

    See :func:`combine_maps` (Gauss normalization, bilinear upsampling, weighted mean)
    and :func:`saliency_layers` for ``layers``.
    """
    sub, x = resolve(chain, inputs)
    x = require_inputs(x, "smoe_saliency")
    names = saliency_layers(sub, layers)
    maps = smoe_layer_maps(sub, x, names, network=network, filters=filters)
    return combine_maps([maps[n] for n in names], x.shape[-2:], weights)


def plot_feature_maps(
    chain: Any,
    inputs: torch.Tensor | None = None,
    layers: Sequence[str] | str | None = None,
    *,
    max_layers: int = 6,
    max_inputs: int = 3,
    original_filters: Filters = "all",
    denormalize: Denormalize | None = None,
    cmap: str = "jet",
    alpha: float = 0.55,
    panel_size: float = 1.7,
) -> Figure:
    """Per-layer SMOE maps of the original network beside the sub-network's, on each input.

    Rows are kept layers (shallow to deep, at most ``max_layers``, evenly spaced when
    there are more); each input has two columns: the original network's map of the
    layer (over all its filters, or the kept ones with ``original_filters="kept"``) and
    the sub-network's map over its kept filters. A top row shows the inputs. Maps are
    upsampled to the input, shifted to a zero minimum and overlaid with
    :func:`captum.attr.visualization.visualize_image_attr` (``blended_heat_map``, each map
    scaled to its own range).

    Returns
    -------
    Figure
        ``max_inputs * 2`` columns and ``1 + layers`` rows of panels.
    """
    sub, x = resolve(chain, inputs)
    x = require_inputs(x, "plot_feature_maps")
    if max_inputs < 1:
        raise ValueError(f"max_inputs must be >= 1, got {max_inputs}")
    x = x[:max_inputs]
    kept = chain_kept(sub)
    pool = [u for u in spatial_units(sub.structure) if bool(kept[u.name].any())]
    units = evenly(pick_units(sub.structure, layers, pool), max_layers)
    names = [u.name for u in units]
    if not names:
        raise ValueError("the chain keeps no filter in a spatial layer; nothing to draw")
    orig = smoe_layer_maps(sub, x, names, network="original", filters=original_filters)
    subm = smoe_layer_maps(sub, x, names, network="subnetwork", filters="kept")
    images = display_images(x, denormalize)
    size = x.shape[-2:]
    n, rows = x.shape[0], len(names) + 1
    fig = new_figure(2 * n * panel_size + 1.2, rows * panel_size + 0.6)
    axes = np.atleast_2d(fig.subplots(rows, 2 * n, squeeze=False))
    for i in range(n):
        for j in range(2):
            ax = axes[0, 2 * i + j]
            if j == 0:
                ax.imshow(images[i])
                ax.set_title(f"input {i}", fontsize=8)
            else:
                ax.axis("off")
            ax.set_xticks([])
            ax.set_yticks([])
    for r, u in enumerate(units, start=1):
        k = int(kept[u.name].sum())
        up_o = upsample(orig[u.name][:n], size).numpy()
        up_s = upsample(subm[u.name][:n], size).numpy()
        for i in range(n):
            for j, (heat, label) in enumerate(
                (
                    (up_o[i], f"original ({u.size if original_filters == 'all' else k})"),
                    (up_s[i], f"sub-network ({k})"),
                )
            ):
                ax = axes[r, 2 * i + j]
                _overlay(fig, ax, heat, images[i], cmap, alpha)
                ax.set_title(label, fontsize=7)
                if i == 0 and j == 0:
                    ax.set_ylabel(f"{u.name}\n{k}/{u.size} kept", fontsize=7)
    fig.suptitle("SMOE scale per layer: original network vs sub-network", fontsize=10)
    fig.tight_layout()
    return fig


def _overlay(
    fig: Figure, ax: Any, heat: np.ndarray, image: np.ndarray, cmap: str, alpha: float
) -> None:
    """Captum's blended heat map of a map over a grey image (min-max scaled), ticks removed.

    SMOE maps of deep layers sit on a high floor; subtracting each map's minimum shows
    where it peaks (the Gauss normalization of the combined map plays the same role).
    """
    heat = heat - float(np.min(heat))
    if float(np.max(heat)) <= 0:
        ax.imshow(image.mean(axis=2), cmap="gray")
    else:
        viz.visualize_image_attr(
            heat[..., None],
            image,
            method="blended_heat_map",
            sign="positive",
            plt_fig_axis=(fig, ax),
            cmap=cmap,
            alpha_overlay=alpha,
            outlier_perc=1,
            use_pyplot=False,
        )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.axis("on")
    for spine in ax.spines.values():
        spine.set_visible(False)
