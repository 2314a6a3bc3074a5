"""One formatter: NeuroChains, critical pathways and interactions refuse bad input alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import make_inputs, make_model

from captum_chains import ChainExtractor, CriticalPathways, InteractionPrimitives
from captum_chains._utils.model_state import ModelSnapshot

MASK = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3]] * 8)


def _methods(model: torch.nn.Module) -> dict[str, Callable[..., Any]]:
    return {
        "neurochains": lambda x, target: ChainExtractor(model, steps=2).attribute(
            x, target=target, progress=False
        ),
        "pathways": lambda x, target: CriticalPathways(model).attribute(x, target=target),
        "interactions": lambda x, target: InteractionPrimitives(model).attribute(
            x, 0.0, target, feature_mask=MASK, progress=False
        ),
    }


BAD = [
    ("a list of floats", lambda x: x.tolist(), 0, TypeError, "must be a torch.Tensor"),
    ("an empty tuple", lambda x: (), 0, ValueError, "empty tuple"),
    ("a scalar", lambda x: torch.tensor(1.0), 0, ValueError, "is a scalar"),
    ("batches that differ", lambda x: (x, x[:1]), 0, ValueError, "share the batch size"),
]


@pytest.mark.parametrize("method", ["neurochains", "pathways", "interactions"])
@pytest.mark.parametrize(("what", "change", "target", "error", "match"), BAD)
def test_bad_inputs_get_the_same_error_from_every_method(
    method: str, what: str, change: Callable, target: Any, error: type, match: str
) -> None:
    model = make_model("plain", width=4, seed=0)
    snapshot = ModelSnapshot.take(model)
    with pytest.raises(error, match=match):
        _methods(model)[method](change(make_inputs(n=2)), target)
    snapshot.assert_unchanged(model)


@pytest.mark.parametrize("method", ["neurochains", "interactions"])
@pytest.mark.parametrize(
    ("target", "error", "match"),
    [
        (torch.tensor([True, False]), TypeError, "integer class indices"),
        ([0, 1, 1], ValueError, "3 entries but there are 2 inputs"),
        (True, TypeError, "not a bool"),
    ],
)
def test_bad_class_targets_get_the_same_error(
    method: str, target: Any, error: type, match: str
) -> None:
    model = make_model("plain", width=4, seed=0)
    with pytest.raises(error, match=match):
        _methods(model)[method](make_inputs(n=2), target)
