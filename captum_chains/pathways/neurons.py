"""Activation neurons of critical pathways, found in any model, and the tracer that masks them.

A neuron (Khakzar et al., CVPR 2021, Sec. 3) is one element of a rectifier output.
:class:`ActivationTracer` sees every activation call (module or functional) through the
package's one instrumentation (:class:`captum_chains.units.trace.Instrumented`),
identifies it by its call site, masks it, and records which convolutions produced its
input (:class:`Producer`). Which nonlinearities count and how sites are keyed:
``docs/architecture.md`` ("Activation neurons of critical pathways").
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_chains._utils.model_state import eval_mode
from captum_chains._utils.validation import format_additional_args, format_inputs, require_module
from captum_chains.units import trace
from captum_chains.units.trace import MODEL_CALL_CODE, Instrumented

__all__ = [
    "ACTIVATION_KINDS",
    "DEFAULT_ACTIVATIONS",
    "ActivationTracer",
    "NeuronSite",
    "Producer",
    "discover_neurons",
]

_FUNCTION_KINDS: dict[Any, str] = {}


def _register(kind: str, *functions: Any) -> None:
    for function in functions:
        _FUNCTION_KINDS[function] = kind


_register("relu", F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_)
_register("relu6", F.relu6)
_register("hardtanh", F.hardtanh, F.hardtanh_)
_register("leaky_relu", F.leaky_relu, F.leaky_relu_)
_register("gelu", F.gelu)
_register("silu", F.silu)
_register("hardswish", F.hardswish)
_register("elu", F.elu, F.elu_)
_register("celu", F.celu, F.celu_)
_register("selu", F.selu, F.selu_, torch.selu, torch.selu_)
_register("mish", F.mish)

ACTIVATION_KINDS: tuple[str, ...] = (
    "relu",
    "relu6",
    "leaky_relu",
    "gelu",
    "silu",
    "hardswish",
    "elu",
    "celu",
    "selu",
    "mish",
)
"""Every activation kind the tracer recognizes (``hardtanh(min_val=0)`` counts as ``relu6``)."""

DEFAULT_ACTIVATIONS: tuple[str, ...] = ACTIVATION_KINDS
"""The kinds whose outputs are neurons unless ``activations=`` says otherwise."""

_UNIT_FUNCTIONS = frozenset(
    {
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "linear",
    }
)
_PASS_THROUGH = frozenset(
    {
        "batch_norm",
        "instance_norm",
        "group_norm",
        "dropout",
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "alpha_dropout",
        "feature_alpha_dropout",
        "add",
        "add_",
        "__add__",
        "__radd__",
        "__iadd__",
        "sub",
        "sub_",
        "__sub__",
        "__isub__",
        "mul",
        "mul_",
        "__mul__",
        "__rmul__",
        "__imul__",
        "div",
        "div_",
        "__truediv__",
        "__itruediv__",
        "clone",
        "contiguous",
        "to",
        "float",
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "_max_pool1d",
        "_max_pool2d",
        "_max_pool3d",
        "avg_pool1d",
        "avg_pool2d",
        "avg_pool3d",
    }
)

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
#: Frames of these files are the tracer's own, never the model's calling code.
_TRACER_FILES = frozenset({__file__, trace.__file__})


@dataclass(frozen=True)
class Producer:
    """A conv or linear module whose output channels reach an activation one-to-one.

    Attributes
    ----------
    module : str
        Qualified name of the conv / linear module (``model.get_submodule(module)``).
    dim : int
        The channel dimension in the batched activation tensor (1 for convs, the
        last one for linear layers).
    channels : int
        Number of output channels (filters) of the module.
    """

    module: str
    dim: int
    channels: int


@dataclass(frozen=True)
class NeuronSite:
    """One activation output of the model: a layer of neurons.

    Attributes
    ----------
    name : str
        Unique label. For an activation module it is the module's qualified name
        (``"features.2"``, ``"blocks.1.0.bn1.act"``); for a functional call it is
        ``"<calling module>:<kind>"`` (``"layer1.0:relu"``, ``"<model>:relu"`` at the
        top level). Names shared by several sites get ``#0``, ``#1``, ... in forward
        order.
    module : str
        Qualified name of the innermost module running when the activation was called.
    kind : str
        Activation kind (one of :data:`ACTIVATION_KINDS`).
    location : str or None
        ``file.py:line`` of the model code that made the call (``None`` when every
        frame between the model call and the activation is inside ``torch``).
    shape : tuple of int
        Shape of the activation output for one example (the batch dimension dropped).
    producers : tuple of Producer
        Conv / linear modules whose outputs reach this activation channel-wise.
    """

    name: str
    module: str
    kind: str
    location: str | None
    shape: tuple[int, ...]
    producers: tuple[Producer, ...] = ()
    key: tuple = field(default=(), repr=False, compare=False)

    @property
    def numel(self) -> int:
        """Number of neurons of one example."""
        n = 1
        for s in self.shape:
            n *= int(s)
        return n


Handler = Callable[[int, Tensor], Tensor]
"""``handler(site_index, activation_output) -> tensor the model continues with``."""


def _identity_handler(index: int, out: Tensor) -> Tensor:
    return out


def _activation_kind(func: Any, args: tuple, kwargs: dict) -> str | None:
    try:
        kind = _FUNCTION_KINDS.get(func)
    except TypeError:  # unhashable callables are never activations
        return None
    if kind == "hardtanh":
        min_val = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
        return "relu6" if float(min_val) == 0.0 else None
    return kind


def _call_location() -> tuple[tuple[str, int] | None, str | None]:
    """The first frame of model code (outside torch and the tracer) above the call."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code is MODEL_CALL_CODE:
            return None, None
        filename = code.co_filename
        if not filename.startswith(_TORCH_DIR) and filename not in _TRACER_FILES:
            line = frame.f_lineno
            return (filename, line), f"{os.path.basename(filename)}:{line}"
        frame = frame.f_back
    return None, None


@dataclass
class _Call:
    key: tuple
    kind: str
    module: str
    module_activation: bool
    location: str | None
    shape: tuple[int, ...]
    producers: tuple[Producer, ...]


class ActivationTracer:
    """Run a model with every activation output routed through a handler.

    Use as a context manager: entering instruments the model (forward pre/post hooks on
    every module, see :class:`~captum_chains.units.trace.Instrumented`), leaving removes
    the hooks in ``finally``. Inside, :meth:`run` calls the model once. The first
    :meth:`run` defines the :attr:`sites`; later runs must meet exactly the same sites
    (else ``RuntimeError``), and hand each activation to ``handler(site_index, output)``,
    whose return value replaces the activation in the rest of the forward pass.

    The tracer does not change the model's mode or gradients; callers combine it with
    :func:`captum_chains._utils.model_state.eval_mode`.

    Parameters
    ----------
    model : nn.Module
        The model; called as ``model(*inputs, *additional_forward_args)``.
    activations : sequence of str
        Activation kinds that are neurons (see :data:`ACTIVATION_KINDS`).
    """

    def __init__(self, model: nn.Module, activations: Sequence[str] = DEFAULT_ACTIVATIONS) -> None:
        self.model = require_module(model, "ActivationTracer")
        self.kinds = check_activations(activations)
        self._view = _SiteView(model, self.kinds)
        self._instrumented = Instrumented(model, self._view, root=True, exit_on_error=True)
        self._sites: tuple[NeuronSite, ...] | None = None
        self._active = False

    # -- context -----------------------------------------------------------------
    def __enter__(self) -> ActivationTracer:
        if self._active:
            raise RuntimeError("this ActivationTracer is already active")
        self._instrumented.__enter__()
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._active = False
        self._instrumented.__exit__(*exc)
        self._view.stack.clear()

    # -- passes ------------------------------------------------------------------
    def key(self, index: int) -> tuple:
        """The site key of the activation ``index`` (usable inside a handler of any pass)."""
        return self._view.calls[index].key

    @property
    def sites(self) -> tuple[NeuronSite, ...]:
        """The activation sites met in the first :meth:`run`, in forward order."""
        if self._sites is None:
            raise RuntimeError("call run() once before reading the sites")
        return self._sites

    def run(
        self,
        inputs: tuple[Tensor, ...],
        additional_forward_args: tuple[Any, ...] = (),
        handler: Handler = _identity_handler,
    ) -> Any:
        """Call the model once with ``handler`` applied to every activation output."""
        if not self._active:
            raise RuntimeError("use the tracer as a context manager: `with tracer: ...`")
        view = self._view
        defining = self._sites is None
        view.start(handler, defining)
        try:
            output = self._instrumented.run(*inputs, *additional_forward_args)
        finally:
            view.finish()
        if defining:
            self._define_sites()
        elif len(view.seen) != len(self._sites or ()):
            missing = [s.name for i, s in enumerate(self.sites) if i not in view.seen]
            raise RuntimeError(
                f"activation sites {missing[:5]} of the first pass were not reached; the "
                "model's forward takes a different path now (data-dependent control flow "
                "is not supported by critical pathways)"
            )
        return output

    def _define_sites(self) -> None:
        calls = self._view.calls
        if not calls:
            raise ValueError(
                f"no activation neurons found in {type(self.model).__name__}'s forward pass; "
                f"critical pathways need rectifier-type activations ({', '.join(self.kinds)})"
                " called as modules or torch functions"
            )
        bases = []
        for call in calls:
            if call.module_activation:
                bases.append(call.module or "<model>")
            else:
                bases.append(f"{call.module or '<model>'}:{call.kind}")
        totals = Counter(bases)
        counter: Counter = Counter()
        sites = []
        for call, base in zip(calls, bases, strict=True):
            name = base
            if totals[base] > 1:
                name = f"{base}#{counter[base]}"
                counter[base] += 1
            sites.append(
                NeuronSite(
                    name=name,
                    module=call.module,
                    kind=call.kind,
                    location=call.location,
                    shape=call.shape,
                    producers=call.producers,
                    key=call.key,
                )
            )
        self._sites = tuple(sites)


class _SiteView:
    """The :class:`~captum_chains.units.trace.CallView` of an :class:`ActivationTracer`.

    Keeps the stack of running modules, keys each activation call by site, hands its
    output to the pass's handler and, in the first pass, records the sites and the
    producers of their inputs. Tensors are held only during a pass.
    """

    def __init__(self, model: nn.Module, kinds: tuple[str, ...]) -> None:
        self.kinds = kinds
        self.modules = dict(model.named_modules())
        self.stack: list[str] = []
        self.calls: list[_Call] = []
        self.index: dict[tuple, int] = {}
        self.defining = False
        self.handler: Handler = _identity_handler
        self.occurrences: Counter = Counter()
        self.seen: set[int] = set()
        self.origins: dict[int, tuple[Tensor, frozenset[Producer]]] = {}

    def start(self, handler: Handler, defining: bool) -> None:
        """Begin a pass (the defining one records the sites anew)."""
        self.defining = defining
        self.handler = handler
        self.occurrences = Counter()
        self.seen = set()
        self.stack.clear()
        if defining:
            self.calls = []
            self.index = {}

    def finish(self) -> None:
        """End a pass: drop the tensors and the handler it held."""
        self.origins = {}
        self.handler = _identity_handler
        self.stack.clear()

    # -- the CallView ------------------------------------------------------------
    def enter_module(
        self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Module ``name`` starts running."""
        self.stack.append(name)

    def exit_module(
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
    ) -> None:
        """Module ``name`` returned (or raised)."""
        if self.stack:
            self.stack.pop()

    def torch_function(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> Any:
        """An activation's output goes through the handler; other calls pass unchanged."""
        kind = _activation_kind(func, args, kwargs)
        if kind is None or kind not in self.kinds:
            if self.defining and isinstance(out, Tensor):
                self._propagate(func, args, kwargs, out)
            return out
        if not isinstance(out, Tensor) or out.ndim == 0:
            return out
        index = self._site_index(kind, out, args)
        replaced = self.handler(index, out)
        if self.defining:
            self.origins.pop(id(out), None)
        return replaced

    # -- sites and producers -----------------------------------------------------
    def _site_index(self, kind: str, out: Tensor, args: tuple) -> int:
        stack = tuple(self.stack)
        location_key, location = _call_location()
        base = (stack, location_key, kind)
        occurrence = self.occurrences[base]
        self.occurrences[base] = occurrence + 1
        key = (*base, occurrence)
        if self.defining:
            module_name = stack[-1] if stack else ""
            module = self.modules.get(module_name)
            module_activation = (
                module is not None
                and next(module.children(), None) is None
                and next(module.parameters(recurse=False), None) is None
            )
            first = args[0] if args and isinstance(args[0], Tensor) else None
            producers = self._producers_of(first) if first is not None else frozenset()
            self.calls.append(
                _Call(
                    key=key,
                    kind=kind,
                    module=module_name,
                    module_activation=module_activation,
                    location=location,
                    shape=tuple(out.shape[1:]),
                    producers=tuple(sorted(producers, key=lambda p: p.module)),
                )
            )
            self.index[key] = len(self.calls) - 1
            return len(self.calls) - 1
        index = self.index.get(key)
        if index is None:
            raise RuntimeError(
                f"an activation ({kind} in module {stack[-1] if stack else '<model>'!r} at "
                f"{location}) appeared that the first pass did not meet; the model's forward "
                "takes a different path now (data-dependent control flow is not supported)"
            )
        self.seen.add(index)
        return index

    def _producers_of(self, tensor: Tensor) -> frozenset[Producer]:
        entry = self.origins.get(id(tensor))
        if entry is None or entry[0] is not tensor:
            return frozenset()
        return entry[1]

    def _propagate(self, func: Any, args: tuple, kwargs: dict, out: Tensor) -> None:
        name = getattr(func, "__name__", "")
        if name in _UNIT_FUNCTIONS:
            module_name = self.stack[-1] if self.stack else ""
            module = self.modules.get(module_name)
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if module is not None and getattr(module, "weight", None) is weight and out.ndim >= 2:
                dim = 1 if name.startswith("conv") else out.ndim - 1
                producer = Producer(module_name, dim, int(out.shape[dim]))
                self.origins[id(out)] = (out, frozenset({producer}))
            return
        if name not in _PASS_THROUGH:
            return
        found: set[Producer] = set()
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, Tensor):
                found |= self._producers_of(arg)
        kept = frozenset(p for p in found if p.dim < out.ndim and out.shape[p.dim] == p.channels)
        if kept:
            self.origins[id(out)] = (out, kept)


def check_activations(activations: Sequence[str]) -> tuple[str, ...]:
    """Validate a set of activation kinds."""
    if isinstance(activations, str):
        activations = (activations,)
    kinds = tuple(activations)
    unknown = [k for k in kinds if k not in ACTIVATION_KINDS]
    if unknown or not kinds:
        raise ValueError(
            f"unknown activation kinds {unknown}; choose a non-empty subset of {ACTIVATION_KINDS}"
        )
    return kinds


@contextmanager
def traced(
    model: nn.Module, activations: Sequence[str] = DEFAULT_ACTIVATIONS
) -> Iterator[ActivationTracer]:
    """``eval_mode(model)`` plus an :class:`ActivationTracer`, both undone on exit."""
    with eval_mode(model), ActivationTracer(model, activations) as tracer:
        yield tracer


def discover_neurons(
    model: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    additional_forward_args: Any = None,
    activations: Sequence[str] = DEFAULT_ACTIVATIONS,
) -> tuple[NeuronSite, ...]:
    """List the activation sites (layers of neurons) of ``model`` on ``inputs``.

    Runs one forward pass without gradients, in eval mode; the model is restored.

    Parameters
    ----------
    model : nn.Module
        Any PyTorch model.
    inputs : Tensor or tuple of Tensor
        Example inputs (one example suffices).
    additional_forward_args : Any
        Extra positional arguments of ``model.forward`` (Captum's convention).
    activations : sequence of str
        Activation kinds that are neurons.

    Returns
    -------
    tuple of NeuronSite
        In forward order.

    Examples
    --------
    >>> sites = discover_neurons(model, x[:1])      # doctest: +SKIP
    >>> [s.name for s in sites][:3]                 # doctest: +SKIP
    ['features.2', 'features.5', 'features.9']
    """
    formatted = format_inputs(inputs, strict=False)
    args = format_additional_args(additional_forward_args)
    with traced(model, activations) as tracer, torch.no_grad():
        tracer.run(formatted, args)
    return tracer.sites
