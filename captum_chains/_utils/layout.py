"""Memory layout of the inputs an optimization runs on.

oneDNN's CPU convolutions run faster on channels-last (NHWC) tensors, and a convolution
given a channels-last input keeps that layout for the layers after it, so converting the
region's 4-D inputs once makes every masked forward and backward faster (the Lite0 step
takes 0.79x as long, ``benchmarks/layout_cost.py``). Only the layout changes: the values
are the same, so results equal the given layout's up to floating-point rounding.
"""

from __future__ import annotations

import torch


def _is_image(t: torch.Tensor) -> bool:
    return t.ndim == 4 and t.is_floating_point()


def _images(batch: tuple[torch.Tensor, ...]) -> bool:
    return any(_is_image(t) for t in batch)


def use_channels_last(option: bool | None, batch: tuple[torch.Tensor, ...]) -> bool:
    """Whether to run on channels-last inputs: ``option``, or (``None``) 4-D floating inputs
    on the CPU, where the speed-up was measured."""
    if option is None:
        return _images(batch) and batch[0].device.type == "cpu"
    return bool(option) and _images(batch)


def to_channels_last(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The 4-D floating tensors of ``batch`` in channels-last layout, the others as given."""
    return tuple(
        t.contiguous(memory_format=torch.channels_last) if _is_image(t) else t for t in batch
    )


def to_contiguous(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Every tensor of ``batch`` in the default (contiguous) layout."""
    return tuple(t.contiguous() for t in batch)
