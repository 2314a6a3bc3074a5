"""Compact steps (``ChainConfig.compact_below``): the model restricted to the live filters."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from conftest import make_inputs, make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from test_vit import ViTSpec, make_timm_vit
from torch import nn

from captum_chains import ChainConfig, ChainExtractor
from captum_chains._utils.model_state import ModelSnapshot
from captum_chains.export.compact import compact_program
from captum_chains.export.step_modules import SamePaddedConv, ScaledBatchNorm
from captum_chains.masking import MaskState, apply_masks
from captum_chains.units import discover

FAMILIES = ["plain", "plain_nobn", "residual", "depthwise", "vit"]


def _model(family: str, seed: int) -> tuple[nn.Module, torch.Tensor]:
    if family == "vit":
        return make_timm_vit(ViTSpec(seed=seed)), make_inputs(n=3, size=8, seed=seed)
    return make_model(family, width=6, seed=seed, depth=2), make_inputs(n=3, size=8, seed=seed)


def _masked_logits(model, structure, scores, gates_open, x):
    """The masked model (the optimization's hooks) with ``scores`` and hard gates."""
    state = MaskState(
        scores={n: scores[a:b] for n, (a, b) in structure.offsets().items()},
        gates={
            g.name: torch.tensor(0.0) for g, o in zip(structure.gates, gates_open.tolist()) if not o
        },
    )
    with apply_masks(model, structure, state):
        return model(x)


@settings(max_examples=16, deadline=None)
@given(
    st.sampled_from(FAMILIES),
    st.integers(0, 50),
    st.floats(0.05, 1.0),
    st.booleans(),
    st.booleans(),
)
def test_the_compact_program_computes_the_masked_model_and_its_gradients(
    family, seed, keep, close_gates, channels_last
):
    """Outputs and score gradients equal the masked model's, for any support, any
    non-negative scores on it and any closed gates, with inputs in either memory layout
    (steps run channels-last); zero gradient outside the support."""
    model, x = _model(family, seed)
    structure = discover(model, (x[:1],))
    g = torch.Generator().manual_seed(seed)
    units = structure.total_units
    support = torch.rand(units, generator=g) < keep
    scores = torch.rand(units, generator=g) * support
    gates_open = torch.ones(len(structure.gates), dtype=torch.bool)
    if close_gates and len(gates_open):
        gates_open[torch.randint(len(gates_open), (1,), generator=g)] = False
    program = compact_program(model, structure, support, gates_open, (x[:2],))
    assert program.filters == int(support.sum())

    s_full = scores.clone().requires_grad_(True)
    want = _masked_logits(model, structure, s_full, gates_open, x)
    s_compact = scores.clone().requires_grad_(True)
    got = program(
        s_compact, x.contiguous(memory_format=torch.channels_last) if channels_last else x
    )
    scale = float(want.detach().abs().max()) + 1e-6
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)

    weights = torch.randn(want.shape, generator=g)
    (grad_full,) = torch.autograd.grad((want * weights).sum(), s_full)
    (grad_compact,) = torch.autograd.grad((got * weights).sum(), s_compact, allow_unused=True)
    grad_compact = torch.zeros_like(scores) if grad_compact is None else grad_compact
    inside_closed = torch.zeros(units, dtype=torch.bool)
    offsets = structure.offsets()
    for gate, is_open in zip(structure.gates, gates_open.tolist()):
        if not is_open:
            for name in gate.units:
                a, b = offsets[name]
                inside_closed[a:b] = True
    compared = support & ~inside_closed
    gscale = float(grad_full.abs().max()) + 1e-6
    torch.testing.assert_close(
        grad_compact[compared], grad_full[compared], rtol=1e-3, atol=1e-4 * gscale
    )
    assert torch.all(grad_compact[~support] == 0)


@pytest.mark.parametrize("family", ["plain", "depthwise"])
def test_compact_steps_follow_the_full_steps_while_the_support_is_whole(family):
    """Without gates and before any score reaches zero, a run that compacts at once
    (``compact_below=1``) makes the same steps as one on the whole model."""
    model = make_model(family, width=4, seed=3)
    x = make_inputs(n=4, size=8, seed=3)
    settings_ = {"steps": 12, "use_gates": False, "finetune_steps": 3, "finetune_kl": 0.0}
    full = ChainExtractor(model, ChainConfig(**settings_, compact_below=None)).attribute(
        x, progress=False
    )
    compact = ChainExtractor(model, ChainConfig(**settings_, compact_below=1.0)).attribute(
        x, progress=False
    )
    for name, values in full.importance.items():
        torch.testing.assert_close(compact.importance[name], values, rtol=1e-5, atol=1e-6)
    assert [r["computed"] for r in compact.history] == [full.total_filters] * len(compact.history)
    torch.testing.assert_close(
        torch.tensor([r["kl"] for r in compact.history]),
        torch.tensor([r["kl"] for r in full.history]),
        rtol=1e-4,
        atol=1e-7,
    )


def test_a_run_compacts_once_scores_reach_zero_and_leaves_the_model_unchanged():
    """Steps run on fewer filters once most scores are zero; removed filters stay removed;
    the chain's reported KL is its thresholded network's; the model is untouched."""
    model = make_model("depthwise", width=8, seed=1, depth=3)
    x = make_inputs(n=4, size=8, seed=1)
    snapshot = ModelSnapshot.take(model)
    config = ChainConfig(
        steps=225, l1=0.02, compact_below=0.5, finetune_kl=0.0, early_stop_delta=0.0
    )
    chain = ChainExtractor(model, config).attribute(x, progress=False)
    snapshot.assert_unchanged(model)
    computed = [r["computed"] for r in chain.history if r["phase"] == "optimize"]
    total = chain.total_filters
    assert computed[0] == total
    assert min(computed) <= total // 2
    assert all(b <= a for a, b in itertools.pairwise(computed))  # the support only shrinks
    tuned = [r["computed"] for r in chain.history if r["phase"] == "finetune"]
    assert tuned == [chain.num_filters] * len(tuned)  # fine-tuning computes the kept filters
    with torch.no_grad():
        p = torch.log_softmax(model(x), 1)
        q = torch.log_softmax(chain.subnetwork(x), 1)
    kl = float((p.exp() * (p - q)).sum(1).mean())
    assert kl == pytest.approx(chain.kl, rel=1e-3, abs=1e-6)


class ReadsAValue(nn.Module):
    """A CNN that reads a computed value in Python: the export (and so compaction)
    refuses it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        if float(y.mean()) > -1e9:  # always true, but a value read in Python
            y = y * 1.0
        return self.head(y.mean((2, 3)))


def test_a_model_the_export_cannot_handle_runs_full_steps_with_a_warning():
    torch.manual_seed(0)
    model = ReadsAValue().eval()
    x = make_inputs(n=4, size=8, seed=0)
    settings_ = {"steps": 60, "l1": 0.05, "finetune_steps": 2}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = ChainExtractor(model, ChainConfig(**settings_, compact_below=None)).attribute(
            x, progress=False
        )
    assert not [w for w in caught if "compact" in str(w.message)]
    with pytest.warns(UserWarning, match="compact steps are not available"):
        fallback = ChainExtractor(model, ChainConfig(**settings_, compact_below=1.0)).attribute(
            x, progress=False
        )
    for name, values in full.importance.items():
        assert torch.equal(fallback.importance[name], values)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_compact_below_must_be_a_fraction(bad):
    with pytest.raises(ValueError, match=r"compact_below|finite"):
        ChainConfig(compact_below=bad)


def test_the_paper_preset_runs_every_step_on_the_whole_model():
    assert ChainConfig.paper().compact_below is None
    assert ChainConfig().compact_below == 0.8


@pytest.mark.parametrize(
    "name",
    [
        "torchvision:resnet18",
        "torchvision:mobilenet_v3_small",
        "timm:efficientnet_b0",
        "timm:tf_efficientnet_lite0",
        "timm:vit",
    ],
)
def test_compact_programs_of_library_models_compute_the_masked_model(name):
    """Real architectures (random weights): residual, inverted residual with SE blocks, ViT."""
    import timm
    import torchvision

    torch.manual_seed(0)
    source, arch = name.split(":")
    if arch == "vit":
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8)
    elif source == "timm":
        model = timm.create_model(arch)
    else:
        model = getattr(torchvision.models, arch)()
    model.eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    structure = discover(model, (x[:1],))
    g = torch.Generator().manual_seed(0)
    support = torch.rand(structure.total_units, generator=g) < 0.8
    scores = (0.5 + torch.rand(structure.total_units, generator=g)) * support
    gates_open = torch.ones(len(structure.gates), dtype=torch.bool)
    gates_open[: len(gates_open) // 3] = False
    program = compact_program(model, structure, support, gates_open, (x[:2],))
    with torch.no_grad():
        want = _masked_logits(model, structure, scores, gates_open, x)
        got = program(scores, x)
        got_channels_last = program(scores, x.contiguous(memory_format=torch.channels_last))
    assert float(want.std()) > 0  # the check is not between two constants
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(got_channels_last, want, rtol=1e-4, atol=1e-5 * scale)
    # the CNNs' score sites after BatchNorms run folded into them
    folded = any(isinstance(m, ScaledBatchNorm) for m in program.modules())
    assert folded == (arch != "vit")
    # TensorFlow-"same" strided convolutions run without their padded copy
    same = any(isinstance(m, SamePaddedConv) for m in program.modules())
    assert same == arch.startswith("tf_")
