"""``ChainConfig.batch_size``: each optimization step on a random subset of each region."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from captum_chains import ChainConfig, ChainExtractor
from captum_chains._utils.model_state import ModelSnapshot

FAST = {"steps": 12, "finetune_steps": 3, "early_stop_min_steps": 50}


class BatchLog(nn.Module):
    """Wraps a model and records the first input of every call with gradients (a step)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[torch.Tensor] = []
        self.evaluations: list[int] = []

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.calls.append(x.detach().clone())
        else:
            self.evaluations.append(len(x))
        return self.model(x)


def _importance(chain) -> torch.Tensor:
    return torch.cat([chain.importance[name] for name in sorted(chain.importance)])


@pytest.mark.parametrize("family", ["plain", "residual", "depthwise"])
def test_a_batch_at_least_the_region_equals_full_steps_bit_for_bit(family):
    model = make_model(family, width=4, seed=1)
    x = make_inputs(n=6, size=8, seed=1)
    full = ChainExtractor(model, ChainConfig(**FAST)).attribute(x, progress=False)
    for size in (6, 50):
        same = ChainExtractor(model, ChainConfig(**FAST, batch_size=size)).attribute(
            x, progress=False
        )
        assert torch.equal(_importance(same), _importance(full))
        assert same.kl == full.kl


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 5), st.integers(0, 3))
def test_each_step_runs_on_batch_size_distinct_inputs_of_each_region(size, seed):
    """Initial logits, thresholding and the fine-tuning decision see every input; each
    optimization step sees ``size`` distinct inputs of each region, in region order."""
    torch.manual_seed(seed)
    logged = BatchLog(make_model("plain", width=4, seed=seed)).eval()
    regions = [make_inputs(n=6, size=8, seed=10 * seed + r) for r in range(2)]
    # compact_below=None: the regions run batched, each step on 2 * size inputs
    config = ChainConfig(**FAST, batch_size=size, sample_seed=seed, compact_below=None)
    ChainExtractor(logged, config).attribute_many(regions, progress=False)
    rows = {r: {tuple(x.flatten().tolist()) for x in region} for r, region in enumerate(regions)}
    assert logged.calls and all(len(c) == 2 * size for c in logged.calls)
    assert 12 in logged.evaluations  # the whole regions: original logits, thresholding
    for call in logged.calls:
        for r in range(2):
            picked = [tuple(x.flatten().tolist()) for x in call[r * size : (r + 1) * size]]
            assert len(set(picked)) == size  # without replacement
            assert set(picked) <= rows[r]  # from its own region


def test_subsets_follow_the_sample_seed():
    x = make_inputs(n=8, size=8, seed=2)

    def subsets(seed: int) -> list[torch.Tensor]:
        logged = BatchLog(make_model("residual", width=4, seed=2)).eval()
        config = ChainConfig(**FAST, batch_size=3, sample_seed=seed)
        ChainExtractor(logged, config).attribute(x, progress=False)
        return logged.calls

    first, again, other = subsets(0), subsets(0), subsets(1)
    assert len(first) == len(again) and all(map(torch.equal, first, again))
    assert not all(map(torch.equal, first, other))


def test_per_example_extra_arguments_follow_their_inputs():
    class Shift(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = make_model("plain", width=4, seed=3)

        def forward(self, x: torch.Tensor, tag: torch.Tensor) -> torch.Tensor:
            # each input carries its own tag: a row that met another row's tag fails loudly
            assert torch.equal(tag, x.flatten(1)[:, 0]), "extra argument rows were mixed up"
            return self.inner(x)

    x = make_inputs(n=7, size=8, seed=3)
    model = Shift().eval()
    snapshot = ModelSnapshot.take(model)
    chain = ChainExtractor(model, ChainConfig(**FAST, batch_size=3)).attribute(
        x, additional_forward_args=(x.flatten(1)[:, 0].clone(),), progress=False
    )
    assert chain.num_filters >= 0
    snapshot.assert_unchanged(model)


@pytest.mark.parametrize("value", [0, -2, True, 2.5, "4"])
def test_bad_batch_sizes_are_refused(value):
    with pytest.raises(ValueError, match="batch_size"):
        ChainConfig(batch_size=value)


def test_the_paper_preset_uses_every_input():
    assert ChainConfig.paper().batch_size is None
    assert ChainConfig.paper(batch_size=4).batch_size == 4
