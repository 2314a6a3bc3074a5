"""The sparsity-fidelity path of NeuroChains: chains over increasing l1 weights.

:meth:`ChainExtractor.path <captum_chains.ChainExtractor.path>` solves Eq. 8 for an
increasing sequence of lambda, each solve warm-started from the previous one (continuation,
as in ``sklearn.linear_model.lasso_path``). Supports are nested: a unit or gate removed at
one lambda stays removed at every larger one, so the chains along the path shrink
monotonically and each is a sub-network of the one before. :class:`ChainPath` holds the
chain and its fidelity on the region at every point; :class:`FidelityTarget` says which
fidelity a user needs, and :meth:`ChainPath.sparsest` returns the sparsest chain that
meets it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from captum_chains.result import Chain


@dataclass(frozen=True)
class FidelityTarget:
    """The fidelity a chain must keep on its region.

    Attributes
    ----------
    min_agreement : float
        Minimum fraction of the region's inputs on which the sub-network's top-1 class
        equals the model's (or the given target class); 1.0 by default.
    max_kl : float, optional
        Maximum mean KL(model || sub-network) on the region.
    max_drop : float, optional
        Maximum mean drop of the probability of the model's predicted (or target) class.
    """

    min_agreement: float = 1.0
    max_kl: float | None = None
    max_drop: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.min_agreement <= 1:
            raise ValueError(
                f"FidelityTarget.min_agreement must lie in [0, 1], got {self.min_agreement}"
            )
        for name in ("max_kl", "max_drop"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"FidelityTarget.{name} must be a finite number >= 0, got {value}")

    @classmethod
    def coerce(cls, value: FidelityTarget | float | Mapping[str, float]) -> FidelityTarget:
        """A target from a :class:`FidelityTarget`, a minimum agreement, or a mapping."""
        if isinstance(value, FidelityTarget):
            return value
        if isinstance(value, Mapping):
            return cls(**value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls(min_agreement=float(value))
        raise TypeError(
            "fidelity must be a FidelityTarget, a minimum top-1 agreement in [0, 1], or a "
            f"dict such as {{'min_agreement': 1.0, 'max_kl': 0.1}}; got {type(value).__name__}"
        )

    def met_by(self, point: PathPoint) -> bool:
        """Whether ``point``'s fidelity on its region meets this target."""
        # agreement is a fraction of inputs: compare counts, not rounded floats
        need = math.ceil(self.min_agreement * point.inputs - 1e-9)
        if round(point.agreement * point.inputs) < need:
            return False
        if self.max_kl is not None and point.kl > self.max_kl:
            return False
        return self.max_drop is None or point.mean_drop <= self.max_drop


@dataclass
class PathPoint:
    """One chain of the path and its fidelity on the region.

    Attributes
    ----------
    l1 : float
        lambda of this point.
    kept : int
        Units kept at this point.
    total : int
        Units of the model.
    kl : float
        Mean KL(model || sub-network) of the thresholded sub-network on the region.
    agreement : float
        Fraction of the region's inputs whose top-1 class the sub-network keeps.
    mean_drop : float
        Mean drop of the probability of the model's (or the target) class.
    open_gates : int
        Gates left open.
    steps : int
        Optimization steps taken from the start of the path up to this point.
    inputs : int
        Number of inputs of the region.
    chain : Chain
        The chain at this point (thresholded, not fine-tuned).
    """

    l1: float
    kept: int
    total: int
    kl: float
    agreement: float
    mean_drop: float
    open_gates: int
    steps: int
    inputs: int
    chain: Chain

    @property
    def kept_fraction(self) -> float:
        """``kept / total``."""
        return self.kept / self.total if self.total else 0.0


@dataclass
class ChainPath:
    """Chains of one region along increasing lambda (see the module docstring)."""

    points: list[PathPoint]

    def __len__(self) -> int:
        return len(self.points)

    def __iter__(self) -> Iterator[PathPoint]:
        return iter(self.points)

    def __getitem__(self, index: int) -> PathPoint:
        return self.points[index]

    def sparsest(self, fidelity: FidelityTarget | float | Mapping[str, float]) -> PathPoint | None:
        """The point with the fewest kept units that meets ``fidelity`` (``None`` if none).

        Ties go to the smaller lambda (less shrunk scores).
        """
        target = FidelityTarget.coerce(fidelity)
        meeting = [p for p in self.points if target.met_by(p)]
        if not meeting:
            return None
        return min(meeting, key=lambda p: (p.kept, p.l1))

    def to_frame(self) -> Any:
        """One row per point: l1, kept, total, kept_fraction, kl, agreement, mean_drop,
        open_gates, steps (a ``pandas.DataFrame``)."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "l1": p.l1,
                    "kept": p.kept,
                    "total": p.total,
                    "kept_fraction": p.kept_fraction,
                    "kl": p.kl,
                    "agreement": p.agreement,
                    "mean_drop": p.mean_drop,
                    "open_gates": p.open_gates,
                    "steps": p.steps,
                }
                for p in self.points
            ]
        )

    def plot(self, fidelity: FidelityTarget | float | None = None, ax: Any = None) -> Any:
        """Kept units (%) and fidelity against lambda; marks the sparsest point meeting
        ``fidelity`` when given. Returns the matplotlib figure."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6.4, 3.6))
        lambdas = [p.l1 for p in self.points]
        ax.plot(lambdas, [100 * p.kept_fraction for p in self.points], "o-", color="C0")
        ax.set_xscale("log")
        ax.set_xlabel("lambda (l1 weight)")
        ax.set_ylabel("kept units (%)", color="C0")
        right = ax.twinx()
        right.plot(
            lambdas, [p.agreement for p in self.points], "s--", color="C1", label="agreement"
        )
        right.plot(lambdas, [p.kl for p in self.points], "^:", color="C2", label="KL")
        right.plot(
            lambdas, [p.mean_drop for p in self.points], "v-.", color="C3", label="mean drop"
        )
        right.set_ylabel("fidelity on the region")
        right.legend(loc="center right", fontsize="small")
        if fidelity is not None:
            chosen = self.sparsest(fidelity)
            if chosen is not None:
                ax.axvline(chosen.l1, color="0.4", lw=1)
                ax.annotate(
                    f"{chosen.kept} kept",
                    (chosen.l1, 100 * chosen.kept_fraction),
                    textcoords="offset points",
                    xytext=(6, 6),
                    fontsize="small",
                )
        ax.set_title("NeuroChains sparsity-fidelity path")
        ax.figure.tight_layout()
        return ax.figure
