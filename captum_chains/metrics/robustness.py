"""Robustness of a chain's sub-network to adversarial perturbations.

NeuroChains (Wang, Zhou and Bilmes, TMLR 2022), Fig. 5: adversarial versions of the
region's inputs are built with FGSM (one signed-gradient step of size epsilon) and PGD
(``steps`` projected signed-gradient steps inside the L-inf ball of radius epsilon),
using Captum's :class:`captum.robust.FGSM` and :class:`captum.robust.PGD` with the
cross-entropy of the target class (the ground truth, or the original prediction). The
probability of the target class under the original model and under the sub-network
is then compared, as histograms over inputs.

``attack_on`` chooses whose gradients build the perturbation: ``"each"`` attacks each
network on its own gradients (white-box robustness of both), ``"model"`` attacks the
original model and feeds the same adversarial inputs to the sub-network (transfer),
``"subnetwork"`` the reverse.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from captum_chains._utils.model_state import eval_mode
from captum_chains._utils.validation import format_additional_args, format_target
from captum_chains.metrics._common import (
    ChainLike,
    as_subnetwork,
    chunked_logits,
    model_logits,
    region_inputs,
)

ATTACKS: tuple[str, ...] = ("fgsm", "pgd")
AttackOn = Literal["each", "model", "subnetwork"]


@dataclass(frozen=True)
class RobustnessResult:
    """Target-class probabilities of the model and the sub-network on adversarial inputs.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per (attack, input): ``attack`` ("clean", "fgsm", "pgd"), ``input``,
        ``target``, ``model_prob``, ``subnetwork_prob``, ``model_correct``,
        ``subnetwork_correct``.
    epsilon : float
        The perturbation radius (in input units).
    attack_on : str
        Whose gradients built the perturbations.
    adversarial : dict of str to (Tensor, Tensor)
        Attack -> (inputs fed to the model, inputs fed to the sub-network); the two are
        the same tensor unless ``attack_on="each"``.
    """

    table: Any
    epsilon: float
    attack_on: str
    adversarial: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False
    )

    def probabilities(self, attack: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(model_prob, subnetwork_prob)`` tensors ``[N]`` for one attack."""
        rows = self.table[self.table["attack"] == attack]
        if rows.empty:
            ran = sorted(set(self.table["attack"]))
            raise KeyError(f"attack {attack!r} was not run; ran {ran}")
        return (
            torch.tensor(rows["model_prob"].to_numpy()),
            torch.tensor(rows["subnetwork_prob"].to_numpy()),
        )

    def gap(self, attack: str) -> float:
        """Mean target probability of the sub-network minus that of the model.

        Positive: the sub-network keeps more of the target class under this attack.
        """
        m, s = self.probabilities(attack)
        return float((s - m).mean())

    def summary(self) -> dict[str, float]:
        """Mean probabilities, accuracies and the gap per attack."""
        out: dict[str, float] = {}
        for attack, rows in self.table.groupby("attack", sort=False):
            out[f"{attack}_model_prob"] = float(rows["model_prob"].mean())
            out[f"{attack}_subnetwork_prob"] = float(rows["subnetwork_prob"].mean())
            out[f"{attack}_model_accuracy"] = float(rows["model_correct"].mean())
            out[f"{attack}_subnetwork_accuracy"] = float(rows["subnetwork_correct"].mean())
            out[f"{attack}_gap"] = out[f"{attack}_subnetwork_prob"] - out[f"{attack}_model_prob"]
        return out

    def histograms(self, bins: int = 20) -> dict[str, tuple[Any, Any, Any]]:
        """Per attack: ``(edges, model_counts, subnetwork_counts)`` over [0, 1]."""
        import numpy as np

        edges = np.linspace(0.0, 1.0, bins + 1)
        out = {}
        for attack, rows in self.table.groupby("attack", sort=False):
            m = np.histogram(rows["model_prob"].to_numpy(), bins=edges)[0]
            s = np.histogram(rows["subnetwork_prob"].to_numpy(), bins=edges)[0]
            out[str(attack)] = (edges, m, s)
        return out


class _CrossEntropy:
    """Per-input cross-entropy of logits w.r.t. a target, as Captum's attacks expect."""

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, reduction="none")


def _attack(
    forward: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    extra: tuple[Any, ...],
    attack: str,
    epsilon: float,
    step_size: float,
    steps: int,
    bounds: tuple[float, float],
) -> torch.Tensor:
    from captum.robust import FGSM, PGD

    loss = _CrossEntropy()
    extra_arg = extra if extra else None
    if epsilon == 0:
        return x.detach().clone()
    x = x.detach().clone().requires_grad_(True)
    with warnings.catch_warnings():
        # PGD hands FGSM fresh tensors each step; Captum warns that it enables their grads.
        warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require")
        if attack == "fgsm":
            fgsm = FGSM(forward, loss_func=loss, lower_bound=bounds[0], upper_bound=bounds[1])
            return fgsm.perturb(x, epsilon, target, additional_forward_args=extra_arg).detach()
        pgd = PGD(forward, loss_func=loss, lower_bound=bounds[0], upper_bound=bounds[1])
        return pgd.perturb(
            x, epsilon, step_size, steps, target, additional_forward_args=extra_arg
        ).detach()


def robustness(
    chain: ChainLike,
    inputs: torch.Tensor | None = None,
    target: int | list[int] | torch.Tensor | None = None,
    additional_forward_args: Any = None,
    *,
    epsilon: float = 0.1,
    attacks: Sequence[str] = ATTACKS,
    pgd_steps: int = 10,
    pgd_step_size: float | None = None,
    lower_bound: float = -math.inf,
    upper_bound: float = math.inf,
    attack_on: AttackOn = "each",
    batch_size: int | None = None,
) -> RobustnessResult:
    """Target-class probability of model vs sub-network under FGSM / PGD (Fig. 5).

    Parameters
    ----------
    chain : Chain or SubNetwork
        The chain.
    inputs : Tensor, optional
        ``[N, ...]`` inputs to perturb; default the region stored in ``chain``.
    target : int, list of int or Tensor, optional
        Class whose probability is attacked and reported: the ground truth when known;
        default the original model's prediction on the clean inputs.
    additional_forward_args : Any, optional
        Extra forward arguments (Captum convention).
    epsilon : float
        L-inf radius of the perturbation, in the units of ``inputs`` (for normalized
        images, a pixel budget ``e`` is ``e / std``). Must be >= 0.
    attacks : sequence of {"fgsm", "pgd"}
        Which attacks to run. A "clean" row set is always included.
    pgd_steps : int
        Number of PGD steps.
    pgd_step_size : float, optional
        PGD step size; default ``2.5 * epsilon / pgd_steps``.
    lower_bound, upper_bound : float
        Valid range of the inputs (perturbed inputs are clamped into it).
    attack_on : {"each", "model", "subnetwork"}
        Whose gradients build the perturbations (see the module docstring).
    batch_size : int, optional
        Inputs per forward pass when evaluating probabilities.

    Returns
    -------
    RobustnessResult
        Per-input probabilities; ``gap(attack)`` and ``histograms()`` summarize them.

    Raises
    ------
    ValueError
        For ``epsilon < 0``, an unknown attack or ``attack_on``, ``pgd_steps < 1``.
    """
    if not isinstance(epsilon, (int, float)) or not epsilon >= 0 or not math.isfinite(epsilon):
        raise ValueError(
            f"epsilon must be a finite number >= 0 (the L-inf perturbation radius), got {epsilon!r}"
        )
    attacks = [attacks] if isinstance(attacks, str) else list(attacks)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; choose from {ATTACKS}")
    if attack_on not in ("each", "model", "subnetwork"):
        raise ValueError(f"attack_on must be 'each', 'model' or 'subnetwork', got {attack_on!r}")
    if isinstance(pgd_steps, bool) or not isinstance(pgd_steps, int) or pgd_steps < 1:
        raise ValueError(f"pgd_steps must be a positive int, got {pgd_steps!r}")
    if pgd_step_size is not None and not pgd_step_size > 0:
        raise ValueError(f"pgd_step_size must be > 0, got {pgd_step_size!r}")
    if not lower_bound < upper_bound:
        raise ValueError(f"lower_bound {lower_bound} must be < upper_bound {upper_bound}")
    sub = as_subnetwork(chain)
    items = region_inputs(chain, inputs)
    if len(items) != 1:
        raise TypeError("robustness supports models with a single input tensor")
    x = items[0]
    extra = format_additional_args(additional_forward_args)
    model = sub.model
    n = x.shape[0]
    clean = model_logits(model, (x,), extra, batch_size)
    if target is None:
        y = clean.argmax(dim=1)
    else:
        y = format_target(target, n, clean.shape[1])
        assert y is not None
        y = y.to(x.device)
    step = pgd_step_size if pgd_step_size is not None else 2.5 * float(epsilon) / pgd_steps
    bounds = (lower_bound, upper_bound)

    frames = [_rows("clean", x, x, y, model, sub, extra, batch_size)]
    adversarial: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with eval_mode(model):
        for attack in attacks:
            args = (y, extra, attack, float(epsilon), step, pgd_steps, bounds)
            # attack_on was validated above; an attack on one network is used for both
            if attack_on == "each":
                x_model = _attack(model, x, *args)
                x_sub = _attack(sub, x, *args)
            elif attack_on == "model":
                x_model = x_sub = _attack(model, x, *args)
            else:
                x_model = x_sub = _attack(sub, x, *args)
            adversarial[attack] = (x_model, x_sub)
            frames.append(_rows(attack, x_model, x_sub, y, model, sub, extra, batch_size))
    import pandas as pd

    return RobustnessResult(
        table=pd.concat(frames, ignore_index=True),
        epsilon=float(epsilon),
        attack_on=attack_on,
        adversarial=adversarial,
    )


def _rows(attack, x_model, x_sub, y, model, sub, extra, batch_size) -> Any:
    import pandas as pd

    pm = torch.softmax(model_logits(model, (x_model,), extra, batch_size), dim=1)
    ps = torch.softmax(chunked_logits(sub, (x_sub,), extra, batch_size), dim=1)
    return pd.DataFrame(
        {
            "attack": attack,
            "input": list(range(len(y))),
            "target": y.tolist(),
            "model_prob": pm.gather(1, y[:, None]).squeeze(1).double().tolist(),
            "subnetwork_prob": ps.gather(1, y[:, None]).squeeze(1).double().tolist(),
            "model_correct": (pm.argmax(1) == y).tolist(),
            "subnetwork_correct": (ps.argmax(1) == y).tolist(),
        }
    )
