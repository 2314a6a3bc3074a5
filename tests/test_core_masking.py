"""Properties of scores and gates applied through hooks (Eq. 3 and 7 of NeuroChains)."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, assert_open_masks_reproduce, make_inputs, make_model
from hypothesis import given
from hypothesis import strategies as st

from captum_chains._utils.model_state import ModelSnapshot
from captum_chains.masking import MaskState, apply_masks, scale_channels
from captum_chains.subnetwork import SubNetwork, subnetwork_from_mappings
from captum_chains.units import discover

families = st.sampled_from(FAMILIES)
seeds = st.integers(0, 10_000)
widths = st.integers(2, 6)


def _structure(model, x):
    return discover(model, (x,))


@given(family=families, seed=seeds, width=widths)
def test_all_ones_and_open_gates_reproduce_the_model_exactly(family, seed, width):
    model = make_model(family, width, seed)
    x = make_inputs(seed=seed)
    structure = _structure(model, x)
    assert_open_masks_reproduce(model, structure, x)


@given(family=families, seed=seeds, width=widths, data=st.data())
def test_a_score_scales_that_filters_post_norm_output(family, seed, width, data):
    """Independent computation: a hand-written hook on the site scales one channel."""
    model = make_model(family, width, seed)
    x = make_inputs(seed=seed)
    structure = _structure(model, x)
    unit = data.draw(st.sampled_from(structure.units))
    index = data.draw(st.integers(0, unit.size - 1))
    value = data.draw(st.floats(0.0, 3.0))
    scores = torch.ones(unit.size)
    scores[index] = value

    site = model.get_submodule(unit.site)

    def scale(module, args, output=None):
        t = (output if output is not None else args[0]).clone()
        t[:, index] = t[:, index] * value
        return t if output is not None else (t,)

    handle = (
        site.register_forward_hook(scale)
        if unit.hook == "output"
        else site.register_forward_pre_hook(lambda m, a: scale(m, a))
    )
    try:
        with torch.no_grad():
            expected = model(x)
    finally:
        handle.remove()
    with torch.no_grad(), apply_masks(model, structure, MaskState(scores={unit.name: scores})):
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["residual", "depthwise"])
def test_a_closed_block_gate_equals_removing_the_block(family):
    model = make_model(family, 4, seed=3, depth=3)
    x = make_inputs(seed=3)
    structure = _structure(model, x)
    blocks = [g for g in structure.gates if g.kind == "block"]
    assert [g.name for g in blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    for gate in blocks:
        skipped = int(gate.name.split(".")[1])
        with torch.no_grad():
            h = model.stem(x)
            for i, block in enumerate(model.blocks):
                if i != skipped:
                    h = block(h)
            expected = model.fc(h.mean(dim=(2, 3)))
            state = MaskState(gates={gate.name: torch.tensor(0.0)})
            with apply_masks(model, structure, state):
                got = model(x)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_closed_layer_gate_turns_conv_and_norm_into_the_identity():
    model = make_model("plain", 4, seed=1)
    x = make_inputs(seed=1)
    structure = _structure(model, x)
    assert [(g.name, g.kind) for g in structure.gates] == [("features.3", "layer")]
    f = model.features
    with torch.no_grad():
        h = f[2](f[1](f[0](x)))
        h = f[5](h)  # conv features.3 + bn features.4 replaced by the identity; ReLU stays
        h = f[9](f[8](f[7](f[6](h))))
        expected = model.head(h)
        with apply_masks(model, structure, MaskState(gates={"features.3": torch.tensor(0.0)})):
            got = model(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@given(seed=seeds, data=st.data())
def test_subnetwork_equals_an_independent_masked_forward(seed, data):
    """Random keep masks and scores on the residual model, computed by hand."""
    model = make_model("residual", 4, seed, depth=2)
    x = make_inputs(seed=seed)
    structure = _structure(model, x)
    gen = torch.Generator().manual_seed(seed)
    importance = {}
    for u in structure.units:
        s = torch.rand(u.size, generator=gen) + 0.1
        s[torch.rand(u.size, generator=gen) < 0.5] = 0
        importance[u.name] = s
    open0 = data.draw(st.booleans())
    sub = subnetwork_from_mappings(model, structure, importance, {"blocks.0": open0})

    def ch(t, name):
        return t * importance[name].view(1, -1, 1, 1)

    with torch.no_grad():
        h = torch.relu(ch(model.stem[1](model.stem[0](x)), "stem.0"))
        for i, block in enumerate(model.blocks):
            if i == 0 and not open0:
                continue
            out = torch.relu(ch(block.bn1(block.conv1(h)), f"blocks.{i}.conv1"))
            out = ch(block.bn2(block.conv2(out)), f"blocks.{i}.conv2")
            h = torch.relu(out + h)
        expected = model.fc(h.mean(dim=(2, 3)))
        got = sub(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_scale_channels_per_region_equals_separate_scaling():
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(6, 3, 2, 2, generator=gen)
    s = torch.rand(2, 3, generator=gen)
    got = scale_channels(t, s, 1)
    expected = torch.cat([t[:3] * s[0].view(1, 3, 1, 1), t[3:] * s[1].view(1, 3, 1, 1)])
    assert torch.equal(got, expected)
    tokens = torch.randn(4, 5, 6, generator=gen)
    heads = torch.rand(3, generator=gen)
    got = scale_channels(tokens, heads, -1, unit_width=2)
    assert torch.equal(got, tokens * heads.repeat_interleave(2))


@given(family=families, seed=seeds)
def test_save_load_round_trip_is_bit_exact(family, seed, tmp_path_factory):
    model = make_model(family, 4, seed)
    x = make_inputs(seed=seed)
    structure = _structure(model, x)
    gen = torch.Generator().manual_seed(seed)
    importance = {
        u.name: torch.rand(u.size, generator=gen) * (torch.rand(u.size, generator=gen) > 0.3)
        for u in structure.units
    }
    gates = {g.name: bool(torch.rand((), generator=gen) > 0.5) for g in structure.gates}
    sub = subnetwork_from_mappings(model, structure, importance, gates)
    path = tmp_path_factory.mktemp("sub") / "chain.safetensors"
    sub.save(path)
    loaded = SubNetwork.load(path, model)
    assert torch.equal(loaded.scores, sub.scores)
    assert torch.equal(loaded.gates_open, sub.gates_open)
    assert loaded.structure == sub.structure
    with torch.no_grad():
        assert torch.equal(loaded(x), sub(x))


def test_load_refuses_another_architecture(tmp_path):
    model = make_model("residual", 4, 0)
    x = make_inputs()
    structure = _structure(model, x)
    sub = subnetwork_from_mappings(
        model, structure, {u.name: torch.ones(u.size) for u in structure.units}
    )
    path = tmp_path / "chain.safetensors"
    sub.save(path)
    with pytest.raises(ValueError, match="fingerprint"):
        SubNetwork.load(path, make_model("residual", 5, 0))
    (tmp_path / "other.safetensors").write_bytes(b"not a file")
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own header error
        SubNetwork.load(tmp_path / "other.safetensors", model)


def test_saved_file_loads_with_plain_safetensors_and_holds_no_code(tmp_path):
    from safetensors.torch import load_file

    model = make_model("plain", 4, 0)
    structure = _structure(model, make_inputs())
    sub = subnetwork_from_mappings(
        model, structure, {u.name: torch.ones(u.size) for u in structure.units}
    )
    sub.save(tmp_path / "c.safetensors")
    tensors = load_file(tmp_path / "c.safetensors")
    assert set(tensors) == {"scores", "gates_open"}


def test_site_hooks_receive_the_unit_transform_and_unknown_hooks_are_refused(monkeypatch):
    import dataclasses

    from captum_chains.units import adapters

    model, x = make_model("plain", 4, 0), make_inputs(seed=0)
    structure = _structure(model, x)
    unit = structure.units[0]
    calls = []

    def register(module, transform):
        calls.append(module)
        return module.register_forward_hook(lambda m, a, out: transform(out))

    custom = dataclasses.replace(structure, units=(dataclasses.replace(unit, hook="custom"),))
    scores = torch.rand(unit.size)
    state = MaskState(scores={unit.name: scores})
    with apply_masks(model, dataclasses.replace(structure, units=(unit,)), state):
        expected = model(x)
    monkeypatch.setitem(adapters.SITE_HOOKS, "custom", register)
    with apply_masks(model, custom, state):
        got = model(x)
    assert torch.equal(got, expected)
    assert calls == [model.get_submodule(unit.site)]
    assert not model.get_submodule(unit.site)._forward_hooks  # removed on exit
    monkeypatch.delitem(adapters.SITE_HOOKS, "custom")
    with pytest.raises(ValueError, match="custom"):
        with apply_masks(model, custom, state):
            pass


@given(family=families, seed=seeds, width=widths)
def test_folding_scores_into_batchnorm_equals_scaling_its_output(family, seed, width):
    model = make_model(family, width, seed)
    x = make_inputs(seed=seed)
    structure = _structure(model, x)
    snapshot = ModelSnapshot.take(model)
    gen = torch.Generator().manual_seed(seed)
    results = []
    for fold in (False, True):
        scores = {
            u.name: torch.rand(u.size, generator=gen).requires_grad_(True) for u in structure.units
        }
        gen.manual_seed(seed)
        state = MaskState(scores=scores, gates={g.name: torch.tensor(0.7) for g in structure.gates})
        with apply_masks(model, structure, state, fold_norms=fold):
            out = model(x)
            grads = torch.autograd.grad(out.logsumexp(1).sum(), list(scores.values()))
        results.append((out.detach(), torch.cat(grads)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-5)
    snapshot.assert_unchanged(model)


def test_folding_shows_user_hooks_the_parameters_and_restores_after_an_interrupt():
    model, x = make_model("plain", 4, 0), make_inputs(seed=0)
    structure = _structure(model, x)
    snapshot = ModelSnapshot.take(model)
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    weight, norm_class = norm.weight, type(norm)
    state = MaskState(scores={u.name: torch.full((u.size,), 0.5) for u in structure.units})
    seen = []

    def interrupt(module, args, output):  # a user's hook, after the folded forward
        seen.append((module.weight, module._parameters["weight"]))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with apply_masks(model, structure, state, fold_norms=True):
            handle = norm.register_forward_hook(interrupt)
            try:
                model(x)
            finally:
                handle.remove()
    # the user's hook saw the module's own Parameter, never a swapped tensor
    assert seen and seen[0][0] is weight and seen[0][1] is weight
    assert norm.weight is weight and type(norm) is norm_class
    snapshot.assert_unchanged(model)
