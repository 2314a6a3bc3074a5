"""Pixel-perturbation curves (LeRF / MoRF) and Captum's infidelity / sensitivity.

LeRF / MoRF (Samek et al. 2017; Khakzar et al., CVPR 2021, Sec. 5.2): rank the
pixels of each input by the relevance of an attribution map, replace the least
(LeRF) or most (MoRF) relevant fraction :math:`q` of them by the image's
per-channel mean, and record the target output. A faithful map keeps the output
when unimportant pixels go (LeRF high and flat) and destroys it quickly when the
important ones go (MoRF low).

Definitions used here
---------------------
* Pixel relevance: :math:`r_{hw} = \\sum_c |A_{chw}|` (``relevance="abs"``, the
  default, since gradient signs are not importance) or :math:`\\sum_c A_{chw}`
  (``"signed"``).
* :math:`\\lfloor q\\,HW + 1/2 \\rfloor` pixels (all channels) are replaced; ties in
  relevance are broken by a seeded random permutation, so large zero regions are
  not removed in raster order.
* Output: the softmax probability of the target class, divided by its value on the
  intact input (``prob_ratio``), and the logit.
* Area under a curve: trapezoid rule over the fractions (0..0.9 by default),
  divided by the fraction range, so 1 means "output kept throughout".

:func:`captum_scores` adds Captum's ``infidelity`` (Yeh et al. 2019, Gaussian input
perturbations, ``normalize=True`` so methods of different scale compare) and
``sensitivity_max`` (maximum relative change of the explanation under uniform
input perturbations of radius 0.02).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from captum.metrics import infidelity, sensitivity_max
from torch import Tensor, nn

from captum_chains._utils.model_state import eval_mode
from captum_chains._utils.validation import (
    TargetType,
    format_additional_args,
    normalize_target,
    require_module,
    select_output,
    target_rows,
)

__all__ = [
    "DEFAULT_FRACTIONS",
    "PerturbationCurves",
    "captum_scores",
    "perturbation_curves",
    "pixel_relevance",
]

DEFAULT_FRACTIONS: tuple[float, ...] = (
    0.0,
    0.01,
    0.02,
    0.03,
    0.05,
    0.1,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
)


@dataclass(frozen=True)
class PerturbationCurves:
    """LeRF and MoRF curves of one attribution method on a batch of inputs.

    Attributes
    ----------
    fractions : np.ndarray
        ``[F]`` fractions of pixels removed.
    lerf_prob, morf_prob : np.ndarray
        ``[F, N]`` target probability after removing the least / most relevant pixels.
    lerf_logit, morf_logit : np.ndarray
        ``[F, N]`` target logit.
    base_prob, base_logit : np.ndarray
        ``[N]`` values on the intact inputs.
    """

    fractions: np.ndarray
    lerf_prob: np.ndarray = field(repr=False)
    morf_prob: np.ndarray = field(repr=False)
    lerf_logit: np.ndarray = field(repr=False)
    morf_logit: np.ndarray = field(repr=False)
    base_prob: np.ndarray = field(repr=False)
    base_logit: np.ndarray = field(repr=False)

    def prob_ratio(self, order: Literal["lerf", "morf"]) -> np.ndarray:
        """``[F, N]`` target probability relative to the intact input."""
        probs = self.lerf_prob if order == "lerf" else self.morf_prob
        return probs / np.maximum(self.base_prob, np.finfo(float).tiny)

    def auc(self, order: Literal["lerf", "morf"]) -> np.ndarray:
        """``[N]`` normalized area under the probability-ratio curve."""
        ratio = self.prob_ratio(order)
        span = float(self.fractions[-1] - self.fractions[0]) or 1.0
        widths = np.diff(self.fractions)[:, None]
        area = ((ratio[1:] + ratio[:-1]) / 2 * widths).sum(axis=0)  # trapezoid rule
        return area / span

    def summary(self) -> dict[str, float]:
        """Mean LeRF AUC (higher is better), MoRF AUC (lower is better) and their gap."""
        lerf, morf = self.auc("lerf"), self.auc("morf")
        return {
            "lerf_auc": float(lerf.mean()),
            "morf_auc": float(morf.mean()),
            "gap": float((lerf - morf).mean()),
        }


def pixel_relevance(attributions: Tensor, relevance: Literal["abs", "signed"] = "abs") -> Tensor:
    """Reduce ``[N, C, H, W]`` (or ``[N, H, W]``) attributions to ``[N, H, W]`` pixel scores."""
    if relevance not in ("abs", "signed"):
        raise ValueError(f"relevance must be 'abs' or 'signed', got {relevance!r}")
    attr = attributions.detach()
    if attr.ndim == 3:
        attr = attr.unsqueeze(1)
    if attr.ndim != 4:
        raise ValueError(f"attributions must be [N, C, H, W] or [N, H, W], got {tuple(attr.shape)}")
    return (attr.abs() if relevance == "abs" else attr).sum(1)


def _removal_order(scores: Tensor, descending: bool, generator: torch.Generator) -> Tensor:
    n, pixels = scores.shape
    out = torch.empty_like(scores, dtype=torch.long)
    for i in range(n):
        perm = torch.randperm(pixels, generator=generator)
        order = torch.sort(scores[i, perm], descending=descending, stable=True).indices
        out[i] = perm[order]
    return out


def perturbation_curves(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor,
    target: TargetType = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    additional_forward_args: Any = None,
    relevance: Literal["abs", "signed"] = "abs",
    batch_size: int = 32,
    seed: int = 0,
) -> PerturbationCurves:
    """LeRF and MoRF curves for one attribution map per input.

    Parameters
    ----------
    model : nn.Module
        Classifier returning logits ``[N, classes]`` (run in eval mode, restored).
    inputs : Tensor
        Images ``[N, C, H, W]``.
    attributions : Tensor
        ``[N, C', H, W]`` with ``C'`` 1 or ``C``, or ``[N, H, W]``; must have the
        inputs' spatial size (upsample layer maps such as GradCAM first).
    target : TargetType, optional
        Class per input; default the model's prediction on the intact inputs.
    fractions : sequence of float
        Increasing fractions in ``[0, 1]`` of pixels to remove.
    additional_forward_args : Any
        Extra positional arguments of ``forward``.
    relevance : {"abs", "signed"}
        Pixel relevance (see the module docstring).
    batch_size : int
        Images per forward pass.
    seed : int
        Seed of the tie-breaking permutation.

    Returns
    -------
    PerturbationCurves
    """
    require_module(model, "perturbation_curves")
    if not isinstance(inputs, Tensor) or inputs.ndim != 4:
        raise ValueError("inputs must be images [N, C, H, W]")
    frac = np.asarray(list(fractions), dtype=float)
    if frac.ndim != 1 or not len(frac) or np.any(np.diff(frac) <= 0):
        raise ValueError(f"fractions must be strictly increasing, got {list(fractions)}")
    if frac[0] < 0 or frac[-1] > 1:
        raise ValueError(f"fractions must lie in [0, 1], got {list(fractions)}")
    scores = pixel_relevance(attributions, relevance)
    n, _, height, width = inputs.shape
    if tuple(scores.shape) != (n, height, width):
        raise ValueError(
            f"attributions {tuple(attributions.shape)} do not match inputs "
            f"{tuple(inputs.shape)} spatially; upsample them to {height}x{width} first"
        )
    args = format_additional_args(additional_forward_args)
    x = inputs.detach()
    generator = torch.Generator().manual_seed(seed)
    flat = scores.reshape(n, -1).float().cpu()
    orders = {
        "lerf": _removal_order(flat, descending=False, generator=generator),
        "morf": _removal_order(flat, descending=True, generator=generator),
    }
    fill = x.mean(dim=(2, 3), keepdim=True)
    pixels = height * width
    counts = [int(np.floor(q * pixels + 0.5)) for q in frac]
    with eval_mode(model), torch.no_grad():
        if target is None:
            target = model(x, *args).argmax(1)
        target = normalize_target(target, n)
        results: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, order in orders.items():
            images, example = [], []
            for count in counts:
                removed = torch.zeros(n, pixels, dtype=torch.bool)
                removed.scatter_(1, order[:, :count], True)
                removed = removed.view(n, 1, height, width).to(x.device)
                images.append(torch.where(removed, fill, x))
                example.append(torch.arange(n))
            stacked = torch.cat(images)
            rows = torch.cat(example)
            probs, logits = [], []
            for start in range(0, len(stacked), batch_size):
                sl = slice(start, start + batch_size)
                chunk_args = tuple(
                    a[rows[sl].to(a.device)]
                    if isinstance(a, Tensor) and a.ndim and a.shape[0] == n
                    else a
                    for a in args
                )
                out = model(stacked[sl], *chunk_args)
                chunk_target = target_rows(target, rows[sl])
                probs.append(select_output(out.softmax(1), chunk_target).cpu())
                logits.append(select_output(out, chunk_target).cpu())
            shape = (len(counts), n)
            results[name] = (
                torch.cat(probs).double().numpy().reshape(shape),
                torch.cat(logits).double().numpy().reshape(shape),
            )
        base = model(x, *args)
        base_prob = select_output(base.softmax(1), target).double().cpu().numpy()
        base_logit = select_output(base, target).double().cpu().numpy()
    return PerturbationCurves(
        fractions=frac,
        lerf_prob=results["lerf"][0],
        morf_prob=results["morf"][0],
        lerf_logit=results["lerf"][1],
        morf_logit=results["morf"][1],
        base_prob=base_prob,
        base_logit=base_logit,
    )


def captum_scores(
    model: nn.Module,
    inputs: Tensor,
    explanation_func: Callable[..., Tensor] | None,
    attributions: Tensor,
    target: TargetType,
    n_perturb_samples: int = 10,
    noise_std: float = 0.1,
    sensitivity_radius: float = 0.02,
    seed: int = 0,
    max_examples_per_batch: int | None = None,
    **explanation_kwargs: Any,
) -> dict[str, Tensor]:
    """Captum's ``infidelity`` and ``sensitivity_max`` of one method, per input.

    Parameters
    ----------
    model : nn.Module
        The classifier (eval mode during the call, restored after).
    inputs : Tensor
        ``[N, ...]`` inputs.
    explanation_func : callable or None
        The method's ``attribute`` (called by ``sensitivity_max`` on perturbed inputs
        with ``target=`` and ``explanation_kwargs``); ``None`` skips sensitivity
        (reported as NaN), e.g. for methods too slow to rerun ``n_perturb_samples``
        times.
    attributions : Tensor
        The method's attributions of ``inputs`` (for infidelity); same shape as
        ``inputs`` (broadcast a 1-channel map before).
    target : TargetType
        Targets (Captum formats).
    n_perturb_samples : int
        Perturbations per input for both metrics.
    noise_std : float
        Standard deviation of infidelity's Gaussian perturbations.
    sensitivity_radius : float
        ``perturb_radius`` of ``sensitivity_max`` (uniform noise in ``[-r, r]``).
    seed : int
        Both metrics draw their perturbations after ``torch.manual_seed(seed)``
        (inside ``torch.random.fork_rng``), so methods see the same noise.
    max_examples_per_batch : int, optional
        Passed to both Captum metrics.

    Returns
    -------
    dict
        ``{"infidelity": Tensor[N], "sensitivity_max": Tensor[N]}``.
    """
    require_module(model, "captum_scores")
    if attributions.shape != inputs.shape:
        attributions = attributions.expand_as(inputs)

    def perturb(x: Tensor) -> tuple[Tensor, Tensor]:
        noise = torch.randn_like(x) * noise_std
        return noise, x - noise

    with eval_mode(model):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            infid = infidelity(
                model,
                perturb,
                inputs,
                attributions.detach(),
                target=target,
                n_perturb_samples=n_perturb_samples,
                max_examples_per_batch=max_examples_per_batch,
                normalize=True,
            )
        if explanation_func is None:
            return {
                "infidelity": infid.detach().cpu(),
                "sensitivity_max": torch.full((inputs.shape[0],), float("nan")),
            }
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sens = sensitivity_max(
                explanation_func,
                inputs,
                perturb_radius=sensitivity_radius,
                n_perturb_samples=n_perturb_samples,
                max_examples_per_batch=max_examples_per_batch,
                target=target,
                **explanation_kwargs,
            )
    return {"infidelity": infid.detach().cpu(), "sensitivity_max": sens.detach().cpu()}
