"""Small VGG-, ResNet- and ViT-style classifiers trained on scikit-learn's digits.

The 1797 handwritten 8x8 digits of :func:`sklearn.datasets.load_digits` are
upsampled to ``size x size`` single-channel images. A model trains in seconds
to a minute on a CPU and is cached on disk (``$CAPTUM_CHAINS_CACHE`` or
``~/.cache/captum_chains``) so that tests, tutorials and studies share it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DIGITS_ARCHITECTURES = ("vgg", "resnet", "vit")


@dataclass(frozen=True)
class DigitsData:
    """Digits split into a fixed train and test part.

    Attributes
    ----------
    x_train, x_test : torch.Tensor
        Images of shape ``[N, 1, size, size]``, standardised to zero mean and unit variance.
    y_train, y_test : torch.Tensor
        Integer labels in ``0..9``.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_data(size: int = 32, test_fraction: float = 0.25) -> DigitsData:
    """Load scikit-learn's digits as image tensors with a fixed, seeded split.

    Parameters
    ----------
    size : int
        Side of the upsampled images (bilinear from 8x8).
    test_fraction : float
        Fraction of the 1797 digits held out for testing.
    """
    from sklearn.datasets import load_digits

    if size < 8:
        raise ValueError(f"size must be at least 8 (the digits are 8x8), got {size}")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images - 0.3) / 0.4
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = round(test_fraction * len(labels))
    test, train = order[:n_test], order[n_test:]
    return DigitsData(images[train], labels[train], images[test], labels[test])


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class DigitsVGG(nn.Module):
    """A VGG-style plain CNN: conv-BN-ReLU stacks with max pooling, then a small MLP head."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn_relu(1, w),
            *_conv_bn_relu(w, w),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w, 2 * w),
            *_conv_bn_relu(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *_conv_bn_relu(2 * w, 4 * w),
            *_conv_bn_relu(4 * w, 4 * w),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class BasicBlock(nn.Module):
    """A ResNet basic block (two 3x3 convs with BN) with an optional projection shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class DigitsResNet(nn.Module):
    """A small ResNet: a stem conv and three stages of two basic blocks each."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(*_conv_bn_relu(1, w))
        self.layer1 = nn.Sequential(BasicBlock(w, w), BasicBlock(w, w))
        self.layer2 = nn.Sequential(BasicBlock(w, 2 * w, stride=2), BasicBlock(2 * w, 2 * w))
        self.layer3 = nn.Sequential(BasicBlock(2 * w, 4 * w, stride=2), BasicBlock(4 * w, 4 * w))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def build_digits_model(arch: str, size: int = 32, num_classes: int = 10) -> nn.Module:
    """Build an untrained digits model.

    Parameters
    ----------
    arch : {"vgg", "resnet", "vit"}
        Architecture family. ``"vit"`` is a timm ``VisionTransformer`` with patch size 4,
        4 blocks of 4 heads and a class token.
    size : int
        Input image side (used by the ViT's patch embedding).
    num_classes : int
        Number of output logits.
    """
    if arch == "vgg":
        return DigitsVGG(num_classes=num_classes)
    if arch == "resnet":
        return DigitsResNet(num_classes=num_classes)
    if arch == "vit":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(
            img_size=size,
            patch_size=4,
            in_chans=1,
            num_classes=num_classes,
            embed_dim=64,
            depth=4,
            num_heads=4,
            mlp_ratio=2.0,
        )
    raise ValueError(f"unknown digits architecture {arch!r}; choose one of {DIGITS_ARCHITECTURES}")


def _cache_dir() -> Path:
    root = os.environ.get("CAPTUM_CHAINS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "captum_chains"


def train_digits_model(
    arch: str,
    seed: int = 0,
    epochs: int | None = None,
    size: int = 32,
    cache: bool = True,
) -> nn.Module:
    """Train (or load from the cache) a digits classifier, returned in eval mode.

    Training is seeded and single-threaded-deterministic on CPU: the same ``arch``,
    ``seed``, ``epochs`` and ``size`` give the same weights.

    Parameters
    ----------
    arch : {"vgg", "resnet", "vit"}
        See :func:`build_digits_model`.
    seed : int
        Seed for initialisation and batch order.
    epochs : int, optional
        Training epochs; default 12 for CNNs and 40 for the ViT.
    size : int
        Input side.
    cache : bool
        Read and write the trained weights under the cache directory.
    """
    if epochs is None:
        epochs = 40 if arch == "vit" else 12
    path = _cache_dir() / "digits" / f"{arch}-s{seed}-e{epochs}-{size}px.pt"
    model = build_digits_model(arch, size=size)
    if cache and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    data = load_digits_data(size=size)
    torch.manual_seed(seed)
    model = build_digits_model(arch, size=size)
    lr = 1e-3 if arch == "vit" else 3e-3
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * ((len(data.y_train) + 63) // 64)
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.y_train), generator=generator)
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    return model


def digits_accuracy(model: nn.Module, data: DigitsData) -> float:
    """Test accuracy of ``model`` on ``data.x_test``."""
    with torch.no_grad():
        return float((model(data.x_test).argmax(1) == data.y_test).float().mean())
