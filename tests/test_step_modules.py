"""The compact program's faster modules compute what the export's modules compute."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from captum_chains.export.compact import compact_program
from captum_chains.export.runtime import ChannelAdapter, ChannelScale
from captum_chains.export.step_modules import (
    MATMUL_CHANNELS,
    ChannelsLastGather,
    SamePaddedConv,
    ScaledBatchNorm,
    speed_up,
    split_prefix,
)
from captum_chains.masking import MaskState, apply_masks
from captum_chains.units import discover


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 40),
    st.integers(0, 3),
    st.sampled_from([0.0, 1.0, -2.5]),
    st.booleans(),
    st.integers(0, 10_000),
)
def test_the_gather_equals_the_adapter_and_keeps_the_layout(
    channels, out, pad, fill, channels_last, seed
):
    """Values and input gradients equal the adapter's exactly, for any index (with fill
    entries); a channels-last input gives a channels-last output."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(channels + pad, (out,), generator=g)
    adapter = ChannelAdapter(1, index, pad=pad, fill=fill)
    gather = ChannelsLastGather(adapter)
    x = torch.randn(2, channels, 5, 4, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weights = torch.randn(2, out, 5, 4, generator=g)
    xa, xg = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want, got = adapter(xa), gather(xg)
    assert torch.equal(got, want)
    if channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last)
    (grad_want,) = torch.autograd.grad((want * weights).sum(), xa)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), xg)
    # the input gradient sums every output that reads a channel (up to 40 here): the matrix
    # product and index_add add them in different orders, so float32 rounding differs
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-5, atol=1e-5)


def test_the_gather_falls_back_to_the_adapter_above_its_channel_limit():
    index = torch.arange(MATMUL_CHANNELS + 1).flip(0)
    gather = ChannelsLastGather(ChannelAdapter(1, index))
    x = torch.randn(1, MATMUL_CHANNELS + 1, 2, 2).contiguous(memory_format=torch.channels_last)
    assert torch.equal(gather(x), x.flip(1))
    assert not gather._matrix  # no 0/1 matrix was built


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.booleans(), st.integers(0, 10_000))
def test_the_scaled_norm_equals_the_norm_then_the_scores(channels, affine, seed):
    """``ScaledBatchNorm`` with scores ``s`` equals ``ChannelScale(s)(BatchNorm(x))``, and
    gives the scores the same gradient."""
    g = torch.Generator().manual_seed(seed)
    norm = nn.BatchNorm2d(channels, affine=affine).eval()
    norm.running_mean.copy_(torch.randn(channels, generator=g))
    norm.running_var.copy_(torch.rand(channels, generator=g) + 0.1)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(torch.randn(channels, generator=g))
            norm.bias.copy_(torch.randn(channels, generator=g))
    x = torch.randn(3, channels, 4, 4, generator=g)
    scores = torch.rand(channels, generator=g) * (torch.rand(channels, generator=g) < 0.7)
    s_want, s_got = scores.clone().requires_grad_(True), scores.clone().requires_grad_(True)
    want = norm(x) * s_want.view(1, -1, 1, 1)
    scaled = ScaledBatchNorm(norm)
    scaled.scale = s_got
    got = scaled(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.all(got[:, scores == 0] == 0)  # removed channels are exact zeros
    weights = torch.randn(x.shape, generator=g)
    (grad_want,) = torch.autograd.grad((want * weights).sum(), s_want)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), s_got)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-4, atol=1e-5)


class _LeafScale(fx.Tracer):
    """Traces ``ChannelScale`` as one module call, as the compact program holds it."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ChannelScale) or super().is_leaf_module(m, qualname)


class _NormThenScore(nn.Module):
    def __init__(self, shared: bool = False, training: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4).train(training)
        self.drop = nn.Identity()
        self.site = ChannelScale(torch.rand(4), 1, 4)
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.site(self.drop(self.bn(self.conv(x))))
        return y + self.bn(y) if self.shared else y


@pytest.mark.parametrize(
    ("shared", "training", "folds"),
    [(False, False, True), (True, False, False), (False, True, False)],
)
def test_speed_up_folds_a_score_site_into_its_norm_only_when_that_is_exact(shared, training, folds):
    """A site after an eval-mode BatchNorm (through identities) folds into it; a norm called
    twice or in training mode is left alone. The program's outputs are unchanged."""
    module = _NormThenScore(shared, training)
    gm = fx.GraphModule(module, _LeafScale().trace(module))
    x = torch.randn(2, 3, 6, 6)
    want = gm(x)
    folded = speed_up(gm, ["site"])
    assert ("site" in folded) == folds
    if folds:
        folded["site"].scale = module.site.scale
        assert not any(isinstance(m, ChannelScale) for m in gm.modules())
    torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-6)


def test_a_compact_program_reuses_its_score_free_values_only_for_the_same_unmodified_inputs():
    """The score-free prefix (the first convolution) runs once for a run's inputs; an
    in-place change or another tensor recomputes it; inputs that need gradients bypass it.
    Every output equals the masked model's."""
    model = make_model("plain", width=4, seed=2, depth=2)
    x = make_inputs(n=3, size=8, seed=2)
    structure = discover(model, (x[:1],))
    support = torch.ones(structure.total_units, dtype=torch.bool)
    gates_open = torch.ones(len(structure.gates), dtype=torch.bool)
    program = compact_program(model, structure, support, gates_open, (x[:2],))
    assert program.prefix is not None
    calls = []
    program.prefix.register_forward_hook(lambda *_: calls.append(1))
    scores = torch.rand(structure.total_units, generator=torch.Generator().manual_seed(0))

    def check(inputs: torch.Tensor, prefix_calls: int) -> None:
        state = MaskState(scores={n: scores[a:b] for n, (a, b) in structure.offsets().items()})
        with apply_masks(model, structure, state):
            want = model(inputs)
        torch.testing.assert_close(program(scores, inputs), want, rtol=1e-5, atol=1e-6)
        assert len(calls) == prefix_calls

    check(x, 1)
    check(x, 1)  # same tensor, unchanged: reused
    x.mul_(-2.0)
    check(x, 2)  # changed in place
    check(x.clone(), 3)  # another tensor
    check(x.clone().requires_grad_(True), 3)  # needs gradients: the whole program runs


def test_split_prefix_computes_the_program():
    """``rest(*inputs, *prefix(*inputs))`` equals the program on a graph with score sites."""
    module = _NormThenScore()
    gm = fx.GraphModule(module, _LeafScale().trace(module))
    x = torch.randn(2, 3, 6, 6)
    prefix, rest, count = split_prefix(gm)
    values = prefix(x)
    assert count == len(values) == 1  # everything before the score site
    torch.testing.assert_close(rest(x, *values), gm(x))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 5),
    st.sampled_from([(1, 1), (2, 2), (2, 1), (3, 3)]),
    st.integers(5, 14),
    st.integers(5, 14),
    st.sampled_from([1, "depthwise"]),
    st.booleans(),
    st.integers(0, 10_000),
)
def test_the_same_padded_convolution_equals_timms(kernel, stride, height, width, groups, cl, seed):
    """Outputs and input gradients equal timm's ``Conv2dSame`` (padded copy) for any kernel,
    stride and input size, in either layout."""
    from timm.layers import Conv2dSame

    g = torch.Generator().manual_seed(seed)
    channels = 4
    groups = channels if groups == "depthwise" else 1
    torch.manual_seed(seed)
    conv = Conv2dSame(channels, channels, kernel, stride=stride, groups=groups, bias=seed % 2 == 0)
    fast = SamePaddedConv(conv)
    x = torch.randn(2, channels, height, width, generator=g)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want, got = conv(xa), fast(xb)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    weights = torch.randn(want.shape, generator=g)
    (grad_want,) = torch.autograd.grad((want * weights).sum(), xa)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), xb)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-5, atol=1e-5)
