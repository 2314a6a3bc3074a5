"""Record one real forward pass of a model as a ``torch.fx`` graph, without symbolic tracing.

:func:`record` runs the model once on real inputs through the package's one model reader
(:func:`captum_chains.units.trace.trace_forward`) and writes what ran into an
``fx.Graph``: leaf modules (:func:`captum_chains.export.tracing.is_leaf`) become
``call_module`` nodes, tensor functions and methods between them ``call_function`` /
``call_method`` nodes with the targets symbolic tracing would give (``operator.add`` for
``x + y``, ``"view"`` for ``x.view(...)``). Sizes read from tensors stay symbolic
(:class:`TrackedInt`), so the graph runs at other batch and image sizes; Python control
flow is resolved by the run (``generic=True`` refuses control flow on tensor values). The
chain graph and the export both read models this way.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from captum_chains.export.tracing import ExportError, is_leaf, library_leaves
from captum_chains.units.trace import trace_forward

#: Tensor dunder methods and the ``operator`` functions symbolic tracing records for
#: them; ``True`` marks reflected forms (``2 * x`` calls ``x.__rmul__(2)``).
_DUNDERS: dict[str, tuple[Callable[..., Any], bool]] = {
    "__add__": (operator.add, False),
    "__iadd__": (operator.add, False),
    "__radd__": (operator.add, True),
    "__sub__": (operator.sub, False),
    "__isub__": (operator.sub, False),
    "__rsub__": (operator.sub, True),
    "__mul__": (operator.mul, False),
    "__imul__": (operator.mul, False),
    "__rmul__": (operator.mul, True),
    "__truediv__": (operator.truediv, False),
    "__itruediv__": (operator.truediv, False),
    "__rtruediv__": (operator.truediv, True),
    "__matmul__": (operator.matmul, False),
    "__rmatmul__": (operator.matmul, True),
    "__pow__": (operator.pow, False),
    "__rpow__": (operator.pow, True),
    "__neg__": (operator.neg, False),
    "__getitem__": (operator.getitem, False),
}


class TrackedInt(int):
    """A size read from a recorded tensor, with the graph node that computes it.

    The recording hands these to the model in place of the ints of ``x.shape`` /
    ``x.size()``; integer arithmetic on them (``B * N``, ``H // 16``) gives tracked ints
    with nodes of their own. A recorded call that receives one gets its node, so sizes
    derived from the input (the batch size of ``cls_token.expand(x.shape[0], -1, -1)``,
    a grid side) stay symbolic in the recorded program instead of being frozen. Anything
    else done with them (``int(B)``, ``if B > 1``, float arithmetic), and ``len(x)`` (Python
    makes it a plain int), uses the recorded value; the export checks its program at another
    batch size to catch a frozen batch size.
    """

    view: _GraphView
    _node: fx.Node | None
    _item_of: tuple[fx.Node, int] | None

    def __new__(
        cls,
        value: int,
        node: fx.Node | None,
        view: _GraphView,
        item_of: tuple[fx.Node, int] | None = None,
    ) -> TrackedInt:
        tracked = super().__new__(cls, value)
        tracked._node, tracked.view, tracked._item_of = node, view, item_of
        return tracked

    @property
    def node(self) -> fx.Node:
        """The node computing this int (an item of a size is written when first used)."""
        if self._node is None:
            assert self._item_of is not None
            self._node = self.view._create("call_function", operator.getitem, self._item_of, {})
        return self._node

    def __reduce__(self) -> Any:  # copies and pickles are plain ints
        return (int, (int(self),))

    def __neg__(self) -> TrackedInt:  # type: ignore[override]  # int's stubs return int
        node = self.view._create("call_function", operator.neg, (self.node,), {})
        return TrackedInt(-int(self), node, self.view)

    def size_node(self) -> fx.Node | None:
        """The size node this int is an item of, else None."""
        return None if self._item_of is None else self._item_of[0]


def _tracked_operator(op: Callable[[int, int], int], reflected: bool = False) -> Any:
    """``TrackedInt.__op__``: an int result with a node when the other operand is an int."""

    def method(self: TrackedInt, other: Any) -> Any:
        if not isinstance(other, int) or isinstance(other, bool):
            plain = getattr(int, f"__{'r' if reflected else ''}{op.__name__}__")
            return plain(int(self), other)
        a, b = (other, self) if reflected else (self, other)
        value = op(int(a), int(b))
        args = (self.view.node_of(a), self.view.node_of(b))
        return TrackedInt(value, self.view._create("call_function", op, args, {}), self.view)

    return method


for _op in (operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod):
    setattr(TrackedInt, f"__{_op.__name__}__", _tracked_operator(_op))
    setattr(TrackedInt, f"__r{_op.__name__}__", _tracked_operator(_op, reflected=True))


class Recording:
    """Where each module's calls start and end in the recorded graph.

    Attributes
    ----------
    calls : dict
        Module name -> list of ``(first input node, output node)`` per call (``None``
        where that value is not one tensor), in call order.
    leaves : dict
        Name -> module of the modules recorded as single ``call_module`` nodes.
    """

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[fx.Node | None, fx.Node | None]]] = {}
        self.leaves: dict[str, nn.Module] = {}


class _GraphView:
    """The ``fx.Graph`` view of a traced pass: every tensor operation outside leaf modules."""

    def __init__(
        self, root: nn.Module, graph: fx.Graph, recording: Recording, generic: bool = False
    ) -> None:
        self.root = root
        self.generic = generic
        self.graph = graph
        self.recording = recording
        leaves = library_leaves()
        self.leaf = {n: is_leaf(m, leaves) for n, m in root.named_modules() if n}
        self.env: dict[int, fx.Node] = {}
        self.alive: list[Any] = []  # recorded tensors stay alive: ids are never reused
        self.named = {id(t): n for n, t in root.named_parameters(remove_duplicate=False)}
        self.named.update({id(t): n for n, t in root.named_buffers(remove_duplicate=False)})
        self.constants = 0
        self.leaf_depth = 0
        self.stack: list[tuple[str, type]] = []

    # ------------------------------------------------------------------ values
    def node_of(self, value: Any) -> Any:
        """``value`` with every tensor and tracked size replaced by the node that computed it."""
        if isinstance(value, TrackedInt):
            return value.node
        whole = _whole_size(value)
        if whole is not None:
            return whole
        if isinstance(value, torch.Tensor):
            node = self.env.get(id(value))
            if node is None:
                node = self._attribute(value)
            return node
        if isinstance(value, slice):
            return slice(*(self.node_of(v) for v in (value.start, value.stop, value.step)))
        if isinstance(value, (tuple, list)):
            mapped = [self.node_of(v) for v in value]
            return type(value)(mapped) if isinstance(value, list) else tuple(mapped)
        if isinstance(value, dict):
            return {k: self.node_of(v) for k, v in value.items()}
        return value

    def _attribute(self, tensor: torch.Tensor) -> fx.Node:
        """A ``get_attr`` node for a parameter, buffer or constant tensor of the run."""
        name = self.named.get(id(tensor))
        if name is None:
            name = f"_recorded_constant_{self.constants}"
            self.constants += 1
            self.root.register_buffer(name, tensor.detach(), persistent=False)
            self.named[id(tensor)] = name
        node = self._create("get_attr", name, (), {})
        self.bind(tensor, node)
        return node

    def bind(self, value: Any, node: fx.Node) -> None:
        """Remember ``node`` as the producer of ``value`` (and of the tensors it holds)."""
        if isinstance(value, torch.Tensor):
            self.env[id(value)] = node
            self.alive.append(value)
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                if _has_tensor(v):
                    self.bind(v, self._create("call_function", operator.getitem, (node, i), {}))

    def _create(self, op: str, target: Any, args: tuple[Any, ...], kwargs: dict) -> fx.Node:
        node = self.graph.create_node(op, target, args, kwargs)
        node.meta["nn_module_stack"] = {name: (name, kind) for name, kind in self.stack}
        return node

    # ------------------------------------------------------------------ the view
    def function(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> Any:
        """Write ``result = func(*args, **kwargs)`` as a node, unless inside a leaf; return
        ``result`` (sizes of a tensor as :class:`TrackedInt`)."""
        if self.leaf_depth:
            return result
        if self.generic and getattr(func, "__name__", "") in _VALUE_READS:
            self._refuse_value_read(func, args)
        traced = _has_tensor(args, kwargs)
        mapped = (self.node_of(args), self.node_of(kwargs)) if traced else None
        if getattr(func, "__name__", "") == "__setitem__" and mapped:
            # ``x[i] = v`` changes x in place: later readers of x read a set_item node
            self.bind(args[0], self._create("call_function", set_item, mapped[0], {}))
            return result
        if mapped and _is_size(func, result):
            op, target, node_args = _target(func, mapped[0])
            node = self._create(op, target, tuple(node_args), dict(mapped[1]))
            return self._track(result, node)
        if not _has_tensor(result):
            return result
        op, target, node_args = _target(func, mapped[0] if mapped else args)
        node_kwargs = mapped[1] if mapped else kwargs
        self.bind(result, self._create(op, target, tuple(node_args), dict(node_kwargs)))
        return result

    def _refuse_value_read(self, func: Any, args: tuple[Any, ...]) -> None:
        """Raise if the model reads a computed tensor's value in Python (``if x.sum() > 0``):
        a program that holds for any input cannot be recorded from one pass."""
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        node = None if tensor is None else self.env.get(id(tensor))
        if node is None or node.op == "get_attr":
            return  # a parameter, buffer or constant: the same for every input
        name, kind = self.stack[-1] if self.stack else ("", type(self.root))
        raise ExportError(
            f"module {name or '<model>'!r} ({kind.__name__}) reads a tensor's value in "
            f"Python ({getattr(func, '__qualname__', func)}), so its forward depends on the "
            "data and no program recorded from one pass holds for other inputs. Register an "
            "export rule with leaf=True for this module type "
            "(captum_chains.export.register_module_rule) or make its forward free of "
            "data-dependent Python control flow"
        )

    def _track(self, size: Any, node: fx.Node) -> Any:
        """``size`` (an int or a ``torch.Size``) as tracked ints computed by ``node``."""
        if isinstance(size, int):
            return TrackedInt(size, node, self)
        return torch.Size(TrackedInt(v, None, self, (node, i)) for i, v in enumerate(size))

    def module_pre(
        self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, Any, bool]:
        """Note where the call of ``name`` starts; a leaf's arguments become its node's."""
        inside = self.leaf_depth > 0
        leaf = self.leaf[name]
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        in_node = None if inside or first is None else self.node_of(first)
        mapped = None if inside or not leaf else (self.node_of(args), self.node_of(kwargs))
        if inside or leaf:
            self.leaf_depth += 1
        if not inside:
            self.stack.append((name, type(module)))
        return in_node, mapped, inside

    def module_post(
        self, token: tuple[Any, Any, bool], name: str, module: nn.Module, output: Any
    ) -> None:
        """Record the call of ``name``: a ``call_module`` node for a leaf."""
        in_node, mapped, inside = token
        leaf = self.leaf[name]
        if inside or leaf:
            self.leaf_depth -= 1
        if inside:
            return
        self.stack.pop()
        if leaf:
            node = self._create("call_module", name, *mapped)
            self.bind(output, node)
            self.recording.leaves[name] = module
            out_node: fx.Node | None = node
        elif isinstance(output, torch.Tensor):
            out_node = self.env.get(id(output))
        else:
            out_node = None
        self.recording.calls.setdefault(name, []).append((in_node, out_node))


def set_item(tensor: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
    """``tensor`` with ``tensor[index] = value`` applied, as a new tensor (the recorded
    form of an item assignment)."""
    out = tensor.clone()
    out[index] = value
    return out


def _whole_size(value: Any) -> fx.Node | None:
    """The size node when ``value`` is a tensor's whole, unchanged size, else ``None``."""
    if not isinstance(value, torch.Size) or not value:
        return None
    first = value[0]
    source = first.size_node() if isinstance(first, TrackedInt) else None
    if source is None:
        return None
    for i, v in enumerate(value):
        if not isinstance(v, TrackedInt) or v._item_of != (source, i):
            return None
    return source


#: Tensor methods that turn a tensor's value into a Python value (control flow on data).
_VALUE_READS = frozenset({"__bool__", "item", "__int__", "__float__", "__index__", "tolist"})


def _is_size(func: Any, result: Any) -> bool:
    """Whether ``func`` read a tensor's size (``x.size()``, ``x.size(d)``, ``x.shape``)."""
    if not isinstance(result, (int, torch.Size)) or isinstance(result, bool):
        return False
    if func is torch.Tensor.size:
        return True
    owner = getattr(func, "__self__", None)
    return getattr(func, "__name__", "") == "__get__" and getattr(owner, "__name__", "") == "shape"


def _has_tensor(*values: Any) -> bool:
    """Whether the values hold a tensor or a tracked size (anything the graph computes)."""
    for v in values:
        if isinstance(v, (torch.Tensor, TrackedInt)):
            return True
        if isinstance(v, (tuple, list)) and _has_tensor(*v):
            return True
        if isinstance(v, slice) and _has_tensor(v.start, v.stop, v.step):
            return True
        if isinstance(v, dict) and _has_tensor(*v.values()):
            return True
    return False


def _target(func: Any, args: Any) -> tuple[str, Any, list[Any]]:
    """The ``(op, target, args)`` symbolic tracing would record for ``func(*args)``."""
    args = list(args)
    name = getattr(func, "__name__", "")
    if name in _DUNDERS:
        fn, reflected = _DUNDERS[name]
        return "call_function", fn, args[::-1] if reflected else args
    if name == "__get__":  # a tensor property such as ``x.T``
        attr = getattr(getattr(func, "__self__", None), "__name__", "")
        return "call_function", builtins.getattr, [*args, attr]
    if name and not name.startswith("__") and getattr(torch.Tensor, name, None) is func:
        return "call_method", name, args
    if name.endswith("_") and not name.startswith("_"):  # torch.relu_ -> torch.relu
        for space in (torch, torch.nn.functional):
            if getattr(space, name, None) is func and hasattr(space, name[:-1]):
                return "call_function", getattr(space, name[:-1]), args
    return "call_function", func, args


def record(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], generic: bool = False
) -> tuple[fx.GraphModule, Recording]:
    """Run ``model(*inputs)`` once under no_grad and return the recorded graph module.

    Parameters
    ----------
    model : nn.Module
        A private working copy (see :func:`~captum_chains.export.tracing.working_copy`):
        constants of the run are registered on it as buffers.
    inputs : tuple of Tensor
        The inputs. Sizes read from tensors stay symbolic (:class:`TrackedInt`); Python
        control flow is resolved by the run.
    generic : bool, optional
        The graph must hold for any input (the export's program): a model that reads a
        computed tensor's value in Python (``if x.sum() > 0``, ``x.item()``) raises
        :class:`~captum_chains.export.tracing.ExportError` naming the module. Otherwise
        (the chain graph) the graph is specialised to the branches the inputs took.

    Returns
    -------
    tuple
        The ``fx.GraphModule`` and the :class:`Recording` of its module calls.
    """
    graph = fx.Graph()
    recording = Recording()
    view = _GraphView(model, graph, recording, generic)
    for i, x in enumerate(inputs):
        view.bind(x, graph.placeholder(f"input_{i}"))
    try:
        output = trace_forward(model, inputs, view=view).output
    except ExportError:
        raise
    except Exception as err:
        where = view.stack[-1][0] if view.stack else type(model).__name__
        raise ExportError(
            f"recording the forward pass failed in {where!r} ({type(err).__name__}: {err})"
        ) from err
    graph.output(view.node_of(output))
    return fx.GraphModule(model, graph), recording


__all__ = ["Recording", "record"]
