"""Checks of user input that raise errors naming the problem and the fix."""

from __future__ import annotations

from typing import Any, overload

import torch
from torch import nn

TargetType = int | tuple | torch.Tensor | list | None


def format_inputs(inputs: Any) -> tuple[torch.Tensor, ...]:
    """Validate ``inputs`` (a tensor or a tuple of tensors sharing the batch dimension)."""
    items = inputs if isinstance(inputs, tuple) else (inputs,)
    if not items:
        raise ValueError("inputs is an empty tuple; pass a tensor of shape [N, ...]")
    for i, t in enumerate(items):
        where = "inputs" if len(items) == 1 else f"inputs[{i}]"
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{where} must be a torch.Tensor, got {type(t).__name__}; convert it with "
                "torch.as_tensor(...)"
            )
        if not t.is_floating_point():
            raise TypeError(
                f"{where} has dtype {t.dtype}; pass floating-point inputs (e.g. x.float())"
            )
        if t.ndim < 2:
            raise ValueError(
                f"{where} has shape {tuple(t.shape)}; expected a batch [N, ...] with at least "
                "two dimensions (add a batch dimension with x.unsqueeze(0))"
            )
        if t.shape[0] == 0:
            raise ValueError(
                f"{where} is an empty batch (shape {tuple(t.shape)}); pass N >= 1 inputs"
            )
        if t.device.type != "meta" and not torch.isfinite(t).all():
            raise ValueError(f"{where} contains NaN or Inf values; clean or re-normalize them")
        if t.shape[0] != items[0].shape[0]:
            raise ValueError(
                f"all inputs must share the batch size; got {[tuple(x.shape) for x in items]}"
            )
    return items


def model_device(model: nn.Module) -> torch.device | None:
    """Device of the model's first parameter or buffer (None for a model without tensors)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return None


def check_device(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Raise if the inputs do not live on the model's device."""
    device = model_device(model)
    for t in inputs:
        if device is not None and t.device != device:
            raise ValueError(
                f"inputs are on {t.device} but the model is on {device}; move them with "
                f"inputs.to({str(device)!r})"
            )


def check_conv_rank(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Raise if inputs do not fit the rank and channels of the model's first convolution."""
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            expected = 2 + len(module.kernel_size)
            x = inputs[0]
            if x.ndim != expected:
                raise ValueError(
                    f"inputs have shape {tuple(x.shape)} but the model's first convolution "
                    f"({type(module).__name__}) needs {expected}-D batches [N, C, ...]; "
                    + (
                        "add a batch dimension with x.unsqueeze(0)"
                        if x.ndim == expected - 1
                        else "reshape the inputs"
                    )
                )
            if x.shape[1] != module.in_channels and module.groups == 1:
                raise ValueError(
                    f"inputs have {x.shape[1]} channels but the model's first convolution expects "
                    f"{module.in_channels}"
                )
            return


@overload
def format_target(target: None, n: int, num_classes: int) -> None: ...
@overload
def format_target(
    target: int | tuple | torch.Tensor | list, n: int, num_classes: int
) -> torch.Tensor: ...
def format_target(target: TargetType, n: int, num_classes: int) -> torch.Tensor | None:
    """Turn a Captum-style target into a LongTensor ``[n]`` of class indices (or None).

    Accepted: ``None``; an int (same class for every input); a 0-d or ``[n]`` tensor; a list
    of ``n`` ints. Tuples address multi-dimensional outputs in Captum and are rejected here
    because NeuroChains needs ``[N, C]`` logits.
    """
    if target is None:
        return None
    if isinstance(target, tuple):
        raise ValueError(
            "tuple targets address multi-dimensional outputs; NeuroChains needs [N, C] logits, "
            "so pass an int, a list of ints or a tensor of class indices"
        )
    if isinstance(target, bool):
        raise TypeError("target must be an int, a list of ints or a tensor, not a bool")
    if isinstance(target, int):
        indices = torch.full((n,), target, dtype=torch.long)
    elif isinstance(target, torch.Tensor):
        if target.is_floating_point():
            raise TypeError(f"target tensor must hold integer class indices, got {target.dtype}")
        indices = target.reshape(-1).long().cpu()
        if indices.numel() == 1:
            indices = indices.expand(n).clone()
    elif isinstance(target, list):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in target):
            raise TypeError("a target list must hold one int class index per input")
        indices = torch.tensor(target, dtype=torch.long)
    else:
        raise TypeError(
            f"unsupported target type {type(target).__name__}; pass an int, list or tensor"
        )
    if indices.numel() != n:
        raise ValueError(f"target has {indices.numel()} entries but there are {n} inputs")
    bad = indices[(indices < 0) | (indices >= num_classes)]
    if bad.numel():
        raise ValueError(
            f"target class {int(bad[0])} is out of range for a model with {num_classes} classes "
            f"(valid: 0..{num_classes - 1})"
        )
    return indices


def format_additional_args(args: Any) -> tuple[Any, ...]:
    """Captum's ``additional_forward_args`` as a tuple (``None`` -> ``()``)."""
    if args is None:
        return ()
    return args if isinstance(args, tuple) else (args,)


def _per_example(arg: Any, n: int) -> bool:
    """Captum's convention: a tensor whose first dimension is the batch size is per-example."""
    return isinstance(arg, torch.Tensor) and arg.ndim > 0 and arg.shape[0] == n


def slice_additional_args(extra: tuple[Any, ...], n: int, start: int, stop: int) -> tuple[Any, ...]:
    """Rows ``start:stop`` of the per-example arguments in ``extra`` (batch size ``n``)."""
    return tuple(a[start:stop] if _per_example(a, n) else a for a in extra)


def repeat_additional_args(extra: tuple[Any, ...], n: int, times: int) -> tuple[Any, ...]:
    """Per-example arguments of a batch of ``n`` repeated for ``times`` consecutive batches."""
    return tuple(torch.cat([a] * times) if _per_example(a, n) else a for a in extra)
