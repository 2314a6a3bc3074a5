"""``InteractionConfig``: every setting of an AND-OR interaction extraction in one typed object.

Defaults are the paper's (Chen et al., ICLR 2024): log-odds of the target class minus
``v(x_∅)``, noise ``|ε_T| <= 0.02 |v(x_N) - v(x_∅)|``, ``|γ̂^(i)_T| <= 0.5
E_x |v^(i)(x_N) - v^(i)(x_∅)|``, Eq. (6) weighted ``max + α sum`` with ``α = 0.1``, and the
optimum found by the fastest solver that is exact enough at the problem's size
(``solver="auto"``, see :func:`~captum_chains.interactions.optimize.choose_solver`).
:meth:`InteractionConfig.reference` reproduces the authors' released code instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from captum_chains.interactions.problem import SOLVERS, WEIGHTINGS, SolverConfig

METHODS = ("shared", "single")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16}


@dataclass(frozen=True)
class InteractionConfig:
    """Settings of :meth:`InteractionPrimitives.attribute` (Chen et al., ICLR 2024).

    Attributes
    ----------
    method : {"shared", "single"} or None
        Eq. (6) jointly across models or Eq. (4) per model; None: shared for ``m >= 2``.
    value : str or None
        Overrides the value function given to :class:`InteractionPrimitives` by name
        (``"log_odds"``, ``"reference_log_odds"``, ``"logit"``, ...); None keeps it.
    alpha : float
        Weight of the sum term in Eq. (6).
    weighting : {"paper", "code"}
        ``max + α sum`` (the paper's Eq. 6) or ``(1 - α) max + α sum`` (the authors' code).
    noise_bound : float
        ``|ε_T| <= noise_bound * |v(x_N) - v(x_∅)|``.
    gamma_bound : float
        ``|γ̂^(i)_T| <= gamma_bound * E_x |v^(i)(x_N) - v^(i)(x_∅)|`` (shared method).
    gamma_scale : float, tuple of float, or None
        Replaces that expectation (one value, or one per model) so that a sample's result
        does not depend on the rest of the batch; None: the mean over the batch.
    subtract_empty : bool
        Decompose ``v(x_T) - v(x_∅)`` (the authors' ``gt-log-odds-v0``).
    solver : str or SolverConfig
        ``"auto"`` (the fastest solver measured within 0.1 % of the exact optimum at this
        size), ``"lp"``, ``"pdhg"``, ``"adam"``, ``"sgd"``, or a :class:`SolverConfig`.
    salient_fraction : float
        Size of the salient sets ``Ω^(i)``: this fraction of the ``2**n - 1`` non-empty
        subsets (at least one), by ``|I(S)|``.
    salient_count : int or None
        Size of ``Ω^(i)`` as a count; overrides ``salient_fraction`` when set.
    threshold : float or None
        ``Ω^(i) = {S : |I(S)| > threshold}``; overrides both sizes when set.
    merge_low_order : bool
        Merge OR into AND interactions for ``|S| <= 1`` in the statistics (the code does).
    batch_size : int or None
        Masked inputs per forward pass; None: derived from ``memory_budget_mb``.
    memory_budget_mb : float
        Bound for the ``2**n`` values and the optimisation state, checked before any
        forward pass, and for one chunk of masked inputs.
    max_players : int
        Refuse larger ``n`` (``2**n`` forward passes per input and model).

    Examples
    --------
    >>> cfg = InteractionConfig(salient_fraction=0.1)
    >>> InteractionConfig.from_dict(cfg.to_dict()) == cfg
    True
    >>> InteractionConfig.reference().weighting
    'code'
    """

    method: str | None = None
    value: str | None = None
    alpha: float = 0.1
    weighting: str = "paper"
    noise_bound: float = 0.02
    gamma_bound: float = 0.5
    gamma_scale: float | tuple[float, ...] | None = None
    subtract_empty: bool = True
    solver: str | SolverConfig = "auto"
    salient_fraction: float = 0.05
    salient_count: int | None = None
    threshold: float | None = None
    merge_low_order: bool = True
    batch_size: int | None = None
    memory_budget_mb: float = 1024.0
    max_players: int = 16

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS} or None, got {self.method!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if not self.noise_bound >= 0 or not self.gamma_bound >= 0:
            raise ValueError(
                f"noise_bound and gamma_bound must be >= 0, got {self.noise_bound}, "
                f"{self.gamma_bound}"
            )
        if isinstance(self.solver, str) and self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; use one of {SOLVERS}")
        if not isinstance(self.solver, str | SolverConfig):
            raise TypeError(f"solver must be a str or SolverConfig, got {type(self.solver)}")
        if not 0.0 < self.salient_fraction <= 1.0:
            raise ValueError(
                f"salient_fraction must be in (0, 1], got {self.salient_fraction}; pass a "
                "count as salient_count"
            )
        if self.salient_count is not None and (
            isinstance(self.salient_count, bool)
            or int(self.salient_count) != self.salient_count
            or self.salient_count < 1
        ):
            raise ValueError(f"salient_count must be a positive int, got {self.salient_count}")
        if isinstance(self.gamma_scale, list):
            object.__setattr__(self, "gamma_scale", tuple(self.gamma_scale))
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size}")
        if not self.memory_budget_mb > 0 or self.max_players < 1:
            raise ValueError("memory_budget_mb must be > 0 and max_players >= 1")

    # ------------------------------------------------------------- presets
    @classmethod
    def paper(cls, **changes: Any) -> InteractionConfig:
        """The paper's settings (the defaults), with ``changes`` applied."""
        return cls(**changes)

    @classmethod
    def reference(cls, **changes: Any) -> InteractionConfig:
        """The authors' released code, reproduced: their objective and their optimiser.

        * Eq. (6) weighted ``(1 - α) max + α sum`` (``weighting="code"``);
        * ``γ̂`` bounded by ``0.5`` times the batch mean of ``|v^(i)(x_N) - v^(i)(x_∅)|``
          (their ``p``), noise by ``0.02 |v(x_N) - v(x_∅)|`` (their ``q``);
        * their log-odds ``z_y - max_{c≠y} z_c - log(Σ_{c≠y} exp(z_c - max) + 1e-7)``
          (``value="reference_log_odds"``) minus ``v(x_∅)``;
        * their optimiser: SGD with momentum 0.9 from zero, 20 000 steps
          (``SolverConfig("sgd")``), which stops far from the optimum (see the docs).
        """
        base: dict[str, Any] = {
            "value": "reference_log_odds",
            "weighting": "code",
            "solver": SolverConfig("sgd"),
            "noise_bound": 0.02,
            "gamma_bound": 0.5,
            "gamma_scale": None,
            "subtract_empty": True,
            "merge_low_order": True,
        }
        base.update(changes)
        return cls(**base)

    def replace(self, **changes: Any) -> InteractionConfig:
        """A copy with ``changes`` (field names), validated; unknown names raise."""
        return dataclasses.replace(self, **normalise_overrides(changes))

    # ---------------------------------------------------------- round trip
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (a :class:`SolverConfig` becomes a nested dict)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            val = getattr(self, f.name)
            if isinstance(val, SolverConfig):
                val = {k: getattr(val, k) for k in (g.name for g in dataclasses.fields(val))}
                val["dtype"] = str(val["dtype"]).removeprefix("torch.")
            elif isinstance(val, tuple):
                val = list(val)
            out[f.name] = val
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InteractionConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise a ``ValueError`` naming them."""
        data = dict(data)
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown InteractionConfig fields {unknown}")
        solver = data.get("solver")
        if isinstance(solver, dict):
            solver = dict(solver)
            if isinstance(solver.get("dtype"), str):
                solver["dtype"] = _DTYPES[solver["dtype"]]
            data["solver"] = SolverConfig(**solver)
        return cls(**data)


def normalise_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Map keyword overrides to :class:`InteractionConfig` fields.

    ``top_k`` (a count or a fraction, before 0.3) becomes ``salient_count`` or
    ``salient_fraction`` with a ``DeprecationWarning``; any other unknown name raises a
    ``TypeError`` that lists the valid ones.
    """
    import warnings

    names = {f.name for f in dataclasses.fields(InteractionConfig)}
    out = dict(overrides)
    if "top_k" in out:
        top_k = out.pop("top_k")
        warnings.warn(
            "top_k is deprecated: pass salient_fraction=<float in (0, 1]> or "
            "salient_count=<int>; res.top(kind, k) lists the k strongest interactions",
            DeprecationWarning,
            stacklevel=3,
        )
        if isinstance(top_k, float) and 0 < top_k < 1:
            out["salient_fraction"] = top_k
        else:
            out["salient_count"] = int(top_k)
    unknown = sorted(set(out) - names)
    if unknown:
        raise TypeError(f"unknown setting(s) {unknown}; InteractionConfig has {sorted(names)}")
    return out
