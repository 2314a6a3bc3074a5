"""The decomposition problem shared by every solver: settings, data, objective.

:class:`Problem` (a batch of ``v(x_T)`` with its noise and γ bounds), :class:`Solution`
(the optimised γ and ε), :class:`SolverConfig`, and the objective of Eq. (4) / Eq. (6)
of Chen et al. (ICLR 2024) that :mod:`.optimize`, :mod:`.pdhg` and :mod:`.exact` all
evaluate. A module of its own so that the solvers import it, not each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from captum_chains.interactions.transforms import and_interactions, or_interactions

SOLVERS = ("auto", "pdhg", "adam", "sgd", "lp")
WEIGHTINGS = ("paper", "code")


@dataclass(frozen=True)
class SolverConfig:
    """Settings of the γ/ε optimisation.

    Attributes
    ----------
    method : {"auto", "pdhg", "adam", "sgd", "lp"}
        See :mod:`captum_chains.interactions.optimize`; ``"auto"`` is resolved by
        :func:`~captum_chains.interactions.optimize.choose_solver`.
    iterations : int, optional
        Default 10 000 for PDHG, 3000 for Adam, 20 000 for SGD (the reference's count).
    lr : float, optional
        Adam: initial learning rate in normalised units (default 1e-2). SGD: the
        reference's raw learning rate (default 1e-6; the code uses 1e-7 .. 1e-5).
    omega : float
        PDHG: balance of primal and dual step sizes (``τ = ω / colsum``,
        ``σ = 1 / (ω rowsum)``); 0.03 works from ``n = 4`` to ``n = 12``.
    min_lr_factor : float
        Adam: cosine schedule from ``lr`` to ``lr * min_lr_factor``.
    dtype : torch.dtype
        Precision of the first-order iterations. Interactions are always recomputed
        in float64 from the final ``γ, ε``, so universal matching holds to ~1e-12.
    check_every : int
        PDHG/Adam keep, per sample, the best iterate seen at these checkpoints.
    tol, patience : float, int
        PDHG stops early once no sample's best loss improved by more than ``tol``
        (relative) over the last ``patience`` steps; ``tol=0`` runs all iterations.
    gap_tol : float
        PDHG stops once every sample's loss is certified (by weak duality) within
        ``gap_tol`` of the optimum; 0 disables the test.
    time_limit : float or None
        LP: give up (``RuntimeError``) after this many seconds per problem.
    """

    method: str = "auto"
    iterations: int | None = None
    lr: float | None = None
    omega: float = 0.03
    min_lr_factor: float = 1e-3
    dtype: torch.dtype = torch.float32
    check_every: int = 50
    tol: float = 1e-4
    patience: int = 2000
    gap_tol: float = 1e-3
    time_limit: float | None = None

    def __post_init__(self) -> None:
        if self.method not in SOLVERS:
            raise ValueError(f"unknown solver {self.method!r}; use one of {SOLVERS}")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.omega > 0:
            raise ValueError(f"omega must be > 0, got {self.omega}")


@dataclass(frozen=True)
class Problem:
    """One batch of decomposition problems.

    Attributes
    ----------
    values : torch.Tensor
        ``[B, m, 2**n]`` float64 ``v(x_T)``.
    noise_bound : torch.Tensor
        ``[B, m]`` bound ``q`` on ``|ε_T|``.
    gamma_bound : torch.Tensor or None
        ``[m]`` bound ``p`` on ``|γ̂_T|`` (shared objective only).
    shared : bool
        Eq. (6) when True, Eq. (4) per model otherwise.
    alpha : float
        Weight of the sum term in Eq. (6).
    weighting : {"paper", "code"}
        ``max + α sum`` (paper) or ``(1 - α) max + α sum`` (reference code).
    """

    values: torch.Tensor
    noise_bound: torch.Tensor
    gamma_bound: torch.Tensor | None
    shared: bool
    alpha: float = 0.1
    weighting: str = "paper"

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; use one of {WEIGHTINGS}")
        if not 0.0 <= self.alpha:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.shared and self.gamma_bound is None:
            raise ValueError("the shared objective needs gamma_bound")


@dataclass
class Solution:
    """Optimised decomposition parameters (raw units, float64)."""

    gamma: torch.Tensor  # [B, m, 2**n]
    noise: torch.Tensor  # [B, m, 2**n]
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0
    lower_bound: torch.Tensor | None = None  # [B], a certified bound on the optimum
    method: str = ""


def decompose(
    values: torch.Tensor, gamma: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(I_and, I_or)`` of ``v_and = 0.5 (v + ε) + γ`` and ``v_or = 0.5 (v + ε) - γ``."""
    half = 0.5 * (values + noise)
    return and_interactions(half + gamma), or_interactions(half - gamma)


def objective(
    i_and: torch.Tensor,
    i_or: torch.Tensor,
    shared: bool,
    alpha: float = 0.1,
    weighting: str = "paper",
) -> torch.Tensor:
    """Loss per sample ``[B]`` for interactions ``[B, m, 2**n]``: Eq. (4) or Eq. (6).

    Eq. (4) summed over models when ``shared`` is False.
    """
    if not shared:
        return i_and.abs().sum((-1, -2)) + i_or.abs().sum((-1, -2))
    out = i_and.new_zeros(i_and.shape[0])
    w_max = 1.0 if weighting == "paper" else 1.0 - alpha
    for inter in (i_and, i_or):
        mag = inter.abs()
        out = out + w_max * mag.amax(dim=1).sum(-1) + alpha * mag.sum((-1, -2))
    return out


def problem_loss(problem: Problem, gamma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Objective of ``problem`` at ``(γ, ε)``, per sample, in raw units."""
    i_and, i_or = decompose(problem.values, gamma, noise)
    return objective(i_and, i_or, problem.shared, problem.alpha, problem.weighting)


def normalisation(values: torch.Tensor) -> torch.Tensor:
    """Per-sample unit: mean ``|v(x_T) - v(x_∅)|`` over subsets and models, ``[B]``."""
    spread = (values - values[..., :1]).abs().mean(dim=(1, 2))
    return torch.where(spread > 1e-12, spread, torch.ones_like(spread))


__all__ = [
    "SOLVERS",
    "WEIGHTINGS",
    "Problem",
    "Solution",
    "SolverConfig",
    "decompose",
    "normalisation",
    "objective",
    "problem_loss",
]
