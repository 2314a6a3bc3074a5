"""Channel analysis of a traced SubNetwork graph: which channels exist, matter, and are kept.

Three passes over the graph, each delegated per node to its
:class:`~captum_chains.export.rules.Rule`:

1. **non-zero** (forward): ``nz[n][c]`` is False only where channel ``c`` of node ``n``
   is exactly zero for every input (a removed filter after its score site, a channel
   every writer of a residual stream removed, ...);
2. **needed** (backward): ``nd[n][c]`` is True where some operation that the output
   depends on reads channel ``c`` of ``n``;
3. **layout**: the channels a node physically computes are ``nz & nd``; a node that
   must exist (something reads it) but keeps no channel carries one placeholder
   channel (``-1``) whose values nobody reads, so that shapes stay defined even for
   layers with zero kept filters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from captum_chains.export.rules import (
    OPAQUE,
    ChannelInfo,
    Decline,
    Mask,
    Rule,
    function_rule,
    method_rule,
    module_rule,
)


class Analysis:
    """Per-node channel facts of a traced graph module.

    Parameters
    ----------
    gm : fx.GraphModule
        The traced SubNetwork (see :mod:`captum_chains.export.tracing`).
    example_inputs : tuple of Tensor
        Inputs used to record the shape of every intermediate tensor.
    special : dict
        ``op`` kind (``"placeholder"``, ``"get_attr"``, ``"output"``) -> rule.
    """

    def __init__(
        self, gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], special: dict[str, Rule]
    ) -> None:
        self.gm = gm
        #: Device of the example inputs (where probe tensors are created).
        self.device = example_inputs[0].device if example_inputs else torch.device("cpu")
        self.modules: dict[str, nn.Module] = dict(gm.named_modules())
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
        self.nodes: list[fx.Node] = list(gm.graph.nodes)
        self.rule: dict[fx.Node, Rule] = {}
        self.info: dict[fx.Node, ChannelInfo | None] = {}
        self.nz: dict[fx.Node, torch.Tensor] = {}
        self.nd: dict[fx.Node, Mask] = {}
        self.layout: dict[fx.Node, torch.Tensor] = {}
        self.real_empty: dict[fx.Node, bool] = {}
        self.exists: dict[fx.Node, bool] = {}
        self._special = special
        self._forward()
        self._backward()
        self._layouts()

    # ------------------------------------------------------------------ lookups
    def shape(self, node: Any) -> tuple[int, ...] | None:
        """Shape of the tensor a node produced in the example pass (None if not a tensor)."""
        if not isinstance(node, fx.Node):
            return None
        meta = node.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        return tuple(shape) if shape is not None else None

    def module(self, node: fx.Node) -> Any:
        """The working-copy module a ``call_module`` node calls."""
        return self.modules[str(node.target)]

    def attr(self, target: str) -> Any:
        """The working-copy tensor a ``get_attr`` node reads."""
        obj: Any = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def channels(self, node: fx.Node) -> ChannelInfo:
        """Channel structure of a node known to have channels (see :meth:`has_channels`)."""
        info = self.info[node]
        if info is None:
            raise RuntimeError(f"export internal error: {node} has no channel structure")
        return info

    def nonzero_of(self, node: Any) -> torch.Tensor | None:
        """Bool ``[C]`` non-zero channels of a node with channels, else None (unknown)."""
        if isinstance(node, fx.Node) and self.info.get(node) is not None:
            return self.nz[node]
        return None

    def has_channels(self, node: Any) -> bool:
        """Whether ``node`` is a graph node whose output has channel structure."""
        return isinstance(node, fx.Node) and self.info.get(node) is not None

    # ------------------------------------------------------------------ passes
    def _select(self, node: fx.Node) -> Rule:
        if node.op in self._special:
            return self._special[node.op]
        if node.op == "call_module":
            return module_rule(self.module(node)) or OPAQUE
        if node.op == "call_function":
            return function_rule(node.target) or OPAQUE
        if node.op == "call_method":
            return method_rule(str(node.target)) or OPAQUE
        return OPAQUE

    def _forward(self) -> None:
        for node in self.nodes:
            rule = self._select(node)
            try:
                info = rule.info(self, node)
            except Decline:
                rule, info = OPAQUE, None
            if info is not None and self.shape(node) is None:
                rule, info = OPAQUE, None
            self.rule[node], self.info[node] = rule, info
            if info is not None:
                nz = rule.nonzero(self, node)
                if nz.shape != (info.size,):
                    raise RuntimeError(f"rule {rule.name} gave a bad non-zero mask for {node}")
                self.nz[node] = nz.bool()

    def _backward(self) -> None:
        for node in self.nodes:
            info = self.info[node]
            self.nd[node] = torch.zeros(info.size, dtype=torch.bool) if info else False
        for node in reversed(self.nodes):
            out_needed = True if node.op == "output" else self.nd[node]
            for inp, mask in self.rule[node].needed(self, node, out_needed).items():
                self._merge(inp, mask)

    def _merge(self, node: fx.Node, mask: Mask) -> None:
        current = self.nd[node]
        if isinstance(current, bool):
            self.nd[node] = current or bool(mask if isinstance(mask, bool) else mask.any())
        elif isinstance(mask, bool):
            if mask:
                self.nd[node] = torch.ones_like(current)
        else:
            self.nd[node] = current | mask.bool()

    def _layouts(self) -> None:
        for node in self.nodes:
            if self.info[node] is not None:
                keep = self.nz[node] & self.nd[node]
                self.layout[node] = torch.nonzero(keep).flatten()
                self.real_empty[node] = not bool(keep.any())
        for node in reversed(self.nodes):
            exists = node.op == "output" or any(
                self.exists.get(u, False) and self.rule[u].reads(self, u, node) for u in node.users
            )
            self.exists[node] = exists
            if exists and self.info[node] is not None and self.real_empty[node]:
                self.layout[node] = torch.tensor([-1])

    # ------------------------------------------------------------------ summaries
    def opaque_nodes(self) -> list[str]:
        """Built nodes handled by the opaque rule that read channel tensors (kept full width)."""
        out = []
        for node in self.nodes:
            if not self.exists.get(node) or self.rule[node] is not OPAQUE:
                continue
            if any(self.has_channels(i) for i in node.all_input_nodes):
                out.append(describe(self, node))
        return out


def describe(analysis: Analysis, node: fx.Node) -> str:
    """Readable name of a node: module name and type, or function name."""
    if node.op == "call_module":
        return f"{node.target} ({type(analysis.module(node)).__name__})"
    if node.op == "call_method":
        return f"{node.name} (Tensor.{node.target})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({target})"
