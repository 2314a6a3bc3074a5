"""Hyperparameters of NeuroChains in one typed object, with the paper's defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
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
        Initial scores (1) and gate parameters (0).
    lr, steps : float, int
        Adam learning rate and maximum number of steps of the main optimization.
    early_stop_delta : float
        Stop when the loss changed by less than this over the last ``early_stop_window``
        steps (the paper: 0.02 between two steps)...
    early_stop_window : int
        ...measured over this many steps. The l1 term's per-step change is
        ``lambda * lr * num_units``, below 0.02 for models under ~600 units, so the
        paper's one-step rule would stop small models before any score moved; a window
        of 10 steps keeps the rule meaningful at every size (and is stricter than the
        paper's on large models).
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
    compile : bool or str
        Run the masked forward through ``torch.compile`` (``True``: the default inductor
        backend; a string: that backend, e.g. ``"aot_eager"``). If compilation fails the
        run falls back to eager execution with a warning. Results equal the eager path
        up to floating-point rounding.
    autocast : {"bfloat16", "float16"}, optional
        Run the masked forward pass under ``torch.autocast`` in this dtype (for GPUs with
        fast low-precision matmuls); the KL, the penalties, the scores and gates stay in
        float32. ``None`` (default): full precision.
    """

    l1: float | None = None
    gate_penalty: float | None = None
    gate_penalty_on: Literal["alpha", "gate"] = "alpha"
    temperature: float = 0.2
    score_init: float = 1.0
    alpha_init: float = 0.0
    lr: float = 0.005
    steps: int = 300
    early_stop_delta: float = 0.02
    early_stop_window: int = 10
    early_stop_min_steps: int = 20
    score_threshold: float = 0.1
    gate_threshold: float = 0.5
    finetune_kl: float = 0.1
    finetune_lr: float = 0.01
    finetune_steps: int = 50
    use_gates: bool = True
    compile: bool | str = False
    autocast: Literal["bfloat16", "float16"] | None = None

    def __post_init__(self) -> None:
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
        for name in ("steps", "finetune_steps", "early_stop_min_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"ChainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.gate_threshold < 1:
            raise ValueError(
                f"ChainConfig.gate_threshold must lie in (0, 1), got {self.gate_threshold}"
            )
        if self.autocast not in (None, "bfloat16", "float16"):
            raise ValueError(
                f"ChainConfig.autocast must be None, 'bfloat16' or 'float16', got {self.autocast!r}"
            )
        if self.gate_penalty_on not in ("alpha", "gate"):
            raise ValueError(
                f"gate_penalty_on must be 'alpha' or 'gate', got {self.gate_penalty_on!r}"
            )

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
