"""Real photos and "local regions" of data space built from them.

A NeuroChains explanation is about one *local region*: a few inputs that are close
in data space and that the model treats alike. :func:`local_region` builds such a
region from one or two real photos by random resized crops and horizontal flips.
The photos ship with scikit-image (``skimage.data``) and scikit-learn
(``load_sample_images``), so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SKIMAGE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "cat", "motorcycle_left")
SKLEARN_PHOTOS = ("china", "flower")


def sample_photo(name: str) -> torch.Tensor:
    """Load a bundled real photo as a float tensor ``[3, H, W]`` with values in ``[0, 1]``.

    Parameters
    ----------
    name : str
        One of :data:`SKIMAGE_PHOTOS` (from ``skimage.data``) or :data:`SKLEARN_PHOTOS`
        (from ``sklearn.datasets.load_sample_images``).
    """
    if name in SKIMAGE_PHOTOS:
        from skimage import data

        array = data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)()
    elif name in SKLEARN_PHOTOS:
        from sklearn.datasets import load_sample_images

        bundle = load_sample_images()
        array = bundle.images[[f"{n}.jpg" for n in SKLEARN_PHOTOS].index(f"{name}.jpg")]
    else:
        raise ValueError(f"unknown photo {name!r}; choose one of {SKIMAGE_PHOTOS + SKLEARN_PHOTOS}")
    array = np.asarray(array)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return torch.from_numpy(array[..., :3].copy()).permute(2, 0, 1).float() / 255.0


def preprocess(
    image: torch.Tensor,
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Resize a ``[3, H, W]`` image in ``[0, 1]`` to ``size x size`` and normalize it."""
    import torchvision.transforms.functional as TF  # imported on use: a heavy import
    from torchvision.transforms import InterpolationMode

    _check_image(image)
    resized = TF.resize(
        image, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True
    )
    return TF.normalize(resized, list(mean), list(std))


def denormalize(
    inputs: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Undo :func:`preprocess`'s normalization, giving images in ``[0, 1]`` (clamped)."""
    m = torch.tensor(mean, dtype=inputs.dtype, device=inputs.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=inputs.dtype, device=inputs.device).view(-1, 1, 1)
    return (inputs * s + m).clamp(0, 1)


def local_region(
    images: torch.Tensor | Sequence[torch.Tensor],
    n: int = 20,
    size: int = 224,
    scale: tuple[float, float] = (0.6, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    seed: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Build a local region of ``n`` inputs from one or more photos.

    Each input is a random resized crop (area fraction drawn from ``scale``, aspect
    ratio from ``ratio``), randomly flipped horizontally, of one of the photos (the
    photos are used in turn), resized to ``size x size`` and normalized.

    Parameters
    ----------
    images : Tensor or sequence of Tensor
        Photos ``[3, H, W]`` with values in ``[0, 1]`` (see :func:`sample_photo`).
    n : int
        Number of inputs in the region.
    size : int
        Side of the model's input.
    scale, ratio : tuple of float
        Ranges of the crop's area fraction and aspect ratio.
    flip : bool
        Randomly flip half of the crops horizontally.
    seed : int
        Seed of the crop generator; the same seed gives the same region.
    mean, std : sequence of float
        Normalization of the model.

    Returns
    -------
    torch.Tensor
        ``[n, 3, size, size]``.
    """
    photos = [images] if isinstance(images, torch.Tensor) else list(images)
    if not photos:
        raise ValueError("local_region needs at least one photo")
    for photo in photos:
        _check_image(photo)
    if n < 1:
        raise ValueError(f"n must be a positive number of inputs, got {n}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
    import torchvision.transforms.functional as TF  # imported on use: a heavy import
    from torchvision.transforms import InterpolationMode

    gen = torch.Generator().manual_seed(seed)
    crops = []
    for i in range(n):
        photo = photos[i % len(photos)]
        top, left, h, w = _random_crop_box(photo.shape[-2:], scale, ratio, gen)
        crop = TF.resized_crop(
            photo, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True
        )
        if flip and torch.rand((), generator=gen) < 0.5:
            crop = TF.hflip(crop)
        crops.append(TF.normalize(crop, list(mean), list(std)))
    return torch.stack(crops)


def _random_crop_box(
    hw: Sequence[int], scale: tuple[float, float], ratio: tuple[float, float], gen: torch.Generator
) -> tuple[int, int, int, int]:
    height, width = int(hw[0]), int(hw[1])
    area = height * width
    log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
    for _ in range(20):
        target = area * float(torch.empty(()).uniform_(scale[0], scale[1], generator=gen))
        aspect = float(np.exp(float(torch.empty(()).uniform_(*log_ratio, generator=gen))))
        w = round(np.sqrt(target * aspect))
        h = round(np.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=gen))
            left = int(torch.randint(0, width - w + 1, (), generator=gen))
            return top, left, h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def _check_image(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(
            f"expected a photo tensor of shape [3, H, W] with values in [0, 1], got {shape}; "
            "load one with captum_chains.data.sample_photo"
        )
