"""The recorded program keeps sizes symbolic and refuses control flow on tensor values."""

from __future__ import annotations

import copy
import operator
import pickle

import pytest
import torch
from conftest import make_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from captum_chains._utils.model_state import ModelSnapshot
from captum_chains.export import export_subnetwork
from captum_chains.export.recording import TrackedInt, record
from captum_chains.export.tracing import ExportError, working_copy
from captum_chains.subnetwork import subnetwork_from_mappings
from captum_chains.units import discover


class Tokens(nn.Module):
    """Sizes everywhere: a class token expanded to the batch, patches from the image size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.token = nn.Parameter(torch.randn(1, 1, 6))
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        b, c = y.shape[0], y.size(1)
        h, w = y.shape[-2:]
        patches = y.reshape(b, c, (h // 2) * 2 * w).transpose(1, 2)  # [B, H*W, C]
        tokens = torch.cat([self.token.expand(b, -1, -1), patches], dim=1)
        pooled = tokens[:, 1:].sum(1) / (h * w) + tokens[:, 0]
        return self.fc(pooled.view(-1, c))


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 5), st.sampled_from([4, 6, 8]), st.integers(1, 4), st.sampled_from([2, 6]))
def test_a_recorded_program_runs_at_other_batch_and_image_sizes(batch, side, batch2, side2):
    torch.manual_seed(0)
    model = Tokens().eval()
    gm, _ = record(working_copy(model), (make_inputs(n=batch, size=side, seed=1),))
    other = make_inputs(n=batch2, size=side2, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(gm(other), model(other))


def test_sizes_are_graph_nodes_and_plain_ints_elsewhere():
    seen: dict[str, object] = {}

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b = x.shape[0]
            seen.update(b=b, double=b * 2, half=b / 2, copied=copy.copy(b), cmp=b > 1)
            seen["pickled"] = pickle.loads(pickle.dumps(b))
            return x.view(b * 2, -1)

    gm, _ = record(Spy(), (torch.randn(4, 6),))
    assert isinstance(seen["b"], TrackedInt) and seen["b"] == 4
    assert isinstance(seen["double"], TrackedInt) and seen["double"] == 8
    assert type(seen["half"]) is float and type(seen["cmp"]) is bool
    assert type(seen["pickled"]) is int and seen["copied"] == 4
    (view,) = [n for n in gm.graph.nodes if n.target == "view"]
    assert view.args[1].target is operator.mul  # b * 2 is a node: the view follows the batch
    torch.testing.assert_close(gm(torch.randn(6, 6)).shape, torch.Size([12, 3]))


class ReadsValue(nn.Module):
    def __init__(self, what: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.fc = nn.Linear(4, 2)
        self.what = what

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.what == "data" and y.mean().item() > 100:  # control flow on the data
            y = -y
        if self.what == "parameter":  # a parameter's value: the same for every input
            y = y * float(self.scale.item())
        return self.fc(y.mean((2, 3)))


def _sub(model: nn.Module, x: torch.Tensor):
    structure = discover(model, (x,))
    return subnetwork_from_mappings(model, structure, {"conv": torch.tensor([1.0, 0, 1, 1])})


def test_export_refuses_control_flow_on_data_and_names_the_module():
    model = ReadsValue("data").eval()
    x = make_inputs(n=2, size=6, seed=3)
    snapshot = ModelSnapshot.take(model)
    with pytest.raises(ExportError, match=r"'<model>' \(ReadsValue\) reads a tensor's value"):
        export_subnetwork(_sub(model, x), example_inputs=x)
    snapshot.assert_unchanged(model)


def _assert_export_holds_on(model: nn.Module, x: torch.Tensor, other: torch.Tensor) -> None:
    """Export the chain of ``model`` on ``x``; it must equal the SubNetwork on ``other``."""
    sub = _sub(model, x)
    exported = export_subnetwork(sub, example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(exported(other), sub(other), rtol=1e-5, atol=1e-6)


def test_reading_a_parameter_value_exports():
    model = ReadsValue("parameter").eval()
    _assert_export_holds_on(
        model, make_inputs(n=2, size=6, seed=3), make_inputs(n=3, size=8, seed=4)
    )


class Sized(nn.Module):
    """Reads sizes the way models do: kept as read (``keep``) or made plain ints (``freeze``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        half = y.shape[-1] // 2
        y = y[..., :half] + y[..., half : 2 * half]  # slices by a size
        b = int(y.shape[0]) if self.how == "freeze" else y.shape[0]
        return self.fc(y.reshape(b, 4, -1).mean(-1))


def test_slices_by_sizes_follow_the_image_size():
    model = Sized("keep").eval()
    _assert_export_holds_on(
        model, make_inputs(n=2, size=6, seed=5), make_inputs(n=3, size=10, seed=6)
    )


def test_a_frozen_batch_size_is_refused_with_its_cause():
    model = Sized("freeze").eval()
    x = make_inputs(n=2, size=6, seed=5)
    with pytest.raises(ExportError, match=r"another size.*int\(x\.shape\[0\]\)"):
        export_subnetwork(_sub(model, x), example_inputs=x)
