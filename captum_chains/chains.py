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

Units wider than one channel (a ViT attention head holds ``head_dim`` channels,
``UnitLayer.unit_width``) are read, zeroed and split by ``\rho`` as whole groups of
channels; a head's response is its part of the attention output (``HeadCore`` in the
export's trace), and means run over the head's channels too.

Mixing layers. Some units reach the next unit layer only through a linear layer that is
not a unit layer and mixes channels: a head's output goes through the attention's
``proj`` into the residual stream, which the next ``fc1`` (or ``qkv``) reads after a
LayerNorm; an MLP neuron goes through ``fc2``. Then ``B`` reads no channel of ``A`` and
the edge weight is the response form of the formula above,

.. math::

    w(A.a \to B.j) = s^B_j \; \rho_A(a) \;
        \mathbb{E}_{x \in R,\, p}\big|\,R^B_j(X^B(x))(p) - R^B_j(X^B_{-A.a}(x))(p)\,\big|,

where ``R^B_j`` is ``B.j``'s response (for a linear ``B`` this is
``E|W^B_j (X^B - X^B_{-A.a})|``, the part of the response that flows from ``A.a``) and
``X^B_{-A.a}`` is ``B``'s input recomputed with ``A.a``'s channels zeroed at the mixing
layer's input while every other unit's score site keeps its value: only the direct flow
through non-unit operations (projection, residual additions, LayerNorm) counts, as for
aligned edges. Layers that read ``A``'s channels aligned are measured by the first
formula only.

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
from captum_chains.export.vit import HeadCore

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
    weights: dict[tuple[str, str], float] = {}
    for (a, c), (b, j), w in flows.edges(classes):
        src = units_label(a, c)
        dst = f"logit.{j}" if b == "logits" else units_label(b, j)
        weights[src, dst] = weights.get((src, dst), 0.0) + w
    for (src, dst), w in weights.items():
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
        self.width = {u.name: u.unit_width for u in structure.units}
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
            upstream = self.aligned[head.args[0]]  # type: ignore[index]
            inside = {head}
            order = [head]
            targets = []
            for n in a.nodes:
                if n in inside or not any(i in inside for i in n.all_input_nodes):
                    continue
                if n in producers:
                    # a layer that reads the mixer's own units aligned is measured there
                    if target_unit[n] in self.site and not (
                        upstream & self.aligned[n.args[0]]  # type: ignore[index]
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
        self.flow: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
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
                    flows._measure(producer_unit[n], n, self.env[n.args[0]])  # type: ignore[index]
                if n in tails:
                    flows.head_inputs[n] = self.env[n.args[0]]  # type: ignore[index]
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
        upstream = self.aligned[node.args[0]]  # type: ignore[index]
        rule = self.a.rule[node]
        info = self.a.info.get(node.args[0])  # type: ignore[arg-type]
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
    ) -> list[tuple[frozenset[str], torch.Tensor, dict[tuple[str, int], torch.Tensor], int]]:
        """Per head: upstream units, the first channel of each live group of channels, and
        per end node (``("logits", t)`` or a unit ``(B, j)`` reached through a mixer) the
        mean |change| when that group of the head's input is zeroed; and the channel count."""
        out = []
        for head, tail in self.tails.items():
            x_node = head.args[0]
            info = self.a.info[x_node]  # type: ignore[index]
            assert info is not None
            upstream = self.aligned[x_node]  # type: ignore[index]
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
        interp.env[head.args[0]] = x  # type: ignore[index]
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
        """``rho_A(c)`` of every unit layer ``A`` that writes channel ``c`` (kept unit)."""
        writers = {}
        for u in upstream:
            s = self._channel_scores(u, size)
            if s is not None and s[c] > 0:
                writers[u] = float(self.site_mag[u][c // self.width[u]])
        total = sum(writers.values())
        if total <= 0:
            return {u: 1.0 / len(writers) for u in writers}
        return {u: m / total for u, m in writers.items()}

    def edges(self, classes: list[int]) -> list[tuple[tuple[str, int], tuple[str, int], float]]:
        """All ``((A, a), (B, j), weight)`` edges, ``B == "logits"`` for logit edges; a
        pair may repeat (its weights add up)."""
        out = []
        for unit, (kept, live, flow) in self.flow.items():
            node = self.producer[unit]
            upstream = self.aligned[node.args[0]]  # type: ignore[index]
            size = self.a.info[node.args[0]].size  # type: ignore[index, union-attr]
            for k, c in enumerate(live.tolist()):
                for writer, share in self._share(upstream, c, size).items():
                    a = c // self.width[writer]
                    for m, j in enumerate(kept.tolist()):
                        out.append(((writer, a), (unit, j), float(flow[m, k]) * share))
        for upstream, firsts, deltas, size in self._head_flows(classes):
            for k, c in enumerate(firsts.tolist()):
                for writer, share in self._share(upstream, c, size).items():
                    a = c // self.width[writer]
                    for end, d in deltas.items():
                        out.append(((writer, a), end, float(d[k]) * share))
        return out


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
