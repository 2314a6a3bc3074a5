"""Image files to model inputs: find, read, resize/crop or random crops, normalize."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from captum_chains.cli.output import CLIError, Console, one_line

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Preprocessing:
    """How images become model inputs: resize, centre crop, channels, normalization.

    Attributes
    ----------
    size : int
        Side of the square input.
    channels : int
        1 (luminance) or 3 (RGB).
    mean, std : tuple of float
        Per-channel normalization of values in ``[0, 1]``.
    """

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.size < 1:
            raise CLIError(f"the input size must be positive, got {self.size}")
        if self.channels not in (1, 3):
            raise CLIError(f"images can become 1- or 3-channel inputs, not {self.channels}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, self.channels):
                raise CLIError(
                    f"--{name} needs 1 or {self.channels} values, got {getattr(self, name)}"
                )
        if any(s <= 0 for s in self.std):
            raise CLIError(f"--std values must be positive, got {self.std}")

    def _finish(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        if self.channels == 1:
            weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
            images = (images * weights).sum(dim=1, keepdim=True)
        c = self.channels
        mean = torch.tensor(self.mean, dtype=images.dtype).expand(c).reshape(1, c, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype).expand(c).reshape(1, c, 1, 1)
        return (images - mean) / std

    def stack(self, photos: Sequence[torch.Tensor]) -> torch.Tensor:
        """One input per photo: shorter side resized to ``size``, centre crop."""
        import torch
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        out = []
        for photo in photos:
            resized = TF.resize(
                photo, [self.size], interpolation=InterpolationMode.BILINEAR, antialias=True
            )
            out.append(TF.center_crop(resized, [self.size, self.size]))
        return self._finish(torch.stack(out).clamp(0, 1))

    def inputs(
        self, photos: Sequence[torch.Tensor], n_crops: int | None, seed: int
    ) -> torch.Tensor:
        """One input per photo (``n_crops=None``) or ``n_crops`` random crops of them."""
        if n_crops is None:
            return self.stack(photos)
        if n_crops < 1:
            raise CLIError(f"--n-crops must be a positive number, got {n_crops}")
        return self.region(photos, n_crops, seed)

    def region(self, photos: Sequence[torch.Tensor], n: int, seed: int) -> torch.Tensor:
        """``n`` random resized crops of the photos (:func:`captum_chains.data.local_region`)."""
        from captum_chains.data import local_region

        crops = local_region(
            list(photos), n=n, size=self.size, seed=seed, mean=(0, 0, 0), std=(1, 1, 1)
        )
        return self._finish(crops)


def find_images(spec: str) -> list[Path]:
    """Image files named by a folder (its images, sorted), a single file or a glob pattern."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise CLIError(
                f"no images in folder {spec} (looked for {', '.join(IMAGE_SUFFIXES)} files)"
            )
        return files
    if path.is_file():
        return [path]
    if any(c in spec for c in "*?["):
        files = sorted(
            Path(p)
            for p in glob.glob(os.path.expanduser(spec), recursive=True)
            if Path(p).is_file()
        )
        if not files:
            raise CLIError(f"the pattern {spec!r} matches no files")
        return files
    raise CLIError(f"--images {spec}: no such folder or file")


def read_image(path: Path) -> torch.Tensor:
    """An image file as a float tensor ``[3, H, W]`` in ``[0, 1]``."""
    import numpy as np
    import torch
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as err:
        raise CLIError(f"cannot read image {path}: {one_line(err, 160)}") from err
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def load_photos(files: Sequence[Path], console: Console) -> list[torch.Tensor]:
    """Read all image files, with a progress bar for long lists."""
    from captum_chains._utils.progress import tqdm

    bar = tqdm(files, desc="images", disable=console.quiet or len(files) < 20, leave=False)
    return [read_image(p) for p in bar]
