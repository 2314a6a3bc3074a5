"""Faster stand-ins for a compact program's modules during optimization steps.

A compact program (:mod:`captum_chains.export.compact`) is built with the export's
modules, which are written to be exact and to run under TorchScript and ONNX. A step of
the optimizer runs it thousands of times, on channels-last tensors, with scores that
change at every call; three of those modules are slow there and are swapped, in the
program's private copy only, for modules that compute the same values (up to the order of
float summation):

* :class:`ChannelsLastGather` replaces a :class:`~captum_chains.export.runtime.ChannelAdapter`.
  ``index_select`` along the channels returns a contiguous (NCHW) tensor, which makes every
  convolution after it run in the slower layout (a depthwise convolution's backward pass
  ~4x slower on the CPU), and gathering along the last dimension of the NHWC view is slow
  itself. For up to :data:`MATMUL_CHANNELS` channels the gather is a product with a 0/1
  matrix instead (exact: each output adds one input value to zeros), which keeps the layout.
* :class:`SamePaddedConv` replaces timm's ``Conv2dSame`` (TensorFlow "same" padding, e.g.
  EfficientNet-Lite0's strided convolutions), whose padded copy of the input cost as much as
  the depthwise convolution after it several times over (Lite0's 112 x 112 depthwise
  convolution: ~90 ms of padding against ~11 ms of convolution per 20 inputs).
* :class:`ScaledBatchNorm` replaces an eval-mode BatchNorm followed by a score site
  (``ChannelScale``): ``s * (gamma * x_hat + beta) == (gamma * s) * x_hat + beta * s``, so
  the scores fold into the affine parameters at every call and one normalization pass (and
  its backward, which also gives the scores' gradients) does the work of two.

:func:`speed_up` applies all three to a program and returns, for each score site it folded,
the module that now holds that site's scores; :func:`split_prefix` separates the part of a
program that does not depend on the scores (computed once per run instead of at every step).
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn

from captum_chains.export.runtime import ChannelAdapter, ChannelScale

#: Largest number of input channels (fill block included) gathered by a 0/1 matrix
#: product; above it a product costs more than the gather it replaces.
MATMUL_CHANNELS = 256


class ChannelsLastGather(nn.Module):
    """A :class:`ChannelAdapter` that keeps 4-D channels-last tensors channels-last."""

    def __init__(self, adapter: ChannelAdapter) -> None:
        super().__init__()
        self.adapter = adapter
        self._matrix: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def _one_hot(self, channels: int, like: torch.Tensor) -> torch.Tensor:
        """``[channels, K]``: column k has a 1 at the input channel output k reads."""
        key = (channels, like.dtype, like.device)
        matrix = self._matrix.get(key)
        if matrix is None:
            index = self.adapter.index.to(like.device)
            matrix = torch.zeros(channels, len(index), dtype=like.dtype, device=like.device)
            present = index < channels
            columns = torch.arange(len(index), device=like.device)
            matrix[index[present], columns[present]] = 1
            self._matrix[key] = matrix
        return matrix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapter = self.adapter
        channels = x.shape[1] if x.ndim == 4 else 0
        if (
            adapter.dim != 1
            or x.ndim != 4
            or not x.is_contiguous(memory_format=torch.channels_last)
            or channels + adapter.pad > MATMUL_CHANNELS
        ):
            return adapter(x)
        out = x.permute(0, 2, 3, 1) @ self._one_hot(channels, x)
        if adapter.pad > 0 and adapter.fill != 0.0:
            missing = (adapter.index >= channels).to(device=x.device, dtype=out.dtype)
            out = out + adapter.fill * missing
        return out.permute(0, 3, 1, 2)


class ScaledBatchNorm(nn.Module):
    """Eval-mode BatchNorm whose output channels are multiplied by ``scale`` (set per call).

    Parameters
    ----------
    norm : nn.BatchNorm1d/2d/3d
        An eval-mode BatchNorm with running statistics; its statistics and affine
        parameters are copied (an absent affine is the identity).
    """

    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        assert norm.running_mean is not None and norm.running_var is not None
        size = norm.running_mean.shape[0]
        ones = torch.ones(size, device=norm.running_mean.device)
        weight = ones if norm.weight is None else norm.weight.detach()
        bias = torch.zeros_like(ones) if norm.bias is None else norm.bias.detach()
        self.register_buffer("running_mean", norm.running_mean.detach().clone())
        self.register_buffer("running_var", norm.running_var.detach().clone())
        self.register_buffer("weight", weight.clone())
        self.register_buffer("bias", bias.clone())
        self.eps = float(norm.eps)
        #: The scores of this call, one per channel (set by the compact program).
        self.scale = torch.ones_like(ones)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale.reshape(-1)
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight * scale,
            self.bias * scale,
            False,
            0.0,
            self.eps,
        )

    def extra_repr(self) -> str:
        return f"channels={self.running_mean.numel()}, eps={self.eps}"


class SamePaddedConv(nn.Module):
    """A TensorFlow-"same" convolution (timm's ``Conv2dSame``) without its padded copy.

    ``Conv2dSame`` pads the input with ``F.pad`` (``total // 2`` before, the rest after),
    which writes a padded copy of every input and, in the backward pass, reads it back.
    The same outputs come from the convolution's own zero padding: pad ``after`` on both
    sides and prepend ``after - before`` zero taps to the kernel, so each output reads
    exactly the inputs it read before (the extra taps meet only the extra padding, with
    weight 0).

    Parameters
    ----------
    conv : nn.Conv2d
        The ``Conv2dSame`` module (owned by the program).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self._kernels: dict[tuple[int, int, torch.dtype, torch.device], torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if x.ndim != 4 or tuple(conv.dilation) != (1, 1):
            return conv(x)
        pads = []
        for size, k, s in zip(x.shape[-2:], conv.weight.shape[-2:], conv.stride):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        weight = conv.weight
        key = (bottom - top, right - left, weight.dtype, weight.device)
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = F.pad(weight.detach(), (key[1], 0, key[0], 0))  # leading zero taps
            self._kernels[key] = kernel
        stride = (int(conv.stride[0]), int(conv.stride[1]))
        return F.conv2d(x, kernel, conv.bias, stride, (bottom, right), 1, conv.groups)


def _is_same_padded_conv(module: nn.Module | None) -> bool:
    """timm's ``Conv2dSame`` (dynamic TensorFlow "same" padding), matched by name so that
    timm stays optional."""
    return (
        isinstance(module, nn.Conv2d)
        and type(module).__name__ == "Conv2dSame"
        and type(module).__module__.startswith("timm.")
    )


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    assert isinstance(node.target, str)
    return gm.get_submodule(node.target)


def _foldable_norm(gm: fx.GraphModule, site: fx.Node) -> fx.Node | None:
    """The eval-mode BatchNorm node whose output reaches ``site`` through identities only,
    each read once (so scaling the norm's output changes nothing else)."""
    node = site.args[0] if site.args else None
    while isinstance(node, fx.Node) and len(node.users) == 1:
        module = _module(gm, node)
        if isinstance(module, nn.Identity) or (
            isinstance(module, nn.Dropout) and not module.training
        ):
            node = node.args[0]
            continue
        if (
            isinstance(module, _NORMS)
            and type(module) in _NORMS  # not a subclass (e.g. a norm with an activation)
            and not module.training
            and module.running_mean is not None
            and module.running_var is not None
        ):
            return node
        return None
    return None


def speed_up(gm: fx.GraphModule, site_names: list[str]) -> dict[str, ScaledBatchNorm]:
    """Swap ``gm``'s adapters and BatchNorm + score pairs for the faster modules, in place.

    Parameters
    ----------
    gm : fx.GraphModule
        A compact program's graph (a private copy).
    site_names : list of str
        Qualified names of its score sites (``ChannelScale`` modules).

    Returns
    -------
    dict
        Site name -> the :class:`ScaledBatchNorm` that now applies that site's scores
        (sites left as ``ChannelScale`` are not in it).
    """
    for node in gm.graph.nodes:
        module = _module(gm, node)
        if isinstance(module, ChannelAdapter):
            assert isinstance(node.target, str)
            gm.add_submodule(node.target, ChannelsLastGather(module))
        elif _is_same_padded_conv(module):
            assert isinstance(node.target, str) and isinstance(module, nn.Conv2d)
            gm.add_submodule(node.target, SamePaddedConv(module))
    folded: dict[str, ScaledBatchNorm] = {}
    wanted = set(site_names)
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for site in list(gm.graph.nodes):
        if site.op != "call_module" or site.target not in wanted:
            continue
        scale = _module(gm, site)
        norm_node = _foldable_norm(gm, site)
        if not isinstance(scale, ChannelScale) or norm_node is None:
            continue
        norm = _module(gm, norm_node)
        assert isinstance(norm, _NORMS) and norm.running_mean is not None
        assert isinstance(site.target, str) and isinstance(norm_node.target, str)
        channels = norm.running_mean.numel()
        if calls[norm_node.target] != 1 or scale.scale.ndim < 2 or scale.scale.shape[1] != channels:
            continue  # the norm is called twice, or the site scales another dimension
        scaled = ScaledBatchNorm(norm)
        gm.add_submodule(norm_node.target, scaled)
        site.replace_all_uses_with(site.args[0])
        gm.graph.erase_node(site)
        gm.delete_submodule(site.target)
        folded[site.target] = scaled
    gm.graph.lint()
    gm.recompile()
    return folded


def split_prefix(gm: fx.GraphModule) -> tuple[fx.GraphModule, fx.GraphModule, int] | None:
    """Split ``gm`` into the part that does not depend on the scores and the rest.

    A node depends on the scores when it is a score site (a ``ChannelScale`` or a
    :class:`ScaledBatchNorm`) or reads a node that does. Everything else (e.g. the stem
    convolution of the inputs) computes the same values at every step of a run.

    Returns
    -------
    tuple or None
        ``(prefix, rest, count)``: ``prefix(*inputs)`` returns the ``count`` score-free
        values the rest reads, and ``rest(*inputs, *values)`` computes ``gm(*inputs)``;
        ``None`` when no score-free value is worth keeping.
    """
    graph = gm.graph
    varying: set[fx.Node] = set()
    for node in graph.nodes:
        module = _module(gm, node)
        if isinstance(module, (ChannelScale, ScaledBatchNorm)) or any(
            arg in varying for arg in node.all_input_nodes
        ):
            varying.add(node)
    frontier = [
        node
        for node in graph.nodes
        if node not in varying
        and node.op not in ("placeholder", "get_attr", "output")
        and any(user in varying or user.op == "output" for user in node.users)
    ]
    if not frontier:
        return None
    rest = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = rest.node_copy(node)
    for i, node in enumerate(frontier):
        env[node] = rest.placeholder(f"_score_free_{i}")
    for node in graph.nodes:
        if (
            node in varying
            or node.op == "output"
            or (node.op == "get_attr" and any(user in varying for user in node.users))
        ):
            env[node] = rest.node_copy(node, env.__getitem__)
    prefix = fx.Graph()
    penv: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node not in varying and node.op != "output":
            penv[node] = prefix.node_copy(node, penv.__getitem__)
    prefix.output(tuple(penv[node] for node in frontier))
    prefix_module = fx.GraphModule(gm, prefix)
    prefix_module.graph.eliminate_dead_code()
    prefix_module.recompile()
    return prefix_module, fx.GraphModule(gm, rest), len(frontier)
