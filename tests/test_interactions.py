"""InteractionPrimitives (Chen et al., ICLR 2024): exactness, matching, batching, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from captum_chains._utils.model_state import ModelSnapshot
from captum_chains.interactions import (
    InteractionPrimitives,
    InteractionResult,
    SolverConfig,
    patch_grid_mask,
    slic_mask,
    token_mask,
)
from captum_chains.interactions.optimize import Problem, problem_loss, solve
from captum_chains.interactions.players import resolve_baselines, validate_players
from captum_chains.interactions.values import log_odds

FAST = SolverConfig(iterations=400)  # "auto": the exact LP at these sizes


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert float((a - b).abs().max()) <= atol, float((a - b).abs().max())


class TinyCNN(nn.Module):
    def __init__(self, seed: int, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(nn.functional.adaptive_avg_pool2d(h, 2).flatten(1))


class TwoInputNet(nn.Module):
    """Takes an image and a feature vector, plus a per-sample scale as extra argument."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.img = nn.Linear(16, 3)
        self.tab = nn.Linear(3, 3)

    def forward(self, img: torch.Tensor, tab: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.img(img.flatten(1)).tanh() * self.tab(tab) + scale[:, None]


@pytest.fixture(scope="module")
def cnns() -> list[nn.Module]:
    return [TinyCNN(0).eval(), TinyCNN(1).eval()]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))


# ---------------------------------------------------------------- exactness
def _known_game(x: torch.Tensor) -> torch.Tensor:
    """v = x1 x2 + max(x3, x4) on binary player masks (players 0..3)."""
    return x[:, 0] * x[:, 1] + torch.maximum(x[:, 2], x[:, 3])


@pytest.mark.parametrize("solver", ["lp", "pdhg"])
def test_known_function_gives_one_and_and_one_or(solver: str) -> None:
    ip = InteractionPrimitives(_known_game, value="logit")
    res = ip.attribute(
        torch.ones(1, 4),
        baselines=0.0,
        feature_mask=torch.arange(4),
        noise_bound=0.0,
        solver=SolverConfig(method=solver, iterations=2000),
        progress=False,
    )
    i_and, i_or = res.interactions("and")[0, 0], res.interactions("or")[0, 0]
    expected_and = torch.zeros(16, dtype=torch.float64)
    expected_and[0b0011] = 1.0
    expected_or = torch.zeros(16, dtype=torch.float64)
    expected_or[0b1100] = 1.0
    tol = 1e-6 if solver == "lp" else 2e-3
    assert_close(i_and, expected_and, tol)
    assert_close(i_or, expected_or, tol)
    assert res.top("and", 1)[0].players == ("0", "1")  # players named by their index
    assert res.top("or", 1)[0].players == ("2", "3")
    assert res.solver == solver
    assert abs(float(res.loss[0]) - 2.0) < (1e-6 if solver == "lp" else 2e-3)


def test_noise_is_used_within_its_bound() -> None:
    ip = InteractionPrimitives(_known_game, value="logit")
    res = ip.attribute(
        torch.ones(1, 4), 0.0, feature_mask=torch.arange(4), solver="lp", progress=False
    )
    q = 0.02 * 2.0  # 0.02 |v(N) - v(∅)|
    assert float(res.noise.abs().max()) <= q + 1e-9
    # ε can shrink AND{0,1} by δ (ε_T = -δ on T ⊇ {0,1}) and OR{2,3} by δ' (ε_T = -δ' on
    # T ∩ {2,3} ≠ ∅); masks in both need δ + δ' <= q, so the optimum is 2 - q
    assert abs(float(res.loss[0]) - (2 - q)) < 1e-6
    assert float(res.reconstruction_error.max()) <= q + 1e-9


# ---------------------------------------------------------------- matching
@pytest.mark.parametrize("method", ["single", "shared"])
def test_universal_matching_on_all_masks(cnns, images, method: str) -> None:
    ip = InteractionPrimitives(cnns)
    res = ip.attribute(
        images,
        baselines="min",
        target=[0, 2],
        feature_mask=patch_grid_mask(8, 8, 2, 3),
        method=method,
        solver=FAST,
        progress=False,
    )
    assert res.i_and.shape == (2, 2, 64) and res.n == 6
    # v(x_T) + ε_T = Σ_{S⊆T} I_and(S) + I_or(∅) + Σ_{S∩T≠∅} I_or(S), independently rebuilt
    for t in range(64):
        rebuilt = sum(res.i_and[..., s] for s in range(64) if s & ~t == 0)
        rebuilt = rebuilt + res.i_or[..., 0]
        rebuilt = rebuilt + sum(res.i_or[..., s] for s in range(1, 64) if s & t)
        assert_close(rebuilt, res.values[..., t] + res.noise[..., t], 1e-9)
    assert float(res.matching_error.max()) < 1e-9
    assert bool((res.reconstruction_error <= res.noise_bound + 1e-9).all())
    assert float(res.relative_reconstruction_error.max()) <= 0.02 + 1e-9


# ---------------------------------------------------------------- evaluation
def _manual_value(model, img, tab, scale, mask_img, mask_tab, base_img, base_tab, t, target):
    """v(x_T) for one sample, building x_T element by element."""
    x_img = img.clone()
    for idx in itertools.product(*(range(s) for s in img.shape)):
        pid = int(mask_img[idx])
        if pid >= 0 and not t >> pid & 1:
            x_img[idx] = base_img[idx]
    x_tab = tab.clone()
    for j in range(tab.shape[0]):
        pid = int(mask_tab[j])
        if pid >= 0 and not t >> pid & 1:
            x_tab[j] = base_tab[j]
    with torch.no_grad():
        out = model(x_img[None], x_tab[None], scale[None])
    return float(log_odds(out, torch.tensor([target])))


def test_batched_evaluation_equals_one_at_a_time() -> None:
    model = TwoInputNet().eval()
    g = torch.Generator().manual_seed(2)
    img, tab, scale = (
        torch.randn(2, 1, 4, 4, generator=g),
        torch.randn(2, 3, generator=g),
        torch.randn(2),
    )
    # per-sample image masks (different layouts), -1 entries are not players
    m_img = torch.stack([patch_grid_mask(4, 4, 2, 2), patch_grid_mask(4, 4, 2, 2).T]).unsqueeze(1)
    m_img[1, 0, 0, 0] = -1
    m_tab = torch.tensor([[4, -1, 3]])  # players shared across the tuple's tensors
    base_img = torch.full((1, 1, 4, 4), 0.5)
    base_tab = torch.tensor([[-1.0, -2.0, -3.0]])
    ip = InteractionPrimitives(model)
    kwargs = dict(
        baselines=(base_img, base_tab),
        target=[1, 2],
        additional_forward_args=(scale,),
        feature_mask=(m_img, m_tab),
        progress=False,
    )
    one = ip.compute_values((img, tab), batch_size=1, **kwargs)
    many = ip.compute_values((img, tab), batch_size=1000, **kwargs)
    odd = ip.compute_values((img, tab), batch_size=7, **kwargs)
    assert one.shape == (2, 1, 32)
    assert_close(many, one, 1e-6)
    assert_close(odd, one, 1e-6)
    for b, t in itertools.product(range(2), [0, 5, 17, 31]):
        manual = _manual_value(
            model,
            img[b],
            tab[b],
            scale[b],
            m_img[b],
            m_tab[0],
            base_img[0],
            base_tab[0],
            t,
            [1, 2][b],
        )
        assert abs(float(one[b, 0, t]) - manual) < 1e-5


def test_values_use_log_odds_and_subtract_empty(cnns, images) -> None:
    ip = InteractionPrimitives(cnns[0])
    mask = patch_grid_mask(8, 8, 1, 2)
    raw = ip.compute_values(images[:1], baselines=0.0, target=1, feature_mask=mask, progress=False)
    with torch.no_grad():
        p = torch.softmax(cnns[0](images[:1]), 1)[0, 1].double()
    assert abs(float(raw[0, 0, -1]) - float(torch.log(p / (1 - p)))) < 1e-5
    res = ip.extract(raw, solver=FAST, progress=False)
    assert_close(res.values[..., 0], torch.zeros(1, 1, dtype=torch.float64), 0.0)
    assert_close(res.v_empty, raw[..., 0], 0.0)
    kept = ip.extract(raw, subtract_empty=False, solver=FAST, progress=False)
    assert_close(kept.values, raw, 0.0)


# ------------------------------------------------------------------ shared
def test_identical_models_share_everything(cnns, images) -> None:
    ip = InteractionPrimitives([cnns[0], cnns[0]])
    res = ip.attribute(
        images,
        baselines=0.0,
        target=0,
        feature_mask=patch_grid_mask(8, 8, 2, 2),
        solver=FAST,
        progress=False,
    )
    assert res.method == "shared"
    assert_close(res.i_and[:, 0], res.i_and[:, 1], 1e-9)
    assert res.s_and == 1.0 and res.s_or == 1.0
    assert not bool(res.distinctive("and").any())


def test_lp_shared_on_identical_models_is_scaled_single_optimum() -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 1, 32, generator=g, dtype=torch.float64).cumsum(-1)
    q = 0.02 * (v[..., -1] - v[..., 0]).abs()
    single = Problem(v, q, None, shared=False)
    sol = solve(single, SolverConfig("lp"), progress=False)
    v3 = v.expand(2, 3, 32).contiguous()
    shared = Problem(v3, q.expand(2, 3).contiguous(), torch.full((3,), 0.3), shared=True, alpha=0.1)
    sol3 = solve(shared, SolverConfig("lp"), progress=False)
    # by convexity and symmetry the optimum is the symmetric one: (1 + m α) × Eq. (4)
    best = problem_loss(single, sol.gamma, sol.noise)
    assert_close(problem_loss(shared, sol3.gamma, sol3.noise), 1.3 * best, 1e-6)
    # the code's weighting (1 - α) max + α Σ gives (1 - α + m α) × Eq. (4)
    code = Problem(v3, shared.noise_bound, shared.gamma_bound, True, 0.1, "code")
    sol_code = solve(code, SolverConfig("lp"), progress=False)
    assert_close(problem_loss(code, sol_code.gamma, sol_code.noise), 1.2 * best, 1e-6)


@pytest.mark.parametrize(("shared", "method"), [(False, "pdhg"), (True, "pdhg"), (False, "adam")])
def test_first_order_solvers_reach_the_lp_optimum(shared: bool, method: str) -> None:
    g = torch.Generator().manual_seed(1)
    size = 16 if method == "adam" else 32
    v = torch.randn(2, 2, size, generator=g, dtype=torch.float64).cumsum(-1)
    v = v - v[..., :1]
    q = 0.02 * (v[..., -1] - v[..., 0]).abs()
    p = 0.5 * (v[..., -1] - v[..., 0]).abs().mean(0)
    prob = Problem(v, q, p if shared else None, shared=shared)
    exact = problem_loss(prob, *_gamma_noise(solve(prob, SolverConfig("lp"), progress=False)))
    iterations = {"adam": 800, "pdhg": 1500 if shared else 1000}[method]
    fast = solve(prob, SolverConfig(method, iterations=iterations, tol=0.0), progress=False)
    loss = problem_loss(prob, fast.gamma, fast.noise)
    assert bool((loss >= exact - 1e-6).all())  # the LP is a true lower bound
    assert bool((loss <= exact * (1.01 if method == "pdhg" else 1.03)).all()), (loss, exact)
    assert bool((fast.noise.abs() <= q[..., None] + 1e-9).all())
    if shared:
        hat = fast.gamma - fast.gamma.mean(1, keepdim=True)
        assert bool((hat.abs() <= 2 * p[None, :, None] + 1e-6).all())


def _gamma_noise(sol):
    return sol.gamma, sol.noise


def test_reference_sgd_optimizer_lowers_the_loss() -> None:
    g = torch.Generator().manual_seed(2)
    v = torch.randn(1, 2, 16, generator=g, dtype=torch.float64).cumsum(-1)
    q = 0.02 * (v[..., -1] - v[..., 0]).abs()
    prob = Problem(v, q, torch.full((2,), 0.5), shared=True)
    start = problem_loss(prob, torch.zeros_like(v), torch.zeros_like(v))
    sol = solve(prob, SolverConfig("sgd", iterations=300, lr=1e-3), progress=False)
    assert float(problem_loss(prob, sol.gamma, sol.noise)[0]) < float(start[0])
    assert len(sol.history) > 1


# -------------------------------------------------------------- bad inputs
class CountingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.lin(x.flatten(1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(feature_mask=torch.arange(16).view(4, 4)), "2\\*\\*16"),  # fine with max_players=16
        (dict(feature_mask=torch.arange(16).view(4, 4), max_players=12), "max_players=12"),
        (dict(feature_mask=torch.arange(16).view(4, 4), memory_budget_mb=1.0), "MiB"),
        (dict(feature_mask=torch.tensor([[0, 0, 2, 2]] * 4)), "lacks ids \\[1\\]"),
        (
            dict(feature_mask=torch.tensor([[0, 1, 2, 3]] * 4), baselines=torch.zeros(3, 3)),
            "baselines\\[0\\] has shape",
        ),
        (dict(feature_mask=torch.ones(4, 4)), "integer ids"),
        (dict(feature_mask=torch.tensor([[0, 1, 2, -2]] * 4)), "-1"),
        (dict(feature_mask=torch.zeros(3, 4, dtype=torch.long)), "broadcast"),
        (dict(feature_mask=None), "feature_mask is required"),
        (
            dict(feature_mask=torch.tensor([[0, 1, 2, 3]] * 4), baselines="fancy"),
            "unknown baseline",
        ),
        (dict(feature_mask=torch.tensor([[0, 1, 2, 3]] * 4), target=[0, 1, 1]), "3 entries"),
        (dict(feature_mask=torch.tensor([[0, 1, 2, 3]] * 4), method="joint"), "method"),
        (dict(feature_mask=torch.tensor([[0, 1, 2, 3]] * 4), method="shared"), "two models"),
        (dict(feature_mask=torch.tensor([[0, 1, 2, 3]] * 4), solver="newton"), "solver"),
    ],
)
def test_bad_inputs_fail_before_any_forward_pass(kwargs: dict, match: str) -> None:
    model = CountingModel()
    ip = InteractionPrimitives(model)
    args = dict(baselines=0.0, target=0, progress=False)
    args.update(kwargs)
    if match == "2\\*\\*16":  # 16 players are accepted; 2**16 forwards would run: only check size
        ip._check_size(16, 2, 16, 1024.0)
        args["max_players"] = 15
        match = "2\\*\\*16"
    with pytest.raises((ValueError, TypeError), match=match):
        ip.attribute(torch.randn(2, 1, 4, 4), **args)
    assert model.calls == 0


def test_forward_errors_and_bad_value_functions_are_clear() -> None:
    model = CountingModel()
    ip = InteractionPrimitives(model, value=lambda out, t: out)  # returns [K, 2], not [K]
    with pytest.raises(ValueError, match="one value per sample"):
        ip.attribute(
            torch.randn(1, 1, 4, 4),
            0.0,
            0,
            feature_mask=torch.tensor([[0, 1, 1, 0]] * 4),
            progress=False,
        )
    with pytest.raises(ValueError, match="target is required"):
        InteractionPrimitives(model).attribute(
            torch.randn(1, 1, 4, 4),
            0.0,
            None,
            feature_mask=torch.tensor([[0, 1, 1, 0]] * 4),
            progress=False,
        )


# ------------------------------------------------------------ model state
class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 3)
        self.dropout = nn.Dropout(0.5)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > 2:
            raise RuntimeError("boom")
        return self.dropout(self.lin(x.flatten(1)))


def test_models_are_left_unchanged_on_success_and_failure(cnns, images) -> None:
    train_mode = TinyCNN(3).train()
    for m in cnns:
        m.conv.weight.requires_grad_(True)
    snaps = [ModelSnapshot.take(m) for m in (*cnns, train_mode)]
    res = InteractionPrimitives([*cnns, train_mode]).attribute(
        images, "mean", 1, feature_mask=patch_grid_mask(8, 8, 2, 2), solver=FAST, progress=False
    )
    # a model given in training mode is evaluated in eval mode (batch-norm statistics fixed)
    again = InteractionPrimitives(train_mode.eval()).compute_values(
        images, "mean", 1, feature_mask=patch_grid_mask(8, 8, 2, 2), progress=False
    )
    train_mode.train()
    assert_close(again[:, 0], res.values[:, 2] + res.v_empty[:, 2, None], 1e-9)
    for snap, m in zip(snaps, (*cnns, train_mode), strict=True):
        snap.assert_unchanged(m)
    boom = Exploding()
    snap = ModelSnapshot.take(boom)
    with pytest.raises(RuntimeError, match="boom"):
        InteractionPrimitives(boom).attribute(
            torch.randn(1, 1, 4, 4),
            0.0,
            0,
            feature_mask=torch.arange(16).view(4, 4) // 2,
            batch_size=4,
            progress=False,
            max_players=8,
        )
    snap.assert_unchanged(boom)


# --------------------------------------------------------------- statistics
def _result(i_and: torch.Tensor, i_or: torch.Tensor, **sizes: object) -> InteractionResult:
    b, m, size = i_and.shape
    n = size.bit_length() - 1
    zeros = torch.zeros_like(i_and)
    return InteractionResult(
        i_and=i_and,
        i_or=i_or,
        values=zeros,
        noise=zeros,
        gamma=zeros,
        noise_bound=torch.zeros(b, m),
        v_empty=torch.zeros(b, m),
        player_names=tuple("abcdefgh"[:n]),
        model_names=tuple(f"m{i}" for i in range(m)),
        method="shared",
        loss=torch.zeros(b),
        **({"salient_count": 2} | sizes),  # type: ignore[arg-type]
    )


def test_salient_shared_distinctive_and_generalization() -> None:
    i_and = torch.zeros(1, 2, 8, dtype=torch.float64)
    i_and[0, 0, [0b011, 0b101, 0b111]] = torch.tensor([3.0, -2.0, 0.5], dtype=torch.float64)
    i_and[0, 1, [0b011, 0b110, 0b111]] = torch.tensor([-4.0, 1.0, 0.1], dtype=torch.float64)
    i_or = torch.zeros_like(i_and)
    i_or[0, 0, 0b110] = 1.0
    i_or[0, 1, 0b110] = 2.0
    res = _result(i_and, i_or)
    sal = res.salient("and")
    assert sal[0, 0].nonzero().flatten().tolist() == [0b011, 0b101]
    assert sal[0, 1].nonzero().flatten().tolist() == [0b011, 0b110]
    assert res.shared("and")[0].nonzero().flatten().tolist() == [0b011]
    assert res.generalization("and").tolist() == [[0.5, 0.5]]
    assert res.generalization("or").tolist() == [[1.0, 1.0]]  # Ω has one non-zero entry each
    assert [str(i) for i in res.distinctive_interactions("and", model=1)] == ["AND {b, c}: +1"]
    assert res.top("and", 2, model=0)[0].players == ("a", "b")
    assert res.subset_of(["a", "c"]) == 0b101 and res.names_of(0b110) == ("b", "c")
    # threshold variant: |I| > 0.3
    assert res.salient("and", threshold=0.3)[0, 0].sum() == 3
    # sparsity: |I| > 0.05 max over both kinds, fraction of 2 * 7 subsets
    # model 1: 0.1 < 0.05 * 4 is not salient
    assert_close(res.sparsity(), torch.tensor([[4 / 14, 3 / 14]], dtype=torch.float64), 1e-12)
    st = res.strength_by_order("and")
    assert st[0, 0, 2].tolist() == [3.0, -2.0] and st[0, 0, 3].tolist() == [0.5, 0.0]


def test_low_orders_are_merged_into_and() -> None:
    i_and = torch.zeros(1, 1, 4, dtype=torch.float64)
    i_or = torch.zeros_like(i_and)
    i_and[0, 0, 1], i_or[0, 0, 1], i_or[0, 0, 3] = 1.0, 2.0, 5.0
    res = _result(i_and, i_or)
    assert res.interactions("and")[0, 0].tolist() == [0.0, 3.0, 0.0, 0.0]
    assert res.interactions("or")[0, 0].tolist() == [0.0, 0.0, 0.0, 5.0]
    res.merge_low_order = False
    assert res.interactions("or")[0, 0, 1] == 2.0


# ---------------------------------------------------------------- players
def test_patch_grid_and_token_masks() -> None:
    m = patch_grid_mask(5, 7, 2, 3)
    assert m.shape == (5, 7) and sorted(m.unique().tolist()) == list(range(6))
    sizes = torch.bincount(m.flatten())
    assert int(sizes.max() - sizes.min()) <= 5  # near-equal patches on uneven sides
    with pytest.raises(ValueError, match="rows=9"):
        patch_grid_mask(5, 7, 9, 1)
    t = token_mask(5, players=[1, 3])
    assert t.flatten().tolist() == [-1, 0, -1, 1, -1]


def test_slic_superpixels_are_consecutive_players() -> None:
    img = torch.zeros(3, 24, 24)
    img[0, :12] = 1.0
    img[1, :, 12:] = 1.0
    mask = slic_mask(img, n_segments=4, compactness=10.0)
    ids = mask.unique().tolist()
    assert ids == list(range(len(ids))) and 2 <= len(ids) <= 8
    players = validate_players((img[None],), mask)
    assert players.n == len(ids)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 24 * 24, 2)).eval()
    res = InteractionPrimitives(model).attribute(
        img[None], "blur", 1, feature_mask=mask, solver=FAST, progress=False
    )
    assert res.n == len(ids) and float(res.matching_error.max()) < 1e-9


def test_baseline_options() -> None:
    x = torch.arange(8.0).view(2, 1, 2, 2)
    zero, mean, low = (resolve_baselines((x,), b)[0] for b in ("zero", "mean", "min"))
    assert zero.abs().sum() == 0 and mean[0].unique().tolist() == [1.5]
    assert low[1].unique().tolist() == [4.0]
    blur = resolve_baselines((torch.randn(1, 3, 9, 9),), "blur")[0]
    assert blur.shape == (1, 3, 9, 9)
    per_sample = resolve_baselines((x,), torch.zeros(2, 1, 2, 2))[0]
    assert per_sample.shape == x.shape
    with pytest.raises(ValueError, match="has shape"):
        resolve_baselines((x,), torch.zeros(3, 1, 2, 2))


def test_salient_fraction_and_count() -> None:
    res = _result(
        torch.randn(1, 1, 64, dtype=torch.float64),
        torch.zeros(1, 1, 64, dtype=torch.float64),
        salient_count=None,
        salient_fraction=0.1,
    )
    assert int(res.salient("and").sum()) == math.ceil(0.1 * 63)
    assert int(res.salient("and", count=5).sum()) == 5
    assert int(res.salient("and", fraction=0.5).sum()) == math.ceil(0.5 * 63)
    with pytest.warns(DeprecationWarning, match="count=<int> or fraction=<float>"):
        assert int(res.salient("and", top_k=5).sum()) == 5
