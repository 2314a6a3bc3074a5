"""``ChainConfig.channels_last``: the optimization's inputs in channels-last layout."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from captum_chains import ChainConfig, ChainExtractor
from captum_chains._utils.layout import to_channels_last, use_channels_last
from captum_chains._utils.model_state import ModelSnapshot

FAST = {"steps": 15, "finetune_steps": 3, "early_stop_min_steps": 50}


def _importance(chain) -> torch.Tensor:
    return torch.cat([chain.importance[name] for name in sorted(chain.importance)])


class LayoutLog(nn.Module):
    """Wraps a model and records whether each gradient-taking call's input is channels-last."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.layouts: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.layouts.append(x.is_contiguous(memory_format=torch.channels_last))
        return self.model(x)


class FlattensByView(nn.Module):
    """A CNN whose head calls ``.view`` on a convolution's output: impossible on a
    channels-last tensor, so the extractor must fall back to the given layout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.head(y.view(y.shape[0], -1))


@settings(max_examples=6, deadline=None)
@given(st.sampled_from(["plain", "residual", "depthwise"]), st.integers(0, 20))
def test_channels_last_gives_the_chain_of_the_given_layout(family, seed):
    """Only the layout changes: the same kept units and scores up to float rounding."""
    model = make_model(family, width=4, seed=seed)
    x = make_inputs(n=4, size=8, seed=seed)
    plain = ChainExtractor(model, ChainConfig(**FAST, channels_last=False)).attribute(
        x, progress=False
    )
    nhwc = ChainExtractor(model, ChainConfig(**FAST, channels_last=True)).attribute(
        x, progress=False
    )
    torch.testing.assert_close(_importance(nhwc), _importance(plain), atol=1e-4, rtol=1e-4)
    assert nhwc.kl == pytest.approx(plain.kl, abs=1e-5)


def test_the_steps_run_channels_last_by_default_on_cpu_and_as_given_when_off():
    for option, expected in ((None, True), (True, True), (False, False)):
        logged = LayoutLog(make_model("plain", width=4, seed=0)).eval()
        config = ChainConfig(**FAST, channels_last=option)
        ChainExtractor(logged, config).attribute(make_inputs(n=4, size=8), progress=False)
        assert logged.layouts and set(logged.layouts) == {expected}


def test_a_model_that_cannot_take_channels_last_falls_back_to_the_given_layout():
    torch.manual_seed(0)
    model = FlattensByView().eval()
    x = make_inputs(n=4, size=8)
    with pytest.raises(RuntimeError, match="view"):
        model(to_channels_last((x,))[0])
    snapshot = ModelSnapshot.take(model)
    auto = ChainExtractor(model, ChainConfig(**FAST)).attribute(x, progress=False)
    plain = ChainExtractor(model, ChainConfig(**FAST, channels_last=False)).attribute(
        x, progress=False
    )
    assert torch.equal(_importance(auto), _importance(plain))
    snapshot.assert_unchanged(model)


def test_the_user_inputs_keep_their_layout():
    x = make_inputs(n=4, size=8)
    chain = ChainExtractor(make_model("plain", width=4), ChainConfig(**FAST)).attribute(
        x, progress=False
    )
    assert x.is_contiguous()
    assert chain.inputs.is_contiguous()


def test_which_inputs_go_channels_last():
    image, flat = torch.zeros(2, 3, 4, 4), torch.zeros(2, 5)
    assert use_channels_last(None, (image,))
    assert use_channels_last(True, (image, flat))
    assert not use_channels_last(False, (image,))
    assert not use_channels_last(None, (flat,))
    assert not use_channels_last(True, (flat,))
    assert not use_channels_last(None, (image.long(),))
    converted = to_channels_last((image, flat, image.long()))
    assert converted[0].is_contiguous(memory_format=torch.channels_last)
    assert converted[1] is flat and converted[2].is_contiguous()
    torch.testing.assert_close(converted[0], image, rtol=0, atol=0)


def test_a_bad_layout_option_is_refused_with_its_name():
    with pytest.raises(ValueError, match="channels_last"):
        ChainConfig(channels_last="yes")  # type: ignore[arg-type]
