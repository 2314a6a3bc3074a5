"""ChainExtractor: the optimization, thresholding, Captum contract and the model invariant."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from captum.attr import Attribution, IntegratedGradients
from conftest import make_inputs, make_model
from torch import nn

import captum_chains.neurochains as neurochains
from captum_chains import ChainConfig, ChainExtractor
from captum_chains._utils.model_state import ModelSnapshot
from captum_chains.objectives import binary_kl, kl_divergence

FAST = dict(steps=25, finetune_steps=5, gate_penalty=0.05, l1=0.02, lr=0.05)


def test_extractor_is_a_captum_attribution_and_returns_a_chain(family):
    model = make_model(family, 4, 0)
    x = make_inputs(6)
    extractor = ChainExtractor(model, **FAST)
    assert isinstance(extractor, Attribution)
    snapshot = ModelSnapshot.take(model)
    chain = extractor.attribute(x, progress=False)
    snapshot.assert_unchanged(model)
    assert set(chain.importance) == set(chain.structure.unit_names)
    for name, scores in chain.importance.items():
        assert scores.shape == (chain.structure.unit(name).size,)
        kept = scores > 0
        assert torch.all(scores[kept] >= 0)
    assert 0 < len(chain.history) <= FAST["steps"] + FAST["finetune_steps"]
    assert {"loss", "kl", "l1", "gate_penalty", "kept", "open_gates", "time", "phase"} <= set(
        chain.history[0]
    )
    assert chain.num_filters == sum(int((s > 0).sum()) for s in chain.importance.values())
    assert "units kept" in chain.subnetwork.summary()


def test_thresholding_follows_tau_and_the_gate_threshold():
    model = make_model("residual", 4, 1, depth=2)
    x = make_inputs(6, seed=1)
    chain = ChainExtractor(
        model, steps=40, finetune_steps=0, l1=0.05, gate_penalty=0.05, lr=0.05
    ).attribute(x, progress=False)
    tau = chain.config.score_threshold
    for scores in chain.importance.values():
        assert torch.all((scores == 0) | (scores >= tau))
    for gate, value in chain.gates.items():
        assert (value >= 0.5) == (gate not in chain.subnetwork.removed_gates)
    for gate in chain.subnetwork.removed_gates:
        spec = next(g for g in chain.structure.gates if g.name == gate)
        for unit in spec.units:
            assert not chain.importance[unit].any()


def test_chain_kl_is_the_kl_of_the_returned_subnetwork():
    model = make_model("plain", 4, 2)
    x = make_inputs(6, seed=2)
    chain = ChainExtractor(model, **FAST).attribute(x, progress=False)
    with torch.no_grad():
        p = F.log_softmax(model(x), 1)
        q = F.log_softmax(chain.subnetwork(x), 1)
    expected = F.kl_div(q, p, log_target=True, reduction="batchmean")
    assert chain.kl == pytest.approx(float(expected), rel=1e-4, abs=1e-6)


def test_l1_pressure_removes_filters_and_no_pressure_keeps_all():
    model = make_model("plain", 6, 3)
    x = make_inputs(6, seed=3)
    none = ChainExtractor(model, steps=30, l1=0.0, use_gates=False, finetune_steps=0).attribute(
        x, progress=False
    )
    assert none.num_filters == none.total_filters
    strong = ChainExtractor(
        model, steps=60, l1=1.0, lr=0.05, use_gates=False, finetune_steps=0
    ).attribute(x, progress=False)
    assert strong.num_filters < strong.total_filters


def test_kl_matches_torch_and_binary_kl_matches_its_formula():
    gen = torch.Generator().manual_seed(0)
    logits_p, logits_q = torch.randn(6, 7, generator=gen), torch.randn(6, 7, generator=gen)
    log_p = F.log_softmax(logits_p, 1)
    got = kl_divergence(log_p, logits_q, regions=2)
    ref = F.kl_div(F.log_softmax(logits_q, 1), log_p, log_target=True, reduction="none").sum(1)
    torch.testing.assert_close(got, ref.view(2, 3).mean(1))
    target = torch.tensor([0, 1, 2, 3, 4, 5])
    got_t = kl_divergence(log_p, logits_q, regions=1, target=target)
    p = log_p.exp().gather(1, target[:, None]).squeeze(1)
    q = logits_q.softmax(1).gather(1, target[:, None]).squeeze(1)
    ref_t = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    torch.testing.assert_close(got_t, ref_t.mean().view(1))
    same = binary_kl(torch.log(torch.tensor([0.3])), torch.log(torch.tensor([0.3])))
    assert float(same) == pytest.approx(0.0, abs=1e-7)


def test_a_target_changes_the_objective_to_the_target_class(monkeypatch):
    model = make_model("plain", 4, 4)
    x = make_inputs(4, seed=4)
    seen = []
    original = neurochains.kl_divergence

    def spy(log_p, logits_q, regions, target=None):
        seen.append(target)
        return original(log_p, logits_q, regions, target)

    monkeypatch.setattr(neurochains, "kl_divergence", spy)
    ChainExtractor(model, steps=2, finetune_steps=0).attribute(x, target=0, progress=False)
    assert all(t is not None and torch.equal(t, torch.zeros(4, dtype=torch.long)) for t in seen)
    seen.clear()
    ChainExtractor(model, steps=2, finetune_steps=0).attribute(
        x, target=[0, 1, 2, 3], progress=False
    )
    assert torch.equal(seen[0], torch.tensor([0, 1, 2, 3]))
    seen.clear()
    ChainExtractor(model, steps=2, finetune_steps=0).attribute(x, progress=False)
    assert all(t is None for t in seen)


@pytest.mark.parametrize("compact_below", [None, 0.5])
def test_attribute_many_equals_separate_runs(compact_below):
    """Batched (``compact_below=None``) or one region after another (compact steps)."""
    model = make_model("residual", 4, 5, depth=2)
    regions = [make_inputs(4, seed=s) for s in (10, 11, 12)]
    config = ChainConfig(
        compact_below=compact_below,
        steps=30,
        finetune_steps=5,
        l1=0.03,
        gate_penalty=0.05,
        lr=0.05,
        early_stop_min_steps=5,
        early_stop_delta=0.005,
    )
    batched = ChainExtractor(model, config).attribute_many(regions, progress=False)
    for region, chain in zip(regions, batched):
        single = ChainExtractor(model, config).attribute(region, progress=False)
        assert len(single.history) == len(chain.history)
        assert single.subnetwork.removed_gates == chain.subnetwork.removed_gates
        for name in single.importance:
            torch.testing.assert_close(
                chain.importance[name], single.importance[name], rtol=1e-4, atol=1e-5
            )


def test_integrated_gradients_runs_on_the_subnetwork():
    model = make_model("residual", 4, 6)
    x = make_inputs(3, seed=6)
    chain = ChainExtractor(model, **FAST).attribute(x, progress=False)
    snapshot = ModelSnapshot.take(model)
    attributions = IntegratedGradients(chain.subnetwork).attribute(x, target=0, n_steps=8)
    assert attributions.shape == x.shape and torch.isfinite(attributions).all()
    snapshot.assert_unchanged(model)


def test_model_is_unchanged_in_train_mode_with_grads_and_hooks():
    model = make_model("residual", 4, 7)
    model.train()
    model.blocks[0].conv1.weight.requires_grad_(False)
    handle = model.fc.register_forward_hook(lambda m, a, o: None)
    snapshot = ModelSnapshot.take(model)
    ChainExtractor(model, **FAST).attribute(make_inputs(4, seed=7), progress=False)
    snapshot.assert_unchanged(model)
    assert model.training and model.blocks[0].training
    handle.remove()


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_model_is_unchanged_after_an_interrupt_inside_the_loop(monkeypatch, error):
    model = make_model("depthwise", 4, 8)
    model.train()
    snapshot = ModelSnapshot.take(model)
    calls = {"n": 0}
    original = neurochains.kl_divergence

    def interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise error("stop")
        return original(*args, **kwargs)

    monkeypatch.setattr(neurochains, "kl_divergence", interrupt)
    with pytest.raises(error):
        ChainExtractor(model, **FAST).attribute(make_inputs(4, seed=8), progress=False)
    snapshot.assert_unchanged(model)


class NotLogits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


class NoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(x.flatten(1)[:, :12])


BAD_INPUTS = [
    ("rank", lambda x: x[0], ValueError, "batch dimension"),
    ("dtype", lambda x: (x * 10).long(), TypeError, "floating-point"),
    ("nan", lambda x: x.index_fill(0, torch.tensor([0]), float("nan")), ValueError, "NaN"),
    ("inf", lambda x: x.index_fill(0, torch.tensor([1]), float("inf")), ValueError, "NaN or Inf"),
    ("empty", lambda x: x[:0], ValueError, "empty batch"),
    ("channels", lambda x: x[:, :2], ValueError, "channels"),
    ("not a tensor", lambda x: x.numpy(), TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize(
    ("case", "transform", "error", "match"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_inputs_raise_clear_errors_and_leave_the_model_alone(case, transform, error, match):
    model = make_model("plain", 4, 9)
    snapshot = ModelSnapshot.take(model)
    with pytest.raises(error, match=match):
        ChainExtractor(model, **FAST).attribute(transform(make_inputs(4)), progress=False)
    snapshot.assert_unchanged(model)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target": 5}, ValueError, "out of range"),
        ({"target": -1}, ValueError, "out of range"),
        ({"target": [0, 1]}, ValueError, "4 inputs"),
        ({"target": (0, 1)}, ValueError, "tuple"),
        ({"layers": ["features.99"]}, ValueError, "no unit layer"),
        ({"gates": ["nope"]}, ValueError, "unknown gates"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    model = make_model("plain", 4, 9)
    snapshot = ModelSnapshot.take(model)
    with pytest.raises(error, match=match):
        ChainExtractor(model, **FAST).attribute(make_inputs(4), progress=False, **kwargs)
    snapshot.assert_unchanged(model)


def test_bad_models_raise_clear_errors():
    x = make_inputs(2)
    with pytest.raises(ValueError, match=r"logits of shape \[N, num_classes\]"):
        ChainExtractor(NotLogits()).attribute(x, progress=False)
    with pytest.raises(ValueError, match="no scorable units"):
        ChainExtractor(NoConv()).attribute(x, progress=False)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        ChainExtractor(lambda t: t)  # type: ignore[arg-type]


def test_inputs_on_another_device_are_refused():
    model = make_model("plain", 4, 0).to(torch.float32)
    x = make_inputs(2).to("meta")
    with pytest.raises(ValueError, match="move them"):
        ChainExtractor(model).discover(x)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="temperature"):
        ChainConfig(temperature=0)
    with pytest.raises(ValueError, match="l1"):
        ChainConfig(l1=-1.0)
    with pytest.raises(TypeError):
        ChainConfig().replace(not_a_field=1)


def test_layers_restricts_the_scored_units():
    model = make_model("residual", 4, 0, depth=2)
    structure = ChainExtractor(model).discover(make_inputs(2), layers=["blocks.1"])
    assert structure.unit_names == ("blocks.1.conv1", "blocks.1.conv2")
    assert [g.name for g in structure.gates] == ["blocks.1"]


def test_compiled_and_eager_paths_give_the_same_chain():
    model = make_model("residual", 4, 11)
    x = make_inputs(4, seed=11)
    eager = ChainExtractor(model, **FAST).attribute(x, progress=False)
    compiled = ChainExtractor(model, compile="aot_eager", **FAST).attribute(x, progress=False)
    assert compiled.subnetwork.removed_gates == eager.subnetwork.removed_gates
    for name in eager.importance:
        torch.testing.assert_close(
            compiled.importance[name], eager.importance[name], rtol=1e-4, atol=1e-5
        )


def test_autocast_runs_the_masked_forward_in_low_precision_and_keeps_float32_state():
    model = make_model("residual", 4, 12)
    x = make_inputs(4, seed=12)
    snapshot = ModelSnapshot.take(model)
    dtypes = []
    handle = model.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    try:
        low = ChainExtractor(model, autocast="bfloat16", **FAST).attribute(x, progress=False)
    finally:
        handle.remove()
    full = ChainExtractor(model, **FAST).attribute(x, progress=False)
    assert torch.bfloat16 in dtypes  # the optimization's forward passes ran under autocast
    assert low.subnetwork.scores.dtype == torch.float32
    assert low.subnetwork(x).dtype == torch.float32  # the SubNetwork itself is full precision
    assert all(row["kl"] >= 0 for row in low.history)
    # bf16 rounding moves scores by about 1e-2 at most over these few steps
    for name in full.importance:
        torch.testing.assert_close(low.importance[name], full.importance[name], rtol=0, atol=0.05)
    snapshot.assert_unchanged(model)
    with pytest.raises(ValueError, match="autocast"):
        ChainConfig(autocast="int8")


def test_progress_bar_shows_the_loss_terms_without_warnings(capsys):
    """The bar names KL, l1, gate penalty and kept units; reading them warns about nothing."""
    model = make_model("residual", 4, 3, depth=2)
    x = make_inputs(6, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ChainExtractor(model, steps=3, finetune_kl=0.0, finetune_steps=2).attribute(
            x, progress=True
        )
    bar = capsys.readouterr().err
    for term in ("kl=", "l1=", "gate=", "kept=", "fine-tune"):
        assert term in bar


def test_a_chain_that_ignores_its_inputs_is_reported():
    """A penalty so large that no filter survives leaves a constant sub-network: it can
    only match the model where the model's outputs barely vary, and the user is told."""
    model = make_model("plain", width=4, seed=2)
    x = make_inputs(n=4, size=8, seed=2)
    with pytest.warns(UserWarning, match="does not depend on its inputs"):
        empty = ChainExtractor(model, ChainConfig(steps=40, l1=5.0, finetune_steps=0)).attribute(
            x, progress=False
        )
    assert empty.num_filters == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = ChainExtractor(model, ChainConfig(steps=3, finetune_steps=0)).attribute(
            x, progress=False
        )
    assert kept.num_filters > 0
