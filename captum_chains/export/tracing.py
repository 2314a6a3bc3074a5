"""The export's private copy of a model, and the SubNetwork written into its recorded graph.

:func:`working_copy` makes the copy (with the family rules' canonical forms,
:data:`~captum_chains.units.adapters.CANONICALIZERS`); :func:`is_leaf` says which of its
modules the recording (:func:`captum_chains.export.recording.record`) keeps as single
operations. :func:`apply_subnetwork` then writes the SubNetwork into the recorded graph:

* every unit layer's scores become an explicit :func:`~captum_chains.export.runtime.channel_scale`
  node at its site (Eq. 3 of the NeuroChains paper);
* every closed gate replaces its layer or block by the identity (Eq. 7 with ``G = 0``:
  ``G * F(H) + (1 - G) * H = H``), and a closed ``scale`` gate multiplies by zero.

The resulting graph module computes exactly what the SubNetwork computes (checked
bit for bit by :func:`captum_chains.export.api.export_subnetwork`), which makes the
channel analysis a pure graph problem.
"""

from __future__ import annotations

import copy
import operator
from typing import Any, Protocol

import torch
from torch import fx, nn

from captum_chains.export.rules import is_leaf_type
from captum_chains.export.runtime import channel_scale
from captum_chains.units.adapters import CANONICALIZERS, LEAF_MODULES, SITE_RESOLVERS
from captum_chains.units.base import GateSpec, UnitLayer


class ExportError(ValueError):
    """The SubNetwork cannot be exported; the message names the layer and the reason."""


# --------------------------------------------------------------------------- copies
def export_site(unit: UnitLayer) -> tuple[str, str]:
    """Where the export applies ``unit``'s scores: the first site resolver's answer
    (:data:`~captum_chains.units.adapters.SITE_RESOLVERS`), or discovery's ``(site, hook)``."""
    for resolve in SITE_RESOLVERS:
        found = resolve(unit)
        if found is not None:
            return found
    return unit.site, unit.hook


def working_copy(model: nn.Module) -> nn.Module:
    """A private deep copy in eval mode, without hooks, with canonical layer forms."""
    work = copy.deepcopy(model)
    work.eval()
    m: Any
    for m in work.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
            getattr(m, attr, {}).clear()
        if getattr(m, "inplace", None) is True:
            m.inplace = False  # rewiring may give one tensor several readers
    for name, module in list(work.named_modules()):
        for canon in CANONICALIZERS:
            new = canon(module)
            if new is not None:
                _set_submodule(work, name, new.eval())
                break
    return work


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


# --------------------------------------------------------------------------- leaves
def library_leaves() -> tuple[type, ...]:
    """Module types the families keep as single operations (e.g. timm's own list).

    Read from :data:`~captum_chains.units.adapters.LEAF_MODULES`.
    """
    return tuple(kind for rule in LEAF_MODULES for kind in rule())


def is_leaf(module: nn.Module, leaves: tuple[type, ...] = ()) -> bool:
    """Whether the recording writes ``module`` as one ``call_module`` node.

    Layers with a registered leaf rule, the families' leaf types (``leaves``), and
    ``torch.nn`` layers other than containers (as ``torch.fx`` does).
    """
    if is_leaf_type(module) or (leaves and isinstance(module, leaves)):
        return True
    where = type(module).__module__
    torch_layer = where.startswith("torch.nn") or where.startswith("torch.ao.nn")
    return torch_layer and not isinstance(module, nn.Sequential)


# --------------------------------------------------------------------------- masks
class ModuleCalls(Protocol):
    """Where each module's calls start and end in a graph
    (:func:`captum_chains.export.recording.record`'s recording)."""

    calls: dict[str, list[tuple[fx.Node | None, fx.Node | None]]]
    leaves: dict[str, nn.Module]


class _Sites:
    """Finds the tensors at module boundaries of a traced graph while it is rewired."""

    def __init__(self, gm: fx.GraphModule, tracer: ModuleCalls) -> None:
        self.gm = gm
        self.tracer = tracer
        self.alias: dict[fx.Node, fx.Node] = {}

    def resolve(self, node: fx.Node) -> fx.Node:
        """The node that now stands for ``node`` (after its uses were redirected)."""
        while node in self.alias:
            node = self.alias[node]
        return node

    def redirect(self, old: fx.Node, new: fx.Node) -> None:
        """Make every reader of ``old`` (except ``new`` itself) read ``new``."""
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        self.alias[old] = new

    def call(self, name: str, what: str) -> tuple[fx.Node, fx.Node]:
        """Current (input, output) nodes of the single call of module ``name``."""
        calls = self.tracer.calls.get(name, [])
        if len(calls) == 1 and calls[0][0] is not None and calls[0][1] is not None:
            in_node: Any = calls[0][0]
            out_node: Any = calls[0][1]
            if out_node.op == "call_module" and out_node.target == name:
                in_node = out_node.args[0]
            return self.resolve(in_node), self.resolve(out_node)
        leaf = next((n for n in self.tracer.leaves if name.startswith(n + ".")), None)
        if leaf is not None:
            raise ExportError(
                f"{what} {name!r} lies inside {leaf!r} "
                f"({type(self.tracer.leaves[leaf]).__name__}), which the export treats as "
                "one operation; register an export rule for that type that is not a leaf "
                "or that handles the site"
            )
        if not calls:
            raise ExportError(
                f"{what} {name!r} is not called in the model's forward pass; was the "
                "SubNetwork built for another model?"
            )
        raise ExportError(
            f"{what} {name!r} is called {len(calls)} times per forward pass (or with a "
            "non-tensor input/output); the export supports sites called exactly once"
        )

    def replace_input(self, name: str, new: fx.Node, what: str) -> None:
        """Make the call of module ``name`` read ``new`` instead of its first input."""
        in_node, _ = self.call(name, what)
        node = self.tracer.calls[name][0][1]
        if node is not None and node.op == "call_module" and node.target == name:
            node.args = (new, *node.args[1:])
            return
        for user in list(in_node.users):
            stack = user.meta.get("nn_module_stack") or {}
            if user is not new and any(v[0] == name for v in stack.values()):
                user.replace_input_with(in_node, new)


_INPLACE_OPERATORS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


def _out_of_place(graph: fx.Graph) -> None:
    """Replace in-place operations by their out-of-place forms.

    Closing a gate makes one tensor feed both the identity path and the next layer; an
    in-place activation would then overwrite the identity (the SubNetwork's mixing
    creates a new tensor instead). The result is checked against the SubNetwork.
    """
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
            node.target = _INPLACE_OPERATORS[node.target]
        elif node.op == "call_method":
            name = str(node.target)
            if name.endswith("_") and not name.endswith("__") and hasattr(torch.Tensor, name[:-1]):
                node.target = name[:-1]
        if node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}


def _insert_scale(
    gm: fx.GraphModule, x: fx.Node, scores: torch.Tensor, dim: int, key: str
) -> fx.Node:
    gm.register_buffer(key, scores)
    with gm.graph.inserting_after(x):
        attr = gm.graph.get_attr(key)
    with gm.graph.inserting_after(attr):
        return gm.graph.call_function(channel_scale, (x, attr, dim))


def apply_subnetwork(
    gm: fx.GraphModule,
    tracer: ModuleCalls,
    units: tuple[UnitLayer, ...],
    scores: dict[str, torch.Tensor],
    closed: list[GateSpec],
    *,
    always: bool = False,
) -> dict[str, fx.Node]:
    """Write scores (as ``channel_scale`` nodes) and closed gates into the traced graph.

    Scores that are all 1 are skipped unless ``always`` is set. Returns the score node
    of each unit layer that got one (units inside closed gates get none).
    """
    sites = _Sites(gm, tracer)
    graph = gm.graph
    _out_of_place(graph)
    inside_closed = {u for g in closed for u in g.units}
    score_nodes: dict[str, fx.Node] = {}
    for i, unit in enumerate(units):
        s = scores[unit.name]
        if unit.name in inside_closed or (not always and bool((s == 1).all())):
            continue
        if unit.unit_width > 1:
            s = s.repeat_interleave(unit.unit_width)
        what = f"the score site of unit layer {unit.name!r}"
        key = f"_chain_scores_{i}"
        site, hook = export_site(unit)
        if hook not in ("output", "input"):
            raise ExportError(
                f"unit layer {unit.name!r} is scored at hook {hook!r} of {site!r}, which the "
                "export cannot place; register a resolver in "
                "captum_chains.units.adapters.SITE_RESOLVERS"
            )
        in_node, out = sites.call(site, what)
        if hook == "output":
            scaled = _insert_scale(gm, out, s, unit.channel_dim, key)
            sites.redirect(out, scaled)
        else:
            scaled = _insert_scale(gm, in_node, s, unit.channel_dim, key)
            sites.replace_input(site, scaled, what)
        score_nodes[unit.name] = scaled
    for j, gate in enumerate(closed):
        what = f"gate {gate.name!r}"
        if gate.mode == "scale":
            _, out = sites.call(gate.end, what)
            zero = torch.zeros((), dtype=torch.float32)
            sites.redirect(out, _insert_scale(gm, out, zero, 1, f"_chain_gate_{j}"))
            continue
        identity, _ = sites.call(gate.start, what)
        if gate.end_hook == "output":
            _, out = sites.call(gate.end, what)
            sites.redirect(out, identity)
        else:
            sites.replace_input(gate.end, identity, what)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    alive = set(graph.nodes)
    return {name: node for name, node in score_nodes.items() if node in alive}
