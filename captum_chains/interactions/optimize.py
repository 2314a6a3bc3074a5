"""Sparsest AND-OR decomposition of ``v``: the objectives of Chen et al. (ICLR 2024).

Decomposition (Sec. 2): ``v_and(x_T) = 0.5 (v(x_T) + ε_T) + γ_T`` and
``v_or(x_T) = 0.5 (v(x_T) + ε_T) - γ_T`` with a bounded noise term
``|ε_T| <= q = 0.02 |v(x_N) - v(x_∅)|``; ``I_and = Möbius(v_and)``, ``I_or`` from
``v_or`` (see :mod:`.transforms`). Every ``γ`` (``γ_∅`` included, as in the reference
code) gives an exact decomposition of ``v + ε``; the choice of ``γ`` decides sparsity.

* Single model, Eq. (4): ``min_{γ, ε} ||I_and||_1 + ||I_or||_1``.
* Shared across ``m`` models, Eq. (6): ``γ^(i) = γ̄ + γ̂^(i)`` with
  ``|γ̂^(i)_T| <= p = 0.5 E_x |v^(i)(x_N) - v^(i)(x_∅)|`` and
  ``min sum_S max_i |I^(i)(S)| + α sum_i sum_S |I^(i)(S)|`` for AND and OR (the paper's
  weighting). The reference code weights ``(1 - α) max + α sum``
  (``weighting="code"``).

Solvers
-------
``"auto"`` (default)
    The fastest solver measured within 0.1 % of the exact optimum at the problem's size
    (:func:`choose_solver`, from ``benchmarks/interactions_solvers.py``): the exact LP
    while it is fast enough, PDHG above (whose result carries a certified gap).
``"pdhg"``
    Diagonally preconditioned primal-dual hybrid gradient on the linear program
    (:mod:`.pdhg`): cheap steps made of butterfly transforms, batched over samples and
    models, converging to the exact optimum; every checkpoint also yields a certified
    lower bound from the dual iterate, and it stops once the gap is below ``gap_tol``.
``"adam"``
    Projected Adam with a cosine learning-rate schedule, run on all samples and models
    at once in normalised units (``v`` divided by the mean ``|v(x_T) - v(x_∅)|``; the problem is
    positively homogeneous, so this is exact). The free part of ``γ`` is parametrised by
    the AND interactions it induces (``x = Möbius(v_and)``, a linear change of
    variables): a coordinate of ``γ`` touches up to ``2**n`` interactions, a coordinate
    of ``x`` one AND and ``2**|S| - 1`` OR interactions, which conditions the problem
    far better for Adam. ``ε`` and ``γ̂`` are clipped to their boxes after each step.
``"sgd"``
    The reference code's optimiser: SGD with momentum 0.9 on ``γ`` and ``ε`` from zero,
    learning rate decayed log-linearly from ``lr`` to ``lr/10`` (single model) or
    constant (shared), 20 000 iterations, raw units. Kept for comparison.
``"lp"``
    The exact optimum by linear programming (:mod:`.exact`, scipy/HiGHS interior point);
    its cost grows about 8x per player (see :data:`AUTO_RULE`).
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from captum_chains._utils.progress import tqdm
from captum_chains.interactions.problem import (
    Problem,
    Solution,
    SolverConfig,
    decompose,
    normalisation,
    objective,
    problem_loss,
)
from captum_chains.interactions.transforms import and_interactions, or_interactions, zeta

# Largest n at which the exact LP is the fastest solver within 0.1 % of the optimum, per
# objective, measured on one CPU thread by ``benchmarks/interactions_solvers.py --mode
# table`` (``benchmarks/results/interactions_solvers.csv``; table in docs/interactions.md).
# Above it no solver was measured within 0.1 % in reasonable time and PDHG is used (its
# certified gap is reported as ``InteractionResult.lower_bound``). The LP runs on the CPU
# whatever the device, so the CPU thresholds are used on every device (a GPU was not
# available for the measurement).
AUTO_RULE: dict[str, int] = {"single": 12, "shared": 10}


def choose_solver(n: int, shared: bool, device: torch.device | str = "cpu") -> str:
    """The solver ``"auto"`` resolves to for ``n`` players (see :data:`AUTO_RULE`).

    Parameters
    ----------
    n : int
        Number of players (``2**n`` subsets).
    shared : bool
        Eq. (6) across models (True) or Eq. (4) per model.
    device : torch.device or str
        Where the values live; the LP always runs on the CPU, and the thresholds were
        measured on the CPU (see :data:`AUTO_RULE`).

    Returns
    -------
    str
        ``"lp"`` or ``"pdhg"``.
    """
    del device  # one measured table; kept in the signature for a GPU measurement
    return "lp" if n <= AUTO_RULE["shared" if shared else "single"] else "pdhg"


def _solve_adam(problem: Problem, config: SolverConfig, progress: bool) -> Solution:
    iters = config.iterations or 3000
    lr = config.lr or 1e-2
    dt = config.dtype
    scale = normalisation(problem.values)  # [B]
    v = (problem.values / scale[:, None, None]).to(dt)
    q = (problem.noise_bound / scale[:, None]).to(dt).unsqueeze(-1)  # [B, m, 1]
    batch, m, size = v.shape
    x = torch.zeros(batch, 1 if problem.shared else m, size, dtype=dt, device=v.device)
    noise = torch.zeros_like(v)
    params = [x.requires_grad_(), noise.requires_grad_()]
    hat = None
    p = torch.zeros_like(q)  # bound on |γ̂| (Eq. 6 only)
    if problem.shared:
        assert problem.gamma_bound is not None
        p = (problem.gamma_bound.to(v.device)[None, :] / scale[:, None]).to(dt).unsqueeze(-1)
        hat = torch.zeros_like(v).requires_grad_()
        params.append(hat)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, iters, eta_min=lr * config.min_lr_factor
    )

    def v_and_of(x: torch.Tensor, w: torch.Tensor, hat: torch.Tensor | None) -> torch.Tensor:
        base = zeta(x)
        if hat is None:
            return base
        return base + 0.5 * (w - w.mean(dim=1, keepdim=True)) + hat

    best = torch.full((batch,), math.inf, dtype=dt, device=v.device)
    best_gamma = torch.zeros_like(v)
    best_noise = torch.zeros_like(v)
    history: list[float] = []
    bar = tqdm(range(iters), desc="γ/ε (adam)", disable=not progress, leave=False)
    for it in bar:
        w = v + noise
        v_and = v_and_of(x, w, hat)
        loss = objective(
            and_interactions(v_and),
            or_interactions(w - v_and),
            problem.shared,
            problem.alpha,
            problem.weighting,
        )
        if it % config.check_every == 0 or it == iters - 1:
            with torch.no_grad():
                better = loss.detach() < best
                best = torch.where(better, loss.detach(), best)
                sel = better[:, None, None]
                best_gamma = torch.where(sel, (v_and - 0.5 * w).detach(), best_gamma)
                best_noise = torch.where(sel, noise.detach(), best_noise)
            history.append(float((loss.detach() * scale.to(dt)).mean()))
            bar.set_postfix_str(f"loss={history[-1]:.4g}")
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            noise.copy_(torch.maximum(torch.minimum(noise, q), -q))
            if hat is not None:
                hat.copy_(torch.maximum(torch.minimum(hat, p), -p))
    s = scale[:, None, None]
    return Solution(gamma=best_gamma.double() * s, noise=best_noise.double() * s, history=history)


def _solve_sgd(problem: Problem, config: SolverConfig, progress: bool) -> Solution:
    """The reference code's optimiser (SGD, momentum 0.9), on the fast transforms."""
    iters = config.iterations or 20000
    lr = config.lr or 1e-6
    dt = config.dtype
    v = problem.values.to(dt)
    q = problem.noise_bound.to(dt).unsqueeze(-1)
    batch, _, size = v.shape
    noise = torch.zeros_like(v).requires_grad_()
    if problem.shared:
        assert problem.gamma_bound is not None
        p = problem.gamma_bound.to(device=v.device, dtype=dt)[None, :, None]
        g_bar = torch.zeros(batch, 1, size, dtype=dt, device=v.device).requires_grad_()
        g_hat = torch.zeros_like(v).requires_grad_()
        params = [g_bar, g_hat, noise]
        etas = [lr] * iters
    else:
        g_bar = torch.zeros_like(v).requires_grad_()
        g_hat = None
        params = [g_bar, noise]
        etas = torch.logspace(math.log10(lr), math.log10(lr) - 1, iters).tolist()
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    history: list[float] = []
    bar = tqdm(range(iters), desc="γ/ε (sgd)", disable=not progress, leave=False)
    for it in bar:
        with torch.no_grad():
            noise.copy_(torch.maximum(torch.minimum(noise, q), -q))
            if g_hat is not None:
                g_hat.copy_(torch.maximum(torch.minimum(g_hat, p), -p))
        gamma = g_bar if g_hat is None else g_bar + g_hat
        i_and, i_or = decompose(v, gamma, noise)
        loss = objective(i_and, i_or, problem.shared, problem.alpha, problem.weighting)
        if it % config.check_every == 0 or it == iters - 1:
            history.append(float(loss.detach().mean()))
            bar.set_postfix_str(f"loss={history[-1]:.4g}")
        if it + 1 < iters:
            opt.zero_grad(set_to_none=True)
            for group in opt.param_groups:
                group["lr"] = etas[it]
            loss.sum().backward()
            opt.step()
    gamma = g_bar if g_hat is None else g_bar + g_hat
    return Solution(gamma=gamma.detach().double(), noise=noise.detach().double(), history=history)


def solve(problem: Problem, config: SolverConfig | None = None, progress: bool = True) -> Solution:
    """Optimise ``γ`` (and ``ε``) for ``problem`` with the configured solver."""
    config = config or SolverConfig()
    if config.method == "auto":
        n = problem.values.shape[-1].bit_length() - 1
        method = choose_solver(n, problem.shared, problem.values.device)
        config = dataclasses.replace(config, method=method)
    start = time.perf_counter()
    if config.method == "pdhg":
        from captum_chains.interactions.pdhg import solve_pdhg

        sol = solve_pdhg(problem, config, progress)
    elif config.method == "adam":
        sol = _solve_adam(problem, config, progress)
    elif config.method == "sgd":
        sol = _solve_sgd(problem, config, progress)
    else:
        from captum_chains.interactions.exact import solve_lp

        sol = solve_lp(problem, progress=progress, time_limit=config.time_limit)
    # solvers iterate in float32: put ε exactly inside its box in float64
    bound = problem.noise_bound.to(sol.noise)[..., None]
    sol.noise = torch.maximum(torch.minimum(sol.noise, bound), -bound)
    sol.seconds = time.perf_counter() - start
    sol.method = config.method
    if config.method == "lp":  # exact: the optimum is its own bound
        sol.lower_bound = problem_loss(problem, sol.gamma, sol.noise)
    return sol
