"""Hyperparameters of NeuroChains in one typed object, with the paper's defaults."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

#: (lambda, lambda_g) per model family. "plain" (VGG) and "residual" (ResNet) are the
#: paper's values; "mobile" and "vit" were chosen by the sweeps documented in
#: docs/defaults.md.
FAMILY_PENALTIES: dict[str, tuple[float, float]] = {
    "plain": (0.007, 2.0),
    "residual": (0.0065, 0.9),
    "mobile": (0.0065, 0.9),
    "vit": (0.0065, 0.0),  # digits-ViT sweep (docs/vit.md): any lambda_g > 0 broke regions
}


@dataclass(frozen=True)
class ChainConfig:
    """NeuroChains hyperparameters (Wang et al., TMLR 2022, Eq. 3-8).

    Attributes
    ----------
    l1 : float, optional
        lambda, weight of the l1 penalty on the filter scores; ``None`` picks the family
        default from :data:`FAMILY_PENALTIES`.
    gate_penalty : float, optional
        lambda_g, weight of the gate penalty; ``None`` picks the family default.
    gate_penalty_on : {"alpha", "gate"}
        ``"alpha"``: penalty ``lambda_g * sum(alpha)`` (the paper's penalty on the gate
        parameters); ``"gate"``: ``lambda_g * sum(sigmoid(alpha / T))``.
    temperature : float
        T of the gate ``G = sigmoid(alpha / T)``.
    score_init, alpha_init : float
        Initial scores (1) and gate parameters (0, the paper's: every gate starts at
        ``G = 0.5``, its threshold; the gate penalty closes it in the first step and the
        KL reopens it when the block is needed). Starting open (``alpha_init = 0.5``, ``G =
        0.92``) was measured and gives larger chains (docs/defaults.md).
    optimizer : {"proximal", "adam"}
        ``"proximal"`` (default): :class:`~captum_chains.optim.ProximalAdam`, Adam steps on
        the KL with the exact proximal step of the l1 term, so removed scores are exactly
        zero and stay there unless their KL gradient outweighs lambda. ``"adam"``: the
        paper's Adam on the whole loss, scores clamped at 0 after each step.
    lr, steps : float, int
        Learning rate of the first ``descent_steps`` steps and maximum number of steps of
        the main optimization (360; the paper's 300 stop while the proximal iteration still
        removes about two filters a step on EfficientNet-Lite0, docs/defaults.md).
    free_rate : float
        With the proximal optimizer: step-size multiplier of the scores nothing holds (their
        smoothed KL gradient is above ``-lambda / 2``), so that the filters the region does
        not need fall to zero in ~20 steps instead of ~180, while the held ones are sorted
        at ``lr`` (:class:`~captum_chains.optim.ProximalAdam`, docs/defaults.md). 10 (the
        default) was the largest rate measured that keeps every measured Lite0 region's
        fidelity; 15 and 20 remove filters the demo's region needs. A free score never steps
        more than :data:`~captum_chains.optim.FREE_LR_CAP` (0.05, the default's
        ``10 * lr``: at least 20 steps from 1 to 0), so a larger ``lr`` gets a smaller
        multiplier. 1: every score at ``lr``.
    descent_steps, refine_lr : int, float or None
        Two-phase schedule: ``lr`` for ``descent_steps`` steps (all scores fall from 1
        together until the unneeded ones reach zero), then ``refine_lr`` (``None``: ``lr``)
        for the rest, where small steps sort the needed units from the others (see
        docs/defaults.md). ``descent_steps=0`` and ``refine_lr=None``: one constant rate,
        the paper's schedule.
    early_stop_delta : float
        Stop when the loss changed by less than this over the last ``early_stop_window``
        steps (the paper: 0.02 between two steps)...
    early_stop_window : int
        ...measured over this many steps (the paper: 1; see docs/defaults.md).
    early_stop_min_steps : int
        Never stop before this many steps.
    score_threshold : float
        tau: filters with score below it are removed.
    gate_threshold : float
        Gates below it are closed (the layer/block becomes the identity).
    finetune_kl : float
        t: fine-tune the surviving scores when the thresholded sub-network's KL exceeds it.
    finetune_lr, finetune_steps : float, int
        Adam settings of the fine-tuning (KL only, no penalties).
    use_gates : bool
        Optimize gates at all.
    layer_gates : bool
        Also gate single shape-preserving layers outside residual blocks (e.g. a depthwise
        convolution); ``False`` gates residual blocks only (see docs/defaults.md).
    compile : bool or str
        Run the masked forward through ``torch.compile`` (``True``: the default inductor
        backend; a string: that backend, e.g. ``"aot_eager"``). If compilation fails the
        run falls back to eager execution with a warning. Results equal the eager path
        up to floating-point rounding.
    autocast : {"bfloat16", "float16"}, optional
        Run the masked forward pass under ``torch.autocast`` in this dtype (for GPUs with
        fast low-precision matmuls); the KL, the penalties, the scores and gates stay in
        float32. ``None`` (default): full precision.
    batch_size : int, optional
        Inputs per region in each optimization and fine-tuning step: a fresh random subset
        of the region (seeded by ``sample_seed``), so each step estimates the KL of Eq. 8
        stochastically at a fraction of the cost. ``None`` (default), or at least the
        region's size: every input in every step. Thresholding and the fine-tuning decision
        always use the whole region; the per-step KL in the chain's history is the subset's.
    sample_seed : int
        Seed of the subsets drawn when ``batch_size`` is set.
    channels_last : bool, optional
        Memory layout of 4-D (image) inputs during the optimization. ``None`` (default):
        channels-last on the CPU, where oneDNN's convolutions run faster in it (a Lite0 step
        takes 0.79x as long; docs/defaults.md); ``True``: also on other devices; ``False``:
        the layout as given. Only the layout changes, so chains equal the given layout's up
        to floating-point rounding; a model that cannot run a channels-last tensor (e.g. it
        calls ``.view`` on a convolution's output) falls back to the given layout by itself.
    compact_below : float, optional
        Compact steps: once the filters whose score is not zero (outside closed gates) are
        at most this fraction of all filters, the optimization and fine-tuning steps run on
        a copy of the model that computes only those filters
        (:func:`~captum_chains.export.compact.compact_program`, the export's channel
        surgery), rebuilt whenever they shrink by another 30 %. A step's cost falls with the
        filters left, not in proportion (high-resolution first layers dominate while they
        keep their filters): on Lite0 a step with 3,900 of 21,008 filters left costs ~0.4x
        a full one, with 450 left ~0.1x (docs/defaults.md). From the first compact step on,
        the gates keep their thresholded state (closed: identity, open: ``G = 1``) and a removed
        filter stays removed (full steps could revive it). ``attribute_many`` then runs its
        regions one after another; models the export cannot handle run full steps with a
        warning. ``None``: every step on the whole model (the paper).
    """

    l1: float | None = None
    gate_penalty: float | None = None
    gate_penalty_on: Literal["alpha", "gate"] = "alpha"
    temperature: float = 0.2
    score_init: float = 1.0
    alpha_init: float = 0.0
    optimizer: Literal["proximal", "adam"] = "proximal"
    lr: float = 0.005
    steps: int = 360
    free_rate: float = 10.0
    descent_steps: int = 0
    refine_lr: float | None = None
    early_stop_delta: float = 0.02
    early_stop_window: int = 10
    early_stop_min_steps: int = 20
    score_threshold: float = 0.1
    gate_threshold: float = 0.5
    finetune_kl: float = 0.1
    finetune_lr: float = 0.01
    finetune_steps: int = 50
    use_gates: bool = True
    layer_gates: bool = False
    compile: bool | str = False
    autocast: Literal["bfloat16", "float16"] | None = None
    batch_size: int | None = None
    sample_seed: int = 0
    channels_last: bool | None = None
    compact_below: float | None = 0.8

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(
                    f"ChainConfig.{f.name} must be a finite number, got {value}; pass a finite "
                    "value (or None where the field allows it)"
                )
        positive = {
            "temperature": self.temperature,
            "lr": self.lr,
            "finetune_lr": self.finetune_lr,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"ChainConfig.{name} must be > 0, got {value}")
        for name in ("l1", "gate_penalty"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(
                    f"ChainConfig.{name} must be >= 0 (or None for the default), got {value}"
                )
        if self.early_stop_window < 1:
            raise ValueError(
                f"ChainConfig.early_stop_window must be >= 1, got {self.early_stop_window}"
            )
        for name in ("steps", "finetune_steps", "early_stop_min_steps", "descent_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"ChainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size is not None and (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise ValueError(
                f"ChainConfig.batch_size must be a positive int (inputs per step) or None "
                f"(all inputs), got {self.batch_size!r}"
            )
        if self.channels_last not in (None, True, False):
            raise ValueError(
                f"ChainConfig.channels_last must be True, False or None (channels-last on the "
                f"CPU), got {self.channels_last!r}"
            )
        if not self.free_rate >= 1:
            raise ValueError(
                f"ChainConfig.free_rate must be >= 1 (1: every score at lr), got {self.free_rate}"
            )
        if self.compact_below is not None and not 0 < self.compact_below <= 1:
            raise ValueError(
                f"ChainConfig.compact_below must lie in (0, 1] (a fraction of the filters) or "
                f"be None (no compact steps), got {self.compact_below}"
            )
        if not 0 < self.gate_threshold < 1:
            raise ValueError(
                f"ChainConfig.gate_threshold must lie in (0, 1), got {self.gate_threshold}"
            )
        if self.autocast not in (None, "bfloat16", "float16"):
            raise ValueError(
                f"ChainConfig.autocast must be None, 'bfloat16' or 'float16', got {self.autocast!r}"
            )
        if self.optimizer not in ("proximal", "adam"):
            raise ValueError(
                f"ChainConfig.optimizer must be 'proximal' or 'adam', got {self.optimizer!r}"
            )
        if self.refine_lr is not None and not self.refine_lr > 0:
            raise ValueError(f"ChainConfig.refine_lr must be > 0 (or None), got {self.refine_lr}")
        if not self.score_threshold >= 0:
            raise ValueError(
                f"ChainConfig.score_threshold must be >= 0, got {self.score_threshold}"
            )
        if self.gate_penalty_on not in ("alpha", "gate"):
            raise ValueError(
                f"gate_penalty_on must be 'alpha' or 'gate', got {self.gate_penalty_on!r}"
            )

    @classmethod
    def paper(cls, **changes: Any) -> ChainConfig:
        """The paper's exact schedule, for reproduction.

        Adam (lr 0.005) on the whole loss for at most 300 steps, stopping when the loss
        changes by less than 0.02 between two steps, gates initialised on the threshold
        (alpha 0) on every shape-preserving layer and block, and 50 fine-tuning steps at lr
        0.01 when the thresholded KL exceeds 0.1. ``changes`` replace single fields.
        """
        paper = cls(
            optimizer="adam",
            lr=0.005,
            steps=300,
            descent_steps=0,
            refine_lr=None,
            early_stop_delta=0.02,
            early_stop_window=1,
            early_stop_min_steps=0,
            alpha_init=0.0,
            finetune_steps=50,
            finetune_lr=0.01,
            layer_gates=True,
            batch_size=None,
            compact_below=None,
            free_rate=1.0,
        )
        return paper.replace(**changes) if changes else paper

    def penalties(self, family: str) -> tuple[float, float]:
        """lambda and lambda_g for a model family, honouring explicit values."""
        default_l1, default_g = FAMILY_PENALTIES.get(family, FAMILY_PENALTIES["residual"])
        return (
            default_l1 if self.l1 is None else self.l1,
            default_g if self.gate_penalty is None else self.gate_penalty,
        )

    def replace(self, **changes: Any) -> ChainConfig:
        """A copy with some fields changed (unknown names raise ``TypeError``)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields."""
        return asdict(self)
