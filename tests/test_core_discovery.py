"""Unit and gate discovery on real torchvision/timm architectures (random weights, small inputs)."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

from captum_chains._utils.model_state import ModelSnapshot
from captum_chains.units import discover


def _convs(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def test_resnet18_units_gates_and_sites():
    model = torchvision.models.resnet18(num_classes=10).eval()
    snapshot = ModelSnapshot.take(model)
    s = discover(model, (torch.randn(1, 3, 64, 64),))
    snapshot.assert_unchanged(model)
    assert s.unit_names == tuple(_convs(model))
    # every conv is scored after the BatchNorm that follows it (Eq. 3)
    for u in s.units:
        assert isinstance(model.get_submodule(u.site), nn.BatchNorm2d)
    blocks = [g.name for g in s.gates if g.kind == "block"]
    layers = [g.name for g in s.gates if g.kind == "layer"]
    assert blocks == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert layers == ["layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2"]
    assert s.family == "residual" and s.num_classes == 10


def test_paper_filter_counts_of_vgg19_and_resnet50():
    """VGG-19 has 5504 conv filters and ResNet-50 26 560 (the counts behind the paper's %)."""
    vgg = torchvision.models.vgg19(num_classes=10).eval()
    s = discover(vgg, (torch.randn(1, 3, 32, 32),))
    assert s.total_units == 5504 and len(s.units) == 16 and s.family == "plain"
    assert all(g.kind == "layer" for g in s.gates)
    resnet = torchvision.models.resnet50(num_classes=10).eval()
    s = discover(resnet, (torch.randn(1, 3, 64, 64),))
    assert s.total_units == 26560 and len(s.units) == 53
    assert len([g for g in s.gates if g.kind == "block"]) == 12


def test_timm_efficientnet_lite_scores_before_relu6_and_gates_residual_blocks():
    model = timm.create_model("tf_efficientnet_lite0", num_classes=10).eval()
    s = discover(model, (torch.randn(1, 3, 64, 64),))
    assert s.unit_names == tuple(_convs(model))
    assert all(u.site.endswith(".act") and u.hook == "input" for u in s.units)
    assert s.family == "mobile"
    residual = [
        n
        for n, m in model.named_modules()
        if type(m).__name__ in {"InvertedResidual", "DepthwiseSeparableConv"} and m.has_skip
    ]
    assert [g.name for g in s.gates if g.kind == "block"] == residual
    assert sum(u.depthwise for u in s.units) == sum(
        1 for n in _convs(model) if n.endswith("conv_dw")
    )


def test_squeeze_excitation_convs_are_not_scored():
    model = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    s = discover(model, (torch.randn(1, 3, 64, 64),))
    se = [n for n, m in model.named_modules() if type(m).__name__ == "SqueezeExcitation"]
    assert se
    assert not [u for u in s.units if any(u.name.startswith(p + ".") for p in se)]
    assert [u.name for u in s.units] == [
        n for n in _convs(model) if not any(n.startswith(p + ".") for p in se)
    ]


@pytest.mark.parametrize(
    "factory",
    [
        lambda: torchvision.models.vgg11_bn(num_classes=10),
        lambda: torchvision.models.resnext50_32x4d(num_classes=10),
        lambda: torchvision.models.mobilenet_v2(num_classes=10),
        lambda: torchvision.models.regnet_x_400mf(num_classes=10),
        lambda: torchvision.models.densenet121(num_classes=10),
        lambda: timm.create_model("convnext_atto", num_classes=10),
    ],
    ids=["vgg11_bn", "resnext50", "mobilenet_v2", "regnet_x_400mf", "densenet121", "convnext_atto"],
)
def test_discovery_runs_on_common_cnns_and_scores_every_conv_once(factory):
    model = factory().eval()
    s = discover(model, (torch.randn(1, 3, 64, 64),))
    assert len(set(s.unit_names)) == len(s.unit_names)
    names = set(_convs(model))
    assert {u.name for u in s.units if u.kind == "filter"} <= names
    assert s.total_units > 0
    modules = dict(model.named_modules())
    for g in s.gates:
        assert g.start in modules and g.end in modules
