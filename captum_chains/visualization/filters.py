"""Pictures of kept filters: activation maximization and top-activating crops.

Activation maximization (Erhan, Bengio, Courville and Vincent, "Visualizing
higher-layer features of a deep network", 2009) searches an input image that makes one
filter fire strongly: ``x* = argmax_x  mean_p a_f(x)[p]``, the mean over positions of
the filter's map at its score site (after BatchNorm). Plain gradient ascent on pixels
gives high-frequency noise; recognisable pictures come from regularisation
(Olah, Mordvintsev and Schubert, "Feature Visualization", Distill 2017):

* a *Fourier parametrisation*: the image is the inverse real FFT of a learned spectrum
  whose frequency ``f`` is scaled by ``1 / max(f, 1/size)^decay`` (a 1/f prior);
* *colour decorrelation*: the three colour channels are produced from decorrelated ones
  through the square root of the colour covariance of real images (here: of the region);
* a sigmoid keeps pixels in [0, 1];
* *transformation robustness*: every step draws a random jitter, scale and rotation.

All filters of a call are optimized together as one batch (each image only feeds its
own filter's objective; the model runs in eval mode), and all randomness comes from one
``torch.Generator`` seeded by ``seed``, so the pictures are deterministic.

Top-activating crops are the patches of real inputs (the region, and optionally a
larger pool) where a filter's map peaks, one per input, cut at the layer's effective
receptive field.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from captum_chains._utils.model_state import eval_mode
from captum_chains._utils.progress import tqdm
from captum_chains.masking import apply_masks
from captum_chains.units.base import UnitLayer
from captum_chains.visualization._common import (
    Denormalize,
    Network,
    _capture_hooks,
    _Stop,
    chain_kept,
    chain_scores,
    display_images,
    new_figure,
    pick_units,
    resolve,
    site_maps,
    spatial_units,
)


@dataclass
class FilterPictures:
    """Result of :func:`activation_maximization`.

    Attributes
    ----------
    layer : str
        The unit layer.
    filters : list of int
        Filter indices, one per picture.
    images : Tensor
        ``[F, C, H, W]`` pictures with values in [0, 1] (display space).
    start_activation, final_activation : Tensor
        ``[F]`` objective (mean of the filter's map) of the starting image and of the
        final picture, both without random transformations.
    """

    layer: str
    filters: list[int]
    images: torch.Tensor
    start_activation: torch.Tensor
    final_activation: torch.Tensor

    @property
    def labels(self) -> list[str]:
        """Paper-style names, e.g. ``layer3.0.conv3.683``."""
        return [f"{self.layer}.{f}" for f in self.filters]


@dataclass
class TopCrops:
    """Result of :func:`top_activating_crops`.

    Attributes
    ----------
    layer : str
        The unit layer.
    filters : list of int
        Filter indices.
    crops : Tensor
        ``[F, k, 3, s, s]`` display images in [0, 1].
    values : Tensor
        ``[F, k]`` peak value of the filter's map in each crop (descending).
    sources : Tensor
        ``[F, k]`` index of the input each crop comes from (region first, then pool).
    boxes : Tensor
        ``[F, k, 4]`` crop boxes ``(top, left, height, width)`` in input pixels.
    """

    layer: str
    filters: list[int]
    crops: torch.Tensor
    values: torch.Tensor
    sources: torch.Tensor
    boxes: torch.Tensor


# ---------------------------------------------------------------------- parametrization
def color_sqrt_covariance(images: torch.Tensor) -> torch.Tensor:
    """Square root of the 3x3 colour covariance of ``[N, 3, H, W]`` images in [0, 1].

    Scaled so that its largest column norm is 1; used to turn decorrelated channels into
    correlated RGB (``rgb = M @ z``).
    """
    pixels = images.detach().float().permute(1, 0, 2, 3).reshape(3, -1)
    cov = torch.cov(pixels)
    vals, vecs = torch.linalg.eigh(cov)
    sqrt = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    return sqrt / sqrt.norm(dim=0).max().clamp_min(1e-12)


class _Image:
    """A batch of images parametrized in Fourier (or pixel) space, mapped through a sigmoid."""

    def __init__(
        self,
        n: int,
        channels: int,
        size: tuple[int, int],
        gen: torch.Generator,
        fourier: bool,
        color: torch.Tensor | None,
        decay: float = 1.0,
        init_std: float = 0.01,
    ) -> None:
        h, w = size
        self.size, self.fourier, self.color = size, fourier, color
        if fourier:
            fy = torch.fft.fftfreq(h)[:, None]
            fx = torch.fft.rfftfreq(w)[None, :]
            freq = torch.sqrt(fy**2 + fx**2)
            self.scale = 1.0 / freq.clamp_min(1.0 / max(h, w)) ** decay
            shape: tuple[int, ...] = (n, channels, h, w // 2 + 1, 2)
        else:
            shape = (n, channels, h, w)
        self.param = (torch.randn(shape, generator=gen) * init_std).requires_grad_(True)

    def __call__(self) -> torch.Tensor:
        if self.fourier:
            spec = torch.view_as_complex(self.param) * self.scale
            x = torch.fft.irfft2(spec, s=self.size, norm="ortho") / 4.0
        else:
            x = self.param
        if self.color is not None:
            x = torch.einsum("ij,njhw->nihw", self.color, x)
        return torch.sigmoid(x)


def _random_transform(
    images: torch.Tensor,
    gen: torch.Generator,
    jitter: int,
    scale: tuple[float, float],
    rotate: float,
) -> torch.Tensor:
    """Random translation (up to ``jitter`` px), scale and rotation (degrees) per image."""
    n, _, h, w = images.shape
    u = torch.rand(n, 4, generator=gen)
    s = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    a = math.radians(rotate) * (2 * u[:, 1] - 1)
    tx = (2 * u[:, 2] - 1) * jitter * 2 / w
    ty = (2 * u[:, 3] - 1) * jitter * 2 / h
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(
        images
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="reflection", align_corners=False)


def _range_normalizer(inputs: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Map [0, 1] images to the inputs' per-channel range (identity without inputs)."""
    if inputs is None:
        return lambda img: img
    lo = inputs.detach().amin(dim=(0, 2, 3), keepdim=True).cpu()
    hi = inputs.detach().amax(dim=(0, 2, 3), keepdim=True).cpu()
    return lambda img: lo.to(img) + img * (hi - lo).to(img)


# ---------------------------------------------------------------------- maximization
def _filter_objective(
    sub: Any, unit: UnitLayer, x: torch.Tensor, filters: torch.Tensor, network: Network
) -> torch.Tensor:
    """Mean of filter ``filters[i]``'s site map on image ``i`` (graph kept), ``[F]``."""
    model = sub.model
    store: dict[str, torch.Tensor] = {}
    ctx = (
        apply_masks(model, sub.structure, sub.mask_state())
        if network == "subnetwork"
        else eval_mode(model)
    )
    with ctx, _capture_hooks(model, [unit], store, stop=True):
        try:
            model(x)
        except _Stop:
            pass
    if unit.name not in store:
        raise RuntimeError(f"the forward pass never reached {unit.site!r} (layer {unit.name})")
    maps = store[unit.name]
    picked = maps[torch.arange(len(filters)), filters]
    return picked.reshape(len(filters), -1).mean(dim=1)


def activation_maximization(
    chain: Any,
    layer: str,
    filters: Sequence[int],
    *,
    steps: int = 256,
    lr: float = 0.05,
    size: int | tuple[int, int] | None = None,
    seed: int = 0,
    parametrization: str = "fourier",
    decorrelate: bool = True,
    jitter: int | None = None,
    scale: tuple[float, float] = (0.9, 1.1),
    rotate: float = 10.0,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    reference: torch.Tensor | None = None,
    network: Network = "original",
    batch_size: int = 16,
    progress: bool = False,
) -> FilterPictures:
    """Synthesize one picture per filter that maximizes the filter's mean activation.

    Parameters
    ----------
    chain : Chain or SubNetwork
        Gives the model and where each layer's score site is.
    layer : str
        Unit layer of the filters (e.g. ``"layer3.0.conv3"``).
    filters : sequence of int
        Filter indices within ``layer``.
    steps, lr : int, float
        Adam steps and learning rate (a few hundred steps give recognisable pictures).
    size : int or (int, int), optional
        Picture size; default the model's input size.
    seed : int
        Seeds the initial images and every random transformation (deterministic).
    parametrization : {"fourier", "pixel"}
        Image parametrization (see the module docstring).
    decorrelate : bool
        Decorrelate colours with the square root of the colour covariance of
        ``reference`` (3-channel inputs only).
    jitter, scale, rotate : int, (float, float), float
        Ranges of the random translation (pixels; default 3.5% of the picture side, 8 px
        at 224), scale and rotation (degrees).
    normalize : callable, optional
        Maps a [0, 1] image to the model's input space (e.g. ImageNet normalization);
        default: the per-channel range of the chain's inputs.
    reference : Tensor, optional
        Real inputs (model space) for the default ``normalize`` and the colour statistics;
        default the chain's region.
    network : {"original", "subnetwork"}
        Maximize in the original model or in the thresholded network.
    batch_size : int
        Filters optimized together per batch.
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    FilterPictures
        Pictures plus the objective before and after.
    """
    sub, ref = resolve(chain, reference)
    unit = sub.structure.unit(layer)
    if not spatial_units(sub.structure) or unit not in spatial_units(sub.structure):
        raise ValueError(
            f"layer {layer!r} does not carry [N, C, H, W] maps; activation maximization needs a "
            "convolutional unit layer"
        )
    idx = [int(f) for f in filters]
    if not idx or min(idx) < 0 or max(idx) >= unit.size:
        raise ValueError(
            f"filters must be a non-empty list of indices in [0, {unit.size}) for {layer!r}, "
            f"got {list(filters)}"
        )
    if parametrization not in ("fourier", "pixel"):
        raise ValueError(f"parametrization must be 'fourier' or 'pixel', got {parametrization!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    channels = int(sub.structure.input_shape[0]) if sub.structure.input_shape else 3
    hw: tuple[int, int]
    if size is None:
        hw = (int(sub.structure.input_shape[-2]), int(sub.structure.input_shape[-1]))
    else:
        hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if jitter is None:
        jitter = max(1, round(0.035 * max(hw)))
    to_input = normalize or _range_normalizer(ref)
    color = None
    if decorrelate and channels == 3 and ref is not None:
        color = color_sqrt_covariance(torch.as_tensor(display_images(ref)).permute(0, 3, 1, 2))
    device = next((p.device for p in sub.model.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)

    images, starts, finals = [], [], []
    chunks = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    bar = tqdm(total=steps * len(chunks), desc="activation maximization", disable=not progress)
    try:
        for chunk in chunks:
            target = torch.tensor(chunk, device=device)
            image = _Image(len(chunk), channels, hw, gen, parametrization == "fourier", color)
            with torch.no_grad():
                starts.append(
                    _filter_objective(sub, unit, to_input(image()).to(device), target, network)
                )
            opt = torch.optim.Adam([image.param], lr=lr)
            for _ in range(steps):
                x = _random_transform(image(), gen, jitter, scale, rotate)
                objective = _filter_objective(sub, unit, to_input(x).to(device), target, network)
                # autograd.grad, not backward(): the model's parameters get no .grad
                (image.param.grad,) = torch.autograd.grad(-objective.sum(), [image.param])
                opt.step()
                bar.update(1)
            with torch.no_grad():
                final = image()
                finals.append(
                    _filter_objective(sub, unit, to_input(final).to(device), target, network)
                )
            images.append(final.detach().cpu())
    finally:
        bar.close()
    return FilterPictures(
        layer=layer,
        filters=idx,
        images=torch.cat(images),
        start_activation=torch.cat(starts).detach().cpu(),
        final_activation=torch.cat(finals).detach().cpu(),
    )


# ---------------------------------------------------------------------- crops
def effective_receptive_field(
    chain: Any, layer: str, inputs: torch.Tensor, mass: float = 0.9
) -> int:
    """Side (pixels) of the centred square holding ``mass`` of the input gradient of one position.

    The gradient of the layer's maps (summed over filters) at the centre position with
    respect to the first input (Luo et al., "Understanding the effective receptive field",
    2016): a data-driven receptive field that works for any architecture.
    """
    sub, _ = resolve(chain)
    unit = sub.structure.unit(layer)
    x = inputs[:1].detach().clone().requires_grad_(True)
    maps = site_maps(sub, x, [unit], "original", grad=True)[unit.name]
    h, w = maps.shape[-2:]
    (grad,) = torch.autograd.grad(maps[0, :, h // 2, w // 2].sum(), x)
    g = grad[0].abs().sum(0)
    H, W = g.shape
    cy = round((h // 2 + 0.5) * H / h - 0.5)
    cx = round((w // 2 + 0.5) * W / w - 0.5)
    total = float(g.sum())
    if total <= 0:
        return max(H // h, 1)
    for r in range(max(H, W)):
        box = g[max(cy - r, 0) : cy + r + 1, max(cx - r, 0) : cx + r + 1]
        if float(box.sum()) >= mass * total:
            return min(2 * r + 1, max(H, W))
    return max(H, W)


def top_activating_crops(
    chain: Any,
    layer: str,
    filters: Sequence[int],
    inputs: torch.Tensor | None = None,
    *,
    pool: torch.Tensor | None = None,
    k: int = 4,
    crop: int | None = None,
    out_size: int = 64,
    denormalize: Denormalize | None = None,
    network: Network = "original",
) -> TopCrops:
    """The input patches where each filter's map peaks (one per input, best ``k``).

    Parameters
    ----------
    chain : Chain or SubNetwork
        The chain.
    layer : str
        Unit layer of the filters.
    filters : sequence of int
        Filter indices.
    inputs : Tensor, optional
        The region; default the chain's.
    pool : Tensor, optional
        More inputs to search (appended after the region).
    k : int
        Crops per filter (at most the number of inputs).
    crop : int, optional
        Crop side in input pixels; default the layer's effective receptive field
        (:func:`effective_receptive_field`), at least one map cell.
    out_size : int
        Side of the returned crops.
    denormalize : callable, optional
        Model input -> [0, 1] image (see :func:`display_images`).
    network : {"original", "subnetwork"}
        Whose maps rank the patches.
    """
    sub, x = resolve(chain, inputs)
    if x is None and pool is None:
        raise ValueError("top_activating_crops needs inputs (the region) or a pool of inputs")
    data = torch.cat([t for t in (x, pool) if t is not None])
    unit = sub.structure.unit(layer)
    idx = [int(f) for f in filters]
    if not idx or min(idx) < 0 or max(idx) >= unit.size:
        raise ValueError(f"filters must be indices in [0, {unit.size}) for {layer!r}, got {idx}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    maps = site_maps(sub, data, [unit], network)[unit.name][:, idx].float()  # [N, F, h, w]
    n, _, h, w = maps.shape
    H, W = data.shape[-2:]
    side = crop or effective_receptive_field(sub, layer, data)
    side = int(min(max(side, math.ceil(H / h), 3), H, W))
    peak, where = maps.reshape(n, len(idx), -1).max(dim=2)  # [N, F]
    k = min(k, n)
    values, sources = peak.T.topk(k, dim=1)  # [F, k]
    images = torch.as_tensor(display_images(data, denormalize)).permute(0, 3, 1, 2)
    crops = torch.zeros(len(idx), k, 3, out_size, out_size)
    boxes = torch.zeros(len(idx), k, 4, dtype=torch.long)
    for fi in range(len(idx)):
        for j in range(k):
            src = int(sources[fi, j])
            pos = int(where[src, fi])
            cy = (pos // w + 0.5) * H / h
            cx = (pos % w + 0.5) * W / w
            top = int(min(max(round(cy - side / 2), 0), H - side))
            left = int(min(max(round(cx - side / 2), 0), W - side))
            patch = images[src : src + 1, :, top : top + side, left : left + side]
            crops[fi, j] = F.interpolate(
                patch, size=(out_size, out_size), mode="bilinear", align_corners=False
            )[0]
            boxes[fi, j] = torch.tensor([top, left, side, side])
    return TopCrops(
        layer=layer,
        filters=idx,
        crops=crops.clamp(0, 1),
        values=values,
        sources=sources,
        boxes=boxes,
    )


# ---------------------------------------------------------------------- figure
def _choose_filters(
    sub: Any, layers: Sequence[str] | str | None, max_filters: int
) -> list[tuple[str, int, float]]:
    kept_pool = [u for u in spatial_units(sub.structure) if bool(chain_kept(sub)[u.name].any())]
    if not kept_pool:
        raise ValueError("the chain keeps no filter in a convolutional layer; nothing to draw")
    units = pick_units(sub.structure, layers, kept_pool) if layers is not None else kept_pool[-1:]
    importance = chain_scores(sub)
    per_layer = max(1, math.ceil(max_filters / len(units)))
    chosen: list[tuple[str, int, float]] = []
    for u in units:
        s = importance[u.name]
        order = torch.argsort(s, descending=True, stable=True)
        top = [int(i) for i in order[:per_layer] if s[i] > 0]
        chosen.extend((u.name, i, float(s[i])) for i in top)
    return chosen[:max_filters]


def plot_filters(
    chain: Any,
    layers: Sequence[str] | str | None = None,
    filters: Sequence[int] | None = None,
    *,
    inputs: torch.Tensor | None = None,
    pool: torch.Tensor | None = None,
    max_filters: int = 6,
    k: int = 4,
    steps: int = 256,
    size: int | None = None,
    seed: int = 0,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    denormalize: Denormalize | None = None,
    panel_size: float = 1.35,
    progress: bool = False,
) -> Figure:
    """One row per kept filter: its activation-maximization picture and top-activating crops.

    Parameters
    ----------
    chain : Chain or SubNetwork
        The chain.
    layers : str or sequence of str, optional
        Unit layers to draw from; default the deepest convolutional layer with kept filters.
    filters : sequence of int, optional
        Filters of a single ``layers`` entry; default the highest-scoring kept filters.
    inputs, pool : Tensor, optional
        Region (default the chain's) and extra inputs searched for crops.
    max_filters : int
        At most this many rows (split evenly over ``layers``).
    k : int
        Crops per filter (0 for none).
    steps, size, seed, normalize : see :func:`activation_maximization` (``steps=0``: no
        pictures, crops only).
    denormalize : callable, optional
        Model input -> [0, 1] image for the crops.
    """
    sub, x = resolve(chain, inputs)
    if max_filters < 1:
        raise ValueError(f"max_filters must be >= 1, got {max_filters}")
    if filters is not None:
        if layers is None or (not isinstance(layers, str) and len(layers) != 1):
            raise ValueError("give exactly one layer together with filters=[...]")
        name = layers if isinstance(layers, str) else layers[0]
        s = chain_scores(sub)[name]
        chosen = [(name, int(f), float(s[int(f)])) for f in list(filters)[:max_filters]]
    else:
        chosen = _choose_filters(sub, layers, max_filters)
    groups: dict[str, list[tuple[int, float]]] = {}
    for name, f, sc in chosen:
        groups.setdefault(name, []).append((f, sc))
    pictures: dict[tuple[str, int], torch.Tensor] = {}
    crops: dict[tuple[str, int], torch.Tensor] = {}
    for name, items in groups.items():
        ids = [f for f, _ in items]
        if steps > 0:
            pics = activation_maximization(
                sub,
                name,
                ids,
                steps=steps,
                size=size,
                seed=seed,
                normalize=normalize,
                reference=x,
                progress=progress,
            )
            for f, img in zip(ids, pics.images):
                pictures[(name, f)] = img
        if k > 0 and (x is not None or pool is not None):
            tc = top_activating_crops(sub, name, ids, x, pool=pool, k=k, denormalize=denormalize)
            for f, c in zip(ids, tc.crops):
                crops[(name, f)] = c
    n_crops = max((c.shape[0] for c in crops.values()), default=0)
    cols = (1 if pictures else 0) + n_crops
    if cols == 0:
        raise ValueError("nothing to draw: steps=0 and no inputs for crops")
    rows = len(chosen)
    fig = new_figure(cols * panel_size + 1.8, rows * panel_size + 0.5)
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    for r, (name, f, sc) in enumerate(chosen):
        c0 = 0
        if pictures:
            img = pictures[(name, f)]
            img = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
            axes[r, 0].imshow(img.permute(1, 2, 0).numpy())
            c0 = 1
        for j in range(n_crops):
            if (name, f) in crops and j < crops[(name, f)].shape[0]:
                axes[r, c0 + j].imshow(crops[(name, f)][j].permute(1, 2, 0).numpy())
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(
            f"{name}.{f}\nscore {sc:.2f}", fontsize=7, rotation=0, ha="right", va="center"
        )
    if pictures:
        axes[0, 0].set_title("activation max.", fontsize=8)
    if n_crops:
        axes[0, (1 if pictures else 0)].set_title("top-activating crops →", fontsize=8, loc="left")
    fig.tight_layout()
    return fig
