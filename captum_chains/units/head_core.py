"""The canonical form of multi-head attention: one module from packed q/k/v to head outputs.

Family modules rewrite their attention into ``qkv -> HeadCore -> proj`` in the export's
private copy (:mod:`~captum_chains.units.timm_vit`,
:mod:`~captum_chains.units.torch_attention`); the export cuts heads at
:class:`HeadCore` (``captum_chains/export/vit.py``) and the chain graph reads head flows
through it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HeadCore"]


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
