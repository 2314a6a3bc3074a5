"""Attention heads in the export: the channel rule of :class:`HeadCore`.

Inside an attention module the heads are hidden behind ``reshape``/``permute``/``unbind``
and the attention product, where no channel can be followed. The family modules rewrite
their attention, in the export's private copy, into ``qkv -> HeadCore -> proj``
(:mod:`captum_chains.units.timm_vit`, :mod:`captum_chains.units.torch_attention`);
:class:`HeadCoreRule` cuts heads whole at that leaf. How: ``docs/vit.md`` ("Export").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from captum_chains.export.analysis import Analysis
from captum_chains.export.build import Builder, shallow_clone
from captum_chains.export.rules import (
    ChannelInfo,
    Decline,
    Layout,
    Mask,
    Needs,
    Rule,
    expand_mask,
    register_module_rule,
)
from captum_chains.units.head_core import HeadCore

__all__ = ["HeadCore", "HeadCoreRule"]


# ---------------------------------------------------------------------------- rule
class HeadCoreRule(Rule):
    """Channel semantics of :class:`HeadCore`: heads are cut whole.

    * non-zero: output channel ``(h, d)`` is zero exactly when v channel ``(h, d)`` is;
    * needed: every needed output channel of head ``h`` reads all q, k and v channels of
      head ``h`` (q and k enter the softmax of the head, v its product);
    * build: a HeadCore with the heads that have a needed, non-zero output, reading
      their q, k and v channels from the (sliced) projection.
    """

    leaf = True
    name = "attention heads"

    @staticmethod
    def _width(analysis: Analysis, node: fx.Node) -> tuple[int, int]:
        core: Any = analysis.module(node)
        return int(core.num_heads), int(core.head_dim)

    def info(self, analysis: Analysis, node: fx.Node) -> ChannelInfo | None:
        h, d = self._width(analysis, node)
        x: Any = node.args[0]
        shape, out = analysis.shape(x), analysis.shape(node)
        if shape is None or out is None or len(out) != 3:
            raise Decline
        if analysis.has_channels(x):
            info = analysis.info[x]
            assert info is not None
            if info.dim != len(shape) - 1 or info.width != 1 or info.size != 3 * h * d:
                raise Decline
        return ChannelInfo(2, h * d)

    def nonzero(self, analysis: Analysis, node: fx.Node) -> torch.Tensor:
        h, d = self._width(analysis, node)
        nz = analysis.nonzero_of(node.args[0])
        if nz is None:
            return torch.ones(h * d, dtype=torch.bool)
        return nz[2 * h * d :].clone()

    def needed(self, analysis: Analysis, node: fx.Node, out_needed: Mask) -> Needs:
        h, d = self._width(analysis, node)
        heads = expand_mask(out_needed, h * d).view(h, d).any(1)
        if not bool(heads.any()):
            return {}
        x: Any = node.args[0]
        result: Needs = {inp: True for inp in node.all_input_nodes if inp is not x}
        result[x] = heads.repeat_interleave(d).repeat(3) if analysis.has_channels(x) else True
        return result

    def build(self, analysis: Analysis, builder: Builder, node: fx.Node) -> Layout:
        h, d = self._width(analysis, node)
        layout = analysis.layout[node]
        real = layout[layout >= 0]
        heads = sorted({int(c) // d for c in real.tolist()})
        if not heads:
            heads = [0]  # nothing reads the values: keep one head to define the shape
        keep = torch.tensor(heads)
        channels = (keep.view(-1, 1) * d + torch.arange(d)).reshape(-1)
        x = node.args[0]
        required = torch.cat([channels + part * h * d for part in range(3)])
        x_new = builder.value(x, required if analysis.has_channels(x) else None)
        if not analysis.has_channels(x):
            x_new = builder.graph.call_method(
                "index_select", (x_new, -1, _long_attr(builder, required))
            )
        core: Any = shallow_clone(analysis.module(node))
        core.num_heads = len(heads)
        rest = fx.node.map_arg(tuple(node.args[1:]), lambda n: builder.value(n, None))
        kwargs = fx.node.map_arg(dict(node.kwargs), lambda n: builder.value(n, None))
        new = builder.emit(node, (x_new, *rest), kwargs, module=core)
        return builder.set(node, new, channels)


def _long_attr(builder: Builder, index: torch.Tensor) -> fx.Node:
    name = builder.unique("vit_head_index")
    builder.root[name] = index.clone()
    return builder.graph.get_attr(name)


def _register() -> None:
    register_module_rule(HeadCore, HeadCoreRule())


_register()
