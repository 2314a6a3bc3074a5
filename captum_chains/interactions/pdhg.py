"""Preconditioned primal-dual (PDHG) solver for Eq. (4) and Eq. (6) of Chen et al. (2024).

Both objectives are linear programs. Written over the AND interactions ``a^(i)`` of each
model (free), the noise ``ε^(i)`` (boxed) and, for Eq. (6), the shared part ``γ̄``:

* ``y1_i = a_i``                              — AND interactions,
* ``y2_i = R(v_i + ε_i - Z a_i)``            — OR interactions (``R``: Eq. 2, ``Z``: zeta),
* ``y3_i = Z a_i - 0.5 (v_i + ε_i) - γ̄``     — must lie in ``[-p_i, p_i]`` (Eq. 6 only),

the problem is ``min h(K z + c)`` with ``h`` the L1 norm (Eq. 4) or
``sum_S [w max_i |.| + α sum_i |.|]`` plus the box indicator on ``y3`` (Eq. 6). This is
solved with the primal-dual hybrid gradient method of Chambolle & Pock (2011) with their
diagonal preconditioning (step sizes ``τ_j = ω / sum_i |K_ij|`` and
``σ_i = 1 / (ω sum_j |K_ij|)``; the row and column sums of ``|K|`` have closed forms,
e.g. column ``S`` of ``|R Z|`` sums to ``2**|S| - 1``). Every step costs a few butterfly
transforms, ``O(m n 2**n)``, for all samples and models at once. The max term is
handled by giving it its own copy of the rows (its conjugate's prox is a projection on
an L1 ball over models), the sum term by another copy (a clip).

Iterates of ``a, ε`` are always feasible for Eq. (4); for Eq. (6) the box on
``γ^(i) - γ̄`` is enforced by clipping at every checkpoint, where the best feasible
iterate per sample is kept.

**Certified gap.** At every checkpoint the dual iterate is made feasible (by scaling,
see :func:`dual_bound`) and its dual objective is a lower bound on the optimum (weak LP
duality). The solver stops once every sample's best primal loss is within
``gap_tol`` (relative) of its best lower bound, and reports that bound, so a result
carries a proof of how far it can be from the exact optimum.
"""

from __future__ import annotations

import math

import torch

from captum_chains._utils.progress import tqdm
from captum_chains.interactions.problem import (
    Problem,
    Solution,
    SolverConfig,
    normalisation,
    objective,
)
from captum_chains.interactions.transforms import (
    and_interactions,
    or_interactions,
    or_interactions_adjoint,
    popcount,
    superset_zeta,
    zeta,
)


def _abs_sums(n: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Row/column sums of ``|Z|``, ``|R|`` and ``|R Z|`` (closed forms, checked in tests)."""
    pc = popcount(n, device=device).to(dtype)
    nonempty = pc > 0
    one = torch.ones_like(pc)
    col_r = 2.0**pc
    col_r[-1] -= 1.0  # T = N: every non-empty S contains N \ T = ∅
    col_r[0] += 1.0  # T = ∅: the row of I_or(∅) = v_or(x_∅)
    return {
        "z_row": 2.0**pc,
        "z_col": 2.0 ** (n - pc),
        "r_row": torch.where(nonempty, 2.0**pc, one),
        "r_col": col_r,
        "rz_row": torch.where(nonempty, 2.0 ** (n - pc), one),
        "rz_col": torch.where(nonempty, 2.0**pc - 1.0, one),
    }


def project_l1_ball(u: torch.Tensor, radius: float, dim: int) -> torch.Tensor:
    """Euclidean projection of every slice along ``dim`` onto ``{x : ||x||_1 <= radius}``.

    Duchi et al. (2008): sort magnitudes, find the soft threshold ``θ`` with
    ``sum_i max(|u_i| - θ, 0) = radius``.
    """
    mag = u.abs()
    inside = mag.sum(dim, keepdim=True) <= radius
    srt = mag.sort(dim, descending=True).values
    excess = srt.cumsum(dim) - radius
    shape = [1] * u.dim()
    shape[dim] = u.shape[dim]
    k = torch.arange(1, u.shape[dim] + 1, device=u.device, dtype=u.dtype).view(shape)
    count = (srt - excess / k > 0).sum(dim, keepdim=True).clamp_min(1)
    theta = excess.gather(dim, count - 1) / count.to(u.dtype)
    out = u.sign() * (mag - theta).clamp_min(0.0)
    return torch.where(inside, u, out)


def _soft(u: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    return u.sign() * (u.abs() - thr).clamp_min(0.0)


def _max_feasible_scale(
    need: torch.Tensor, w_max: float, alpha: float, shared: bool, iters: int = 40
) -> torch.Tensor:
    """Largest ``s <= 1`` per sample with ``s * need`` splittable into the dual boxes.

    Single model: ``|s need| <= 1``. Shared: per subset, ``sum_i (s |need_i| - α)_+ <= w``
    (the max part takes what exceeds the sum part's box ``α``); monotone in ``s``, so it
    is found by bisection.
    """
    mag = need.abs()
    if not shared:  # one scale per sample and model: the models' problems are separate
        return 1.0 / mag.amax(-1).clamp_min(1.0)

    def ok(s: torch.Tensor) -> torch.Tensor:
        excess = (s[:, None, None] * mag - alpha).clamp_min(0.0).sum(1)  # [B, 2**n]
        return (excess <= w_max * (1.0 + 1e-9)).all(-1)

    one = torch.ones(mag.shape[0], dtype=mag.dtype, device=mag.device)
    lo, hi = torch.zeros_like(one), one.clone()
    done = ok(one)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        good = ok(mid)
        lo, hi = torch.where(good, mid, lo), torch.where(good, hi, mid)
    return torch.where(done, one, lo)


def dual_bound(
    v: torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor,
    u2: torch.Tensor,
    u3: torch.Tensor | None,
    w_max: float,
    alpha: float,
) -> torch.Tensor:
    """Lower bound ``[B]`` on the optimum from a dual iterate (weak duality).

    Eq. (4): for ``|u2| <= 1`` and ``|Z^T R^T u2| <= 1`` (the dual of the AND block, which
    must equal it),
    ``D(u2) = <u2, R v> - q ||R^T u2||_1 <= min ||I_and||_1 + ||I_or||_1``.

    Eq. (6): with ``U2`` the summed OR duals (max part in an L1 ball of radius ``w`` over
    models, sum part in ``[-α, α]``), ``u3`` the dual of the ``γ̂`` box, shifted to
    ``sum_i u3_i = 0`` (the dual of the free ``γ̄``), and the AND duals
    ``U1 = Z^T (R^T U2 - u3)`` split into the two boxes,
    ``D = <U2, R v> - ½ <u3, v> - p ||u3||_1 - q ||R^T U2 - ½ u3||_1``.

    ``D`` is positively homogeneous, so an infeasible ``U1`` is repaired by scaling the
    whole dual point by the largest feasible factor.
    """
    rt = or_interactions_adjoint(u2)
    if u3 is not None:  # Eq. (6)
        u3 = u3 - u3.mean(dim=1, keepdim=True)
        eps_dual = rt - 0.5 * u3
        need = superset_zeta(rt - u3)
        value = (u2 * or_interactions(v)).sum((1, 2)) - 0.5 * (u3 * v).sum((1, 2))
        value = value - (p * u3.abs()).sum((1, 2))
        value = value - (q * eps_dual.abs()).sum((1, 2))
        return _max_feasible_scale(need, w_max, alpha, True) * value
    need = superset_zeta(rt)
    value = (u2 * or_interactions(v)).sum(-1) - (q * rt.abs()).sum(-1)  # [B, m]
    return (_max_feasible_scale(need, w_max, alpha, False) * value).sum(1)


def _loss(half: torch.Tensor, gamma: torch.Tensor, problem: Problem) -> torch.Tensor:
    return objective(
        and_interactions(half + gamma),
        or_interactions(half - gamma),
        problem.shared,
        problem.alpha,
        problem.weighting,
    )


def solve_pdhg(problem: Problem, config: SolverConfig, progress: bool = True) -> Solution:
    """Run preconditioned PDHG on ``problem``; returns the best feasible iterate found."""
    iters = config.iterations or 10_000
    omega = config.omega
    dt = config.dtype
    scale = normalisation(problem.values)  # [B]
    v = (problem.values / scale[:, None, None]).to(dt)
    q = (problem.noise_bound / scale[:, None]).to(dt).unsqueeze(-1)
    batch, m, size = v.shape
    n = size.bit_length() - 1
    shared = problem.shared
    p = torch.zeros_like(q)  # bound on |γ̂| (Eq. 6 only)
    if shared:
        assert problem.gamma_bound is not None
        p = (problem.gamma_bound.to(v.device)[None, :] / scale[:, None]).to(dt).unsqueeze(-1)
    w_max = 1.0 if problem.weighting == "paper" else 1.0 - problem.alpha
    alpha = problem.alpha

    s = _abs_sums(n, dt, v.device)
    dup = 2.0 if shared else 1.0
    col_a = dup * (1.0 + s["rz_col"]) + (s["z_col"] if shared else 0.0)
    col_e = dup * s["r_col"] + (0.5 if shared else 0.0)
    tau_a, tau_e, tau_g = omega / col_a, omega / col_e, omega / max(m, 1)
    sig1 = 1.0 / omega  # rows of y1 have a single unit entry
    sig2 = 1.0 / (omega * (s["rz_row"] + s["r_row"]))
    sig3 = 1.0 / (omega * (s["z_row"] + 1.5))

    a = torch.zeros_like(v)
    e = torch.zeros_like(v)
    g = torch.zeros(batch, 1, size, dtype=dt, device=v.device)
    c2 = or_interactions(v)
    u1, u2 = torch.zeros_like(v), torch.zeros_like(v)  # L1 (single) or max part (shared)
    u1s, u2s, u3 = torch.zeros_like(v), torch.zeros_like(v), torch.zeros_like(v)

    best = torch.full((batch,), math.inf, dtype=dt, device=v.device)
    lower = torch.full((batch,), -math.inf, dtype=dt, device=v.device)
    window = max(1, config.patience // config.check_every)
    trail: list[torch.Tensor] = []
    best_gamma, best_noise = torch.zeros_like(v), torch.zeros_like(v)
    history: list[float] = []
    bar = tqdm(range(iters), desc="γ/ε (pdhg)", disable=not progress, leave=False)
    for it in bar:
        # primal step: z <- prox(z - τ K^T u)
        r2 = or_interactions_adjoint(u2 + u2s if shared else u2)
        ka = (u1 + u1s if shared else u1) + superset_zeta((u3 if shared else 0.0) - r2)
        ke = r2 - 0.5 * u3 if shared else r2
        a_new = a - tau_a * ka
        e_new = torch.maximum(torch.minimum(e - tau_e * ke, q), -q)
        a_bar, e_bar = 2.0 * a_new - a, 2.0 * e_new - e
        a, e = a_new, e_new
        if shared:
            g_new = g + tau_g * u3.sum(dim=1, keepdim=True)
            g_bar, g = 2.0 * g_new - g, g_new
        # dual step: u <- prox_{σ h*}(u + σ (K z_bar + c))
        za = zeta(a_bar)
        y2 = or_interactions(e_bar - za) + c2
        if not shared:
            u1 = (u1 + sig1 * a_bar).clamp(-1.0, 1.0)
            u2 = (u2 + sig2 * y2).clamp(-1.0, 1.0)
        else:
            u1 = project_l1_ball(u1 + sig1 * a_bar, w_max, dim=1)
            u2 = project_l1_ball(u2 + sig2 * y2, w_max, dim=1)
            u1s = (u1s + sig1 * a_bar).clamp(-alpha, alpha)
            u2s = (u2s + sig2 * y2).clamp(-alpha, alpha)
            y3 = za - 0.5 * (v + e_bar) - g_bar
            u3 = _soft(u3 + sig3 * y3, sig3 * p)
        if it % config.check_every == 0 or it == iters - 1:
            w = v + e
            half = 0.5 * w
            raw = zeta(a) - half
            if not shared:
                gamma = raw
                loss = _loss(half, gamma, problem)
            else:
                # the iterate may leave the γ̂ box: repair it around the shared part γ̄
                # and around the centre of the models' γ, and keep the better per sample
                gamma = g + torch.maximum(torch.minimum(raw - g, p), -p)
                loss = _loss(half, gamma, problem)
                centre = 0.5 * (raw.amax(1, keepdim=True) + raw.amin(1, keepdim=True))
                other = centre + torch.maximum(torch.minimum(raw - centre, p), -p)
                other_loss = _loss(half, other, problem)
                take = other_loss < loss
                gamma = torch.where(take[:, None, None], other, gamma)
                loss = torch.where(take, other_loss, loss)
            better = loss < best
            best = torch.where(better, loss, best)
            sel = better[:, None, None]
            best_gamma = torch.where(sel, gamma, best_gamma)
            best_noise = torch.where(sel, e, best_noise)
            history.append(float((best * scale.to(dt)).mean()))
            bar.set_postfix_str(f"loss={history[-1]:.4g}")
            trail.append(best.clone())
            bound = dual_bound(
                v, q, p, u2 + u2s if shared else u2, u3 if shared else None, w_max, alpha
            )
            lower = torch.maximum(lower, bound)
            if config.gap_tol > 0 and bool((best - lower <= config.gap_tol * best.abs()).all()):
                break  # certified: every sample within gap_tol of the optimum
            if config.tol > 0 and len(trail) > window:
                old = trail.pop(0)
                if bool(((old - best) <= config.tol * best.abs()).all()):
                    break  # no sample improved by more than tol over the last `patience` steps
    sc = scale[:, None, None]
    return Solution(
        gamma=best_gamma.double() * sc,
        noise=best_noise.double() * sc,
        history=history,
        lower_bound=lower.double() * scale,
    )
