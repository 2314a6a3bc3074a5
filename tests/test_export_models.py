"""Export of full-size models (slow): the issue's test matrix at its real widths, the
real ImageNet EfficientNet-Lite0 on photos, and the trained digits models."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from test_export import RTOL, _randomize_norms, assert_exact

from captum_chains.export import export_subnetwork
from captum_chains.subnetwork import subnetwork_from_mappings
from captum_chains.units import discover

pytestmark = pytest.mark.slow

FULL = {
    "vgg11": lambda: torchvision.models.vgg11(num_classes=10),
    "vgg11_bn": lambda: torchvision.models.vgg11_bn(num_classes=10),
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "resnext": lambda: timm.create_model("resnext26ts", num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "mobilenet_v3_large": lambda: torchvision.models.mobilenet_v3_large(num_classes=10),
    "efficientnet_b0": lambda: timm.create_model("efficientnet_b0", num_classes=10),
    "tf_efficientnet_lite0": lambda: timm.create_model("tf_efficientnet_lite0", num_classes=10),
    "convnext_atto": lambda: timm.create_model("convnext_atto", num_classes=10),
    "regnet_x_400mf": lambda: torchvision.models.regnet_x_400mf(num_classes=10),
    "regnet_y_400mf": lambda: torchvision.models.regnet_y_400mf(num_classes=10),
}


def _random_masks(structure, seed: int, keep: float = 0.4, close: float = 0.3):
    gen = torch.Generator().manual_seed(seed)
    importance = {}
    for i, unit in enumerate(structure.units):
        kept = torch.rand(unit.size, generator=gen) < keep
        if i % 11 == 5:
            kept[:] = False  # an empty layer now and then
        importance[unit.name] = kept.float() * (torch.rand(unit.size, generator=gen) + 0.25)
    gates = {g.name: bool(torch.rand(1, generator=gen) > close) for g in structure.gates}
    return importance, gates


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_model_exports_exactly(name):
    torch.manual_seed(0)
    model = _randomize_norms(FULL[name](), seed=1).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    structure = discover(model, (x,))
    for seed in range(2):
        importance, gates = _random_masks(structure, seed)
        sub = subnetwork_from_mappings(model, structure, importance, gates)
        exported = export_subnetwork(sub, example_inputs=x)
        assert_exact(exported, sub, torch.randn(3, 3, 72, 72))
        assert exported.report.params_after < exported.report.params_before


def test_pretrained_lite0_chain_on_photos():
    from captum_chains.data import local_region, sample_photo
    from captum_chains.pretrained import load_efficientnet_lite0

    model = load_efficientnet_lite0()
    region = local_region([sample_photo("chelsea"), sample_photo("coffee")], n=4, seed=0)
    structure = discover(model, (region[:2],))
    importance, gates = _random_masks(structure, seed=0, keep=0.2)
    sub = subnetwork_from_mappings(model, structure, importance, gates)
    exported = sub.export(example_inputs=region[:2], check_inputs=region)
    others = local_region([sample_photo("astronaut")], n=2, seed=1)
    assert_exact(exported, sub, others)
    report = exported.report
    assert report.relative_error <= RTOL
    assert report.params_after < 0.5 * report.params_before
    assert report.macs_after < 0.5 * report.macs_before


@pytest.mark.parametrize("arch", ["vgg", "resnet"])
def test_trained_digits_models_export_exactly(arch):
    from captum_chains.zoo import load_digits_data, train_digits_model

    model = train_digits_model(arch, seed=0)
    x = load_digits_data().x_test[:16]
    structure = discover(model, (x[:2],))
    importance, gates = _random_masks(structure, seed=3, keep=0.3)
    sub = subnetwork_from_mappings(model, structure, importance, gates)
    exported = export_subnetwork(sub, example_inputs=x[:2], check_inputs=x)
    assert_exact(exported, sub, x)
