"""Exact physical export of SubNetworks (captum_chains.export) on every model family.

Every test compares the export with the SubNetwork it came from (which runs the
original model under hooks), on inputs of a different batch size and image size than
the ones used for tracing. Parameter counts are compared with an independent count:
the parameters of the original model that the SubNetwork's output depends on
(non-zero gradient of random projections of its logits).
"""

from __future__ import annotations

import copy
import io
import sys
import warnings

import pytest
import timm
import torch
from conftest import FAMILIES, make_inputs, make_model
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models import mobilenetv2, mobilenetv3, regnet, resnet, vgg

from captum_chains._utils.model_state import ModelSnapshot
from captum_chains.export import (
    ExportError,
    count_macs,
    count_parameters,
    export_subnetwork,
    verify,
)
from captum_chains.subnetwork import SubNetwork, subnetwork_from_mappings
from captum_chains.units import discover
from captum_chains.zoo import build_digits_model

RTOL = 1e-4
#: model-sized examples: report a failure as drawn (shrinking would take minutes)
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)


# --------------------------------------------------------------------------- models
def _randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN statistics/affines and LayerNorm affines (defaults hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(c, generator=gen) * 0.3 + 1)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.3 + 1)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
            for name, p in m.named_parameters(recurse=False):
                if name == "gamma":  # ConvNeXt layer scale (1e-6 at init)
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
                elif bool((p == 0).all()):  # zero-initialised biases
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _tiny_vgg(bn: bool) -> nn.Module:
    features = vgg.make_layers([8, "M", 16, "M", 16, 16, "M"], batch_norm=bn)
    with torch.device("meta"):  # skip initialising torchvision's 120M-parameter head
        model = vgg.VGG(features, num_classes=5, init_weights=False)
    model.classifier = nn.Sequential(
        nn.Linear(16 * 49, 12), nn.ReLU(True), nn.Dropout(), nn.Linear(12, 5)
    )
    return model


def _regnet(se: bool) -> nn.Module:
    params = regnet.BlockParams.from_init_params(
        depth=6, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25 if se else None
    )
    return regnet.RegNet(params, num_classes=5)


def _timm_test_model(name: str) -> nn.Module:
    """One of timm's tiny test models (skipped on a timm that has none)."""
    if name not in timm.list_models(name):
        pytest.skip(f"timm {timm.__version__} has no {name}")
    return timm.create_model(name, num_classes=5)


BUILDERS = {
    "vgg": lambda: _tiny_vgg(False),
    "vgg_bn": lambda: _tiny_vgg(True),
    "resnet": lambda: resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=5),
    "resnext": lambda: resnet.ResNet(
        resnet.Bottleneck, [1, 1, 1, 1], num_classes=5, groups=4, width_per_group=4
    ),
    "mobilenet_v2": lambda: mobilenetv2.MobileNetV2(num_classes=5, width_mult=0.25),
    "mobilenet_v3": lambda: mobilenetv3.mobilenet_v3_small(num_classes=5, width_mult=0.25),
    "efficientnet_se": lambda: _timm_test_model("test_efficientnet"),
    "efficientnet_lite0": lambda: timm.create_model("tf_efficientnet_lite0", num_classes=5),
    "convnext": lambda: _timm_test_model("test_convnext"),
    "regnet_x": lambda: _regnet(se=False),
    "regnet_y": lambda: _regnet(se=True),
    "digits_vgg": lambda: build_digits_model("vgg"),
    "digits_resnet": lambda: build_digits_model("resnet"),
}
_CACHE: dict[str, tuple[nn.Module, object, torch.Tensor]] = {}


def family_model(name: str) -> tuple[nn.Module, object, torch.Tensor]:
    """(model, structure, example inputs) of one family, built once per session."""
    if name not in _CACHE:
        torch.manual_seed(0)
        model = _randomize_norms(BUILDERS[name](), seed=1).eval()
        channels = 1 if name.startswith("digits") else 3
        x = torch.randn(2, channels, 32, 32, generator=torch.Generator().manual_seed(2))
        _CACHE[name] = (model, discover(model, (x,)), x)
    return _CACHE[name]


def check_inputs(x: torch.Tensor, seed: int = 3) -> torch.Tensor:
    """Different batch size and image size than the traced example."""
    size = 40 if x.shape[-1] == 32 else x.shape[-1] + 4
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, x.shape[1], size, size, generator=gen)


# --------------------------------------------------------------------------- masks
MODES = ("random", "random", "empty", "all", "single")


@st.composite
def keep_masks(draw, structure, modes=MODES, close_gates=True):
    """Scores per unit layer (0 = removed) and open flags per gate."""
    importance = {}
    for unit in structure.units:
        mode = draw(st.sampled_from(modes))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        if mode == "random":
            keep = torch.rand(unit.size, generator=gen) < draw(st.sampled_from((0.1, 0.5, 0.9)))
        elif mode == "empty":
            keep = torch.zeros(unit.size, dtype=torch.bool)
        elif mode == "all":
            keep = torch.ones(unit.size, dtype=torch.bool)
        else:
            keep = torch.zeros(unit.size, dtype=torch.bool)
            keep[int(torch.randint(unit.size, (1,), generator=gen))] = True
        importance[unit.name] = keep.float() * (torch.rand(unit.size, generator=gen) + 0.25)
    gates = {g.name: not (close_gates and draw(st.booleans())) for g in structure.gates}
    return importance, gates


def assert_exact(exported: nn.Module, sub: SubNetwork, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref = sub(x)
    diff = verify(exported, sub, x)
    assert diff <= RTOL * float(ref.max() - ref.min()), diff


# --------------------------------------------------------------------------- matrix
@pytest.mark.parametrize("name", sorted(set(BUILDERS) - {"digits_vgg", "digits_resnet"}))
@settings(max_examples=2, phases=NO_SHRINK)
@given(data=st.data())
def test_export_equals_subnetwork_on_every_family(name, data):
    model, structure, x = family_model(name)
    importance, gates = data.draw(keep_masks(structure))
    sub = subnetwork_from_mappings(model, structure, importance, gates)
    snapshot = ModelSnapshot.take(model)
    exported = sub.export(example_inputs=x)
    snapshot.assert_unchanged(model)
    assert_exact(exported, sub, check_inputs(x))
    report = exported.report
    assert report.params_after <= report.params_before
    assert report.params_after == count_parameters(exported)
    assert report.macs_after <= report.macs_before
    assert report.max_abs_diff <= RTOL * report.logit_range


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=6)
@given(data=st.data(), seed=st.integers(0, 1000))
def test_export_equals_subnetwork_on_small_models(family, data, seed):
    model = make_model(family, width=4, seed=seed)
    x = make_inputs(n=2, size=8, seed=seed)
    structure = discover(model, (x,))
    importance, gates = data.draw(keep_masks(structure))
    sub = subnetwork_from_mappings(model, structure, importance, gates)
    exported = export_subnetwork(sub, example_inputs=x)
    assert_exact(exported, sub, make_inputs(n=5, size=12, seed=seed + 1))


# --------------------------------------------------------------------------- sizes
def _dependent_parameters(model: nn.Module, sub: SubNetwork, x: torch.Tensor) -> int:
    """Parameters of ``model`` that the SubNetwork's output depends on.

    Independent of the export: on a copy whose ReLUs are leaky (so no unit is cut by
    chance on the test inputs), a weight the SubNetwork's output depends on has a
    non-zero gradient for generic inputs and projections, while a removed filter, a
    channel no kept filter reads, or a layer inside a removed block has exactly zero
    gradient.
    """
    leaky = copy.deepcopy(model)
    for module in list(leaky.modules()):
        for child_name, child in module.named_children():
            if type(child) in (nn.ReLU, nn.ReLU6):
                setattr(module, child_name, nn.LeakyReLU(0.1))
    twin = SubNetwork(leaky, sub.structure, sub.scores, sub.gates_open)
    grads = {n: torch.zeros_like(p) for n, p in leaky.named_parameters()}
    for seed in range(2):
        leaky.zero_grad()
        out = twin(x)
        proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        (out * proj).sum().backward()
        for n, p in leaky.named_parameters():
            if p.grad is not None:
                grads[n] += p.grad.abs()
    return sum(int((g > 0).sum()) for g in grads.values())


COUNTED = [
    pytest.param("efficientnet_lite0", marks=pytest.mark.slow),
    "vgg",
    "vgg_bn",
    "resnet",
    "resnext",
    "mobilenet_v2",
    "efficientnet_se",
    "convnext",
    "regnet_y",
    "digits_vgg",
    "digits_resnet",
]


@pytest.mark.parametrize("name", COUNTED)
@settings(max_examples=1, phases=NO_SHRINK)
@given(data=st.data())
def test_parameter_count_equals_independent_count(name, data):
    model, structure, x = family_model(name)
    importance, gates = data.draw(keep_masks(structure))
    sub = subnetwork_from_mappings(model, structure, importance, gates)
    exported = export_subnetwork(sub, example_inputs=x)
    assert_exact(exported, sub, check_inputs(x))
    # large enough that every kernel tap of the deepest convolutions touches the image
    size = 128 if name in ("convnext", "efficientnet_lite0") else 64
    big = torch.randn(4, x.shape[1], size, size, generator=torch.Generator().manual_seed(5))
    assert count_parameters(exported, nonzero=True) == _dependent_parameters(model, sub, big)


def test_all_kept_exports_the_whole_model():
    model, structure, x = family_model("resnet")
    sub = subnetwork_from_mappings(
        model, structure, {u.name: torch.ones(u.size) for u in structure.units}
    )
    exported = export_subnetwork(sub, example_inputs=x)
    xs = check_inputs(x)
    with torch.no_grad():
        assert torch.allclose(exported(xs), model(xs), rtol=1e-5, atol=1e-6)
    assert exported.report.params_after == count_parameters(model)
    assert exported.report.macs_after == exported.report.macs_before


def test_everything_removed_gives_constant_logits():
    model, structure, x = family_model("vgg_bn")
    sub = subnetwork_from_mappings(
        model, structure, {u.name: torch.zeros(u.size) for u in structure.units}
    )
    exported = export_subnetwork(sub, example_inputs=x)
    a, b = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32) * 5
    with torch.no_grad():
        assert torch.allclose(exported(a), exported(b), atol=1e-6)
    assert_exact(exported, sub, a)
    assert exported.report.nonzero_params_after < count_parameters(model) / 10


def test_removed_blocks_are_identities_and_cost_nothing():
    model, structure, x = family_model("resnet")
    blocks = [g for g in structure.gates if g.kind == "block"]
    assert blocks
    sub = subnetwork_from_mappings(
        model,
        structure,
        {u.name: torch.ones(u.size) for u in structure.units},
        {g.name: False for g in blocks},
    )
    exported = export_subnetwork(sub, example_inputs=x)
    assert_exact(exported, sub, check_inputs(x))
    names = {n for n, _ in exported.named_modules()}
    for gate in blocks:
        assert not any(n == u or n.startswith(u + ".") for u in gate.units for n in names)
    removed = sum(p.numel() for g in blocks for p in model.get_submodule(g.name).parameters())
    assert exported.report.params_after == count_parameters(model) - removed


def test_kept_filter_scattered_into_a_residual_stream():
    """Writers of a stream keep different channels; the stream holds their union."""
    model, structure, x = family_model("resnet")
    importance = {u.name: torch.ones(u.size) for u in structure.units}
    importance["layer1.0.conv2"] = torch.zeros(64)
    importance["layer1.0.conv2"][:3] = 1.0
    importance["conv1"] = torch.zeros(64)
    importance["conv1"][10:12] = 0.5
    sub = subnetwork_from_mappings(model, structure, importance)
    exported = export_subnetwork(sub, example_inputs=x)
    assert_exact(exported, sub, check_inputs(x))
    # the stream after layer1.0 has 5 channels: layer2.0's convolutions read only those
    assert exported.get_submodule("layer2.0.conv1").in_channels == 5
    assert exported.get_submodule("layer2.0.downsample.0").in_channels == 5
    assert exported.get_submodule("layer1.0.conv2").out_channels == 3
    assert exported.report.adapters >= 1


def test_depthwise_filter_whose_input_was_removed_keeps_its_constant():
    model, structure, x = family_model("mobilenet_v2")
    expand = next(u for u in structure.units if u.name.endswith("conv.0.0") and not u.depthwise)
    block = expand.name.rsplit(".conv.", 1)[0]
    dw = structure.unit(f"{block}.conv.1.0")
    importance = {u.name: torch.ones(u.size) for u in structure.units}
    importance[expand.name] = torch.zeros(expand.size)  # every depthwise input removed
    sub = subnetwork_from_mappings(model, structure, importance)
    exported = export_subnetwork(sub, example_inputs=x)
    assert_exact(exported, sub, check_inputs(x))
    assert dw.depthwise


def test_single_filter_chain_through_a_plain_network():
    model, structure, x = family_model("vgg_bn")
    importance = {u.name: torch.zeros(u.size) for u in structure.units}
    for u in structure.units:
        importance[u.name][u.size // 2] = 0.7
    sub = subnetwork_from_mappings(model, structure, importance)
    exported = export_subnetwork(sub, example_inputs=x)
    assert_exact(exported, sub, check_inputs(x))
    convs = [m for m in exported.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [1] * len(structure.units)
    assert [c.in_channels for c in convs] == [3] + [1] * (len(structure.units) - 1)


def test_macs_are_counted_like_a_hand_computation():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 2)
    )
    x = torch.randn(1, 3, 8, 8)
    assert count_macs(model, (x,)) == 4 * 64 * 3 * 9 + 2 * 4 * 64


# --------------------------------------------------------------------------- runtimes
def _runtime_roundtrip(exported: nn.Module, xs: torch.Tensor) -> None:
    with torch.no_grad():
        expected = exported(xs)
        scripted = torch.jit.script(exported)
        assert torch.allclose(scripted(xs), expected, atol=1e-6)
        program = torch.export.export(exported, (xs,))
        assert torch.allclose(program.module()(xs), expected, atol=1e-6)
    buffer = io.BytesIO()
    torch.save(exported, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.allclose(loaded(xs), expected, atol=1e-6)
    onnx_file = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pytest.importorskip("onnx")  # the onnx extra
        torch.onnx.export(exported, (xs,), onnx_file, dynamo=False)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(onnx_file.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: xs.numpy()})
    assert torch.allclose(torch.from_numpy(got), expected, atol=1e-4)


def test_export_runs_under_torchscript_torch_export_and_onnx():
    model = make_model("depthwise", width=4, seed=1)
    x = make_inputs(n=2, size=8, seed=1)
    structure = discover(model, (x,))
    importance = {u.name: (torch.arange(u.size) % 3 == 0).float() for u in structure.units}
    importance[structure.units[1].name].zero_()
    sub = subnetwork_from_mappings(model, structure, importance)
    _runtime_roundtrip(export_subnetwork(sub, example_inputs=x), make_inputs(n=3, size=10))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnext", "convnext", "mobilenet_v3", "efficientnet_lite0"])
def test_family_exports_run_under_torchscript_torch_export_and_onnx(name):
    model, structure, x = family_model(name)
    gen = torch.Generator().manual_seed(0)
    importance = {
        u.name: (torch.rand(u.size, generator=gen) < 0.5).float() for u in structure.units
    }
    importance[structure.units[1].name].zero_()
    sub = subnetwork_from_mappings(model, structure, importance)
    _runtime_roundtrip(export_subnetwork(sub, example_inputs=x), check_inputs(x))


# --------------------------------------------------------------------------- bad input
def _sub(name="resnet"):
    model, structure, x = family_model(name)
    gen = torch.Generator().manual_seed(0)
    importance = {
        u.name: (torch.rand(u.size, generator=gen) < 0.5).float() for u in structure.units
    }
    return subnetwork_from_mappings(model, structure, importance), x


def test_not_a_subnetwork_is_a_type_error():
    model, _, _ = family_model("resnet")
    with pytest.raises(TypeError, match="SubNetwork"):
        export_subnetwork(model)


def test_other_model_is_rejected_naming_the_layer():
    sub, x = _sub("resnet")
    other = resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], num_classes=5).eval()
    snapshot = ModelSnapshot.take(other)
    with pytest.raises(ExportError, match=r"layer2\.0\.downsample\.0.*512 filters"):
        export_subnetwork(sub, model=other, example_inputs=x)
    snapshot.assert_unchanged(other)


def test_changed_architecture_is_rejected_naming_the_layer():
    model, structure, x = family_model("vgg_bn")
    changed = _tiny_vgg(True).eval()
    changed.features[4] = nn.Conv2d(8, 12, 3, padding=1)  # was 8 -> 16
    gen = torch.Generator().manual_seed(0)
    importance = {
        u.name: (torch.rand(u.size, generator=gen) < 0.5).float() for u in structure.units
    }
    sub = subnetwork_from_mappings(model, structure, importance)
    with pytest.raises(ExportError, match=r"features\.4.*12 filters"):
        export_subnetwork(sub, model=changed, example_inputs=x)


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = _Branchy()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.gate(self.conv(x)).mean((2, 3)))


class _Branchy(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_untraceable_module_is_named_and_model_unchanged():
    model = _DataDependent().eval()
    x = torch.randn(2, 3, 8, 8)
    structure = discover(model, (x,))
    sub = subnetwork_from_mappings(model, structure, {"conv": torch.tensor([1.0, 0, 1, 0])})
    snapshot = ModelSnapshot.take(model)
    with pytest.raises(ExportError, match=r"'gate' \(_Branchy\)"):
        export_subnetwork(sub, example_inputs=x)
    snapshot.assert_unchanged(model)


class _Cumsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.cumsum(torch.relu(self.conv1(x)), dim=1)  # mixes channels
        return self.fc(self.conv2(y).mean((2, 3)))


def test_unknown_channel_op_is_kept_whole_or_rejected_in_strict_mode():
    model = _Cumsum().eval()
    x = torch.randn(2, 3, 8, 8)
    structure = discover(model, (x,))
    importance = {
        "conv1": torch.tensor([1.0, 0, 0, 1, 0, 0]),
        "conv2": torch.tensor([0.5, 0, 1, 1]),
    }
    sub = subnetwork_from_mappings(model, structure, importance)
    exported = export_subnetwork(sub, example_inputs=x)
    assert_exact(exported, sub, torch.randn(3, 3, 10, 10))
    assert any("cumsum" in s for s in exported.report.full_width)
    with pytest.raises(ExportError, match="cumsum"):
        export_subnetwork(sub, example_inputs=x, strict=True)


def test_export_of_an_extracted_chain():
    from captum_chains import ChainExtractor

    model = make_model("residual", width=4, seed=3)
    x = make_inputs(n=4, size=8, seed=3)
    chain = ChainExtractor(model, steps=15, finetune_steps=3, gate_penalty=0.05).attribute(
        x, progress=False, seed=0
    )
    exported = chain.subnetwork.export(check_inputs=x)
    assert_exact(exported, chain.subnetwork, x)
    assert exported.report.units_kept == chain.num_filters


def test_extensions_are_imported_and_a_missing_one_is_an_error(monkeypatch):
    from captum_chains.export import api

    monkeypatch.setattr(api, "EXTENSIONS", ["json"])
    monkeypatch.delitem(sys.modules, "json", raising=False)
    api.load_extensions()
    assert "json" in sys.modules
    monkeypatch.setattr(api, "EXTENSIONS", ["captum_chains_no_such_extension"])
    with pytest.raises(ModuleNotFoundError, match="captum_chains_no_such_extension"):
        api.load_extensions()
