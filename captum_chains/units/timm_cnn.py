"""timm's CNNs (EfficientNet, MobileNet, ...): the only module that knows their layer names.

Registers, in :mod:`captum_chains.units.adapters`:

* the fused norm + activation modules (``BatchNormAct2d`` and its relatives in
  ``timm.layers.norm_act``), whose ``act`` child applies the activation after the
  normalization: the filter scores of the convolution before act at that child's input,
  on the normalized, not yet activated, output (Eq. 3); for the export, ``BatchNormAct2d``
  is split into ``bn -> drop -> act`` children so that this site is a graph node;
* ``Conv2dSame`` / ``AvgPool2dSame`` / ``MaxPool2dSame`` (same padding computed in
  ``forward``), which the export slices as the torch layers they subclass;
* timm's own list of layers the export keeps as single operations.

Nothing here imports timm: a model built with timm has already imported it.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Any

from torch import nn

from captum_chains._utils.optional import loaded_class
from captum_chains.units.adapters import (
    CANONICALIZERS,
    FUSED_ACTIVATIONS,
    LAYER_KINDS,
    LEAF_MODULES,
    register,
)

__all__ = [
    "BatchNormAct",
    "split_batch_norm_act",
    "timm_layer_kind",
    "timm_leaf_modules",
    "timm_norm_activation",
]


def timm_norm_activation(module: nn.Module) -> str | None:
    """``"act"`` for timm's fused norm + activation modules, else ``None``."""
    if type(module).__module__.startswith("timm.") and isinstance(
        module, nn.modules.batchnorm._BatchNorm
    ):
        return "act"
    return None


class BatchNormAct(nn.Sequential):
    """BatchNorm, dropout and activation as three children (unfused ``BatchNormAct2d``)."""


def split_batch_norm_act(module: nn.Module) -> nn.Module | None:
    """timm's ``BatchNormAct2d`` as :class:`BatchNormAct` sharing its tensors, else None.

    An export canonicalizer: it runs on the export's private copy only.
    """
    batch_norm_act = loaded_class("timm.layers.norm_act", "BatchNormAct2d")
    if batch_norm_act is None or type(module) is not batch_norm_act:
        return None
    fused: Any = module
    bn = nn.BatchNorm2d(
        fused.num_features,
        eps=fused.eps,
        momentum=fused.momentum,
        affine=fused.affine,
        track_running_stats=fused.track_running_stats,
    )
    bn.weight, bn.bias = fused.weight, fused.bias
    bn.running_mean, bn.running_var = fused.running_mean, fused.running_var
    bn.num_batches_tracked = fused.num_batches_tracked
    return BatchNormAct(OrderedDict(bn=bn, drop=fused.drop, act=fused.act))


_SAME_PADDING_POOLS = (("AvgPool2dSame", nn.AvgPool2d), ("MaxPool2dSame", nn.MaxPool2d))


def timm_layer_kind(module: nn.Module) -> type[nn.Module] | None:
    """The torch layer a timm same-padding layer slices as (e.g. ``nn.Conv2d``), else None.

    ``Conv2dSame`` exactly (a subclass may transform its weights in ``forward``); the
    same-padding pools and their subclasses (pooling has no weights).
    """
    if type(module) is loaded_class("timm.layers.conv2d_same", "Conv2dSame"):
        return nn.Conv2d
    for name, kind in _SAME_PADDING_POOLS:
        pool = loaded_class("timm.layers.pool2d_same", name)
        if pool is not None and isinstance(module, pool):
            return kind
    return None


def timm_leaf_modules() -> tuple[type, ...]:
    """timm's own list of layers not to trace into (empty while no model imported timm)."""
    if "timm" not in sys.modules:
        return ()
    try:
        from timm.layers import _fx as timm_fx

        return tuple(timm_fx._leaf_modules)
    except (ImportError, AttributeError):  # pragma: no cover - another timm layout
        return ()


register(FUSED_ACTIVATIONS, timm_norm_activation)
register(CANONICALIZERS, split_batch_norm_act)
register(LAYER_KINDS, timm_layer_kind)
register(LEAF_MODULES, timm_leaf_modules)
