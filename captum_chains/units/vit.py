"""Vision-transformer adapter: attention heads, MLP neurons, embedding channels, branch gates.

Registers the ViT adapter and its input check; exports :func:`token_layout` /
:class:`TokenLayout`. Units are found from module types, the family rules of
:mod:`captum_chains.units.adapters` (patch embeddings, attention modules) and the recorded
dataflow, never from names or a hard-coded token grid; the rules are in
``docs/architecture.md`` ("Vision transformers").
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from captum_chains.units.adapters import (
    ADAPTERS,
    ATTENTION_HEADS,
    INPUT_CHECKS,
    PATCH_EMBEDDINGS,
    TOKEN_PREFIXES,
    AdapterResult,
    register,
)
from captum_chains.units.base import GateSpec, UnitLayer
from captum_chains.units.trace import FunctionCall, ModuleCall, Trace

_ADD_OPS = frozenset({"add", "add_", "__add__", "__iadd__", "__radd__"})
_NORMS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.RMSNorm,
)


# ---------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class TokenLayout:
    """How a ViT lays out its tokens, read from the model and one forward pass.

    Attributes
    ----------
    num_tokens : int
        Tokens entering the first transformer block.
    num_prefix_tokens : int
        Tokens before the patch tokens (class, distillation and register tokens).
    class_token : bool
        Whether the first prefix token is a class token.
    num_registers : int
        Register tokens among the prefix tokens.
    grid : tuple of int
        Patch grid ``(rows, cols)`` produced by the patch embedding.
    pool : str
        How the classifier reads the tokens: ``"token"`` (class token), ``"avg"``,
        ``"max"``, ``"map"`` (attention pooling), ... as the model names it.
    """

    num_tokens: int
    num_prefix_tokens: int
    class_token: bool
    num_registers: int
    grid: tuple[int, int]
    pool: str

    def patch_slice(self) -> slice:
        """Indices of the patch tokens along the token dimension."""
        return slice(self.num_prefix_tokens, self.num_prefix_tokens + self.grid[0] * self.grid[1])


def token_layout(model: nn.Module, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> TokenLayout:
    """The token layout of a ViT on inputs of this shape (one traced forward pass).

    The grid is the patch embedding's output size and the prefix is whatever the model
    puts in front of the patch tokens, so DeiT's distillation token, register tokens and
    any input size are read, not assumed.

    Raises
    ------
    ValueError
        If the model has no patch embedding followed by transformer blocks.
    """
    from captum_chains._utils.model_state import eval_mode
    from captum_chains.units.trace import trace_forward

    items = inputs if isinstance(inputs, tuple) else (inputs,)
    check_vit_input(model, items)
    with eval_mode(model):
        trace = trace_forward(model, tuple(x[:1] for x in items))
    blocks = _transformer_blocks(model, trace)
    embed = _patch_embedding(model, trace, blocks)
    if not blocks or embed is None or embed.output_shape is None or len(embed.output_shape) < 4:
        raise ValueError(
            f"{type(model).__name__} has no patch embedding followed by transformer blocks; "
            "token_layout() describes ViTs only"
        )
    first = min((trace.calls[b][0] for b in blocks), key=lambda c: c.start)
    assert first.input_shape is not None
    grid = (int(embed.output_shape[-2]), int(embed.output_shape[-1]))
    num_tokens = int(first.input_shape[1]) if len(first.input_shape) == 3 else grid[0] * grid[1]
    prefix = num_tokens - grid[0] * grid[1] if len(first.input_shape) == 3 else 0
    class_token, registers, pool = next(
        (found for rule in TOKEN_PREFIXES if (found := rule(model)) is not None),
        (False, 0, None),
    )
    if not pool:
        pool = "token" if class_token else "avg"
    return TokenLayout(num_tokens, prefix, class_token, registers, grid, pool)


# ---------------------------------------------------------------------------- input check
def check_vit_input(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Raise ``ValueError`` if a patch embedding of ``model`` cannot take ``inputs``.

    timm's ``PatchEmbed`` (with a fixed ``img_size``) and torchvision's
    ``VisionTransformer`` otherwise fail with an ``AssertionError`` deep in the forward.
    """
    x = inputs[0] if inputs else None
    for name, module in model.named_modules():
        expected, patch, strict, pad = _patch_geometry(module)
        if patch is None:
            continue
        where = f"the patch embedding {name or type(model).__name__!r}"
        if x is None or x.ndim != 4:
            got = None if x is None else tuple(x.shape)
            raise ValueError(
                f"inputs have shape {got} but {where} of {type(model).__name__} needs image "
                "batches [N, C, H, W]"
            )
        size = (int(x.shape[-2]), int(x.shape[-1]))
        if strict and expected is not None and size != expected:
            raise ValueError(
                f"inputs are {size[0]}x{size[1]} images but {where} of "
                f"{type(model).__name__} takes only {expected[0]}x{expected[1]} images "
                f"(patch size {patch[0]}x{patch[1]}); resize the inputs to "
                f"{expected[0]}x{expected[1]} (e.g. torch.nn.functional.interpolate), or build "
                "a timm model with dynamic_img_size=True"
            )
        if not pad and (size[0] % patch[0] or size[1] % patch[1]):
            raise ValueError(
                f"inputs are {size[0]}x{size[1]} images but {where} of "
                f"{type(model).__name__} cuts {patch[0]}x{patch[1]} patches and needs sides "
                f"divisible by the patch size; resize or pad the inputs"
            )


def _patch_geometry(
    module: nn.Module,
) -> tuple[tuple[int, int] | None, tuple[int, int] | None, bool, bool]:
    """(image size, patch size, strict size?, pads?) of a patch embedding, else Nones."""
    for rule in PATCH_EMBEDDINGS:
        found = rule(module)
        if found is not None:
            return found
    return None, None, False, False


# ---------------------------------------------------------------------------- discovery
@dataclass(frozen=True)
class _Attention:
    """An attention module; ``hook`` is ``None`` when its heads cannot be scored."""

    name: str
    module: nn.Module
    site: str
    hook: str | None
    num_heads: int
    head_dim: int
    spatial: tuple[int, ...]


def _direct_children(model: nn.Module, name: str) -> list[str]:
    module = model.get_submodule(name) if name else model
    prefix = f"{name}." if name else ""
    return [prefix + child for child, _ in module.named_children()]


def _attention(model: nn.Module, trace: Trace, name: str, module: nn.Module) -> _Attention | None:
    call = trace.single_call(name)
    if call is None or call.input_shape is None:
        return None
    for rule in ATTENTION_HEADS:  # e.g. nn.MultiheadAttention (units/torch_attention.py)
        found = rule(module, call.input_shape)
        if found is not None:
            hook, num_heads, head_dim, spatial = found
            return _Attention(name, module, name, hook, num_heads, head_dim, spatial)
    heads = getattr(module, "num_heads", None)
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
        return None
    linears = [
        c for c in _direct_children(model, name) if isinstance(model.get_submodule(c), nn.Linear)
    ]
    if not linears:
        return None
    called = [(c, lc) for c in linears if (lc := trace.single_call(c)) is not None]
    if not called:
        # the module reads its linears' weights functionally (torchvision Swin): a block
        # with attention, whose heads no hook can reach
        return _Attention(name, module, name, None, heads, 0, ())
    proj_name, proj_call = max(called, key=lambda item: item[1].start)
    proj = model.get_submodule(proj_name)
    assert isinstance(proj, nn.Linear)
    width = proj.in_features
    declared = getattr(module, "head_dim", None)
    if isinstance(declared, int) and declared * heads == width:
        head_dim = declared
    elif width % heads:
        return None
    else:
        head_dim = width // heads
    shape = proj_call.input_shape
    if shape is None or len(shape) < 3 or shape[-1] != width:
        return None
    later = [
        c
        for child in _direct_children(model, name)
        for c in trace.calls.get(child, [])
        if c.start > proj_call.end
    ]
    if any(not isinstance(c.module, (nn.Dropout, nn.Identity)) for c in later):
        return None  # the projection is not the module's last step (e.g. fused parallel blocks)
    return _Attention(name, module, proj_name, "input", heads, head_dim, tuple(shape[1:-1]))


def _attentions(model: nn.Module, trace: Trace) -> list[_Attention]:
    found = []
    for name, module in model.named_modules():
        if name:
            att = _attention(model, trace, name, module)
            if att is not None:
                found.append(att)
    names = [a.name for a in found]
    # keep the innermost attention when candidates nest
    return [a for a in found if not any(o.startswith(a.name + ".") for o in names)]


def _own_adds(model: nn.Module, trace: Trace, name: str, call: ModuleCall) -> list[FunctionCall]:
    """Additions performed by the module's own forward (not inside a child module)."""
    spans = [
        (c.start, c.end)
        for child in _direct_children(model, name)
        for c in trace.calls.get(child, [])
    ]
    return [
        f
        for f in trace.functions
        if f.op in _ADD_OPS
        and call.start < f.index < call.end
        and not any(s < f.index < e for s, e in spans)
    ]


def _block_of(model: nn.Module, trace: Trace, attention: str) -> str | None:
    """The nearest shape-preserving ancestor of an attention whose forward adds tensors."""
    parts = attention.split(".")
    for i in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:i])
        call = trace.single_call(name)
        if call is None or call.input_shape is None or call.input_shape != call.output_shape:
            continue
        if _own_adds(model, trace, name, call):
            return name
    return None


def _transformer_blocks(model: nn.Module, trace: Trace) -> list[str]:
    blocks: list[str] = []
    for att in _attentions(model, trace):
        block = _block_of(model, trace, att.name)
        if block is not None and block not in blocks:
            blocks.append(block)
    return blocks


def _inside(name: str, parents: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in parents)


def _mlps(
    model: nn.Module, trace: Trace, block: str, attentions: Sequence[str]
) -> list[tuple[str, str, str, ModuleCall]]:
    """(container, first linear, last linear, last-linear call) of each MLP in a block."""
    found = []
    for name, _ in model.get_submodule(block).named_modules():
        full = f"{block}.{name}" if name else block
        if not name or _inside(full, attentions):
            continue
        linears = []
        for child in _direct_children(model, full):
            lc = trace.single_call(child)
            if isinstance(model.get_submodule(child), nn.Linear) and lc is not None:
                if lc.output_shape is not None and len(lc.output_shape) >= 3:
                    linears.append((child, lc))
        if len(linears) >= 2:
            linears.sort(key=lambda item: item[1].start)
            found.append((full, linears[0][0], linears[-1][0], linears[-1][1]))
    names = [f[0] for f in found]
    return [f for f in found if not any(o.startswith(f[0] + ".") for o in names)]


def _branch_gates(
    model: nn.Module,
    trace: Trace,
    block: str,
    members: list[tuple[str, ModuleCall, str]],
) -> list[GateSpec]:
    """Gates on the residual branches of one block.

    ``members`` are (branch module name, its call, unit layer name) of the attentions and
    MLPs inside the block.
    """
    call = trace.single_call(block)
    assert call is not None
    children = _direct_children(model, block)
    gates = []
    previous = call.start
    for add in _own_adds(model, trace, block, call):
        ends = [
            (child, c)
            for child in children
            if (c := trace.single_call(child)) is not None
            and c.output_id is not None
            and c.output_id in add.operand_ids
            and previous < c.start
            and c.end < add.index
        ]
        inside = [m for m in members if previous < m[1].start and m[1].end < add.index]
        previous = add.index
        if not ends or not inside:
            continue
        end_name, _ = max(ends, key=lambda item: item[1].end)
        branch = inside[0][0] if len(inside) == 1 else end_name
        gates.append(
            GateSpec(
                name=branch,
                kind="branch",
                start=inside[0][0],
                end=end_name,
                end_hook="output",
                mode="scale",
                units=tuple(m[2] for m in inside),
            )
        )
    return gates


def _patch_embedding(model: nn.Module, trace: Trace, blocks: Sequence[str]) -> ModuleCall | None:
    """The last convolution that runs before the first transformer block, outside blocks."""
    if not blocks:
        return None
    first = min(trace.calls[b][0].start for b in blocks)
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.conv._ConvNd) or _inside(name, blocks):
            continue
        c = trace.single_call(name)
        if c is not None and c.end < first and (best is None or c.start > best.start):
            best = c
    return best


def _channel_unit(model: nn.Module, trace: Trace, producer: ModuleCall) -> UnitLayer | None:
    """Embedding channels of a conv/linear that feeds the token stream."""
    module = producer.module
    if isinstance(module, nn.modules.conv._ConvNd):
        width, dim = module.out_channels, 1
    elif isinstance(module, nn.Linear):
        width, dim = module.out_features, -1
    else:
        return None
    shape = producer.output_shape
    if shape is None or len(shape) < 3:
        return None
    site, site_shape = producer.name, shape
    parent = producer.name.rsplit(".", 1)[0] if "." in producer.name else ""
    after = sorted(
        (c for child in _direct_children(model, parent) for c in trace.calls.get(child, [])),
        key=lambda c: c.start,
    )
    following = next((c for c in after if c.start > producer.end), None)
    if (
        following is not None
        and isinstance(following.module, _NORMS)
        and trace.single_call(following.name) is not None
        and following.output_shape is not None
        and following.output_shape[-1] == width
        and not isinstance(following.module, nn.modules.batchnorm._BatchNorm)
    ):
        site, site_shape, dim = following.name, following.output_shape, -1
    spatial = tuple(s for i, s in enumerate(site_shape[1:], 1) if i != dim % len(site_shape))
    return UnitLayer(
        name=producer.name,
        kind="channel",
        size=width,
        site=site,
        hook="output",
        channel_dim=dim,
        module_type=type(module).__name__,
        spatial=spatial,
    )


def _head_unit(att: _Attention) -> UnitLayer:
    """One score per head, on that head's channels of the output projection's input."""
    assert att.hook is not None
    return UnitLayer(
        name=att.name,
        kind="head",
        size=att.num_heads,
        site=att.site,
        hook=att.hook,
        channel_dim=-1,
        unit_width=att.head_dim,
        module_type=type(att.module).__name__,
        spatial=att.spatial,
    )


def _neuron_unit(model: nn.Module, first: str, last: str, last_call: ModuleCall) -> UnitLayer:
    """One score per hidden neuron, at the input of the MLP's last linear layer."""
    fc2 = model.get_submodule(last)
    assert isinstance(fc2, nn.Linear) and last_call.input_shape is not None
    return UnitLayer(
        name=first,
        kind="neuron",
        size=fc2.in_features,
        site=last,
        hook="input",
        channel_dim=-1,
        module_type=type(model.get_submodule(first)).__name__,
        spatial=tuple(last_call.input_shape[1:-1]),
    )


def _is_vit_shell(model: nn.Module) -> bool:
    """Whether the model has a ViT-style patch embedding (to explain a missing encoder)."""
    return any(_patch_geometry(m)[1] is not None for m in model.modules())


def vit_adapter(model: nn.Module, trace: Trace) -> AdapterResult | None:
    """Find heads, MLP neurons, embedding channels and branch gates of a vision transformer.

    Returns ``None`` for models without attention. See the module docstring for the rules.

    Raises
    ------
    ValueError
        If the model has a ViT patch embedding but no attention blocks.
    """
    attentions = _attentions(model, trace)
    if not attentions:
        if _is_vit_shell(model):
            raise ValueError(
                f"{type(model).__name__} has a patch embedding but no attention blocks (depth "
                "0?); NeuroChains scores the heads and MLP neurons of transformer blocks, so "
                "build the model with at least one block"
            )
        return None
    claimed: set[str] = set()
    units: list[UnitLayer] = []
    gates: list[GateSpec] = []
    unscorable: list[str] = []
    blocks: list[str] = []
    for att in attentions:
        block = _block_of(model, trace, att.name)
        if block is None:
            # attention outside a residual block (e.g. an attention-pooling head): not scored
            claimed.update(n for n, _ in model.named_modules() if _inside(n, [att.name]))
            continue
        if block not in blocks:
            blocks.append(block)
    if not blocks:
        return AdapterResult(claimed=claimed, family=None)
    by_block: dict[str, list[_Attention]] = {b: [] for b in blocks}
    for att in attentions:
        block = _block_of(model, trace, att.name)
        if block is not None:
            by_block[block].append(att)
    last_end = max(trace.calls[b][0].end for b in blocks)
    for name, module in model.named_modules():
        c = trace.single_call(name)
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and c and c.start > last_end:
            claimed.add(name)  # the classifier head (e.g. attention pooling) is not scored
    for block, atts in by_block.items():
        members: list[tuple[str, ModuleCall, str]] = []
        for att in atts:
            call = trace.single_call(att.name)
            assert call is not None
            if att.hook is None:
                unscorable.append(att.name)
                members.append((att.name, call, ""))
                continue
            units.append(_head_unit(att))
            members.append((att.name, call, att.name))
        for container, first, fc2, fc2_call in _mlps(model, trace, block, [a.name for a in atts]):
            units.append(_neuron_unit(model, first, fc2, fc2_call))
            call = trace.single_call(container)
            if call is not None:
                members.append((container, call, first))
        for gate in _branch_gates(model, trace, block, members):
            gates.append(replace(gate, units=tuple(u for u in gate.units if u)))
        claimed.update(n for n, _ in model.named_modules() if _inside(n, [block]))
    if unscorable:
        more = "..." if len(unscorable) > 3 else ""
        warnings.warn(
            f"the heads of {type(model).__name__} are not scored (their attention reads the "
            "projection weights functionally, or is an nn.MultiheadAttention with key/value "
            f"biases or zero-attention): {unscorable[:3]}{more}; MLP neurons and branch "
            "gates are",
            stacklevel=3,
        )
    # containers of the blocks (e.g. ``blocks``, ``encoder.layers``, ``encoder``)
    for block in blocks:
        parts = block.split(".")
        claimed.update(".".join(parts[:i]) for i in range(1, len(parts)))
    embed = _patch_embedding(model, trace, blocks)
    producers = [embed] if embed is not None else []
    producers += _stage_linears(model, trace, blocks, claimed)
    for producer in producers:
        unit = _channel_unit(model, trace, producer)
        claimed.add(producer.name)
        if unit is not None:
            units.append(unit)
    return AdapterResult(units=units, gates=gates, claimed=claimed, family="vit")


def _stage_linears(
    model: nn.Module, trace: Trace, blocks: Sequence[str], claimed: set[str]
) -> list[ModuleCall]:
    """Per-token linears between transformer stages (Swin's patch merging)."""
    starts = [trace.calls[b][0].start for b in blocks]
    ends = [trace.calls[b][0].end for b in blocks]
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name in claimed or _inside(name, blocks):
            continue
        c = trace.single_call(name)
        if c is None or c.output_shape is None or len(c.output_shape) < 3:
            continue
        if min(starts) < c.start and c.end < max(ends):
            found.append(c)
    return found


register(ADAPTERS, vit_adapter)
register(INPUT_CHECKS, check_vit_input)
