"""Discover the scorable units and gateable layers/blocks of any model.

Discovery runs one traced forward pass (:mod:`captum_chains.units.trace`) and applies
rules on module *types* and the recorded *dataflow*, never on model names:

* every convolution that runs once is a layer of filters; its score acts on the
  output of the normalization that directly consumes the conv's output (Eq. 3), or on
  the conv's output when there is none; convolutions on globally pooled 1x1 vectors
  (squeeze-excitation, pooled heads) are not scored;
* every ``nn.Linear`` applied per position (output rank >= 3, e.g. ConvNeXt MLPs) is a
  layer of neurons scored at its output;
* a module is a *residual block* (gate kind ``block``) when it preserves its input's
  shape and its own forward adds its input to something;
* a scored conv layer outside residual blocks whose input and score-site tensor have
  the same shape gets a ``layer`` gate.

Model-family quirks live in adapters (:mod:`captum_chains.units.adapters`); an adapter
may claim modules before these generic rules run.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, cast

import torch
from torch import nn

from captum_chains._utils.model_state import eval_mode
from captum_chains.units.adapters import ADAPTERS, FUSED_ACTIVATIONS, INPUT_CHECKS, AdapterResult
from captum_chains.units.base import GateSpec, HookPoint, ModelStructure, UnitLayer
from captum_chains.units.trace import ModuleCall, Trace, trace_forward

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def architecture_fingerprint(model: nn.Module) -> str:
    """A hash of the model's module names, module types and parameter/buffer shapes.

    Two models with the same fingerprint have the same architecture (weights may differ).
    """
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        digest.update(f"{name}:{type(module).__qualname__};".encode())
        for pname, p in module.named_parameters(recurse=False):
            digest.update(f"{pname}{tuple(p.shape)};".encode())
        for bname, b in module.named_buffers(recurse=False):
            if b is not None:
                digest.update(f"{bname}{tuple(b.shape)};".encode())
    return digest.hexdigest()[:16]


def discover(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    additional_args: tuple[Any, ...] = (),
    *,
    layers: Sequence[str] | None = None,
    gates: bool | Sequence[str] = True,
) -> ModelStructure:
    """Find the unit layers and gates of ``model`` from one forward pass on ``inputs``.

    Parameters
    ----------
    model : nn.Module
        A classifier returning logits ``[N, C]``. It is left unchanged.
    inputs : tuple of Tensor
        Example inputs (a couple of samples suffice).
    additional_args : tuple
        Extra positional arguments of the forward call.
    layers : sequence of str, optional
        Restrict scoring to these unit layers; a name selects the layer of that name or
        every layer below a module of that name (``"layer3"``). Gates are then restricted
        to those that contain a selected layer.
    gates : bool or sequence of str
        ``True``: all discovered gates; ``False``: none; names: only those.

    Raises
    ------
    ValueError
        If the model's output is not ``[N, C]`` logits, if it has no supported units, or
        if ``layers``/``gates`` name something that does not exist.
    """
    for check in INPUT_CHECKS:
        check(model, inputs)
    with eval_mode(model):
        trace = trace_forward(model, inputs, additional_args)
    output = trace.output
    if not isinstance(output, torch.Tensor) or output.ndim != 2:
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(
            f"the model must return logits of shape [N, num_classes], got {got}; wrap the "
            "model so that its forward returns one [N, C] tensor"
        )
    units: list[UnitLayer] = []
    gate_list: list[GateSpec] = []
    claimed: set[str] = set()
    family = None
    for adapter in ADAPTERS:
        found: AdapterResult | None = adapter(model, trace)
        if found is None:
            continue
        units.extend(found.units)
        gate_list.extend(found.gates)
        claimed.update(found.claimed)
        family = family or found.family
    units.extend(_conv_units(model, trace, claimed, inputs[0]))
    units.extend(_pointwise_linear_units(model, trace, claimed))
    units.sort(key=lambda u: _position(trace, u))
    gate_list.extend(_block_gates(model, trace, units, claimed))
    units = _assign_blocks(units, gate_list)
    gate_list.extend(_layer_gates(trace, units))
    gate_list.sort(key=lambda g: _gate_position(trace, g))
    if not units:
        raise ValueError(
            f"found no scorable units in {type(model).__name__}: NeuroChains scores the "
            "filters of convolutions (nn.Conv1d/2d/3d), per-position nn.Linear neurons and "
            "ViT heads; the model has none that run exactly once"
        )
    units, gate_list = _select(units, gate_list, layers, gates)
    if family is None:
        if any(u.depthwise for u in units):
            family = "mobile"
        elif any(g.kind == "block" for g in gate_list):
            family = "residual"
        else:
            family = "plain"
    return ModelStructure(
        units=tuple(units),
        gates=tuple(gate_list),
        fingerprint=architecture_fingerprint(model),
        family=family,
        num_classes=int(output.shape[1]),
        input_shape=tuple(inputs[0].shape[1:]),
    )


def _position(trace: Trace, unit: UnitLayer) -> int:
    call = trace.single_call(unit.name) or trace.single_call(unit.site)
    return call.start if call is not None else 0


def _gate_position(trace: Trace, gate: GateSpec) -> int:
    call = trace.single_call(gate.start) or trace.single_call(gate.end)
    return call.start if call is not None else 0


def _is_pooled(shape: tuple[int, ...] | None, model_input: torch.Tensor) -> bool:
    if shape is None or len(shape) < 3:
        return False
    return math.prod(shape[2:]) == 1 and math.prod(model_input.shape[2:]) > 1


def _conv_units(
    model: nn.Module, trace: Trace, claimed: set[str], model_input: torch.Tensor
) -> list[UnitLayer]:
    units = []
    reused = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.conv._ConvNd) or name in claimed:
            continue
        calls = trace.calls.get(name, [])
        if len(calls) != 1:
            if len(calls) > 1:
                reused.append(name)
            continue
        call = calls[0]
        if call.output_shape is None or _is_pooled(call.output_shape, model_input):
            continue
        site, hook, dim, site_shape, norm = _score_site(trace, call)
        if site in claimed:
            continue
        groups = module.groups
        units.append(
            UnitLayer(
                name=name,
                kind="filter",
                size=module.out_channels,
                site=site,
                hook=hook,
                channel_dim=dim,
                module_type=type(module).__name__,
                depthwise=groups > 1 and groups == module.in_channels,
                spatial=tuple(
                    s for i, s in enumerate(site_shape[1:], 1) if i != dim % len(site_shape)
                ),
                norm=norm,
            )
        )
    if reused:
        warnings.warn(
            f"convolutions called more than once per forward pass are not scored: {reused}",
            stacklevel=3,
        )
    return units


def _score_site(
    trace: Trace, conv: ModuleCall
) -> tuple[str, HookPoint, int, tuple[int, ...], str | None]:
    """Where a conv's filter scores act (after its norm, Eq. 3, else at its output).

    Returns the site, the hook point, the channel dimension, the site tensor's shape and
    the BatchNorm whose affine output the scores scale (``None`` if there is none).
    """
    assert conv.output_id is not None and conv.output_shape is not None
    consumers = trace.consumers(conv.output_id)
    if consumers and isinstance(consumers[0].module, NORM_TYPES):
        norm = consumers[0]
        if trace.single_call(norm.name) is not None and norm.output_shape == conv.output_shape:
            batch_norm = (
                norm.name if isinstance(norm.module, nn.modules.batchnorm._BatchNorm) else None
            )
            child = _fused_activation(norm.module)
            act_call = trace.single_call(f"{norm.name}.{child}") if child else None
            if act_call is not None and act_call.input_shape:
                return act_call.name, "input", 1, act_call.input_shape, batch_norm
            return norm.name, "output", 1, norm.output_shape, batch_norm
    layout = trace.layout_alias(conv.output_id)
    if layout is not None and layout.output_id is not None and layout.op == "permute":
        dims = _permutation(layout.args)
        for norm in trace.consumers(layout.output_id):
            if isinstance(norm.module, NORM_TYPES) and trace.single_call(norm.name) and dims:
                assert norm.output_shape is not None
                return norm.name, "output", dims.index(1), norm.output_shape, None
    return conv.name, "output", 1, conv.output_shape, None


def _fused_activation(module: nn.Module) -> str | None:
    """The activation child of a fused norm + activation module (see FUSED_ACTIVATIONS)."""
    for rule in FUSED_ACTIVATIONS:
        child = rule(module)
        if child is not None and isinstance(getattr(module, child, None), nn.Module):
            return child
    return None


def _permutation(args: tuple[Any, ...]) -> tuple[int, ...] | None:
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = tuple(args[0])
    if args and all(isinstance(a, int) for a in args):
        return tuple(args)
    return None


def _pointwise_linear_units(model: nn.Module, trace: Trace, claimed: set[str]) -> list[UnitLayer]:
    units = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name in claimed:
            continue
        call = trace.single_call(name)
        if call is None or call.output_shape is None or len(call.output_shape) < 3:
            continue
        units.append(
            UnitLayer(
                name=name,
                kind="neuron",
                size=module.out_features,
                site=name,
                hook="output",
                channel_dim=-1,
                module_type="Linear",
                spatial=tuple(call.output_shape[1:-1]),
            )
        )
    return units


def _block_gates(
    model: nn.Module, trace: Trace, units: list[UnitLayer], claimed: set[str]
) -> list[GateSpec]:
    gates = []
    adds = [
        f for f in trace.functions if f.op in {"add", "add_", "__add__", "__iadd__", "__radd__"}
    ]
    for name, module in model.named_modules():
        if not name or name in claimed:
            continue
        call = trace.single_call(name)
        if call is None or call.input_id is None or call.input_shape != call.output_shape:
            continue
        inner = tuple(u.name for u in units if u.name.startswith(name + "."))
        if not inner:
            continue
        child_spans = []
        for child_name, _ in module.named_children():
            for c in trace.calls.get(f"{name}.{child_name}", []):
                child_spans.append((c.start, c.end))
        for f in adds:
            if not call.start < f.index < call.end or call.input_id not in f.operand_ids:
                continue
            if any(s < f.index < e for s, e in child_spans):
                continue
            gates.append(GateSpec(name=name, kind="block", start=name, end=name, units=inner))
            break
    # keep the innermost residual blocks when blocks nest
    names = [g.name for g in gates]
    return [g for g in gates if not any(o != g.name and o.startswith(g.name + ".") for o in names)]


def _assign_blocks(units: list[UnitLayer], gates: list[GateSpec]) -> list[UnitLayer]:
    out = []
    for u in units:
        block = next((g.name for g in gates if g.kind != "layer" and u.name in g.units), None)
        out.append(u if block is None else replace(u, block=block))
    return out


def _layer_gates(trace: Trace, units: list[UnitLayer]) -> list[GateSpec]:
    gates = []
    for u in units:
        if u.block is not None or u.kind != "filter":
            continue
        conv = trace.single_call(u.name)
        site = trace.single_call(u.site)
        if conv is None or site is None or u.hook not in ("output", "input"):
            continue
        site_shape = site.output_shape if u.hook == "output" else site.input_shape
        if conv.input_shape is not None and conv.input_shape == site_shape:
            gates.append(
                GateSpec(
                    name=u.name,
                    kind="layer",
                    start=u.name,
                    end=u.site,
                    end_hook=cast(HookPoint, u.hook),
                    units=(u.name,),
                )
            )
    return gates


def _select(
    units: list[UnitLayer],
    gates: list[GateSpec],
    layers: Sequence[str] | None,
    use_gates: bool | Sequence[str],
) -> tuple[list[UnitLayer], list[GateSpec]]:
    if layers is not None:
        if isinstance(layers, str):
            layers = [layers]
        if len(layers) == 0:
            raise ValueError(
                "layers=[] selects no unit layer, so the chain would be empty; pass "
                "layers=None to score every unit layer, or name at least one layer or module"
            )
        names = [u.name for u in units]
        chosen: set[str] = set()
        for request in layers:
            match = {n for n in names if n == request or n.startswith(request + ".")}
            if not match:
                hint = difflib.get_close_matches(request, names, n=3)
                raise ValueError(
                    f"layers= names {request!r}, which is no unit layer or module above one; "
                    f"did you mean {hint}? Unit layers: {names[:8]}"
                    + ("..." if len(names) > 8 else "")
                )
            chosen |= match
        units = [u for u in units if u.name in chosen]
        gates = [g for g in gates if chosen.intersection(g.units)]
    if use_gates is False:
        gates = []
    elif use_gates is not True:
        requested = [use_gates] if isinstance(use_gates, str) else list(use_gates)
        known = [g.name for g in gates]
        unknown = [r for r in requested if r not in known]
        if unknown:
            raise ValueError(f"gates= names unknown gates {unknown}; discovered gates: {known}")
        gates = [g for g in gates if g.name in requested]
    return units, gates
