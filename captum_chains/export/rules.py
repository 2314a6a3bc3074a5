"""Per-operation rules of the channel surgery, and their registry.

The export treats the traced model as a graph of operations (``torch.fx`` nodes). A
*rule* says, for one kind of operation, how its channels behave:

* :meth:`Rule.info` - which dimension of the output holds channels (or ``None`` when
  the output has no channel structure the export can follow);
* :meth:`Rule.nonzero` - which output channels can be non-zero, given which input
  channels can be (forward analysis);
* :meth:`Rule.needed` - which input channels the needed output channels read
  (backward analysis);
* :meth:`Rule.build` - how to emit the operation in the exported graph for the chosen
  channel layouts (slicing weights, inserting gathers/scatters).

Rules are looked up by module type (``isinstance``, the most recently registered
first), by function object or by method name. Operations without a rule are handled
by :class:`OpaqueRule`: they are copied unchanged and fed their full-width inputs, so
the export stays exact and only loses size. To teach the export a new layer type (the
ViT helper does this in ``captum_chains/export/vit.py``), subclass :class:`Rule` and
call :func:`register_module_rule` or :func:`register_function_rule`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

if TYPE_CHECKING:  # pragma: no cover
    from captum_chains.export.analysis import Analysis
    from captum_chains.export.build import Builder

#: A channel layout: original channel indices held by a physical tensor, in order;
#: ``-1`` marks a placeholder channel whose values no consumer reads. ``None`` means the
#: tensor is kept whole (no channel structure, or a full-width opaque value).
Layout = torch.Tensor | None
#: Channels of a tensor that are needed (or can be non-zero): a bool mask ``[C]``, or one
#: bool for the whole tensor (``True``: all of it; ``False``: none of it).
Mask = torch.Tensor | bool
#: What :meth:`Rule.needed` returns: input node -> the channels of it that are read.
Needs = dict[fx.Node, Mask]


class Decline(Exception):
    """Raised by :meth:`Rule.info` when a rule cannot follow the channels of one node.

    The node is then handled by :class:`OpaqueRule` (copied, full-width inputs).
    """


@dataclass(frozen=True)
class ChannelInfo:
    """Where the channels of a tensor are.

    Attributes
    ----------
    dim : int
        Non-negative dimension that holds the channels.
    size : int
        Number of channels ``C``.
    width : int
        Consecutive entries of ``dim`` per channel: 1 for feature maps, ``H*W`` after
        flattening an ``[N, C, H, W]`` map into ``[N, C*H*W]``.
    """

    dim: int
    size: int
    width: int = 1


class Rule:
    """Channel semantics of one kind of operation: the interface every rule implements.

    Subclass and override what differs. The defaults describe an opaque operation: no
    channel structure in the output, all input channels needed, the node copied
    unchanged with full-width inputs. Every method receives the :class:`Analysis` of the
    traced graph (channel facts of every node) and the node it is asked about;
    :meth:`build` also receives the :class:`Builder` of the exported graph.
    """

    #: For module rules: record the module as one node (``True``) or record through it.
    leaf: bool = False
    #: Short name shown in the export report.
    name: str = "opaque"

    def info(self, analysis: Analysis, node: fx.Node) -> ChannelInfo | None:
        """Channel structure of the node's output; raise :class:`Decline` if unknown."""
        return None

    def nonzero(self, analysis: Analysis, node: fx.Node) -> torch.Tensor:
        """Bool ``[C]``: output channels that can be non-zero (only for ``info`` nodes)."""
        return torch.ones(analysis.channels(node).size, dtype=torch.bool)

    def needed(self, analysis: Analysis, node: fx.Node, out_needed: Mask) -> Needs:
        """Input channels read by the needed output channels ``out_needed``.

        Returns a mapping input node -> bool ``[C_in]`` (or ``True`` for "all"). The
        default asks for every input whole when any output is needed.
        """
        if not _any(out_needed):
            return {}
        return {inp: True for inp in node.all_input_nodes}

    def reads(self, analysis: Analysis, node: fx.Node, inp: fx.Node) -> bool:
        """Whether the built node uses ``inp`` at all (used to skip all-zero operands)."""
        return True

    def build(self, analysis: Analysis, builder: Builder, node: fx.Node) -> Layout:
        """Emit the node into ``builder`` and return the layout of its output."""
        return builder.copy_node(node)

    def fold_scale(self, builder: Builder, node: fx.Node, scale: torch.Tensor) -> bool:
        """Fold per-output-channel ``scale`` into the weights of ``node``, just emitted by
        this rule into ``builder`` (one factor per entry of its layout); True if done."""
        return False


class OpaqueRule(Rule):
    """Any operation the export does not understand: copied whole, inputs full width."""


OPAQUE = OpaqueRule()

_MODULE_RULES: list[tuple[tuple[type, ...], Rule, Callable[[nn.Module], bool] | None]] = []
_FUNCTION_RULES: dict[Any, Rule] = {}
_METHOD_RULES: dict[str, Rule] = {}


def register_module_rule(
    types: type | Iterable[type],
    rule: Rule,
    *,
    when: Callable[[nn.Module], bool] | None = None,
) -> None:
    """Use ``rule`` for modules of ``types`` (checked before earlier registrations).

    Parameters
    ----------
    types : type or iterable of types
        Module classes (subclasses match too).
    rule : Rule
        The rule; ``rule.leaf`` decides whether such modules are traced as one node.
    when : callable, optional
        Extra predicate on the module instance.
    """
    types = (types,) if isinstance(types, type) else tuple(types)
    _MODULE_RULES.insert(0, (types, rule, when))


def register_function_rule(targets: Iterable[Any], rule: Rule) -> None:
    """Use ``rule`` for ``call_function`` nodes whose target is one of ``targets``."""
    for t in targets:
        _FUNCTION_RULES[t] = rule


def register_method_rule(names: Iterable[str], rule: Rule) -> None:
    """Use ``rule`` for ``call_method`` nodes calling one of the tensor methods ``names``."""
    for n in names:
        _METHOD_RULES[n] = rule


def module_rule(module: nn.Module) -> Rule | None:
    """The registered rule for ``module``, or ``None``."""
    for types, rule, when in _MODULE_RULES:
        if isinstance(module, types) and (when is None or when(module)):
            return rule
    return None


def function_rule(target: Any) -> Rule | None:
    """The registered rule for a ``call_function`` target, or ``None``."""
    try:
        return _FUNCTION_RULES.get(target)
    except TypeError:  # unhashable target
        return None


def method_rule(name: str) -> Rule | None:
    """The registered rule for a ``call_method`` name, or ``None``."""
    return _METHOD_RULES.get(name)


def is_leaf_type(module: nn.Module) -> bool:
    """Whether a registered rule asks to record ``module`` as a single node."""
    rule = module_rule(module)
    return rule is not None and rule.leaf


def expand_mask(mask: Mask, size: int) -> torch.Tensor:
    """``mask`` as a bool ``[size]`` tensor (a single bool stands for every channel)."""
    if isinstance(mask, torch.Tensor):
        return mask
    return torch.full((size,), bool(mask))


def _any(mask: Mask) -> bool:
    return bool(mask) if isinstance(mask, bool) else bool(mask.any())
