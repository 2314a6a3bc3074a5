"""Evaluation tools of the critical-pathways module: sanity check, LeRF/MoRF, Captum
metrics, and the overlap with NeuroChains chains."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from captum.attr import Saliency
from scipy import stats
from torch import nn

from captum_chains._utils.model_state import ModelSnapshot
from captum_chains.pathways import (
    CriticalPathways,
    CriticalPathwaysResult,
    PathwayGradient,
    captum_scores,
    cascading_randomization,
    default_randomization_layers,
    filters_on_pathway,
    map_similarity,
    pathway_chain_overlap,
    perturbation_curves,
)


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 4),
    ).eval()


def smooth_inputs(n: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=gen)
    return nn.functional.avg_pool2d(x, 3, 1, 1) * 3


# --------------------------------------------------------------------------- sanity check


def pathway_gradient(model, x, target):
    return PathwayGradient(model).attribute(x, target=target, percentile=70)


def test_randomization_steps_follow_the_forward_order_top_first():
    model = small_cnn()
    assert default_randomization_layers(model, torch.randn(1, 1, 16, 16)) == ["8", "5", "2", "0"]


def test_cascading_randomization_drops_spearman_and_leaves_model_alone():
    model = small_cnn()
    x = smooth_inputs()
    snapshot = ModelSnapshot.take(model)
    res = cascading_randomization(model, x, pathway_gradient, seed=1, keep_maps=True)
    snapshot.assert_unchanged(model)
    assert res.steps == ("original", "8", "5", "2", "0")
    np.testing.assert_allclose(res.spearman[0], 1.0)
    np.testing.assert_allclose(res.ssim[0], 1.0)
    # every randomization step decorrelates the pathway gradient from the trained one
    assert (np.abs(res.spearman[1:].mean(1)) < 0.5).all()
    assert (res.spearman_abs[1:].mean(1) < 0.6).all()
    assert (res.ssim[1:].mean(1) < 0.6).all()
    table = res.summary()
    assert list(table.columns) == ["step", "spearman", "spearman_abs", "ssim", "constant_maps"]
    assert len(res.maps) == 5 and res.maps[0].shape == (3, 16, 16)


def test_an_explanation_blind_to_the_weights_passes_unchanged():
    """The metric reacts to the method, not to the randomization itself."""
    model = small_cnn()
    x = smooth_inputs()
    res = cascading_randomization(model, x, lambda m, inp, t: inp * 2.0, target=0)
    np.testing.assert_allclose(res.spearman, 1.0)
    np.testing.assert_allclose(res.ssim, 1.0)


def test_map_similarity_matches_scipy():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 8, 8, generator=gen) * 2 - 1, torch.rand(2, 8, 8, generator=gen) * 2 - 1
    rho, rho_abs, _ = map_similarity(a, b)
    for i in range(2):
        assert rho[i] == pytest.approx(stats.spearmanr(a[i].ravel(), b[i].ravel())[0])
        assert rho_abs[i] == pytest.approx(
            stats.spearmanr(a[i].abs().ravel(), b[i].abs().ravel())[0]
        )
    rho, rho_abs, _ = map_similarity(a, -a)
    np.testing.assert_allclose(rho, -1.0)
    np.testing.assert_allclose(rho_abs, 1.0)
    zero = torch.zeros_like(a)
    rho, rho_abs, _ = map_similarity(a, zero)  # a blank map shares no ranking
    np.testing.assert_array_equal(rho, 0.0)
    np.testing.assert_array_equal(rho_abs, 0.0)
    _, _, same = map_similarity(a, a)
    _, _, other = map_similarity(a, b)
    np.testing.assert_allclose(same, 1.0)
    assert (other < 0.5).all()


# --------------------------------------------------------------------------- LeRF / MoRF


class LinearScorer(nn.Module):
    """Two logits: <w, x> and 0, so the removed pixels' contribution is exact."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def forward(self, x):
        score = (x * self.weight).flatten(1).sum(1)
        return torch.stack([score, torch.zeros_like(score)], 1)


def test_lerf_and_morf_swap_for_negated_signed_relevance():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(1, 2, 6, 6, generator=gen)
    model = LinearScorer(weight).eval()
    x = torch.randn(3, 2, 6, 6, generator=gen)
    attr = torch.randn(3, 2, 6, 6, generator=gen)
    a = perturbation_curves(model, x, attr, target=0, relevance="signed")
    b = perturbation_curves(model, x, -attr, target=0, relevance="signed")
    np.testing.assert_allclose(a.lerf_logit, b.morf_logit, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.morf_prob, b.lerf_prob, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.lerf_logit[0], a.base_logit, rtol=1e-6)


def test_perturbation_values_equal_a_direct_computation():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(1, 2, 4, 4, generator=gen)
    model = LinearScorer(weight).eval()
    x = torch.randn(2, 2, 4, 4, generator=gen)
    attr = (weight * x).detach()  # Gradient x Input of the linear scorer
    curves = perturbation_curves(model, x, attr, target=0, fractions=(0.0, 0.25, 1.0))
    mean = x.mean(dim=(2, 3), keepdim=True)
    relevance = attr.abs().sum(1).flatten(1)
    for i in range(2):
        top = torch.argsort(relevance[i], descending=True)[:4]  # 25% of 16 pixels
        removed = x[i].clone().flatten(1)
        removed[:, top] = mean[i].flatten(1)
        expected = float((removed.view_as(x[i]) * weight[0]).sum())
        assert curves.morf_logit[1, i] == pytest.approx(expected, rel=1e-5, abs=1e-5)
        everything = float((mean[i] * weight[0]).sum())
        assert curves.lerf_logit[2, i] == pytest.approx(everything, rel=1e-5, abs=1e-5)
    assert curves.summary()["gap"] > 0  # Gradient x Input is exact for a linear model


def test_perturbation_rejects_mismatched_maps():
    model = small_cnn()
    with pytest.raises(ValueError, match="upsample"):
        perturbation_curves(model, torch.randn(2, 1, 16, 16), torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match="increasing"):
        perturbation_curves(
            model, torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16), fractions=(0.5, 0.1)
        )


def test_captum_metrics_vanish_for_exact_gradients_of_a_linear_model():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(1, 2, 4, 4, generator=gen)
    model = LinearScorer(weight).eval()
    x = torch.randn(3, 2, 4, 4, generator=gen)
    saliency = Saliency(model)
    attr = saliency.attribute(x, target=0, abs=False)
    scores = captum_scores(model, x, saliency.attribute, attr, target=0, abs=False)
    assert scores["infidelity"].shape == (3,) and scores["sensitivity_max"].shape == (3,)
    torch.testing.assert_close(scores["infidelity"], torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(scores["sensitivity_max"], torch.zeros(3), atol=1e-6, rtol=0)
    noisy = captum_scores(model, x, None, torch.randn_like(x), target=0)
    assert (noisy["infidelity"] > 1e-3).all()
    assert torch.isnan(noisy["sensitivity_max"]).all()  # None skips sensitivity


def test_captum_metrics_run_on_the_pathway_gradient():
    model = small_cnn()
    x = smooth_inputs(2)
    pg = PathwayGradient(model)
    attr = pg.attribute(x, target=1, percentile=70)
    scores = captum_scores(
        model, x, pg.attribute, attr, target=1, n_perturb_samples=3, percentile=70
    )
    assert torch.isfinite(scores["infidelity"]).all() and (scores["sensitivity_max"] >= 0).all()


# --------------------------------------------------------------------------- overlap


class ConvBnReluNet(nn.Module):
    """conv_a -> BN -> ReLU ; conv_b -> BN (no activation) ; + ; conv_c -> ReLU -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(1, 3, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(3)
        self.act_a = nn.ReLU()
        self.conv_b = nn.Conv2d(3, 3, 1)
        self.bn_b = nn.BatchNorm2d(3)
        self.conv_c = nn.Conv2d(3, 2, 3, padding=1)
        self.act_c = nn.ReLU()
        self.head = nn.Linear(2 * 4 * 4, 2)

    def forward(self, x):
        a = self.act_a(self.bn_a(self.conv_a(x)))
        b = self.bn_b(self.conv_b(a)) + a
        c = self.act_c(self.conv_c(b))
        return self.head(c.flatten(1))


def crafted_pathways(model: nn.Module, x: torch.Tensor) -> CriticalPathwaysResult:
    res = CriticalPathways(model).attribute(x, target=0, percentile=50)
    masks = {n: torch.zeros_like(m) for n, m in res.masks.items()}
    # example 0: channel 0 and 2 of act_a (one position each), channel 1 of act_c
    masks["act_a"][0, 0, 1, 1] = masks["act_a"][0, 2, 0, 0] = True
    masks["act_c"][0, 1, 3, 3] = True
    # example 1: channel 1 of act_a only
    masks["act_a"][1, 1, 2, 2] = True
    return CriticalPathwaysResult(
        sites=res.sites,
        contributions=res.contributions,
        masks=masks,
        percentile=res.percentile,
        method=res.method,
        target=res.target,
        output=res.output,
    )


def test_overlap_counts_filters_by_hand():
    torch.manual_seed(0)
    model = ConvBnReluNet().eval()
    x = torch.randn(2, 1, 4, 4)
    pathways = crafted_pathways(model, x)
    on = filters_on_pathway(pathways)
    assert set(on) == {"conv_a", "conv_c"}  # conv_b and the head reach no activation
    assert on["conv_a"].tolist() == [[True, False, True], [False, True, False]]
    importance = {
        "conv_a": torch.tensor([0.7, 0.0, 0.2]),  # keeps filters 0, 2
        "conv_b": torch.tensor([1.0, 1.0, 1.0]),
        "conv_c": torch.tensor([0.0, 0.4]),  # keeps filter 1
    }
    chain = SimpleNamespace(importance=importance)  # duck-typed NeuroChains Chain
    result = pathway_chain_overlap(chain, pathways)
    assert result.layers == ("conv_a", "conv_c") and result.unmapped == ("conv_b",)
    # kept K = {a0, a2, c1}; P_0 = {a0, a2, c1}; P_1 = {a1}; F = 5 mapped filters
    torch.testing.assert_close(
        result.chain_on_pathway, torch.tensor([1.0, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        result.pathway_in_chain, torch.tensor([1.0, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        result.chance_chain_on_pathway, torch.tensor([3 / 5, 1 / 5], dtype=torch.float64)
    )
    assert result.chance_pathway_in_chain == pytest.approx(3 / 5)
    assert result.summary()["chain_on_pathway"] == pytest.approx(0.5)
    table = result.per_layer()
    assert table["kept_by_chain"].tolist() == [2, 1]
    same = pathway_chain_overlap(importance, pathways)
    torch.testing.assert_close(same.chain_on_pathway, result.chain_on_pathway)


def test_overlap_errors():
    torch.manual_seed(0)
    model = ConvBnReluNet().eval()
    pathways = crafted_pathways(model, torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match="output channels"):
        pathway_chain_overlap({"conv_a": torch.ones(5)}, pathways)
    with pytest.raises(ValueError, match="feeds an activation"):
        pathway_chain_overlap({"conv_b": torch.ones(3)}, pathways)
    with pytest.raises(TypeError, match="importance"):
        pathway_chain_overlap(object(), pathways)


def test_pathway_gradient_runs_inside_compare_on_model_and_subnetwork():
    from captum_chains.neurochains import ChainExtractor
    from captum_chains.visualization.compare import compare_attributions

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    chain = ChainExtractor(model, steps=3).attribute(x, progress=False, seed=0)
    snapshot = ModelSnapshot.take(model)
    result = compare_attributions(chain, x, [Saliency, PathwayGradient], layer="3")
    snapshot.assert_unchanged(model)
    assert result.original["PathwayGradient"].shape == (3, 8, 8)
    assert len(result.rank_correlation["PathwayGradient"]) == 3
