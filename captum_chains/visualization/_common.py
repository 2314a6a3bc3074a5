"""Shared pieces of the figures: resolving a chain, capturing unit maps, images, figures.

Everything here is headless: figures are plain :class:`matplotlib.figure.Figure` objects
(no pyplot state, no GUI backend), which can be saved as PNG, SVG or PDF.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from captum_chains._utils.hooks import this_thread_only
from captum_chains._utils.model_state import eval_mode
from captum_chains.masking import apply_masks
from captum_chains.subnetwork import SubNetwork
from captum_chains.units.base import ModelStructure, UnitLayer

Network = Literal["original", "subnetwork"]
Denormalize = Callable[[torch.Tensor], torch.Tensor]

SAVE_FORMATS = (".png", ".svg", ".pdf")


def resolve(
    chain: Any, inputs: torch.Tensor | None = None
) -> tuple[SubNetwork, torch.Tensor | None]:
    """The SubNetwork of a ``Chain`` (or a SubNetwork itself) and the inputs to draw.

    ``inputs`` defaults to the region the chain was extracted on (``chain.inputs``).
    """
    if isinstance(chain, SubNetwork):
        sub = chain
        stored = None
    elif isinstance(getattr(chain, "subnetwork", None), SubNetwork):
        sub = chain.subnetwork
        stored = getattr(chain, "inputs", None)
    else:
        raise TypeError(
            f"expected a captum_chains Chain or SubNetwork, got {type(chain).__name__}; pass the "
            "result of ChainExtractor(...).attribute(...) or its .subnetwork"
        )
    x = stored if inputs is None else inputs
    if x is not None:
        if isinstance(x, tuple):
            x = x[0]
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            raise ValueError(
                f"inputs must be a tensor [N, ...], got {type(x).__name__}"
                + (f" of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else "")
            )
    return sub, x


def removed_layers(subnetwork: SubNetwork) -> dict[str, str]:
    """Unit layer name -> the closed gate that removed it (the layer or its block)."""
    closed = set(subnetwork.removed_gates)
    out: dict[str, str] = {}
    for gate in subnetwork.structure.gates:
        if gate.name in closed:
            for name in gate.units:
                out.setdefault(name, gate.name)
    return out


def chain_scores(subnetwork: SubNetwork) -> dict[str, torch.Tensor]:
    """Scores per unit layer, 0 for every filter of a layer removed by a closed gate.

    Extracted chains already hold 0 there; hand-built SubNetworks may not, and a removed
    layer's filters are not part of the chain either way.
    """
    scores = subnetwork.importance
    for name in removed_layers(subnetwork):
        scores[name] = torch.zeros_like(scores[name])
    return scores


def chain_kept(subnetwork: SubNetwork) -> dict[str, torch.Tensor]:
    """Bool mask of the chain's filters per unit layer (see :func:`chain_scores`)."""
    return {name: s > 0 for name, s in chain_scores(subnetwork).items()}


def require_inputs(inputs: torch.Tensor | None, what: str) -> torch.Tensor:
    """Raise a helpful error when a figure needs inputs and none are known."""
    if inputs is None:
        raise ValueError(
            f"{what} needs inputs: pass inputs=... (the chain has none stored; extract it with "
            "keep_inputs=True or give the region explicitly)"
        )
    return inputs


def spatial_units(structure: ModelStructure) -> list[UnitLayer]:
    """Unit layers whose site tensor is an image-like ``[N, C, H, W]`` map."""
    return [u for u in structure.units if u.channel_dim == 1 and len(u.spatial) == 2]


def pick_units(
    structure: ModelStructure, layers: Sequence[str] | str | None, pool: Sequence[UnitLayer]
) -> list[UnitLayer]:
    """Look up unit layers by name (exact, or all layers under a module prefix)."""
    if layers is None:
        return list(pool)
    names = [layers] if isinstance(layers, str) else list(layers)
    allowed = {u.name for u in pool}
    out: list[UnitLayer] = []
    for name in names:
        matches = [u for u in pool if u.name == name or u.name.startswith(name + ".")]
        if not matches:
            known = [u.name for u in structure.units]
            why = (
                "it is not a spatial [N, C, H, W] unit layer"
                if name in known and name not in allowed
                else "no such unit layer"
            )
            raise ValueError(
                f"cannot draw layer {name!r}: {why}; choose among "
                f"{[u.name for u in pool][:8]}{' ...' if len(pool) > 8 else ''}"
            )
        out.extend(m for m in matches if m not in out)
    order = {u.name: i for i, u in enumerate(structure.units)}
    return sorted(out, key=lambda u: order[u.name])


def evenly(items: Sequence[Any], k: int) -> list[Any]:
    """At most ``k`` items, evenly spaced, always including the first and the last."""
    items = list(items)
    if k <= 0:
        raise ValueError(f"the maximum number of items to draw must be >= 1, got {k}")
    if len(items) <= k:
        return items
    idx = np.unique(np.round(np.linspace(0, len(items) - 1, k)).astype(int))
    return [items[i] for i in idx]


class _Stop(Exception):
    """Raised inside a hook to end a forward pass once every needed map was captured."""


@contextmanager
def _capture_hooks(
    model: nn.Module, units: Sequence[UnitLayer], store: dict[str, torch.Tensor], stop: bool
) -> Iterator[None]:
    handles = []
    wanted = {u.name for u in units}

    def save(name: str, tensor: torch.Tensor) -> None:
        store[name] = tensor
        if stop and wanted <= store.keys():
            raise _Stop

    try:
        for unit in units:
            module = model.get_submodule(unit.site)
            if unit.hook == "output":
                handles.append(
                    module.register_forward_hook(
                        this_thread_only(lambda m, a, out, n=unit.name: save(n, out))
                    )
                )
            else:
                handles.append(
                    module.register_forward_pre_hook(
                        this_thread_only(lambda m, a, n=unit.name: save(n, a[0]))
                    )
                )
        yield
    finally:
        for h in handles:
            h.remove()


def site_maps(
    subnetwork: SubNetwork,
    inputs: torch.Tensor,
    units: Sequence[UnitLayer],
    network: Network = "subnetwork",
    *,
    grad: bool = False,
    stop: bool = True,
    batch_size: int = 16,
) -> dict[str, torch.Tensor]:
    """The tensors at the score sites of ``units`` (what a score multiplies).

    Parameters
    ----------
    subnetwork : SubNetwork
        Gives the model, its structure and the masks.
    inputs : Tensor
        ``[N, ...]`` model inputs.
    units : sequence of UnitLayer
        Layers to capture.
    network : {"original", "subnetwork"}
        ``"original"``: the unmasked model. ``"subnetwork"``: the thresholded network, so
        each map is the one *after* its scores (removed filters are zero).
    grad : bool
        Keep the graph (for gradients); otherwise run under ``torch.no_grad``.
    stop : bool
        End the forward pass as soon as every map was captured.
    batch_size : int
        Inputs per forward pass (ignored with ``grad=True``).
    """
    if network not in ("original", "subnetwork"):
        raise ValueError(f"network must be 'original' or 'subnetwork', got {network!r}")
    model = subnetwork.model
    if not units:
        return {}
    chunks = [inputs] if grad else list(inputs.split(batch_size))
    parts: dict[str, list[torch.Tensor]] = {u.name: [] for u in units}
    for chunk in chunks:
        store: dict[str, torch.Tensor] = {}
        with (
            _masked(model, subnetwork, network),
            torch.set_grad_enabled(grad),
            _capture_hooks(model, units, store, stop),
        ):
            try:
                model(chunk)
            except _Stop:
                pass
        for u in units:
            if u.name not in store:
                raise RuntimeError(
                    f"the forward pass never reached {u.site!r} (layer {u.name}); was the chain "
                    "extracted on this model?"
                )
            parts[u.name].append(store[u.name] if grad else store[u.name].detach())
    return {n: torch.cat(p) if len(p) > 1 else p[0] for n, p in parts.items()}


@contextmanager
def _masked(model: nn.Module, subnetwork: SubNetwork, network: Network) -> Iterator[None]:
    if network == "subnetwork":
        with apply_masks(model, subnetwork.structure, subnetwork.mask_state()):
            yield
    else:
        with eval_mode(model):
            yield


def display_images(inputs: torch.Tensor, denormalize: Denormalize | None = None) -> np.ndarray:
    """Inputs as displayable ``[N, H, W, 3]`` images in ``[0, 1]``.

    With ``denormalize=None`` each channel is min-max scaled over the whole batch (exact
    for any per-channel affine normalization of images that span the full range).
    Single-channel inputs are shown in grey.
    """
    x = inputs.detach().float().cpu()
    if x.ndim != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got {tuple(x.shape)}")
    if denormalize is not None:
        x = denormalize(x).clamp(0, 1)
    else:
        lo = x.amin(dim=(0, 2, 3), keepdim=True)
        hi = x.amax(dim=(0, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-12)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        x = x[:, :3]
    return x.permute(0, 2, 3, 1).numpy()


def upsample(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear upsampling of ``[N, h, w]`` maps to ``size`` (``align_corners=False``)."""
    return torch.nn.functional.interpolate(
        maps[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False
    )[:, 0]


def new_figure(width: float, height: float, **kwargs: Any) -> Figure:
    """A headless figure (no pyplot state); width and height in inches, clamped to sane sizes."""
    return Figure(figsize=(min(max(width, 2.0), 40.0), min(max(height, 1.5), 60.0)), **kwargs)


def save_figure(figure: Figure, path: str | Path, dpi: int = 150, **kwargs: Any) -> Path:
    """Save a figure as PNG, SVG or PDF (chosen by the file suffix).

    Parameters
    ----------
    figure : Figure
        Any figure of this module.
    path : str or Path
        Destination; its suffix picks the format.
    dpi : int
        Resolution of raster output.
    """
    path = Path(path)
    if path.suffix.lower() not in SAVE_FORMATS:
        raise ValueError(
            f"cannot save {path.name!r}: use one of the suffixes {', '.join(SAVE_FORMATS)}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, bbox_inches="tight", **kwargs)
    return path


def rank_correlation(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Spearman rank correlation of two maps (ties get average ranks); NaN if one is constant."""
    from scipy.stats import rankdata

    x = rankdata(_numpy(a).ravel())
    y = rankdata(_numpy(b).ravel())
    x -= x.mean()
    y -= y.mean()
    denom = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def _numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
    return np.asarray(values, dtype=np.float64)


def short_name(name: str, width: int = 28) -> str:
    """Shorten a long module path for a tick label, keeping its end."""
    return name if len(name) <= width else "…" + name[-(width - 1) :]
