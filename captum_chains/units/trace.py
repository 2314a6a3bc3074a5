"""One instrumented forward pass that records the model's dataflow.

Module calls are recorded with forward (pre-)hooks; functional additions and layout
operations (``x + y``, ``out += identity``, ``permute``) are recorded with a
:class:`torch.overrides.TorchFunctionMode`. Tensors are identified by Python identity
and kept alive for the duration of the trace, so identities cannot be reused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from captum_chains._utils.hooks import this_thread_only

_ADD_OPS = frozenset({"add", "add_", "__add__", "__iadd__", "__radd__"})
_LAYOUT_OPS = frozenset({"permute", "contiguous", "transpose"})


@dataclass
class ModuleCall:
    """One call of one module during the traced forward pass."""

    name: str
    module: nn.Module
    start: int
    end: int = -1
    input_id: int | None = None
    input_shape: tuple[int, ...] | None = None
    output_id: int | None = None
    output_shape: tuple[int, ...] | None = None


@dataclass
class FunctionCall:
    """One recorded functional operation (an addition or a layout change)."""

    op: str
    index: int
    operand_ids: tuple[int, ...]
    output_id: int | None
    args: tuple[Any, ...] = ()


@dataclass
class Trace:
    """The recorded forward pass.

    Attributes
    ----------
    calls : dict
        Module name -> list of its calls, in order.
    functions : list of FunctionCall
        Additions and layout changes, in order.
    output : torch.Tensor
        The model's output.
    """

    calls: dict[str, list[ModuleCall]] = field(default_factory=dict)
    functions: list[FunctionCall] = field(default_factory=list)
    output: Any = None
    keep_alive: list[torch.Tensor] = field(default_factory=list, repr=False)

    def single_call(self, name: str) -> ModuleCall | None:
        """The call of module ``name`` if it ran exactly once, else ``None``."""
        calls = self.calls.get(name, [])
        return calls[0] if len(calls) == 1 else None

    def consumers(self, tensor_id: int) -> list[ModuleCall]:
        """Module calls whose first input is the tensor ``tensor_id``, in call order."""
        found = [c for calls in self.calls.values() for c in calls if c.input_id == tensor_id]
        return sorted(found, key=lambda c: c.start)

    def layout_alias(self, tensor_id: int) -> FunctionCall | None:
        """The layout operation (e.g. ``permute``) applied to ``tensor_id``, if any."""
        for f in self.functions:
            if f.op in _LAYOUT_OPS and f.operand_ids[:1] == (tensor_id,):
                return f
        return None


class _Recorder(TorchFunctionMode):
    def __init__(self, trace: Trace, counter: Callable[[], int]) -> None:
        super().__init__()
        self.trace = trace
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        result = func(*args, **(kwargs or {}))
        op = getattr(func, "__name__", "")
        if op in _ADD_OPS or op in _LAYOUT_OPS:
            operands = tuple(id(a) for a in args if isinstance(a, torch.Tensor))
            out_id = id(result) if isinstance(result, torch.Tensor) else None
            if isinstance(result, torch.Tensor):
                self.trace.keep_alive.append(result)
            self.trace.functions.append(
                FunctionCall(op, self.counter(), operands, out_id, tuple(args[1:]))
            )
        return result


def _first_tensor(values: Sequence[Any]) -> torch.Tensor | None:
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    return None


def trace_forward(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], additional_args: tuple[Any, ...] = ()
) -> Trace:
    """Run ``model(*inputs, *additional_args)`` once under no_grad and record its dataflow.

    The caller is responsible for the model's mode (see
    :func:`captum_chains._utils.model_state.eval_mode`). All hooks are removed before
    this function returns, also when the forward pass raises.
    """
    trace = Trace()
    count = [0]

    def tick() -> int:
        count[0] += 1
        return count[0]

    pending: dict[int, list[ModuleCall]] = {}
    handles = []

    def make_hooks(name: str, module: nn.Module):
        def pre(mod: nn.Module, args: tuple[Any, ...]) -> None:
            first = _first_tensor(args)
            call = ModuleCall(name=name, module=mod, start=tick())
            if first is not None:
                trace.keep_alive.append(first)
                call.input_id, call.input_shape = id(first), tuple(first.shape)
            trace.calls.setdefault(name, []).append(call)
            pending.setdefault(id(mod), []).append(call)

        def post(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            call = pending[id(mod)].pop()
            call.end = tick()
            out = output if isinstance(output, torch.Tensor) else None
            if out is not None:
                trace.keep_alive.append(out)
                call.output_id, call.output_shape = id(out), tuple(out.shape)

        return pre, post

    try:
        for name, module in model.named_modules():
            if not name:
                continue
            pre, post = make_hooks(name, module)
            handles.append(module.register_forward_pre_hook(this_thread_only(pre)))
            handles.append(module.register_forward_hook(this_thread_only(post)))
        with torch.no_grad(), _Recorder(trace, tick):
            trace.output = model(*inputs, *additional_args)
    finally:
        for h in handles:
            h.remove()
    return trace
