"""Critical pathways and the pathway gradient against independent computations.

The reference values come from closed-form gradients of a two-hidden-layer ReLU
network written out in numpy (float64), from explicit re-implementations of models
that reuse a ReLU module, and from Captum's Saliency.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import Saliency
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from captum_chains._utils.model_state import ModelSnapshot
from captum_chains.pathways import (
    CriticalPathways,
    PathwayGradient,
    discover_neurons,
    kept_count,
    max_magnitude_channel,
    select_top_neurons,
)

# --------------------------------------------------------------------------- models


class TinyMLP(nn.Module):
    """x -> Linear -> nn.ReLU -> Linear -> F.relu -> Linear (one module, one functional ReLU)."""

    def __init__(self, d_in: int = 5, h1: int = 6, h2: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, h1)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a1 = self.act1(self.fc1(x))
        a2 = F.relu(self.fc2(a1))
        return self.fc3(a2)


def tiny_mlp(seed: int) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP().double().eval()


def np_weights(model: TinyMLP) -> list[np.ndarray]:
    return [p.detach().numpy().copy() for p in model.parameters()]


def hand_forward(model: TinyMLP, x: np.ndarray, m1=None, m2=None):
    w1, b1, w2, b2, w3, b3 = np_weights(model)
    z1 = x @ w1.T + b1
    a1 = np.maximum(z1, 0) * (1 if m1 is None else m1)
    z2 = a1 @ w2.T + b2
    a2 = np.maximum(z2, 0) * (1 if m2 is None else m2)
    return z1, a1, z2, a2, a2 @ w3.T + b3


def hand_taylor(model: TinyMLP, x: np.ndarray, c: np.ndarray):
    """|a * dy_c/da| for both layers, closed form."""
    _, _, w2, _, w3, _ = np_weights(model)
    _, a1, z2, a2, _ = hand_forward(model, x)
    g2 = w3[c]
    g1 = (g2 * (z2 > 0)) @ w2
    return np.abs(a1 * g1), np.abs(a2 * g2)


def hand_integrated(model: TinyMLP, x: np.ndarray, c: np.ndarray, steps: int):
    """Layer-wise IG with alpha_j = j / steps, j = 0..steps, uniform average."""
    _, _, w2, b2, w3, _ = np_weights(model)
    _, a1, _, a2, _ = hand_forward(model, x)
    g2 = w3[c]  # y is linear in a2: the gradient does not depend on alpha
    g1 = np.zeros_like(a1)
    for j in range(steps + 1):
        z2 = (j / steps) * a1 @ w2.T + b2
        g1 += (g2 * (z2 > 0)) @ w2
    g1 /= steps + 1
    return np.abs(a1 * g1), np.abs(a2 * g2)


def hand_masks(c1: np.ndarray, c2: np.ndarray, percentile: float):
    """Top-k over the concatenation, ties by position (numpy lexsort, independent)."""
    masks1, masks2 = np.zeros(c1.shape, bool), np.zeros(c2.shape, bool)
    for b in range(c1.shape[0]):
        flat = np.concatenate([c1[b], c2[b]])
        n = flat.size
        k = math.ceil((100 - Fraction(repr(float(percentile)))) * n / 100)
        order = np.lexsort((np.arange(n), -flat))  # by -value, then index
        keep = np.zeros(n, bool)
        keep[order[:k]] = True
        masks1[b], masks2[b] = keep[: c1.shape[1]], keep[c1.shape[1] :]
    return masks1, masks2


def hand_pathway_gradient(model: TinyMLP, x: np.ndarray, c: np.ndarray, m1, m2):
    w1, _, w2, _, w3, _ = np_weights(model)
    z1, _, z2, _, _ = hand_forward(model, x, m1, m2)
    d2 = w3[c] * m2 * (z2 > 0)
    d1 = (d2 @ w2) * m1 * (z1 > 0)
    return d1 @ w1


class SharedReluCNN(nn.Module):
    """A Bottleneck-like block that calls one ReLU module three times, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.short = nn.Conv2d(2, 4, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.conv3(out)
        out += self.short(x)
        out = self.relu(out)
        return self.fc(out.flatten(1))


class SeparateReluCNN(SharedReluCNN):
    """The same network with three distinct ReLU modules (the independent reference)."""

    def __init__(self) -> None:
        super().__init__()
        self.r1, self.r2, self.r3 = nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.r1(self.bn1(self.conv1(x)))
        out = self.r2(self.bn2(self.conv2(out)))
        out = self.conv3(out) + self.short(x)
        return self.fc(self.r3(out).flatten(1))


def shared_and_separate(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    shared = SharedReluCNN()
    for bn in (shared.bn1, shared.bn2):
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 1.5)
    separate = SeparateReluCNN()
    separate.load_state_dict(shared.state_dict(), strict=False)
    return shared.double().eval(), separate.double().eval()


class LoopCNN(nn.Module):
    """One conv and one ReLU applied twice by a loop on the same line."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(3 * 5 * 5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            x = self.relu(self.conv(x))
        return self.fc(x.flatten(1))


class UnrolledLoopCNN(LoopCNN):
    def __init__(self) -> None:
        super().__init__()
        self.relu_b = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv(x))
        x = self.relu_b(self.conv(x))
        return self.fc(x.flatten(1))


class TwoInputNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(3, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, z: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.head(torch.relu(self.a(x) + self.b(z)) * scale)


# --------------------------------------------------------------------------- hand-computed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    percentile=st.floats(0, 99.5, allow_nan=False),
    batch=st.integers(1, 3),
    method=st.sampled_from(["taylor", "integrated"]),
)
def test_tiny_relu_net_matches_closed_form(seed, percentile, batch, method):
    model = tiny_mlp(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 5, generator=gen, dtype=torch.float64)
    c = torch.randint(0, 3, (batch,), generator=gen)
    xn, cn = x.numpy(), c.numpy()
    steps = 7
    res = CriticalPathways(model).attribute(
        x, target=c, percentile=percentile, method=method, steps=steps
    )
    assert res.names == ["act1", "<model>:relu"]
    if method == "taylor":
        c1, c2 = hand_taylor(model, xn, cn)
    else:
        c1, c2 = hand_integrated(model, xn, cn, steps)
    np.testing.assert_allclose(res.contributions["act1"].numpy(), c1, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        res.contributions["<model>:relu"].numpy(), c2, rtol=1e-10, atol=1e-12
    )
    m1, m2 = hand_masks(c1, c2, percentile)
    np.testing.assert_array_equal(res.masks["act1"].numpy(), m1)
    np.testing.assert_array_equal(res.masks["<model>:relu"].numpy(), m2)
    # masked forward: masks multiplied in, later activations recomputed
    masked = CriticalPathways(model).masked_forward(x, res)
    np.testing.assert_allclose(masked.numpy(), hand_forward(model, xn, m1, m2)[-1], rtol=1e-10)
    # pathway gradient through the masked network
    pg = PathwayGradient(model).attribute(x, target=c, pathways=res)
    expected = hand_pathway_gradient(model, xn, cn, m1, m2)
    np.testing.assert_allclose(pg.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_integrated_alpha_grid_is_linear_and_complete():
    """Signed layer IG over a fine linear grid sums to y(a) - y(layer zeroed)."""
    model = tiny_mlp(3)
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    from captum_chains.pathways.contribution import integrated_contributions
    from captum_chains.pathways.neurons import traced

    with traced(model) as tracer:
        signed, out = integrated_contributions(tracer, (x,), 1, steps=2000)
    w = np_weights(model)
    a1 = np.maximum(x.numpy() @ w[0].T + w[1], 0)
    zeroed = np.maximum(w[3], 0) @ w[4][1] + w[5][1]  # layer 1 scaled by alpha = 0
    total = signed["act1"].numpy().sum(1)
    full = out[:, 1].numpy()
    np.testing.assert_allclose(total, full - zeroed, atol=5e-3 * np.abs(full - zeroed).max())
    assert a1.shape == signed["act1"].shape


# --------------------------------------------------------------------------- selection


def test_kept_count_is_exact():
    assert kept_count(10, 70) == 3
    assert kept_count(10, 70.0) == 3
    assert kept_count(10, 0) == 10
    assert kept_count(10, 99.99) == 1
    assert kept_count(7, 85) == 2  # ceil(1.05)
    assert kept_count(1000, 85) == 150


def test_ties_at_zero_keep_the_requested_count_first_in_forward_order():
    contributions = {
        "a": torch.tensor([[0.0, 3.0, 0.0, 0.0]]),
        "b": torch.tensor([[5.0, 0.0, 0.0, 1.0]]),
    }
    masks = select_top_neurons(contributions, 50)  # N = 8, keep 4: three non-zeros + one zero
    assert masks["a"].tolist() == [[True, True, False, False]]
    assert masks["b"].tolist() == [[True, False, False, True]]
    # the order argument decides which tied zero goes first
    masks = select_top_neurons(contributions, 50, order=["b", "a"])
    assert masks["a"].tolist() == [[False, True, False, False]]
    assert masks["b"].tolist() == [[True, True, False, True]]
    # a percentile test would have kept only the three non-zeros
    flat = torch.cat([contributions["a"], contributions["b"]], 1)
    assert int((flat > torch.quantile(flat, 0.5)).sum()) == 3


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.integers(0, 4), min_size=1, max_size=40),
    p_low=st.floats(0, 99.9),
    p_high=st.floats(0, 99.9),
)
def test_selection_properties(values, p_low, p_high):
    p_low, p_high = sorted((p_low, p_high))
    t = torch.tensor(values, dtype=torch.float32)[None]
    split = len(values) // 2
    contributions = {"x": t[:, :split], "y": t[:, split:]}
    low = torch.cat(list(select_top_neurons(contributions, p_low).values()), 1)
    high = torch.cat(list(select_top_neurons(contributions, p_high).values()), 1)
    assert int(low.sum()) == kept_count(len(values), p_low)
    assert int(high.sum()) == kept_count(len(values), p_high)
    assert not (high & ~low).any()  # nested
    if (~low).any():
        assert t[low].min() >= t[~low].max()
    all_kept = torch.cat(list(select_top_neurons(contributions, 0).values()), 1)
    assert all_kept.all()


def test_selection_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        select_top_neurons({"a": torch.tensor([[1.0, float("nan")]])}, 50)


# --------------------------------------------------------------------------- reused modules


def test_reused_relu_module_gives_one_site_per_call_line():
    shared, separate = shared_and_separate()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    sites = discover_neurons(shared, x)
    assert [s.name for s in sites] == ["relu#0", "relu#1", "relu#2"]
    assert len({s.location for s in sites}) == 3
    assert [p.module for p in sites[0].producers] == ["conv1"]
    assert [p.module for p in sites[2].producers] == ["conv3", "short"]
    for method in ("taylor", "integrated"):
        a = CriticalPathways(shared).attribute(x, target=[0, 1, 2], percentile=60, method=method)
        b = CriticalPathways(separate).attribute(x, target=[0, 1, 2], percentile=60, method=method)
        for name_a, name_b in zip(a.names, b.names, strict=True):
            torch.testing.assert_close(a.contributions[name_a], b.contributions[name_b])
            assert torch.equal(a.masks[name_a], b.masks[name_b])
        ga = PathwayGradient(shared).attribute(x, target=[0, 1, 2], pathways=a)
        gb = PathwayGradient(separate).attribute(x, target=[0, 1, 2], pathways=b)
        torch.testing.assert_close(ga, gb)


def test_loop_on_one_line_is_told_apart_by_occurrence():
    torch.manual_seed(0)
    loop = LoopCNN().double().eval()
    unrolled = UnrolledLoopCNN().double().eval()
    unrolled.load_state_dict(loop.state_dict(), strict=False)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    a = CriticalPathways(loop).attribute(x, target=1, percentile=50)
    b = CriticalPathways(unrolled).attribute(x, target=1, percentile=50)
    assert a.names == ["relu#0", "relu#1"]
    assert b.names == ["relu", "relu_b"]
    for name_a, name_b in zip(a.names, b.names, strict=True):
        torch.testing.assert_close(a.contributions[name_a], b.contributions[name_b])
    torch.testing.assert_close(
        PathwayGradient(loop).attribute(x, target=1, pathways=a),
        PathwayGradient(unrolled).attribute(x, target=1, pathways=b),
    )


# --------------------------------------------------------------------------- batching


@pytest.mark.parametrize("method", ["taylor", "integrated"])
def test_batched_equals_per_sample(method):
    shared, _ = shared_and_separate(1)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 2, 1, 0])
    cp, pg = CriticalPathways(shared), PathwayGradient(shared)
    kwargs = {"percentile": 70, "method": method, "steps": 4}
    batched = cp.attribute(x, target=target, internal_batch_size=3, **kwargs)
    grads = pg.attribute(x, target=target, **kwargs)
    for i in range(4):
        single = cp.attribute(x[i : i + 1], target=int(target[i]), **kwargs)
        for name in batched.names:
            torch.testing.assert_close(
                batched.contributions[name][i : i + 1], single.contributions[name]
            )
            assert torch.equal(batched.masks[name][i : i + 1], single.masks[name])
        torch.testing.assert_close(
            grads[i : i + 1], pg.attribute(x[i : i + 1], target=int(target[i]), **kwargs)
        )


def test_captum_target_formats_agree():
    model = tiny_mlp(5)
    x = torch.randn(3, 5, dtype=torch.float64)
    pg = PathwayGradient(model)
    reference = pg.attribute(x, target=0, percentile=40)
    for target in ([0, 0, 0], torch.tensor([0, 0, 0]), torch.tensor(0), (0,), [(0,), (0,), (0,)]):
        torch.testing.assert_close(pg.attribute(x, target=target, percentile=40), reference)
    assert not torch.equal(pg.attribute(x, target=1, percentile=40), reference)


# --------------------------------------------------------------------------- Captum equivalence


def _digits_like_vgg() -> nn.Module:
    from captum_chains.zoo import build_digits_model

    torch.manual_seed(0)
    return build_digits_model("vgg").eval()


@pytest.mark.parametrize("build", ["shared", "vgg", "vit"])
def test_percentile_zero_equals_saliency_without_abs(build):
    if build == "shared":
        model = shared_and_separate()[0].float()
        x = torch.randn(3, 2, 6, 6)
    elif build == "vgg":
        model, x = _digits_like_vgg(), torch.randn(3, 1, 32, 32)
    else:
        from captum_chains.zoo import build_digits_model

        torch.manual_seed(0)
        model, x = build_digits_model("vit").eval(), torch.randn(2, 1, 32, 32)
    target = list(range(x.shape[0]))
    pg = PathwayGradient(model).attribute(x, target=target, percentile=0)
    sal = Saliency(model).attribute(x.clone().requires_grad_(), target=target, abs=False)
    assert torch.equal(pg, sal)


def test_tuple_inputs_and_additional_forward_args():
    torch.manual_seed(0)
    model = TwoInputNet().eval()
    x, z = torch.randn(4, 4), torch.randn(4, 3)
    attr = PathwayGradient(model).attribute(
        (x, z), target=2, additional_forward_args=2.0, percentile=0
    )
    sal = Saliency(model).attribute(
        (x.clone().requires_grad_(), z.clone().requires_grad_()),
        target=2,
        abs=False,
        additional_forward_args=2.0,
    )
    assert isinstance(attr, tuple) and len(attr) == 2
    assert torch.equal(attr[0], sal[0]) and torch.equal(attr[1], sal[1])
    res = CriticalPathways(model).attribute((x, z), target=2, additional_forward_args=2.0)
    assert res.names == ["<model>:relu"]


def test_channel_reduction_picks_largest_magnitude_signed_value():
    a = torch.tensor([[[[1.0, -4.0]], [[-2.0, 3.0]], [[0.5, 0.0]]]])  # [1, 3, 1, 2]
    assert max_magnitude_channel(a).tolist() == [[[[-2.0, -4.0]]]]
    model = _digits_like_vgg()
    x = torch.randn(2, 1, 32, 32)
    full = PathwayGradient(model).attribute(x, target=3)
    reduced = PathwayGradient(model).attribute(x, target=3, channel_reduction="max_magnitude")
    assert reduced.shape == (2, 1, 32, 32) and torch.equal(full, reduced)


# --------------------------------------------------------------------------- discovery


class ZooOfActivations(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.relu6 = nn.ReLU6()
        self.gelu = nn.GELU()
        self.silu = nn.SiLU()
        self.clip = nn.Hardtanh(-1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        parts = [
            torch.relu(h),
            h.relu(),
            F.relu(h.clone(), inplace=True),
            self.relu6(h),
            F.hardtanh(h, 0.0, 6.0),
            self.gelu(h),
            self.silu(h),
            self.clip(h),  # hardtanh(-1, 1) is not a rectifier: no neurons
            torch.sigmoid(h),  # gates are not neurons
            torch.tanh(h),
        ]
        return torch.stack(parts, 1).sum(1)


def test_discovers_module_and_functional_activations():
    sites = discover_neurons(ZooOfActivations(), torch.randn(2, 4))
    assert [(s.name, s.kind) for s in sites] == [
        ("<model>:relu#0", "relu"),
        ("<model>:relu#1", "relu"),
        ("<model>:relu#2", "relu"),
        ("relu6", "relu6"),
        ("<model>:relu6", "relu6"),
        ("gelu", "gelu"),
        ("silu", "silu"),
    ]
    assert all(s.producers[0].module == "lin" for s in sites)
    only_relu = discover_neurons(ZooOfActivations(), torch.randn(2, 4), activations=("relu",))
    assert len(only_relu) == 3


def test_torchvision_resnet_reused_relu_and_residual_producers():
    import torchvision

    model = torchvision.models.resnet18(num_classes=5).eval()
    sites = {s.name: s for s in discover_neurons(model, torch.randn(1, 3, 32, 32))}
    assert {"relu", "layer1.0.relu#0", "layer1.0.relu#1", "layer4.1.relu#1"} <= set(sites)
    assert len(sites) == 17
    assert [p.module for p in sites["layer2.0.relu#1"].producers] == [
        "layer2.0.conv2",
        "layer2.0.downsample.0",
    ]
    assert [p.module for p in sites["layer1.0.relu#0"].producers] == ["layer1.0.conv1"]


# --------------------------------------------------------------------------- errors and model state


class NoActivations(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x)


class Boom(nn.Module):
    def __init__(self, error: type[BaseException]) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.act = nn.ReLU()
        self.error = error

    def forward(self, x):
        self.act(self.lin(x))
        raise self.error("boom")


def test_bad_inputs_raise_clear_errors():
    model = tiny_mlp(0)
    x = torch.randn(2, 5, dtype=torch.float64)
    cp = CriticalPathways(model)
    for bad in (-1, 100, 150, float("nan")):
        with pytest.raises(ValueError, match="percentile"):
            cp.attribute(x, target=0, percentile=bad)
    with pytest.raises(TypeError, match="percentile"):
        cp.attribute(x, target=0, percentile="85")
    with pytest.raises(ValueError, match=r"out of range.*\[0, 2\]"):
        cp.attribute(x, target=3)
    with pytest.raises(ValueError, match="out of range"):
        PathwayGradient(model).attribute(x, target=[0, -1])
    with pytest.raises(ValueError, match="target=None"):
        cp.attribute(x)
    with pytest.raises(ValueError, match="3 entries but there are 2 examples"):
        cp.attribute(x, target=[0, 1, 2])
    with pytest.raises(ValueError, match="method"):
        cp.attribute(x, target=0, method="deeplift")
    with pytest.raises(ValueError, match="steps"):
        cp.attribute(x, target=0, method="integrated", steps=0)
    with pytest.raises(ValueError, match="no activation neurons"):
        CriticalPathways(NoActivations()).attribute(torch.randn(2, 3), target=0)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        CriticalPathways(lambda t: t)
    with pytest.raises(ValueError, match="activation kinds"):
        CriticalPathways(model, activations=("sigmoid",))
    with pytest.raises(TypeError, match="floating point"):
        PathwayGradient(model).attribute(torch.ones(2, 5, dtype=torch.long), target=0)
    res = cp.attribute(x, target=0)
    with pytest.raises(ValueError, match="2 examples"):
        PathwayGradient(model).attribute(x[:1], target=0, pathways=res)


def _calls():
    x = torch.randn(2, 3)
    return {
        "taylor": lambda m, t: CriticalPathways(m).attribute(x, target=t),
        "integrated": lambda m, t: CriticalPathways(m).attribute(
            x, target=t, method="integrated", steps=2
        ),
        "pathway_gradient": lambda m, t: PathwayGradient(m).attribute(x, target=t),
        "masked_forward": lambda m, t: CriticalPathways(m).masked_forward(
            x, CriticalPathways(m).attribute(x, target=t)
        ),
        "discover": lambda m, t: discover_neurons(m, x),
    }


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.drop(self.act(self.bn(self.lin(x)))))


@pytest.mark.parametrize("call", list(_calls()))
@pytest.mark.parametrize("case", ["ok", "bad_target", "raises", "interrupt"])
def test_model_untouched(call, case):
    torch.manual_seed(0)
    if case in ("ok", "bad_target"):
        model = SmallNet()
    else:
        model = Boom(RuntimeError if case == "raises" else KeyboardInterrupt)
    model.train()  # the user's mode must come back, BN statistics must not move
    model.lin.weight.requires_grad_(False)
    snapshot = ModelSnapshot.take(model)
    target = 7 if case == "bad_target" else 1
    fn = _calls()[call]
    if case == "ok" or (case == "bad_target" and call == "discover"):
        fn(model, target)
    elif case == "bad_target":
        with pytest.raises(ValueError, match="out of range"):
            fn(model, target)
    else:
        with pytest.raises(RuntimeError if case == "raises" else KeyboardInterrupt):
            fn(model, target)
    snapshot.assert_unchanged(model)
    assert model.training and not model.lin.weight.requires_grad
    assert torch._C._len_torch_function_stack() == 0


def test_result_helpers():
    model = _digits_like_vgg()
    x = torch.randn(3, 1, 32, 32)
    res = CriticalPathways(model).attribute(x, target=[1, 2, 3], percentile=90)
    assert res.total_neurons == 57408
    expected = kept_count(57408, 90) / 57408
    torch.testing.assert_close(res.kept_fraction(), torch.full((3,), expected, dtype=torch.float64))
    thr = res.threshold()
    for b in range(3):
        kept = torch.cat([res.contributions[n][b][res.masks[n][b]] for n in res.names])
        dropped = torch.cat([res.contributions[n][b][~res.masks[n][b]] for n in res.names])
        assert kept.min() == thr[b] and dropped.max() <= thr[b]
    sub = res.subset([2])
    assert sub.batch_size == 1 and torch.equal(sub.masks["features.2"], res.masks["features.2"][2:])
    on = res.channels_on_pathway("features.2")
    assert on.shape == (3, 16)
    assert torch.equal(on, res.masks["features.2"].flatten(2).any(2))


@pytest.mark.slow
def test_efficientnet_lite0_relu6_sites_producers_and_saliency():
    from captum_chains.data import preprocess, sample_photo
    from captum_chains.pretrained import load_efficientnet_lite0

    model = load_efficientnet_lite0()
    snapshot = ModelSnapshot.take(model)
    x = preprocess(sample_photo("chelsea"))[None]
    sites = discover_neurons(model, x)
    assert len(sites) == 33 and {s.kind for s in sites} == {"relu6"}
    producers = {p.module: s.name for s in sites for p in s.producers}
    assert producers["conv_stem"] == "bn1.act"
    assert producers["blocks.1.0.conv_dw"] == "blocks.1.0.bn2.act"
    assert producers["conv_head"] == "bn2.act"
    assert not any(name.endswith("conv_pwl") for name in producers)  # no activation follows
    pg = PathwayGradient(model).attribute(x, target=285, percentile=0)
    sal = Saliency(model).attribute(x.clone().requires_grad_(), target=285, abs=False)
    assert torch.equal(pg, sal)
    res = PathwayGradient(model)
    attr = res.attribute(x, target=285)
    assert attr.shape == x.shape and res.last_pathways.total_neurons == 6157536
    snapshot.assert_unchanged(model)
