"""Per-example ``additional_forward_args`` (Captum's convention) follow their inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model
from torch import nn

from captum_chains import ChainExtractor
from captum_chains.metrics import fidelity

FAST = {"steps": 20, "finetune_steps": 3, "l1": 0.05, "early_stop_min_steps": 20}


class WithContrast(nn.Module):
    """``base(x * contrast)`` with a per-example contrast passed to forward."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
        return self.base(x * contrast.view(-1, 1, 1, 1))


def _contrast(n: int, seed: int) -> torch.Tensor:
    return 0.5 + torch.rand(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["plain", "residual"])
def test_per_example_extra_args_equal_the_baked_in_model(family: str) -> None:
    base = make_model(family, width=4, seed=0)
    x, contrast = make_inputs(n=6, seed=1), _contrast(6, 2)
    chain = ChainExtractor(WithContrast(base), **FAST).attribute(
        x, additional_forward_args=contrast, progress=False
    )
    # the manual version: the contrast applied to the inputs, the chain of the base model
    scaled = x * contrast.view(-1, 1, 1, 1)
    manual = ChainExtractor(base, **FAST).attribute(scaled, progress=False)
    assert chain.importance.keys() == {f"base.{name}" for name in manual.importance}
    for name, scores in manual.importance.items():
        torch.testing.assert_close(chain.importance[f"base.{name}"], scores, rtol=1e-5, atol=1e-6)
    assert chain.kl == pytest.approx(manual.kl, rel=1e-4, abs=1e-7)
    # the metrics slice the per-example argument along with the inputs in every chunk
    whole = fidelity(chain, x, additional_forward_args=contrast)
    chunked = fidelity(chain, x, additional_forward_args=contrast, batch_size=1)
    baked = fidelity(manual, scaled)
    for name in ("kl", "agreement", "mean_drop"):
        assert getattr(chunked, name) == pytest.approx(getattr(whole, name), abs=1e-6)
        assert getattr(baked, name) == pytest.approx(getattr(whole, name), abs=1e-5)


def test_attribute_many_uses_per_example_extra_args_with_every_region() -> None:
    model = WithContrast(make_model("plain", width=4, seed=3))
    regions = [make_inputs(n=4, seed=s) for s in (4, 5)]
    contrast = _contrast(4, 6)
    extractor = ChainExtractor(model, **FAST)
    batched = extractor.attribute_many(regions, additional_forward_args=contrast, progress=False)
    for chain, x in zip(batched, regions):
        alone = extractor.attribute(x, additional_forward_args=contrast, progress=False)
        for name, scores in alone.importance.items():
            torch.testing.assert_close(chain.importance[name], scores, rtol=1e-4, atol=1e-5)
