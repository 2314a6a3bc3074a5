"""NeuroChains beside Captum's own attribution methods, in one call.

For each input, :func:`compare` shows the image, each Captum method's attribution on the
original model and the same method's attribution on the chain's sub-network, and
NeuroChains' own input-level map (combined SMOE scale of the kept layers, see
:func:`captum_chains.visualization.smoe_saliency`). Beside every sub-network panel it
reports the Spearman rank correlation between the method's map on the model and on the
sub-network: how much of what the method sees survives in the chain.

The sub-network's attributions run the original model inside
:func:`captum_chains.masking.apply_masks` (the same computation as calling the
:class:`SubNetwork`); Captum's layer hooks are registered *after* the masks, so a layer
method such as ``LayerGradCam`` reads the layer's masked activations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import numpy as np
import torch
from captum.attr import Attribution, IntegratedGradients, LayerAttribution, LayerGradCam, Saliency
from captum.attr import visualization as viz
from matplotlib.figure import Figure

from captum_chains._utils.model_state import eval_mode
from captum_chains.masking import apply_masks
from captum_chains.visualization._common import (
    Denormalize,
    chain_kept,
    display_images,
    new_figure,
    rank_correlation,
    require_inputs,
    resolve,
    spatial_units,
)
from captum_chains.visualization.feature_maps import smoe_saliency

DEFAULT_METHODS: tuple[type[Attribution], ...] = (IntegratedGradients, LayerGradCam, Saliency)
SHORT_NAMES = {"IntegratedGradients": "IG", "LayerGradCam": "Grad-CAM", "Saliency": "Saliency"}


@dataclass
class Comparison:
    """Attributions of Captum methods on the model and on the sub-network.

    Attributes
    ----------
    methods : list of str
        Method names (class names).
    targets : Tensor
        ``[N]`` target class per input (default: the original model's prediction).
    original, subnetwork : dict of str to Tensor
        Method -> ``[N, H, W]`` map at input resolution, channels summed (layer methods
        upsampled bilinearly), before the display sign.
    signs : dict of str to str
        Method -> the sign used to display and rank (``"absolute_value"`` or ``"positive"``).
    neurochains : Tensor
        ``[N, H, W]`` combined SMOE scale map of the sub-network.
    rank_correlation : dict of str to list of float
        Method -> per-input Spearman correlation between its model and sub-network maps
        (after the sign).
    layer : str or None
        Module used by layer methods.
    """

    methods: list[str]
    targets: torch.Tensor
    original: dict[str, torch.Tensor]
    subnetwork: dict[str, torch.Tensor]
    signs: dict[str, str]
    neurochains: torch.Tensor
    rank_correlation: dict[str, list[float]] = field(default_factory=dict)
    layer: str | None = None

    def table(self) -> str:
        """Mean (min-max) rank correlation per method, one line each; ``n/a`` where every
        input's rho is undefined (a constant map, e.g. all zero on the sub-network)."""
        lines = ["method                  mean rho   min     max"]
        for m in self.methods:
            r = _defined(self.rank_correlation[m])
            if r.size == 0:
                lines.append(f"{m:<22}  {'n/a':>7}  {'n/a':>6}  {'n/a':>6}  (constant maps)")
                continue
            lines.append(f"{m:<22}  {r.mean():7.3f}  {r.min():6.3f}  {r.max():6.3f}")
        return "\n".join(lines)


def _defined(values: Sequence[float]) -> np.ndarray:
    """The finite rank correlations (rho is NaN for an input whose map is constant)."""
    r = np.asarray(values, dtype=float)
    return r[np.isfinite(r)]


def _mean_text(values: Sequence[float]) -> str:
    r = _defined(values)
    return f"{r.mean():.2f}" if r.size else "n/a"


def _signed(attr: torch.Tensor, sign: str) -> torch.Tensor:
    if sign == "absolute_value":
        return attr.abs()
    if sign == "positive":
        return attr.clamp_min(0)
    if sign == "negative":
        return (-attr).clamp_min(0)
    if sign == "all":
        return attr
    raise ValueError(f"unknown sign {sign!r}; use absolute_value, positive, negative or all")


def default_layer(chain: Any) -> str:
    """The score-site module of the deepest convolutional layer with kept filters."""
    sub, _ = resolve(chain)
    kept = chain_kept(sub)
    pool = [u for u in spatial_units(sub.structure) if bool(kept[u.name].any())]
    if not pool:
        raise ValueError("the chain keeps no convolutional filter; pass layer=... explicitly")
    return pool[-1].site


def _method_name(method: Any) -> str:
    return method.__name__ if isinstance(method, type) else type(method).__name__


def _run(
    method: type[Attribution],
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    layer: str,
    kwargs: Mapping[str, Any],
) -> torch.Tensor:
    build: Any = method  # each Captum method has its own constructor and attribute()
    if issubclass(method, LayerAttribution):
        algo = build(model, model.get_submodule(layer))
    else:
        algo = build(model)
    attr = algo.attribute(inputs, target=targets, **dict(kwargs))
    if isinstance(attr, tuple):
        attr = attr[0]
    attr = attr.detach().float()
    if attr.shape[-2:] != inputs.shape[-2:]:
        attr = LayerAttribution.interpolate(attr, tuple(inputs.shape[-2:]), "bilinear")
    return attr.sum(dim=1) if attr.ndim == 4 else attr


def compare_attributions(
    chain: Any,
    inputs: torch.Tensor | None = None,
    methods: Sequence[type[Attribution]] = DEFAULT_METHODS,
    *,
    target: int | Sequence[int] | torch.Tensor | None = None,
    layer: str | None = None,
    method_kwargs: Mapping[Any, Mapping[str, Any]] | None = None,
    signs: Mapping[Any, str] | None = None,
    neurochains_layers: Any = "scales",
) -> Comparison:
    """Compute every method on the model and on the sub-network (no drawing).

    Parameters
    ----------
    chain : Chain or SubNetwork
        The chain.
    inputs : Tensor, optional
        ``[N, C, H, W]`` inputs; default the chain's region.
    methods : sequence of Captum attribution classes
        E.g. ``[IntegratedGradients, LayerGradCam, Saliency]``. Layer methods get
        ``layer``; each is built as ``Method(forward_func)`` or
        ``Method(forward_func, layer_module)``.
    target : int, sequence of int or Tensor, optional
        Target class(es); default the original model's predicted class per input.
    layer : str, optional
        Module name for layer methods; default the score site of the deepest kept
        convolutional layer (:func:`default_layer`).
    method_kwargs : mapping, optional
        Extra ``attribute`` arguments per method (keyed by class or class name), e.g.
        ``{IntegratedGradients: {"n_steps": 32}}``.
    signs : mapping, optional
        Display sign per method (class or name); default ``"positive"`` for Grad-CAM and
        ``"absolute_value"`` otherwise.
    neurochains_layers : see :func:`captum_chains.visualization.smoe_saliency`.
    """
    sub, x = resolve(chain, inputs)
    x = require_inputs(x, "compare")
    if not methods:
        raise ValueError("methods is empty; pass e.g. [IntegratedGradients, LayerGradCam]")
    for m in methods:
        if not (isinstance(m, type) and issubclass(m, Attribution)):
            raise TypeError(
                f"methods must be Captum attribution classes (e.g. captum.attr.Saliency), got {m!r}"
            )
    model = sub.model
    kwargs_by = {
        (_method_name(k) if not isinstance(k, str) else k): v
        for k, v in (method_kwargs or {}).items()
    }
    signs_by = {
        (_method_name(k) if not isinstance(k, str) else k): v for k, v in (signs or {}).items()
    }
    with eval_mode(model), torch.no_grad():
        logits = model(x)
    if target is None:
        targets = logits.argmax(dim=1)
    else:
        targets = torch.as_tensor(target, device=x.device).reshape(-1)
        if targets.numel() == 1:
            targets = targets.expand(x.shape[0])
        if targets.numel() != x.shape[0]:
            raise ValueError(f"target gives {targets.numel()} classes for {x.shape[0]} inputs")
    needs_layer = any(issubclass(m, LayerAttribution) for m in methods)
    layer_name = (layer or default_layer(sub)) if needs_layer else layer
    if layer_name is not None:
        try:
            model.get_submodule(layer_name)
        except AttributeError:
            raise ValueError(f"the model has no module {layer_name!r} (layer=...)") from None
    names = [_method_name(m) for m in methods]
    original: dict[str, torch.Tensor] = {}
    subnet: dict[str, torch.Tensor] = {}
    for network, store in (("original", original), ("subnetwork", subnet)):
        ctx = (
            apply_masks(model, sub.structure, sub.mask_state())
            if network == "subnetwork"
            else eval_mode(model)
        )
        with ctx:
            for m, name in zip(methods, names):
                store[name] = _run(
                    m, model, x, targets, layer_name or "", kwargs_by.get(name, {})
                ).cpu()
    sign_of = {
        n: signs_by.get(n, "positive" if "GradCam" in n else "absolute_value") for n in names
    }
    rho = {
        n: [
            rank_correlation(_signed(original[n][i], sign_of[n]), _signed(subnet[n][i], sign_of[n]))
            for i in range(x.shape[0])
        ]
        for n in names
    }
    nc = smoe_saliency(sub, x, neurochains_layers)
    return Comparison(
        methods=names,
        targets=targets.cpu(),
        original=original,
        subnetwork=subnet,
        signs=sign_of,
        neurochains=nc,
        rank_correlation=rho,
        layer=layer_name,
    )


@overload
def compare(
    chain: Any,
    inputs: torch.Tensor | None = ...,
    methods: Sequence[type[Attribution]] = ...,
    *,
    target: int | Sequence[int] | torch.Tensor | None = ...,
    layer: str | None = ...,
    method_kwargs: Mapping[Any, Mapping[str, Any]] | None = ...,
    signs: Mapping[Any, str] | None = ...,
    max_inputs: int = ...,
    denormalize: Denormalize | None = ...,
    class_names: Sequence[str] | None = ...,
    neurochains_layers: Any = ...,
    panel_size: float = ...,
    return_result: Literal[False] = ...,
) -> Figure: ...


@overload
def compare(
    chain: Any,
    inputs: torch.Tensor | None = ...,
    methods: Sequence[type[Attribution]] = ...,
    *,
    target: int | Sequence[int] | torch.Tensor | None = ...,
    layer: str | None = ...,
    method_kwargs: Mapping[Any, Mapping[str, Any]] | None = ...,
    signs: Mapping[Any, str] | None = ...,
    max_inputs: int = ...,
    denormalize: Denormalize | None = ...,
    class_names: Sequence[str] | None = ...,
    neurochains_layers: Any = ...,
    panel_size: float = ...,
    return_result: Literal[True],
) -> tuple[Figure, Comparison]: ...


def compare(
    chain: Any,
    inputs: torch.Tensor | None = None,
    methods: Sequence[type[Attribution]] = DEFAULT_METHODS,
    *,
    target: int | Sequence[int] | torch.Tensor | None = None,
    layer: str | None = None,
    method_kwargs: Mapping[Any, Mapping[str, Any]] | None = None,
    signs: Mapping[Any, str] | None = None,
    max_inputs: int = 4,
    denormalize: Denormalize | None = None,
    class_names: Sequence[str] | None = None,
    neurochains_layers: Any = "scales",
    panel_size: float = 1.75,
    return_result: bool = False,
) -> Figure | tuple[Figure, Comparison]:
    """Show each Captum method on the model and on the sub-network, beside NeuroChains' map.

    One row per input (at most ``max_inputs``): the image; for each method the
    attribution on the original model and on the sub-network (titled with the Spearman
    rank correlation rho between the two); and NeuroChains' combined SMOE map. Panels are
    drawn with :func:`captum.attr.visualization.visualize_image_attr`
    (``blended_heat_map``).

    Parameters are those of :func:`compare_attributions`, plus ``max_inputs``,
    ``denormalize`` (model input -> [0, 1] image), ``class_names`` (for row labels),
    ``panel_size`` (inches) and ``return_result`` (also return the :class:`Comparison`).

    Examples
    --------
    >>> from captum.attr import IntegratedGradients, LayerGradCam, Saliency
    >>> methods = [IntegratedGradients, LayerGradCam, Saliency]
    >>> fig = compare(chain, inputs, methods=methods)  # doctest: +SKIP
    >>> fig.savefig("compare.png")  # doctest: +SKIP
    """
    _, x = resolve(chain, inputs)
    x = require_inputs(x, "compare")
    if max_inputs < 1:
        raise ValueError(f"max_inputs must be >= 1, got {max_inputs}")
    x = x[:max_inputs]
    result = compare_attributions(
        chain,
        x,
        methods,
        target=target,
        layer=layer,
        method_kwargs=method_kwargs,
        signs=signs,
        neurochains_layers=neurochains_layers,
    )
    images = display_images(x, denormalize)
    n, names = x.shape[0], result.methods
    cols = 2 + 2 * len(names)
    fig = new_figure(cols * panel_size, n * panel_size + 0.9)
    axes = np.atleast_2d(fig.subplots(n, cols, squeeze=False))
    for i in range(n):
        t = int(result.targets[i])
        label = class_names[t] if class_names is not None and t < len(class_names) else f"class {t}"
        axes[i, 0].imshow(images[i])
        axes[i, 0].set_xticks([])
        axes[i, 0].set_yticks([])
        axes[i, 0].set_ylabel(f"input {i}\n{label}", fontsize=7)
        for j, name in enumerate(names):
            short = SHORT_NAMES.get(name, name)
            for k, (maps, who) in enumerate(
                ((result.original, "model"), (result.subnetwork, "sub-net"))
            ):
                ax = axes[i, 1 + 2 * j + k]
                title = f"{short} · {who}"
                if k == 1:
                    title += f"\nρ = {result.rank_correlation[name][i]:.2f}"
                _panel(fig, ax, maps[name][i].numpy(), images[i], result.signs[name], title)
        _panel(
            fig,
            axes[i, -1],
            result.neurochains[i].numpy(),
            images[i],
            "positive",
            "NeuroChains\nSMOE (sub-net)",
        )
    means = ", ".join(
        f"{SHORT_NAMES.get(m, m)} {_mean_text(result.rank_correlation[m])}" for m in names
    )
    fig.suptitle(f"Captum on the model vs on the chain's sub-network — mean ρ: {means}", fontsize=9)
    fig.tight_layout()
    return (fig, result) if return_result else fig


def _panel(
    fig: Figure, ax: Any, attr: np.ndarray, image: np.ndarray, sign: str, title: str
) -> None:
    if not np.any(_signed(torch.as_tensor(attr), sign).numpy() > 0):
        ax.imshow(image.mean(axis=2), cmap="gray")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title + "\n(all zero)", fontsize=7)
        return
    viz.visualize_image_attr(
        attr[..., None],
        image,
        method="blended_heat_map",
        sign=sign,
        plt_fig_axis=(fig, ax),
        outlier_perc=2,
        alpha_overlay=0.6,
        cmap="jet" if sign != "all" else None,
        use_pyplot=False,
    )
    ax.set_title(title, fontsize=7)
