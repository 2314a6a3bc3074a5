"""The one reader of a model: an instrumented forward pass that records its dataflow.

:func:`trace_forward` runs the model once with forward (pre-)hooks on every module and a
:class:`torch.overrides.TorchFunctionMode` that sees every torch function call between
them. What ran is given two views: the :class:`Trace` that unit discovery reads (module
calls, additions and layout operations such as ``out += identity`` or ``permute``), and
any :class:`TraceView` passed in, which is told of every module call and function call
as it happens (:func:`captum_chains.export.recording.record` writes them into an
``fx.Graph``). Tensors are identified by Python identity and kept alive for the duration
of the trace, so identities cannot be reused.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Protocol

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


class TraceView(Protocol):
    """A second view of the traced pass, told of each call as it happens."""

    def module_pre(
        self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Module ``name`` is called; the returned token is given back to ``module_post``."""

    def module_post(self, token: Any, name: str, module: nn.Module, output: Any) -> None:
        """The call of module ``name`` that ``module_pre`` returned ``token`` for returned."""

    def function(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> None:
        """The torch function ``func(*args, **kwargs)`` ran and returned ``result``."""


class _Recorder(TorchFunctionMode):
    """Forward (pre-)hooks and a torch function mode writing one pass into its views."""

    def __init__(self, view: TraceView | None) -> None:
        super().__init__()
        self.trace = Trace()
        self.view = view
        self.count = 0
        self.pending: dict[int, list[tuple[ModuleCall, Any]]] = {}

    def tick(self) -> int:
        """The next event index."""
        self.count += 1
        return self.count

    def pre(self, name: str, mod: nn.Module, args: tuple[Any, ...], kwargs: dict) -> None:
        """Forward pre-hook of module ``name`` (with kwargs)."""
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        call = ModuleCall(name=name, module=mod, start=self.tick())
        if first is not None:
            self.trace.keep_alive.append(first)
            call.input_id, call.input_shape = id(first), tuple(first.shape)
        self.trace.calls.setdefault(name, []).append(call)
        token = None if self.view is None else self.view.module_pre(name, mod, args, kwargs)
        self.pending.setdefault(id(mod), []).append((call, token))

    def post(self, name: str, mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Forward hook of module ``name`` (with kwargs)."""
        call, token = self.pending[id(mod)].pop()
        call.end = self.tick()
        if isinstance(output, torch.Tensor):
            self.trace.keep_alive.append(output)
            call.output_id, call.output_shape = id(output), tuple(output.shape)
        if self.view is not None:
            self.view.module_post(token, name, mod, output)

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        op = getattr(func, "__name__", "")
        if op in _ADD_OPS or op in _LAYOUT_OPS:
            operands = tuple(id(a) for a in args if isinstance(a, torch.Tensor))
            out_id = id(result) if isinstance(result, torch.Tensor) else None
            if isinstance(result, torch.Tensor):
                self.trace.keep_alive.append(result)
            self.trace.functions.append(
                FunctionCall(op, self.tick(), operands, out_id, tuple(args[1:]))
            )
        if self.view is not None:
            self.view.function(func, args, kwargs, result)
        return result


def trace_forward(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    additional_args: tuple[Any, ...] = (),
    view: TraceView | None = None,
) -> Trace:
    """Run ``model(*inputs, *additional_args)`` once under no_grad and record its dataflow.

    The caller is responsible for the model's mode (see
    :func:`captum_chains._utils.model_state.eval_mode`). All hooks are removed before
    this function returns, also when the forward pass raises.

    Parameters
    ----------
    model : nn.Module
        The model; every submodule gets forward (pre-)hooks acting in this thread only.
    inputs : tuple of Tensor
        The inputs of the pass.
    additional_args : tuple, optional
        Further positional arguments of the model.
    view : TraceView, optional
        A second view of the same pass, told of every module and torch function call.

    Returns
    -------
    Trace
        The module calls, additions and layout operations of the pass, and its output.
    """
    recorder = _Recorder(view)
    handles = []
    try:
        for name, module in model.named_modules():
            if name:
                pre = this_thread_only(functools.partial(recorder.pre, name))
                post = this_thread_only(functools.partial(recorder.post, name))
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(module.register_forward_hook(post, with_kwargs=True))
        with torch.no_grad(), recorder:
            recorder.trace.output = model(*inputs, *additional_args)
    finally:
        for h in handles:
            h.remove()
    return recorder.trace
