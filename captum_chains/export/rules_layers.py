"""Rules for layers with weights: convolutions (dense, grouped, depthwise), linear layers,
batch normalization, and normalizations that mix channels (LayerNorm, GroupNorm).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from captum_chains.export.analysis import Analysis
from captum_chains.export.build import Builder, shallow_clone, take
from captum_chains.export.rules import (
    ChannelInfo,
    Decline,
    Layout,
    Mask,
    Needs,
    Rule,
    expand_mask,
    register_function_rule,
    register_module_rule,
)
from captum_chains.export.rules_ops import PerChannelRule
from captum_chains.units.adapters import layer_kind


def _scale_affine(weight: Any, bias: Any, scale: torch.Tensor) -> bool:
    """Multiply a per-channel affine (``weight``, ``bias`` vectors) by ``scale`` in place."""
    if not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor):
        return False
    if weight.shape != scale.shape or bias.shape != scale.shape:
        return False
    with torch.no_grad():
        weight.mul_(scale.to(weight))
        bias.mul_(scale.to(bias))
    return True


def _scale_rows(module: Any, scale: torch.Tensor) -> bool:
    """Multiply a layer's output channels (weight rows, bias) by ``scale``."""
    w = module.weight
    view = [-1] + [1] * (w.ndim - 1)
    with torch.no_grad():
        w.mul_(scale.to(w).view(view))
        if getattr(module, "bias", None) is not None:
            module.bias.mul_(scale.to(module.bias))
    return True


# --------------------------------------------------------------------------- dense
def _dense_input(analysis: Analysis, builder: Builder, x: fx.Node) -> tuple[fx.Node, Layout]:
    """The input of a convolution or linear layer and its layout.

    The layer reads whatever channels its producer computes, except that channels known
    to be zero (e.g. removed filters left in place by a channel-mixing norm) are first
    dropped, so that the layer holds no weight for them.
    """
    new, actual = builder.actual(x)
    if actual is None or not analysis.has_channels(x):
        return new, actual
    real = actual[actual >= 0]
    if bool(analysis.nz[x][real].all()) and len(real) == len(actual):
        return new, actual
    return builder.value(x, analysis.layout[x]), analysis.layout[x]


class _Dense(Rule):
    """Shared parts of convolutions and linear layers: ``out[o] = sum_c W[o, c] * in[c] + b[o]``
    (sums within the group of ``o`` for grouped convolutions)."""

    def _local(self, analysis: Analysis, node: fx.Node) -> tuple[torch.Tensor, int]:
        """Bool ``[out, in_channels / groups]``: inputs of its group each output reads; groups."""
        raise NotImplementedError

    def nonzero(self, analysis: Analysis, node: fx.Node) -> torch.Tensor:
        m = analysis.module(node)
        local, g = self._local(analysis, node)
        out, in_pg = local.shape
        nz_in = analysis.nonzero_of(node.args[0])
        if nz_in is None:
            nz_in = torch.ones(g * in_pg, dtype=torch.bool)
        hit = (local.view(g, out // g, in_pg) & nz_in.view(g, 1, in_pg)).any(-1).flatten()
        if getattr(m, "bias", None) is not None:
            hit = hit | (m.bias.detach().cpu() != 0)
        return hit

    def needed(self, analysis: Analysis, node: fx.Node, out_needed: Mask) -> Needs:
        mask = expand_mask(out_needed, analysis.channels(node).size)
        x: Any = node.args[0]
        if not analysis.has_channels(x):
            return {x: bool(mask.any())}
        local, g = self._local(analysis, node)
        out, in_pg = local.shape
        return {x: (local.view(g, out // g, in_pg) & mask.view(g, -1, 1)).any(1).flatten()}

    def fold_scale(self, builder: Builder, node: fx.Node, scale: torch.Tensor) -> bool:
        module = builder.module_of(node)
        return module is not None and _scale_rows(module, scale)


class ConvRule(_Dense):
    """``nn.Conv1d/2d/3d`` and subclasses (e.g. timm's ``Conv2dSame``).

    Dense convolutions read any subset of input channels; grouped and depthwise ones
    keep the groups that have a needed output, each group padded to a common number
    of input and output channels with zero-weight placeholders.
    """

    leaf = True
    name = "conv"

    def info(self, analysis: Analysis, node: fx.Node) -> ChannelInfo | None:
        m = analysis.module(node)
        if len(node.args) != 1 or node.kwargs:
            raise Decline
        x: Any = node.args[0]
        if analysis.has_channels(x):
            info = analysis.channels(x)
            if info.dim != 1 or info.width != 1 or info.size != m.in_channels:
                raise Decline
        elif m.groups > 1:
            raise Decline
        return ChannelInfo(1, m.out_channels)

    def _local(self, analysis: Analysis, node: fx.Node) -> tuple[torch.Tensor, int]:
        cached = node.meta.get("export_local")
        if cached is None:
            m = analysis.module(node)
            cached = (m.weight.detach().abs().flatten(2).sum(-1).cpu() != 0, m.groups)
            node.meta["export_local"] = cached
        return cached

    def build(self, analysis: Analysis, builder: Builder, node: fx.Node) -> Layout:
        m = analysis.module(node)
        rows = analysis.layout[node]
        x: Any = node.args[0]
        if m.groups == 1:
            x_new, cols = _dense_input(analysis, builder, x)
            weight = take(m.weight.detach(), rows, 0)
            if cols is not None:
                weight = take(weight, cols, 1)
            new = self._conv(m, weight, rows, groups=1)
            name = builder.add_module(str(node.target), new)
            return builder.set(node, builder.graph.call_module(name, (x_new,)), rows)
        return self._build_grouped(analysis, builder, node, m, rows)

    def _conv(self, m: Any, weight: torch.Tensor, rows: torch.Tensor, groups: int) -> nn.Module:
        new = shallow_clone(m)
        new.weight = nn.Parameter(weight)
        if m.bias is not None:
            new.bias = nn.Parameter(take(m.bias.detach(), rows, 0))
        new.out_channels = weight.shape[0]
        new.in_channels = weight.shape[1] * groups
        new.groups = groups
        return new

    def _build_grouped(
        self, analysis: Analysis, builder: Builder, node: fx.Node, m: Any, rows: torch.Tensor
    ) -> Layout:
        g = m.groups
        out_pg, in_pg = m.out_channels // g, m.in_channels // g
        x: Any = node.args[0]
        local, _ = self._local(analysis, node)
        nz_local = analysis.nz[x].view(g, in_pg)
        real = rows[rows >= 0]
        if not len(real):  # a placeholder channel: one group with one zero filter
            groups = torch.zeros(1, dtype=torch.long)
            out_pad = torch.full((1, 1), -1)
            col_local = torch.full((1, 1), -1)
        else:
            groups, inverse, counts = torch.unique(
                real // out_pg, return_inverse=True, return_counts=True
            )
            start = torch.cumsum(counts, 0) - counts
            pos = torch.arange(len(real)) - start[inverse]
            out_pad = torch.full((len(groups), int(counts.max())), -1)
            out_pad[inverse, pos] = real
            reach = torch.zeros(len(groups), in_pg)
            reach.index_add_(0, inverse, local[real].float())
            mask = (reach > 0) & nz_local[groups]
            counts_in = mask.sum(1)
            m_in = max(1, int(counts_in.max()))
            order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :m_in]
            valid = torch.arange(m_in).view(1, -1) < counts_in.view(-1, 1)
            col_local = torch.where(valid, order, torch.full_like(order, -1))
        m_out = out_pad.shape[1]
        out_t = out_pad.flatten()
        in_t = torch.where(col_local >= 0, col_local + groups.view(-1, 1) * in_pg, -1).flatten()
        weight = take(m.weight.detach(), out_t, 0)  # [G'*m_out, in_pg, ...]
        col = col_local.repeat_interleave(m_out, 0)  # [G'*m_out, m_in]
        shape = (*col.shape, *([1] * (weight.ndim - 2)))
        gather = col.clamp(min=0).view(shape).expand(-1, -1, *weight.shape[2:])
        weight = weight.gather(1, gather.to(weight.device))
        keep = (col >= 0).view(shape).to(weight.device)
        weight = torch.where(keep, weight, torch.zeros((), dtype=weight.dtype))
        new = self._conv(m, weight.contiguous(), out_t, groups=len(groups))
        x_new = builder.value(x, in_t)
        name = builder.add_module(str(node.target), new)
        return builder.set(node, builder.graph.call_module(name, (x_new,)), out_t)


class LinearRule(_Dense):
    """``nn.Linear`` on the last dimension (flattened maps: one column block per channel)."""

    leaf = True
    name = "linear"

    def info(self, analysis: Analysis, node: fx.Node) -> ChannelInfo | None:
        m = analysis.module(node)
        x: Any = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        shape = analysis.shape(x)
        if shape is None:
            raise Decline
        if analysis.has_channels(x):
            info = analysis.channels(x)
            if info.dim != len(shape) - 1 or info.size * info.width != m.in_features:
                raise Decline
        return ChannelInfo(len(shape) - 1, m.out_features)

    def _width(self, analysis: Analysis, node: fx.Node) -> int:
        x: Any = node.args[0]
        return analysis.channels(x).width if analysis.has_channels(x) else 1

    def _local(self, analysis: Analysis, node: fx.Node) -> tuple[torch.Tensor, int]:
        m = analysis.module(node)
        w = self._width(analysis, node)
        nzw = m.weight.detach().cpu() != 0
        return nzw.view(m.out_features, -1, w).any(-1), 1

    def build(self, analysis: Analysis, builder: Builder, node: fx.Node) -> Layout:
        m = analysis.module(node)
        rows = analysis.layout[node]
        x: Any = node.args[0]
        x_new, cols = _dense_input(analysis, builder, x)
        weight = take(m.weight.detach(), rows, 0)
        if cols is not None:
            w = self._width(analysis, node)
            elem = cols.clamp(min=0).repeat_interleave(w) * w + torch.arange(w).repeat(len(cols))
            elem = torch.where(cols.repeat_interleave(w) >= 0, elem, torch.full_like(elem, -1))
            weight = take(weight, elem, 1)
        new = shallow_clone(m)
        new.weight = nn.Parameter(weight)
        if m.bias is not None:
            new.bias = nn.Parameter(take(m.bias.detach(), rows, 0))
        new.in_features, new.out_features = weight.shape[1], weight.shape[0]
        name = builder.add_module(str(node.target), new)
        return builder.set(node, builder.graph.call_module(name, (x_new,)), rows)


# --------------------------------------------------------------------------- norms
class BatchNormRule(PerChannelRule):
    """``nn.BatchNorm1d/2d/3d`` in eval mode: a per-channel affine map, sliced."""

    leaf = True

    def __init__(self) -> None:
        super().__init__("batchnorm", spatial=True)

    def input_scale(self, analysis: Analysis, node: fx.Node) -> torch.Tensor | None:
        m = analysis.module(node)
        return None if m.weight is None else m.weight.detach().cpu()

    def sliced_module(self, analysis: Analysis, node: fx.Node, layout: torch.Tensor) -> nn.Module:
        m = analysis.module(node)
        new = shallow_clone(m)
        new.num_features = len(layout)
        if m.weight is not None:
            new.weight = nn.Parameter(take(m.weight.detach(), layout, 0))
            new.bias = nn.Parameter(take(m.bias.detach(), layout, 0))
        if m.running_mean is not None:
            new.running_mean = take(m.running_mean, layout, 0)
            var = take(m.running_var, layout, 0)
            new.running_var = torch.where(layout.to(var.device) >= 0, var, torch.ones_like(var))
        return new

    def fold_scale(self, builder: Builder, node: fx.Node, scale: torch.Tensor) -> bool:
        module = builder.module_of(node)
        if module is None:
            return False
        return _scale_affine(module.weight, module.bias, scale)


class ChannelNormRule(Rule):
    """Normalizations whose statistics mix channels (LayerNorm over channels, GroupNorm).

    Every input channel takes part in the statistics, so the input is kept whole
    (removed channels enter as the zeros they are); the output can be sliced by the
    layers that follow, and scores after it fold into its per-channel affine.
    """

    leaf = True
    name = "channel norm"

    def _normalizes_channels(self, analysis: Analysis, node: fx.Node, info: ChannelInfo) -> bool:
        shape = analysis.shape(node.args[0])
        assert shape is not None
        if node.op == "call_module":
            m = analysis.module(node)
            if isinstance(m, nn.GroupNorm):
                return info.dim == 1
            k = len(m.normalized_shape)
        elif node.target is F.group_norm:
            return info.dim == 1
        else:
            norm_shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
            k = len(norm_shape) if isinstance(norm_shape, (tuple, list)) else 1
        return info.dim >= len(shape) - k

    def info(self, analysis: Analysis, node: fx.Node) -> ChannelInfo | None:
        x: Any = node.args[0]
        if not analysis.has_channels(x):
            raise Decline
        info = analysis.info[x]
        assert info is not None
        if info.width != 1 or not self._normalizes_channels(analysis, node, info):
            raise Decline
        if analysis.shape(node) != analysis.shape(x):
            raise Decline
        return info

    def needed(self, analysis: Analysis, node: fx.Node, out_needed: Mask) -> Needs:
        if not bool(expand_mask(out_needed, analysis.channels(node).size).any()):
            return {}
        return {inp: True for inp in node.all_input_nodes}

    def build(self, analysis: Analysis, builder: Builder, node: fx.Node) -> Layout:
        info = analysis.channels(node)
        x: Any = node.args[0]
        full = torch.arange(info.size)
        args = fx.node.map_arg(node.args, lambda n: builder.value(n, None, fresh=True))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: builder.value(n, None, fresh=True))
        module = None
        if node.op == "call_module":
            module = shallow_clone(analysis.module(node))
            for pname, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[pname] = nn.Parameter(p.detach().clone())
        new = builder.emit(node, args, kwargs, module=module)
        if not bool(expand_mask(analysis.nd[node], info.size).any()):
            # only the shape of the output is used: its affine parameters are irrelevant
            self.fold_scale(builder, new, torch.zeros(info.size))
        elif not bool(analysis.nz[x].any()):
            # an all-zero input normalizes to zero: the output is the bias alone
            weight = self._affine(builder, new)[0]
            if weight is not None:
                with torch.no_grad():
                    weight.zero_()
        return builder.set(node, new, full)

    def _affine(self, builder: Builder, node: fx.Node) -> tuple[Any, Any]:
        module = builder.module_of(node)
        if module is not None:
            return getattr(module, "weight", None), getattr(module, "bias", None)
        if node.op != "call_function":
            return None, None
        # functional layer_norm(x, shape, weight, bias, eps) or
        # group_norm(x, groups, weight, bias, eps)
        weight = node.kwargs.get("weight", node.args[2] if len(node.args) > 2 else None)
        bias = node.kwargs.get("bias", node.args[3] if len(node.args) > 3 else None)
        return builder.tensor_of(weight), builder.tensor_of(bias)

    def fold_scale(self, builder: Builder, node: fx.Node, scale: torch.Tensor) -> bool:
        return _scale_affine(*self._affine(builder, node), scale)


_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_plain_conv(module: nn.Module) -> bool:
    """Whether ``module`` is exactly a torch convolution or a family's layer that slices as
    one (:data:`~captum_chains.units.adapters.LAYER_KINDS`, e.g. timm's ``Conv2dSame``)."""
    return type(module) in _CONV_TYPES or layer_kind(module) in _CONV_TYPES


def _register() -> None:
    # exact types only: subclasses may transform their weights in forward (e.g. weight
    # standardization), which slicing would change; they are traced through instead
    # (timm's Conv2dSame subclasses nn.Conv2d, so the types below reach it)
    register_module_rule(_CONV_TYPES, ConvRule(), when=_is_plain_conv)
    linear_types = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
    register_module_rule(nn.Linear, LinearRule(), when=lambda m: type(m) in linear_types)
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    register_module_rule(bn_types, BatchNormRule(), when=lambda m: type(m) in bn_types)
    norm_types = (nn.LayerNorm, nn.GroupNorm)
    register_module_rule(norm_types, ChannelNormRule(), when=lambda m: type(m) in norm_types)
    register_function_rule([F.layer_norm, F.group_norm], ChannelNormRule())


_register()
