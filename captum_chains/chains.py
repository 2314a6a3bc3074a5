"""Filter -> filter chains of a NeuroChains sub-network as a weighted graph.

The package's one chain graph (:func:`chain_graph`, ``Chain.graph()``) and one path search
(:func:`strongest_paths`, :func:`strongest_path_list`): nodes are kept units and target
logits, edges the flow of each unit into the next kept layers on the region, measured on
the sub-network's own dataflow recorded from one forward pass
(:mod:`captum_chains.export.recording`; no ``torch.fx`` tracing of the model). The edge
weights, the stream split and the path strengths are defined in ``docs/export.md``
("Chains as a graph").
"""

from __future__ import annotations

import gc
import heapq
import itertools
import math
import operator
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import fx

from captum_chains._utils.validation import format_inputs
from captum_chains.export import rules_layers as _rules_layers  # noqa: F401  (registers rules)
from captum_chains.export.analysis import Analysis
from captum_chains.export.api import load_extensions
from captum_chains.export.build import shallow_clone
from captum_chains.export.recording import record
from captum_chains.export.rules_layers import ChannelNormRule, ConvRule, LinearRule
from captum_chains.export.rules_ops import SPECIAL, BinaryRule, CatRule, PerChannelRule, ScaleRule
from captum_chains.export.tracing import apply_subnetwork, working_copy
from captum_chains.units.head_core import HeadCore

FORMULA = (
    "w(A.c -> B.j) = s_j * rho_A(c) * mean_{x,p} |(W_{j,c} * X_c)(p)|; "
    "through a mixing layer: s_j * rho_A(c) * mean_{x,p} |R_j(X) - R_j(X without A.c)|; "
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
    edges: str = "flow",
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
    edges : {"flow", "all"}
        ``"flow"``: the edges that carry flow on the region (``weight > 0``);
        ``"all"``: also those that link two kept units through a weight but carry no
        flow on the region (a channel that is zero on every input): ``weight`` and
        ``fraction`` 0, ``weight_sum > 0``.

    Returns
    -------
    networkx.DiGraph
        Nodes ``"layer.index"`` and ``"logit.t"`` with ``layer``, ``index``, ``score``,
        ``label``, ``depth``, ``kind``; edges with ``weight`` and ``fraction``.
    """
    import networkx as nx

    if edges not in ("flow", "all"):
        raise ValueError(f"edges must be 'flow' or 'all', got {edges!r}")
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
    src, dst, weight, weight_sum = flows.edge_arrays(classes)
    names = [units_label(u.name, i) for u in units for i in range(u.size)]
    names += [f"logit.{t}" for t in range(len(probs))]
    _add_edges(graph, names, src, dst, weight, weight_sum, max_in_edges, edges == "all")
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


def _add_edges(
    graph: Any,
    names: list[str],
    src: torch.Tensor,
    dst: torch.Tensor,
    weight: torch.Tensor,
    weight_sum: torch.Tensor,
    max_in_edges: int | None,
    unlinked: bool = False,
) -> None:
    """Add the edges ``names[src] -> names[dst]`` with ``weight``, ``fraction`` and
    ``weight_sum``.

    Repeated pairs add up; edges with an end outside the graph, and edges of zero
    weight (unless ``unlinked`` and their ``weight_sum`` is positive), are dropped.
    ``fraction`` is the edge's share of its target's incoming weight (computed before
    ``max_in_edges`` keeps only the strongest incoming edges of each node). The
    adjacency dictionaries are filled directly (one shared data dict per edge, as
    ``add_edge`` would store it): millions of edges take seconds, not minutes.
    """
    in_graph = torch.tensor([n in graph for n in names], dtype=torch.bool)
    if len(src):
        size = len(names)
        key, inverse = torch.unique(src * size + dst, return_inverse=True)
        weight = torch.zeros(len(key), dtype=torch.float64).index_add_(0, inverse, weight)
        weight_sum = torch.zeros(len(key), dtype=torch.float64).index_add_(0, inverse, weight_sum)
        src, dst = key // size, key % size
    keep = ((weight > 0) | (unlinked & (weight_sum > 0))) & in_graph[src] & in_graph[dst]
    src, dst, weight, weight_sum = src[keep], dst[keep], weight[keep], weight_sum[keep]
    total = torch.zeros(len(names), dtype=torch.float64).index_add_(0, dst, weight)
    fraction = torch.where(total[dst] > 0, weight / total[dst], torch.zeros_like(weight))
    if max_in_edges is not None and len(dst):
        order = torch.argsort(-weight, stable=True)
        order = order[torch.argsort(dst[order], stable=True)]
        counts = torch.bincount(dst, minlength=len(names))
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(order)) - starts[dst[order]]
        order = order[rank < max_in_edges]
        src, dst, weight, fraction = src[order], dst[order], weight[order], fraction[order]
        weight_sum = weight_sum[order]
    label = np.array(names, dtype=object)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # millions of small dicts: the cyclic collector would rescan them all
    try:
        data = np.empty(len(weight), dtype=object)
        data[:] = [
            {"weight": w, "fraction": f, "weight_sum": ws}
            for w, f, ws in zip(
                weight.tolist(), fraction.tolist(), weight_sum.tolist(), strict=True
            )
        ]
        for ends, other, adjacency in ((src, dst, graph._succ), (dst, src, graph._pred)):
            if bool((ends[1:] >= ends[:-1]).all()):  # sources come sorted (unless pruned)
                ordered, other_names = data.tolist(), label[other.numpy()].tolist()
            else:
                perm = torch.argsort(ends, stable=True)
                ends = ends[perm]
                ordered = data[perm.numpy()].tolist()
                other_names = label[other[perm].numpy()].tolist()
            nodes, counts = torch.unique_consecutive(ends, return_counts=True)
            start = 0
            for node, stop in zip(label[nodes.numpy()].tolist(), counts.cumsum(0).tolist()):
                adjacency[node].update(zip(other_names[start:stop], ordered[start:stop]))
                start = stop
    finally:
        if gc_was_enabled:
            gc.enable()
    _clear_networkx_cache(graph)


def _clear_networkx_cache(graph: Any) -> None:
    """Drop what networkx cached about ``graph`` (its backend-conversion cache, if any).

    The adjacency was filled directly, past ``add_edge``, which would have cleared it.
    networkx 3.0 keeps no such cache (its views read the dictionaries live) and has no
    ``nx._clear_cache``.
    """
    cache = getattr(graph, "__networkx_cache__", None)
    if cache is not None:
        cache.clear()


def _first_input(node: fx.Node) -> fx.Node:
    """The node of ``node``'s first argument (a layer's input in the traced graph)."""
    first = node.args[0]
    if not isinstance(first, fx.Node):
        raise TypeError(f"{node.name} reads no graph value first (got {type(first).__name__})")
    return first


class _Flows:
    """Runs the sub-network once on the region and measures the flows of the formula."""

    def __init__(self, sub: Any, inputs: tuple[torch.Tensor, ...]) -> None:
        structure = sub.structure
        device = next((p.device for p in sub.model.parameters()), torch.device("cpu"))
        inputs = tuple(t.to(device) for t in inputs)
        load_extensions()
        work = working_copy(sub.model)
        gm, tracer = record(work, inputs)
        scores = {
            n: sub.scores[a:b].detach().to(device) for n, (a, b) in structure.offsets().items()
        }
        closed = [g for g, o in zip(structure.gates, sub.gates_open.tolist()) if not o]
        self.site = apply_subnetwork(gm, tracer, structure.units, scores, closed, always=True)
        self.scores = {n: s.cpu() for n, s in scores.items()}
        self.a = Analysis(gm, inputs, SPECIAL)
        self.gm = gm
        self.units = {u.name: u for u in structure.units}
        self.width = {u.name: u.unit_width for u in structure.units}
        sizes = [u.size for u in structure.units]
        starts = [0, *itertools.accumulate(sizes)]
        self.offset = {u.name: start for u, start in zip(structure.units, starts, strict=False)}
        self.total = starts[-1]
        self._origins()
        self._mixers()
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
        for n in a.nodes:  # heads: the attention module is traced as qkv -> HeadCore -> proj
            owner = str(n.target).rpartition(".")[0]
            if (
                n.op == "call_module"
                and isinstance(a.module(n), HeadCore)
                and owner in self.site
                and self.units[owner].kind == "head"
            ):
                self.producer.setdefault(owner, n)
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
        # heads: the other readers of kept units' channels that reach the output. A
        # reader that only runs after an earlier head with the same input (a descendant
        # of it) is measured by that head's replay already and is not a head itself.
        self.head_input: dict[fx.Node, fx.Node] = {}
        self.heads: list[fx.Node] = []
        replayed: set[tuple[fx.Node, fx.Node]] = set()
        for n in a.nodes:
            if (
                n in producers
                or not reach[n]
                or n.op not in ("call_module", "call_function", "call_method")
                or (a.info.get(n) is not None and isinstance(a.rule[n], _ALIGNED_RULES))
            ):
                continue
            x = next((i for i in n.all_input_nodes if aligned[i] and a.has_channels(i)), None)
            if x is None or (n, x) in replayed:
                continue
            self.heads.append(n)
            self.head_input[n] = x
            replayed |= {(d, x) for d in _descendants(n)}

    def _mixers(self) -> None:
        """Direct paths from a non-unit linear layer to unit layers that read it mixed.

        A head's channels reach the residual stream only through the attention's output
        projection (``proj``), which mixes them; the layers that read the stream (the
        next ``fc1``, the next ``qkv``) then carry no channel of the head. For every such
        *mixer* (a linear or convolution reader of aligned unit channels that is not a
        unit layer), this records the nodes between it and the unit layers it reaches
        without passing another unit's score site (``targets``), so that a unit's flow
        into them can be measured by removing its part of the mixer's input.
        """
        a = self.a
        producers = set(self.producer.values())
        sites = set(self.site.values())
        target_unit = {node: name for name, node in self.producer.items()}
        self.mixer_paths: dict[fx.Node, tuple[list[fx.Node], list[fx.Node]]] = {}
        for head in self.heads:
            if not isinstance(a.rule.get(head), (ConvRule, LinearRule)):
                continue
            upstream = self.aligned[self.head_input[head]]
            inside = {head}
            order = [head]
            targets = []
            for n in a.nodes:
                if n in inside or not any(i in inside for i in n.all_input_nodes):
                    continue
                if n in producers:
                    # a layer that reads the mixer's own units aligned is measured there
                    if target_unit[n] in self.site and not (
                        upstream & self.aligned[_first_input(n)]
                    ):
                        targets.append(n)
                    continue
                if n in sites or n.op == "output":
                    continue  # other units' score sites keep their values: direct flows only
                inside.add(n)
                order.append(n)
            if not targets:
                continue
            needed = set(targets)
            for n in reversed(order):
                if any(u in needed for u in n.users):
                    needed.add(n)
            self.mixer_paths[head] = ([n for n in order if n in needed], targets)

    # ------------------------------------------------------------------ measuring
    def _run(self, inputs: tuple[torch.Tensor, ...]) -> None:
        a = self.a
        self.site_mag: dict[str, torch.Tensor] = {}
        # unit -> (kept j, live input channels c, flow F[j, c], s_j * sum_k |W_{j,c,k}|)
        self.flow: dict[str, tuple[torch.Tensor, ...]] = {}
        self.head_inputs: dict[fx.Node, torch.Tensor] = {}
        tails = {h: _descendants(h) for h in self.heads}
        external = {
            i for h, tail in tails.items() for n in tail for i in n.all_input_nodes if i not in tail
        }
        for path, targets in self.mixer_paths.values():
            inside = set(path)
            external |= {i for n in path + targets for i in n.all_input_nodes if i not in inside}
            external |= set(targets)
        self.external: dict[fx.Node, Any] = {}
        unit_of_site = {node: name for name, node in self.site.items()}
        producer_unit = {node: name for name, node in self.producer.items()}
        flows = self

        class Recorder(fx.Interpreter):
            recording = True  # off for the replays of :meth:`_tail` and :meth:`_mixed_flows`

            def run_node(self, n: fx.Node) -> Any:
                if not self.recording:
                    return super().run_node(n)
                if n in producer_unit:
                    flows._measure(producer_unit[n], n, self.env[_first_input(n)])
                if n in tails:
                    flows.head_inputs[n] = self.env[flows.head_input[n]]
                out = super().run_node(n)
                if n in unit_of_site:
                    info = a.info[n]
                    dim = info.dim if info is not None else 1
                    name = unit_of_site[n]
                    flows.site_mag[name] = _unit_mean_abs(out, dim, flows.width[name])
                if n in external:
                    flows.external[n] = out
                return out

        with torch.no_grad():
            self.recorder = Recorder(self.gm)
            logits = self.recorder.run(*inputs)
        self.recorder.recording = False
        self.logits = logits
        self.probabilities = torch.softmax(logits.float(), -1).mean(0).cpu()
        self.logit_mean = logits.float().mean(0).cpu()
        self.tails = tails

    def _channel_scores(self, unit: str, size: int) -> torch.Tensor | None:
        """Scores of ``unit`` per channel (a head's score on each of its channels), or
        ``None`` when ``unit`` does not have ``size`` channels."""
        s, width = self.scores[unit], self.width[unit]
        if s.shape[0] * width != size:
            return None
        return s.repeat_interleave(width) if width > 1 else s

    def _live(self, upstream: frozenset[str], size: int) -> torch.Tensor:
        live = torch.zeros(size, dtype=torch.bool)
        for u in upstream:
            s = self._channel_scores(u, size)
            if s is not None:
                live |= s > 0
        return live

    def _group(self, upstream: frozenset[str], size: int) -> int:
        """Channels removed together: a unit's width when every writer has the same one."""
        widths = {self.width[u] for u in upstream if self._channel_scores(u, size) is not None}
        return widths.pop() if len(widths) == 1 else 1

    def _measure(self, unit: str, node: fx.Node, x: torch.Tensor) -> None:
        """Flow matrix ``F[j, c]`` of unit ``unit`` for kept ``j`` and live input ``c``."""
        upstream = self.aligned[_first_input(node)]
        rule = self.a.rule[node]
        info = self.a.info.get(_first_input(node))
        kept = torch.nonzero(self.scores[unit] > 0).flatten()
        if (
            not upstream
            or info is None
            or not isinstance(rule, (ConvRule, LinearRule))
            or self.width[unit] != 1
            or not len(kept)
        ):
            return
        live = torch.nonzero(self._live(upstream, info.size)).flatten()
        if not len(live):
            return
        module = self.a.module(node)
        with torch.no_grad():
            if isinstance(rule, LinearRule):
                w = module.weight.detach()[kept].view(len(kept), info.size, info.width)
                flow = _linear_flows(w, x.reshape(-1, info.size, info.width), live)
                weight_sum = w[:, live].abs().sum(-1).float().cpu()
            else:
                flow = _conv_flows(module, x, kept, live)
                weight_sum = _conv_weight_sums(module, kept, live)
        scale = self.scores[unit][kept].view(-1, 1)
        self.flow[unit] = (kept, live, flow * scale, weight_sum * scale)

    def targets(self, target: int | Sequence[int] | None) -> list[int]:
        """The classes whose logits end the chains."""
        if target is None:
            return [int(self.probabilities.argmax())]
        if isinstance(target, int):
            return [target]
        return [int(t) for t in target]

    def _head_flows(
        self, classes: list[int]
    ) -> list[tuple[frozenset[str], torch.Tensor, dict[tuple[str, int], torch.Tensor], int]]:
        """Per head: upstream units, the first channel of each live group of channels, and
        per end node (``("logits", t)`` or a unit ``(B, j)`` reached through a mixer) the
        mean |change| when that group of the head's input is zeroed; and the channel count."""
        out = []
        for head, tail in self.tails.items():
            x_node = self.head_input[head]
            info = self.a.info[x_node]
            assert info is not None
            upstream = self.aligned[x_node]
            width = self._group(upstream, info.size)
            live = self._live(upstream, info.size).view(-1, width).any(1)
            groups = torch.nonzero(live).flatten()
            x = self.head_inputs[head]
            base = self._tail(head, tail, x)[:, classes]
            path, targets = self.mixer_paths.get(head, ([], []))
            deltas: dict[tuple[str, int], torch.Tensor] = {
                ("logits", t): torch.zeros(len(groups)) for t in classes
            }
            for k, g in enumerate(groups.tolist()):
                occluded = x.clone()
                occluded.narrow(info.dim, g * width * info.width, width * info.width).zero_()
                changed = self._tail(head, tail, occluded)[:, classes]
                for m, t in enumerate(classes):
                    deltas["logits", t][k] = float((changed - base)[:, m].abs().float().mean())
                if targets:
                    for (unit, j), d in self._mixed_flows(head, path, targets, occluded).items():
                        deltas.setdefault((unit, j), torch.zeros(len(groups)))[k] = d
            out.append((upstream, groups * width, deltas, info.size))
        return out

    def _mixed_flows(
        self, head: fx.Node, path: list[fx.Node], targets: list[fx.Node], x: torch.Tensor
    ) -> dict[tuple[str, int], float]:
        """``s_j * mean |R^B_j(X^B) - R^B_j(X^B')|`` for every kept unit ``j`` of every
        target ``B`` when the mixer ``head`` reads ``x`` (other score sites held fixed)."""
        interp = self.recorder
        saved = interp.env
        interp.env = dict(self.external)
        interp.env[self.head_input[head]] = x
        out: dict[tuple[str, int], float] = {}
        try:
            with torch.no_grad():
                for n in path:
                    interp.env[n] = interp.run_node(n)
                for b in targets:
                    unit = next(name for name, node in self.producer.items() if node is b)
                    info = self.a.info[b]
                    dim = info.dim if info is not None else 1
                    change = interp.run_node(b) - self.external[b]
                    mag = _unit_mean_abs(change, dim, self.width[unit])
                    s = self.scores[unit]
                    for j in torch.nonzero(s > 0).flatten().tolist():
                        out[unit, j] = float(s[j] * mag[j])
        finally:
            interp.env = saved
        return out

    def _tail(self, head: fx.Node, tail: list[fx.Node], x: torch.Tensor) -> torch.Tensor:
        interp = self.recorder
        saved = interp.env
        interp.env = dict(self.external)
        interp.env[self.head_input[head]] = x
        try:
            with torch.no_grad():
                for n in tail:
                    if n.op == "output":
                        out = fx.node.map_arg(n.args[0], lambda v: interp.env[v])
                        return cast(torch.Tensor, out)
                    interp.env[n] = interp.run_node(n)
        finally:
            interp.env = saved
        raise RuntimeError("the head does not reach the output")

    def _shares(self, upstream: frozenset[str], size: int) -> dict[str, torch.Tensor]:
        """``rho_A(c)`` for every channel ``c`` of a ``size``-channel tensor, per unit layer
        ``A`` of ``upstream`` that writes it (0 where ``A``'s unit is not kept)."""
        writers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for u in upstream:
            s = self._channel_scores(u, size)
            if s is None:
                continue
            mag = self.site_mag[u].double()
            if self.width[u] > 1:
                mag = mag.repeat_interleave(self.width[u])
            kept = s > 0
            writers[u] = (torch.where(kept, mag, 0.0), kept)
        if not writers:
            return {}
        total = torch.stack([m for m, _ in writers.values()]).sum(0)
        count = torch.stack([k.double() for _, k in writers.values()]).sum(0)
        return {
            u: torch.where(total > 0, m / total.clamp_min(1e-300), k / count.clamp_min(1.0)) * k
            for u, (m, k) in writers.items()
        }

    def edge_arrays(self, classes: list[int]) -> tuple[torch.Tensor, ...]:
        """All edges as ``(source id, target id, weight, weight_sum)``; a pair may repeat
        (its values add up). A unit ``i`` of layer ``A`` has id ``offset[A] + i``; logit
        ``t`` has id ``total + t``."""
        srcs: list[torch.Tensor] = []
        dsts: list[torch.Tensor] = []
        weights: list[torch.Tensor] = []
        sums: list[torch.Tensor] = []

        def add(
            upstream: frozenset[str],
            size: int,
            channels: torch.Tensor,
            targets: torch.Tensor,
            values: torch.Tensor,
            weight_sums: torch.Tensor | None = None,
        ) -> None:
            # values[r, k]: flow from input channel channels[k] into target r, before rho
            for writer, share in self._shares(upstream, size).items():
                rho = share[channels]
                cols = rho > 0
                if not bool(cols.any()):
                    continue
                ids = self.offset[writer] + channels[cols] // self.width[writer]
                w = values[:, cols].double() * rho[cols]
                srcs.append(ids.expand(len(targets), -1).reshape(-1))
                dsts.append(targets[:, None].expand(-1, len(ids)).reshape(-1))
                weights.append(w.reshape(-1))
                if weight_sums is None:
                    sums.append(torch.zeros(w.numel(), dtype=torch.float64))
                else:
                    s_a = self._channel_scores(writer, size)
                    assert s_a is not None
                    sums.append((weight_sums[:, cols].double() * s_a[channels[cols]]).reshape(-1))

        for unit, (kept, live, flow, weight_sum) in self.flow.items():
            x = self.producer[unit].args[0]
            assert isinstance(x, fx.Node)  # a unit layer reads one tensor
            info = self.a.info[x]
            assert info is not None
            upstream = self.aligned[x]
            add(upstream, info.size, live, self.offset[unit] + kept, flow, weight_sum)
        for upstream, firsts, deltas, size in self._head_flows(classes):
            ends = list(deltas)
            targets = torch.tensor(
                [self.total + j if b == "logits" else self.offset[b] + j for b, j in ends],
                dtype=torch.long,
            )
            add(upstream, size, firsts, targets, torch.stack([deltas[e] for e in ends]))
        if not weights:
            empty = torch.zeros(0, dtype=torch.long)
            nothing = torch.zeros(0, dtype=torch.float64)
            return empty, empty, nothing, nothing
        return torch.cat(srcs), torch.cat(dsts), torch.cat(weights), torch.cat(sums)


def _descendants(node: fx.Node) -> list[fx.Node]:
    seen = {node}
    order = []
    for n in node.graph.nodes:
        if n is node or any(i in seen for i in n.all_input_nodes):
            seen.add(n)
            order.append(n)
    return order


def _unit_mean_abs(t: torch.Tensor, dim: int, width: int = 1) -> torch.Tensor:
    """Mean absolute value per unit of ``width`` consecutive channels of dimension ``dim``."""
    flat = t.detach().abs().float().movedim(dim, 0).reshape(t.shape[dim], -1).mean(1)
    return flat.view(-1, width).mean(1).cpu()


#: Largest number of elements of one intermediate tensor of :func:`_conv_flows` and
#: :func:`_linear_flows` (input channels are processed in chunks below it).
_CHUNK_ELEMENTS = 1 << 24


def _linear_flows(w: torch.Tensor, x: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``F[j, c] = mean_m |sum_i W[j, c, i] X[m, c, i]|`` of a linear layer.

    ``w`` is ``[kept, channels, width]`` (the kept rows, each input channel's
    ``width`` consecutive features), ``x`` is ``[M, channels, width]``.
    """
    flow = torch.zeros(len(w), len(live))
    step = max(1, _CHUNK_ELEMENTS // max(1, x.shape[0] * len(w)))
    for a in range(0, len(live), step):
        cols = live[a : a + step]
        contrib = torch.einsum("mci,jci->mcj", x[:, cols].float(), w[:, cols].float())
        flow[:, a : a + step] = contrib.abs().mean(0).T.cpu()
    return flow


def _conv_weight_sums(module: Any, kept: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``sum_k |W_{j,c,k}|`` of a (grouped) convolution for kept ``j``, live ``c`` (0 across
    groups)."""
    g = module.groups
    in_pg, out_pg = module.in_channels // g, module.out_channels // g
    w = module.weight.detach()[kept].abs().float().flatten(2).sum(-1).cpu()  # [kept, in_pg]
    same = (kept // out_pg)[:, None] == (live // in_pg)[None, :]
    return w[:, live % in_pg] * same


def _conv_flows(
    module: Any, x: torch.Tensor, kept: torch.Tensor, live: torch.Tensor
) -> torch.Tensor:
    """``F[j, c] = mean |W_{j,c} * X_c|`` of a (grouped) convolution.

    Every live input channel ``c`` is convolved with the kept filters of its group at
    once: one depthwise-style convolution per chunk of channels, the filter rows of each
    channel padded with zeros to the largest group.
    """
    g = module.groups
    in_pg, out_pg = module.in_channels // g, module.out_channels // g
    weight = module.weight.detach()
    flow = torch.zeros(len(kept), len(live))
    group_of_row = kept // out_pg
    group_of_col = live // in_pg
    padding = module.padding
    no_pad = padding in ("same", "valid") or all(p == 0 for p in padding)
    pointwise = no_pad and all(k == 1 for k in module.kernel_size)
    if pointwise and all(s == 1 for s in module.stride):
        dims = (0, *range(2, x.ndim))
        mean_abs = x[:, live].abs().float().mean(dims).cpu()
        w = weight[kept].reshape(len(kept), in_pg).abs().float().cpu()[:, live % in_pg]
        same = group_of_row[:, None] == group_of_col[None, :]
        return w * mean_abs[None, :] * same
    rows_of = [torch.nonzero(group_of_row == grp).flatten() for grp in range(g)]
    width = max(len(r) for r in rows_of)
    if width == 0:
        return flow
    spatial = math.prod(x.shape[2:])
    step = max(1, _CHUNK_ELEMENTS // max(1, x.shape[0] * width * spatial))
    probe = shallow_clone(module)
    probe.bias = None
    for a in range(0, len(live), step):
        cols = live[a : a + step]
        filters = weight.new_zeros(len(cols), width, *weight.shape[2:])
        for k, c in enumerate(cols.tolist()):
            rows = rows_of[c // in_pg]
            filters[k, : len(rows)] = weight[kept[rows], c % in_pg]
        probe.weight = torch.nn.Parameter(filters.reshape(-1, 1, *weight.shape[2:]), False)
        probe.in_channels, probe.out_channels = len(cols), len(cols) * width
        probe.groups = len(cols)
        out = probe(x[:, cols]).abs().float()
        means = out.mean((0, *range(2, out.ndim))).view(len(cols), width).cpu()
        for k, c in enumerate(cols.tolist()):
            rows = rows_of[c // in_pg]
            flow[rows, a + k] = means[k, : len(rows)]
    return flow


# --------------------------------------------------------------------------- paths
STRENGTHS = ("fraction", "layer")


def strongest_paths(
    graph: Any, k: int = 5, *, with_strength: bool = False, strength: str = "fraction"
) -> list[str]:
    """The ``k`` strongest input-to-output chains, as ``"a → b → c"`` strings.

    See :func:`strongest_path_list` for which paths count and how they are ranked.
    """
    return [
        " → ".join(graph.nodes[n].get("label", str(n)) for n in path)
        + (f"  ({value:.3g})" if with_strength else "")
        for path, value in strongest_path_list(graph, k, strength=strength)
    ]


def strongest_path_list(
    graph: Any, k: int = 5, *, strength: str = "fraction"
) -> list[tuple[list[str], float]]:
    """The ``k`` strongest paths as (node list, strength), strongest first.

    A path runs from a node of a layer that reads the model's input (node attribute
    ``input_layer``; if no path starts there, from any node without predecessors) to a
    logit node (without logit nodes: to a node without successors). Its strength is the
    product of its edges' strengths, found exactly by dynamic programming over the DAG.

    Parameters
    ----------
    graph : networkx.DiGraph
        A chain graph (:func:`chain_graph`) or any DAG with those attributes.
    k : int
        Number of paths.
    strength : {"fraction", "layer"}
        Edge strength: ``"fraction"`` (default), the edge attribute ``fraction`` (else
        ``weight``): the share of the end node's incoming flow that the path carries;
        ``"layer"``, the edge's ``weight`` divided by the largest ``weight`` between the
        same two layers (node attribute ``layer``).

    Returns
    -------
    list of (list of str, float)
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if strength not in STRENGTHS:
        raise ValueError(f"strength must be one of {STRENGTHS}, got {strength!r}")
    if graph.number_of_nodes() == 0:
        return []
    logits = [n for n, d in graph.nodes(data=True) if d.get("kind") == "logit"]
    sinks = set(logits) if logits else {n for n in graph if graph.out_degree(n) == 0}
    roots = [n for n in graph if graph.in_degree(n) == 0]
    inputs = [n for n in roots if graph.nodes[n].get("input_layer")]
    found = _k_best(graph, set(inputs), sinks, k, strength) if inputs else []
    if not found:  # no kept chain starts at the input: start anywhere
        found = _k_best(graph, set(roots), sinks, k, strength)
    out: list[tuple[list[str], float]] = []
    for value, link in found:
        path = []
        while link is not None:
            path.append(link[0])
            link = link[1]
        out.append((path[::-1], value))
    return out


def _layer_maxima(graph: Any) -> dict[tuple[Any, Any], float]:
    """The largest edge ``weight`` between every pair of layers (node attribute ``layer``)."""
    layer = {n: d.get("layer") for n, d in graph.nodes(data=True)}
    largest: dict[tuple[Any, Any], float] = {}
    for u, v, d in graph.edges(data=True):
        key = (layer[u], layer[v])
        largest[key] = max(largest.get(key, 0.0), float(d.get("weight", 1.0)))
    return largest


def _k_best(
    graph: Any, sources: set, sinks: set, k: int, strength: str
) -> list[tuple[float, tuple]]:
    """k largest products of edge strengths from ``sources`` to ``sinks`` (DP over a DAG).

    A node keeps its k best partial paths. Only the predecessors whose best partial path
    ranks among the node's k best first candidates can contribute (a predecessor's other
    paths are weaker than its best), so each edge is read once and only k predecessors
    are expanded per node.
    """
    import networkx as nx

    largest = _layer_maxima(graph) if strength == "layer" else None
    layer = graph.nodes.data("layer")
    first = operator.itemgetter(0)
    best: dict[Any, list[tuple[float, tuple]]] = {}
    top: dict[Any, float] = {}  # strength of each node's best partial path
    for v in nx.topological_sort(graph):
        preds = graph._pred[v]  # the raw dict: read once per edge, millions of times
        if not preds:
            if v in sources:
                best[v], top[v] = [(1.0, (v, None))], 1.0
            continue
        heads = []
        if largest is None:
            for u, d in preds.items():
                if u in top:
                    f = d.get("fraction")
                    f = float(d.get("weight", 1.0) if f is None else f)
                    heads.append((top[u] * f, f, u))
        else:
            for u, d in preds.items():
                if u in top:
                    f = float(d.get("weight", 1.0)) / max(largest[layer[u], layer[v]], 1e-30)
                    heads.append((top[u] * f, f, u))
        if heads:
            cands = [
                (s * f, (v, link))
                for _, f, u in heapq.nlargest(k, heads, key=first)
                for s, link in best[u]
            ]
            best[v] = heapq.nlargest(k, cands, key=first)
            top[v] = best[v][0][0]
    found = [entry for v in sinks if graph.in_degree(v) > 0 for entry in best.get(v, [])]
    return heapq.nlargest(k, found, key=first)


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
    "STRENGTHS",
    "chain_graph",
    "strongest_path_list",
    "strongest_paths",
    "to_dot",
    "units_label",
    "write_dot",
    "write_graphml",
]
