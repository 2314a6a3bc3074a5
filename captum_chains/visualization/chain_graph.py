"""The chain's filter -> filter graph drawn layer by layer (Fig. 4 of NeuroChains).

The graph is :func:`captum_chains.chains.chain_graph`, the sub-network's dataflow on
the region; the highlighted paths are :func:`captum_chains.chains.strongest_path_list`.
With ``source="weights"`` the same graph is read through its ``weight_sum`` edge
attribute (scores times summed weights, no activations), as the earlier weights-only
figure did. Exports :func:`plot_chain` and :func:`chain_graph_for`;
:func:`weight_graph` and :func:`strongest_node_paths` are deprecated aliases.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from captum_chains.visualization._common import (
    chain_kept,
    chain_scores,
    new_figure,
    resolve,
    short_name,
)

SOURCES = ("auto", "chains", "weights")


def _kept_units(sub: Any) -> list[Any]:
    kept = chain_kept(sub)
    return [u for u in sub.structure.units if bool(kept[u.name].any())]


def _example_inputs(sub: Any) -> torch.Tensor:
    """Two seeded random inputs of the structure's recorded input shape (as the export)."""
    shape = sub.structure.input_shape
    if not shape:
        raise ValueError(
            "the chain graph needs inputs: pass inputs=... (the SubNetwork's structure does "
            "not record an input shape to draw random ones from)"
        )
    device = next((p.device for p in sub.model.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, *shape, generator=gen).to(device)


def _weights_view(graph: Any) -> Any:
    """The unit -> unit edges of a chain graph with ``weight`` set to their ``weight_sum``.

    ``weight_sum(A.i -> B.j) = s_i s_j sum_k |W^B_{j,i,k}|`` (scores and weights only); logit
    nodes and edges without one (through a mixing layer) are left out.
    """
    import networkx as nx

    view = nx.DiGraph(**graph.graph)
    view.add_nodes_from((n, d) for n, d in graph.nodes(data=True) if d.get("kind") != "logit")
    view.add_edges_from(
        (u, v, {"weight": d["weight_sum"], "flow": d["weight"]})
        for u, v, d in graph.edges(data=True)
        if d.get("weight_sum", 0.0) > 0 and u in view and v in view
    )
    return view


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
        ``"chains"``: :func:`captum_chains.chains.chain_graph` (needs inputs);
        ``"weights"``: the same graph on the inputs (two seeded random inputs of the
        structure's input shape when none are known) with ``weight`` set to each edge's
        ``weight_sum`` and no logit nodes; ``"auto"``: ``"chains"`` when inputs are
        known, else ``"weights"``.
    keep_logits : bool
        Keep the logit nodes when restricting to ``layers``.

    Returns
    -------
    networkx.DiGraph
        Nodes with ``layer``, ``index``, ``score`` and ``depth`` attributes (parsed from
        ``"layer.index"`` names if a graph lacks them); edges with ``weight``. The
        graph attribute ``source`` says which reading it is.
    """
    # imported when called: the chain graph needs the export's channel analysis
    from captum_chains.chains import chain_graph

    if source not in SOURCES:
        raise ValueError(f"source must be 'auto', 'chains' or 'weights', got {source!r}")
    sub, x = resolve(chain, inputs)
    if source == "chains" and x is None:
        raise ValueError("source='chains' needs inputs (the region): pass inputs=...")
    if source == "weights" or x is None:
        region = _example_inputs(sub) if x is None else x
        graph = _weights_view(chain_graph(sub, region, edges="all"))
        graph.graph["source"] = "weights"
    else:
        graph = chain_graph(chain, x)
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


def weight_graph(
    chain: Any,
    inputs: torch.Tensor | None = None,
    *,
    layers: Sequence[str] | None = None,
    max_filters: int | None = None,
) -> Any:
    """Deprecated: ``chain_graph_for(chain, inputs, source="weights", ...)``.

    The chain graph read through its ``weight_sum`` edges: ``weight`` of ``A.i -> B.j``
    is ``s_i s_j sum_k |W^B_{j,i,k}|``; no logit nodes.
    """
    warnings.warn(
        "weight_graph is deprecated; use chain_graph_for(chain, source='weights') or the "
        "'weight_sum' edge attribute of captum_chains.chains.chain_graph",
        DeprecationWarning,
        stacklevel=2,
    )
    return chain_graph_for(chain, inputs, layers=layers, max_filters=max_filters, source="weights")


def strongest_node_paths(graph: Any, k: int = 5) -> list[tuple[list[str], float]]:
    """Deprecated: ``captum_chains.chains.strongest_path_list(graph, k, strength="layer")``.

    Paths ranked by the product of their edge weights, each divided by the largest weight
    between the same two layers.
    """
    from captum_chains.chains import strongest_path_list

    warnings.warn(
        "strongest_node_paths is deprecated; use "
        "captum_chains.chains.strongest_path_list(graph, k, strength='layer')",
        DeprecationWarning,
        stacklevel=2,
    )
    return strongest_path_list(graph, k, strength="layer") if k >= 1 else []


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
        The region (default the chain's).
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
        How the graph is read (see :func:`chain_graph_for`). With ``"chains"`` the red
        paths are :func:`captum_chains.chains.strongest_path_list` (input to logit, over
        all layers), clipped to the drawn columns, and a column of target logits (red
        squares) ends the figure; with ``"weights"`` they are its ``strength="layer"``
        paths through the drawn columns.

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
    from captum_chains.chains import strongest_path_list

    if source != "weights" and resolve(chain, inputs)[1] is not None:
        # input-to-logit paths over the whole graph, clipped to the drawn columns
        full = chain_graph_for(chain, inputs, source="chains")
        found = strongest_path_list(full, paths) if paths > 0 else []
    else:
        full = chain_graph_for(chain, inputs, layers=names, source="weights")
        found = strongest_path_list(full, paths, strength="layer") if paths > 0 else []
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
