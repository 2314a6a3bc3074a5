"""InteractionConfig, the automatic solver, the reference preset and the listing API.

Every optimum here is checked against an independent dense linear program written in
this file (explicit Möbius / OR matrices built by looping over subsets, scipy's
``linprog``), and the reference preset against a dense re-implementation of the authors'
objective and optimiser.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from captum_chains.interactions import (
    InteractionConfig,
    InteractionPrimitives,
    SolverConfig,
    choose_solver,
)
from captum_chains.interactions.optimize import AUTO_RULE
from captum_chains.interactions.values import log_odds, reference_log_odds


# ------------------------------------------------------- independent algebra
def _and_matrix(n: int) -> np.ndarray:
    """``I_and(S) = Σ_{T⊆S} (-1)^{|S|-|T|} v(T)``, Eq. (1), by looping over subsets."""
    size = 1 << n
    out = np.zeros((size, size))
    for s in range(size):
        for t in range(size):
            if t & ~s == 0:
                out[s, t] = (-1) ** (bin(s).count("1") - bin(t).count("1"))
    return out


def _or_matrix(n: int) -> np.ndarray:
    """``I_or(S) = -Σ_{T⊆S} (-1)^{|S|-|T|} v(N∖T)`` (S ≠ ∅), ``I_or(∅) = v(∅)``, Eq. (2)."""
    size = 1 << n
    full = size - 1
    out = np.zeros((size, size))
    out[0, 0] = 1.0
    for s in range(1, size):
        for t in range(size):
            if t & ~s == 0:
                out[s, full ^ t] -= (-1) ** (bin(s).count("1") - bin(t).count("1"))
    return out


def _exact_optimum(
    v: np.ndarray, q: np.ndarray, p: np.ndarray | None, alpha: float = 0.1, w: float = 1.0
) -> float:
    """Eq. (4) summed over models (``p`` None) or Eq. (6), as one dense LP over γ, ε, t."""
    m, size = v.shape
    n = size.bit_length() - 1
    a_mat, o_mat = _and_matrix(n), _or_matrix(n)
    shared = p is not None
    # variables: γ̄ (shared only) | γ_i or γ̂_i (m) | ε_i (m) | t_and_i, t_or_i (m each) | s
    blocks = {"gbar": size if shared else 0, "g": m * size, "e": m * size}
    blocks |= {"ta": m * size, "to": m * size, "sa": size if shared else 0}
    blocks |= {"so": size if shared else 0}
    start, off = {}, 0
    for k, width in blocks.items():
        start[k] = off
        off += width
    total = off
    rows, rhs = [], []

    def row() -> np.ndarray:
        return np.zeros(total)

    for i in range(m):
        for mat, sign, t_key in ((a_mat, 1.0, "ta"), (o_mat, -1.0, "to")):
            # I = mat (0.5 v + 0.5 ε ± γ); constraints ±I - t <= 0
            for s in range(size):
                for pm in (1.0, -1.0):
                    r = row()
                    g0 = start["g"] + i * size
                    r[g0 : g0 + size] = pm * sign * mat[s]
                    if shared:
                        r[start["gbar"] : start["gbar"] + size] = pm * sign * mat[s]
                    e0 = start["e"] + i * size
                    r[e0 : e0 + size] = pm * 0.5 * mat[s]
                    r[start[t_key] + i * size + s] = -1.0
                    rows.append(r)
                    rhs.append(-pm * 0.5 * mat[s] @ v[i])
                if shared:  # t_i(S) <= s(S)
                    r = row()
                    r[start[t_key] + i * size + s] = 1.0
                    r[start["sa" if t_key == "ta" else "so"] + s] = -1.0
                    rows.append(r)
                    rhs.append(0.0)
    c = np.zeros(total)
    ts = slice(start["ta"], start["sa"])
    c[ts] = alpha if shared else 1.0
    if shared:
        c[start["sa"] :] = w
    bounds: list[tuple[float | None, float | None]] = [(None, None)] * total
    for i in range(m):
        for s in range(size):
            bounds[start["e"] + i * size + s] = (-q[i], q[i])
            if shared:
                bounds[start["g"] + i * size + s] = (-p[i], p[i])
    res = linprog(c, A_ub=np.array(rows), b_ub=np.array(rhs), bounds=bounds, method="highs")
    assert res.status == 0, res.message
    return float(res.fun)


def _reference_objective(
    v: np.ndarray, gamma: np.ndarray, noise: np.ndarray, alpha: float = 0.1
) -> float:
    """The authors' Eq. (6) loss: ``Σ_S (1 - α) max_i |I_i(S)| + α Σ_i |I_i(S)|``, AND + OR."""
    n = v.shape[-1].bit_length() - 1
    half = 0.5 * (v + noise)
    i_and = (_and_matrix(n) @ (half + gamma).T).T
    i_or = (_or_matrix(n) @ (half - gamma).T).T
    out = 0.0
    for inter in (i_and, i_or):
        out += (1 - alpha) * np.abs(inter).max(0).sum() + alpha * np.abs(inter).sum()
    return float(out)


def _random_values(n: int, m: int, seed: int) -> torch.Tensor:
    """``[1, m, 2**n]`` values of correlated random games (sparse-ish Harsanyi dividends)."""
    gen = np.random.default_rng(seed)
    size = 1 << n
    order = np.array([bin(s).count("1") for s in range(size)])
    base = gen.normal(size=size) * 0.6**order * (gen.random(size) < 0.6)
    dividends = base + 0.3 * gen.normal(size=(m, size)) * 0.6**order
    # v(T) = Σ_{S⊆T} dividend(S): the inverse of the Möbius matrix
    v = dividends @ np.linalg.inv(_and_matrix(n)).T
    return torch.from_numpy(v[None])


# ------------------------------------------------------------ auto solver
@settings(max_examples=12, deadline=None)
@given(n=st.integers(2, 5), m=st.sampled_from([1, 2, 3]), seed=st.integers(0, 10_000))
def test_default_solver_is_within_a_thousandth_of_the_exact_optimum(
    n: int, m: int, seed: int
) -> None:
    values = _random_values(n, m, seed)
    ip = InteractionPrimitives([lambda x: x] * m)
    res = ip.extract(values, progress=False)  # InteractionConfig(): solver "auto"
    shared = m >= 2
    assert res.solver == choose_solver(n, shared) == "lp"  # n <= AUTO_RULE at these sizes
    v = res.values[0].numpy()
    q = res.noise_bound[0].numpy()
    p = 0.5 * np.abs(v[:, -1] - v[:, 0]) if shared else None
    exact = _exact_optimum(v, q, p)
    loss = float(res.loss[0])
    assert loss >= exact - 1e-7 * (1 + exact)
    assert loss <= exact * 1.001 + 1e-9, (loss, exact)
    assert float(res.gap[0]) <= 1e-3  # the LP certifies itself


@settings(max_examples=8, deadline=None)
@given(n=st.integers(2, 4), m=st.sampled_from([1, 3]), seed=st.integers(0, 10_000))
def test_pdhg_certificate_brackets_the_exact_optimum(n: int, m: int, seed: int) -> None:
    """Above the LP sizes ``auto`` runs PDHG; its certified gap must be a true bound."""
    values = _random_values(n, m, seed)
    ip = InteractionPrimitives([lambda x: x] * m)
    res = ip.extract(values, solver=SolverConfig("pdhg", iterations=3000), progress=False)
    v, q = res.values[0].numpy(), res.noise_bound[0].numpy()
    p = 0.5 * np.abs(v[:, -1] - v[:, 0]) if m >= 2 else None
    exact = _exact_optimum(v, q, p)
    lower, loss = float(res.lower_bound[0]), float(res.loss[0])
    assert lower <= exact + 1e-6 * (1 + exact) <= loss + 2e-6 * (1 + exact)
    if float(res.gap[0]) <= 1e-3:  # certified: then truly within 0.1 %
        assert loss <= exact * 1.001 + 1e-6


def test_auto_rule_switches_to_pdhg_above_the_lp_sizes(monkeypatch) -> None:
    assert choose_solver(AUTO_RULE["single"], shared=False) == "lp"
    assert choose_solver(AUTO_RULE["single"] + 1, shared=False) == "pdhg"
    assert choose_solver(AUTO_RULE["shared"] + 1, shared=True) == "pdhg"
    assert choose_solver(16, shared=False, device="cuda") == "pdhg"
    monkeypatch.setitem(AUTO_RULE, "single", 2)  # pretend n = 4 is a large problem
    values = _random_values(4, 1, 3)
    res = InteractionPrimitives(lambda x: x).extract(values, progress=False)
    assert res.solver == "pdhg" and res.lower_bound is not None
    exact = _exact_optimum(res.values[0].numpy(), res.noise_bound[0].numpy(), None)
    assert float(res.lower_bound[0]) <= exact + 1e-6 <= float(res.loss[0]) + 2e-6


# -------------------------------------------------------- reference preset
def _tiny_game_models() -> list:
    """Two 3-class 'models' of 3 binary players with AND/OR structure in the logits."""

    def model_a(x: torch.Tensor) -> torch.Tensor:
        z0 = 2.0 * x[:, 0] * x[:, 1] + torch.maximum(x[:, 1], x[:, 2])
        return torch.stack([z0, 0.5 * x[:, 2], -x[:, 0]], dim=1)

    def model_b(x: torch.Tensor) -> torch.Tensor:
        z0 = 1.5 * x[:, 0] * x[:, 1] + 0.8 * torch.maximum(x[:, 1], x[:, 2]) + 0.2 * x[:, 0]
        return torch.stack([z0, 0.3 * x[:, 1], -0.5 * x[:, 2]], dim=1)

    return [model_a, model_b]


def _authors_log_odds(z: np.ndarray, y: int) -> np.ndarray:
    others = np.delete(z, y, axis=1)
    top = others.max(1)
    return z[:, y] - top - np.log(np.exp(others - top[:, None]).sum(1) + 1e-7)


def _authors_sgd(v: np.ndarray, q: np.ndarray, p: np.ndarray, lr: float, steps: int):
    """Dense re-implementation of the authors' shared-objective loop (float64)."""
    m, size = v.shape
    n = size.bit_length() - 1
    a_mat = torch.from_numpy(_and_matrix(n))
    o_mat = torch.from_numpy(_or_matrix(n))
    vt = torch.from_numpy(v)
    g_bar = torch.zeros(1, size, dtype=torch.float64, requires_grad=True)
    g_hat = torch.zeros(m, size, dtype=torch.float64, requires_grad=True)
    eps = torch.zeros(m, size, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([g_bar, g_hat, eps], lr=lr, momentum=0.9)
    qt, pt = torch.from_numpy(q)[:, None], torch.from_numpy(p)[:, None]
    for step in range(steps):
        with torch.no_grad():
            eps.copy_(eps.clamp(-qt, qt))
            g_hat.copy_(g_hat.clamp(-pt, pt))
        half = 0.5 * (vt + eps)
        gamma = g_bar + g_hat
        loss = torch.zeros((), dtype=torch.float64)
        for inter in ((half + gamma) @ a_mat.T, (half - gamma) @ o_mat.T):
            loss = loss + 0.9 * inter.abs().amax(0).sum() + 0.1 * inter.abs().sum()
        if step + 1 < steps:
            opt.zero_grad()
            loss.backward()
            opt.step()
    return (g_bar + g_hat).detach().numpy(), eps.detach().numpy(), float(loss.detach())


def test_reference_preset_is_the_authors_code() -> None:
    ref = InteractionConfig.reference()
    assert (ref.weighting, ref.value, ref.subtract_empty) == ("code", "reference_log_odds", True)
    assert (ref.noise_bound, ref.gamma_bound, ref.gamma_scale) == (0.02, 0.5, None)
    assert isinstance(ref.solver, SolverConfig) and ref.solver.method == "sgd"
    assert ref.solver.iterations is None and ref.solver.lr is None  # 20 000 steps, lr 1e-6

    x = torch.ones(1, 3)
    steps, lr = 150, 2e-2
    cfg = ref.replace(solver=SolverConfig("sgd", iterations=steps, lr=lr, dtype=torch.float64))
    ip = InteractionPrimitives(_tiny_game_models())
    res = ip.attribute(x, 0.0, 0, feature_mask=torch.arange(3), config=cfg, progress=False)

    # values: the authors' log-odds on every mask, minus v(x_∅)
    masks = torch.tensor([[(t >> i) & 1 for i in range(3)] for t in range(8)], dtype=torch.float)
    expected = np.stack(
        [_authors_log_odds(f(masks).numpy().astype(np.float64), 0) for f in _tiny_game_models()]
    )
    np.testing.assert_allclose(res.values[0].numpy(), expected - expected[:, :1], atol=1e-6)

    # the loss of the returned γ, ε under the authors' objective, recomputed densely
    v = res.values[0].numpy()
    gamma, noise = res.gamma[0].numpy(), res.noise[0].numpy()
    assert abs(float(res.loss[0]) - _reference_objective(v, gamma, noise)) < 1e-9

    # and the optimiser: the authors' SGD loop, dense, from the same start
    q = 0.02 * np.abs(v[:, -1] - v[:, 0])
    p = 0.5 * np.abs(v[:, -1] - v[:, 0])  # their γ̂ bound (one sample: its own spread)
    g_ref, e_ref, loss_ref = _authors_sgd(v, q, p, lr, steps)
    np.testing.assert_allclose(gamma, g_ref, atol=1e-8)
    np.testing.assert_allclose(noise, e_ref, atol=1e-8)
    assert abs(float(res.loss[0]) - loss_ref) < 1e-8 * (1 + loss_ref)


def test_reference_log_odds_matches_the_authors_formula() -> None:
    z = torch.randn(64, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4
    y = torch.randint(0, 5, (64,), generator=torch.Generator().manual_seed(1))
    ours = reference_log_odds(z, y).numpy()
    theirs = np.array([_authors_log_odds(z[k : k + 1].numpy(), int(y[k]))[0] for k in range(64)])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    p = torch.softmax(z, 1).gather(1, y[:, None])[:, 0]
    exact = torch.log(p / (1 - p))
    assert float((log_odds(z, y) - exact).abs().max()) < 1e-9
    assert float((reference_log_odds(z, y) - exact).abs().max()) < 1e-6  # eps moves it < 1e-7


# -------------------------------------------------------------- round trip
@pytest.mark.parametrize(
    "cfg",
    [
        InteractionConfig(),
        InteractionConfig.reference(),
        InteractionConfig(
            method="single",
            solver=SolverConfig("pdhg", iterations=123, dtype=torch.float64, gap_tol=0.0),
            gamma_scale=(1.0, 2.5),
            salient_count=7,
            threshold=0.3,
            batch_size=64,
        ),
    ],
)
def test_config_round_trip(cfg: InteractionConfig) -> None:
    data = json.loads(json.dumps(cfg.to_dict()))
    back = InteractionConfig.from_dict(data)
    assert back == cfg
    assert back.to_dict() == cfg.to_dict()


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="unknown InteractionConfig fields \\['top_k'\\]"):
        InteractionConfig.from_dict({"top_k": 3})
    with pytest.raises(ValueError, match="salient_fraction"):
        InteractionConfig(salient_fraction=5)
    with pytest.raises(ValueError, match="salient_count"):
        InteractionConfig(salient_count=0)
    with pytest.raises(ValueError, match="unknown solver 'newton'"):
        InteractionConfig(solver="newton")
    with pytest.raises(ValueError, match="weighting"):
        InteractionConfig().replace(weighting="both")
    with pytest.raises(TypeError, match="unknown setting\\(s\\) \\['iters'\\]"):
        InteractionConfig().replace(iters=3)


def test_config_object_and_keyword_overrides_agree() -> None:
    values = _random_values(3, 2, 0)
    ip = InteractionPrimitives([lambda x: x] * 2)
    cfg = InteractionConfig(alpha=0.3, weighting="code", noise_bound=0.05)
    a = ip.extract(values, cfg, progress=False)
    b = ip.extract(values, alpha=0.3, weighting="code", noise_bound=0.05, progress=False)
    assert torch.equal(a.loss, b.loss) and a.config == b.config == cfg
    v, q = a.values[0].numpy(), a.noise_bound[0].numpy()
    p = 0.5 * np.abs(v[:, -1] - v[:, 0])
    exact = _exact_optimum(v, q, p, alpha=0.3, w=0.7)
    assert abs(float(a.loss[0]) - exact) < 1e-6 * (1 + exact)


# ------------------------------------------------------------ listing API
def _known_game(x: torch.Tensor) -> torch.Tensor:
    """v = 2 x0 x1 + max(x2, x3)."""
    return 2.0 * x[:, 0] * x[:, 1] + torch.maximum(x[:, 2], x[:, 3])


def test_listing_names_players_by_index_or_by_name() -> None:
    ip = InteractionPrimitives(_known_game, value="logit")
    kwargs = dict(baselines=0.0, feature_mask=torch.arange(4), noise_bound=0.0, progress=False)
    res = ip.attribute(torch.ones(1, 4), **kwargs)
    top = res.top("and", 1)
    assert [str(i) for i in top] == ["AND {0, 1}: +2"]
    assert [str(i) for i in res.top("or", 3)] == ["OR {2, 3}: +1"]  # zeros are left out
    named = ip.attribute(torch.ones(1, 4), player_names=["age", "bmi", "bp", "hr"], **kwargs)
    assert named.top("and", 1)[0].players == ("age", "bmi")
    assert named.top("or", 1)[0].players == ("bp", "hr")
    assert named.subset_of(["bp", "hr"]) == named.top("or", 1)[0].subset == 0b1100
    with pytest.raises(ValueError, match="kind"):
        res.top("xor", 1)
    with pytest.raises(ValueError, match="positive int"):
        res.top("and", 0)


def test_top_k_is_gone_with_a_clear_path() -> None:
    ip = InteractionPrimitives(_known_game, value="logit")
    kwargs = dict(baselines=0.0, feature_mask=torch.arange(4), progress=False)
    with pytest.warns(DeprecationWarning, match="salient_fraction"):
        res = ip.attribute(torch.ones(1, 4), top_k=0.2, **kwargs)
    assert res.salient_fraction == 0.2 and res.salient_count is None
    assert int(res.salient("and").sum(-1).max()) <= math.ceil(0.2 * 15)
    with pytest.warns(DeprecationWarning):
        counted = ip.attribute(torch.ones(1, 4), top_k=1, **kwargs)
    assert counted.salient_count == 1 and int(counted.salient("and").sum()) == 1
    with pytest.raises(AttributeError, match=r"res\.top\(kind, k\)"):
        res.top_k(3)
    with pytest.raises(TypeError, match="unknown setting"):
        ip.attribute(torch.ones(1, 4), topk=3, **kwargs)
