"""Figures of AND-OR interaction primitives render headless and show the right content."""

from __future__ import annotations

import io

import matplotlib
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from captum_chains.interactions import InteractionPrimitives, SolverConfig, patch_grid_mask
from captum_chains.interactions.plots import (
    plot_shared_vs_distinctive,
    plot_strength_by_order,
    plot_top_interactions,
)


class Net(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.adaptive_avg_pool2d(self.conv(x).relu(), 4).flatten(1))


@pytest.fixture(scope="module")
def setup():
    images = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    mask = patch_grid_mask(12, 12, 2, 3)
    ip = InteractionPrimitives([Net(0).eval(), Net(1).eval()], model_names=["a", "b"])
    res = ip.attribute(
        images,
        baselines=0.0,
        target=[1, 3],
        feature_mask=mask,
        salient_count=6,
        solver=SolverConfig(iterations=500),
        progress=False,
    )
    return res, images, mask


def _renders(fig: Figure) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_strength_by_order_bars_match_the_result(setup) -> None:
    res, _, _ = setup
    backend = matplotlib.get_backend()
    fig = plot_strength_by_order(res, model=1, sample=0)
    assert matplotlib.get_backend() == backend  # no backend switch, no pyplot state
    _renders(fig)
    ax = fig.axes[0]  # AND panel: bars = [salient +, salient -, shared +, shared -] per order
    heights = [p.get_height() for p in ax.patches]
    expected = res.strength_by_order("and", res.salient("and"))[0, 1, :, 0]
    assert heights[: res.n + 1] == pytest.approx(expected.tolist())
    assert len(fig.axes) == 2


def test_top_interactions_on_the_image(setup) -> None:
    res, images, mask = setup
    fig = plot_top_interactions(res, images[0], mask, sample=0, model=0, kind="or", k=4, ncols=2)
    _renders(fig)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    expected = res.top("or", sample=0, model=0, k=4)
    assert len(titles) == len(expected)
    assert titles[0].startswith("OR {" + ",".join(expected[0].players) + "}")


def test_shared_vs_distinctive_side_by_side(setup) -> None:
    res, _, _ = setup
    fig = plot_shared_vs_distinctive(res, sample=1, kind="and", max_items=6)
    _renders(fig)
    assert len(fig.axes) == 2
    shared = res.shared("and")[1]
    for i, ax in enumerate(fig.axes):
        colors = [p.get_facecolor() for p in ax.patches]
        items = res.listing("and", res.salient("and")[1, i], 1, i)[:6]
        assert len(colors) == len(items)
        n_shared = sum(bool(shared[it.subset]) for it in items)
        blue = matplotlib.colors.to_rgba("#3A87BC")
        assert sum(c == pytest.approx(blue) for c in colors) == n_shared
        assert f"s_and = {float(res.generalization('and')[1, i]):.2f}" in ax.get_title()
