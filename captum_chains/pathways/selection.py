"""Critical-pathway selection: one global percentile per input, with exact ties.

Khakzar et al. (CVPR 2021, Sec. 3.2) keep, for each input, the neurons whose
contribution lies above the :math:`p`-th percentile of the contributions of *all*
neurons of *all* layers (one global threshold, not one per layer).

The tie rule
------------
With ReLU networks many contributions are exactly zero, and ReLU6 saturation or
dead units add more ties. A threshold test ``s > percentile(s, p)`` then keeps fewer
neurons than asked (at ``p = 50`` with 60% zeros it keeps 40%), and ``s >= ...``
keeps more. We therefore keep an exact count per input:

.. math:: k = \\left\\lceil \\frac{100 - p}{100} \\, N \\right\\rceil

out of the :math:`N` neurons of that input, i.e. the top :math:`k` of a total order:

1. larger contribution first;
2. among equal contributions, the neuron that comes **first in forward order**:
   earlier activation site first (sites ordered as the forward pass meets them),
   and within a site the smaller row-major (C-order) index of the per-example
   activation tensor (channel, then row, then column for conv layers).

Consequences: ``p = 0`` keeps every neuron; the kept set is never smaller than
asked; the sets are nested (a higher percentile keeps a subset); every kept neuron
has a contribution at least as large as every dropped one. ``k`` is computed in
exact decimal arithmetic from ``repr(p)``, so ``p = 70`` on 10 neurons keeps 3, not
4 from a floating-point ``0.30000000000000004 * 10``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

import torch
from torch import Tensor

__all__ = ["check_percentile", "kept_count", "select_top_neurons"]


def check_percentile(percentile: float) -> float:
    """Validate a pathway percentile: a real number in ``[0, 100)``."""
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)):
        raise TypeError(f"percentile must be a number in [0, 100), got {percentile!r}")
    value = float(percentile)
    if not math.isfinite(value) or not 0.0 <= value < 100.0:
        raise ValueError(
            f"percentile must lie in [0, 100) (the share of neurons dropped, in percent), "
            f"got {percentile!r}; use e.g. 85 to keep the top 15% of neurons"
        )
    return value


def kept_count(total: int, percentile: float) -> int:
    """Number of neurons kept out of ``total`` at ``percentile``: ``ceil((100 - p) / 100 * N)``.

    Examples
    --------
    >>> kept_count(10, 70.0)
    3
    >>> kept_count(10, 0)
    10
    >>> kept_count(10, 99.9)
    1
    """
    p = Fraction(repr(check_percentile(percentile)))
    return math.ceil((100 - p) * int(total) / 100)


def select_top_neurons(
    contributions: Mapping[str, Tensor],
    percentile: float,
    order: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Boolean masks of the neurons on the critical pathway of each input.

    Parameters
    ----------
    contributions : mapping of str to Tensor
        Per layer, non-negative contributions ``[batch, *shape]`` (all layers share
        the batch size).
    percentile : float
        :math:`p \\in [0, 100)`; the top ``ceil((100 - p)% of N)`` neurons per input are
        kept (see the module docstring for ties).
    order : sequence of str, optional
        Forward order of the layers, used for tie-breaking; default the mapping's order.

    Returns
    -------
    dict of str to Tensor
        Boolean masks shaped like the contributions.

    Raises
    ------
    ValueError
        On NaN contributions, mismatched batch sizes or an empty set of layers.
    """
    percentile = check_percentile(percentile)
    names = list(order) if order is not None else list(contributions)
    if not names:
        raise ValueError("no layers to select neurons from")
    missing = [n for n in names if n not in contributions]
    if missing:
        raise ValueError(f"order names layers {missing} that have no contributions")
    tensors = [contributions[n] for n in names]
    batch = tensors[0].shape[0]
    for name, tensor in zip(names, tensors, strict=True):
        if tensor.shape[0] != batch:
            raise ValueError(
                f"layer {name!r} has {tensor.shape[0]} examples but {names[0]!r} has {batch}"
            )
    sizes = [t[0].numel() for t in tensors]
    total = sum(sizes)
    k = kept_count(total, percentile)
    rows = []
    for b in range(batch):
        flat = torch.cat([t[b].reshape(-1) for t in tensors])
        if torch.isnan(flat).any():
            raise ValueError(f"contributions of example {b} contain NaN; check the model output")
        rows.append(_top_k_first_in_order(flat, k))
    masks = torch.stack(rows)
    result = {}
    for name, tensor, piece in zip(names, tensors, masks.split(sizes, dim=1), strict=True):
        result[name] = piece.reshape(tensor.shape)
    return result


def _top_k_first_in_order(flat: Tensor, k: int) -> Tensor:
    """Mask of the ``k`` largest entries; ties resolved by lower index."""
    n = flat.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    values = flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat
    # k-th largest value = (n - k + 1)-th smallest
    threshold = torch.kthvalue(values, n - k + 1).values
    above = values > threshold
    need = k - int(above.sum())
    ties = values == threshold
    return above | (ties & (torch.cumsum(ties, 0) <= need))
