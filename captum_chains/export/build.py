"""Emit the exported graph: sliced copies of the layers, plus channel adapters where needed."""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import fx, nn

from captum_chains.export.analysis import Analysis, describe
from captum_chains.export.rules import Layout
from captum_chains.export.runtime import ChannelAdapter


class Builder:
    """Builds the new graph node by node, in the order of the traced graph.

    Attributes
    ----------
    graph : fx.Graph
        The graph being built.
    root : dict
        Qualified name -> module or tensor referenced by the new graph.
    env : dict
        Traced node -> (new node, layout of the new node's output).
    fold_scores : bool
        Fold scores into the layer before their site where possible (the export); ``False``
        keeps every score site as a :class:`~captum_chains.export.runtime.ChannelScale`
        module and records it in ``score_sites`` (compact optimization steps set the
        scales themselves).
    score_sites : dict
        Traced score node -> (name of its ``ChannelScale`` module, layout of its channels),
        filled when ``fold_scores`` is false.
    """

    def __init__(self, analysis: Analysis, fold_scores: bool = True) -> None:
        self.analysis = analysis
        self.fold_scores = fold_scores
        self.score_sites: dict[fx.Node, tuple[str, torch.Tensor]] = {}
        self.graph = fx.Graph()
        self.root: dict[str, Any] = {}
        self.env: dict[fx.Node, tuple[fx.Node, Layout]] = {}
        self._adapters: dict[tuple, fx.Node] = {}
        self._attrs: dict[tuple, fx.Node] = {}
        self.adapter_count = 0
        self._names: dict[int, str] = {}
        self._taken: set[str] = set()
        self._full: set[str] = set()
        #: The traced node being built (set by the caller).
        self.current: fx.Node | None = None

    # ------------------------------------------------------------------ values
    def actual(self, old: fx.Node) -> tuple[fx.Node, Layout]:
        """The new node for ``old`` and the layout it actually has."""
        if old.op == "get_attr":
            return self.value(old, None), None
        return self.env[old]

    def value(
        self, old: Any, required: Layout = None, *, fill: float = 0.0, fresh: bool = False
    ) -> Any:
        """The new value of ``old`` with channels in ``required`` order (None: whole tensor).

        Channels of ``required`` that ``old`` does not compute are exactly zero in the
        SubNetwork (checked) and are filled with zeros; ``-1`` entries get ``fill``.
        Parameters read in ``forward`` are sliced copies (``fresh``: never shared).
        """
        if not isinstance(old, fx.Node):
            return old
        info = self.analysis.info.get(old)
        if info is not None and required is None:
            required = torch.arange(info.size)
        if old.op == "get_attr":
            return self._attr(old, required, fresh)
        new, actual = self.env[old]
        if info is None or required is None or actual is None:
            return new
        if actual.shape == required.shape and torch.equal(actual, required):
            return new
        key = (old, tuple(required.tolist()), fill)
        if key not in self._adapters:
            self._adapters[key] = self._adapter(old, new, actual, required, fill)
        return self._adapters[key]

    def _adapter(
        self, old: fx.Node, new: fx.Node, actual: torch.Tensor, required: torch.Tensor, fill: float
    ) -> fx.Node:
        info = self.analysis.info[old]
        assert info is not None
        pos = {int(c): i for i, c in enumerate(actual.tolist()) if c >= 0}
        missing = len(actual)
        index, pad = [], False
        nz = self.analysis.nz[old]
        for r in required.tolist():
            if r >= 0 and r in pos:
                index.append(pos[r])
                continue
            if r >= 0 and bool(nz[r]) and not self._placeholder_only():
                raise RuntimeError(
                    f"export internal error: {describe(self.analysis, old)} lacks non-zero "
                    f"channel {r}"
                )
            index.append(missing)
            pad = True
        w = info.width
        elem = torch.tensor(index).repeat_interleave(w) * w + torch.arange(w).repeat(len(index))
        module = ChannelAdapter(info.dim, elem, pad=w if pad else 0, fill=fill)
        self.adapter_count += 1
        name = self.add_module(f"adapters.{_safe(old.name)}", module)
        return self.graph.call_module(name, (new,))

    def _placeholder_only(self) -> bool:
        """Whether no output channel of the node being built is read (its values are unused)."""
        if self.current is None:
            return False
        needed = self.analysis.nd.get(self.current, True)
        return not (needed if isinstance(needed, bool) else bool(needed.any()))

    def _attr(self, old: fx.Node, required: Layout, fresh: bool = False) -> fx.Node:
        value = self.analysis.attr(str(old.target))
        key = (str(old.target), None if required is None else tuple(required.tolist()))
        if key in self._attrs and not fresh:
            return self._attrs[key]
        if fresh and required is None and isinstance(value, torch.Tensor):
            value = value.detach().clone()
        if required is not None and isinstance(value, torch.Tensor):
            sliced = take(value.detach(), required, 0)
            value = nn.Parameter(sliced) if isinstance(value, nn.Parameter) else sliced
        name = self.unique(str(old.target))
        self.root[name] = value
        node = self.graph.get_attr(name)
        if not fresh:
            self._attrs[key] = node
        return node

    def module_of(self, node: fx.Node) -> nn.Module | None:
        """The module an emitted ``call_module`` node calls (None for other nodes)."""
        return self.root.get(str(node.target)) if node.op == "call_module" else None

    def tensor_of(self, node: Any) -> torch.Tensor | None:
        """The tensor an emitted ``get_attr`` node reads (None for other values)."""
        if isinstance(node, fx.Node) and node.op == "get_attr":
            value = self.root.get(str(node.target))
            return value if isinstance(value, torch.Tensor) else None
        return None

    # ------------------------------------------------------------------ emitting
    def unique(self, name: str) -> str:
        """A root name not clashing with existing names (nor being a prefix of one)."""
        base, k = name, 0

        def clash(n: str) -> bool:
            parts = n.split(".")
            prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
            return bool(prefixes & self._full) or n in self._taken

        while clash(name):
            k += 1
            name = f"{base}_{k}"
        parts = name.split(".")
        self._taken.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        self._full.add(name)
        return name

    def add_module(self, name: str, module: nn.Module) -> str:
        """Register ``module`` under a unique qualified name close to ``name``."""
        if id(module) in self._names:
            return self._names[id(module)]
        name = self.unique(name)
        self.root[name] = module
        self._names[id(module)] = name
        return name

    def set(self, old: fx.Node, new: fx.Node, layout: Layout) -> Layout:
        """Record the new node of ``old``."""
        self.env[old] = (new, layout)
        return layout

    def emit(
        self,
        old: fx.Node,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None = None,
        *,
        module: nn.Module | None = None,
        target: Any = None,
    ) -> fx.Node:
        """Create a node like ``old`` (same op and target unless given) with new arguments."""
        kwargs = dict(old.kwargs) if kwargs is None else kwargs
        target = old.target if target is None else target
        if old.op == "call_module":
            name = self.add_module(str(old.target), module or self.analysis.module(old))
            return self.graph.call_module(name, args, kwargs)
        if old.op == "call_function":
            return self.graph.call_function(target, args, kwargs)
        if old.op == "call_method":
            return self.graph.call_method(str(target), args, kwargs)
        raise RuntimeError(f"cannot emit a node of kind {old.op}")

    def copy_node(self, old: fx.Node) -> Layout:
        """Copy ``old`` unchanged, its channel inputs at full width."""
        args = fx.node.map_arg(old.args, lambda n: self.value(n, None))
        kwargs = fx.node.map_arg(old.kwargs, lambda n: self.value(n, None))
        new = self.emit(old, args, kwargs)
        info = self.analysis.info.get(old)
        return self.set(old, new, None if info is None else torch.arange(info.size))


def take(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` indexed along ``dim`` by ``index``; ``-1`` entries give zero slices."""
    index = index.to(t.device)
    out = t.index_select(dim, index.clamp(min=0))
    if bool((index < 0).any()):
        shape = [1] * out.ndim
        shape[dim] = -1
        out = torch.where((index >= 0).view(shape), out, torch.zeros((), dtype=t.dtype))
    return out.clone()


def shallow_clone(module: nn.Module) -> Any:
    """A new module object sharing attributes but with its own parameter/buffer dicts."""
    new: Any = copy.copy(module)
    for attr in ("_parameters", "_buffers", "_modules"):
        setattr(new, attr, dict(getattr(module, attr)))
    for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
        if hasattr(new, attr):
            setattr(new, attr, type(getattr(module, attr))())
    if hasattr(new, "inplace"):
        new.inplace = False
    return new


def _safe(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)
