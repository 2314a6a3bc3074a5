"""Shared fixtures: tiny deterministic CNNs of every family the core supports.

Every model here is built in code with seeded random weights; nothing is downloaded.
Tests run single-threaded: on a shared 2-core machine OpenMP spinning makes
multi-threaded small ops tens of times slower.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

torch.set_num_threads(int(os.environ.get("CAPTUM_CHAINS_TEST_THREADS", "1")))

settings.register_profile(
    "default", deadline=None, max_examples=12, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


class PlainCNN(nn.Module):
    """conv-(BN)-ReLU x3 with a pool and a linear head; optional BN."""

    def __init__(self, width: int = 4, bn: bool = True, classes: int = 5) -> None:
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=not bn),
            norm(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=not bn),
            norm(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=not bn),
            norm(2 * width),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Residual(nn.Module):
    """conv-BN-ReLU-conv-BN plus identity, then ReLU."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + x)


class ResidualCNN(nn.Module):
    def __init__(self, width: int = 4, blocks: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.blocks = nn.Sequential(*[Residual(width) for _ in range(blocks)])
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2-style: expand 1x1, depthwise 3x3, project 1x1, with a skip."""

    def __init__(self, width: int, expand: int = 2) -> None:
        super().__init__()
        hidden = width * expand
        self.expand = nn.Sequential(
            nn.Conv2d(width, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()
        )
        self.dw = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, width, 1, bias=False), nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.dw(self.expand(x)))


class DepthwiseCNN(nn.Module):
    def __init__(self, width: int = 4, blocks: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU6()
        )
        self.blocks = nn.Sequential(*[InvertedResidual(width) for _ in range(blocks)])
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


FAMILIES = ("plain", "plain_nobn", "residual", "depthwise")


def randomize_bn(model: nn.Module, seed: int) -> None:
    """Give BatchNorm layers non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(c, generator=gen) * 0.5 + 1)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)


def make_model(family: str, width: int = 4, seed: int = 0, depth: int = 2) -> nn.Module:
    """A tiny model of one family, seeded, in eval mode."""
    torch.manual_seed(seed)
    if family == "plain":
        model: nn.Module = PlainCNN(width)
    elif family == "plain_nobn":
        model = PlainCNN(width, bn=False)
    elif family == "residual":
        model = ResidualCNN(width, blocks=depth)
    elif family == "depthwise":
        model = DepthwiseCNN(width, blocks=depth)
    else:
        raise ValueError(family)
    randomize_bn(model, seed)
    return model.eval()


def make_inputs(n: int = 4, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def assert_open_masks_reproduce(model: nn.Module, structure, x: torch.Tensor) -> None:
    """All scores 1 and all gates open leave the model's output bit-for-bit unchanged."""
    from captum_chains.masking import MaskState, apply_masks

    state = MaskState(
        scores={u.name: torch.ones(u.size) for u in structure.units},
        gates={g.name: torch.tensor(1.0) for g in structure.gates},
    )
    with torch.no_grad():
        expected = model(x)
        with apply_masks(model, structure, state):
            got = model(x)
    assert torch.equal(got, expected)


class TwoConv(nn.Module):
    """conv-BN-ReLU twice, global pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def as_chain(sub, x: torch.Tensor):
    """A :class:`~captum_chains.result.Chain` around a hand-made SubNetwork and its region."""
    from captum_chains.config import ChainConfig
    from captum_chains.result import Chain

    return Chain(
        importance=sub.importance,
        gates={},
        subnetwork=sub,
        history=[],
        structure=sub.structure,
        config=ChainConfig(),
        kl=0.0,
        finetuned=False,
        inputs=x,
    )
