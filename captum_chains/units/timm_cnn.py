"""timm CNNs (EfficientNet, MobileNet, ...): what discovery needs to know about them.

timm fuses a BatchNorm and its activation into one module (``BatchNormAct2d`` and its
relatives in ``timm.layers.norm_act``) whose ``act`` child applies the activation after
the normalization. The filter scores of the convolution before it act at that child's
input, i.e. on the normalized, not yet activated, output (Eq. 3).
"""

from __future__ import annotations

from torch import nn

from captum_chains.units.adapters import FUSED_ACTIVATIONS


def timm_norm_activation(module: nn.Module) -> str | None:
    """``"act"`` for timm's fused norm + activation modules, else ``None``."""
    if type(module).__module__.startswith("timm.") and isinstance(
        module, nn.modules.batchnorm._BatchNorm
    ):
        return "act"
    return None


FUSED_ACTIVATIONS.append(timm_norm_activation)
