"""Local regions for studies, sampled with the NeuroChains paper's protocol.

Wang, Zhou and Bilmes (TMLR 2022), Sec. 5: a region is made of ``classes_per_region``
random classes (2 in the paper) and ``per_class`` random images of each (10 in the
paper) that the model classifies correctly with confidence >= ``min_confidence``
(0.95). :func:`sample_regions` draws such regions reproducibly from a labelled data set.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from captum_chains._utils.validation import check_batch_size, format_inputs
from captum_chains.metrics._common import model_logits

_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class Region:
    """One local region of a study.

    Attributes
    ----------
    region_id : str
        Unique name (letters, digits, ``_ . -``); the file name of its results.
    inputs : Tensor
        ``[N, ...]`` inputs, ``N >= 2``.
    labels : Tensor, optional
        ``[N]`` ground-truth labels (used as the attacked class in robustness; default
        the model's predictions).
    classes : tuple of int
        The classes the region was drawn from (informative).
    indices : tuple of int
        Positions of the inputs in the data set they were drawn from (informative).
    """

    region_id: str
    inputs: torch.Tensor = field(repr=False)
    labels: torch.Tensor | None = field(default=None, repr=False)
    classes: tuple[int, ...] = ()
    indices: tuple[int, ...] = ()

    def fingerprint(self) -> str:
        """A hash of the inputs (and labels), to detect a changed region on resume."""
        digest = hashlib.sha1(usedforsecurity=False)
        digest.update(str(tuple(self.inputs.shape)).encode())
        digest.update(self.inputs.detach().cpu().float().contiguous().numpy().tobytes())
        if self.labels is not None:
            digest.update(self.labels.detach().cpu().long().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def as_regions(regions: Any) -> list[Region]:
    """Normalize ``regions`` into a validated list of :class:`Region`.

    Accepted: a sequence of :class:`Region`; a sequence of tensors (ids ``r0000``,
    ``r0001``, ...); a mapping of id to tensor.

    Raises
    ------
    ValueError
        For an empty list, a region with fewer than 2 inputs, duplicate or unsafe ids,
        or labels that do not match the inputs.
    """
    if isinstance(regions, torch.Tensor):
        if regions.ndim < 3:
            raise ValueError(
                f"a regions tensor must have shape [K, N, ...], got {tuple(regions.shape)}"
            )
        regions = list(regions.unbind(0))
    if isinstance(regions, Mapping):
        items = [Region(str(k), v) for k, v in regions.items()]
    elif isinstance(regions, Sequence):
        items = [
            r if isinstance(r, Region) else Region(f"r{i:04d}", r) for i, r in enumerate(regions)
        ]
    else:
        raise TypeError(
            f"regions must be a list of Region or tensors, or a dict of id -> tensor; got "
            f"{type(regions).__name__}"
        )
    if not items:
        raise ValueError("regions is empty; pass at least one region (see sample_regions)")
    seen: set[str] = set()
    for r in items:
        if not _ID_PATTERN.match(r.region_id):
            raise ValueError(
                f"region id {r.region_id!r} is not a safe file name; use letters, digits, "
                "'_', '.' and '-' only"
            )
        if r.region_id in seen:
            raise ValueError(f"region id {r.region_id!r} appears twice; ids must be unique")
        seen.add(r.region_id)
        (x,) = format_inputs(r.inputs)
        if x.shape[0] < 2:
            raise ValueError(
                f"region {r.region_id!r} has {x.shape[0]} input; a local region needs at least "
                "2 inputs (the paper uses 2 classes x 10 images)"
            )
        if r.labels is not None and r.labels.reshape(-1).shape[0] != x.shape[0]:
            raise ValueError(
                f"region {r.region_id!r} has {x.shape[0]} inputs but {r.labels.numel()} labels"
            )
    return items


def sample_regions(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    n_regions: int,
    classes_per_region: int = 2,
    per_class: int = 10,
    min_confidence: float = 0.95,
    seed: int = 0,
    batch_size: int = 256,
    prefix: str = "r",
) -> list[Region]:
    """Draw regions with the paper's protocol from a (labelled) data set.

    Parameters
    ----------
    model : nn.Module
        The classifier to be explained.
    inputs : Tensor
        ``[M, ...]`` candidate inputs (e.g. the training split; keep the test split as
        the unseen pool of :func:`captum_chains.metrics.stability`).
    labels : Tensor, optional
        ``[M]`` ground truth; an input is eligible only if the model predicts its label
        with confidence >= ``min_confidence``. Without labels, the predicted class is
        used and only the confidence counts.
    n_regions : int
        Number of regions.
    classes_per_region, per_class : int
        Classes per region and inputs per class (paper: 2 and 10).
    min_confidence : float
        Minimum softmax probability of the predicted class (paper: 0.95).
    seed : int
        Seed of the draw: the same arguments give the same regions, and the first
        ``k`` regions do not depend on ``n_regions``.
    batch_size : int
        Inputs per forward pass when scoring the candidates.
    prefix : str
        Region ids are ``f"{prefix}{i:04d}"``.

    Returns
    -------
    list of Region
        With ``labels``, ``classes`` and ``indices`` filled in.

    Raises
    ------
    ValueError
        If fewer than ``classes_per_region`` classes have ``per_class`` eligible inputs.
    """
    check_batch_size(batch_size, "batch_size")
    if n_regions < 1 or classes_per_region < 1 or per_class < 1:
        raise ValueError(
            f"n_regions, classes_per_region and per_class must be >= 1, got {n_regions}, "
            f"{classes_per_region}, {per_class}"
        )
    if classes_per_region * per_class < 2:
        raise ValueError("a region needs at least 2 inputs (classes_per_region * per_class)")
    if not 0 <= min_confidence <= 1:
        raise ValueError(f"min_confidence must lie in [0, 1], got {min_confidence}")
    (x,) = format_inputs(inputs)
    probs = torch.softmax(model_logits(model, (x,), (), batch_size), dim=1)
    conf, pred = probs.max(dim=1)
    if labels is None:
        target = pred
        eligible = conf >= min_confidence
    else:
        target = labels.reshape(-1).to(pred.device).long()
        if target.shape[0] != x.shape[0]:
            raise ValueError(f"labels has {target.shape[0]} entries but inputs has {x.shape[0]}")
        eligible = (conf >= min_confidence) & (pred == target)
    by_class = {
        int(c): torch.nonzero(eligible & (target == c)).flatten().cpu().numpy()
        for c in torch.unique(target).tolist()
    }
    usable = sorted(c for c, idx in by_class.items() if len(idx) >= per_class)
    if len(usable) < classes_per_region:
        counts = {c: len(i) for c, i in by_class.items()}
        raise ValueError(
            f"only {len(usable)} classes have {per_class} inputs classified correctly with "
            f"confidence >= {min_confidence} (eligible per class: {counts}); lower "
            "per_class or min_confidence, or pass more inputs"
        )
    rng = np.random.default_rng(seed)
    regions = []
    for r in range(n_regions):
        classes = sorted(rng.choice(usable, size=classes_per_region, replace=False).tolist())
        idx = np.concatenate(
            [rng.choice(by_class[c], size=per_class, replace=False) for c in classes]
        )
        index = torch.as_tensor(idx, dtype=torch.long, device=x.device)
        regions.append(
            Region(
                region_id=f"{prefix}{r:04d}",
                inputs=x[index],
                labels=target[index].cpu(),
                classes=tuple(int(c) for c in classes),
                indices=tuple(int(i) for i in idx),
            )
        )
    return regions
