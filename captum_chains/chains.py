r"""Filter -> filter chains of a NeuroChains sub-network as a weighted graph.

The NeuroChains paper (Wang, Zhou and Bilmes, TMLR 2022, Sec. 5) reads a chain as
paths of kept filters, e.g. ``L1B1SC.177 -> L2B1SC.75 -> L3B1C3.818``. This module
computes those paths from the sub-network's own dataflow on the region's inputs.

Graph
-----
Nodes are the kept units (``layer.index``, e.g. ``layer3.0.conv3.683``) and the logits
of the target classes (``logit.t``). Unit ``A`` *feeds* unit layer ``B`` when the
tensor that ``B``'s convolution (or linear layer) reads carries ``A``'s output channels
through operations that keep channels apart (activations, normalization, pooling,
residual additions, squeeze-excitation products, reshapes); removed blocks are the
identity. The edge ``A.c -> B.j`` has weight

.. math::

    w(A.c \to B.j) = s^B_j \; \rho_A(c) \;
        \mathbb{E}_{x \in R,\, p}\big|\,(W^B_{j,c} \star X^B_c(x))(p)\,\big|,

the mean absolute part of ``B.j``'s response (its convolution output before
normalization, at every position ``p`` and region input ``x``) that flows through input
channel ``c``, times ``B.j``'s score. ``X^B`` is the input of ``B`` in the sub-network.
By linearity this equals the change of ``B.j``'s response when channel ``c`` is zeroed.
When several kept layers write channel ``c`` into a residual stream, the flow is split
between them in proportion to their mean absolute outputs at their score sites,
``\rho_A(c) = E|Y^A_c| / \sum_{A'} E|Y^{A'}_c|`` (``\rho = 1`` for a single writer).

The last kept layers feed the logits through the classifier head. Their edge weight is
the mean absolute change of logit ``t`` when channel ``c`` of the head's input is zeroed
(again times ``\rho``); for a linear head this is exactly ``E|W_{t,c} X_c|``.

Paths
-----
:func:`strongest_paths` ranks input-to-output paths by the product of edge
*fractions* ``w(i -> j) / sum_i' w(i' -> j)``: the share of each node's incoming flow
that the path carries.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx

from captum_chains._utils.validation import format_inputs
from captum_chains.export import rules_layers as _rules_layers  # noqa: F401  (registers rules)
from captum_chains.export.analysis import Analysis
from captum_chains.export.api import load_extensions
from captum_chains.export.build import shallow_clone
from captum_chains.export.rules_layers import ChannelNormRule, ConvRule, LinearRule
from captum_chains.export.rules_ops import SPECIAL, BinaryRule, CatRule, PerChannelRule, ScaleRule
from captum_chains.export.tracing import apply_subnetwork, trace, working_copy

FORMULA = (
    "w(A.c -> B.j) = s_j * rho_A(c) * mean_{x,p} |(W_{j,c} * X_c)(p)|; "
    "logits: mean_x |logit_t(X) - logit_t(X without channel c)| * rho_A(c)"
)
_ALIGNED_RULES = (PerChannelRule, BinaryRule, CatRule, ScaleRule, ChannelNormRule)


# --------------------------------------------------------------------------- graph
def chain_graph(
    chain: Any,
    inputs: torch.Tensor | None = None,
    *,
    target: int | Sequence[int] | None = None,
    max_in_edges: int | None = None,
    class_names: Sequence[str] | None = None,
) -> Any:
    """The filter -> filter graph of a chain on its region (see the module docstring).

    Parameters
    ----------
    chain : Chain or SubNetwork
        The chain (its ``inputs`` are used when ``inputs`` is None).
    inputs : Tensor, optional
        The region's inputs ``[N, ...]``.
    target : int or sequence of int, optional
        Classes whose logits end the chains; default the class the sub-network predicts
        on the region (highest mean probability).
    max_in_edges : int, optional
        Keep only this many strongest incoming edges per node (fractions are computed
        before pruning).
    class_names : sequence of str, optional
        Names for the logit nodes' labels.

    Returns
    -------
    networkx.DiGraph
        Nodes ``"layer.index"`` and ``"logit.t"`` with ``layer``, ``index``, ``score``,
        ``label``, ``depth``, ``kind``; edges with ``weight`` and ``fraction``.
    """
    import networkx as nx

    sub, items = _resolve(chain, inputs)
    flows = _Flows(sub, items)
    classes = flows.targets(target)
    graph = nx.DiGraph(formula=FORMULA, targets=",".join(map(str, classes)))
    units = sub.structure.units
    for depth, unit in enumerate(units):
        if unit.name not in flows.site:
            continue
        s = flows.scores[unit.name]
        for i in torch.nonzero(s > 0).flatten().tolist():
            graph.add_node(
                unit.label(i),
                layer=unit.name,
                index=i,
                score=float(s[i]),
                label=unit.label(i),
                depth=depth,
                kind=unit.kind,
                magnitude=float(flows.site_mag[unit.name][i]),
                input_layer=unit.name in flows.input_layers,
            )
    probs = flows.probabilities
    for t in classes:
        name = class_names[t] if class_names is not None else str(t)
        graph.add_node(
            f"logit.{t}",
            layer="logits",
            index=t,
            score=float(probs[t]),
            label=f"logit.{name}",
            depth=len(units),
            kind="logit",
            magnitude=float(flows.logit_mean[t]),
            input_layer=False,
        )
    for (a, c), (b, j), w in flows.edges(classes):
        src = units_label(a, c)
        dst = f"logit.{j}" if b == "logits" else units_label(b, j)
        if w > 0 and src in graph and dst in graph:
            graph.add_edge(src, dst, weight=float(w))
    _fractions(graph, max_in_edges)
    return graph


def units_label(layer: str, index: int) -> str:
    """Paper-style label of unit ``index`` of ``layer`` (``layer3.0.conv3.683``)."""
    return f"{layer}.{index}"


def _resolve(chain: Any, inputs: torch.Tensor | None) -> tuple[Any, tuple[torch.Tensor, ...]]:
    from captum_chains.subnetwork import SubNetwork

    sub = chain if isinstance(chain, SubNetwork) else getattr(chain, "subnetwork", None)
    if not isinstance(sub, SubNetwork):
        raise TypeError(f"expected a Chain or SubNetwork, got {type(chain).__name__}")
    if inputs is None:
        inputs = getattr(chain, "inputs", None)
    if inputs is None:
        raise ValueError(
            "the chain graph needs the region's inputs: pass inputs=... (the chain did not "
            "store them; extract with keep_inputs=True)"
        )
    return sub, format_inputs(inputs)


def _fractions(graph: Any, max_in_edges: int | None) -> None:
    for node in list(graph.nodes):
        preds = list(graph.in_edges(node, data=True))
        total = sum(d["weight"] for _, _, d in preds)
        for _, _, d in preds:
            d["fraction"] = d["weight"] / total if total > 0 else 0.0
        if max_in_edges is not None and len(preds) > max_in_edges:
            preds.sort(key=lambda e: -e[2]["weight"])
            graph.remove_edges_from([(u, v) for u, v, _ in preds[max_in_edges:]])


class _Flows:
    """Runs the sub-network once on the region and measures the flows of the formula."""

    def __init__(self, sub: Any, inputs: tuple[torch.Tensor, ...]) -> None:
        structure = sub.structure
        device = next((p.device for p in sub.model.parameters()), torch.device("cpu"))
        inputs = tuple(t.to(device) for t in inputs)
        load_extensions()
        work = working_copy(sub.model)
        gm, tracer = trace(work)
        scores = {
            n: sub.scores[a:b].detach().to(device) for n, (a, b) in structure.offsets().items()
        }
        closed = [g for g, o in zip(structure.gates, sub.gates_open.tolist()) if not o]
        self.site = apply_subnetwork(gm, tracer, structure.units, scores, closed, always=True)
        self.scores = {n: s.cpu() for n, s in scores.items()}
        self.a = Analysis(gm, tuple(t[:2] for t in inputs), SPECIAL)
        self.gm = gm
        self.units = {u.name: u for u in structure.units}
        self._origins()
        self._run(inputs)

    # ------------------------------------------------------------------ dataflow
    def _origins(self) -> None:
        a = self.a
        unit_of_site = {node: name for name, node in self.site.items()}
        self.producer = {
            str(n.target): n
            for n in a.nodes
            if n.op == "call_module" and str(n.target) in self.site
        }
        producers = set(self.producer.values())
        self.mixed_in: dict[str, frozenset[str]] = {}
        aligned: dict[fx.Node, frozenset[str]] = {}
        mixed: dict[fx.Node, frozenset[str]] = {}
        for node in a.nodes:
            ins = node.all_input_nodes
            all_in = (
                frozenset().union(*(aligned[i] | mixed[i] for i in ins)) if ins else frozenset()
            )
            if node in unit_of_site:
                aligned[node], mixed[node] = frozenset({unit_of_site[node]}), frozenset()
            elif node in producers:
                aligned[node], mixed[node] = frozenset(), frozenset()
            elif a.info.get(node) is not None and isinstance(a.rule[node], _ALIGNED_RULES):
                chan = [i for i in ins if a.has_channels(i)]
                aligned[node] = frozenset().union(*(aligned[i] for i in chan))
                mixed[node] = frozenset().union(*(mixed[i] for i in ins))
            else:
                aligned[node], mixed[node] = frozenset(), all_in
        self.aligned = aligned
        self.input_layers = {
            name
            for name, node in self.producer.items()
            if isinstance(node.args[0], fx.Node)
            and not (aligned[node.args[0]] | mixed[node.args[0]])
        }
        reach: dict[fx.Node, bool] = {}
        for node in reversed(a.nodes):
            reach[node] = node.op == "output" or any(
                reach[u] for u in node.users if u not in producers
            )
        self.heads = [
            n
            for n in a.nodes
            if n not in producers
            and reach[n]
            and n.op in ("call_module", "call_function", "call_method")
            and not (a.info.get(n) is not None and isinstance(a.rule[n], _ALIGNED_RULES))
            and n.args
            and isinstance(n.args[0], fx.Node)
            and aligned[n.args[0]]
            and a.has_channels(n.args[0])
        ]

    # ------------------------------------------------------------------ measuring
    def _run(self, inputs: tuple[torch.Tensor, ...]) -> None:
        a = self.a
        self.site_mag: dict[str, torch.Tensor] = {}
        self.flow: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.head_inputs: dict[fx.Node, torch.Tensor] = {}
        tails = {h: _descendants(h) for h in self.heads}
        external = {
            i for h, tail in tails.items() for n in tail for i in n.all_input_nodes if i not in tail
        }
        self.external: dict[fx.Node, Any] = {}
        unit_of_site = {node: name for name, node in self.site.items()}
        producer_unit = {node: name for name, node in self.producer.items()}
        flows = self

        class Recorder(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                if n in producer_unit:
                    flows._measure(producer_unit[n], n, self.env[n.args[0]])  # type: ignore[index]
                if n in tails:
                    flows.head_inputs[n] = self.env[n.args[0]]  # type: ignore[index]
                out = super().run_node(n)
                if n in unit_of_site:
                    info = a.info[n]
                    dim = info.dim if info is not None else 1
                    flows.site_mag[unit_of_site[n]] = _channel_mean_abs(out, dim)
                if n in external:
                    flows.external[n] = out
                return out

        with torch.no_grad():
            self.recorder = Recorder(self.gm)
            logits = self.recorder.run(*inputs)
        self.logits = logits
        self.probabilities = torch.softmax(logits.float(), -1).mean(0).cpu()
        self.logit_mean = logits.float().mean(0).cpu()
        self.tails = tails

    def _live(self, upstream: frozenset[str], size: int) -> torch.Tensor:
        live = torch.zeros(size, dtype=torch.bool)
        for u in upstream:
            s = self.scores[u]
            if s.shape[0] == size:
                live |= s > 0
        return live

    def _measure(self, unit: str, node: fx.Node, x: torch.Tensor) -> None:
        """Flow matrix ``F[j, c]`` of unit ``unit`` for kept ``j`` and live input ``c``."""
        upstream = self.aligned[node.args[0]]  # type: ignore[index]
        rule = self.a.rule[node]
        info = self.a.info.get(node.args[0])  # type: ignore[arg-type]
        kept = torch.nonzero(self.scores[unit] > 0).flatten()
        if (
            not upstream
            or info is None
            or not isinstance(rule, (ConvRule, LinearRule))
            or not len(kept)
        ):
            return
        live = torch.nonzero(self._live(upstream, info.size)).flatten()
        if not len(live):
            return
        module = self.a.module(node)
        flow = torch.zeros(len(kept), len(live))
        with torch.no_grad():
            if isinstance(rule, LinearRule):
                w = module.weight.detach()[kept].view(len(kept), info.size, info.width)
                xs = x.reshape(-1, info.size, info.width).float()
                for k, c in enumerate(live.tolist()):
                    contrib = xs[:, c, :] @ w[:, c, :].float().T  # [M, kept]
                    flow[:, k] = contrib.abs().mean(0).cpu()
            else:
                flow = _conv_flows(module, x, kept, live)
        scale = self.scores[unit][kept].view(-1, 1)
        self.flow[unit] = (kept, live, flow * scale)

    def targets(self, target: int | Sequence[int] | None) -> list[int]:
        """The classes whose logits end the chains."""
        if target is None:
            return [int(self.probabilities.argmax())]
        if isinstance(target, int):
            return [target]
        return [int(t) for t in target]

    def _head_flows(
        self, classes: list[int]
    ) -> list[tuple[frozenset[str], torch.Tensor, torch.Tensor, int]]:
        """Per head: upstream units, live channels, ``D[c, t]`` (mean |change of logit
        t|) and the number of channels."""
        out = []
        for head, tail in self.tails.items():
            x_node = head.args[0]
            info = self.a.info[x_node]  # type: ignore[index]
            assert info is not None
            upstream = self.aligned[x_node]  # type: ignore[index]
            live = torch.nonzero(self._live(upstream, info.size)).flatten()
            x = self.head_inputs[head]
            base = self._tail(head, tail, x)[:, classes]
            deltas = torch.zeros(len(live), len(classes))
            for k, c in enumerate(live.tolist()):
                occluded = x.clone()
                occluded.narrow(info.dim, c * info.width, info.width).zero_()
                changed = self._tail(head, tail, occluded)[:, classes]
                deltas[k] = (changed - base).abs().float().mean(0).cpu()
            out.append((upstream, live, deltas, info.size))
        return out

    def _tail(self, head: fx.Node, tail: list[fx.Node], x: torch.Tensor) -> torch.Tensor:
        interp = self.recorder
        saved = interp.env
        interp.env = dict(self.external)
        interp.env[head.args[0]] = x  # type: ignore[index]
        try:
            with torch.no_grad():
                for n in tail:
                    if n.op == "output":
                        return fx.node.map_arg(n.args[0], lambda v: interp.env[v])  # type: ignore[return-value]
                    interp.env[n] = interp.run_node(n)
        finally:
            interp.env = saved
        raise RuntimeError("the head does not reach the output")

    def _share(self, upstream: frozenset[str], c: int, size: int) -> dict[str, float]:
        writers = [u for u in upstream if self.scores[u].shape[0] == size and self.scores[u][c] > 0]
        mags = {u: float(self.site_mag[u][c]) for u in writers}
        total = sum(mags.values())
        if total <= 0:
            return {u: 1.0 / len(writers) for u in writers}
        return {u: m / total for u, m in mags.items()}

    def edges(self, classes: list[int]) -> list[tuple[tuple[str, int], tuple[str, int], float]]:
        """All ``((A, c), (B, j), weight)`` edges, ``B == "logits"`` for logit edges."""
        out = []
        for unit, (kept, live, flow) in self.flow.items():
            node = self.producer[unit]
            upstream = self.aligned[node.args[0]]  # type: ignore[index]
            size = self.a.info[node.args[0]].size  # type: ignore[index, union-attr]
            for k, c in enumerate(live.tolist()):
                for writer, share in self._share(upstream, c, size).items():
                    for m, j in enumerate(kept.tolist()):
                        out.append(((writer, c), (unit, j), float(flow[m, k]) * share))
        for upstream, live, deltas, size in self._head_flows(classes):
            for k, c in enumerate(live.tolist()):
                for writer, share in self._share(upstream, c, size).items():
                    for m, t in enumerate(classes):
                        out.append(((writer, c), ("logits", t), float(deltas[k, m]) * share))
        return out


def _descendants(node: fx.Node) -> list[fx.Node]:
    seen = {node}
    order = []
    for n in node.graph.nodes:
        if n is node or any(i in seen for i in n.all_input_nodes):
            seen.add(n)
            order.append(n)
    return order


def _channel_mean_abs(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.detach().abs().float().movedim(dim, 0).reshape(t.shape[dim], -1).mean(1).cpu()


def _conv_flows(
    module: Any, x: torch.Tensor, kept: torch.Tensor, live: torch.Tensor
) -> torch.Tensor:
    """``F[j, c] = mean |W_{j,c} * X_c|`` of a (grouped) convolution, input by input."""
    g = module.groups
    in_pg, out_pg = module.in_channels // g, module.out_channels // g
    flow = torch.zeros(len(kept), len(live))
    weight = module.weight.detach()
    padding = module.padding
    no_pad = padding in ("same", "valid") or all(p == 0 for p in padding)
    pointwise = no_pad and all(k == 1 for k in module.kernel_size)
    pointwise = pointwise and all(s == 1 for s in module.stride)
    for k, c in enumerate(live.tolist()):
        group = c // in_pg
        rows = [m for m, j in enumerate(kept.tolist()) if j // out_pg == group]
        if not rows:
            continue
        w = weight[kept[rows], c % in_pg]  # [rows, *kernel]
        xc = x.narrow(1, c, 1)
        if pointwise:
            mean_abs = xc.abs().float().mean()
            flow[rows, k] = (w.reshape(len(rows)).abs().float() * mean_abs).cpu()
            continue
        probe = shallow_clone(module)
        probe.weight = torch.nn.Parameter(w.unsqueeze(1), requires_grad=False)
        probe.bias = None
        probe.in_channels, probe.out_channels, probe.groups = 1, len(rows), 1
        flow[rows, k] = probe(xc).abs().float().mean((0, *range(2, xc.ndim))).cpu()
    return flow


# --------------------------------------------------------------------------- paths
def strongest_paths(graph: Any, k: int = 5, *, with_strength: bool = False) -> list[str]:
    """The ``k`` strongest input-to-output chains, as ``"a → b → c"`` strings.

    A path runs from a filter of a layer that reads the model's input (or, if none is
    kept, from any node without predecessors) to a logit node (without logit nodes: to
    a node without successors). Its strength is the product of the edge ``fraction``
    attributes along it: the share of the end node's incoming flow that the path
    carries, when every node's incoming fractions sum to one.
    """
    return [
        " → ".join(graph.nodes[n].get("label", str(n)) for n in path)
        + (f"  ({strength:.3g})" if with_strength else "")
        for path, strength in strongest_path_list(graph, k)
    ]


def strongest_path_list(graph: Any, k: int = 5) -> list[tuple[list[str], float]]:
    """The ``k`` strongest paths as (node list, strength), strongest first."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if graph.number_of_nodes() == 0:
        return []
    logits = [n for n, d in graph.nodes(data=True) if d.get("kind") == "logit"]
    sinks = set(logits) if logits else {n for n in graph if graph.out_degree(n) == 0}
    roots = [n for n in graph if graph.in_degree(n) == 0]
    inputs = [n for n in roots if graph.nodes[n].get("input_layer")]
    found = _k_best(graph, set(inputs), sinks, k) if inputs else []
    if not found:  # no kept chain starts at the input: start anywhere
        found = _k_best(graph, set(roots), sinks, k)
    out: list[tuple[list[str], float]] = []
    for strength, link in found:
        path = []
        while link is not None:
            path.append(link[0])
            link = link[1]
        out.append((path[::-1], strength))
    return out


def _k_best(graph: Any, sources: set, sinks: set, k: int) -> list[tuple[float, tuple]]:
    """k largest products of edge fractions from ``sources`` to ``sinks`` (DP over a DAG)."""
    import networkx as nx

    best: dict[Any, list[tuple[float, tuple]]] = {}
    for v in nx.topological_sort(graph):
        preds = list(graph.predecessors(v))
        if not preds:
            best[v] = [(1.0, (v, None))] if v in sources else []
            continue
        cands = []
        for u in preds:
            f = float(graph.edges[u, v].get("fraction", graph.edges[u, v].get("weight", 1.0)))
            for s, link in best.get(u, []):
                cands.append((s * f, (v, link)))
        best[v] = heapq.nlargest(k, cands, key=lambda e: e[0])
    found = [entry for v in sinks if graph.in_degree(v) > 0 for entry in best.get(v, [])]
    return heapq.nlargest(k, found, key=lambda e: e[0])


# --------------------------------------------------------------------------- files
def write_graphml(graph: Any, path: str | Path) -> None:
    """Write the chain graph to a GraphML file (readable by Gephi, yEd, networkx)."""
    import networkx as nx

    nx.write_graphml(graph, str(path))


def to_dot(graph: Any, *, min_fraction: float = 0.0) -> str:
    """The chain graph in Graphviz DOT, one rank per layer, pen width by edge fraction."""
    lines = ["digraph chain {", "  rankdir=LR;", "  node [shape=box, fontsize=10];"]
    by_depth: dict[int, list[Any]] = {}
    for n, d in graph.nodes(data=True):
        by_depth.setdefault(int(d.get("depth", 0)), []).append(n)
    for depth in sorted(by_depth):
        names = " ".join(_dot_id(n) for n in by_depth[depth])
        lines.append(f"  {{ rank=same; {names} }}")
    for n, d in graph.nodes(data=True):
        label = str(d.get("label", n)).replace('"', "'")
        lines.append(f'  {_dot_id(n)} [label="{label}\\nscore={float(d.get("score", 0.0)):.3g}"];')
    for u, v, d in graph.edges(data=True):
        frac = float(d.get("fraction", 0.0))
        if frac < min_fraction:
            continue
        width = 0.5 + 4.0 * frac
        lines.append(
            f"  {_dot_id(u)} -> {_dot_id(v)} [weight={float(d.get('weight', 0.0)):.6g}, "
            f'penwidth={width:.2f}, label="{frac:.2f}"];'
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_dot(graph: Any, path: str | Path, *, min_fraction: float = 0.0) -> None:
    """Write :func:`to_dot` to ``path``."""
    Path(path).write_text(to_dot(graph, min_fraction=min_fraction))


def _dot_id(name: Any) -> str:
    return '"' + str(name).replace('"', "'") + '"'


__all__ = [
    "FORMULA",
    "chain_graph",
    "strongest_path_list",
    "strongest_paths",
    "to_dot",
    "units_label",
    "write_dot",
    "write_graphml",
]
