"""Batched evaluation of ``v(x_T)`` on all ``2**n`` masked samples (Chen et al., 2024, Sec. 2).

The ``B * 2**n`` masked copies of a batch are built chunk by chunk (at most
``batch_size`` copies per forward pass, derived from a memory budget when not given),
so memory stays bounded for any ``n`` and batch size. Evaluation runs under
``torch.no_grad()``; an ``nn.Module`` runs in eval mode (as in the paper: batch-norm
statistics must not move and dropout must be off), and its modes and ``requires_grad``
flags are restored in ``finally``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from captum_chains._utils.model_state import eval_mode
from captum_chains._utils.progress import tqdm
from captum_chains.interactions.players import Players, masked_batch
from captum_chains.interactions.values import ValueFn

# A masked copy costs its input bytes a few times over (input, baseline, keep mask);
# activations of the forward pass are unknown, so the budget assumes they are this many
# times the input size. Pass ``batch_size`` to bound the chunk directly.
ACTIVATION_FACTOR = 64


def chunk_size(
    inputs: tuple[torch.Tensor, ...], memory_budget_mb: float, batch_size: int | None
) -> int:
    """Masked copies per forward pass: ``batch_size`` or what fits the memory budget."""
    if batch_size is not None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size}")
        return int(batch_size)
    per_copy = sum(x[0].numel() * x.element_size() for x in inputs) * ACTIVATION_FACTOR
    return max(1, min(4096, int(memory_budget_mb * 2**20 // max(per_copy, 1))))


def _expand_args(args: Sequence[Any], batch: int, index: torch.Tensor) -> list[Any]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch:
            out.append(a[index.to(a.device)])
        else:
            out.append(a)
    return out


def evaluate_values(
    forward_func: Callable[..., torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    baselines: tuple[torch.Tensor, ...],
    players: Players,
    target: torch.Tensor | None,
    value_fn: ValueFn,
    additional_forward_args: Sequence[Any] = (),
    chunk: int = 256,
    progress: bool = True,
    desc: str = "v(x_T)",
) -> torch.Tensor:
    """``v(x_T)`` for every sample and every subset ``T`` of the players.

    Parameters
    ----------
    forward_func : callable
        Model or function taking the (masked) input tensors, then the additional args.
    inputs, baselines : tuple of torch.Tensor
        ``[B, *shape]`` each.
    players : Players
        Validated feature mask.
    target : torch.Tensor or None
        ``[B]`` class indices.
    value_fn : callable
        ``(output [K, ...], target [K] | None) -> [K]``.
    additional_forward_args : sequence
        Extra forward arguments; tensors whose first dimension is ``B`` are indexed per
        masked copy, everything else is passed unchanged.
    chunk : int
        Masked copies per forward pass.
    progress : bool
        Show a tqdm bar.
    desc : str
        Bar label.

    Returns
    -------
    torch.Tensor
        ``[B, 2**n]`` float64 values, ``out[b, T] = v(x_T)`` for sample ``b``.
    """
    batch = inputs[0].shape[0]
    n_sub = 1 << players.n
    total = batch * n_sub
    device = inputs[0].device
    values = torch.empty(total, dtype=torch.float64, device=device)
    starts = range(0, total, chunk)
    bar = tqdm(starts, desc=desc, disable=not progress, leave=False, unit="chunk")
    guard = eval_mode(forward_func) if isinstance(forward_func, nn.Module) else nullcontext()
    with guard, torch.no_grad():
        for start in bar:
            k = torch.arange(start, min(start + chunk, total), device=device)
            sample_index, subsets = k // n_sub, k % n_sub
            masked = masked_batch(inputs, baselines, players, sample_index, subsets)
            extra = _expand_args(additional_forward_args, batch, sample_index)
            output = forward_func(*masked, *extra)
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"forward_func must return a tensor, got {type(output).__name__}")
            tgt = None if target is None else target[sample_index]
            v = value_fn(output, tgt)
            if v.shape != (len(k),):
                raise ValueError(
                    f"the value function returned shape {tuple(v.shape)} for {len(k)} masked "
                    f"samples; it must return one value per sample, shape ({len(k)},)"
                )
            values[start : start + len(k)] = v.detach().to(torch.float64)
    return values.view(batch, n_sub)
