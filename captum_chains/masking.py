"""Scores and gates applied to a model inside a context manager.

``apply_masks`` registers one forward (pre-)hook per site module that

* multiplies a unit layer's channels by their scores (Eq. 3 of the NeuroChains paper:
  ``F(x; W * S)``, the score scaling the filter's post-normalization output);
* mixes a layer or block with the identity through its gate (Eq. 7):
  ``G * F(H) + (1 - G) * H``, or scales a residual branch by ``G``.

The hooks read the current tensors from a :class:`MaskState`, so an optimizer can update
scores and gates between forward passes without re-registering anything. They act only
in the thread that opened the context (other threads running the same model see it
unmasked), nothing on the model is swapped or written, and every hook is removed in
``finally``, also after an exception or ``KeyboardInterrupt``.

Batched regions: with scores of shape ``[K, C]`` and gates of shape ``[K]``, a batch of
``K * B`` inputs is treated as K consecutive groups of B inputs, each group masked by
its own row (``K`` independent sub-networks in one forward pass).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from captum_chains._utils.hooks import this_thread_only
from captum_chains._utils.model_state import eval_mode
from captum_chains._utils.norm_fold import Fold, folded_norms
from captum_chains.units.adapters import SITE_HOOKS
from captum_chains.units.base import GateSpec, ModelStructure, UnitLayer


@dataclass
class MaskState:
    """The tensors the hooks read at every forward pass.

    Attributes
    ----------
    scores : dict of str to Tensor
        Unit layer name -> scores ``[C]`` (or ``[K, C]`` for K regions). Layers not in the
        dict are left unscaled.
    gates : dict of str to Tensor
        Gate name -> gate value in [0, 1], a scalar (or ``[K]``). Gates not in the dict are
        left open (the layer/block runs unchanged).
    """

    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    gates: dict[str, torch.Tensor] = field(default_factory=dict)


def scale_channels(
    tensor: torch.Tensor, scores: torch.Tensor, dim: int, unit_width: int = 1
) -> torch.Tensor:
    """Multiply ``tensor`` along ``dim`` by ``scores`` (one score per ``unit_width`` channels).

    ``scores`` of shape ``[K, C]`` scale K consecutive groups of the batch separately.
    """
    if unit_width > 1:
        scores = scores.repeat_interleave(unit_width, dim=-1)
    if scores.ndim == 1:
        shape = [1] * tensor.ndim
        shape[dim] = scores.shape[0]
        return tensor * scores.view(shape)
    k = scores.shape[0]
    grouped = tensor.reshape(k, tensor.shape[0] // k, *tensor.shape[1:])
    gdim = dim + 1 if dim >= 0 else dim
    shape = [1] * grouped.ndim
    shape[0], shape[gdim] = k, scores.shape[1]
    return (grouped * scores.view(shape)).reshape(tensor.shape)


def _per_region(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a gate (scalar or ``[K]``) over a batch of K groups."""
    if value.ndim == 0:
        return value
    k = value.shape[0]
    return value.repeat_interleave(like.shape[0] // k).view(-1, *([1] * (like.ndim - 1)))


def mix(gate: torch.Tensor, output: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """``G * output + (1 - G) * identity`` (Eq. 7), with per-region gates when ``G`` is 1-D.

    Written so that ``G = 1`` returns ``output`` and ``G = 0`` returns ``identity`` exactly.
    """
    g = _per_region(gate, output)
    return g * output + (1 - g) * identity


class _SiteHook:
    """Everything that happens at one module: scores, then layer gates, then block gates."""

    def __init__(self, state: MaskState, stash: dict[str, torch.Tensor], folded: set[str]) -> None:
        self.state = state
        self.stash = stash
        self.folded = folded  # units whose scores a BatchNorm fold already applied
        self.units: list[UnitLayer] = []
        self.mix_gates: list[GateSpec] = []
        self.scale_gates: list[GateSpec] = []

    def transform(self, y: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            if unit.name in self.folded:  # applied by the BatchNorm right before this site
                self.folded.discard(unit.name)
                continue
            s = self.state.scores.get(unit.name)
            if s is not None:
                y = scale_channels(y, s, unit.channel_dim, unit.unit_width)
        for gate in self.mix_gates:
            g = self.state.gates.get(gate.name)
            h = self.stash.pop(gate.name, None)
            if g is not None and h is not None:
                y = mix(g, y, h)
        for gate in self.scale_gates:
            g = self.state.gates.get(gate.name)
            if g is not None:
                y = y * _per_region(g, y)
        return y


@contextmanager
def apply_masks(
    model: nn.Module,
    structure: ModelStructure,
    state: MaskState,
    *,
    fold_norms: bool = False,
) -> Iterator[nn.Module]:
    """Run ``model`` with scores and gates applied, inside a ``with`` block.

    Parameters
    ----------
    model : nn.Module
        The model the structure was discovered on.
    structure : ModelStructure
        Where scores and gates act.
    state : MaskState
        Current scores and gates; may be updated while the context is open.
    fold_norms : bool
        Apply single-region scores of units that sit right after a BatchNorm by running
        that BatchNorm with ``gamma * s`` and ``beta * s`` (mathematically the same as
        scaling its output, Eq. 3, without an extra pass over the feature map; equal up
        to float rounding; see :mod:`captum_chains._utils.norm_fold`). Used by the
        optimization loop for speed; off by default so that a SubNetwork runs exactly the
        hooks' arithmetic.

    Yields
    ------
    nn.Module
        The same model object, in eval mode (see
        :func:`captum_chains._utils.model_state.eval_mode`), masked in this thread.

    Raises
    ------
    ConcurrentUseError
        If the model is in training mode while another thread runs it through the package.
    """
    modules = dict(model.named_modules())
    stash: dict[str, torch.Tensor] = {}
    sites: dict[tuple[str, str], _SiteHook] = {}
    folded: set[str] = set()

    def site(name: str, hook: str) -> _SiteHook:
        if name not in modules:
            raise ValueError(
                f"the model has no module {name!r}; was the structure discovered on another model?"
            )
        return sites.setdefault((name, hook), _SiteHook(state, stash, folded))

    for unit in structure.units:
        site(unit.site, unit.hook).units.append(unit)
    starts: dict[str, list[str]] = {}
    for gate in structure.gates:
        target = site(gate.end, gate.end_hook)
        (target.mix_gates if gate.mode == "mix" else target.scale_gates).append(gate)
        if gate.mode == "mix":
            if gate.start not in modules:
                raise ValueError(f"the model has no module {gate.start!r} (gate {gate.name!r})")
            starts.setdefault(gate.start, []).append(gate.name)

    folds = _norm_folds(modules, structure, state, folded) if fold_norms else {}
    handles: list[Any] = []
    with eval_mode(model), folded_norms(folds):
        try:
            for gate_start, names in starts.items():
                start = modules[gate_start]
                hook = this_thread_only(_stash_hook(names, stash, state), start)
                handles.append(start.register_forward_pre_hook(hook))
            for (name, hook_kind), handler in sites.items():
                module = modules[name]
                if hook_kind == "output":
                    handles.append(module.register_forward_hook(_output_hook(handler, module)))
                elif hook_kind == "input":
                    handles.append(module.register_forward_pre_hook(_input_hook(handler, module)))
                elif hook_kind in SITE_HOOKS:  # e.g. heads inside nn.MultiheadAttention
                    handles.append(SITE_HOOKS[hook_kind](module, handler.transform))
                else:
                    raise ValueError(
                        f"unit site {name!r} uses the hook {hook_kind!r}, which no adapter "
                        f"registered in captum_chains.units.adapters.SITE_HOOKS"
                    )
            yield model
        finally:
            for h in handles:
                h.remove()
            stash.clear()
            folded.clear()


def _norm_folds(
    modules: dict[str, nn.Module], structure: ModelStructure, state: MaskState, folded: set[str]
) -> dict[nn.Module, Fold]:
    """A fold per unit layer whose scores scale an affine BatchNorm's output (``unit.norm``).

    One unit per BatchNorm, one score per channel. Only 1-D scores are folded: ``[K, C]``
    scores of batched regions take the site hook's path.
    """
    candidates: dict[str, list[UnitLayer]] = {}
    for unit in structure.units:
        if unit.norm is not None:
            candidates.setdefault(unit.norm, []).append(unit)
    folds: dict[nn.Module, Fold] = {}
    for norm, units in candidates.items():
        module = modules.get(norm)
        if len(units) != 1 or not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        unit = units[0]
        weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
        if (
            weight is None
            or bias is None
            or unit.channel_dim != 1
            or unit.unit_width != 1
            or weight.shape != (unit.size,)
        ):
            continue
        folds[module] = _fold(weight, bias, unit.name, state, folded)
    return folds


def _fold(
    weight: torch.Tensor, bias: torch.Tensor, unit: str, state: MaskState, folded: set[str]
) -> Fold:
    """The scaled affine parameters of one BatchNorm for the current scores of ``unit``."""

    def scaled() -> tuple[torch.Tensor, torch.Tensor] | None:
        s = state.scores.get(unit)
        if s is None or s.ndim != 1:
            return None
        folded.add(unit)
        return weight * s, bias * s

    return scaled


def _stash_hook(names: list[str], stash: dict[str, torch.Tensor], state: MaskState):
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        for name in names:
            if name in state.gates:
                stash[name] = args[0]

    return hook


def _output_hook(handler: _SiteHook, site: nn.Module):
    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return handler.transform(output)

    return this_thread_only(hook, site)


def _input_hook(handler: _SiteHook, site: nn.Module):
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (handler.transform(args[0]), *args[1:])

    return this_thread_only(hook, site)


def state_from_mappings(
    scores: Mapping[str, torch.Tensor] | None = None,
    gates: Mapping[str, torch.Tensor | float] | None = None,
) -> MaskState:
    """Build a :class:`MaskState` from plain mappings (floats become scalar tensors)."""
    return MaskState(
        scores=dict(scores or {}),
        gates={
            k: v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            for k, v in (gates or {}).items()
        },
    )
