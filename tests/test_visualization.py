"""Figures of a chain: SMOE against numpy, activation maximization, graphs, Captum side by side.

Every figure function runs on tiny seeded models with random (or all-ones) sub-networks
and must produce the expected number of panels / marks; numbers behind the figures are
checked against independent computations.
"""

from __future__ import annotations

import copy
import sys
import types
import warnings

import matplotlib
import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients, LayerGradCam, Saliency
from conftest import as_chain, make_inputs, make_model
from hypothesis import given
from hypothesis import strategies as st
from matplotlib.collections import LineCollection, PathCollection
from scipy.stats import norm
from torch import nn

from captum_chains._utils.model_state import ModelSnapshot
from captum_chains.subnetwork import SubNetwork, subnetwork_from_mappings
from captum_chains.units import discover
from captum_chains.visualization import (
    activation_maximization,
    chain_graph_for,
    combine_maps,
    compare,
    compare_attributions,
    firing_maps,
    gauss_norm,
    plot_architecture,
    plot_chain,
    plot_feature_maps,
    plot_filters,
    plot_firing,
    rank_correlation,
    save_figure,
    smoe_layer_maps,
    smoe_saliency,
    smoe_scale,
    strongest_node_paths,
    top_activating_crops,
    weight_graph,
)

matplotlib.use("Agg")

SIZE = 12


# ----------------------------------------------------------------------------- helpers
def numpy_smoe(x: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """SMOE scale over axis 1 written directly from Mundhenk et al. (2019)."""
    x = x.astype(np.float64) + eps
    m = x.mean(axis=1)
    return m * (np.log2(m) - np.log2(x).mean(axis=1))


def random_sub(
    model: nn.Module, x: torch.Tensor, seed: int, keep: float = 0.5, close: bool = False
) -> SubNetwork:
    """A SubNetwork with random scores in [0.2, 1.5] on a random half of each layer."""
    structure = discover(model, (x,))
    gen = torch.Generator().manual_seed(seed)
    importance = {}
    for u in structure.units:
        s = 0.2 + 1.3 * torch.rand(u.size, generator=gen)
        mask = torch.rand(u.size, generator=gen) < keep
        mask[int(torch.randint(u.size, (1,), generator=gen))] = True
        importance[u.name] = s * mask
    gates = {g.name: not close for g in structure.gates}
    return subnetwork_from_mappings(model, structure, importance, gates)


def full_sub(model: nn.Module, x: torch.Tensor) -> SubNetwork:
    structure = discover(model, (x,))
    return subnetwork_from_mappings(
        model, structure, {u.name: torch.ones(u.size) for u in structure.units}
    )


def image_axes(fig) -> list:
    return [ax for ax in fig.axes if ax.images]


@pytest.fixture(scope="module")
def plain():
    model = make_model("plain", width=4, seed=1)
    x = make_inputs(n=4, size=SIZE, seed=1)
    return model, x, random_sub(model, x, seed=3)


# ----------------------------------------------------------------------------- SMOE
@given(
    seed=st.integers(0, 10_000),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 5), st.integers(1, 5)),
    zeros=st.floats(0, 0.8),
)
def test_smoe_scale_matches_numpy(seed, shape, zeros):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen, dtype=torch.float64) * 3
    x[torch.rand(shape, generator=gen) < zeros] = 0
    got = smoe_scale(x).numpy()
    np.testing.assert_allclose(got, numpy_smoe(x.numpy()), rtol=1e-9, atol=1e-12)
    assert (got >= 0).all()


def test_smoe_scale_of_equal_channels_is_zero_and_rejects_negative_maps():
    x = torch.full((2, 5, 3, 3), 0.7)
    assert torch.allclose(smoe_scale(x), torch.zeros(2, 3, 3), atol=1e-12)
    with pytest.raises(ValueError, match="non-negative"):
        smoe_scale(x - 1)


@given(seed=st.integers(0, 10_000))
def test_gauss_norm_is_the_normal_cdf_of_per_image_z_scores(seed):
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(seed))
    flat = x.reshape(3, -1).numpy().astype(np.float64)
    z = (flat - flat.mean(1, keepdims=True)) / flat.std(1, ddof=1, keepdims=True)
    np.testing.assert_allclose(gauss_norm(x).reshape(3, -1).numpy(), norm.cdf(z), atol=1e-6)


def test_combine_maps_is_the_weighted_mean_of_upsampled_maps():
    a = torch.full((2, 3, 3), 2.0)
    b = torch.full((2, 5, 5), 5.0)
    got = combine_maps([a, b], (8, 8), weights=[1, 3], normalize=False)
    assert got.shape == (2, 8, 8)
    assert torch.allclose(got, torch.full((2, 8, 8), (2 + 15) / 4))
    with pytest.raises(ValueError, match="weights"):
        combine_maps([a, b], (8, 8), weights=[1])


def _bn_scaled_copy(model: nn.Module, sub: SubNetwork) -> nn.Module:
    """The plain model's sub-network built by hand: each BN's affine scaled by the scores."""
    clone = copy.deepcopy(model)
    for unit in sub.structure.units:
        bn = clone.get_submodule(unit.site)
        assert isinstance(bn, nn.BatchNorm2d) and unit.hook == "output"
        s = sub.importance[unit.name]
        with torch.no_grad():
            bn.weight.mul_(s)
            bn.bias.mul_(s)
    return clone


def test_layer_maps_equal_numpy_smoe_of_kept_filters(plain):
    model, x, sub = plain
    snap = ModelSnapshot.take(model)
    manual = _bn_scaled_copy(model, sub)
    captured: dict[str, dict[str, torch.Tensor]] = {"original": {}, "subnetwork": {}}
    handles = []
    for net, m in (("original", model), ("subnetwork", manual)):
        for unit in sub.structure.units:
            handles.append(
                m.get_submodule(unit.site).register_forward_hook(
                    lambda mod, a, out, n=unit.name, d=captured[net]: d.__setitem__(n, out)
                )
            )
    with torch.no_grad():
        model(x)
        manual(x)
    for h in handles:
        h.remove()
    got_sub = smoe_layer_maps(sub, x, network="subnetwork", filters="kept")
    got_all = smoe_layer_maps(sub, x, network="original", filters="all")
    for unit in sub.structure.units:
        kept = sub.kept[unit.name].numpy()
        expect_sub = numpy_smoe(captured["subnetwork"][unit.name].clamp_min(0).numpy()[:, kept])
        expect_all = numpy_smoe(captured["original"][unit.name].clamp_min(0).numpy())
        np.testing.assert_allclose(got_sub[unit.name].numpy(), expect_sub, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got_all[unit.name].numpy(), expect_all, rtol=1e-4, atol=1e-6)
    snap.assert_unchanged(model)


def test_smoe_saliency_last_layer_is_the_upsampled_normalized_map(plain):
    _, x, sub = plain
    last = sub.structure.units[-1].name
    maps = smoe_layer_maps(sub, x, [last])
    expected = combine_maps([maps[last]], x.shape[-2:])
    got = smoe_saliency(sub, x, layers="last")
    assert got.shape == (x.shape[0], SIZE, SIZE)
    assert torch.allclose(got, expected)
    both = smoe_saliency(sub, x, layers="kept")
    assert float(both.min()) >= 0 and float(both.max()) <= 1


# ----------------------------------------------------------------------------- architecture
def _marks(fig) -> np.ndarray:
    cols = [c for ax in fig.axes for c in ax.collections if isinstance(c, PathCollection)]
    assert len(cols) == 1
    return np.asarray(cols[0].get_array())


@pytest.mark.parametrize("family", ["plain", "residual", "depthwise"])
def test_architecture_has_one_mark_per_kept_filter(family):
    model = make_model(family, width=4, seed=2)
    x = make_inputs(n=2, size=SIZE, seed=2)
    sub = random_sub(model, x, seed=5, close=family != "plain")
    fig = plot_architecture(sub)
    removed = {u for g in sub.structure.gates if g.name in sub.removed_gates for u in g.units}
    # a layer removed by a closed gate is not part of the chain: no marks, even with scores
    chain = torch.cat([s for n, s in sub.importance.items() if n not in removed])
    scores = _marks(fig)
    assert len(scores) == int((chain > 0).sum())
    assert np.allclose(np.sort(scores), np.sort(chain[chain > 0].numpy()))
    ax = fig.axes[0]
    assert len(ax.get_yticklabels()) == len(sub.structure.units)
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("removed") == len(removed)
    if family != "plain":
        assert removed


def test_architecture_limits_marks_and_rows():
    model = make_model("residual", width=6, seed=0, depth=4)
    x = make_inputs(n=2, size=SIZE)
    sub = random_sub(model, x, seed=1)
    fig = plot_architecture(sub, max_filters=5, max_layers=4)
    drawn = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(drawn) == 4
    pool = torch.cat([sub.importance[n] for n in drawn])
    top5 = np.sort(pool[pool > 0].numpy())[-5:]
    assert np.allclose(np.sort(_marks(fig)), top5)


# ----------------------------------------------------------------------------- feature maps
def test_feature_map_figure_has_two_panels_per_input_and_layer(plain):
    _, x, sub = plain
    fig = plot_feature_maps(sub, x, max_layers=2, max_inputs=2)
    # top row: one image per input; then 2 layers x 2 inputs x (original, sub-network)
    assert len(image_axes(fig)) == 2 + 2 * 2 * 2
    assert len(fig.axes) == 3 * 4


# ----------------------------------------------------------------------------- filters
def test_activation_maximization_raises_the_filter_and_is_deterministic(plain):
    model, x, sub = plain
    snap = ModelSnapshot.take(model)
    unit = sub.structure.units[0]
    run = activation_maximization(sub, unit.name, [0, 1, 2], steps=40, lr=0.1, reference=x, seed=7)
    # the reported objective is the filter's mean BN output on the returned picture
    lo, hi = x.amin(dim=(0, 2, 3), keepdim=True), x.amax(dim=(0, 2, 3), keepdim=True)
    store = {}
    hook = model.get_submodule(unit.site).register_forward_hook(
        lambda m, a, out: store.__setitem__("y", out)
    )
    with torch.no_grad():
        model(lo + run.images * (hi - lo))
        final = store["y"][torch.arange(3), torch.tensor([0, 1, 2])].mean(dim=(1, 2))
        model(x)
        real = store["y"][:, :3].mean(dim=(2, 3))
    hook.remove()
    assert torch.allclose(run.final_activation, final, atol=1e-5)
    gain = run.final_activation - run.start_activation
    spread = real.amax(0) - real.amin(0)
    # measured: gains of 0.07, 1.28 and 0.63 over the grey start image, 10-300x the
    # filters' spread over the real inputs, and above every real input's value
    assert (gain > 5 * spread).all(), (gain, spread)
    assert (run.final_activation > real.amax(0)).all()
    again = activation_maximization(
        sub, unit.name, [0, 1, 2], steps=40, lr=0.1, reference=x, seed=7
    )
    assert torch.equal(run.images, again.images)
    other = activation_maximization(sub, unit.name, [0], steps=3, reference=x, seed=8)
    assert not torch.equal(run.images[:1], other.images)
    assert run.images.shape == (3, 3, SIZE, SIZE)
    assert float(run.images.min()) >= 0 and float(run.images.max()) <= 1
    assert run.labels == [f"{unit.name}.0", f"{unit.name}.1", f"{unit.name}.2"]
    snap.assert_unchanged(model)


def test_activation_maximization_batches_like_single_runs(plain):
    _, x, sub = plain
    layer = sub.structure.units[0].name
    batch = activation_maximization(sub, layer, [1, 2], steps=5, reference=x, batch_size=1)
    assert batch.images.shape[0] == 2
    with pytest.raises(ValueError, match="filters"):
        activation_maximization(sub, layer, [99], steps=1)


def test_top_crops_are_the_peaks_of_the_filter_maps(plain):
    model, x, sub = plain
    unit = sub.structure.units[1]
    store = {}
    h = model.get_submodule(unit.site).register_forward_hook(
        lambda m, a, out: store.__setitem__("y", out)
    )
    with torch.no_grad():
        model(x)
    h.remove()
    peaks = store["y"].amax(dim=(2, 3))  # [N, C]
    got = top_activating_crops(sub, unit.name, [0, 3], x, k=3, out_size=16)
    for row, f in enumerate([0, 3]):
        expect, src = peaks[:, f].topk(3)
        assert torch.allclose(got.values[row], expect)
        assert torch.equal(got.sources[row], src)
    assert got.crops.shape == (2, 3, 3, 16, 16)
    top, left, hh, ww = got.boxes.unbind(-1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + hh <= SIZE).all() and (left + ww <= SIZE).all()


def test_filter_figure_rows_and_columns(plain):
    _, x, sub = plain
    fig = plot_filters(sub, inputs=x, max_filters=2, k=2, steps=3)
    assert len(image_axes(fig)) == 2 * 3


# ----------------------------------------------------------------------------- chain graph
def test_weight_graph_edges_are_scores_times_weight_sums(plain):
    model, _, sub = plain
    graph = weight_graph(sub)  # a bare SubNetwork has no inputs: weights only
    assert graph.number_of_nodes() == sub.num_filters
    units = sub.structure.units
    a, b = units[0], units[1]
    conv = model.get_submodule(b.name)
    sa, sb = sub.importance[a.name], sub.importance[b.name]
    checked = 0
    for i in torch.nonzero(sa > 0).flatten().tolist():
        for j in torch.nonzero(sb > 0).flatten().tolist():
            expected = float(sa[i] * sb[j] * conv.weight[j, i].abs().sum())
            assert graph.edges[f"{a.name}.{i}", f"{b.name}.{j}"]["weight"] == pytest.approx(
                expected, rel=1e-5
            )
            checked += 1
    assert checked > 0


def test_depthwise_graph_links_each_filter_to_its_own_channel():
    model = make_model("depthwise", width=4, seed=0)
    x = make_inputs(n=2, size=SIZE)
    graph = weight_graph(full_sub(model, x))
    dw = next(u for u in discover(model, (x,)).units if u.depthwise)
    for node in graph.nodes:
        if graph.nodes[node]["layer"] == dw.name:
            (pred,) = graph.predecessors(node)
            assert pred.endswith(f".{graph.nodes[node]['index']}")


def test_strongest_paths_follow_the_heaviest_edges():
    import networkx as nx

    g = nx.DiGraph()
    for layer, depth in (("a", 0), ("b", 1), ("c", 2)):
        for i in range(2):
            g.add_node(f"{layer}.{i}", layer=layer, index=i, depth=depth)
    g.add_edge("a.0", "b.0", weight=1.0)
    g.add_edge("a.1", "b.0", weight=4.0)
    g.add_edge("a.1", "b.1", weight=2.0)
    g.add_edge("b.0", "c.0", weight=3.0)
    g.add_edge("b.1", "c.1", weight=3.0)
    paths = strongest_node_paths(g, k=2)
    assert paths[0] == (["a.1", "b.0", "c.0"], pytest.approx(1.0))
    assert paths[1] == (["a.1", "b.1", "c.1"], pytest.approx(0.5))


@pytest.mark.parametrize("source", ["weights", "chains"])
def test_chain_figure_draws_the_top_filters_of_each_layer(plain, source):
    _, x, sub = plain
    fig = plot_chain(as_chain(sub, x), max_filters=2, paths=2, source=source)
    expected = sum(min(2, int(k.sum())) for k in sub.kept.values())
    assert len(_marks(fig)) == expected
    red = [c for c in fig.axes[0].collections if isinstance(c, LineCollection)][-1]
    assert len(red.get_segments()) >= len(sub.structure.units) - 1  # a path through all layers
    logits = [line for line in fig.axes[0].lines if line.get_marker() == "s"]
    assert bool(logits) == (source == "chains")


def test_chain_graph_uses_the_chains_module_when_present(plain, monkeypatch):
    import networkx as nx

    _, x, sub = plain
    a, b = sub.structure.units[0].name, sub.structure.units[1].name
    i = int(torch.nonzero(sub.kept[a])[0])
    j = int(torch.nonzero(sub.kept[b])[0])

    def chain_graph(chain, inputs, **kw):
        g = nx.DiGraph()
        g.add_edge(f"{a}.{i}", f"{b}.{j}", weight=2.5)
        return g

    fake = types.SimpleNamespace(chain_graph=chain_graph)
    monkeypatch.setitem(sys.modules, "captum_chains.chains", fake)
    graph = chain_graph_for(as_chain(sub, x))
    assert graph.graph["source"] == "chains"
    assert set(graph.edges) == {(f"{a}.{i}", f"{b}.{j}")}
    assert graph.nodes[f"{a}.{i}"]["layer"] == a and graph.nodes[f"{a}.{i}"]["index"] == i
    assert graph.nodes[f"{a}.{i}"]["score"] == pytest.approx(float(sub.importance[a][i]))
    # without inputs (a bare SubNetwork) the weight graph is used
    assert chain_graph_for(sub).graph["source"] == "weights"


# ----------------------------------------------------------------------------- compare
METHODS = [IntegratedGradients, LayerGradCam, Saliency]
FAST = {IntegratedGradients: {"n_steps": 8}}


def test_compare_on_the_full_network_gives_identical_maps_and_rank_correlation_one():
    model = make_model("residual", width=4, seed=0)
    x = make_inputs(n=2, size=SIZE)
    sub = full_sub(model, x)
    res = compare_attributions(sub, x, METHODS, method_kwargs=FAST)
    for name in res.methods:
        assert torch.allclose(res.original[name], res.subnetwork[name], atol=1e-6)
        assert res.rank_correlation[name] == [pytest.approx(1.0)] * 2
    assert "IntegratedGradients" in res.table()


def test_compare_table_says_n_a_where_every_rho_is_undefined():
    """A sparse chain can leave a method's map constant on every input (rho is NaN): the
    table and the figure's title say so instead of warning about an empty mean."""
    from captum_chains.visualization.compare import Comparison, _mean_text

    empty = torch.zeros(0)
    res = Comparison(
        methods=["LayerGradCam", "Saliency"],
        targets=empty,
        original={},
        subnetwork={},
        signs={},
        neurochains=empty,
        rank_correlation={"LayerGradCam": [float("nan")] * 2, "Saliency": [0.5, float("nan")]},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lines = res.table().splitlines()
        assert _mean_text(res.rank_correlation["LayerGradCam"]) == "n/a"
    assert "n/a" in lines[1] and "constant" in lines[1]
    assert lines[2].split()[1:] == ["0.500", "0.500", "0.500"]


def test_compare_subnetwork_attributions_equal_captum_on_the_subnetwork_module(plain):
    model, x, sub = plain
    snap = ModelSnapshot.take(model)
    res = compare_attributions(sub, x, METHODS, method_kwargs=FAST)
    targets = res.targets
    ig = IntegratedGradients(sub).attribute(x, target=targets, n_steps=8).sum(1)
    ig = ig.to(res.subnetwork["IntegratedGradients"].dtype)  # captum 0.7 returns float64
    assert torch.allclose(res.subnetwork["IntegratedGradients"], ig, atol=1e-5)
    layer = sub.model.get_submodule(res.layer)
    cam = LayerGradCam(sub, layer).attribute(x, target=targets)
    cam = LayerGradCam.interpolate(cam, tuple(x.shape[-2:]), "bilinear").sum(1)
    assert torch.allclose(res.subnetwork["LayerGradCam"], cam, atol=1e-5)
    sal = Saliency(model).attribute(x, target=targets).sum(1)
    assert torch.allclose(res.original["Saliency"], sal, atol=1e-6)
    snap.assert_unchanged(model)


def test_compare_figure_has_image_methods_and_neurochains_columns(plain):
    _, x, sub = plain
    fig, res = compare(sub, x, METHODS, method_kwargs=FAST, max_inputs=2, return_result=True)
    assert len(fig.axes) == 2 * (2 + 2 * len(METHODS))
    assert res.neurochains.shape == (2, SIZE, SIZE)
    titles = [ax.get_title() for ax in fig.axes]
    assert sum("ρ =" in t for t in titles) == 2 * len(METHODS)
    with pytest.raises(TypeError, match="Captum attribution classes"):
        compare(sub, x, ["IG"])


def test_rank_correlation_handles_ties_and_constants():
    assert rank_correlation([1, 2, 2, 3], [10, 20, 20, 30]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))


# ----------------------------------------------------------------------------- firing
def test_firing_on_the_full_network_is_identical(plain):
    model, x, _ = plain
    sub = full_sub(model, x)
    layer = sub.structure.units[1].name
    orig, subm = firing_maps(sub, x, layer, [0, 1])
    assert torch.equal(orig, subm)
    fig = plot_firing(sub, x, max_filters=3, max_inputs=2)
    assert len(image_axes(fig)) == 2 + 3 * 2 * 2
    titles = [ax.get_title() for ax in fig.axes if "r=" in ax.get_title()]
    assert titles and all("r=1.00" in t for t in titles)


# ----------------------------------------------------------------------------- io, invariants
@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_figures_save_in_every_format(plain, tmp_path, suffix):
    _, _, sub = plain
    path = save_figure(plot_architecture(sub), tmp_path / f"arch{suffix}")
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="suffix"):
        save_figure(plot_architecture(sub), tmp_path / "arch.jpg")


def test_figures_accept_a_real_extracted_chain_and_leave_the_model_unchanged():
    from captum_chains import ChainExtractor

    model = make_model("residual", width=4, seed=4)
    x = make_inputs(n=3, size=SIZE, seed=4)
    chain = ChainExtractor(model, steps=20, finetune_steps=3, gate_penalty=0.05).attribute(
        x, progress=False
    )
    snap = ModelSnapshot.take(model)
    plot_architecture(chain)
    plot_feature_maps(chain, max_layers=2, max_inputs=1)
    plot_firing(chain, max_filters=2, max_inputs=1)
    plot_chain(chain, max_filters=3)
    compare(chain, methods=[Saliency, LayerGradCam], max_inputs=1)
    snap.assert_unchanged(model)


def test_helpful_errors():
    model = make_model("plain", width=4)
    x = make_inputs(n=2, size=SIZE)
    sub = full_sub(model, x)
    with pytest.raises(TypeError, match="Chain or SubNetwork"):
        plot_architecture(model)
    with pytest.raises(ValueError, match="needs inputs"):
        plot_feature_maps(sub)
    with pytest.raises(ValueError, match="no such unit layer"):
        smoe_layer_maps(sub, x, ["nope"])
