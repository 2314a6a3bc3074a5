"""Input, target and argument handling shared by the critical-pathway modules.

Targets follow Captum's formats (``captum.attr`` docstrings): ``None`` for models
with one output per example, an ``int`` or one-element tensor applied to every
example, a list of ints or a 1-D tensor with one class per example, a tuple of
output indices, or a list of such tuples. Unlike Captum we check class indices
against the output before selecting, so a bad target raises a ``ValueError``
naming it instead of an ``IndexError`` deep inside ``torch.gather``.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor, nn

TargetType = int | tuple[int, ...] | Tensor | list[int] | list[tuple[int, ...]] | None
"""Captum's target formats."""


def format_inputs(inputs: Tensor | tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], bool]:
    """Turn ``inputs`` into a tuple of tensors sharing the batch dimension.

    Returns
    -------
    tuple of Tensor, bool
        The tuple and whether the user passed a tuple (Captum's ``_is_tuple``).
    """
    is_tuple = isinstance(inputs, tuple)
    formatted: tuple[Tensor, ...] = inputs if isinstance(inputs, tuple) else (inputs,)
    if not formatted:
        raise ValueError("inputs is an empty tuple; pass a tensor or a tuple of tensors")
    for i, tensor in enumerate(formatted):
        if not isinstance(tensor, Tensor):
            raise TypeError(
                f"inputs[{i}] is a {type(tensor).__name__}; pass a torch.Tensor or a tuple of "
                "tensors with the examples along dimension 0"
            )
        if tensor.ndim == 0:
            raise ValueError(f"inputs[{i}] is a scalar; give it a batch dimension (dim 0)")
    batch = formatted[0].shape[0]
    if batch == 0:
        raise ValueError("inputs have an empty batch dimension; pass at least one example")
    for i, tensor in enumerate(formatted[1:], start=1):
        if tensor.shape[0] != batch:
            raise ValueError(
                f"inputs[{i}] has {tensor.shape[0]} examples but inputs[0] has {batch}; "
                "all input tensors must share dimension 0"
            )
    return formatted, is_tuple


def format_additional_args(additional_forward_args: Any) -> tuple[Any, ...]:
    """Captum's convention: ``None`` means none, a non-tuple is one extra argument."""
    if additional_forward_args is None:
        return ()
    if isinstance(additional_forward_args, tuple):
        return additional_forward_args
    return (additional_forward_args,)


def index_batch(
    inputs: tuple[Tensor, ...], args: tuple[Any, ...], batch: int, index: Tensor
) -> tuple[tuple[Tensor, ...], tuple[Any, ...]]:
    """Rows ``index`` of the inputs and of extra arguments whose dim 0 is the batch.

    Extra arguments that are tensors with ``batch`` rows are indexed like the inputs
    (Captum repeats such tensors the same way); anything else is passed unchanged.
    """
    picked = tuple(t[index] for t in inputs)
    picked_args = tuple(
        a[index] if isinstance(a, Tensor) and a.ndim > 0 and a.shape[0] == batch else a
        for a in args
    )
    return picked, picked_args


def check_percentile(percentile: float) -> float:
    """Validate a pathway percentile: a real number in ``[0, 100)``."""
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)):
        raise TypeError(f"percentile must be a number in [0, 100), got {percentile!r}")
    value = float(percentile)
    if not math.isfinite(value) or not 0.0 <= value < 100.0:
        raise ValueError(
            f"percentile must lie in [0, 100) (the share of neurons dropped, in percent), "
            f"got {percentile!r}; use e.g. 85 to keep the top 15% of neurons"
        )
    return value


def normalize_target(target: TargetType, batch: int) -> TargetType:
    """Bring a Captum target into a form that can be indexed per example.

    ``int`` and one-element tensors become ``int``; lists of ints and 1-D tensors
    become a ``LongTensor`` of length ``batch``; tuples stay; lists of tuples stay
    lists. Lengths are checked against ``batch``.
    """
    if target is None or isinstance(target, tuple):
        return target
    if isinstance(target, bool):
        raise TypeError("target must be an int class index, not a bool")
    if isinstance(target, int):
        return target
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex():
            raise TypeError(f"target tensor must hold integer class indices, got {target.dtype}")
        if target.numel() == 1:
            return int(target.item())
        if target.ndim != 1 or target.numel() != batch:
            raise ValueError(
                f"target tensor of shape {tuple(target.shape)} does not match {batch} "
                "examples; pass one class index per example as a 1-D tensor"
            )
        return target.long()
    if isinstance(target, list):
        if len(target) != batch:
            raise ValueError(
                f"target list has {len(target)} entries but there are {batch} examples"
            )
        if all(isinstance(t, int) and not isinstance(t, bool) for t in target):
            return torch.tensor(target, dtype=torch.long)
        if all(isinstance(t, tuple) for t in target):
            return cast("list[tuple[int, ...]]", list(target))
        raise TypeError("a target list must hold only ints or only tuples of ints")
    raise TypeError(
        f"unsupported target type {type(target).__name__}; use None, an int, a tuple, "
        "a list or a tensor (Captum's target formats)"
    )


def target_rows(target: TargetType, index: Tensor) -> TargetType:
    """The target for the examples ``index`` of a normalized target."""
    if isinstance(target, Tensor):
        return target[index.to(target.device)]
    if isinstance(target, list):
        # picking rows keeps the list's element type (ints or tuples)
        return cast(TargetType, [target[int(i)] for i in index])
    return target


def select_output(output: Any, target: TargetType) -> Tensor:
    """One scalar per example: the model output picked by a normalized ``target``.

    Raises ``ValueError`` when a class index lies outside the output, or when
    ``target`` is ``None`` and the model returns more than one value per example.
    """
    if not isinstance(output, Tensor):
        raise TypeError(
            f"the model returned a {type(output).__name__}; critical pathways need a tensor "
            "output (wrap the model so that forward returns the logits)"
        )
    if output.ndim == 0:
        raise ValueError("the model returned a scalar; it must return one output row per example")
    batch = output.shape[0]
    if target is None:
        if output[0].numel() != 1:
            raise ValueError(
                f"target=None but the model returns outputs of shape {tuple(output.shape)}; "
                "pass target= (e.g. the class index) to pick one output per example"
            )
        return output.reshape(batch)
    if isinstance(target, int) or isinstance(target, Tensor):
        if output.ndim != 2:
            raise ValueError(
                f"a class-index target needs 2-D outputs [batch, classes], got shape "
                f"{tuple(output.shape)}; pass a tuple of output indices instead"
            )
        classes = output.shape[1]
        idx = torch.as_tensor(target, device=output.device).long()
        flat = idx.reshape(-1)
        bad = flat[(flat < 0) | (flat >= classes)]
        if bad.numel():
            raise ValueError(
                f"target {bad.tolist()} out of range for a model with {classes} outputs; "
                f"class indices must lie in [0, {classes - 1}]"
            )
        if idx.ndim == 0:
            return output[:, int(idx)]
        return output.gather(1, idx.reshape(batch, 1)).squeeze(1)
    # a normalized target list holds tuples (normalize_target turns int lists into tensors)
    rows = cast("list[tuple[int, ...]]", [target] * batch if isinstance(target, tuple) else target)
    picked = []
    for i, index in enumerate(rows):
        if len(index) != output.ndim - 1:
            raise ValueError(
                f"target tuple {index} has {len(index)} indices but the output has "
                f"{output.ndim - 1} dimensions after the batch"
            )
        for pos, (j, size) in enumerate(zip(index, output.shape[1:], strict=True)):
            if not 0 <= j < size:
                raise ValueError(
                    f"target index {index} out of range at position {pos} for outputs of "
                    f"shape {tuple(output.shape)}"
                )
        picked.append(output[(i, *index)])
    return torch.stack(picked)


def require_module(model: Any, what: str) -> nn.Module:
    """Raise ``TypeError`` unless ``model`` is an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{what} needs a torch.nn.Module (its submodule names label the neurons), got "
            f"{type(model).__name__}"
        )
    return model


def check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int (number of alpha steps), got {steps!r}")
    return steps


def check_batch_size(size: int | None, name: str = "internal_batch_size") -> int | None:
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{name} must be a positive int or None, got {size!r}")
    return size
