"""Rules for graph-level operations: inputs/outputs, parameters read in ``forward``,
element-wise and per-channel operations, additions/products, and layout changes.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from captum_chains.export.analysis import Analysis
from captum_chains.export.build import Builder
from captum_chains.export.rules import (
    ChannelInfo,
    Decline,
    Layout,
    Mask,
    Needs,
    Rule,
    expand_mask,
    register_function_rule,
    register_method_rule,
    register_module_rule,
)
from captum_chains.export.runtime import ChannelScale, channel_scale
from captum_chains.units.adapters import layer_kind


def _first(node: fx.Node) -> Any:
    return node.args[0] if node.args else None


def _norm_dim(dim: int, ndim: int) -> int:
    return dim % ndim if ndim else 0


# --------------------------------------------------------------------------- graph ends
class PlaceholderRule(Rule):
    """A model input: kept whole; image-like inputs ``[N, C, ...]`` have channels in dim 1
    (so that a removed stem can pass the image on to layers that read only some of it)."""

    name = "input"

    def info(self, analysis: Analysis, node: fx.Node) -> ChannelInfo | None:
        shape = analysis.shape(node)
        if shape is None or len(shape) < 3:
            return None
        return ChannelInfo(1, shape[1])

    def needed(self, analysis: Analysis, node: fx.Node, out_needed: Mask) -> Needs:
        return {}

    def build(self, analysis: Analysis, builder: Builder, node: fx.Node) -> Layout:
        default = node.args[0] if node.args else inspect.Signature.empty
        kind = None if isinstance(node.type, str) else node.type  # postponed annotations
        new = builder.graph.placeholder(str(node.target), type_expr=kind, default_value=default)
        new.meta = dict(node.meta)
        info = analysis.info[node]
        return builder.set(node, new, None if info is None else torch.arange(info.size))


class OutputRule(Rule):
    """The graph output: every channel of every output tensor, in the original order."""

    name = "output"

    def build(self, analysis: Analysis, builder: Builder, node: fx.Node) -> Layout:
        builder.graph.output(fx.node.map_arg(node.args[0], lambda n: builder.value(n, None)))
        return None


class GetAttrRule(Rule):
    """A parameter or buffer read inside ``forward`` (e.g. ConvNeXt's layer scale).

    One-dimensional tensors are channel vectors; each consumer gets a copy sliced to
    the channels it needs (no runtime gather).
    """

    name = "parameter"

    def info(self, analysis: Analysis, node: fx.Node) -> ChannelInfo | None:
        value = analysis.attr(str(node.target))
        if isinstance(value, torch.Tensor) and value.ndim == 1:
            return ChannelInfo(0, value.shape[0])
        return None

    def nonzero(self, analysis: Analysis, node: fx.Node) -> torch.Tensor:
        return (analysis.attr(str(node.target)).detach() != 0).cpu()

    def needed(self, analysis: Analysis, node: fx.Node, out_needed: Mask) -> Needs:
        return {}

    def build(self, analysis: Analysis, builder: Builder, node: fx.Node) -> Layout:
        return None  # materialised per consumer by Builder.value


# --------------------------------------------------------------------------- per channel
def _zeros_like_input(analysis: Analysis, node: fx.Node, x: fx.Node) -> torch.Tensor:
    shape = analysis.shape(x)
    assert shape is not None
    dtype = getattr(x.meta.get("tensor_meta"), "dtype", torch.float32)
    size = (1, *shape[1:]) if len(shape) > 1 else shape
    return torch.zeros(size, dtype=dtype, device=analysis.device)


def _concrete(
    analysis: Analysis, node: fx.Node, x: fx.Node, replacement: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    def conv(arg: Any) -> Any:
        if arg is x:
            return replacement
        if isinstance(arg, fx.Node):
            if arg.op == "get_attr":
                return analysis.attr(str(arg.target))
            raise Decline
        return arg

    args = fx.node.map_aggregate(node.args, conv)
    kwargs = fx.node.map_aggregate(node.kwargs, conv)
    return args, dict(kwargs)


def run_on(analysis: Analysis, node: fx.Node, x: fx.Node, value: torch.Tensor) -> torch.Tensor:
    """Run ``node``'s operation with ``value`` in place of its input ``x``."""
    args, kwargs = _concrete(analysis, node, x, value)
    kwargs = {k: (False if k == "inplace" else v) for k, v in kwargs.items()}
    with torch.no_grad():
        try:
            if node.op == "call_module":
                module = analysis.module(node)
                flag = getattr(module, "inplace", None)
                try:
                    if flag:
                        module.inplace = False
                    return module(*args, **kwargs)
                finally:
                    if flag:
                        module.inplace = flag
            if node.op == "call_function":
                function = cast(Callable[..., Any], node.target)  # call_function: a callable
                return function(*args, **kwargs)
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        except Decline:
            raise
        except Exception as err:
            raise Decline from err


class PerChannelRule(Rule):
    """Output channel ``c`` depends only on input channel ``c`` (activations, BN, pooling).

    Parameters
    ----------
    name : str
        Name in reports.
    spatial : bool
        The operation treats dimensions 2.. as spatial (pooling, BN, interpolation): the
        channels must be in dimension 1.
    """

    def __init__(self, name: str, spatial: bool = False) -> None:
        self.name = name
        self.spatial = spatial

    def channel_operands(self, analysis: Analysis, node: fx.Node) -> list[fx.Node]:
        """1-D parameter vectors read along with the input (functional batch norm)."""
        x = _first(node)
        size = analysis.channels(x).size if analysis.has_channels(x) else -1
        return [
            n
            for n in node.all_input_nodes
            if n is not x
            and n.op == "get_attr"
            and analysis.has_channels(n)
            and analysis.channels(n).size == size
        ]

    def out_info(self, analysis: Analysis, node: fx.Node, info: ChannelInfo) -> ChannelInfo:
        out = analysis.shape(node)
        x = analysis.shape(_first(node))
        if out is None or x is None or len(out) != len(x) or out[info.dim] != x[info.dim]:
            raise Decline
        return info

    def info(self, analysis: Analysis, node: fx.Node) -> ChannelInfo | None:
        x = _first(node)
        if not analysis.has_channels(x):
            raise Decline
        info = analysis.info[x]
        assert info is not None
        if self.spatial and (info.dim != 1 or info.width != 1):
            raise Decline
        for n in node.all_input_nodes:
            if (
                n is not x
                and n not in self.channel_operands(analysis, node)
                and analysis.has_channels(n)
            ):
                raise Decline
        out = self.out_info(analysis, node, info)
        # constants this operation produces from an all-zero input
        zero = run_on(analysis, node, x, _zeros_like_input(analysis, node, x))
        if not isinstance(zero, torch.Tensor) or not bool(torch.isfinite(zero).all()):
            raise Decline
        node.meta["export_zero_nz"] = _channel_any(zero != 0, out)
        return out

    def nonzero(self, analysis: Analysis, node: fx.Node) -> torch.Tensor:
        nz = analysis.nz[_first(node)] | node.meta["export_zero_nz"]
        scale = self.input_scale(analysis, node)
        if scale is not None:
            nz = (analysis.nz[_first(node)] & (scale != 0)) | node.meta["export_zero_nz"]
        return nz

    def input_scale(self, analysis: Analysis, node: fx.Node) -> torch.Tensor | None:
        """Per-channel factor on the input (BN's weight); zero means the input is ignored."""
        return None

    def needed(self, analysis: Analysis, node: fx.Node, out_needed: Mask) -> Needs:
        x = _first(node)
        mask = expand_mask(out_needed, analysis.channels(node).size)
        scale = self.input_scale(analysis, node)
        need: Needs = {x: mask if scale is None else mask & (scale != 0)}
        for p in self.channel_operands(analysis, node):
            need[p] = mask
        return need

    def build_input(
        self, analysis: Analysis, builder: Builder, node: fx.Node
    ) -> tuple[Any, Layout]:
        layout = analysis.layout[node]
        return builder.value(_first(node), layout), layout

    def build(self, analysis: Analysis, builder: Builder, node: fx.Node) -> Layout:
        x_new, layout = self.build_input(analysis, builder, node)
        params = set(self.channel_operands(analysis, node))

        def conv(n: fx.Node) -> Any:
            return builder.value(n, layout) if n in params else builder.value(n, None)

        args = (x_new, *fx.node.map_arg(node.args[1:], conv))
        kwargs = dict(fx.node.map_arg(node.kwargs, conv))
        if "inplace" in kwargs:
            kwargs["inplace"] = False
        module = None
        if node.op == "call_module" and layout is not None:
            module = self.sliced_module(analysis, node, layout)
        target = node.target
        if (
            node.op == "call_method"
            and str(target).endswith("_")
            and not str(target).endswith("__")
        ):
            target = str(target)[:-1]
        new = builder.emit(node, args, kwargs, module=module, target=target)
        return builder.set(node, new, layout)

    def sliced_module(self, analysis: Analysis, node: fx.Node, layout: torch.Tensor) -> nn.Module:
        """The module to call for the channels in ``layout`` (parameter-free: a copy)."""
        from captum_chains.export.build import shallow_clone

        return shallow_clone(analysis.module(node))


def _as_list(value: Any) -> list[Any]:
    return [value] if isinstance(value, int) else list(value)


def _channel_any(mask: torch.Tensor, info: ChannelInfo) -> torch.Tensor:
    moved = mask.movedim(info.dim, 0).reshape(mask.shape[info.dim], -1).any(1)
    return moved.reshape(info.size, info.width).any(1).cpu()


class ReductionRule(PerChannelRule):
    """``mean``/``sum``/``amax``/``amin`` over dimensions other than the channel one."""

    def out_info(self, analysis: Analysis, node: fx.Node, info: ChannelInfo) -> ChannelInfo:
        x_shape, out = analysis.shape(_first(node)), analysis.shape(node)
        if x_shape is None or out is None:
            raise Decline
        given: Any = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if given is None or not all(isinstance(d, int) for d in _as_list(given)):
            raise Decline
        dims = [_norm_dim(int(d), len(x_shape)) for d in _as_list(given)]
        if info.dim in dims:
            raise Decline
        new_dim = info.dim if keep else info.dim - sum(d < info.dim for d in dims)
        if out[new_dim] != x_shape[info.dim]:
            raise Decline
        return ChannelInfo(new_dim, info.size, info.width)


# --------------------------------------------------------------------------- scores
class ScaleRule(Rule):
    """A score site (``channel_scale``): folded into the preceding layer when possible."""

    name = "scores"

    def _scores(self, analysis: Analysis, node: fx.Node) -> torch.Tensor:
        scores = cast(fx.Node, node.args[1])  # the get_attr node of the site's scores
        return analysis.attr(str(scores.target)).detach().cpu()

    def info(self, analysis: Analysis, node: fx.Node) -> ChannelInfo | None:
        x = _first(node)
        if not analysis.has_channels(x):
            raise Decline
        info = analysis.info[x]
        shape = analysis.shape(x)
        assert info is not None and shape is not None
        s = self._scores(analysis, node)
        dim = _norm_dim(int(cast(int, node.args[2])), len(shape))
        if s.ndim == 1 and (dim != info.dim or info.width != 1 or s.shape[0] != info.size):
            raise Decline
        return info

    def _factor(self, analysis: Analysis, node: fx.Node) -> torch.Tensor:
        s = self._scores(analysis, node)
        size = analysis.channels(node).size
        return s.expand(size) if s.ndim == 0 else s

    def nonzero(self, analysis: Analysis, node: fx.Node) -> torch.Tensor:
        return analysis.nz[_first(node)] & (self._factor(analysis, node) != 0)

    def needed(self, analysis: Analysis, node: fx.Node, out_needed: Mask) -> Needs:
        mask = expand_mask(out_needed, analysis.channels(node).size)
        return {_first(node): mask & (self._factor(analysis, node) != 0)}

    def reads(self, analysis: Analysis, node: fx.Node, inp: fx.Node) -> bool:
        return inp is _first(node)

    def build(self, analysis: Analysis, builder: Builder, node: fx.Node) -> Layout:
        from captum_chains.export.build import take

        x = _first(node)
        layout = analysis.layout[node]
        factor = self._factor(analysis, node).to(torch.float32)
        new_x, actual = builder.actual(x)
        producer = _fold_target(analysis, x) if builder.fold_scores else None
        if producer is not None and actual is not None:
            new_p, actual_p = builder.actual(producer)
            needed = analysis.nd[node]
            if isinstance(needed, torch.Tensor):  # unread channels may as well be zero
                factor = factor * needed.to(factor.dtype)
            if actual_p is not None and analysis.rule[producer].fold_scale(
                builder, new_p, take(factor, actual_p, 0)
            ):
                # the producer now outputs the scaled channels (exact zeros where removed);
                # re-indexing operations between it and the site commute with the scale
                return builder.set(node, new_x, actual)
        info = analysis.info[node]
        shape = analysis.shape(node)
        assert info is not None and shape is not None
        x_val = builder.value(x, layout)
        module = ChannelScale(take(factor, layout, 0), info.dim, len(shape))
        name = builder.add_module(f"scores.{node.name}", module)
        if not builder.fold_scores:
            channels = torch.arange(len(factor)) if layout is None else layout
            builder.score_sites[node] = (name, channels)
        return builder.set(node, builder.graph.call_module(name, (x_val,)), layout)


def _fold_target(analysis: Analysis, x: fx.Node) -> fx.Node | None:
    """The layer whose weights can absorb scores at ``x``: ``x`` itself, or the node
    before re-indexing operations (permute, reshape, ...), each read only once."""
    node = x
    while len(node.users) == 1 and analysis.rule[node].__class__ in _REINDEXING:
        node = _first(node)
    return node if len(node.users) == 1 and node.op != "get_attr" else None


# --------------------------------------------------------------------------- binary
_ADD, _SUB, _MUL, _DIV = "add", "sub", "mul", "div"


class BinaryRule(Rule):
    """Element-wise ``+ - * /`` of channel tensors, broadcasting scalars and size-1 dims.

    For ``+``, an operand whose channels are all zero is dropped: a residual branch
    whose filters were all removed costs nothing. A kept filter that writes into a
    residual stream is scattered into the stream's channels by a zero-filling gather.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = kind

    def _operands(self, node: fx.Node) -> tuple[Any, Any]:
        if len(node.args) != 2 or node.kwargs:
            raise Decline
        return node.args[0], node.args[1]

    def info(self, analysis: Analysis, node: fx.Node) -> ChannelInfo | None:
        out = analysis.shape(node)
        if out is None:
            raise Decline
        found: set[tuple[int, int, int]] = set()
        plain: list[tuple[int, ...]] = []
        for op in self._operands(node):
            shape = analysis.shape(op)
            if isinstance(op, fx.Node) and shape is None:
                raise Decline
            if shape is None:
                continue
            if analysis.has_channels(op):
                info = analysis.info[op]
                assert info is not None
                d = info.dim + len(out) - len(shape)
                if shape[info.dim] != out[d]:
                    raise Decline
                found.add((d, info.size, info.width))
            else:
                plain.append(shape)
        if len(found) != 1:
            raise Decline
        d, size, width = found.pop()
        for shape in plain:
            k = d - (len(out) - len(shape))
            if k >= 0 and shape[k] != 1:
                raise Decline
        return ChannelInfo(d, size, width)

    def _channel_ops(self, analysis: Analysis, node: fx.Node) -> list[fx.Node]:
        return [op for op in self._operands(node) if analysis.has_channels(op)]

    def nonzero(self, analysis: Analysis, node: fx.Node) -> torch.Tensor:
        size = analysis.channels(node).size
        ops = self._operands(node)
        masks = [analysis.nz[op] for op in ops if analysis.has_channels(op)]
        others = [op for op in ops if not analysis.has_channels(op)]
        if self.kind in (_ADD, _SUB):
            if any(not (isinstance(o, (int, float)) and o == 0) for o in others):
                return torch.ones(size, dtype=torch.bool)
            return torch.stack(masks).any(0)
        if self.kind == _MUL:
            if any(isinstance(o, (int, float)) and o == 0 for o in others):
                return torch.zeros(size, dtype=torch.bool)
            return torch.stack(masks).all(0)
        first = ops[0]
        return (
            analysis.nz[first]
            if analysis.has_channels(first)
            else torch.ones(size, dtype=torch.bool)
        )

    def needed(self, analysis: Analysis, node: fx.Node, out_needed: Mask) -> Needs:
        mask = expand_mask(out_needed, analysis.channels(node).size)
        need: Needs = {}
        ops = self._operands(node)
        for i, op in enumerate(ops):
            if not isinstance(op, fx.Node):
                continue
            if not analysis.has_channels(op):
                need[op] = bool(mask.any())
                continue
            m = mask
            if self.kind == _MUL:
                for j, other in enumerate(ops):
                    if j != i and analysis.has_channels(other):
                        m = m & analysis.nz[other]
            need[op] = m
        return need

    def reads(self, analysis: Analysis, node: fx.Node, inp: fx.Node) -> bool:
        if self.kind != _ADD or not analysis.has_channels(inp):
            return True
        kept = [op for op in self._channel_ops(analysis, node) if not analysis.real_empty[op]]
        if kept:
            return inp in kept
        return inp is self._channel_ops(analysis, node)[0]

    def build(self, analysis: Analysis, builder: Builder, node: fx.Node) -> Layout:
        layout = analysis.layout[node]
        ops = list(self._operands(node))
        fill = 1.0 if self.kind == _DIV and bool((layout < 0).all()) else 0.0
        if self.kind == _ADD:
            kept = [
                op for op in ops if not analysis.has_channels(op) or self.reads(analysis, node, op)
            ]
            if len(kept) == 1:
                return builder.set(node, builder.value(kept[0], layout), layout)
            ops = kept
        args = tuple(
            builder.value(op, layout, fill=fill if i == 1 else 0.0)
            if analysis.has_channels(op)
            else builder.value(op)
            for i, op in enumerate(ops)
        )
        target = node.target
        if node.op == "call_function" and target in _INPLACE_FUNCS:
            target = _INPLACE_FUNCS[target]
        if node.op == "call_method":
            target = str(target).rstrip("_") if not str(target).endswith("__") else target
        return builder.set(node, builder.emit(node, args, {}, target=target), layout)


_INPLACE_FUNCS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


# --------------------------------------------------------------------------- layout ops
class SameChannelsRule(PerChannelRule):
    """Operations that only move data around (flatten, reshape, permute, indexing).

    Channel identities are kept; only the dimension (and, after flattening, the number
    of entries per channel) changes.
    """

    def __init__(self, name: str, mapper: Any) -> None:
        super().__init__(name)
        self.mapper = mapper

    def info(self, analysis: Analysis, node: fx.Node) -> ChannelInfo | None:
        x = _first(node)
        if not analysis.has_channels(x):
            raise Decline
        for n in node.all_input_nodes:
            if n is not x and analysis.has_channels(n):
                raise Decline
        info = analysis.info[x]
        x_shape, out = analysis.shape(x), analysis.shape(node)
        if info is None or x_shape is None or out is None:
            raise Decline
        new = self.mapper(node, info, x_shape, out)
        if new is None or out[new.dim] != new.size * new.width:
            raise Decline
        node.meta["export_zero_nz"] = torch.zeros(new.size, dtype=torch.bool)
        return new


def _int_args(node: fx.Node) -> list[int]:
    out = []
    for arg in node.args[1:]:
        if isinstance(arg, int):
            out.append(arg)
        elif isinstance(arg, (tuple, list)):
            out.extend(v for v in arg if isinstance(v, int))
    return out


def _map_flatten(node: fx.Node, info: ChannelInfo, x: tuple, out: tuple) -> ChannelInfo | None:
    if node.op == "call_module":
        return None  # handled by FlattenModuleRule
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return _flatten_info(info, x, int(cast(int, start)), int(cast(int, end)))


def _flatten_info(info: ChannelInfo, x: tuple, start: int, end: int) -> ChannelInfo | None:
    start, end = _norm_dim(start, len(x)), _norm_dim(end, len(x))
    if info.dim < start:
        return info
    if info.dim > end:
        return ChannelInfo(info.dim - (end - start), info.size, info.width)
    if info.dim != start:
        return None
    return ChannelInfo(start, info.size, info.width * math.prod(x[start + 1 : end + 1]))


def _map_reshape(node: fx.Node, info: ChannelInfo, x: tuple, out: tuple) -> ChannelInfo | None:
    before = math.prod(x[: info.dim])
    for j in range(len(out)):
        if math.prod(out[:j]) != before:
            continue
        if out[j] == 1 and info.size * info.width != 1:
            continue
        total = info.size * info.width
        k = info.dim + 1
        merged = 1
        while merged * x[info.dim] < out[j] and k < len(x):
            merged *= x[k]
            k += 1
        if merged * x[info.dim] != out[j]:
            return None
        if out[j] in _int_args(node) and out[j] != 1:
            return None  # a literal channel count would not follow slicing
        return ChannelInfo(j, info.size, total * merged // info.size)
    return None


def _map_permute(node: fx.Node, info: ChannelInfo, x: tuple, out: tuple) -> ChannelInfo | None:
    dims = [d for d in _int_args(node)]
    if len(dims) != len(x):
        return None
    dims = [_norm_dim(d, len(x)) for d in dims]
    return ChannelInfo(dims.index(info.dim), info.size, info.width)


def _map_transpose(node: fx.Node, info: ChannelInfo, x: tuple, out: tuple) -> ChannelInfo | None:
    dims = _int_args(node)
    if len(dims) != 2:
        return None
    d0, d1 = (_norm_dim(d, len(x)) for d in dims)
    swap = {d0: d1, d1: d0}
    return ChannelInfo(swap.get(info.dim, info.dim), info.size, info.width)


def _map_same(node: fx.Node, info: ChannelInfo, x: tuple, out: tuple) -> ChannelInfo | None:
    return info if x == out else None


def _map_unsqueeze(node: fx.Node, info: ChannelInfo, x: tuple, out: tuple) -> ChannelInfo | None:
    dims = _int_args(node)
    if len(dims) != 1 or len(out) != len(x) + 1:
        return None
    k = _norm_dim(dims[0], len(out))
    return ChannelInfo(info.dim + (k <= info.dim), info.size, info.width)


def _map_squeeze(node: fx.Node, info: ChannelInfo, x: tuple, out: tuple) -> ChannelInfo | None:
    if x[info.dim] == 1:
        return None
    removed = [d for d in range(len(x)) if x[d] == 1]
    dims = _int_args(node)
    if dims:
        removed = [d for d in (_norm_dim(v, len(x)) for v in dims) if x[d] == 1]
    new = info.dim - sum(d < info.dim for d in removed)
    return ChannelInfo(new, info.size, info.width)


def _map_getitem(node: fx.Node, info: ChannelInfo, x: tuple, out: tuple) -> ChannelInfo | None:
    index = node.args[1]
    items = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in items):
        k = items.index(Ellipsis)
        fill = len(x) - (len(items) - 1 - sum(i is None for i in items))
        items = items[:k] + (slice(None),) * fill + items[k + 1 :]
    dim_in, dim_out = 0, 0
    for item in items:
        if item is None:
            dim_out += 1
            continue
        if dim_in == info.dim:
            if item != slice(None):
                return None
            return ChannelInfo(dim_out, info.size, info.width)
        if isinstance(item, int):
            dim_in += 1
        elif isinstance(item, slice):
            dim_in += 1
            dim_out += 1
        else:
            return None
    return ChannelInfo(dim_out + (info.dim - dim_in), info.size, info.width)


class FlattenModuleRule(SameChannelsRule):
    """``nn.Flatten``."""

    def __init__(self) -> None:
        super().__init__("flatten", None)

    def info(self, analysis: Analysis, node: fx.Node) -> ChannelInfo | None:
        m = analysis.module(node)
        self.mapper = lambda n, info, x, out: _flatten_info(info, x, m.start_dim, m.end_dim)
        return super().info(analysis, node)


class CatRule(Rule):
    """``torch.cat``: along the channel dimension the channels are concatenated."""

    name = "cat"

    def _parts(self, node: fx.Node) -> tuple[list[Any], int]:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
            raise Decline
        return list(tensors), dim

    def info(self, analysis: Analysis, node: fx.Node) -> ChannelInfo | None:
        parts, dim = self._parts(node)
        out = analysis.shape(node)
        if out is None or not all(analysis.has_channels(p) for p in parts):
            raise Decline
        infos = [analysis.channels(p) for p in parts]
        d = infos[0].dim
        if any(i.dim != d or i.width != infos[0].width for i in infos):
            raise Decline
        if _norm_dim(dim, len(out)) == d:
            node.meta["export_cat"] = True
            total = sum(i.size for i in infos)
            return ChannelInfo(d, total, infos[0].width)
        if any(i.size != infos[0].size for i in infos):
            raise Decline
        node.meta["export_cat"] = False
        return infos[0]

    def _offsets(self, analysis: Analysis, parts: list[fx.Node]) -> list[int]:
        offs, o = [], 0
        for p in parts:
            offs.append(o)
            o += analysis.channels(p).size
        return offs

    def nonzero(self, analysis: Analysis, node: fx.Node) -> torch.Tensor:
        parts, _ = self._parts(node)
        if node.meta["export_cat"]:
            return torch.cat([analysis.nz[p] for p in parts])
        return torch.stack([analysis.nz[p] for p in parts]).any(0)

    def needed(self, analysis: Analysis, node: fx.Node, out_needed: Mask) -> Needs:
        parts, _ = self._parts(node)
        mask = expand_mask(out_needed, analysis.channels(node).size)
        if not node.meta["export_cat"]:
            return {p: mask for p in parts}
        offs = self._offsets(analysis, parts)
        return {p: mask[o : o + analysis.channels(p).size] for p, o in zip(parts, offs)}

    def build(self, analysis: Analysis, builder: Builder, node: fx.Node) -> Layout:
        parts, dim = self._parts(node)
        layout = analysis.layout[node]
        if not node.meta["export_cat"]:
            new = [builder.value(p, layout) for p in parts]
            return builder.set(node, builder.graph.call_function(torch.cat, (new, dim)), layout)
        offs = self._offsets(analysis, parts)
        pieces, kept = [], []
        for p, o in zip(parts, offs):
            size = analysis.channels(p).size
            sel = layout[(layout >= o) & (layout < o + size)] - o
            if sel.numel():
                pieces.append(builder.value(p, sel))
                kept.append(sel + o)
        if not pieces:  # only a placeholder channel is needed
            pieces, kept = [builder.value(parts[0], layout)], [layout]
        actual = torch.cat(kept)
        if len(pieces) == 1:
            return builder.set(node, pieces[0], actual)
        return builder.set(node, builder.graph.call_function(torch.cat, (pieces, dim)), actual)


class MetaRule(Rule):
    """Reads of a tensor's metadata (``size``, ``shape``, ``dim``): no channel values needed."""

    name = "metadata"

    def needed(self, analysis: Analysis, node: fx.Node, out_needed: Mask) -> Needs:
        return {}

    def build(self, analysis: Analysis, builder: Builder, node: fx.Node) -> Layout:
        def conv(n: fx.Node) -> Any:
            return builder.actual(n)[0] if analysis.has_channels(n) else builder.value(n)

        args = fx.node.map_arg(node.args, conv)
        kwargs = fx.node.map_arg(node.kwargs, conv)
        return builder.set(node, builder.emit(node, args, kwargs), None)


class GetItemRule(SameChannelsRule):
    """``x[...]`` on tensors (indexing outside the channel dimension); others: metadata."""

    def __init__(self) -> None:
        super().__init__("getitem", _map_getitem)

    def info(self, analysis: Analysis, node: fx.Node) -> ChannelInfo | None:
        if not analysis.has_channels(_first(node)):
            if analysis.shape(_first(node)) is None:
                return None
            raise Decline
        return super().info(analysis, node)

    def needed(self, analysis: Analysis, node: fx.Node, out_needed: Mask) -> Needs:
        if not analysis.has_channels(_first(node)):
            return Rule.needed(self, analysis, node, out_needed)
        return super().needed(analysis, node, out_needed)

    def build(self, analysis: Analysis, builder: Builder, node: fx.Node) -> Layout:
        if not analysis.has_channels(_first(node)):
            return builder.copy_node(node)
        return super().build(analysis, builder, node)


# --------------------------------------------------------------------------- registry
def _is_family_pool(module: nn.Module) -> bool:
    """Whether a family rule says ``module`` pools as ``nn.AvgPool2d`` / ``nn.MaxPool2d``
    (:data:`~captum_chains.units.adapters.LAYER_KINDS`: timm's same-padding pools)."""
    return layer_kind(module) in (nn.AvgPool2d, nn.MaxPool2d)


def _register() -> None:
    act_modules = (
        nn.Identity,
        nn.Dropout,
        nn.Dropout1d,
        nn.Dropout2d,
        nn.Dropout3d,
        nn.AlphaDropout,
        nn.ReLU,
        nn.ReLU6,
        nn.LeakyReLU,
        nn.ELU,
        nn.SELU,
        nn.CELU,
        nn.GELU,
        nn.SiLU,
        nn.Mish,
        nn.Hardswish,
        nn.Hardsigmoid,
        nn.Hardtanh,
        nn.Sigmoid,
        nn.Tanh,
        nn.Softplus,
        nn.Softsign,
        nn.Tanhshrink,
        nn.Threshold,
    )
    register_module_rule(act_modules, PerChannelRule("element-wise"))
    register_module_rule(
        nn.PReLU,
        PerChannelRule("element-wise"),
        when=lambda m: getattr(m, "num_parameters", 0) == 1,
    )
    pools = (
        nn.MaxPool1d,
        nn.MaxPool2d,
        nn.MaxPool3d,
        nn.AvgPool1d,
        nn.AvgPool2d,
        nn.AvgPool3d,
        nn.AdaptiveAvgPool1d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveAvgPool3d,
        nn.AdaptiveMaxPool1d,
        nn.AdaptiveMaxPool2d,
        nn.AdaptiveMaxPool3d,
        nn.LPPool1d,
        nn.LPPool2d,
        nn.Upsample,
        nn.UpsamplingNearest2d,
        nn.UpsamplingBilinear2d,
    )
    register_module_rule(pools, PerChannelRule("pooling", spatial=True))
    # pools of the families (timm's AvgPool2dSame / MaxPool2dSame subclass the torch pools)
    register_module_rule(
        (nn.AvgPool2d, nn.MaxPool2d), PerChannelRule("pooling", spatial=True), when=_is_family_pool
    )
    register_module_rule(nn.Flatten, FlattenModuleRule())

    elementwise = PerChannelRule("element-wise")
    register_function_rule(
        [
            F.relu,
            F.relu_,
            torch.relu,
            torch.relu_,
            F.relu6,
            F.leaky_relu,
            F.elu,
            F.selu,
            F.celu,
            F.gelu,
            F.silu,
            F.mish,
            F.hardswish,
            F.hardsigmoid,
            F.hardtanh,
            F.sigmoid,
            torch.sigmoid,
            F.tanh,
            torch.tanh,
            F.softplus,
            F.dropout,
            F.dropout1d,
            F.dropout2d,
            F.dropout3d,
            F.alpha_dropout,
            torch.clamp,
            torch.clip,
            torch.neg,
            torch.abs,
            torch.exp,
            torch.square,
            torch.sqrt,
            operator.neg,
        ],
        elementwise,
    )
    spatial = PerChannelRule("pooling", spatial=True)
    register_function_rule(
        [
            F.adaptive_avg_pool1d,
            F.adaptive_avg_pool2d,
            F.adaptive_avg_pool3d,
            F.adaptive_max_pool1d,
            F.adaptive_max_pool2d,
            F.adaptive_max_pool3d,
            F.avg_pool1d,
            F.avg_pool2d,
            F.avg_pool3d,
            F.max_pool1d,
            F.max_pool2d,
            F.max_pool3d,
            F.interpolate,
            F.batch_norm,
        ],
        spatial,
    )
    register_method_rule(
        [
            "relu",
            "relu_",
            "sigmoid",
            "sigmoid_",
            "tanh",
            "tanh_",
            "clamp",
            "clamp_",
            "clip",
            "clip_",
            "neg",
            "abs",
            "exp",
            "square",
            "sqrt",
            "contiguous",
            "clone",
            "float",
            "double",
            "half",
            "bfloat16",
            "detach",
        ],
        elementwise,
    )
    reduction = ReductionRule("reduction")
    register_method_rule(["mean", "sum", "amax", "amin"], reduction)
    register_function_rule([torch.mean, torch.sum, torch.amax, torch.amin], reduction)

    for kind, funcs, methods in (
        (_ADD, [operator.add, operator.iadd, torch.add], ["add", "add_", "__add__", "__radd__"]),
        (_SUB, [operator.sub, operator.isub, torch.sub], ["sub", "sub_"]),
        (_MUL, [operator.mul, operator.imul, torch.mul], ["mul", "mul_", "__mul__", "__rmul__"]),
        (_DIV, [operator.truediv, operator.itruediv, torch.div], ["div", "div_"]),
    ):
        rule = BinaryRule(kind)
        register_function_rule(funcs, rule)
        register_method_rule(methods, rule)

    register_function_rule([torch.flatten], SameChannelsRule("flatten", _map_flatten))
    register_method_rule(["flatten"], SameChannelsRule("flatten", _map_flatten))
    reshape = SameChannelsRule("reshape", _map_reshape)
    register_function_rule([torch.reshape], reshape)
    register_method_rule(["reshape", "view"], reshape)
    register_function_rule([torch.permute], SameChannelsRule("permute", _map_permute))
    register_method_rule(["permute"], SameChannelsRule("permute", _map_permute))
    register_function_rule([torch.transpose], SameChannelsRule("transpose", _map_transpose))
    register_method_rule(["transpose"], SameChannelsRule("transpose", _map_transpose))
    register_function_rule([torch.unsqueeze], SameChannelsRule("unsqueeze", _map_unsqueeze))
    register_method_rule(["unsqueeze"], SameChannelsRule("unsqueeze", _map_unsqueeze))
    register_function_rule([torch.squeeze], SameChannelsRule("squeeze", _map_squeeze))
    register_method_rule(["squeeze"], SameChannelsRule("squeeze", _map_squeeze))
    register_method_rule(["to", "type_as"], SameChannelsRule("cast", _map_same))
    register_function_rule([operator.getitem], GetItemRule())
    register_function_rule([torch.cat, torch.concat], CatRule())
    meta = MetaRule()
    register_method_rule(["size", "dim", "numel", "type"], meta)
    register_function_rule([getattr], meta)
    register_function_rule([channel_scale], ScaleRule())


_REINDEXING: tuple[type, ...] = (SameChannelsRule, FlattenModuleRule, GetItemRule)

_register()

SPECIAL = {"placeholder": PlaceholderRule(), "output": OutputRule(), "get_attr": GetAttrRule()}
