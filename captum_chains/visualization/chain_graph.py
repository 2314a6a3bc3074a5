"""The chain as a filter -> filter graph, drawn layer by layer (Fig. 4 of NeuroChains).

The graph comes from :func:`captum_chains.chains.chain_graph` (the sub-network's
dataflow on the region, the graph behind :meth:`Chain.graph` and :meth:`Chain.paths`)
when that module is available and inputs are known. Otherwise (``source="weights"``, or
no inputs) it is built here from the kept filters and the weights: filter ``i`` of
layer ``A`` feeds filter ``j`` of the next layer ``B`` that reads ``A``'s channels, with
strength

.. math::

    w_{i \\to j} = s_i \\, s_j \\, \\sum_{k} |W^B_{j,i,k}| \\; [\\, \\bar a_i \\,],

where ``s`` are the chain's scores, ``W^B`` the convolution (or linear) weights of ``B``
(a depthwise filter reads only its own channel) and ``\\bar a_i`` the mean ReLU
activation of ``i`` on the region when inputs are given. ``A`` is the closest earlier
unit layer, not removed by a closed gate, whose width equals ``B``'s input channels
(exact for plain and inverted residual stacks, where a removed layer or block is the
identity; an approximation where a residual sum mixes several layers).

With the chains module the highlighted paths are its strongest input-to-logit paths.
For the weight graph they are the maximum-product paths from the first drawn layer to
the last, with edge weights normalised by the largest weight between the same two
layers (dynamic programming over layers), found on all kept filters of the drawn
layers. Either way the figure shows the path filters plus the highest-scoring others.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from torch import nn

from captum_chains.visualization._common import (
    chain_kept,
    chain_scores,
    new_figure,
    removed_layers,
    resolve,
    short_name,
    site_maps,
)


def _kept_units(sub: Any) -> list[Any]:
    kept = chain_kept(sub)
    return [u for u in sub.structure.units if bool(kept[u.name].any())]


def _input_layer(structure: Any, position: int, in_channels: int, removed: set[str]) -> Any | None:
    """The closest earlier unit layer of ``in_channels`` filters that still runs.

    A layer or block removed by a closed gate is the identity, so its input passes through
    to the next layer: removed layers are skipped.
    """
    for u in reversed(structure.units[:position]):
        if u.size == in_channels and u.name not in removed:
            return u
    return None


def weight_graph(
    chain: Any,
    inputs: torch.Tensor | None = None,
    *,
    layers: Sequence[str] | None = None,
    max_filters: int | None = None,
) -> Any:
    """Filter -> filter graph of the chain from kept filters and weights (networkx ``DiGraph``).

    Parameters
    ----------
    chain : Chain or SubNetwork
        The chain.
    inputs : Tensor, optional
        With inputs, edges are also weighted by the source filter's mean ReLU activation
        on them (default the chain's region; pass ``False``-like ``inputs=None`` on a bare
        SubNetwork for weights only).
    layers : sequence of str, optional
        Restrict to these unit layers.
    max_filters : int, optional
        Keep only the ``max_filters`` highest-scoring kept filters of each layer.

    Returns
    -------
    networkx.DiGraph
        Nodes ``"layer.index"`` with attributes ``layer``, ``index``, ``score``, ``depth``
        (position of the layer in execution order); edges with ``weight``.
    """
    import networkx as nx

    sub, x = resolve(chain, inputs)
    structure = sub.structure
    importance = chain_scores(sub)
    order = {u.name: i for i, u in enumerate(structure.units)}
    wanted = set(layers) if layers is not None else None
    chosen: dict[str, list[int]] = {}
    for u in structure.units:
        if wanted is not None and u.name not in wanted:
            continue
        s = importance[u.name]
        idx = torch.nonzero(s > 0).flatten()
        if max_filters is not None and idx.numel() > max_filters:
            idx = idx[torch.argsort(s[idx], descending=True, stable=True)[:max_filters]]
        if idx.numel():
            chosen[u.name] = sorted(int(i) for i in idx)
    mean_act: dict[str, torch.Tensor] = {}
    if x is not None and chosen:
        units = [structure.unit(n) for n in chosen]
        maps = site_maps(sub, x, units, "subnetwork")
        for n, m in maps.items():
            dims = [
                d
                for d in range(m.ndim)
                if d != (1 if structure.unit(n).channel_dim == 1 else m.ndim - 1)
            ]
            mean_act[n] = m.float().clamp_min(0).mean(dim=dims).cpu()
    graph = nx.DiGraph()
    for name, ids in chosen.items():
        for i in ids:
            graph.add_node(
                f"{name}.{i}",
                layer=name,
                index=i,
                score=float(importance[name][i]),
                depth=order[name],
            )
    modules = dict(sub.model.named_modules())
    removed = set(removed_layers(sub))
    for pos, unit in enumerate(structure.units):
        if unit.name not in chosen or unit.unit_width != 1:
            continue
        module = modules.get(unit.name)
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            continue
        weight = module.weight
        groups = int(getattr(module, "groups", 1))
        in_ch = weight.shape[1] * groups
        source = _input_layer(structure, pos, in_ch, removed)
        if source is None or source.name not in chosen:
            continue
        w = weight.detach().abs().reshape(weight.shape[0], weight.shape[1], -1).sum(-1).cpu()
        s_a, s_b = importance[source.name], importance[unit.name]
        act = mean_act.get(source.name)
        source_set = set(chosen[source.name])
        for j in chosen[unit.name]:
            if groups == 1:
                sources = chosen[source.name]
                strengths = [float(w[j, i]) for i in sources]
            elif groups == in_ch and weight.shape[1] == 1:
                c = j * in_ch // weight.shape[0]
                sources = [c] if c in source_set else []
                strengths = [float(w[j, 0])] * len(sources)
            else:
                per = weight.shape[1]
                g = j // (weight.shape[0] // groups)
                sources = [i for i in chosen[source.name] if g * per <= i < (g + 1) * per]
                strengths = [float(w[j, i - g * per]) for i in sources]
            for i, st in zip(sources, strengths):
                value = float(s_a[i]) * float(s_b[j]) * st
                if act is not None:
                    value *= float(act[i])
                if value > 0:
                    graph.add_edge(f"{source.name}.{i}", f"{unit.name}.{j}", weight=value)
    return graph


def _chains_module() -> Any | None:
    try:
        chains = importlib.import_module("captum_chains.chains")
    except ImportError:
        return None
    return chains if hasattr(chains, "chain_graph") else None


def chain_graph_for(
    chain: Any,
    inputs: torch.Tensor | None = None,
    *,
    layers: Sequence[str] | None = None,
    max_filters: int | None = None,
    source: str = "auto",
    keep_logits: bool = True,
) -> Any:
    """The chain's graph, restricted to ``layers`` and the top ``max_filters`` per layer.

    Parameters
    ----------
    chain : Chain or SubNetwork
        The chain.
    inputs : Tensor, optional
        The region (default the chain's).
    layers : sequence of str, optional
        Unit layers to keep (logit nodes are kept too with ``keep_logits``).
    max_filters : int, optional
        Keep the highest-scoring ``max_filters`` nodes of each layer.
    source : {"auto", "chains", "weights"}
        ``"chains"``: :func:`captum_chains.chains.chain_graph` (the sub-network's dataflow
        on the inputs; needs inputs); ``"weights"``: :func:`weight_graph`; ``"auto"``: the
        former when that module and inputs are available.

    Returns
    -------
    networkx.DiGraph
        Nodes with ``layer``, ``index``, ``score`` and ``depth`` attributes (parsed from
        ``"layer.index"`` names if a graph lacks them); edges with ``weight``. The
        graph attribute ``source`` says where it came from.
    """
    if source not in ("auto", "chains", "weights"):
        raise ValueError(f"source must be 'auto', 'chains' or 'weights', got {source!r}")
    sub, x = resolve(chain, inputs)
    chains = _chains_module() if source != "weights" else None
    if source == "chains" and (chains is None or x is None):
        raise ValueError(
            "source='chains' needs the captum_chains.chains module and inputs (the region)"
        )
    if chains is None or x is None:
        graph = weight_graph(chain, inputs, layers=layers, max_filters=max_filters)
        graph.graph["source"] = "weights"
        return graph
    graph = chains.chain_graph(chain, x)
    graph.graph["source"] = "chains"
    order = {u.name: i for i, u in enumerate(sub.structure.units)}
    importance = chain_scores(sub)
    for node, data in graph.nodes(data=True):
        layer, index = data.get("layer"), data.get("index")
        if layer is None or index is None:
            layer, _, idx = str(node).rpartition(".")
            index = int(idx) if idx.isdigit() else None
        data["layer"], data["index"] = layer, index
        if layer in importance and index is not None:
            data.setdefault("score", float(importance[layer][int(index)]))
            data.setdefault("depth", order[layer])
    if layers is None and max_filters is None:
        return graph
    wanted = set(layers) if layers is not None else None
    by_layer: dict[str, list[Any]] = {}
    keep = []
    for node, data in graph.nodes(data=True):
        if data.get("layer") in order:
            if wanted is None or data["layer"] in wanted:
                by_layer.setdefault(data["layer"], []).append(node)
        elif keep_logits and data.get("kind") == "logit":
            keep.append(node)
    for nodes in by_layer.values():
        nodes.sort(key=lambda n: -float(graph.nodes[n].get("score", 0.0)))
        keep.extend(nodes if max_filters is None else nodes[:max_filters])
    sub_graph = graph.subgraph(keep).copy()
    sub_graph.graph.update(graph.graph)
    return sub_graph


def strongest_node_paths(graph: Any, k: int = 5) -> list[tuple[list[str], float]]:
    """The ``k`` strongest paths from the graph's first layer to its deepest layer.

    A path's strength is the product of its edge weights, each divided by the largest
    weight between the same pair of layers; one path per end node, found by dynamic
    programming in depth order. When no end node is reachable from the first layer,
    paths may start anywhere.
    """
    if graph.number_of_nodes() == 0 or k < 1:
        return []
    depth = {n: graph.nodes[n].get("depth", 0) for n in graph.nodes}
    pair_max: dict[tuple[Any, Any], float] = {}
    for u, v, d in graph.edges(data=True):
        key = (graph.nodes[u].get("layer"), graph.nodes[v].get("layer"))
        pair_max[key] = max(pair_max.get(key, 0.0), float(d.get("weight", 1.0)))
    nodes = sorted(graph.nodes, key=lambda n: (depth[n], str(n)))
    first, last = depth[nodes[0]], max(depth.values())
    ends = [n for n in nodes if depth[n] == last]
    for anywhere in (False, True):
        best: dict[Any, float] = {}
        back: dict[Any, Any] = {}
        for v in nodes:
            options = []
            for u in graph.predecessors(v):
                if u not in best:
                    continue
                key = (graph.nodes[u].get("layer"), graph.nodes[v].get("layer"))
                w = float(graph.edges[u, v].get("weight", 1.0)) / max(pair_max[key], 1e-30)
                options.append((best[u] + math.log(max(w, 1e-30)), u))
            if options:
                best[v], back[v] = max(options, key=lambda t: t[0])
            elif depth[v] == first or (anywhere and graph.in_degree(v) == 0):
                best[v] = 0.0
        reached = sorted((n for n in ends if n in back), key=lambda n: -best[n])
        if reached:
            break
    paths = []
    for end in reached[:k]:
        path, node = [end], end
        while node in back:
            node = back[node]
            path.append(node)
        paths.append((path[::-1], float(math.exp(best[end]))))
    return paths


def plot_chain(
    chain: Any,
    inputs: torch.Tensor | None = None,
    *,
    layers: Sequence[str] | None = None,
    max_layers: int = 14,
    max_filters: int = 8,
    paths: int = 5,
    max_edges: int = 600,
    source: str = "auto",
    cmap: str = "viridis",
    column_width: float = 0.85,
) -> Figure:
    """Draw the chain's filter -> filter graph layer by layer, strongest paths highlighted.

    Parameters
    ----------
    chain : Chain or SubNetwork
        The chain.
    inputs : Tensor, optional
        Inputs for activation-weighted edges (default the chain's region).
    layers : sequence of str, optional
        Layers to draw; default the deepest ``max_layers`` layers with kept filters.
    max_layers, max_filters : int
        Columns, and nodes per column: the filters on the strongest paths, then the
        highest-scoring other kept filters.
    paths : int
        Strongest paths to highlight (red).
    max_edges : int
        At most this many of the strongest other edges are drawn (grey, width ~ the edge's
        ``fraction`` of its target's incoming flow when the graph has it, else ~ weight).
    source : {"auto", "chains", "weights"}
        Where the graph comes from (see :func:`chain_graph_for`). With the chains module,
        the red paths are :func:`captum_chains.chains.strongest_path_list` (input to
        logit, over all layers), clipped to the drawn columns, and a column of target
        logits (red squares) ends the figure.

    Returns
    -------
    Figure
        Nodes as one scatter collection (one mark per drawn filter), edges as line
        collections.
    """
    sub, _ = resolve(chain, inputs)
    kept_units = _kept_units(sub)
    if layers is None:
        names = [u.name for u in kept_units][-max_layers:]
    else:
        known = {u.name for u in kept_units}
        missing = [n for n in layers if n not in known]
        if missing:
            raise ValueError(f"layers {missing} have no kept filter (or do not exist)")
        names = list(layers)[:max_layers]
    if not names:
        raise ValueError("the chain keeps no filter; there is no graph to draw")
    chains = _chains_module() if source != "weights" else None
    if chains is not None and source != "weights" and resolve(chain, inputs)[1] is not None:
        # paths are the chains module's input-to-logit paths over the whole graph
        full = chain_graph_for(chain, inputs, source="chains")
        found = chains.strongest_path_list(full, paths) if paths > 0 else []
    else:
        full = chain_graph_for(chain, inputs, layers=names, source="weights")
        found = strongest_node_paths(full, paths)
    logits = [n for n, d in full.nodes(data=True) if d.get("kind") == "logit"]
    columns = names + (["logits"] if logits else [])
    drawn_layers = set(columns)
    best: list[tuple[list[Any], float]] = []
    for path, strength in found:
        clipped = [n for n in path if full.nodes[n].get("layer") in drawn_layers]
        if len(clipped) > 1 and all(clipped != p for p, _ in best):
            best.append((clipped, strength))
    path_nodes = {n for p, _ in best for n in p}
    keep_nodes = []
    for name in columns:
        nodes = [n for n, d in full.nodes(data=True) if d.get("layer") == name]
        nodes.sort(key=lambda n: (n not in path_nodes, -float(full.nodes[n].get("score", 0.0))))
        keep_nodes.extend(nodes[: max(max_filters, sum(n in path_nodes for n in nodes))])
    graph = full.subgraph(keep_nodes).copy()
    col = {n: i for i, n in enumerate(columns)}
    pos: dict[Any, tuple[float, float]] = {}
    rows = 1
    for name in columns:
        nodes = [n for n in graph.nodes if graph.nodes[n].get("layer") == name]
        nodes.sort(key=lambda n: -float(graph.nodes[n].get("score", 0.0)))
        rows = max(rows, len(nodes))
        for r, n in enumerate(nodes):
            pos[n] = (col[name], (len(nodes) - 1) / 2 - r)
    on_path = {(p[i], p[i + 1]) for p, _ in best for i in range(len(p) - 1)}
    on_path = {e for e in on_path if graph.has_edge(*e)}

    fig = new_figure(len(columns) * column_width + 2.2, rows * 0.42 + 2.6)
    ax = fig.add_subplot(1, 1, 1)

    def edge_strength(d: dict[str, Any]) -> float:
        return float(d.get("fraction", d.get("weight", 1.0)))

    edges = sorted(graph.edges(data=True), key=lambda e: -edge_strength(e[2]))
    others = [e for e in edges if (e[0], e[1]) not in on_path][:max_edges]
    if others:
        wmax = max(max(edge_strength(d) for _, _, d in others), 1e-30)
        segs = [[pos[u], pos[v]] for u, v, _ in others]
        widths = [0.3 + 1.7 * edge_strength(d) / wmax for _, _, d in others]
        ax.add_collection(
            LineCollection(segs, linewidths=widths, colors="#8c8c8c", alpha=0.45, zorder=1)
        )
    if on_path:
        segs = [[pos[u], pos[v]] for u, v in on_path]
        ax.add_collection(LineCollection(segs, linewidths=2.4, colors="#d62728", zorder=2))
    nodes = [n for n in pos if graph.nodes[n].get("kind") != "logit"]
    logit_nodes = [n for n in pos if graph.nodes[n].get("kind") == "logit"]
    if logit_nodes:
        ax.plot(
            [pos[n][0] for n in logit_nodes],
            [pos[n][1] for n in logit_nodes],
            "s",
            ms=10,
            mfc="white",
            mec="#d62728",
            zorder=3,
        )
    scores = np.array([float(graph.nodes[n].get("score", 0.0)) for n in nodes])
    norm = Normalize(0.0, max(float(scores.max()) if len(scores) else 1.0, 1e-6))
    sc = ax.scatter(
        [pos[n][0] for n in nodes],
        [pos[n][1] for n in nodes],
        c=scores,
        cmap=colormaps[cmap],
        norm=norm,
        s=70,
        edgecolors="black",
        linewidths=0.5,
        zorder=3,
    )
    for n in nodes + logit_nodes:
        d = graph.nodes[n]
        ax.annotate(
            str(d.get("label", n)).removeprefix("logit.")
            if d.get("kind") == "logit"
            else str(d.get("index")),
            pos[n],
            xytext=(0, 6.5),
            textcoords="offset points",
            ha="center",
            fontsize=6,
            color="#d62728" if n in path_nodes else "#333333",
            zorder=4,
            bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75},
        )
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels([short_name(n, 30) for n in columns], rotation=55, ha="right", fontsize=7)
    ax.set_yticks([])
    ax.set_xlim(-0.6, len(columns) - 0.4)
    ax.set_ylim(-rows / 2 - 0.3, rows / 2 + 0.3)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    cbar = fig.colorbar(sc, ax=ax, fraction=0.03, pad=0.01)
    cbar.set_label("score", fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    top = " → ".join(str(graph.nodes[n].get("label", n)) for n in best[0][0][-3:]) if best else ""
    how = "dataflow on the region" if full.graph.get("source") == "chains" else "scores × weights"
    fig.suptitle(
        f"Chain graph ({len(names)} layers, edges from {how}; per layer up to {max_filters} "
        f"filters: those on the paths, then the top-scoring); red: the {len(best)} strongest "
        "paths" + (f"\nstrongest path ends … {top}" if top else ""),
        fontsize=9,
    )
    fig.tight_layout()
    return fig
