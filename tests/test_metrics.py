"""The chain metrics against independent computations on tiny models.

The reference for a masked network is a *copy* of the model whose BatchNorm affine
parameters are multiplied by the scores (a BN output times s equals the BN with weight
and bias times s), with a closed layer gate replaced by ``nn.Identity`` - no hooks, no
masking code. Neighbours are found by brute force, attacks re-implemented by hand.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from captum_chains import ChainExtractor, discover
from captum_chains._utils.model_state import ModelSnapshot
from captum_chains.metrics import (
    complement_subnetwork,
    faithfulness,
    fidelity,
    fidelity_from_probs,
    find_classifier,
    firing_correlation,
    nearest_neighbours,
    penultimate_features,
    prediction_quotient,
    quotient,
    robustness,
    stability,
)
from captum_chains.subnetwork import subnetwork_from_mappings

# --------------------------------------------------------------------------- models


def tiny_cnn(seed: int, classes: int = 3) -> nn.Sequential:
    """conv(1->4)-BN-ReLU-conv(4->4)-BN-ReLU-pool-MLP; units "0" (site "1"), "3" (site "4")."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 6),
        nn.ReLU(),
        nn.Linear(6, classes),
    )
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.copy_(0.1 * torch.randn(4))
            bn.running_var.copy_(0.5 + torch.rand(4))
            bn.weight.copy_(1 + 0.3 * torch.randn(4))
            bn.bias.copy_(0.2 * torch.randn(4))
    return model.eval()


def inputs(seed: int, n: int = 6) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def reference(model: nn.Sequential, s1, s2, gate_open: bool = True) -> nn.Sequential:
    """A hook-free copy computing the masked network."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref[1].weight.mul_(s1)
        ref[1].bias.mul_(s1)
        if gate_open:
            ref[4].weight.mul_(s2)
            ref[4].bias.mul_(s2)
        else:
            ref[3] = nn.Identity()
            ref[4] = nn.Identity()
    return ref.eval()


def make_sub(model, s1, s2, gate_open=True):
    structure = discover(model, (inputs(0, 2),))
    assert [u.name for u in structure.units] == ["0", "3"]
    assert [g.name for g in structure.gates] == ["3"]
    s2_eff = s2 if gate_open else torch.zeros(4)
    return subnetwork_from_mappings(model, structure, {"0": s1, "3": s2_eff}, {"3": gate_open})


def random_scores(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s1 = torch.rand(4, generator=g) * 1.5
    s2 = torch.rand(4, generator=g) * 1.5
    s1[torch.rand(4, generator=g) < 0.3] = 0
    s2[torch.rand(4, generator=g) < 0.3] = 0
    s1[0] = max(float(s1[0]), 0.5)  # keep the net alive
    return s1, s2


def probs(model, x):
    with torch.no_grad():
        return F.softmax(model(x).double(), dim=1)


FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- fidelity


@FAST
@given(seed=st.integers(0, 10_000), gate_open=st.booleans())
def test_fidelity_matches_hook_free_reference(seed, gate_open):
    model = tiny_cnn(seed % 7)
    s1, s2 = random_scores(seed)
    sub = make_sub(model, s1, s2, gate_open)
    x = inputs(seed)
    result = fidelity(sub, x)
    p = probs(model, x).numpy()
    q = probs(reference(model, s1, s2, gate_open), x).numpy()
    y = p.argmax(1)
    rows = np.arange(len(y))
    np.testing.assert_array_equal(result.predicted.numpy(), y)
    np.testing.assert_allclose(result.drop.numpy(), p[rows, y] - q[rows, y], atol=1e-5)
    kl = (p * (np.log(p) - np.log(q))).sum(1)
    np.testing.assert_allclose(result.kl.numpy(), kl, atol=1e-4, rtol=1e-4)
    sorted_q = np.sort(q, axis=1)
    clear = sorted_q[:, -1] - sorted_q[:, -2] > 1e-4
    np.testing.assert_array_equal(result.agreement.numpy()[clear], (q.argmax(1) == y)[clear])
    assert result.mean_drop == pytest.approx(float(np.mean(p[rows, y] - q[rows, y])), abs=1e-5)


def test_fidelity_of_the_unmasked_network_is_exact():
    model = tiny_cnn(1)
    sub = make_sub(model, torch.ones(4), torch.ones(4))
    result = fidelity(sub, inputs(3))
    assert torch.equal(result.drop, torch.zeros(6))
    assert bool(result.agreement.all())
    assert torch.equal(result.kl, torch.zeros(6))


def test_fidelity_from_probs_hand_values():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    q = torch.tensor([[0.4, 0.5, 0.1], [0.2, 0.2, 0.6]])
    r = fidelity_from_probs(p, q)
    assert r.predicted.tolist() == [0, 2]
    assert r.drop.tolist() == pytest.approx([0.3, 0.0])
    assert r.agreement.tolist() == [False, True]
    kl0 = 0.7 * math.log(0.7 / 0.4) + 0.2 * math.log(0.2 / 0.5)
    kl1 = 0.1 * math.log(0.1 / 0.2) + 0.3 * math.log(0.3 / 0.2)
    assert r.kl.tolist() == pytest.approx([kl0, kl1], abs=1e-6)
    assert r.agreement_rate == 0.5
    with pytest.raises(ValueError, match="same shape"):
        fidelity_from_probs(p, q[:, :2])


def test_metrics_accept_a_chain_and_default_to_its_region():
    model = tiny_cnn(2)
    x = inputs(5)
    chain = ChainExtractor(model, steps=8, lr=0.05, finetune_steps=2).attribute(x, progress=False)
    a = fidelity(chain)
    b = fidelity(chain.subnetwork, x)
    assert torch.equal(a.drop, b.drop)
    with pytest.raises(ValueError, match="holds no inputs"):
        fidelity(chain.subnetwork)
    with pytest.raises(TypeError, match="Chain"):
        fidelity(model, x)


# --------------------------------------------------------------------------- quotient


def test_quotient_hand_values_and_sign_flip():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.5, 0.5, 0.0]])
    q = torch.tensor([[0.5, 0.3, 0.2], [0.3, 0.6, 0.1], [0.9, 0.1, 0.0]])
    out = quotient(p, q)
    assert out[0].item() == pytest.approx((0.5 - 0.3) / (0.7 - 0.2))
    assert out[1].item() == pytest.approx((0.3 - 0.6) / (0.7 - 0.2))  # flipped: negative
    assert out[1] < 0
    assert math.isnan(out[2].item())  # tie in p: undefined
    assert torch.allclose(quotient(p[:2], p[:2]), torch.ones(2, dtype=torch.float64))
    logits = torch.randn(4, 5)
    assert torch.allclose(
        quotient(logits, 2 * logits, logits=True),
        quotient(F.softmax(logits, 1), F.softmax(2 * logits, 1)),
    )
    with pytest.raises(ValueError, match="same shape"):
        quotient(p, q[:, :2])
    with pytest.raises(ValueError, match="2 classes"):
        quotient(torch.ones(2, 1), torch.ones(2, 1))


@FAST
@given(seed=st.integers(0, 10_000))
def test_quotient_is_negative_exactly_when_the_prediction_flips(seed):
    g = torch.Generator().manual_seed(seed)
    p = F.softmax(3 * torch.randn(20, 4, generator=g, dtype=torch.float64), 1)
    q = F.softmax(3 * torch.randn(20, 4, generator=g, dtype=torch.float64), 1)
    out = quotient(p, q)
    flipped = q.argmax(1) != p.argmax(1)
    assert torch.equal(out < 0, flipped)


def test_prediction_quotient_and_complement_match_reference():
    model = tiny_cnn(4)
    s1, s2 = random_scores(11)
    sub = make_sub(model, s1, s2)
    x = inputs(2)
    p = probs(model, x)
    q = probs(reference(model, s1, s2), x)
    assert torch.allclose(prediction_quotient(sub, x), quotient(p, q), atol=1e-4)
    comp = complement_subnetwork(sub)
    assert torch.equal(comp.scores, (sub.scores <= 0).float())
    assert bool(comp.gates_open.all())
    qc = probs(reference(model, (s1 <= 0).float(), (s2 <= 0).float()), x)
    assert torch.allclose(
        prediction_quotient(sub, x, network="complement"), quotient(p, qc), atol=1e-4
    )
    with pytest.raises(ValueError, match="network"):
        prediction_quotient(sub, x, network="other")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- faithfulness


def test_faithfulness_matches_one_removal_at_a_time_reference():
    model = tiny_cnn(5)
    s1, s2 = random_scores(3)
    sub = make_sub(model, s1, s2)
    x = inputs(7)
    result = faithfulness(sub, x, batch_size=12)  # 2 removals per forward pass
    small = faithfulness(sub, x, batch_size=1)  # one removal per pass
    cols = ["degradation", "drop", "kl", "agreement"]
    # batching changes the float32 reduction order: probabilities agree to ~float32 eps, and
    # ``degradation`` (a difference of two probabilities) only to that absolute level
    np.testing.assert_allclose(
        result.table[cols].to_numpy(), small.table[cols].to_numpy(), rtol=1e-6, atol=1e-7
    )
    p = probs(model, x)
    y = p.argmax(1)
    q = probs(reference(model, s1, s2), x)
    qy = q[torch.arange(len(y)), y]
    expected = []
    for layer, scores in (("0", s1), ("3", s2)):
        for i in torch.nonzero(scores > 0).flatten().tolist():
            a, b = s1.clone(), s2.clone()
            (a if layer == "0" else b)[i] = 0
            r = probs(reference(model, a, b), x)
            ry = r[torch.arange(len(y)), y]
            expected.append(
                (layer, i, float((qy - ry).mean()), float((p[range(len(y)), y] - ry).mean()))
            )
    assert list(zip(result.table["layer"], result.table["unit"], strict=True)) == [
        (e[0], e[1]) for e in expected
    ]
    np.testing.assert_allclose(result.table["degradation"], [e[2] for e in expected], atol=1e-5)
    np.testing.assert_allclose(result.table["drop"], [e[3] for e in expected], atol=1e-5)
    assert result.table["label"].iloc[0] == f"{expected[0][0]}.{expected[0][1]}"


class ThreeFilters(nn.Module):
    """logits = [h, -h], h = mean over pixels of sum_c w_c x with w = (2, 1, 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([2.0, 1.0, 0.0]).view(3, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]))

    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).flatten(1))


def test_faithfulness_removing_the_carrying_filter_hurts_in_closed_form():
    model = ThreeFilters().eval()
    x = 0.2 + 0.3 * torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    structure = discover(model, (x[:2],))
    scores = torch.tensor([1.0, 0.6, 0.3])
    sub = subnetwork_from_mappings(model, structure, {"conv": scores})
    result = faithfulness(sub, x)
    m = x.mean(dim=(1, 2, 3)).double()
    weights = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    h = m * (weights * scores.double()).sum()
    q = torch.sigmoid(2 * h)  # class 0 is predicted for positive inputs
    for i in range(3):
        reduced = scores.double().clone()
        reduced[i] = 0
        qi = torch.sigmoid(2 * m * (weights * reduced).sum())
        assert result.table["degradation"][i] == pytest.approx(float((q - qi).mean()), abs=1e-6)
    assert result.table["degradation"][2] == pytest.approx(0.0, abs=1e-7)  # zero-weight filter
    assert result.table["degradation"][0] > result.table["degradation"][1] > 0
    assert result.spearman == pytest.approx(1.0)
    assert result.pearson > 0.9


def test_faithfulness_subset_and_too_few_units():
    model = tiny_cnn(6)
    sub = make_sub(model, torch.ones(4), torch.ones(4))
    x = inputs(1)
    part = faithfulness(sub, x, max_units=3, seed=1)
    assert len(part.table) == 3
    full = faithfulness(sub, x)
    merged = full.table.merge(part.table, on=["layer", "unit"], suffixes=("", "_p"))
    np.testing.assert_allclose(merged["degradation"], merged["degradation_p"], atol=1e-6)
    one = make_sub(model, torch.tensor([1.0, 0, 0, 0]), torch.tensor([0.5, 0, 0, 0]))
    tiny = faithfulness(one, x)
    assert len(tiny.table) == 2 and math.isnan(tiny.pearson)
    nothing = faithfulness(make_sub(model, torch.zeros(4), torch.zeros(4)), x)
    assert len(nothing.table) == 0 and math.isnan(nothing.pearson)  # a chain of no filter
    with pytest.raises(ValueError, match="max_units"):
        faithfulness(sub, x, max_units=0)


# --------------------------------------------------------------------------- stability


def hand_features(model: nn.Sequential, x: torch.Tensor) -> np.ndarray:
    """Input of the last Linear, computed layer by layer."""
    with torch.no_grad():
        h = x
        for layer in list(model)[:-1]:
            h = layer(h)
    return h.double().numpy()


def test_find_classifier_and_features():
    model = tiny_cnn(0)
    assert find_classifier(model, inputs(0, 2)) == "10"

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = tiny_cnn(1)

        def forward(self, x):
            return 2.0 * self.body(x)  # a parameter-free op after the classifier

    assert find_classifier(Scaled().eval(), inputs(0, 2)) == "body.10"
    x = inputs(3)
    np.testing.assert_allclose(
        penultimate_features(model, x).numpy(), hand_features(model, x), atol=1e-6
    )


def test_stability_matches_brute_force_neighbours():
    model = tiny_cnn(8)
    s1, s2 = random_scores(21)
    sub = make_sub(model, s1, s2)
    x = inputs(4, n=4)
    pool = inputs(99, n=30)
    labels = torch.randint(0, 3, (30,), generator=torch.Generator().manual_seed(0))
    result = stability(sub, pool, x, ks=(1, 3, 7), pool_labels=labels)
    fx, fp = hand_features(model, x), hand_features(model, pool)
    p = probs(model, pool).numpy()
    q = probs(reference(model, s1, s2), pool).numpy()
    for k in (1, 3, 7):
        sets = set()
        for i in range(len(fx)):
            d = [float(np.sqrt(((fx[i] - fp[j]) ** 2).sum())) for j in range(len(fp))]
            sets.update(sorted(range(len(fp)), key=lambda j: (d[j], j))[:k])
        ids = sorted(sets)
        row = result.table[result.table["k"] == k].iloc[0]
        assert row["neighbours"] == len(ids)
        assert result.neighbours(k).tolist() == ids
        agree = np.mean(q[ids].argmax(1) == p[ids].argmax(1))
        assert row["agreement"] == pytest.approx(agree)
        assert result.agreement(k) == pytest.approx(agree)
        y = p[ids].argmax(1)
        drop = np.mean(p[ids, y] - q[ids, y])
        assert row["mean_drop"] == pytest.approx(drop, abs=1e-5)
        assert row["model_accuracy"] == pytest.approx(np.mean(y == labels.numpy()[ids]))
    # duplicates removed: the union never exceeds N * K and is monotone in K
    counts = result.table["neighbours"].tolist()
    assert counts == sorted(counts) and counts[-1] <= 4 * 7


def test_nearest_neighbours_ties_and_errors():
    q = torch.tensor([[0.0], [10.0]])
    pool = torch.tensor([[1.0], [-1.0], [9.0], [11.0], [0.0]])
    assert nearest_neighbours(q, pool, 3).tolist() == [[4, 0, 1], [2, 3, 0]]
    with pytest.raises(ValueError, match="larger than the pool"):
        nearest_neighbours(q, pool, 6)


def test_stability_bad_input():
    model = tiny_cnn(0)
    sub = make_sub(model, torch.ones(4), torch.ones(4))
    x = inputs(0, 4)
    with pytest.raises(ValueError, match="larger than the pool"):
        stability(sub, inputs(1, 5), x, ks=(1, 6))
    with pytest.raises(ValueError, match="shape"):
        stability(sub, torch.randn(10, 1, 9, 9), x, ks=(1,))
    with pytest.raises(ValueError, match="positive int"):
        stability(sub, inputs(1, 5), x, ks=(0,))
    with pytest.raises(ValueError, match="pool_labels"):
        stability(sub, inputs(1, 5), x, ks=(1,), pool_labels=torch.zeros(3))
    with pytest.raises(TypeError, match="pool"):
        stability(sub, [1, 2, 3], x)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- robustness


def hand_fgsm(net, x, y, eps):
    """x + eps * sign(grad_x CE), and a mask of the gradient entries clear of rounding."""
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(net(x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return (x + eps * grad.sign()).detach(), grad.abs() > 1e-6


def test_fgsm_matches_hand_implementation():
    model = tiny_cnn(9)
    s1, s2 = random_scores(5)
    sub = make_sub(model, s1, s2)
    ref = reference(model, s1, s2)
    x = inputs(6)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    eps = 0.5
    for attack_on in ("model", "each", "subnetwork"):
        result = robustness(sub, x, target=y, epsilon=eps, attacks=("fgsm",), attack_on=attack_on)
        x_model, clear_m = hand_fgsm(model, x, y, eps)
        x_sub, clear_s = hand_fgsm(ref, x, y, eps)
        if attack_on == "model":
            x_sub, clear_s = x_model, clear_m
        if attack_on == "subnetwork":
            x_model, clear_m = x_sub, clear_s
        got_m, got_s = result.adversarial["fgsm"]
        assert torch.allclose(got_m[clear_m], x_model[clear_m], atol=1e-6)
        assert torch.allclose(got_s[clear_s], x_sub[clear_s], atol=1e-6)
        assert ((got_m - x).abs() <= eps + 1e-6).all()
        m_prob, s_prob = result.probabilities("fgsm")
        pm = probs(model, got_m)[torch.arange(6), y]
        ps = probs(ref, got_s)[torch.arange(6), y]
        np.testing.assert_allclose(m_prob.numpy(), pm.numpy(), atol=1e-5)
        np.testing.assert_allclose(s_prob.numpy(), ps.numpy(), atol=1e-5)
    clean_m, _ = result.probabilities("clean")
    np.testing.assert_allclose(clean_m.numpy(), probs(model, x)[torch.arange(6), y], atol=1e-6)
    assert result.gap("fgsm") == pytest.approx(float((s_prob - m_prob).mean()), abs=1e-9)


def test_pgd_single_full_step_equals_fgsm_and_stays_in_the_ball():
    model = tiny_cnn(10)
    sub = make_sub(model, *random_scores(8))
    x = inputs(2)
    one = robustness(sub, x, epsilon=0.2, pgd_steps=1, pgd_step_size=0.2, lower_bound=-1.5)
    fgsm_m, fgsm_s = one.probabilities("fgsm")
    pgd_m, pgd_s = one.probabilities("pgd")
    np.testing.assert_allclose(pgd_m.numpy(), fgsm_m.numpy(), atol=1e-6)
    np.testing.assert_allclose(pgd_s.numpy(), fgsm_s.numpy(), atol=1e-6)
    assert torch.equal(one.adversarial["pgd"][0], one.adversarial["fgsm"][0])
    assert bool((one.adversarial["fgsm"][0] >= -1.5).all())
    many = robustness(sub, x, epsilon=0.2, pgd_steps=8)
    for x_adv in many.adversarial["pgd"]:
        assert float((x_adv - x).abs().max()) <= 0.2 + 1e-6
    # more PGD steps never leave the ball yet push the target probability down on average
    assert many.summary()["pgd_model_prob"] <= many.summary()["clean_model_prob"]


def test_robustness_epsilon_zero_is_clean_and_bad_input():
    model = tiny_cnn(11)
    sub = make_sub(model, *random_scores(9))
    x = inputs(4)
    zero = robustness(sub, x, epsilon=0.0)
    clean = zero.probabilities("clean")
    for attack in ("fgsm", "pgd"):
        adv = zero.probabilities(attack)
        assert torch.equal(adv[0], clean[0]) and torch.equal(adv[1], clean[1])
    edges, m, s = zero.histograms(bins=5)["clean"]
    assert m.sum() == len(x) and s.sum() == len(x) and len(edges) == 6
    with pytest.raises(ValueError, match="epsilon"):
        robustness(sub, x, epsilon=-0.1)
    with pytest.raises(ValueError, match="unknown attack"):
        robustness(sub, x, attacks=("cw",))
    with pytest.raises(ValueError, match="pgd_steps"):
        robustness(sub, x, pgd_steps=0)
    with pytest.raises(ValueError, match="attack_on"):
        robustness(sub, x, attack_on="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out of range"):
        robustness(sub, x, target=7)


# --------------------------------------------------------------------------- firing


def test_firing_correlation_matches_reference_maps():
    model = tiny_cnn(12)
    s1, s2 = random_scores(13)
    sub = make_sub(model, s1, s2)
    x = inputs(8)
    result = firing_correlation(sub, x)
    ref = reference(model, s1, s2)
    with torch.no_grad():
        orig1 = model[1](model[0](x))
        orig2 = model[4](model[3](model[2](orig1)))
        mask1 = ref[1](ref[0](x))
        mask2 = ref[4](ref[3](ref[2](mask1)))
    table = result.table.set_index(["layer", "unit"])
    for layer, scores, a, b in (("0", s1, orig1, mask1), ("3", s2, orig2, mask2)):
        for i in torch.nonzero(scores > 0).flatten().tolist():
            r = np.corrcoef(a[:, i].flatten().numpy(), b[:, i].flatten().numpy())[0, 1]
            assert table.loc[(layer, i), "correlation"] == pytest.approx(r, abs=1e-5)
            if layer == "0":  # the first layer sees unchanged inputs: only scaled
                assert table.loc[(layer, i), "correlation"] == pytest.approx(1.0, abs=1e-6)
    assert len(result.table) == int((s1 > 0).sum() + (s2 > 0).sum())


def test_firing_of_the_unmasked_network_is_one():
    model = tiny_cnn(3)
    result = firing_correlation(make_sub(model, torch.ones(4), torch.ones(4)), inputs(1))
    np.testing.assert_allclose(result.table["correlation"], 1.0, atol=1e-6)
    assert result.mean_correlation == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------- invariants


def test_every_metric_leaves_the_model_unchanged_even_in_train_mode():
    model = tiny_cnn(14).train()
    sub = make_sub(model, *random_scores(2))
    x = inputs(3)
    snap = ModelSnapshot.take(model)
    fidelity(sub, x)
    faithfulness(sub, x)
    prediction_quotient(sub, x, network="complement")
    stability(sub, inputs(4, 12), x, ks=(1, 2))
    robustness(sub, x, epsilon=0.1, pgd_steps=2)
    firing_correlation(sub, x)
    snap.assert_unchanged(model)


class Fragile(nn.Module):
    """Raises when a batch is larger than the region (the batched removals)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = tiny_cnn(0)

    def forward(self, x):
        if x.shape[0] > 6:
            raise RuntimeError("batch too large")
        return self.body(x)


def test_hooks_are_removed_when_the_model_raises():
    model = Fragile().eval()
    structure = discover(model, (inputs(0, 2),))
    sub = subnetwork_from_mappings(
        model, structure, {u.name: torch.ones(u.size) for u in structure.units}
    )
    snap = ModelSnapshot.take(model)
    with pytest.raises(RuntimeError, match="batch too large"):
        faithfulness(sub, inputs(0), batch_size=64)
    with pytest.raises(RuntimeError, match="batch too large"):
        find_classifier(model, inputs(0, 8))
    snap.assert_unchanged(model)
