"""The typed result of :class:`InteractionPrimitives` and its statistics (Chen et al., 2024).

Interactions are stored as ``[B, m, 2**n]`` tensors (sample, model, subset bitmask ``S``
with bit ``i`` set when player ``i`` is in ``S``). On top of them:

* salient interactions ``Ω^(i)``: the strongest ``salient_count`` (or
  ``salient_fraction`` of the ``2**n - 1``) interactions of model ``i`` by ``|I(S)|``, or
  those with ``|I(S)| > threshold``; non-empty ``S`` only;
* shared interactions ``Ω_shared = ∩_i Ω^(i)`` and distinctive ones ``Ω^(i) \\ Ω_shared``;
* generalization power ``s^(i) = |Ω_shared| / |Ω^(i)|``, for AND and OR separately (Sec. 4);
* universal matching: ``v(x_T) + ε_T = v_and(x_T) + v_or(x_T)`` exactly, so the
  reconstruction error of ``v`` is ``|ε_T| <= q``.

For ``|S| <= 1`` an AND and an OR interaction are the same function of the mask (the
constant, or ``[i ∈ T]``), so only their sum is meaningful. As in the reference code,
statistics merge them into the AND interaction by default (``merge_low_order=True``).
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from captum_chains.interactions.transforms import and_values, or_values, popcount, subset_bits

KINDS = ("and", "or")


@dataclass(frozen=True)
class Interaction:
    """One interaction, readable.

    Attributes
    ----------
    players : tuple of str
        Names of the players in ``S`` (their indices as strings unless names were given).
    subset : int
        Bitmask of ``S``.
    value : float
        ``I(S)``.
    kind : {"and", "or"}
    """

    players: tuple[str, ...]
    subset: int
    value: float
    kind: str

    @property
    def order(self) -> int:
        """``|S|``."""
        return len(self.players)

    def __str__(self) -> str:
        return f"{self.kind.upper()} {{{', '.join(self.players)}}}: {self.value:+.4g}"


@dataclass
class InteractionResult:
    """AND-OR interactions of one or more models on a batch of inputs.

    Attributes
    ----------
    i_and, i_or : torch.Tensor
        ``[B, m, 2**n]`` float64 AND / OR interactions.
    values : torch.Tensor
        ``[B, m, 2**n]`` the decomposed ``v(x_T)`` (after subtracting ``v(x_∅)`` when
        asked).
    noise : torch.Tensor
        ``[B, m, 2**n]`` the learned ``ε_T``.
    gamma : torch.Tensor
        ``[B, m, 2**n]`` the learned ``γ_T`` (``γ̄ + γ̂^(i)`` for the shared method).
    noise_bound : torch.Tensor
        ``[B, m]`` the bound ``q`` on ``|ε_T|``.
    v_empty : torch.Tensor
        ``[B, m]`` the raw ``v(x_∅)`` (subtracted from ``values`` when
        ``subtract_empty``).
    player_names : tuple of str
        Names used in listings: the given ones, or the player indices ``"0", "1", ...``.
    model_names : tuple of str
    method : {"shared", "single"}
    loss : torch.Tensor
        ``[B]`` final objective (Eq. 6 or Eq. 4 summed over models), raw units.
    salient_fraction : float
        Default size of ``Ω^(i)``: this fraction of the ``2**n - 1`` non-empty subsets.
    salient_count : int or None
        Default size of ``Ω^(i)`` as a count (overrides the fraction).
    threshold : float or None
        When set, ``Ω = {S : |I(S)| > threshold}`` instead of the strongest ones.
    merge_low_order : bool
        Merge OR into AND interactions for ``|S| <= 1`` in the statistics.
    timings : dict
        Seconds spent in ``"evaluation"`` (forward passes) and ``"optimization"``.
    history : list of float
        Mean loss at the solver's checkpoints.
    solver : str
        The solver that ran (``"auto"`` resolved).
    lower_bound : torch.Tensor or None
        ``[B]`` certified lower bound on the optimal loss (the loss itself for the exact
        LP, the dual bound for PDHG, None for Adam/SGD); see :attr:`gap`.
    config : InteractionConfig or None
        The settings of the call.
    """

    i_and: torch.Tensor
    i_or: torch.Tensor
    values: torch.Tensor
    noise: torch.Tensor
    gamma: torch.Tensor
    noise_bound: torch.Tensor
    v_empty: torch.Tensor
    player_names: tuple[str, ...]
    model_names: tuple[str, ...]
    method: str
    loss: torch.Tensor
    salient_fraction: float = 0.05
    salient_count: int | None = None
    threshold: float | None = None
    merge_low_order: bool = True
    timings: dict[str, float] = field(default_factory=dict)
    history: list[float] = field(default_factory=list)
    solver: str = ""
    lower_bound: torch.Tensor | None = None
    config: Any = None

    def top_k(self, *args: object, **kwargs: object) -> None:
        """Removed: ``top_k`` was the salient-set size, a number, not a listing.

        Raises
        ------
        AttributeError
            Always, naming the replacements: :meth:`top` to list interactions and
            :attr:`salient_fraction` / :attr:`salient_count` for the size of ``Ω``.
        """
        raise AttributeError(
            "InteractionResult.top_k was removed: use res.top(kind, k) to list the k "
            "strongest interactions, and res.salient_fraction / res.salient_count for the "
            "size of the salient sets"
        )

    @property
    def gap(self) -> torch.Tensor | None:
        """Certified relative gap ``(loss - lower_bound) / loss`` per sample, or None."""
        if self.lower_bound is None:
            return None
        return ((self.loss - self.lower_bound) / self.loss.abs().clamp_min(1e-300)).clamp_min(0)

    # ------------------------------------------------------------------ shape
    @property
    def n(self) -> int:
        """Number of players."""
        return len(self.player_names)

    @property
    def num_models(self) -> int:
        return self.i_and.shape[1]

    @property
    def batch_size(self) -> int:
        return self.i_and.shape[0]

    # ------------------------------------------------------------ matching
    def reconstruction(self) -> torch.Tensor:
        """``v_and(x_T) + v_or(x_T)`` rebuilt from the interactions alone, ``[B, m, 2**n]``.

        ``v_and(x_T) = sum_{S ⊆ T} I_and(S)``,
        ``v_or(x_T) = I_or(∅) + sum_{S ∩ T ≠ ∅} I_or(S)``.
        """
        return and_values(self.i_and) + or_values(self.i_or)

    @property
    def matching_error(self) -> torch.Tensor:
        """``max_T |v(x_T) + ε_T - reconstruction(T)|`` per sample and model (~1e-12)."""
        return (self.values + self.noise - self.reconstruction()).abs().amax(-1)

    @property
    def reconstruction_error(self) -> torch.Tensor:
        """``max_T |v(x_T) - reconstruction(T)|`` per sample and model; ``<= q`` (Sec. 2)."""
        return (self.values - self.reconstruction()).abs().amax(-1)

    @property
    def relative_reconstruction_error(self) -> torch.Tensor:
        """:attr:`reconstruction_error` divided by ``|v(x_N) - v(x_∅)|``."""
        spread = (self.values[..., -1] - self.values[..., 0]).abs().clamp_min(1e-12)
        return self.reconstruction_error / spread

    # ------------------------------------------------------------ interactions
    def interactions(self, kind: str) -> torch.Tensor:
        """``[B, m, 2**n]`` interactions of ``kind``, with low orders merged if configured."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not self.merge_low_order:
            return self.i_and if kind == "and" else self.i_or
        low = (popcount(self.n, device=self.i_and.device) <= 1).view(1, 1, -1)
        if kind == "and":
            return torch.where(low, self.i_and + self.i_or, self.i_and)
        return torch.where(low, torch.zeros_like(self.i_or), self.i_or)

    def _size(self, count: int | None, fraction: float | None) -> int:
        total = (1 << self.n) - 1
        if count is not None:
            if isinstance(count, bool) or int(count) != count or count < 1:
                raise ValueError(f"count must be a positive int, got {count!r}")
            return min(int(count), total)
        frac = self.salient_fraction if fraction is None else fraction
        if self.salient_count is not None and fraction is None:
            return min(int(self.salient_count), total)
        if not 0.0 < frac <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {frac!r}; pass a count as count=")
        return max(1, math.ceil(frac * total))

    def salient(
        self,
        kind: str,
        count: int | None = None,
        fraction: float | None = None,
        threshold: float | None = None,
        **deprecated: Any,
    ) -> torch.Tensor:
        """``Ω^(i)`` as a boolean ``[B, m, 2**n]`` mask (never contains ``∅`` or zeros).

        With none of ``count``, ``fraction`` and ``threshold`` given, the result's defaults
        apply (:attr:`threshold`, then :attr:`salient_count`, then :attr:`salient_fraction`).
        ``top_k=`` (a count or a fraction) is accepted with a ``DeprecationWarning``.

        Parameters
        ----------
        kind : {"and", "or"}
        count : int, optional
            The ``count`` strongest interactions by ``|I(S)|``.
        fraction : float, optional
            The strongest ``fraction`` of the ``2**n - 1`` non-empty subsets.
        threshold : float, optional
            ``|I(S)| > threshold`` instead.
        """
        if deprecated:
            if set(deprecated) != {"top_k"}:
                raise TypeError(f"unexpected keyword(s) {sorted(deprecated)}")
            top_k = deprecated["top_k"]
            warnings.warn(
                "salient(top_k=...) is deprecated: pass count=<int> or fraction=<float>",
                DeprecationWarning,
                stacklevel=2,
            )
            if isinstance(top_k, float) and 0 < top_k < 1:
                fraction = top_k
            else:
                count = int(top_k)
        mag = self.interactions(kind).abs().clone()
        mag[..., 0] = 0.0
        chosen = count is not None or fraction is not None
        thr = self.threshold if threshold is None and not chosen else threshold
        if thr is not None:
            return mag > thr
        k = self._size(count, fraction)
        idx = mag.topk(k, dim=-1).indices
        mask = torch.zeros_like(mag, dtype=torch.bool).scatter_(-1, idx, True)
        return mask & (mag > 0)

    def shared(self, kind: str, **kwargs: Any) -> torch.Tensor:
        """``Ω_shared = ∩_i Ω^(i)`` as ``[B, 2**n]`` booleans."""
        return self.salient(kind, **kwargs).all(dim=1)

    def distinctive(self, kind: str, **kwargs: Any) -> torch.Tensor:
        """``Ω^(i) \\ Ω_shared`` as ``[B, m, 2**n]`` booleans."""
        sal = self.salient(kind, **kwargs)
        return sal & ~sal.all(dim=1, keepdim=True)

    def generalization(self, kind: str, **kwargs: Any) -> torch.Tensor:
        """``s^(i) = |Ω_shared| / |Ω^(i)|`` per sample and model, ``[B, m]`` (Sec. 4)."""
        sal = self.salient(kind, **kwargs)
        shared = sal.all(dim=1, keepdim=True).sum(-1).double()
        size = sal.sum(-1).double()
        return torch.where(size > 0, shared / size.clamp_min(1), torch.ones_like(size))

    @property
    def s_and(self) -> float:
        """Mean generalization power of AND interactions over samples and models."""
        return float(self.generalization("and").mean())

    @property
    def s_or(self) -> float:
        """Mean generalization power of OR interactions over samples and models."""
        return float(self.generalization("or").mean())

    def sparsity(self, kind: str | None = None, relative_threshold: float = 0.05) -> torch.Tensor:
        """Fraction of salient interactions, ``[B, m]``.

        An interaction counts as salient when ``|I(S)| > relative_threshold * max |I|``
        over both kinds (non-empty ``S``); the fraction is over the ``2**n - 1``
        non-empty subsets of the given kind, or of both kinds together (``2 (2**n - 1)``)
        when ``kind`` is None.
        """
        kinds = KINDS if kind is None else (kind,)
        mags = [self.interactions(k).abs()[..., 1:] for k in KINDS]
        peak = torch.maximum(mags[0].amax(-1), mags[1].amax(-1)).clamp_min(1e-300)
        chosen = torch.cat([mags[KINDS.index(k)] for k in kinds], dim=-1)
        return (chosen > relative_threshold * peak[..., None]).double().mean(-1)

    def strength_by_order(self, kind: str, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Summed positive and negative interaction strength per order, ``[B, m, n + 1, 2]``.

        ``out[..., k, 0]`` sums the positive ``I(S)`` with ``|S| = k``, ``out[..., k, 1]``
        the negative ones (Fig. 4). ``mask`` (broadcastable to ``[B, m, 2**n]``) restricts
        the sum, e.g. to :meth:`shared` interactions.
        """
        inter = self.interactions(kind)
        if mask is not None:
            inter = torch.where(mask.expand_as(inter), inter, torch.zeros_like(inter))
        order = popcount(self.n, device=inter.device)
        onehot = torch.nn.functional.one_hot(order, self.n + 1).to(inter.dtype)  # [2**n, n+1]
        pos = inter.clamp_min(0) @ onehot
        neg = inter.clamp_max(0) @ onehot
        return torch.stack((pos, neg), dim=-1)

    # ------------------------------------------------------------- readable
    def names_of(self, subset: int) -> tuple[str, ...]:
        """Player names in the subset bitmask ``subset``."""
        return tuple(self.player_names[i] for i in range(self.n) if subset >> i & 1)

    def subset_of(self, players: Iterable[str | int]) -> int:
        """Bitmask of an iterable of player names or indices."""
        out = 0
        for p in players:
            i = self.player_names.index(p) if isinstance(p, str) else int(p)
            out |= 1 << i
        return out

    def top(
        self, kind: str = "and", k: int = 10, *, sample: int = 0, model: int = 0
    ) -> list[Interaction]:
        """The ``k`` strongest interactions (non-empty ``S``) by ``|I(S)|``, strongest first.

        Exact zeros are left out, so fewer than ``k`` may come back.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        try:
            if isinstance(k, bool):
                raise TypeError
            k = operator.index(k)  # ints, numpy and 0-d torch integers; not floats
        except TypeError:
            raise ValueError(f"k must be a positive int, got {k!r}") from None
        if k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        inter = self.interactions(kind)[sample, model].clone()
        inter[0] = 0.0
        idx = inter.abs().topk(min(k, inter.numel() - 1)).indices.tolist()
        return [
            Interaction(self.names_of(s), s, float(inter[s]), kind) for s in idx if inter[s] != 0
        ]

    def listing(
        self, kind: str, mask: torch.Tensor, sample: int = 0, model: int = 0
    ) -> list[Interaction]:
        """Interactions of ``model`` selected by a ``[2**n]`` mask, strongest first."""
        inter = self.interactions(kind)[sample, model]
        idx = mask.nonzero().flatten().tolist()
        items = [Interaction(self.names_of(s), s, float(inter[s]), kind) for s in idx]
        return sorted(items, key=lambda it: -abs(it.value))

    def shared_interactions(
        self, kind: str = "and", sample: int = 0, model: int = 0
    ) -> list[Interaction]:
        """:meth:`shared` interactions of ``sample`` with the values of ``model``."""
        return self.listing(kind, self.shared(kind)[sample], sample, model)

    def distinctive_interactions(
        self, kind: str = "and", sample: int = 0, model: int = 0
    ) -> list[Interaction]:
        """:meth:`distinctive` interactions of ``model`` on ``sample``."""
        return self.listing(kind, self.distinctive(kind)[sample, model], sample, model)

    def summary(self) -> dict[str, float]:
        """Headline numbers averaged over samples (and models)."""
        return {
            "n": float(self.n),
            "models": float(self.num_models),
            "s_and": self.s_and,
            "s_or": self.s_or,
            "sparsity": float(self.sparsity().mean()),
            "reconstruction_error": float(self.reconstruction_error.amax()),
            "relative_reconstruction_error": float(self.relative_reconstruction_error.amax()),
            "matching_error": float(self.matching_error.amax()),
            "loss": float(self.loss.mean()),
            **({} if self.gap is None else {"certified_gap": float(self.gap.max())}),
            **{f"{k}_s": v for k, v in self.timings.items()},
        }

    def subsets_table(self) -> torch.Tensor:
        """``[2**n, n]`` booleans: row ``S`` marks the players of ``S``."""
        return subset_bits(self.n, device=self.i_and.device)
