"""Export of vision-transformer sub-networks: drop heads and MLP neurons, remove branches.

A SubNetwork multiplies each head's output by its score before the attention's output
projection, each MLP hidden neuron by its score before ``fc2``, each embedding channel
by its score, and each closed residual branch by 0 (``H + 0 * F(H)``, Eq. 7 of the
NeuroChains paper with the residual stream as ``H``). This module builds the same
function with physically smaller layers, working in place on a *copy* of the model:

* **heads** -- scores are folded into the projection's input columns
  (``W[:, head] * s``); removed heads are cut out of ``qkv`` (their q, k and v rows), of
  the output gate if any, of ``proj`` (columns) and, for Swin, of the relative-position
  bias table, and ``num_heads`` shrinks. ``nn.MultiheadAttention`` cannot hold fewer
  heads than ``embed_dim / head_dim``, so it is replaced by
  :class:`PrunedMultiheadAttention` with the same call signature. Attention modules
  whose forward hard-codes the width (EVA, BEiT) or that normalise across heads
  (``scale_norm``) keep their width: removed heads get zero projection columns (exact,
  not smaller);
* **MLP neurons** -- scores folded into ``fc2``'s columns; removed neurons cut from
  ``fc1`` (both halves of a packed GLU ``fc1``; each of SwiGLU's ``fc1_g``/``fc1_x``) and
  ``fc2`` when only element-wise modules lie between them; otherwise zeroed columns;
* **embedding channels** -- folded into the producing conv/linear (or into the affine
  embedding norm when the score acts after it); they are channels of the residual
  stream and are never cut;
* **closed branch gates** -- the branch's first module (the attention or the MLP) and
  its last module are replaced by :class:`ZeroBranch`, so the block computes
  ``H + 0``; a whole attention or MLP with every unit removed becomes a
  :class:`ConstantTokens` that returns its output bias.

Entry points: :func:`export_vit_units` (the per-family hook for
:mod:`captum_chains.export`) and :func:`export_vit` (copy + export, for ViT-only models).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from captum_chains.units.base import GateSpec, ModelStructure, UnitLayer

__all__ = [
    "VIT_GATE_KINDS",
    "VIT_UNIT_KINDS",
    "ConstantTokens",
    "PrunedMultiheadAttention",
    "ZeroBranch",
    "export_vit",
    "export_vit_units",
]

VIT_UNIT_KINDS = frozenset({"head", "neuron", "channel"})
"""Unit kinds handled here."""
VIT_GATE_KINDS = frozenset({"branch"})
"""Gate kinds handled here."""


# ---------------------------------------------------------------------------- modules
class ZeroBranch(nn.Module):
    """A removed residual branch: returns zeros shaped like its first input.

    Returns ``(zeros, None)`` when it replaces an ``nn.MultiheadAttention`` (whose callers
    unpack a pair).
    """

    def __init__(self, pair: bool = False) -> None:
        super().__init__()
        self.pair = pair

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        zeros = torch.zeros_like(x)
        return (zeros, None) if self.pair else zeros

    def extra_repr(self) -> str:
        return "pair=True" if self.pair else ""


class ConstantTokens(nn.Module):
    """An attention or MLP with every unit removed: its output bias at every token."""

    def __init__(self, bias: torch.Tensor | None, width: int, pair: bool = False) -> None:
        super().__init__()
        self.width = width
        self.pair = pair
        value = bias.detach().clone() if bias is not None else torch.zeros(width)
        self.register_buffer("bias", value)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.bias.to(x.dtype).expand(*x.shape[:-1], self.width).clone()
        return (out, None) if self.pair else out

    def extra_repr(self) -> str:
        return f"width={self.width}"


class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` restricted to some heads, with scores folded in.

    Called like ``nn.MultiheadAttention`` (``query, key, value, ...``) and returns
    ``(output, None)``; masks and attention weights are not supported.
    """

    def __init__(self, source: nn.MultiheadAttention, keep: torch.Tensor, scores: torch.Tensor):
        super().__init__()
        hd = source.head_dim
        idx = _head_channels(keep, hd)
        self.num_heads = int(keep.numel())
        self.head_dim = hd
        self.embed_dim = source.embed_dim
        self.batch_first = source.batch_first
        if source._qkv_same_embed_dim:
            weights = source.in_proj_weight.detach().chunk(3)
        else:
            weights = (
                source.q_proj_weight.detach(),
                source.k_proj_weight.detach(),
                source.v_proj_weight.detach(),
            )
        biases = (
            source.in_proj_bias.detach().chunk(3)
            if source.in_proj_bias is not None
            else (None, None, None)
        )
        self.q_proj, self.k_proj, self.v_proj = (
            _linear_from(w[idx], None if b is None else b[idx]) for w, b in zip(weights, biases)
        )
        out = source.out_proj
        scale = scores.repeat_interleave(hd)[idx].to(out.weight.dtype)
        self.out_proj = _linear_from(
            out.weight.detach()[:, idx] * scale,
            None if out.bias is None else out.bias.detach(),
        )

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
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ValueError("PrunedMultiheadAttention does not support masks")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, lq, lk, h, d = (
            query.shape[0],
            query.shape[1],
            key.shape[1],
            self.num_heads,
            self.head_dim,
        )
        q = self.q_proj(query).reshape(b, lq, h, d).transpose(1, 2)
        k = self.k_proj(key).reshape(b, lk, h, d).transpose(1, 2)
        v = self.v_proj(value).reshape(b, lk, h, d).transpose(1, 2)
        z = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, lq, h * d)
        out = self.out_proj(z)
        return (out if self.batch_first else out.transpose(0, 1)), None

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"


# ---------------------------------------------------------------------------- helpers
def _linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device
    ).to(weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _head_channels(keep: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Channel indices of the kept heads in a head-major ``[heads * head_dim]`` layout."""
    offsets = torch.arange(head_dim, device=keep.device)
    return (keep.view(-1, 1) * head_dim + offsets).reshape(-1)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _elementwise(module: nn.Module) -> bool:
    """Modules that act on each hidden neuron separately (safe to slice through)."""
    if isinstance(module, (nn.Identity, nn.Dropout)):
        return True
    if isinstance(module, (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.GLU, nn.MultiheadAttention)):
        return False
    if list(module.parameters()) or list(module.buffers()) or list(module.children()):
        return False
    return type(module).__module__.startswith(("torch.nn.modules.activation", "timm.layers.act"))


def _is_timm_type(module: nn.Module, path: str, name: str) -> bool:
    try:
        import importlib

        cls = getattr(importlib.import_module(path), name)
    except (ImportError, AttributeError):
        return False
    return type(module) is cls


# ---------------------------------------------------------------------------- heads
def _export_heads(root: nn.Module, unit: UnitLayer, scores: torch.Tensor) -> None:
    attn = root.get_submodule(unit.name)
    keep = torch.nonzero(scores > 0).flatten()
    if bool((scores == 1).all()):
        return
    if isinstance(attn, nn.MultiheadAttention):
        if keep.numel() == 0:
            out = attn.out_proj
            _set_submodule(root, unit.name, ConstantTokens(out.bias, out.out_features, pair=True))
        else:
            _set_submodule(root, unit.name, PrunedMultiheadAttention(attn, keep, scores))
        return
    proj = root.get_submodule(unit.site)
    assert isinstance(proj, nn.Linear)
    if keep.numel() == 0:
        _set_submodule(root, unit.name, ConstantTokens(proj.bias, proj.out_features))
        return
    hd = unit.unit_width
    with torch.no_grad():
        proj.weight.mul_(scores.repeat_interleave(hd).to(proj.weight.dtype))
    if keep.numel() == unit.size or not _sliceable_attention(attn):
        return
    idx = _head_channels(keep, hd)
    width = unit.size * hd
    qkv = attn.qkv
    rows = torch.cat([idx + part * width for part in range(3)])
    attn.qkv = _linear_from(
        qkv.weight.detach()[rows], None if qkv.bias is None else qkv.bias.detach()[rows]
    )
    gate = getattr(attn, "gate", None)
    if isinstance(gate, nn.Linear):
        attn.gate = _linear_from(
            gate.weight.detach()[idx], None if gate.bias is None else gate.bias.detach()[idx]
        )
    _set_submodule(
        root,
        unit.site,
        _linear_from(
            proj.weight.detach()[:, idx], None if proj.bias is None else proj.bias.detach()
        ),
    )
    table = getattr(attn, "relative_position_bias_table", None)
    if isinstance(table, nn.Parameter):
        attn.relative_position_bias_table = nn.Parameter(
            table.detach()[:, keep].clone(), requires_grad=table.requires_grad
        )
    attn.num_heads = int(keep.numel())
    if hasattr(attn, "attn_dim"):
        attn.attn_dim = int(idx.numel())


def _sliceable_attention(attn: nn.Module) -> bool:
    """Attention types whose forward reads its width from ``num_heads`` and the weights."""
    plain = _is_timm_type(attn, "timm.models.vision_transformer", "Attention") or _is_timm_type(
        attn, "timm.models.swin_transformer", "WindowAttention"
    )
    if not plain or not isinstance(getattr(attn, "qkv", None), nn.Linear):
        return False
    norm = getattr(attn, "norm", None)
    return norm is None or isinstance(norm, nn.Identity)


# ---------------------------------------------------------------------------- neurons
def _export_neurons(root: nn.Module, unit: UnitLayer, scores: torch.Tensor) -> None:
    if bool((scores == 1).all()):
        return
    fc2 = root.get_submodule(unit.site)
    assert isinstance(fc2, nn.Linear)
    container_name = unit.site.rpartition(".")[0]
    container = root.get_submodule(container_name) if container_name else root
    keep = torch.nonzero(scores > 0).flatten()
    if keep.numel() == 0:
        _set_submodule(root, container_name, ConstantTokens(fc2.bias, fc2.out_features))
        return
    with torch.no_grad():
        fc2.weight.mul_(scores.to(fc2.weight.dtype))
    if keep.numel() == unit.size:
        return
    firsts = _first_linears(container, fc2, unit.size)
    if firsts is None:
        return
    for child, layer, halves in firsts:
        rows = keep if halves == 1 else torch.cat([keep, keep + unit.size])
        new = _linear_from(
            layer.weight.detach()[rows], None if layer.bias is None else layer.bias.detach()[rows]
        )
        setattr(container, child, new)
    fc2_child = unit.site.rpartition(".")[2]
    setattr(
        container,
        fc2_child,
        _linear_from(fc2.weight.detach()[:, keep], None if fc2.bias is None else fc2.bias.detach()),
    )


def _first_linears(
    container: nn.Module, fc2: nn.Linear, hidden: int
) -> list[tuple[str, nn.Linear, int]] | None:
    """The linears producing the hidden neurons (with 1 or 2 halves), or None if unsafe."""
    found = []
    for child, module in container.named_children():
        if module is fc2:
            continue
        if isinstance(module, nn.Linear):
            if module.out_features == hidden:
                found.append((child, module, 1))
            elif module.out_features == 2 * hidden and _is_timm_type(
                container, "timm.layers.mlp", "GluMlp"
            ):
                found.append((child, module, 2))
            else:
                return None
        elif not _elementwise(module):
            return None
    return found or None


# ---------------------------------------------------------------------------- channels
def _export_channels(root: nn.Module, unit: UnitLayer, scores: torch.Tensor) -> None:
    if bool((scores == 1).all()):
        return
    target = root.get_submodule(unit.site)
    with torch.no_grad():
        if unit.site == unit.name:
            # conv filters (dim 0 of the weight) or linear rows: output channel c * s_c
            weight = target.weight  # type: ignore[union-attr]
            shape = [-1] + [1] * (weight.ndim - 1)
            weight.mul_(scores.to(weight.dtype).view(shape))
            bias = getattr(target, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.mul_(scores.to(bias.dtype))
            return
        weight = getattr(target, "weight", None)
        bias = getattr(target, "bias", None)
        if isinstance(weight, torch.Tensor) and weight.shape == scores.shape:
            weight.mul_(scores.to(weight.dtype))
            if isinstance(bias, torch.Tensor):
                bias.mul_(scores.to(bias.dtype))
            return
    _set_submodule(root, unit.site, nn.Sequential(target, _ChannelScale(scores, unit.channel_dim)))


class _ChannelScale(nn.Module):
    def __init__(self, scores: torch.Tensor, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("scores", scores.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.ndim
        shape[self.dim] = -1
        return x * self.scores.view(shape).to(x.dtype)


# ---------------------------------------------------------------------------- gates
def _remove_branch(root: nn.Module, gate: GateSpec) -> None:
    for name in dict.fromkeys((gate.start, gate.end)):
        module = root.get_submodule(name)
        pair = isinstance(module, (nn.MultiheadAttention, PrunedMultiheadAttention)) or (
            isinstance(module, ConstantTokens) and module.pair
        )
        _set_submodule(root, name, ZeroBranch(pair=pair))


# ---------------------------------------------------------------------------- entry points
def export_vit_units(
    model_copy: nn.Module,
    structure: ModelStructure,
    importance: Mapping[str, torch.Tensor],
    closed_gates: Iterable[str] = (),
) -> set[str]:
    """Shrink the ViT units of ``model_copy`` in place and remove its closed branches.

    Parameters
    ----------
    model_copy : nn.Module
        A deep copy of the model the structure was discovered on (it is modified).
    structure : ModelStructure
        The SubNetwork's structure.
    importance : mapping of str to Tensor
        Final score of every unit (0 = removed), as ``SubNetwork.importance``.
    closed_gates : iterable of str
        Names of the closed gates, as ``SubNetwork.removed_gates``.

    Returns
    -------
    set of str
        Names of the unit layers and gates handled here (kinds ``head``, ``neuron``,
        ``channel`` and gate kind ``branch``); the caller handles the others.
    """
    closed = set(closed_gates)
    handled: set[str] = set()
    removed_units: set[str] = set()
    for gate in structure.gates:
        if gate.kind in VIT_GATE_KINDS:
            handled.add(gate.name)
            if gate.name in closed:
                removed_units.update(gate.units)
    for unit in structure.units:
        if unit.kind not in VIT_UNIT_KINDS:
            continue
        handled.add(unit.name)
        if unit.name in removed_units:
            continue
        scores = importance[unit.name].detach().float().reshape(-1)
        if unit.kind == "head":
            _export_heads(model_copy, unit, scores)
        elif unit.kind == "neuron":
            _export_neurons(model_copy, unit, scores)
        else:
            _export_channels(model_copy, unit, scores)
    for gate in structure.gates:
        if gate.kind in VIT_GATE_KINDS and gate.name in closed:
            _remove_branch(model_copy, gate)
    return handled


def export_vit(subnetwork: Any) -> nn.Module:
    """A standalone, smaller copy of a ViT SubNetwork's model (in eval mode).

    Raises
    ------
    ValueError
        If the structure holds units or gates that are not ViT units (e.g. the conv
        filters of a hybrid ViT); use :func:`captum_chains.export.export_subnetwork`.
    """
    structure: ModelStructure = subnetwork.structure
    others = [u.name for u in structure.units if u.kind not in VIT_UNIT_KINDS]
    others += [g.name for g in structure.gates if g.kind not in VIT_GATE_KINDS]
    if others:
        raise ValueError(
            f"export_vit handles ViT heads, neurons, channels and branch gates only, but the "
            f"structure also has {others[:3]}; use captum_chains.export.export_subnetwork"
        )
    model_copy = copy.deepcopy(subnetwork.model)
    export_vit_units(model_copy, structure, subnetwork.importance, subnetwork.removed_gates)
    return model_copy.eval()
