"""The prediction quotient Q(p, q) of NeuroChains, Eq. (9).

For an input with original output ``p`` and modified output ``q`` (e.g. the
sub-network's, or the model's with the chain removed) and ``y = argmax p``::

    Q(p, q) = (q[y] - max_{z != y} q[z]) / (p[y] - max_{z != y} p[z])

The denominator is the original model's margin (> 0 unless ``p`` ties at the top).
``Q = 1``: the margin is preserved; ``0 < Q < 1``: the prediction is kept with a smaller
margin; ``Q > 1``: kept with a larger margin; ``Q < 0``: the prediction flipped to
another class (Fig. 8 of the paper shows histograms of Q).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from captum_chains._utils.validation import check_batch_size, format_additional_args
from captum_chains.metrics._common import (
    ChainLike,
    as_subnetwork,
    chunked_logits,
    model_logits,
    region_inputs,
)
from captum_chains.subnetwork import SubNetwork


def margin(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``probs[y] - max_{z != y} probs[z]`` per row of ``probs`` ``[N, C]``."""
    top = probs.gather(1, y[:, None]).squeeze(1)
    others = probs.scatter(1, y[:, None], float("-inf"))
    return top - others.max(dim=1).values


def quotient(p: torch.Tensor, q: torch.Tensor, *, logits: bool = False) -> torch.Tensor:
    """Q(p, q) of Eq. (9) for each row.

    Parameters
    ----------
    p : Tensor
        ``[N, C]`` original output distribution (the reference; ``y = argmax p``).
    q : Tensor
        ``[N, C]`` modified output distribution.
    logits : bool
        ``p`` and ``q`` are logits; apply a softmax first.

    Returns
    -------
    Tensor
        ``[N]`` float64 quotients; negative where ``argmax q != y``. Rows where ``p`` ties
        at the top (zero denominator) give NaN.

    Raises
    ------
    ValueError
        If the shapes differ, are not ``[N, C]``, or ``C < 2``.
    """
    if p.ndim != 2 or p.shape != q.shape:
        raise ValueError(
            f"p and q must be [N, C] tensors of the same shape, got {tuple(p.shape)} and "
            f"{tuple(q.shape)}"
        )
    if p.shape[1] < 2:
        raise ValueError(f"the quotient needs at least 2 classes, got C={p.shape[1]}")
    p, q = p.double(), q.double()
    if logits:
        p, q = F.softmax(p, dim=1), F.softmax(q, dim=1)
    y = p.argmax(dim=1)
    den = margin(p, y)
    num = margin(q, y)
    out = num / den
    return torch.where(den > 0, out, torch.full_like(out, float("nan")))


def complement_subnetwork(chain: ChainLike) -> SubNetwork:
    """The original model with the chain's kept units removed (every gate open).

    Its scores are 1 for the units the chain removed and 0 for the units it kept:
    the *complement* of the chain. Comparing it with the original model (a negative
    :func:`quotient`) shows whether the chain is necessary for the prediction.
    """
    sub = as_subnetwork(chain)
    scores = (sub.scores <= 0).float()
    gates = torch.ones_like(sub.gates_open)
    return SubNetwork(sub.model, sub.structure, scores, gates)


def prediction_quotient(
    chain: ChainLike,
    inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    additional_forward_args: Any = None,
    *,
    network: Literal["subnetwork", "complement"] = "subnetwork",
    batch_size: int | None = None,
) -> torch.Tensor:
    """Q(p, q) with ``p`` the original model's output and ``q`` a chain-derived network's.

    Parameters
    ----------
    chain : Chain or SubNetwork
        The chain.
    inputs : Tensor or tuple of Tensor, optional
        Inputs; default the region stored in ``chain``.
    additional_forward_args : Any, optional
        Extra forward arguments (Captum convention).
    network : {"subnetwork", "complement"}
        ``"subnetwork"``: q from the sub-network (Q near 1 = faithful chain);
        ``"complement"``: q from the model without the chain's units
        (:func:`complement_subnetwork`; Q < 0 = the chain was necessary).
    batch_size : int, optional
        Inputs per forward pass.

    Returns
    -------
    Tensor
        ``[N]`` quotients (float64).
    """
    check_batch_size(batch_size, "batch_size")
    if network not in ("subnetwork", "complement"):
        raise ValueError(f"network must be 'subnetwork' or 'complement', got {network!r}")
    sub = as_subnetwork(chain)
    items = region_inputs(chain, inputs)
    extra = format_additional_args(additional_forward_args)
    other = sub if network == "subnetwork" else complement_subnetwork(sub)
    p = model_logits(sub.model, items, extra, batch_size)
    q = chunked_logits(other, items, extra, batch_size)
    return quotient(p, q, logits=True)
