"""Proximal optimization, the sparsity-fidelity path, fidelity targets and the paper preset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_inputs, make_model
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from captum_chains import ChainConfig, ChainExtractor
from captum_chains._utils.model_state import ModelSnapshot
from captum_chains.optim import (
    FREE_LR_CAP,
    ProximalAdam,
    nonnegative_soft_threshold,
    soft_threshold,
)
from captum_chains.path import FidelityTarget

floats = st.floats(-5, 5, allow_nan=False, width=32)


@given(st.lists(floats, min_size=1, max_size=20), st.floats(0, 3, width=32))
def test_soft_threshold_is_the_prox_of_the_l1_norm(values, t):
    """x* = prox(z) iff 0 is in x* - z + t * d|x*| (the subgradient optimality condition)."""
    z = torch.tensor(values)
    x = soft_threshold(z, t)
    nonzero = x != 0
    residual = (x - z + t * torch.sign(x))[nonzero]
    assert torch.allclose(residual, torch.zeros_like(residual), atol=1e-5)
    assert torch.all(z[~nonzero].abs() <= t + 1e-6)
    # the non-negative prox: argmin_{x >= 0} (x - z)^2 / 2 + t * x
    y = nonnegative_soft_threshold(z, t)
    assert torch.allclose(y, torch.clamp(z - t, min=0))
    zd, yd = z.double().view(-1, 1), y.double().view(-1, 1)
    grid = torch.linspace(0, 10, 10_001, dtype=torch.float64).view(1, -1)

    def objective(v):
        return 0.5 * (v - zd) ** 2 + t * v

    assert torch.all(objective(yd) <= objective(grid).min(1, keepdim=True).values + 1e-6)


@given(
    st.lists(st.floats(0, 2, width=32), min_size=1, max_size=12),
    st.lists(st.floats(-1, 1, width=32), min_size=12, max_size=12),
    st.floats(1e-3, 0.5),
    st.floats(1e-3, 0.2),
)
def test_a_proximal_adam_step_equals_the_closed_form(values, grads, l1, lr):
    """First step: m_hat = g, D = |g + l1| + eps, then the shifted clamp (the prox)."""
    p = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    g = torch.tensor(grads[: len(values)], dtype=torch.float64)
    optimizer = ProximalAdam([p], lr=lr, l1=l1, nonnegative=True)
    p.grad = g.clone()
    optimizer.step()
    s, gn = np.array(values, dtype=np.float64), g.numpy()
    metric = np.abs(gn + l1) + 1e-8
    expected = np.maximum(s - lr * gn / metric - lr * l1 / metric, 0.0)
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-9, atol=1e-12)


@given(
    st.lists(st.floats(0, 2, width=32), min_size=1, max_size=12),
    st.lists(st.floats(-1, 1, width=32), min_size=12, max_size=12),
    st.floats(1e-3, 0.5),
    st.floats(1e-3, 0.2),
    st.floats(1, 8),
    st.one_of(st.none(), st.floats(1e-3, 0.5)),
)
def test_a_free_rate_step_equals_the_closed_form(values, grads, l1, lr, rate, cap):
    """Entries nothing holds (``m_hat > -l1 / 2``) step at ``rate * lr`` (capped at
    ``max_free_lr``, never below ``lr``) in the gradient and the proximal step, the others
    at ``lr``; the same prox with a per-entry step."""
    p = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    g = torch.tensor(grads[: len(values)], dtype=torch.float64)
    optimizer = ProximalAdam([p], lr=lr, l1=l1, nonnegative=True, free_rate=rate, max_free_lr=cap)
    p.grad = g.clone()
    optimizer.step()
    s, gn = np.array(values, dtype=np.float64), g.numpy()
    metric = np.abs(gn + l1) + 1e-8
    fast = lr * rate if cap is None else max(lr, min(lr * rate, cap))
    eta = np.where(gn > -l1 / 2, fast, lr)
    expected = np.maximum(s - eta * gn / metric - eta * l1 / metric, 0.0)
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bad", [0.5, float("inf")])
def test_free_rate_must_be_at_least_one(bad):
    with pytest.raises(ValueError, match="free_rate"):
        ProximalAdam([torch.zeros(2, requires_grad=True)], l1=0.1, free_rate=bad)
    with pytest.raises(ValueError, match="max_free_lr"):
        ProximalAdam([torch.zeros(2, requires_grad=True)], l1=0.1, max_free_lr=-bad)
    with pytest.raises(ValueError, match=r"free_rate|finite"):
        ChainConfig(free_rate=bad)


def test_proximal_adam_sets_scores_exactly_to_zero_and_keeps_them_there():
    """With no smooth gradient, every score shrinks by lr per step and then sits at 0."""
    p = torch.ones(5, requires_grad=True)
    optimizer = ProximalAdam([p], lr=0.3, l1=0.01, nonnegative=True)
    for _ in range(6):
        p.grad = torch.zeros(5)
        optimizer.step()
    assert torch.equal(p.detach(), torch.zeros(5))


def confident(family: str, seed: int) -> nn.Module:
    """A tiny model whose predictions are confident (scaled head), so fidelity means something."""
    model = make_model(family, 6, seed)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.weight.mul_(12)
    return model


def fidelity_of(model: nn.Module, sub: nn.Module, x: torch.Tensor) -> tuple[float, float, float]:
    """KL, top-1 agreement, mean drop: computed here from the two networks' outputs."""
    with torch.no_grad():
        log_p, logits = F.log_softmax(model(x), 1), sub(x)
    kl = F.kl_div(F.log_softmax(logits, 1), log_p, log_target=True, reduction="batchmean")
    y = log_p.argmax(1, keepdim=True)
    agreement = (logits.argmax(1, keepdim=True) == y).float().mean()
    drop = (log_p.exp().gather(1, y) - logits.softmax(1).gather(1, y)).mean()
    return float(kl), float(agreement), float(drop)


FAST = dict(steps=30, finetune_steps=10, gate_penalty=0.05)


@given(
    family=st.sampled_from(["plain", "plain_nobn", "residual", "depthwise"]),
    seed=st.integers(0, 1000),
)
def test_path_kept_counts_do_not_increase_with_lambda(family, seed):
    model = confident(family, seed)
    x = make_inputs(6, size=8, seed=seed)
    path = ChainExtractor(model, **FAST).path(x, l1=[0.002, 0.01, 0.03, 0.1], progress=False)
    kept = [p.kept for p in path]
    assert kept == sorted(kept, reverse=True)
    assert [p.l1 for p in path] == [0.002, 0.01, 0.03, 0.1]
    for before, after in zip(path.points, path.points[1:]):  # nested supports
        for name, scores in after.chain.importance.items():
            assert not torch.any((scores > 0) & (before.chain.importance[name] == 0))
        assert set(before.chain.subnetwork.removed_gates) <= set(
            after.chain.subnetwork.removed_gates
        )


@pytest.mark.parametrize("family", ["plain", "residual", "depthwise"])
def test_path_points_report_the_fidelity_of_their_subnetworks(family):
    model = confident(family, 3)
    x = make_inputs(8, size=8, seed=3)
    path = ChainExtractor(model, **FAST).path(x, points=4, progress=False)
    for point in path:
        kl, agreement, drop = fidelity_of(model, point.chain.subnetwork, x)
        assert point.kl == pytest.approx(kl, rel=1e-4, abs=1e-6)
        assert point.agreement == pytest.approx(agreement)
        assert point.mean_drop == pytest.approx(drop, abs=1e-6)
        assert point.kept == point.chain.num_filters
    frame = path.to_frame()
    assert list(frame["kept"]) == [p.kept for p in path]
    figure = path.plot(fidelity=0.5)
    assert figure.axes


@given(seed=st.integers(0, 1000), agreement=st.sampled_from([0.5, 0.75, 1.0]))
def test_fidelity_target_returns_the_sparsest_path_chain_that_meets_it(seed, agreement):
    model = confident("residual", seed)
    x = make_inputs(8, size=8, seed=seed)
    extractor = ChainExtractor(model, **FAST)
    lambdas = [0.003, 0.01, 0.03, 0.08]
    path = extractor.path(x, l1=lambdas, progress=False, seed=0)
    target = FidelityTarget(min_agreement=agreement)
    meeting = [p for p in path if fidelity_of(model, p.chain.subnetwork, x)[1] >= agreement]
    if not meeting:
        with pytest.warns(UserWarning, match="no chain on the path meets"):
            extractor.attribute(x, progress=False, seed=0, fidelity=target, path_l1=lambdas)
        return
    chain = extractor.attribute(x, progress=False, seed=0, fidelity=target, path_l1=lambdas)
    assert fidelity_of(model, chain.subnetwork, x)[1] >= agreement
    assert chain.num_filters == min(p.kept for p in meeting)


def test_fidelity_target_with_kl_and_drop_limits():
    model = confident("plain", 5)
    x = make_inputs(8, size=8, seed=5)
    target = {"min_agreement": 0.0, "max_kl": 0.05, "max_drop": 0.05}
    chain = ChainExtractor(model, **FAST).attribute(x, progress=False, fidelity=target)
    kl, _, drop = fidelity_of(model, chain.subnetwork, x)
    assert kl <= 0.05 + 1e-6 and drop <= 0.05 + 1e-6


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (1.5, ValueError, "min_agreement"),
        ({"max_kl": float("nan")}, ValueError, "max_kl"),
        ("high", TypeError, "fidelity must be"),
        ({"min_agreemnt": 1.0}, TypeError, "min_agreemnt"),
    ],
)
def test_bad_fidelity_targets_are_refused(value, error, match):
    with pytest.raises(error, match=match):
        FidelityTarget.coerce(value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(l1=[0.01, 0.005]), "increase"),
        (dict(l1=[0.01, float("inf")]), "finite"),
        (dict(points=1), "points"),
        (dict(point_steps=0), "point_steps"),
    ],
)
def test_bad_path_arguments_are_refused(kwargs, match):
    model = make_model("plain", 4, 0)
    with pytest.raises(ValueError, match=match):
        ChainExtractor(model, **FAST).path(make_inputs(4), progress=False, **kwargs)


@pytest.mark.parametrize("family", ["plain", "residual", "depthwise"])
def test_path_and_fidelity_leave_the_model_untouched(family):
    model = confident(family, 1).train()
    model.features[0].weight.requires_grad_(True) if family == "plain" else None
    handle = model.register_forward_hook(lambda *_: None)
    snapshot = ModelSnapshot.take(model)
    x = make_inputs(6, size=8, seed=1)
    ChainExtractor(model, **FAST).path(x, points=3, progress=False)
    ChainExtractor(model, **FAST).attribute(x, progress=False, fidelity=0.5)
    snapshot.assert_unchanged(model)
    handle.remove()


@pytest.mark.parametrize(
    "field", ["l1", "gate_penalty", "lr", "temperature", "score_threshold", "alpha_init"]
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_config_refuses_non_finite_values(field, value):
    with pytest.raises(ValueError, match=field):
        ChainConfig(**{field: value})


def test_logits_that_overflow_on_finite_inputs_are_refused():
    model = make_model("plain", 4, 0)
    with torch.no_grad():
        model.features[0].weight.mul_(1e4)
    x = make_inputs(seed=0)
    x[1] *= 1e36  # finite, but the logits overflow to inf for this input
    assert torch.isfinite(x).all() and not torch.isfinite(model(x)).all()
    snapshot = ModelSnapshot.take(model)
    with pytest.raises(ValueError, match=r"not finite .* for 1 of 4 inputs \(first: input 1\)"):
        ChainExtractor(model, **FAST).attribute(x, progress=False)
    snapshot.assert_unchanged(model)


# -- the paper preset, against an independent re-implementation -----------------------


def paper_reference(model, x, l1, gate_penalty, steps):
    """NeuroChains' schedule written out for conftest's PlainCNN (3 scored BatchNorms, one
    layer gate on the second conv), independent of the package's masking and loop."""
    f = model.features
    head = model.head
    with torch.no_grad():
        log_p = F.log_softmax(model(x), 1)

    def forward(s, gate):
        h = F.relu(f[1](f[0](x)) * s[0].view(1, -1, 1, 1))
        y = f[4](f[3](h)) * s[1].view(1, -1, 1, 1)
        y = gate * y + (1 - gate) * h
        y = f[6](F.relu(y))
        y = F.relu(f[8](f[7](y)) * s[2].view(1, -1, 1, 1))
        return head(y)

    def kl_of(logits):
        return (log_p.exp() * (log_p - F.log_softmax(logits, 1))).sum(1).mean()

    sizes = [f[0].out_channels, f[3].out_channels, f[7].out_channels]
    s = torch.ones(sum(sizes), requires_grad=True)
    alpha = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([s, alpha], lr=0.005)
    previous = None
    for _ in range(steps):
        parts = torch.split(s, sizes)
        gate = torch.sigmoid(alpha / 0.2)
        loss = kl_of(forward(parts, gate)) + l1 * s.abs().sum() + gate_penalty * alpha.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            s.clamp_(min=0)
        if previous is not None and abs(previous - float(loss.detach())) < 0.02:
            break
        previous = float(loss.detach())
    gate_open = float(torch.sigmoid(alpha.detach() / 0.2)) >= 0.5
    final = torch.where(s >= 0.1, s, torch.zeros_like(s)).detach()
    if not gate_open:
        final[sizes[0] : sizes[0] + sizes[1]] = 0
    hard = torch.tensor(1.0 if gate_open else 0.0)
    with torch.no_grad():
        kl = float(kl_of(forward(torch.split(final, sizes), hard)))
    if kl > 0.1:
        keep = final > 0
        tuned = final.clone().requires_grad_(True)
        opt = torch.optim.Adam([tuned], lr=0.01)
        for _ in range(50):
            loss = kl_of(forward(torch.split(tuned, sizes), hard))
            opt.zero_grad()
            loss.backward()
            tuned.grad.mul_(keep)
            opt.step()
            with torch.no_grad():
                tuned.clamp_(min=0)
                tuned.copy_(torch.where(keep, tuned, final))
        final = tuned.detach()
    return final, gate_open


@pytest.mark.parametrize(("seed", "l1"), [(0, 0.3), (1, 0.6), (2, 1.0)])
def test_paper_preset_equals_an_independent_reimplementation(seed, l1):
    model = confident("plain", seed)
    x = make_inputs(6, size=8, seed=seed)
    config = ChainConfig.paper(l1=l1, gate_penalty=2.0, steps=60)
    chain = ChainExtractor(model, config).attribute(x, progress=False)
    expected, gate_open = paper_reference(model, x, l1, 2.0, steps=60)
    got = torch.cat([chain.importance[u.name] for u in chain.structure.units])
    assert [g.kind for g in chain.structure.gates] == ["layer"]
    assert (not chain.subnetwork.removed_gates) == gate_open
    assert torch.allclose(got, expected, atol=1e-4)


def test_paper_preset_fields():
    paper = ChainConfig.paper()
    assert (paper.optimizer, paper.lr, paper.steps, paper.finetune_steps) == (
        "adam",
        0.005,
        300,
        50,
    )
    assert (paper.alpha_init, paper.early_stop_window, paper.early_stop_delta) == (0.0, 1, 0.02)
    assert paper.layer_gates and paper.descent_steps == 0 and paper.refine_lr is None
    assert ChainConfig.paper(steps=10).steps == 10
    assert ChainConfig().alpha_init == 0.0 and not ChainConfig().layer_gates


def test_a_free_score_never_steps_more_than_the_cap():
    """At ``lr=0.05`` the default ``free_rate=10`` would step 0.5 and zero every free score in
    two steps; the cap (``FREE_LR_CAP`` = 0.05) keeps each step at 0.05, so after two steps
    every score is still about 0.9 (the first Adam steps move a score by about its step
    size)."""
    model = make_model("plain", width=4, seed=0)
    x = make_inputs(n=3, size=8, seed=0)
    config = ChainConfig(lr=0.05, steps=2, finetune_steps=0, use_gates=False)
    assert config.free_rate * config.lr >= 10 * FREE_LR_CAP  # uncapped: 0.5 a step
    chain = ChainExtractor(model, config).attribute(x, progress=False)
    scores = torch.cat([s.flatten() for s in chain.importance.values()])
    assert float(scores.min()) >= 0.89
    assert float(scores.max()) <= 1.0
