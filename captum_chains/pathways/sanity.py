"""Model-randomization sanity check (Adebayo et al., NeurIPS 2018) for saliency maps.

*Cascading randomization*: starting from the top of the network (the logits), the
parameters of one more layer are re-drawn at each step, cumulatively, down to the
input layer; after each step the explanation is recomputed and compared with the
explanation of the trained model. An explanation that depends on what the model
learned must change: rank correlations and SSIM fall towards 0. Khakzar et al.
(CVPR 2021, Sec. 5.3) report absolute Spearman correlations at full randomization of
about 0.12 (NeuronMCT) and 0.15 (NeuronIntGrad) against 0.42 (GradCAM) on ResNet-50.

Protocol (following the paper's scripts where they are explicit)
----------------------------------------------------------------
* The user's model is never touched: a deep copy is randomized.
* Each step re-draws *all* parameters (weights and biases, norm-layer affine
  parameters included) of one module from :math:`\\mathcal N(0, 0.1^2)`; buffers
  (BN running statistics) are kept. By default the modules are those owning
  parameters, in reverse order of their first call in the forward pass; pass
  ``layers=`` (module names, top first) for coarser steps, e.g. whole blocks.
* The target stays fixed: the given one, or the trained model's prediction.
* Maps are reduced to one channel by the largest-magnitude signed channel
  (:func:`~captum_chains.pathways.gradient.max_magnitude_channel`) and divided by their
  largest absolute value. Per input: Spearman rank correlation of the signed maps
  and of their absolute values, and SSIM (window 5, data range 2) of the signed
  maps, each against the trained model's map.
* A map that is constant (e.g. all zeros: the pathway gradient vanishes when no
  neuron of the first activation layer is on the pathway) has no ranking; its rank
  correlations are reported as 0, and such maps are counted in
  :attr:`RandomizationResult.constant`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats
from skimage.metrics import structural_similarity
from torch import Tensor, nn

from captum_chains._utils.progress import tqdm
from captum_chains._utils.validation import (
    TargetType,
    format_additional_args,
    format_inputs,
    normalize_target,
    require_module,
)
from captum_chains.pathways.gradient import max_magnitude_channel

__all__ = [
    "RandomizationResult",
    "cascading_randomization",
    "default_randomization_layers",
    "map_similarity",
]

Explain = Callable[[nn.Module, Tensor, TargetType], Tensor]
"""``explain(model, inputs, target) -> attributions`` (``[N, C, H, W]`` or ``[N, H, W]``)."""


@dataclass(frozen=True)
class RandomizationResult:
    """Similarity of each randomization step's maps to the trained model's maps.

    Attributes
    ----------
    steps : tuple of str
        ``"original"`` then the module randomized at each step (cumulative).
    spearman, spearman_abs, ssim : np.ndarray
        ``[len(steps), n_inputs]``; row 0 compares the original maps with themselves.
    constant : np.ndarray
        ``[len(steps), n_inputs]`` booleans: the step's map is constant (its rank
        correlations are set to 0).
    maps : list of Tensor or None
        The reduced, normalized maps ``[n_inputs, H, W]`` of every step, when kept.
    """

    steps: tuple[str, ...]
    spearman: np.ndarray = field(repr=False)
    spearman_abs: np.ndarray = field(repr=False)
    ssim: np.ndarray = field(repr=False)
    constant: np.ndarray = field(repr=False)
    maps: list[Tensor] | None = field(default=None, repr=False)

    def summary(self) -> Any:
        """A ``pandas.DataFrame``: the mean of each metric over inputs, per step."""
        import pandas as pd

        return pd.DataFrame(
            {
                "step": list(self.steps),
                "spearman": np.nanmean(self.spearman, axis=1),
                "spearman_abs": np.nanmean(self.spearman_abs, axis=1),
                "ssim": np.nanmean(self.ssim, axis=1),
                "constant_maps": self.constant.mean(axis=1),
            }
        )

    def final(self) -> dict[str, float]:
        """Mean metrics at full randomization (the last step)."""
        return {
            "spearman": float(np.nanmean(self.spearman[-1])),
            "spearman_abs": float(np.nanmean(self.spearman_abs[-1])),
            "ssim": float(np.nanmean(self.ssim[-1])),
            "constant_maps": float(self.constant[-1].mean()),
        }


def default_randomization_layers(
    model: nn.Module, inputs: Tensor | tuple[Tensor, ...], additional_forward_args: Any = None
) -> list[str]:
    """Modules that own parameters, in reverse order of their first forward call.

    Runs one forward pass (no gradients) on a deep copy to observe the order.
    """
    formatted = format_inputs(inputs, strict=False)
    args = format_additional_args(additional_forward_args)
    clone = copy.deepcopy(model).eval()
    order: list[str] = []
    handles = []
    try:
        for name, module in clone.named_modules():
            if next(module.parameters(recurse=False), None) is None:
                continue

            def hook(mod: nn.Module, inp: Any, _name: str = name) -> None:
                if _name not in order:
                    order.append(_name)

            handles.append(module.register_forward_pre_hook(hook))
        with torch.no_grad():
            clone(*formatted, *args)
    finally:
        for handle in handles:
            handle.remove()
    return order[::-1]


def _to_map(attributions: Tensor | tuple[Tensor, ...]) -> Tensor:
    attr = attributions[0] if isinstance(attributions, tuple) else attributions
    attr = attr.detach().float().cpu()
    if attr.ndim == 4:
        attr = max_magnitude_channel(attr)[:, 0]
    if attr.ndim not in (2, 3):
        raise ValueError(
            f"explanations must be [N, C, H, W], [N, H, W] or [N, F], got {tuple(attr.shape)}"
        )
    scale = attr.flatten(1).abs().amax(1).clamp_min(torch.finfo(attr.dtype).tiny)
    return attr / scale.view(-1, *([1] * (attr.ndim - 1)))


def map_similarity(reference: Tensor, other: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-input Spearman (signed), Spearman (absolute) and SSIM of two map batches.

    Both are ``[N, H, W]`` (or ``[N, F]``, then SSIM is NaN) normalized to ``[-1, 1]``.
    When either map is constant the rank correlations are 0 (no shared ranking).
    """
    n = reference.shape[0]
    rho, rho_abs, ssim = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    for i in range(n):
        a, b = reference[i].numpy().ravel(), other[i].numpy().ravel()
        rho[i] = _spearman(a, b)
        rho_abs[i] = _spearman(np.abs(a), np.abs(b))
        if reference.ndim == 3 and min(reference.shape[1:]) >= 5:
            ssim[i] = structural_similarity(
                reference[i].numpy(), other[i].numpy(), win_size=5, data_range=2.0
            )
    return rho, rho_abs, ssim


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(stats.spearmanr(a, b).statistic)


def _is_constant(maps: Tensor) -> np.ndarray:
    flat = maps.flatten(1)
    return (flat.amax(1) == flat.amin(1)).numpy()


def cascading_randomization(
    model: nn.Module,
    inputs: Tensor,
    explain: Explain,
    target: TargetType = None,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    std: float = 0.1,
    keep_maps: bool = False,
    progress: bool = False,
) -> RandomizationResult:
    """Cascading model-parameter randomization test of an explanation method.

    Parameters
    ----------
    model : nn.Module
        The trained model (left unchanged; a deep copy is randomized).
    inputs : Tensor
        Inputs ``[N, ...]``.
    explain : callable
        ``explain(model, inputs, target) -> attributions``; called with the copy.
    target : TargetType, optional
        Fixed target; default the trained model's predicted class per input.
    layers : sequence of str, optional
        Modules to randomize, top first, one per step (all their parameters,
        recursively). Default :func:`default_randomization_layers`.
    seed : int
        Seed of the random parameters (step ``i`` uses ``seed + i``).
    std : float
        Standard deviation of the normal distribution the parameters are drawn from.
    keep_maps : bool
        Keep the normalized maps of every step.
    progress : bool
        Show a progress bar.

    Returns
    -------
    RandomizationResult
    """
    require_module(model, "cascading_randomization")
    if not isinstance(inputs, Tensor):
        raise TypeError("inputs must be a tensor [N, ...]")
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}")
    clone = copy.deepcopy(model).eval()
    if target is None:
        with torch.no_grad():
            target = clone(inputs).argmax(1)
    target = normalize_target(target, inputs.shape[0])
    names = list(layers) if layers is not None else default_randomization_layers(model, inputs)
    modules = []
    for name in names:
        try:
            modules.append(clone.get_submodule(name))
        except AttributeError as err:
            raise ValueError(f"layer {name!r} is not a submodule of the model") from err
    original = _to_map(explain(clone, inputs, target))
    rows = [map_similarity(original, original)]
    constant = [_is_constant(original)]
    maps = [original] if keep_maps else None
    done: set[int] = set()
    steps = tqdm(modules, desc="randomization", disable=not progress)
    for step, module in enumerate(steps, start=1):
        generator = torch.Generator().manual_seed(seed + step)
        with torch.no_grad():
            for param in module.parameters():
                if id(param) in done:
                    continue
                done.add(id(param))
                draw = torch.randn(param.shape, generator=generator, dtype=torch.float64)
                param.copy_((draw * std).to(param.dtype))
        current = _to_map(explain(clone, inputs, target))
        rows.append(map_similarity(original, current))
        constant.append(_is_constant(current))
        if maps is not None:
            maps.append(current)
    return RandomizationResult(
        steps=("original", *names),
        spearman=np.stack([r[0] for r in rows]),
        spearman_abs=np.stack([r[1] for r in rows]),
        ssim=np.stack([r[2] for r in rows]),
        constant=np.stack(constant),
        maps=maps,
    )
