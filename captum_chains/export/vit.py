"""Vision transformers in the export: attention heads the channel surgery can cut.

The export (:mod:`captum_chains.export`) traces a copy of the model with ``torch.fx``
and follows channels through the graph. Inside an attention module the heads are
hidden behind ``reshape``/``permute``/``unbind`` and the attention product, where no
channel can be followed, so ``qkv`` would stay at full width. This module makes the
heads visible:

* a *canonicalizer* (added to :data:`captum_chains.export.tracing.CANONICALIZERS`)
  rewrites, in the export's private copy only, timm's ``Attention`` and
  ``nn.MultiheadAttention`` into the same computation with one leaf operation,
  :class:`HeadCore`: ``[B, N, 3 * heads * head_dim]`` (the ``qkv`` projection) ->
  ``[B, N, heads * head_dim]`` (the concatenated head outputs). The children that unit
  sites and gates name (``qkv``, ``proj``, ``norm``; ``out_proj``) keep their names;
* :class:`HeadCoreRule` tells the surgery that output channel ``(h, d)`` is zero exactly
  when value channel ``(h, d)`` is (softmax weights are positive), and that a needed
  output channel of head ``h`` reads the q, k and v channels of head ``h``. A head whose
  score is 0 is then not needed by ``proj``, so the surgery drops its rows of ``qkv``,
  its columns of ``proj`` and the head itself (``num_heads`` shrinks).

MLP neurons (rows of ``fc1``, columns of ``fc2``), embedding channels (scores folded
into the patch-embedding conv) and closed branch gates (the branch is not computed,
``H + 0``) need nothing ViT-specific: the generic rules handle them.

``nn.MultiheadAttention`` heads are scored at the unit hook ``"mha"``
(:mod:`captum_chains.units.vit`); in the canonical form that is the input of
``<site>.out_proj``: :func:`resolve_mha_site` (a site resolver) tells the export.
Attention modules not listed above (EVA, BEiT, Swin, ...) are traced as they are: the
export stays exact, with their heads kept at full width.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from captum_chains._utils.optional import loaded_class
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
from captum_chains.export.tracing import CANONICALIZERS, SITE_RESOLVERS
from captum_chains.units.base import UnitLayer
from captum_chains.units.vit import MHA_HOOK

__all__ = [
    "CanonicalAttention",
    "CanonicalMultiheadAttention",
    "HeadCore",
    "HeadCoreRule",
    "canonical_attention",
    "resolve_mha_site",
]


# ---------------------------------------------------------------------------- modules
class HeadCore(nn.Module):
    """Multi-head attention from a packed projection: ``[B, N, 3*H*D] -> [B, N, H*D]``.

    The input holds q, k and v of every head, head-major inside each part (the layout of
    timm's ``qkv`` and of ``nn.MultiheadAttention``'s ``in_proj``); the output holds the
    concatenated head outputs, head-major. Per-head ``q_norm``/``k_norm`` (timm) act on
    each head's q and k. The export traces this module as one operation.

    Parameters
    ----------
    num_heads, head_dim : int
        Heads and channels per head.
    scale : float
        Logit scale (``head_dim ** -0.5`` unless the source says otherwise).
    fused : bool
        Use ``F.scaled_dot_product_attention`` (as timm's ``fused_attn``) or the explicit
        softmax product, matching the source module's arithmetic.
    q_norm, k_norm : nn.Module, optional
        Normalizations of each head's q and k.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale: float,
        fused: bool = True,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.fused = fused
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()

    def forward(
        self,
        qkv: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        b, n = qkv.shape[0], qkv.shape[1]
        h, d = self.num_heads, self.head_dim
        q, k, v = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused or attn_mask is not None or is_causal:
            # timm passes no scale; an explicit one only when the source's differs
            extra: dict[str, Any] = {} if self.scale == d**-0.5 else {"scale": self.scale}
            z = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal, **extra
            )
        else:
            att = (q * self.scale) @ k.transpose(-2, -1)
            z = att.softmax(dim=-1) @ v
        return z.transpose(1, 2).reshape(b, n, h * d)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, fused={self.fused}"


class CanonicalAttention(nn.Module):
    """timm ``Attention`` as ``qkv -> HeadCore -> norm -> (gate) -> proj -> proj_drop``."""

    def __init__(self, source: Any) -> None:
        super().__init__()
        self.qkv = source.qkv
        self.core = HeadCore(
            source.num_heads,
            source.head_dim,
            float(source.scale),
            bool(source.fused_attn),
            source.q_norm,
            source.k_norm,
        )
        self.norm = source.norm
        self.gate = getattr(source, "gate", None)
        self.proj = source.proj
        self.proj_drop = source.proj_drop

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        z = self.norm(self.core(self.qkv(x), attn_mask, is_causal))
        if self.gate is not None:
            z = z * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(z))


class CanonicalMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (self-attention, no masks) as ``in_proj -> HeadCore -> out_proj``.

    Called like ``nn.MultiheadAttention`` and returns ``(output, None)``. It reads only
    ``query`` (``key`` and ``value`` must be the same tensor, as in ViTs); the export
    checks the result against the SubNetwork, so other uses fail loudly.
    """

    def __init__(self, source: nn.MultiheadAttention) -> None:
        super().__init__()
        self.batch_first = source.batch_first
        self.in_proj = nn.Linear(
            source.embed_dim, 3 * source.embed_dim, bias=source.in_proj_bias is not None
        )
        self.in_proj.weight = source.in_proj_weight
        if source.in_proj_bias is not None:
            self.in_proj.bias = source.in_proj_bias
        head_dim = source.head_dim
        self.core = HeadCore(source.num_heads, head_dim, head_dim**-0.5, fused=True)
        self.out_proj = source.out_proj

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        x = query if self.batch_first else query.transpose(0, 1)
        out = self.out_proj(self.core(self.in_proj(x)))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _timm_attention_type() -> type | None:
    """timm's ViT ``Attention`` class, or None while no model has imported timm."""
    return loaded_class("timm.models.vision_transformer", "Attention")


def canonical_attention(module: Any) -> nn.Module | None:
    """The canonical form of a supported attention module, else ``None``.

    Used as an export canonicalizer: it runs on the export's private copy only.
    """
    timm_attention = _timm_attention_type()
    if timm_attention is not None and type(module) is timm_attention:
        module = cast(Any, module)
        if module.qkv.out_features != 3 * module.num_heads * module.head_dim:
            return None
        return CanonicalAttention(module)
    if type(module) is nn.MultiheadAttention:
        plain = (
            module._qkv_same_embed_dim
            and module.bias_k is None
            and not module.add_zero_attn
            and module.in_proj_weight is not None
        )
        return CanonicalMultiheadAttention(module) if plain else None
    return None


def resolve_mha_site(unit: UnitLayer) -> tuple[str, str] | None:
    """Export site of a unit scored at the ``"mha"`` hook, else ``None``.

    The heads of ``nn.MultiheadAttention`` act at the input of ``<site>.out_proj`` in
    :class:`CanonicalMultiheadAttention` (registered in
    :data:`captum_chains.export.tracing.SITE_RESOLVERS`).
    """
    if unit.hook == MHA_HOOK:
        return f"{unit.site}.out_proj", "input"
    return None


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
    if canonical_attention not in CANONICALIZERS:
        CANONICALIZERS.append(canonical_attention)
    if resolve_mha_site not in SITE_RESOLVERS:
        SITE_RESOLVERS.append(resolve_mha_site)


_register()
