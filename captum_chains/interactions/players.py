"""Players (input variables) for AND-OR interactions and the masked samples ``x_T``.

Chen et al. (ICLR 2024), Sec. 2: a masked sample ``x_T`` keeps the players in ``T`` and
sets every other player to its baseline value; inputs that belong to no player stay as
they are. Players are given the Captum way, by a ``feature_mask`` of integer ids
(``0 .. n-1``; ``-1`` marks inputs that are not players), broadcastable to the input.
Helpers build such masks for a patch grid or SLIC superpixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F

from captum_chains.interactions.transforms import subset_bits

BaselineSpec = float | int | str | torch.Tensor | None

_BASELINE_NAMES = ("zero", "mean", "blur", "min")


def patch_grid_mask(
    height: int, width: int, rows: int, cols: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """A ``[height, width]`` feature mask splitting an image into ``rows x cols`` patches.

    Patches are numbered row by row (``0 .. rows*cols - 1``). When ``height`` is not a
    multiple of ``rows`` (or ``width`` of ``cols``) the patches differ by at most one
    pixel in size.

    Examples
    --------
    >>> patch_grid_mask(4, 4, 2, 2).tolist()
    [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    """
    for name, size, parts in (("rows", height, rows), ("cols", width, cols)):
        if not 1 <= parts <= size:
            raise ValueError(f"{name}={parts} must lie in 1..{size} (the image side)")
    r = (torch.arange(height, device=device) * rows) // height
    c = (torch.arange(width, device=device) * cols) // width
    return r[:, None] * cols + c[None, :]


def slic_mask(
    image: torch.Tensor,
    n_segments: int = 10,
    compactness: float = 10.0,
    sigma: float = 1.0,
    start_label: int = 0,
    **slic_kwargs: object,
) -> torch.Tensor:
    """Superpixels of ``skimage.segmentation.slic`` as a ``[H, W]`` feature mask.

    Parameters
    ----------
    image : torch.Tensor
        ``[C, H, W]`` or ``[H, W]`` image (any value range; it is rescaled to ``[0, 1]``
        for SLIC).
    n_segments, compactness, sigma
        Passed to :func:`skimage.segmentation.slic`; SLIC may return fewer segments than
        asked for.
    start_label : int
        Must be 0 (kept for symmetry with skimage); ids are relabelled to be consecutive.
    **slic_kwargs
        Further keyword arguments for ``slic``.

    Returns
    -------
    torch.Tensor
        ``[H, W]`` int64 mask with consecutive ids ``0 .. n-1``.
    """
    from skimage.segmentation import slic

    if start_label != 0:
        raise ValueError(f"start_label must be 0 (players are numbered from 0), got {start_label}")
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.dim() != 3:
        raise ValueError(f"image must be [C, H, W] or [H, W], got shape {tuple(image.shape)}")
    arr = image.detach().float().cpu()
    lo, hi = arr.min(), arr.max()
    arr = (arr - lo) / (hi - lo) if hi > lo else torch.zeros_like(arr)
    channel_axis = -1 if arr.shape[0] > 1 else None
    np_img = arr.permute(1, 2, 0).numpy() if channel_axis is not None else arr[0].numpy()
    labels = slic(
        np_img,
        n_segments=n_segments,
        compactness=compactness,
        sigma=sigma,
        start_label=0,
        channel_axis=channel_axis,
        **slic_kwargs,
    )
    mask = torch.as_tensor(labels, dtype=torch.long)
    _, consecutive = torch.unique(mask, return_inverse=True)
    return consecutive.to(image.device)


def token_mask(seq_len: int, players: Sequence[int] | None = None) -> torch.Tensor:
    """A ``[1, seq_len, 1]`` feature mask for embeddings ``[B, seq_len, dim]``.

    Parameters
    ----------
    seq_len : int
        Number of tokens.
    players : sequence of int, optional
        Token positions that are players, in player order; the others get ``-1`` (they
        stay unmasked). Default: every token is a player.
    """
    mask = torch.full((1, seq_len, 1), -1, dtype=torch.long)
    positions = range(seq_len) if players is None else players
    for pid, pos in enumerate(positions):
        if not 0 <= pos < seq_len:
            raise ValueError(f"token position {pos} is outside 0..{seq_len - 1}")
        mask[0, pos, 0] = pid
    return mask


@dataclass(frozen=True)
class Players:
    """Validated players of one input (a tensor or a tuple of tensors).

    Attributes
    ----------
    n : int
        Number of players.
    masks : tuple of torch.Tensor
        Per input tensor, an int64 id map broadcast to the input's shape without the
        batch dimension, ``[1 or B, *shape]``; ``-1`` marks non-player entries.
    """

    n: int
    masks: tuple[torch.Tensor, ...]


def _as_tuple(x: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def validate_players(
    inputs: tuple[torch.Tensor, ...],
    feature_mask: torch.Tensor | Sequence[torch.Tensor] | None,
) -> Players:
    """Check a Captum-style ``feature_mask`` and broadcast it to the inputs.

    Rules: integer dtype; broadcastable to each input (batch dimension 1 or ``B``);
    ids ``-1`` (not a player) or ``0 .. n-1`` with every id present (no gaps) in every
    sample; ids are shared across the tensors of a tuple input.

    Raises
    ------
    ValueError, TypeError
        With the offending value and the fix.
    """
    if feature_mask is None:
        raise ValueError(
            "feature_mask is required: give each player (patch, superpixel, feature, token) an "
            "integer id 0..n-1, e.g. patch_grid_mask(H, W, rows, cols) or slic_mask(image)"
        )
    fmasks = _as_tuple(feature_mask)
    if len(fmasks) != len(inputs):
        raise ValueError(
            f"feature_mask has {len(fmasks)} tensors but inputs has {len(inputs)}; "
            "give one mask per input tensor"
        )
    batch = inputs[0].shape[0]
    out = []
    for k, (x, fm) in enumerate(zip(inputs, fmasks, strict=True)):
        if not isinstance(fm, torch.Tensor):
            raise TypeError(f"feature_mask[{k}] must be a torch.Tensor, got {type(fm).__name__}")
        if fm.dtype.is_floating_point or fm.dtype == torch.bool or fm.is_complex():
            raise TypeError(f"feature_mask[{k}] must hold integer ids, got dtype {fm.dtype}")
        shape = tuple(x.shape)
        if fm.dim() < x.dim():  # a mask without batch dimension, as for a single image
            fm = fm.reshape((1,) * (x.dim() - fm.dim()) + tuple(fm.shape))
        if fm.dim() != x.dim():
            raise ValueError(
                f"feature_mask[{k}] has shape {tuple(fm.shape)}, which cannot broadcast to the "
                f"input shape {shape}"
            )
        try:
            target = (fm.shape[0] if fm.shape[0] in (1, batch) else batch, *shape[1:])
            fm = fm.to(device=x.device, dtype=torch.long).expand(target)
        except RuntimeError as err:
            raise ValueError(
                f"feature_mask[{k}] has shape {tuple(fm.shape)}, which cannot broadcast to the "
                f"input shape {shape}"
            ) from err
        if fm.shape[0] not in (1, batch):
            raise ValueError(
                f"feature_mask[{k}] batch dimension {fm.shape[0]} must be 1 or {batch}"
            )
        out.append(fm)
    mins = min(int(m.min()) for m in out)
    if mins < -1:
        raise ValueError(f"feature_mask ids must be -1 (not a player) or >= 0; found {mins}")
    n = max(int(m.max()) for m in out) + 1
    if n <= 0:
        raise ValueError("feature_mask marks no player (all ids are -1)")
    rows = max(m.shape[0] for m in out)
    for b in range(rows):
        present = torch.zeros(n + 1, dtype=torch.bool, device=out[0].device)
        for m in out:
            present[m[min(b, m.shape[0] - 1)].reshape(-1) + 1] = True
        missing = (~present[1:]).nonzero().flatten().tolist()
        if missing:
            raise ValueError(
                f"feature_mask ids must be consecutive 0..{n - 1} in every sample; sample {b} "
                f"lacks ids {missing[:10]}. Relabel, e.g. "
                "torch.unique(mask, return_inverse=True)[1]"
            )
    return Players(n=n, masks=tuple(m.contiguous() for m in out))


def _blur(x: torch.Tensor, sigma: float = 3.0) -> torch.Tensor:
    if x.dim() < 3:
        raise ValueError(f"baselines='blur' needs image inputs [B, C, H, W]; got {tuple(x.shape)}")
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    flat = x.reshape(-1, 1, *x.shape[-2:])
    pad = F.pad(flat, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(pad, kernel.view(1, 1, 1, -1))
    out = F.conv2d(out, kernel.view(1, 1, -1, 1))
    return out.reshape(x.shape)


def resolve_baselines(
    inputs: tuple[torch.Tensor, ...],
    baselines: BaselineSpec | Sequence[BaselineSpec],
) -> tuple[torch.Tensor, ...]:
    """Baseline tensors broadcast to each input's shape ``[B, *shape]``.

    Accepted per input tensor: ``None``/``"zero"`` (zeros), a number, ``"mean"`` (the
    sample's mean value), ``"min"`` (the sample's minimum, e.g. the blank background of
    a digit), ``"blur"`` (Gaussian blur, sigma 3 px, of an image), or a tensor
    broadcastable to the input (``[*shape]``, ``[1, *shape]`` or ``[B, *shape]``).

    Raises
    ------
    ValueError
        For a baseline of the wrong shape or an unknown name, naming the expected shape.
    """
    specs: Sequence[BaselineSpec]
    if isinstance(baselines, tuple | list):
        specs = baselines
        if len(specs) != len(inputs):
            raise ValueError(
                f"baselines has {len(specs)} entries but inputs has {len(inputs)} tensors"
            )
    else:
        specs = [cast(BaselineSpec, baselines)] * len(inputs)
    out = []
    for k, (x, spec) in enumerate(zip(inputs, specs, strict=True)):
        dims = tuple(range(1, x.dim()))
        if spec is None or (isinstance(spec, str) and spec == "zero"):
            base = torch.zeros_like(x)
        elif isinstance(spec, int | float):
            base = torch.full_like(x, float(spec))
        elif isinstance(spec, str):
            if spec == "mean":
                base = x.mean(dim=dims, keepdim=True).expand_as(x)
            elif spec == "min":
                base = x.amin(dim=dims, keepdim=True).expand_as(x)
            elif spec == "blur":
                base = _blur(x)
            else:
                raise ValueError(
                    f"unknown baseline {spec!r}; use one of {_BASELINE_NAMES}, a number or a tensor"
                )
        elif isinstance(spec, torch.Tensor):
            base = spec.to(device=x.device, dtype=x.dtype)
            if base.dim() == x.dim() - 1:
                base = base.unsqueeze(0)
            ok = base.dim() == x.dim() and base.shape[0] in (1, x.shape[0])
            ok = ok and all(b in (1, s) for b, s in zip(base.shape[1:], x.shape[1:], strict=True))
            if not ok:
                raise ValueError(
                    f"baselines[{k}] has shape {tuple(spec.shape)} but input {k} has shape "
                    f"{tuple(x.shape)}; give a tensor of shape {tuple(x.shape[1:])}, "
                    f"[1, ...] or {tuple(x.shape)} (or a number / 'mean' / 'blur')"
                )
            base = base.expand_as(x)
        else:
            raise TypeError(f"baselines[{k}] has unsupported type {type(spec).__name__}")
        out.append(base)
    return tuple(out)


def masked_batch(
    inputs: tuple[torch.Tensor, ...],
    baselines: tuple[torch.Tensor, ...],
    players: Players,
    sample_index: torch.Tensor,
    subsets: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Masked samples ``x_T`` for pairs ``(sample_index[k], subsets[k])``.

    Parameters
    ----------
    inputs, baselines : tuple of torch.Tensor
        ``[B, *shape]`` each (baselines from :func:`resolve_baselines`).
    players : Players
        From :func:`validate_players`.
    sample_index : torch.Tensor
        ``[K]`` int64 sample of each masked copy.
    subsets : torch.Tensor
        ``[K]`` int64 bitmasks ``T`` (bit ``i`` set: player ``i`` kept).

    Returns
    -------
    tuple of torch.Tensor
        ``[K, *shape]`` per input tensor.
    """
    n = players.n
    device = inputs[0].device
    bits = subset_bits(n, device=device)[subsets.to(device)]  # [K, n]
    keep = torch.cat((bits, torch.ones_like(bits[:, :1])), dim=1)  # column n: non-players
    out = []
    for x, base, fm in zip(inputs, baselines, players.masks, strict=True):
        ids = torch.where(fm < 0, torch.full_like(fm, n), fm)
        if ids.shape[0] == 1:
            keep_full = keep[:, ids[0].reshape(-1)]
        else:
            keep_full = torch.gather(keep, 1, ids[sample_index].reshape(len(subsets), -1))
        keep_full = keep_full.reshape(len(subsets), *x.shape[1:])
        out.append(torch.where(keep_full, x[sample_index], base[sample_index]))
    return tuple(out)
