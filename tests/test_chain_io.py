"""Chain.save / Chain.load: a bit-exact round trip of the whole chain, no pickle."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import make_inputs, make_model

from captum_chains import Chain, ChainConfig, ChainExtractor
from captum_chains.result import CHAIN_JSON, CHAIN_TENSORS, SUBNETWORK_FILE

FAST = dict(steps=12, finetune_steps=3, gate_penalty=0.05, l1=0.02, lr=0.05)


def assert_same_chain(a: Chain, b: Chain) -> None:
    """Every field equal; tensors bit for bit (same dtype, same values, NaN-aware)."""
    assert list(a.importance) == list(b.importance)
    for name in a.importance:
        assert a.importance[name].dtype == b.importance[name].dtype
        assert torch.equal(a.importance[name], b.importance[name]), name
    assert a.gates == b.gates
    assert a.history == b.history
    assert a.structure == b.structure
    assert a.config == b.config
    assert a.kl == b.kl or (math.isnan(a.kl) and math.isnan(b.kl))
    assert a.finetuned == b.finetuned
    assert (a.inputs is None) == (b.inputs is None)
    if a.inputs is not None:
        assert torch.equal(a.inputs, b.inputs)
    assert torch.equal(a.subnetwork.scores, b.subnetwork.scores)
    assert torch.equal(a.subnetwork.gates_open, b.subnetwork.gates_open)


@pytest.fixture(scope="module")
def extracted() -> tuple[torch.nn.Module, torch.Tensor, Chain]:
    torch.manual_seed(0)
    model = make_model("residual", 4, 0)
    x = make_inputs(6)
    chain = ChainExtractor(model, **FAST).attribute(x, progress=False)
    return model, x, chain


def test_save_load_round_trip_is_bit_exact(extracted, tmp_path):
    model, x, chain = extracted
    assert chain.inputs is not None
    folder = chain.save(tmp_path / "chain")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [CHAIN_JSON, CHAIN_TENSORS, SUBNETWORK_FILE]
    )
    loaded = Chain.load(folder, model)
    assert_same_chain(chain, loaded)
    with torch.no_grad():
        assert torch.equal(loaded.subnetwork(x), chain.subnetwork(x))
    # saving what was loaded writes the same files again
    again = loaded.save(tmp_path / "again")
    assert (again / CHAIN_JSON).read_text() == (folder / CHAIN_JSON).read_text()
    assert (again / CHAIN_TENSORS).read_bytes() == (folder / CHAIN_TENSORS).read_bytes()


def test_files_are_json_and_safetensors_only(extracted, tmp_path):
    _, _, chain = extracted
    folder = chain.save(tmp_path / "chain")
    document = json.loads((folder / CHAIN_JSON).read_text())
    assert document["format"] == "captum-chains/chain-v1"
    assert set(document["config"]) == {f.name for f in dataclasses.fields(ChainConfig)}
    for name in (CHAIN_TENSORS, SUBNETWORK_FILE):  # safetensors: 8-byte header size + JSON
        data = (folder / name).read_bytes()
        size = int.from_bytes(data[:8], "little")
        json.loads(data[8 : 8 + size])


def test_round_trip_without_inputs_with_changed_config_and_odd_history(extracted, tmp_path):
    model, _, chain = extracted
    changed = {}
    for f in dataclasses.fields(ChainConfig):  # generic: new fields are covered too
        value = getattr(chain.config, f.name)
        if isinstance(value, bool):
            changed[f.name] = not value
        elif isinstance(value, float):
            changed[f.name] = value / 3
    config = chain.config.replace(**changed)
    history = [*chain.history, {"phase": "note", "loss": float("nan"), "shape": (1, 2)}]
    variant = dataclasses.replace(chain, inputs=None, config=config, history=history)
    loaded = Chain.load(variant.save(tmp_path / "variant"), model)
    assert loaded.inputs is None
    assert loaded.config == config
    assert loaded.history[-1]["shape"] == (1, 2)
    assert math.isnan(loaded.history[-1]["loss"])
    assert loaded.history[:-1] == chain.history


def test_load_refuses_unknown_config_fields_and_other_models(extracted, tmp_path):
    _, _, chain = extracted
    folder = chain.save(tmp_path / "chain")
    document = json.loads((folder / CHAIN_JSON).read_text())
    document["config"]["no_such_field"] = 1
    (folder / CHAIN_JSON).write_text(json.dumps(document))
    with pytest.raises(ValueError, match="no_such_field"):
        Chain.load(folder, extracted[0])
    good = chain.save(tmp_path / "good")
    with pytest.raises(ValueError, match="fingerprint"):
        Chain.load(good, make_model("plain", 4, 0))
    with pytest.raises(ValueError, match="holds no saved Chain"):
        Chain.load(tmp_path / "nothing", extracted[0])
