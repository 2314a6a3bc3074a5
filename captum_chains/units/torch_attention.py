"""PyTorch's own transformers: ``nn.MultiheadAttention`` and torchvision's ViT.

The only module that knows their names. It registers, in :mod:`captum_chains.units.adapters`:
the ``"mha"`` site hook that scores the heads of ``nn.MultiheadAttention`` (their outputs
exist only inside ``F.multi_head_attention_forward``), the patch embedding of
torchvision's ``VisionTransformer``, and, for the export, the canonical form
``in_proj -> HeadCore -> out_proj`` and where the ``"mha"`` scores act in it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from captum_chains._utils.hooks import this_thread_only
from captum_chains.units.adapters import (
    ATTENTION_HEADS,
    CANONICALIZERS,
    PATCH_EMBEDDINGS,
    SITE_HOOKS,
    SITE_RESOLVERS,
    TOKEN_PREFIXES,
    PatchGeometry,
    TokenPrefix,
    as_pair,
    register,
)
from captum_chains.units.base import UnitLayer
from captum_chains.units.head_core import HeadCore

__all__ = [
    "MHA_HOOK",
    "CanonicalMultiheadAttention",
    "canonical_multihead_attention",
    "mha_head_outputs",
    "multihead_heads",
    "register_mha_head_hook",
    "resolve_mha_site",
]

MHA_HOOK = "mha"
"""Name of the site hook that scores the heads of ``nn.MultiheadAttention``."""


def mha_head_outputs(
    module: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
) -> torch.Tensor:
    """Concatenated head outputs of ``nn.MultiheadAttention``, batch first ``[B, L, E]``.

    Recomputed from the module's own weights (eval mode: no dropout); this is the tensor
    that ``out_proj`` multiplies inside ``F.multi_head_attention_forward``.
    """
    if not module.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    e, h = module.embed_dim, module.num_heads
    if module._qkv_same_embed_dim:
        w_q, w_k, w_v = module.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    b_q = b_k = b_v = None
    if module.in_proj_bias is not None:
        b_q, b_k, b_v = module.in_proj_bias.chunk(3)
    q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    d = e // h
    q = q.reshape(b, lq, h, d).transpose(1, 2)
    k = k.reshape(b, lk, h, d).transpose(1, 2)
    v = v.reshape(b, lk, h, d).transpose(1, 2)
    z = F.scaled_dot_product_attention(q, k, v)
    return z.transpose(1, 2).reshape(b, lq, e)


def register_mha_head_hook(
    module: nn.Module, transform: Callable[[torch.Tensor], torch.Tensor]
) -> RemovableHandle:
    """Score the heads of an ``nn.MultiheadAttention`` through a forward hook.

    ``transform`` maps the batch-first concatenated head outputs ``z`` ``[B, L, E]`` to
    their scored version ``S * z`` (what the masking context does at an ``"input"`` site).
    The hook returns ``out + out_proj.weight @ (S * z - z)``, the module's output with each
    head's contribution scaled by its score; it is exact (zero correction) for scores 1.

    Raises
    ------
    ValueError
        At call time, for masks, key/value biases or zero-attention, which the head
        recomputation does not implement.
    """
    if not isinstance(module, nn.MultiheadAttention):
        raise TypeError(f"the 'mha' site hook needs nn.MultiheadAttention, got {type(module)}")

    def hook(
        mod: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        for unsupported in ("key_padding_mask", "attn_mask"):
            if bound.get(unsupported) is not None:
                raise ValueError(
                    f"scoring the heads of nn.MultiheadAttention with {unsupported} is not "
                    "supported; run without masks or score MLP neurons only (layers=...)"
                )
        if bound.get("is_causal"):
            raise ValueError("scoring the heads of a causal nn.MultiheadAttention is not supported")
        attn_output, weights = output
        z = mha_head_outputs(mod, bound["query"], bound["key"], bound["value"])
        delta = F.linear(transform(z) - z, mod.out_proj.weight)
        if not mod.batch_first:
            delta = delta.transpose(0, 1)
        return attn_output + delta, weights

    return module.register_forward_hook(this_thread_only(hook, module), with_kwargs=True)


def multihead_heads(
    module: nn.Module, input_shape: tuple[int, ...]
) -> tuple[str | None, int, int, tuple[int, ...]] | None:
    """``(site hook or None, heads, head_dim, token dims)`` of an ``nn.MultiheadAttention``.

    ``None`` for other modules. The hook is ``None`` when the heads cannot be scored (key
    and value biases or zero-attention, which :func:`mha_head_outputs` does not compute).
    """
    if not isinstance(module, nn.MultiheadAttention):
        return None
    spatial = input_shape[1:-1] if module.batch_first else input_shape[:1]
    plain = module.bias_k is None and not module.add_zero_attn
    return (MHA_HOOK if plain else None), module.num_heads, module.head_dim, tuple(spatial)


def torchvision_patch_embedding(module: nn.Module) -> PatchGeometry | None:
    """Patch geometry of torchvision's ``VisionTransformer`` (its ``conv_proj``), else None."""
    conv = getattr(module, "conv_proj", None)
    patch = as_pair(getattr(module, "patch_size", None))
    if not isinstance(conv, nn.modules.conv._ConvNd) or patch is None:
        return None
    if not hasattr(module, "image_size") or hasattr(module, "strict_img_size"):
        return None
    return as_pair(module.image_size), patch, True, False


def torchvision_token_prefix(model: nn.Module) -> TokenPrefix | None:
    """torchvision's ``VisionTransformer`` reads its ``class_token``, else ``None``."""
    token = getattr(model, "class_token", None)
    if not isinstance(token, torch.Tensor):
        return None
    return True, 0, None


# ---------------------------------------------------------------------------- export
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


def canonical_multihead_attention(module: nn.Module) -> nn.Module | None:
    """:class:`CanonicalMultiheadAttention` for a plain self-attention ``nn.MultiheadAttention``.

    An export canonicalizer: it runs on the export's private copy only.
    """
    if type(module) is not nn.MultiheadAttention:
        return None
    plain = (
        module._qkv_same_embed_dim
        and module.bias_k is None
        and not module.add_zero_attn
        and module.in_proj_weight is not None
    )
    return CanonicalMultiheadAttention(module) if plain else None


def resolve_mha_site(unit: UnitLayer) -> tuple[str, str] | None:
    """Export site of a unit scored at the ``"mha"`` hook, else ``None``.

    The heads act at the input of ``<site>.out_proj`` in
    :class:`CanonicalMultiheadAttention`.
    """
    if unit.hook == MHA_HOOK:
        return f"{unit.site}.out_proj", "input"
    return None


SITE_HOOKS.setdefault(MHA_HOOK, register_mha_head_hook)
register(ATTENTION_HEADS, multihead_heads)
register(PATCH_EMBEDDINGS, torchvision_patch_embedding)
register(TOKEN_PREFIXES, torchvision_token_prefix)
register(CANONICALIZERS, canonical_multihead_attention)
register(SITE_RESOLVERS, resolve_mha_site)
