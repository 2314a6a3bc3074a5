"""The chain graph without torch.fx symbolic tracing (captum_chains.export.recording).

The recorded graph must compute the model and call the same modules as the fx trace;
the chain graph built on it must equal the one built on the fx trace (edges and weights,
computed through ``torch.fx.Tracer`` as an independent path) wherever fx can trace, and
must work, with edge weights equal to occlusion through the SubNetwork, on a model with
data-dependent control flow that fx cannot trace. The one path search and the weights
reading of the graph are checked against direct computations.
"""

from __future__ import annotations

import itertools
import math

import networkx as nx
import pytest
import torch
from conftest import TwoConv, as_chain, make_inputs, make_model, randomize_bn
from fx_oracle import trace
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from captum_chains import chains
from captum_chains.chains import chain_graph, strongest_path_list
from captum_chains.export.recording import record, set_item
from captum_chains.export.rules import function_rule, method_rule
from captum_chains.export.tracing import ExportError, working_copy
from captum_chains.subnetwork import subnetwork_from_mappings
from captum_chains.units import discover


class Branchy(TwoConv):
    """Two conv-BN-ReLU layers with a data-dependent branch between them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        if float(h.mean()) > 0:  # a Python branch on data: torch.fx cannot trace this
            h = h * 2.0
        else:
            h = -h
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


def _random_sub(model: nn.Module, x: torch.Tensor, seed: int, close: bool = False):
    structure = discover(model, (x,))
    gen = torch.Generator().manual_seed(seed)
    importance = {}
    for unit in structure.units:
        kept = torch.rand(unit.size, generator=gen) < 0.6
        kept[int(torch.randint(unit.size, (1,), generator=gen))] = True
        importance[unit.name] = kept.float() * (torch.rand(unit.size, generator=gen) + 0.3)
    gates = {}
    if close:
        block = next((g for g in structure.gates if g.kind == "block"), None)
        if block is not None:
            gates[block.name] = False
    return subnetwork_from_mappings(model, structure, importance, gates)


def _fx_record(work: nn.Module, inputs: tuple[torch.Tensor, ...]):
    """An independent reader: torch.fx symbolic tracing (tests/fx_oracle.py)."""
    return trace(work)


# ----------------------------------------------------------------------------- recording
@pytest.mark.parametrize("family", ["plain", "residual", "depthwise"])
def test_recorded_graph_computes_the_model_and_calls_the_fx_modules(family):
    model = make_model(family, width=4, seed=1)
    x = make_inputs(n=3, size=8, seed=1)
    work = working_copy(model)
    gm, recording = record(work, (x,))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    _, tracer = trace(working_copy(model))
    assert set(recording.calls) == set(tracer.calls)
    assert set(recording.leaves) == set(tracer.leaves)
    called = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert sorted(called) == sorted(tracer.leaves)


def test_recording_gives_every_tensor_operation_a_target_with_an_export_rule():
    class Ops(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = 2 * x + x.view(x.shape[0], -1).view(x.shape)
            y += 1
            y = y - x / 3
            y[:, 0] = -1.0  # an item assignment changes y in place
            return torch.flatten(y[:, :2], 1).relu_()

    x = torch.randn(2, 3, 4)
    gm, _ = record(Ops(), (x,))
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    for node in calls:
        if node.target is set_item:  # no export rule: its channels are opaque
            continue
        rule = function_rule(node.target) if node.op == "call_function" else None
        rule = rule or (method_rule(node.target) if node.op == "call_method" else None)
        assert rule is not None, (node.op, node.target)
    targets = {n.target for n in calls if n.target is not set_item}
    assert {"view", "relu_", torch.flatten} <= targets
    # mul, view, view, add, add_, div, sub, set_item, getitem, ... and the sizes, as symbolic
    # tracing records them: getattr(x, "shape") twice, getitem 0 of the first
    assert len(calls) == 14
    assert sum(n.target is getattr for n in calls) == 2
    torch.testing.assert_close(gm(x), Ops()(x))
    bigger = torch.randn(5, 3, 4)  # the sizes stay symbolic: another batch size runs too
    torch.testing.assert_close(gm(bigger), Ops()(bigger))


@pytest.mark.parametrize("family", ["plain", "residual"])
def test_one_recorded_pass_gives_discoverys_trace_and_the_graph(family, monkeypatch):
    from captum_chains.export import recording as recording_module
    from captum_chains.units.trace import trace_forward

    model = make_model(family, width=4, seed=4)
    x = make_inputs(n=2, size=8, seed=4)
    work = working_copy(model)
    traces = []

    def spy(*args, **kwargs):
        traces.append(trace_forward(*args, **kwargs))
        return traces[-1]

    runs = []
    work.register_forward_hook(lambda *_: runs.append(1))
    monkeypatch.setattr(recording_module, "trace_forward", spy)
    gm, recording = record(work, (x,))
    assert len(traces) == 1 and len(runs) == 1  # one pass, both views
    trace = traces[0]

    # the graph view leaves discovery's view as it is without it
    def summary(t):
        calls = {
            n: [(c.start, c.end, c.input_shape, c.output_shape) for c in cs]
            for n, cs in t.calls.items()
        }
        return calls, [(f.op, f.index, len(f.operand_ids)) for f in t.functions]

    assert summary(trace) == summary(trace_forward(working_copy(model), (x,)))
    # the two views agree on the module calls
    assert {n: len(c) for n, c in recording.calls.items()} == {
        n: len(c) for n, c in trace.calls.items()
    }
    leaf_calls = sorted(
        (c for n in recording.leaves for c in trace.calls[n]), key=lambda c: c.start
    )
    called = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert called == [c.name for c in leaf_calls]
    torch.testing.assert_close(gm(x), trace.output)


# ----------------------------------------------------------------------------- graph
@pytest.mark.parametrize(
    ("family", "close"),
    [("plain", False), ("residual", False), ("residual", True), ("depthwise", False)],
)
def test_chain_graph_equals_the_graph_on_the_fx_trace(family, close, monkeypatch):
    model = make_model(family, width=4, seed=2)
    x = make_inputs(n=3, size=8, seed=2)
    sub = _random_sub(model, x, seed=5, close=close)
    recorded = chain_graph(sub, x)
    monkeypatch.setattr(chains, "record", _fx_record)
    traced = chain_graph(sub, x)
    assert set(recorded.nodes) == set(traced.nodes)
    assert set(recorded.edges) == set(traced.edges)
    assert recorded.number_of_edges() > 0
    for u, v, d in traced.edges(data=True):
        got = recorded.edges[u, v]
        for key in ("weight", "fraction", "weight_sum"):
            assert math.isclose(got[key], d[key], rel_tol=1e-5, abs_tol=1e-9), (u, v, key)


def test_chain_graph_on_a_model_fx_cannot_trace():
    torch.manual_seed(0)
    model = Branchy()
    randomize_bn(model, 0)
    model.eval()
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ExportError, match=r"torch\.fx"):
        trace(working_copy(model))
    structure = discover(model, (x,))
    s1 = torch.tensor([1.0, 0.0, 0.7])
    s2 = torch.tensor([0.5, 1.2, 0.0, 0.9])
    sub = subnetwork_from_mappings(model, structure, {"conv1": s1, "conv2": s2})
    graph = chain_graph(sub, x)
    # w(conv1.c -> conv2.j) = s_j * mean |change of conv2's output j when channel c of its
    # input is zeroed| (by linearity, the part of the response that flows through c)
    seen: list[torch.Tensor] = []
    channel = [0]

    def zero(module, args):
        t = args[0].clone()
        t[:, channel[0]] = 0
        return (t,)

    def keep(module, args, out):
        seen.append(out.detach())

    handle = model.conv2.register_forward_hook(keep)
    try:
        for c in (0, 2):
            seen.clear()
            channel[0] = c
            with torch.no_grad():
                sub(x)
                pre = model.conv2.register_forward_pre_hook(zero)
                try:
                    sub(x)
                finally:
                    pre.remove()
            delta = (seen[0] - seen[1]).abs().mean((0, 2, 3))
            for j in (0, 1, 3):
                want = float(s2[j] * delta[j])
                assert graph.edges[f"conv1.{c}", f"conv2.{j}"]["weight"] == pytest.approx(
                    want, rel=1e-4
                )
    finally:
        handle.remove()
    assert "conv1.1" not in graph and "conv2.2" not in graph
    assert any(v.startswith("logit.") for _, v in graph.edges)


def test_weight_sums_and_edges_without_flow():
    torch.manual_seed(3)
    model = Branchy()
    randomize_bn(model, 3)
    model.eval()
    with torch.no_grad():  # channel 1 of conv1 is zero after the ReLU on every input
        model.bn1.bias[1] = -1e3
    x = torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(3))
    structure = discover(model, (x,))
    s1, s2 = torch.tensor([1.0, 0.8, 0.6]), torch.tensor([0.5, 1.2, 0.3, 0.9])
    sub = subnetwork_from_mappings(model, structure, {"conv1": s1, "conv2": s2})
    flow = chain_graph(sub, x)
    every = chain_graph(sub, x, edges="all")
    for j in range(4):
        assert ("conv1.1", f"conv2.{j}") not in flow.edges
        data = every.edges["conv1.1", f"conv2.{j}"]
        assert data["weight"] == 0 and data["fraction"] == 0
    for c, j in itertools.product(range(3), range(4)):
        want = float(s1[c] * s2[j] * model.conv2.weight[j, c].abs().sum())
        assert every.edges[f"conv1.{c}", f"conv2.{j}"]["weight_sum"] == pytest.approx(want)
    assert set(flow.edges) <= set(every.edges)
    with pytest.raises(ValueError, match="edges"):
        chain_graph(sub, x, edges="some")


def test_max_in_edges_keeps_the_strongest_and_the_full_fractions():
    model = make_model("residual", width=4, seed=3)
    x = make_inputs(n=2, size=8, seed=3)
    sub = _random_sub(model, x, seed=1)
    full = chain_graph(sub, x)
    pruned = chain_graph(sub, x, max_in_edges=2)
    for node in full:
        incoming = sorted(full.in_edges(node, data=True), key=lambda e: -e[2]["weight"])
        assert {(u, v) for u, v, _ in incoming[:2]} == set(pruned.in_edges(node))
        for u, v, d in pruned.in_edges(node, data=True):
            assert d["fraction"] == pytest.approx(full.edges[u, v]["fraction"])


# ----------------------------------------------------------------------------- paths
@st.composite
def weighted_layers(draw):
    graph = nx.DiGraph()
    sizes = [draw(st.integers(1, 3)) for _ in range(draw(st.integers(2, 4)))]
    for depth, size in enumerate(sizes):
        for i in range(size):
            graph.add_node(f"l{depth}.{i}", layer=f"l{depth}", depth=depth)
    for depth in range(len(sizes) - 1):
        for i, j in itertools.product(range(sizes[depth]), range(sizes[depth + 1])):
            if draw(st.booleans()):
                weight = draw(st.floats(0.01, 5.0))
                graph.add_edge(f"l{depth}.{i}", f"l{depth + 1}.{j}", weight=weight)
    return graph


@settings(max_examples=40)
@given(graph=weighted_layers(), k=st.integers(1, 4))
def test_layer_strength_paths_match_brute_force(graph, k):
    largest: dict[tuple[str, str], float] = {}
    for u, v, d in graph.edges(data=True):
        key = (graph.nodes[u]["layer"], graph.nodes[v]["layer"])
        largest[key] = max(largest.get(key, 0.0), d["weight"])

    def strength(path):
        return math.prod(
            graph.edges[u, v]["weight"] / largest[graph.nodes[u]["layer"], graph.nodes[v]["layer"]]
            for u, v in itertools.pairwise(path)
        )

    roots = [n for n in graph if graph.in_degree(n) == 0]
    sinks = [n for n in graph if graph.out_degree(n) == 0 and graph.in_degree(n) > 0]
    brute = sorted(
        (
            strength(p)
            for s, t in itertools.product(roots, sinks)
            for p in nx.all_simple_paths(graph, s, t)
        ),
        reverse=True,
    )[:k]
    got = strongest_path_list(graph, k, strength="layer")
    assert [round(s, 12) for _, s in got] == [round(s, 12) for s in brute]
    for path, value in got:
        assert math.isclose(value, strength(path))
    with pytest.raises(ValueError, match="strength"):
        strongest_path_list(graph, k, strength="weight")


@pytest.mark.parametrize("source", ["timm", "torchvision"])
def test_vit_chain_graph_equals_the_graph_on_the_fx_trace(source, monkeypatch):
    from test_vit import ViTSpec, images, make_timm_vit, make_torchvision_vit

    if source == "timm":
        model = make_timm_vit(ViTSpec(depth=2, heads=3, head_dim=2))
    else:
        model = make_torchvision_vit(depth=2, heads=3, head_dim=2)
    x = images(4)
    sub = _random_sub(model, x, seed=7)
    recorded = chain_graph(sub, x)
    monkeypatch.setattr(chains, "record", _fx_record)
    traced = chain_graph(sub, x)
    assert {d["kind"] for _, d in recorded.nodes(data=True)} >= {"head", "neuron"}
    assert set(recorded.nodes) == set(traced.nodes)
    assert set(recorded.edges) == set(traced.edges)
    # embedding channels reach the logits through the class-token ``cat`` (recorded) or a
    # symbolic ``x.shape`` read before it (fx): the same replay of the rest of the network
    assert any(u.startswith(("patch_embed.", "conv_proj.")) for u, _ in recorded.edges)
    for u, v, d in traced.edges(data=True):
        got = recorded.edges[u, v]
        for key in ("weight", "fraction"):
            assert math.isclose(got[key], d[key], rel_tol=1e-4, abs_tol=1e-9), (u, v, key)


def test_figure_draws_the_chain_of_a_model_fx_cannot_trace():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.collections import LineCollection

    from captum_chains.visualization import chain_graph_for, plot_chain

    torch.manual_seed(1)
    model = Branchy()
    randomize_bn(model, 1)
    model.eval()
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    sub = _random_sub(model, x, seed=2)
    chain = as_chain(sub, x)
    graph = chain_graph_for(chain)
    assert graph.graph["source"] == "chains"
    assert set(graph.edges) == set(chain.graph().edges)
    fig = plot_chain(chain, max_filters=3, paths=2)
    red = [c for c in fig.axes[0].collections if isinstance(c, LineCollection)][-1]
    assert len(red.get_segments()) >= 2  # conv1 -> conv2 -> logit
    weights = chain_graph_for(chain, source="weights")
    for u, v, d in weights.edges(data=True):
        assert d["weight"] == pytest.approx(graph.edges[u, v]["weight_sum"])
