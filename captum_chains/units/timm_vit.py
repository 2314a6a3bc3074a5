"""timm's vision transformers: their ``PatchEmbed`` and ``Attention``.

The only module that knows their names. It registers, in :mod:`captum_chains.units.adapters`,
the patch geometry of timm's patch embeddings (for the input check), the class and register
tokens of timm's ViTs (for :func:`~captum_chains.units.vit.token_layout`) and, for the export,
the canonical form ``qkv -> HeadCore -> norm -> proj`` of timm's ``Attention``. Nothing
here imports timm: a model that uses timm has already imported it.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from captum_chains._utils.optional import loaded_class
from captum_chains.units.adapters import (
    CANONICALIZERS,
    PATCH_EMBEDDINGS,
    TOKEN_PREFIXES,
    PatchGeometry,
    TokenPrefix,
    as_pair,
    register,
)
from captum_chains.units.head_core import HeadCore

__all__ = [
    "CanonicalAttention",
    "canonical_timm_attention",
    "timm_patch_embedding",
    "timm_token_prefix",
]


def timm_patch_embedding(module: nn.Module) -> PatchGeometry | None:
    """Patch geometry of timm's ``PatchEmbed`` and its relatives (``strict_img_size``)."""
    conv = getattr(module, "proj", None)
    patch = as_pair(getattr(module, "patch_size", None))
    if not isinstance(conv, nn.modules.conv._ConvNd) or patch is None:
        return None
    if not hasattr(module, "strict_img_size"):
        return None
    return (
        as_pair(getattr(module, "img_size", None)),
        patch,
        bool(module.strict_img_size),
        bool(getattr(module, "dynamic_img_pad", False)),
    )


def timm_token_prefix(model: nn.Module) -> TokenPrefix | None:
    """Class token, register tokens and pooling of a timm ViT (``cls_token``,
    ``num_reg_tokens``, ``global_pool``), else ``None``."""
    if not hasattr(model, "cls_token") and not hasattr(model, "global_pool"):
        return None
    pool = getattr(model, "global_pool", None)
    registers = int(getattr(model, "num_reg_tokens", 0) or 0)
    class_token = isinstance(getattr(model, "cls_token", None), torch.Tensor)
    return class_token, registers, pool if isinstance(pool, str) and pool else None


# ---------------------------------------------------------------------------- export
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
        norm = getattr(source, "norm", None)  # absent in timm 1.0.3
        self.norm = nn.Identity() if norm is None else norm
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


def canonical_timm_attention(module: nn.Module) -> nn.Module | None:
    """:class:`CanonicalAttention` for timm's ViT ``Attention`` with packed ``qkv``, else None.

    An export canonicalizer: it runs on the export's private copy only.
    """
    timm_attention = loaded_class("timm.models.vision_transformer", "Attention")
    if timm_attention is None or type(module) is not timm_attention:
        return None
    source = cast(Any, module)
    if source.qkv.out_features != 3 * source.num_heads * source.head_dim:
        return None
    return CanonicalAttention(source)


register(PATCH_EMBEDDINGS, timm_patch_embedding)
register(TOKEN_PREFIXES, timm_token_prefix)
register(CANONICALIZERS, canonical_timm_attention)
