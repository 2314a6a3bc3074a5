"""Exact sparsest AND-OR decompositions by linear programming (scipy's HiGHS).

Eq. (4) and Eq. (6) of Chen et al. (ICLR 2024) are linear programs. Written over the
interactions themselves (``x = I_and``, ``y = I_or``) with universal matching as the
equality constraint,

``Z x + B y = v + ε``,  ``|ε| <= q``,

where ``Z[T, S] = [S ⊆ T]`` and ``(B y)(T) = y_∅ + sum_{S ≠ ∅} y_S - sum_{∅ ≠ S ⊆ N \\ T} y_S``
(an auxiliary variable carries ``sum y_S``, so both blocks stay sparse with ``3**n``
non-zeros). The decomposition parameter is recovered as ``γ = Z x - 0.5 (v + ε)``.
For Eq. (6), ``γ^(i) - γ̄`` is boxed by ``p`` and epigraph variables ``t_S >= |I^(i)(S)|``
carry the max over models.

This is the ground truth the first-order solvers are measured against, and the
``"auto"`` choice where it is fast enough. Interior-point cost grows about 8x per player
(one CPU thread, ``benchmarks/interactions_solvers.py``).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from captum_chains._utils.progress import tqdm
from captum_chains.interactions.problem import Problem, Solution

_Z_CACHE: dict[int, sp.csc_matrix] = {}


def _zeta_matrix(n: int) -> sp.csc_matrix:
    if n not in _Z_CACHE:
        base = sp.csr_matrix(np.array([[1.0, 0.0], [1.0, 1.0]]))
        out = sp.csr_matrix(np.ones((1, 1)))
        for _ in range(n):
            out = sp.kron(base, out, format="csr")
        _Z_CACHE[n] = out.tocsc()
    return _Z_CACHE[n]


def _blocks(n: int) -> tuple[sp.csc_matrix, sp.csc_matrix]:
    """``Z`` and the OR synthesis block ``[1 | -P Z[:, 1:]]`` (``P``: complement)."""
    size = 1 << n
    z = _zeta_matrix(n)
    pz = z[np.arange(size)[::-1], :][:, 1:]
    ones = sp.csc_matrix(np.ones((size, 1)))
    return z, sp.hstack([ones, -pz], format="csc")


def _linprog(c, a_ub, b_ub, a_eq, b_eq, bounds, time_limit: float | None = None) -> np.ndarray:
    from scipy.optimize import linprog

    options = {} if time_limit is None else {"time_limit": float(time_limit)}
    res = linprog(
        c,
        A_ub=a_ub,
        b_ub=b_ub,
        A_eq=a_eq,
        b_eq=b_eq,
        bounds=bounds,
        method="highs-ipm",
        options=options,
    )
    if res.status != 0:
        raise RuntimeError(f"the linear program did not solve: {res.message}")
    return res.x


def _single(
    v: np.ndarray, q: float, time_limit: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Eq. (4) for one value vector; returns ``(γ, ε)``."""
    size = len(v)
    n = size.bit_length() - 1
    z, b = _blocks(n)
    eye = sp.identity(size, format="csc")
    one = sp.csc_matrix(np.ones((size, 1)))
    # variables: x+ x- y+ y- (size each), ε (size), s (1) with s = sum_{S≠∅} y_S
    match = sp.hstack([z, -z, b, -b, -eye, one], format="csc")
    ysum = np.concatenate([[0.0], np.ones(size - 1)])
    row = np.concatenate([np.zeros(2 * size), ysum, -ysum, np.zeros(size), [-1.0]])
    a_eq = sp.vstack([match, sp.csr_matrix(row[None, :])], format="csc")
    b_eq = np.concatenate([v, [0.0]])
    c = np.concatenate([np.ones(4 * size), np.zeros(size + 1)])
    bounds = [(0, None)] * (4 * size) + [(-q, q)] * size + [(None, None)]
    sol = _linprog(c, None, None, a_eq, b_eq, bounds, time_limit)
    x = sol[:size] - sol[size : 2 * size]
    eps = sol[4 * size : 5 * size]
    gamma = z @ x - 0.5 * (v + eps)
    return gamma, eps


def _shared(
    v: np.ndarray,
    q: np.ndarray,
    p: np.ndarray,
    alpha: float,
    w_max: float,
    time_limit: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Eq. (6) for ``[m, size]`` values; returns ``(γ [m, size], ε [m, size])``."""
    m, size = v.shape
    n = size.bit_length() - 1
    z, b = _blocks(n)
    eye = sp.identity(size, format="csc")
    one = sp.csc_matrix(np.ones((size, 1)))
    # per model: x+ x- y+ y- ε ĝ (size each) and s (1); then ḡ, t_and, t_or (size each)
    per = 6 * size + 1
    total = m * per + 3 * size
    g_bar = m * per
    t_and, t_or = g_bar + size, g_bar + 2 * size
    eq_rows, eq_rhs, ub_rows = [], [], []

    def place(blocks: list[tuple[int, sp.spmatrix]], rows: int) -> sp.csc_matrix:
        parts, col = [], 0
        for start, mat in sorted(blocks, key=lambda t: t[0]):
            if start > col:
                parts.append(sp.csc_matrix((rows, start - col)))
            parts.append(sp.csc_matrix(mat))
            col = start + mat.shape[1]
        if col < total:
            parts.append(sp.csc_matrix((rows, total - col)))
        return sp.hstack(parts, format="csc")

    for i in range(m):
        o = i * per
        xp, xn, yp, yn, ep, gh = (o + k * size for k in range(6))
        s = o + 6 * size
        eq_rows.append(place([(xp, z), (xn, -z), (yp, b), (yn, -b), (ep, -eye), (s, one)], size))
        eq_rhs.append(v[i])
        ysum = sp.csr_matrix(np.concatenate([[0.0], np.ones(size - 1)])[None, :])
        eq_rows.append(place([(yp, ysum), (yn, -ysum), (s, sp.csr_matrix([[-1.0]]))], 1))
        eq_rhs.append([0.0])
        eq_rows.append(
            place([(xp, z), (xn, -z), (ep, -0.5 * eye), (gh, -eye), (g_bar, -eye)], size)
        )
        eq_rhs.append(0.5 * v[i])
        ub_rows.append(place([(xp, eye), (xn, eye), (t_and, -eye)], size))
        ub_rows.append(place([(yp, eye), (yn, eye), (t_or, -eye)], size))
    c = np.zeros(total)
    bounds: list[tuple[float | None, float | None]] = []
    for i in range(m):
        c[i * per : i * per + 4 * size] = alpha
        bounds += [(0, None)] * (4 * size) + [(-q[i], q[i])] * size + [(-p[i], p[i])] * size
        bounds += [(None, None)]
    c[t_and:] = w_max
    bounds += [(None, None)] * size + [(0, None)] * (2 * size)
    a_eq = sp.vstack(eq_rows, format="csc")
    a_ub = sp.vstack(ub_rows, format="csc")
    rhs = np.concatenate(eq_rhs)
    sol = _linprog(c, a_ub, np.zeros(a_ub.shape[0]), a_eq, rhs, bounds, time_limit)
    gammas, noises = [], []
    for i in range(m):
        o = i * per
        x = sol[o : o + size] - sol[o + size : o + 2 * size]
        eps = sol[o + 4 * size : o + 5 * size]
        gammas.append(z @ x - 0.5 * (v[i] + eps))
        noises.append(eps)
    return np.stack(gammas), np.stack(noises)


def solve_lp(problem: Problem, progress: bool = True, time_limit: float | None = None) -> Solution:
    """Exact optimum of ``problem`` (one LP per sample, or per sample and model).

    ``time_limit`` (seconds per LP) makes HiGHS give up with a ``RuntimeError``.
    """
    v = problem.values.detach().cpu().double().numpy()
    q = problem.noise_bound.detach().cpu().double().numpy()
    batch, m, _ = v.shape
    gamma = np.zeros_like(v)
    noise = np.zeros_like(v)
    w_max = 1.0 if problem.weighting == "paper" else 1.0 - problem.alpha
    jobs = (
        [(b, None) for b in range(batch)]
        if problem.shared
        else [(b, i) for b in range(batch) for i in range(m)]
    )
    for b, i in tqdm(jobs, desc="γ/ε (lp)", disable=not progress, leave=False):
        if i is None:
            assert problem.gamma_bound is not None
            p = problem.gamma_bound.detach().cpu().double().numpy()
            gamma[b], noise[b] = _shared(v[b], q[b], p, problem.alpha, w_max, time_limit)
        else:
            gamma[b, i], noise[b, i] = _single(v[b, i], float(q[b, i]), time_limit)
    dev = problem.values.device
    return Solution(gamma=torch.from_numpy(gamma).to(dev), noise=torch.from_numpy(noise).to(dev))
