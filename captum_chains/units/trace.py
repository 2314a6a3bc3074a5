"""The one instrumentation of a model's forward pass, and the dataflow trace read from it.

:class:`Instrumented` registers forward (pre-)hooks on every module and runs the model
under a :class:`torch.overrides.TorchFunctionMode`, reporting each module call and torch
function call to a :class:`CallView` (which may replace function results).
:func:`trace_forward` is one instrumented pass recorded into a :class:`Trace` (what unit
discovery reads) and, optionally, told to a :class:`TraceView` as it happens.
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
    ) -> Any:
        """The torch function ``func(*args, **kwargs)`` ran and returned ``result``; the
        return value is what the model continues with (``result`` itself, or an equal
        value the view can follow, such as sizes that remember the tensor they came from)."""


class CallView(Protocol):
    """What an :class:`Instrumented` pass reports to, as it happens.

    ``enter_module`` and ``exit_module`` run as forward (pre-)hooks and must return
    ``None``; ``torch_function`` returns the value the model continues with.
    """

    def enter_module(
        self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Module ``name`` is about to run ``forward(*args, **kwargs)``."""

    def exit_module(
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
    ) -> None:
        """Module ``name`` returned ``output`` (``None`` after an error, see ``exit_on_error``)."""

    def torch_function(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> Any:
        """``func(*args, **kwargs)`` returned ``result``; the return value replaces it."""


class _Mode(TorchFunctionMode):
    """The package's one torch function mode: every call is reported to a view."""

    def __init__(self, view: CallView) -> None:
        super().__init__()
        self._report = view.torch_function

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        return self._report(func, args, kwargs, func(*args, **kwargs))


class Instrumented:
    """A model whose calls of :meth:`run` are reported to a :class:`CallView`.

    Entering the context registers a forward pre-hook and a forward hook on every named
    submodule, acting only in the entering thread
    (:func:`~captum_chains._utils.hooks.this_thread_only`); leaving removes them, also
    after an error. :meth:`run` calls the model under
    :class:`~torch.overrides.TorchFunctionMode`, which is active only during that call.
    Gradient mode and the model's train/eval mode are the caller's.

    Parameters
    ----------
    model : nn.Module
        The model.
    view : CallView
        Told of every module call and torch function call of each :meth:`run`.
    root : bool, optional
        Report the calls of ``model`` itself too, as module ``""``.
    exit_on_error : bool, optional
        Call ``view.exit_module`` also when a module's forward raises (``output=None``),
        so that a view's module stack stays balanced when the model catches the error.
    """

    def __init__(
        self,
        model: nn.Module,
        view: CallView,
        *,
        root: bool = False,
        exit_on_error: bool = False,
    ) -> None:
        self.model = model
        self.view = view
        self.root = root
        self.exit_on_error = exit_on_error
        self._handles: list[Any] = []
        self._open = False

    def __enter__(self) -> Instrumented:
        if self._open:
            raise RuntimeError("this Instrumented model is already entered")
        enter, leave = self.view.enter_module, self.view.exit_module
        try:
            for name, module in self.model.named_modules():
                if not (name or self.root):
                    continue
                pre = this_thread_only(functools.partial(enter, name), module)
                post = this_thread_only(functools.partial(leave, name), module)
                self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                self._handles.append(
                    module.register_forward_hook(
                        post, with_kwargs=True, always_call=self.exit_on_error
                    )
                )
        except BaseException:
            self._remove()
            raise
        self._open = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _remove(self) -> None:
        self._open = False
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def run(self, *args: Any) -> Any:
        """``model(*args)``, every module and torch function call reported to the view."""
        if not self._open:
            raise RuntimeError("run() needs the context open: `with Instrumented(...) as m:`")
        with _Mode(self.view):
            return self.model(*args)


#: The code that calls the model: frames above it are not the model's (see pathways).
MODEL_CALL_CODE = Instrumented.run.__code__


class _Recorder:
    """The :class:`CallView` writing one pass into a :class:`Trace` and a :class:`TraceView`."""

    def __init__(self, view: TraceView | None) -> None:
        self.trace = Trace()
        self.view = view
        self.count = 0
        self.pending: dict[int, list[tuple[ModuleCall, Any]]] = {}

    def tick(self) -> int:
        """The next event index."""
        self.count += 1
        return self.count

    def enter_module(
        self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Open a :class:`ModuleCall` of ``name`` (its first tensor argument is its input)."""
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        call = ModuleCall(name=name, module=module, start=self.tick())
        if first is not None:
            self.trace.keep_alive.append(first)
            call.input_id, call.input_shape = id(first), tuple(first.shape)
        self.trace.calls.setdefault(name, []).append(call)
        token = None if self.view is None else self.view.module_pre(name, module, args, kwargs)
        self.pending.setdefault(id(module), []).append((call, token))

    def exit_module(
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
    ) -> None:
        """Close the open call of ``name`` with its output."""
        call, token = self.pending[id(module)].pop()
        call.end = self.tick()
        if isinstance(output, torch.Tensor):
            self.trace.keep_alive.append(output)
            call.output_id, call.output_shape = id(output), tuple(output.shape)
        if self.view is not None:
            self.view.module_post(token, name, module, output)

    def torch_function(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> Any:
        """Record an addition or layout change; tell the view of every call."""
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
            return self.view.function(func, args, kwargs, result)
        return result


def trace_forward(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    additional_args: tuple[Any, ...] = (),
    view: TraceView | None = None,
) -> Trace:
    """Run ``model(*inputs, *additional_args)`` once under no_grad and record its dataflow.

    One :class:`Instrumented` pass. The caller is responsible for the model's mode (see
    :func:`captum_chains._utils.model_state.eval_mode`). All hooks are removed before
    this function returns, also when the forward pass raises. Tensors are identified by
    Python identity and kept alive in the trace, so identities cannot be reused.

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
    with Instrumented(model, recorder) as instrumented, torch.no_grad():
        recorder.trace.output = instrumented.run(*inputs, *additional_args)
    return recorder.trace
