"""The one place where user input is checked and formatted, Captum's way.

``inputs`` (a tensor or a tuple of tensors sharing dimension 0), ``target`` (Captum's
formats: ``None``, an int or one-element tensor for every example, a list of ints or a 1-D
tensor with one class per example, a tuple of output indices, or a list of such tuples)
and ``additional_forward_args`` (a tensor whose first dimension is the batch size is
per-example; anything else is passed unchanged). Every error names the problem and the
fix; class indices are checked against the output before any indexing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast, overload

import torch
from torch import Tensor, nn

TargetType = int | tuple[int, ...] | Tensor | list[int] | list[tuple[int, ...]] | None
"""Captum's target formats."""


def format_inputs(inputs: Any, *, strict: bool = True) -> tuple[torch.Tensor, ...]:
    """Validate ``inputs``: a tensor or a tuple of tensors sharing the batch dimension.

    Parameters
    ----------
    inputs : Tensor or tuple of Tensor
        Captum's ``inputs``.
    strict : bool
        Also require finite floating-point tensors with at least two dimensions ``[N, ...]``
        (what the NeuroChains optimization and the metrics need). The critical pathways
        accept any dtype and ``[N]`` inputs and check what their method needs themselves.
    """
    items = inputs if isinstance(inputs, tuple) else (inputs,)
    if not items:
        raise ValueError("inputs is an empty tuple; pass a tensor of shape [N, ...]")
    for i, t in enumerate(items):
        where = "inputs" if len(items) == 1 else f"inputs[{i}]"
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{where} must be a torch.Tensor, got {type(t).__name__}; convert it with "
                "torch.as_tensor(...) (examples along dimension 0)"
            )
        if t.ndim == 0:
            raise ValueError(f"{where} is a scalar; give it a batch dimension (dim 0)")
        if strict and not t.is_floating_point():
            raise TypeError(
                f"{where} has dtype {t.dtype}; pass floating-point inputs (e.g. x.float())"
            )
        if strict and t.ndim < 2:
            raise ValueError(
                f"{where} has shape {tuple(t.shape)}; expected a batch [N, ...] with at least "
                "two dimensions (add a batch dimension with x.unsqueeze(0))"
            )
        if t.shape[0] == 0:
            raise ValueError(
                f"{where} is an empty batch (shape {tuple(t.shape)}); pass N >= 1 inputs"
            )
        if strict and t.device.type != "meta" and not torch.isfinite(t).all():
            raise ValueError(f"{where} contains NaN or Inf values; clean or re-normalize them")
        if t.shape[0] != items[0].shape[0]:
            raise ValueError(
                f"all inputs must share the batch size (dimension 0); got "
                f"{[tuple(x.shape) for x in items]}"
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
def format_target(target: None, n: int, num_classes: int | None = None) -> None: ...
@overload
def format_target(
    target: int | Sequence[Any] | torch.Tensor, n: int, num_classes: int | None = None
) -> torch.Tensor: ...
def format_target(
    target: TargetType | Sequence[Any], n: int, num_classes: int | None = None
) -> torch.Tensor | None:
    """Turn a Captum-style class target into a LongTensor ``[n]`` (or None), on the CPU.

    Accepted: ``None``; an int (same class for every input); a 0-d, one-element or ``[n]``
    tensor; a list of ``n`` ints. Tuples address multi-dimensional outputs in Captum and are
    rejected: the methods that use this need ``[N, C]`` scores. With ``num_classes`` given,
    class indices are range-checked.
    """
    if target is None:
        return None
    if isinstance(target, tuple):
        raise ValueError(
            f"tuple target {target} addresses a multi-dimensional output; this method needs "
            "[N, C] scores, so pass an int, a list of ints or a tensor of class indices (or "
            "select the score inside the forward function)"
        )
    if isinstance(target, bool):
        raise TypeError("target must be an int, a list of ints or a tensor, not a bool")
    if isinstance(target, int):
        indices = torch.full((n,), target, dtype=torch.long)
    elif isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
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
    if num_classes is not None:
        bad = indices[(indices < 0) | (indices >= num_classes)]
        if bad.numel():
            raise ValueError(
                f"target class {int(bad[0])} is out of range for a model with {num_classes} "
                f"classes (valid: 0..{num_classes - 1})"
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


def index_batch(
    inputs: tuple[Tensor, ...], args: tuple[Any, ...], batch: int, index: Tensor
) -> tuple[tuple[Tensor, ...], tuple[Any, ...]]:
    """Rows ``index`` of the inputs and of extra arguments whose dim 0 is the batch.

    Extra arguments that are tensors with ``batch`` rows are indexed like the inputs
    (Captum repeats such tensors the same way); anything else is passed unchanged.
    """
    picked = tuple(t[index] for t in inputs)
    return picked, tuple(a[index] if _per_example(a, batch) else a for a in args)


# -- targets of outputs of any shape (critical pathways) ---------------------------------


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
    """Validate a number of integration steps: a positive int."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int (number of alpha steps), got {steps!r}")
    return steps


def check_batch_size(size: int | None, name: str = "internal_batch_size") -> int | None:
    """Validate a batch size: a positive int, or None for everything at once."""
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{name} must be a positive int or None, got {size!r}")
    return size
