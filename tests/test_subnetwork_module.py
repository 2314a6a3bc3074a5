"""SubNetwork as an ``nn.Module``: dtype/device casts, parameters, state dict, weights digest.

The float64 reference is the same sub-network built on a float64 *copy* of the model: the
SubNetwork's cast path (``functional_call`` with cast tensors) must compute exactly what
the model itself computes in float64, and the user's model must never change.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_inputs, make_model
from torch import nn

from captum_chains._utils.model_state import ModelSnapshot
from captum_chains.export.tracing import ExportError
from captum_chains.subnetwork import SubNetwork, weights_digest
from captum_chains.units import discover

FAMILIES = ("plain", "residual", "depthwise")


def masked(family: str, seed: int = 0) -> tuple[nn.Module, SubNetwork, torch.Tensor]:
    """A model and a SubNetwork with a third of the units removed and one gate closed."""
    model = make_model(family, 4, seed)
    x = make_inputs(5, seed=seed)
    structure = discover(model, (x,))
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(structure.total_units, generator=gen) + 0.2
    scores[torch.rand(structure.total_units, generator=gen) < 0.33] = 0
    gates = torch.ones(len(structure.gates), dtype=torch.bool)
    if len(gates) > 1:
        gates[1] = False
    return model, SubNetwork(model, structure, scores, gates), x


@pytest.mark.parametrize("family", FAMILIES)
def test_double_round_trip_equals_a_float64_reference(family: str) -> None:
    model, sub, x = masked(family)
    snapshot = ModelSnapshot.take(model)
    with torch.no_grad():
        as_float = sub(x)
    reference_model = copy.deepcopy(model).double()
    reference = SubNetwork(reference_model, sub.structure, sub.scores, sub.gates_open)
    assert reference.runs_in_place() and reference.dtype == torch.float64

    assert sub.double() is sub
    assert (sub.dtype, sub.scores.dtype, sub.gates_open.dtype) == (
        torch.float64,
        torch.float64,
        torch.bool,
    )
    assert not sub.runs_in_place()
    with torch.no_grad():
        got = sub(x.double())
        expected = reference(x.double())
    assert got.dtype == torch.float64
    assert torch.equal(got, expected)  # same arithmetic as the model itself in float64
    torch.testing.assert_close(got.float(), as_float, rtol=1e-4, atol=1e-5)
    snapshot.assert_unchanged(model)  # the user's model is still float32, untouched
    assert next(model.parameters()).dtype == torch.float32

    sub.to(torch.float32)  # back home: the model runs as is, bit for bit as before
    assert sub.runs_in_place()
    with torch.no_grad():
        assert torch.equal(sub(x), as_float)
    snapshot.assert_unchanged(model)


def test_half_and_gradients_through_the_cast_path() -> None:
    model, sub, x = masked("plain")
    with torch.no_grad():
        reference = sub(x)
    sub.half()
    try:
        with torch.no_grad():
            out = sub(x.half())
    except (RuntimeError, NotImplementedError) as err:  # pragma: no cover - old CPU kernels
        pytest.skip(f"float16 convolutions not available on this CPU: {err}")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)
    # gradients of a float64 run reach the model's own float32 parameters
    sub.double()
    sub(x.double()).square().sum().backward()
    weight = next(model.parameters())
    assert weight.grad is not None and weight.grad.dtype == torch.float32
    assert weight.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_cuda_leaves_the_model_on_the_cpu() -> None:
    model, sub, x = masked("residual")
    with torch.no_grad():
        reference = sub(x)
    sub.to("cuda")
    assert sub.device.type == "cuda" and sub.gates_open.device.type == "cuda"
    with torch.no_grad():
        out = sub(x.cuda())
    torch.testing.assert_close(out.cpu(), reference, rtol=1e-4, atol=1e-5)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_parameters_and_state_dict() -> None:
    model, sub, x = masked("residual")
    names = [n for n, _ in sub.named_parameters()]
    assert names == [f"model.{n}" for n, _ in model.named_parameters()]
    assert all(a is b for a, b in zip(sub.parameters(), model.parameters()))
    assert next(sub.parameters()).device == sub.device  # the usual Captum idiom works
    state = sub.state_dict()
    assert set(state) == {"scores", "gates_open", "_extra_state"}
    assert state["_extra_state"] == {"weights_digest": weights_digest(model)}

    other = SubNetwork(
        model,
        sub.structure,
        torch.ones(sub.structure.total_units),
        torch.ones(len(sub.structure.gates), dtype=torch.bool),
    )
    other.load_state_dict(state)
    assert torch.equal(other.scores, sub.scores)
    assert torch.equal(other.gates_open, sub.gates_open)
    with torch.no_grad():
        assert torch.equal(other(x), sub(x))

    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(changed.parameters()).add_(0.1)
    foreign = SubNetwork(changed, sub.structure, sub.scores, sub.gates_open)
    with pytest.raises(ValueError, match="other weights"):
        foreign.load_state_dict(state)


def test_weights_digest_follows_the_values_not_the_dtype_or_device() -> None:
    model, _, _ = masked("residual")
    digest = weights_digest(model)
    assert len(digest) == 64
    assert weights_digest(copy.deepcopy(model).double()) == digest  # float32 values kept
    assert weights_digest(copy.deepcopy(model).half()) != digest  # values rounded
    edited = copy.deepcopy(model)
    with torch.no_grad():
        next(edited.parameters()).data.mul_(1.001)  # .data edits bump no version counter
    assert weights_digest(edited) != digest
    swapped = copy.deepcopy(model)
    conv_name, conv = next((n, m) for n, m in swapped.named_modules() if isinstance(m, nn.Conv2d))
    replacement = copy.deepcopy(conv)
    with torch.no_grad():
        replacement.weight.normal_()
    parent_name, _, child = conv_name.rpartition(".")
    setattr(swapped.get_submodule(parent_name), child, replacement)
    assert weights_digest(swapped) != digest


def test_export_and_load_check_the_weights(tmp_path) -> None:
    model, sub, x = masked("plain")
    path = sub.save(tmp_path / "sub.safetensors")
    with torch.no_grad():
        reference = sub(x)
    original = copy.deepcopy(model)
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)  # an in-place edit after extraction
    with pytest.raises(ExportError, match="check_weights=False") as info:
        sub.export(example_inputs=x)
    assert sub.weights_digest[:12] in str(info.value)
    assert weights_digest(model)[:12] in str(info.value)
    exported = sub.export(example_inputs=x, check_weights=False)  # the explicit opt-out
    with torch.no_grad():
        torch.testing.assert_close(exported(x), sub(x))

    with pytest.raises(ValueError, match="other weights"):
        SubNetwork.load(path, model)
    loaded = SubNetwork.load(path, model, check_weights=False)
    assert loaded.weights_digest == weights_digest(model)  # it now describes these weights
    back = SubNetwork.load(path, original)
    with torch.no_grad():
        assert torch.equal(back(x), reference)


def test_export_of_a_cast_subnetwork_is_built_at_the_model_dtype() -> None:
    _, sub, x = masked("plain")
    sub.double()
    exported = sub.export(example_inputs=x)
    with torch.no_grad():
        out = exported(x)
        torch.testing.assert_close(out.double(), sub(x.double()), rtol=1e-5, atol=1e-6)


def test_scores_must_be_finite_and_non_negative() -> None:
    model, sub, _ = masked("plain")
    for bad in (float("nan"), -0.5, float("inf")):
        scores = sub.scores.clone()
        scores[3] = bad
        with pytest.raises(ValueError, match="finite and non-negative"):
            SubNetwork(model, sub.structure, scores, sub.gates_open)
    with pytest.raises(ValueError, match="floating-point"):
        SubNetwork(model, sub.structure, sub.scores.long(), sub.gates_open)
