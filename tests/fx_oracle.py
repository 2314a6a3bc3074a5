"""torch.fx symbolic tracing with the export's leaf policy: an independent reader of a model.

The package reads models with one instrumented pass (``units/trace.py``); the tests compare
its recorded graphs with what ``torch.fx`` gives for models fx can trace.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from torch import fx, nn

from captum_chains.export.tracing import ExportError, is_leaf, library_leaves


class OracleTracer(fx.Tracer):
    """fx tracer that notes where each module call starts and ends."""

    def __init__(self) -> None:
        autowrap: tuple[Callable[..., Any], ...] = ()
        if "timm" in sys.modules:  # timm's functions with Python control flow on sizes
            try:
                from timm.layers import _fx as timm_fx

                autowrap = tuple(timm_fx._autowrap_functions)
            except ImportError:  # an older timm (1.0.3) keeps them elsewhere
                autowrap = ()
        super().__init__(autowrap_functions=autowrap)
        self.library_leaves = library_leaves()
        self.calls: dict[str, list[tuple[fx.Node | None, fx.Node | None]]] = {}
        self.leaves: dict[str, nn.Module] = {}
        self.stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf(m, self.library_leaves)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict
    ) -> Any:
        name = self.path_of_module(m)
        self.stack.append(name)
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        first = args[0] if args else None
        in_node = first.node if isinstance(first, fx.Proxy) else None
        out_node = out.node if isinstance(out, fx.Proxy) else None
        self.calls.setdefault(name, []).append((in_node, out_node))
        if self.is_leaf_module(m, name):
            self.leaves[name] = m
        return out


def trace(model: nn.Module) -> tuple[fx.GraphModule, OracleTracer]:
    """Symbolically trace ``model`` (a working copy); failures are an ``ExportError``."""
    tracer = OracleTracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:
        where = tracer.stack[-1] if tracer.stack else type(model).__name__
        raise ExportError(f"torch.fx cannot trace module {where!r}: {err}") from err
    return fx.GraphModule(model, graph), tracer
