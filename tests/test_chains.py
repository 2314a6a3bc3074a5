"""Filter -> filter chain graphs (captum_chains.chains) against independent computations.

Edge weights are checked by occlusion through the SubNetwork itself (hooks on the
original model that zero one input channel of the downstream layer), paths against a
brute-force enumeration, and the files against networkx's own reader.
"""

from __future__ import annotations

import itertools
import math

import networkx as nx
import pytest
import torch
from conftest import TwoConv, make_inputs, make_model, randomize_bn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from captum_chains._utils.model_state import ModelSnapshot
from captum_chains.chains import (
    chain_graph,
    strongest_path_list,
    strongest_paths,
    to_dot,
    write_dot,
    write_graphml,
)
from captum_chains.subnetwork import subnetwork_from_mappings
from captum_chains.units import discover


class Stream(nn.Module):
    """A stem and a residual block write one stream; a head conv reads it."""

    def __init__(self, w: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, w, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(w)
        self.block = _Block(w)
        self.head = nn.Conv2d(w, 4, 3, padding=1, bias=False)
        self.bnh = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = self.block(x)
        return self.fc(torch.relu(self.bnh(self.head(x))).mean((2, 3)))


class _Block(nn.Module):
    def __init__(self, w: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(w, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, w, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def _model(cls, seed):
    torch.manual_seed(seed)
    model = cls()
    randomize_bn(model, seed)
    return model.eval()


def _masks(structure, data, keep=(0.3, 0.7, 1.0)):
    out = {}
    for unit in structure.units:
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
        kept = torch.rand(unit.size, generator=gen) < data.draw(st.sampled_from(keep))
        kept[int(torch.randint(unit.size, (1,), generator=gen))] = True
        out[unit.name] = kept.float() * (torch.rand(unit.size, generator=gen) + 0.5)
    return out


def _occlusion(model, sub, x, layer, channel, watch, scores=None):
    """Mean |change| of ``watch``'s raw output when input ``channel`` of ``layer`` is zeroed."""
    outputs = []

    def zero(module, args):
        t = args[0].clone()
        t[:, channel] = 0
        return (t,)

    def record(module, args, out):
        outputs.append(out.detach())

    target = model.get_submodule(watch)
    handle = target.register_forward_hook(record)
    try:
        with torch.no_grad():
            base = sub(x)
            h = model.get_submodule(layer).register_forward_pre_hook(zero)
            try:
                occluded = sub(x)
            finally:
                h.remove()
    finally:
        handle.remove()
    if watch == layer and isinstance(target, nn.Linear) and target is model.get_submodule("fc"):
        return (base - occluded).abs().mean(0)
    delta = (outputs[0] - outputs[1]).abs()
    return delta.mean((0, 2, 3)) if delta.ndim == 4 else delta.mean(0)


@settings(max_examples=6)
@given(data=st.data(), seed=st.integers(0, 1000))
def test_edge_weights_equal_occlusion_on_a_tiny_network(data, seed):
    model = _model(TwoConv, seed)
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(seed))
    structure = discover(model, (x,))
    importance = _masks(structure, data)
    sub = subnetwork_from_mappings(model, structure, importance)
    snapshot = ModelSnapshot.take(model)
    graph = chain_graph(sub, x)
    snapshot.assert_unchanged(model)
    s1, s2 = importance["conv1"], importance["conv2"]
    with torch.no_grad():
        target = int(torch.softmax(sub(x), -1).mean(0).argmax())
    expected = {}
    for c in torch.nonzero(s1).flatten().tolist():
        delta = _occlusion(model, sub, x, "conv2", c, "conv2")
        for j in torch.nonzero(s2).flatten().tolist():
            expected[(f"conv1.{c}", f"conv2.{j}")] = float(delta[j] * s2[j])
    for j in torch.nonzero(s2).flatten().tolist():
        delta = _occlusion(model, sub, x, "fc", j, "fc")
        expected[(f"conv2.{j}", f"logit.{target}")] = float(delta[target])
    expected = {k: v for k, v in expected.items() if v > 0}
    got = {(u, v): d["weight"] for u, v, d in graph.edges(data=True)}
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert math.isclose(got[key], value, rel_tol=1e-4, abs_tol=1e-7), key
    for node in graph.nodes:
        fractions = [d["fraction"] for _, _, d in graph.in_edges(node, data=True)]
        assert not fractions or math.isclose(sum(fractions), 1.0, rel_tol=1e-6)


@settings(max_examples=4)
@given(data=st.data(), seed=st.integers(0, 1000))
def test_stream_writers_share_the_flow_by_their_output_magnitude(data, seed):
    model = _model(Stream, seed)
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(seed))
    structure = discover(model, (x,))
    importance = _masks(structure, data)
    sub = subnetwork_from_mappings(model, structure, importance)
    graph = chain_graph(sub, x)
    # site outputs (post-BN, times the scores) of the two writers of the stream
    seen = {}
    hooks = [
        model.bn0.register_forward_hook(lambda m, a, o: seen.__setitem__("stem", o.detach())),
        model.block.bn2.register_forward_hook(
            lambda m, a, o: seen.__setitem__("block.conv2", o.detach())
        ),
    ]
    try:
        with torch.no_grad():
            sub(x)
    finally:
        for h in hooks:
            h.remove()
    mags = {k: (v * importance[k].view(1, -1, 1, 1)).abs().mean((0, 2, 3)) for k, v in seen.items()}
    s_head = importance["head"]
    for c in range(3):
        writers = [w for w in ("stem", "block.conv2") if importance[w][c] > 0]
        total = sum(float(mags[w][c]) for w in writers)
        delta = _occlusion(model, sub, x, "head", c, "head")
        for j in torch.nonzero(s_head).flatten().tolist():
            for w in writers:
                share = float(mags[w][c]) / total if total > 0 else 1 / len(writers)
                want = float(delta[j] * s_head[j]) * share
                edge = (f"{w}.{c}", f"head.{j}")
                if want > 0:
                    # the occlusion delta is a float32 difference of O(1) outputs: a weight of
                    # a few 1e-6 carries ~1e-10 of cancellation error
                    weight = graph.edges[edge]["weight"]
                    assert math.isclose(weight, want, rel_tol=1e-4, abs_tol=1e-8), edge
                else:
                    assert edge not in graph.edges
    # the stem also feeds the block's first conv directly (one writer: no split)
    for u, v in graph.edges:
        if v.startswith("block.conv1."):
            assert u.startswith("stem.")


def test_depthwise_filters_only_read_their_own_channel():
    model = make_model("depthwise", width=4, seed=2)
    x = make_inputs(n=3, size=8, seed=2)
    structure = discover(model, (x,))
    sub = subnetwork_from_mappings(
        model, structure, {u.name: torch.ones(u.size) for u in structure.units}
    )
    graph = chain_graph(sub, x)
    dw = [u.name for u in structure.units if u.depthwise]
    assert dw
    edges = [(u, v) for u, v in graph.edges if graph.nodes[v]["layer"] in dw]
    assert edges
    for u, v in edges:
        assert graph.nodes[u]["index"] == graph.nodes[v]["index"]


def test_removed_block_passes_the_stream_through():
    model = make_model("residual", width=3, seed=4, depth=2)
    x = make_inputs(n=3, size=8, seed=4)
    structure = discover(model, (x,))
    ones = {u.name: torch.ones(u.size) for u in structure.units}
    first = next(g for g in structure.gates if g.kind == "block")
    sub = subnetwork_from_mappings(model, structure, ones, {first.name: False})
    graph = chain_graph(sub, x)
    assert not any(graph.nodes[n]["layer"] in first.units for n in graph.nodes)
    stem = next(u.name for u in structure.units if u.name.startswith("stem"))
    after = [u.name for u in structure.units if u.name.startswith("blocks.1")]
    assert any(
        graph.nodes[u]["layer"] == stem and graph.nodes[v]["layer"] == after[0]
        for u, v in graph.edges
    )


# --------------------------------------------------------------------------- paths
@st.composite
def layered_graphs(draw):
    graph = nx.DiGraph()
    layers = draw(st.integers(2, 4))
    sizes = [draw(st.integers(1, 3)) for _ in range(layers)]
    for depth, size in enumerate(sizes):
        for i in range(size):
            graph.add_node(
                f"l{depth}.{i}", depth=depth, label=f"l{depth}.{i}", input_layer=depth == 0
            )
    for depth in range(layers - 1):
        for i, j in itertools.product(range(sizes[depth]), range(sizes[depth + 1])):
            if draw(st.booleans()):
                graph.add_edge(
                    f"l{depth}.{i}", f"l{depth + 1}.{j}", fraction=draw(st.floats(0.01, 1.0))
                )
    return graph


@given(graph=layered_graphs(), k=st.integers(1, 4))
def test_strongest_paths_match_brute_force(graph, k):
    sources = [n for n in graph if graph.in_degree(n) == 0 and graph.nodes[n]["input_layer"]]
    sinks = [n for n in graph if graph.out_degree(n) == 0 and graph.in_degree(n) > 0]
    brute = []
    for s, t in itertools.product(sources, sinks):
        for path in nx.all_simple_paths(graph, s, t):
            brute.append(
                math.prod(graph.edges[u, v]["fraction"] for u, v in itertools.pairwise(path))
            )
    got = strongest_path_list(graph, k)
    if not brute:  # falls back to paths from any root
        return
    want = sorted(brute, reverse=True)[:k]
    assert [round(s, 12) for _, s in got] == [round(s, 12) for s in want]
    for path, strength in got:
        assert math.isclose(
            strength,
            math.prod(graph.edges[u, v]["fraction"] for u, v in itertools.pairwise(path)),
        )


def test_paths_read_like_the_paper_and_files_round_trip(tmp_path):
    model = _model(TwoConv, 0)
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    structure = discover(model, (x,))
    sub = subnetwork_from_mappings(
        model, structure, {u.name: torch.ones(u.size) for u in structure.units}
    )
    graph = chain_graph(sub, x, class_names=["cat", "dog", "cup"])
    paths = strongest_paths(graph, 3)
    assert len(paths) == 3
    for p in paths:
        parts = p.split(" → ")
        assert parts[0].startswith("conv1.") and parts[1].startswith("conv2.")
        assert parts[2].startswith("logit.") and parts[2][6:] in {"cat", "dog", "cup"}
    write_graphml(graph, tmp_path / "chain.graphml")
    back = nx.read_graphml(tmp_path / "chain.graphml")
    assert set(back.nodes) == set(graph.nodes)
    assert set(back.edges) == set(graph.edges)
    for u, v, d in graph.edges(data=True):
        assert math.isclose(back.edges[u, v]["weight"], d["weight"], rel_tol=1e-6)
    write_dot(graph, tmp_path / "chain.dot")
    dot = (tmp_path / "chain.dot").read_text()
    assert dot == to_dot(graph) and dot.startswith("digraph chain {")
    for u, v in graph.edges:
        assert f'"{u}" -> "{v}"' in dot


def test_chain_graph_needs_inputs_and_a_chain():
    model = _model(TwoConv, 1)
    x = torch.randn(2, 2, 6, 6)
    structure = discover(model, (x,))
    sub = subnetwork_from_mappings(
        model, structure, {u.name: torch.ones(u.size) for u in structure.units}
    )
    with pytest.raises(ValueError, match="inputs"):
        chain_graph(sub)
    with pytest.raises(TypeError, match="Chain or SubNetwork"):
        chain_graph(model, x)
    with pytest.raises(ValueError, match="k must be"):
        strongest_paths(chain_graph(sub, x), 0)


def test_chain_methods_delegate_to_the_graph():
    from captum_chains import ChainExtractor

    model = make_model("plain", width=4, seed=5)
    x = make_inputs(n=4, size=8, seed=5)
    chain = ChainExtractor(model, steps=10, finetune_steps=2).attribute(x, progress=False, seed=0)
    graph = chain.graph()
    assert set(graph.nodes) >= {
        f"{name}.{i}"
        for name, s in chain.importance.items()
        for i in torch.nonzero(s > 0).flatten().tolist()
    }
    paths = chain.paths(2)
    assert paths and all(" → " in p for p in paths)
