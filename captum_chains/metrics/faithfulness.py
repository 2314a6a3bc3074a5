"""Faithfulness of a chain's scores: does a higher score mean a more important filter?

NeuroChains (Wang, Zhou and Bilmes, TMLR 2022), Fig. 2 (right): every filter kept in the
sub-network is removed *alone* from the sub-network, and the resulting *degradation*
(how much the fidelity drop of Fig. 2 left grows) is compared with the filter's score.
A faithful chain shows a positive correlation: the filters NeuroChains scored highest
hurt most when removed.

For a region x_1..x_N with original prediction y_n = argmax p_n, sub-network output q_n
and sub-network-without-filter-i output q_n^(-i)::

    degradation_i = mean_n (q_n[y_n] - q_n^(-i)[y_n])
    drop_i        = mean_n (p_n[y_n] - q_n^(-i)[y_n])    (= fidelity drop of the reduced net)

The removals are batched: ``K`` single-filter removals run in one forward pass of
``K * N`` inputs, each consecutive group of N inputs masked by its own row of scores
(see :func:`captum_chains.masking.apply_masks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from captum_chains._utils.progress import tqdm
from captum_chains._utils.validation import check_batch_size, format_additional_args
from captum_chains.masking import MaskState, apply_masks
from captum_chains.metrics._common import (
    ChainLike,
    as_subnetwork,
    chunked_logits,
    correlations,
    model_logits,
    region_inputs,
)


@dataclass(frozen=True)
class FaithfulnessResult:
    """Per-filter removal effects and their correlation with the scores.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per kept unit: ``layer``, ``unit`` (index in the layer), ``label``,
        ``score``, ``degradation`` (mean ``q[y] - q^(-i)[y]``), ``drop`` (mean
        ``p[y] - q^(-i)[y]``), ``kl`` (mean ``KL(p || q^(-i))``) and ``agreement``
        (fraction of inputs whose prediction survives the removal).
    pearson, spearman : float
        Correlation of ``score`` with ``degradation`` (NaN for fewer than 3 units or
        constant columns).
    pearson_p, spearman_p : float
        Their two-sided p-values.
    base_drop : float
        Mean fidelity drop ``p[y] - q[y]`` of the whole sub-network, for reference.
    """

    table: Any
    pearson: float
    pearson_p: float
    spearman: float
    spearman_p: float
    base_drop: float

    def summary(self) -> dict[str, float]:
        """Correlations and the number of units evaluated."""
        return {
            "pearson": self.pearson,
            "pearson_p": self.pearson_p,
            "spearman": self.spearman,
            "spearman_p": self.spearman_p,
            "num_units": float(len(self.table)),
        }


def _repeat(items: tuple[Any, ...], k: int, n: int) -> tuple[Any, ...]:
    """Repeat batch tensors k times along dim 0 (group j = copy j); leave other args."""
    return tuple(
        torch.cat([a] * k) if isinstance(a, torch.Tensor) and a.ndim > 0 and a.shape[0] == n else a
        for a in items
    )


def faithfulness(
    chain: ChainLike,
    inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    additional_forward_args: Any = None,
    *,
    batch_size: int = 256,
    max_units: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> FaithfulnessResult:
    """Remove each kept unit alone from the sub-network and correlate the damage with its score.

    Parameters
    ----------
    chain : Chain or SubNetwork
        The chain.
    inputs : Tensor or tuple of Tensor, optional
        The region's inputs ``[N, ...]``; default those stored in ``chain``.
    additional_forward_args : Any, optional
        Extra forward arguments; tensors with batch dimension ``N`` are repeated with
        the inputs.
    batch_size : int
        Inputs per forward pass: ``max(1, batch_size // N)`` removals are evaluated
        together.
    max_units : int, optional
        Evaluate only a random subset of at most this many kept units (drawn with
        ``seed``); all kept units when ``None``. Each removal costs a forward pass over
        the region, so large models may need a subset.
    seed : int
        Seed of the subset draw.
    progress : bool
        Show a tqdm bar over the batches of removals.

    Returns
    -------
    FaithfulnessResult
        The per-unit table and the Pearson/Spearman correlations of score with
        degradation (Fig. 2, right).
    """
    check_batch_size(batch_size, "batch_size")
    sub = as_subnetwork(chain)
    items = region_inputs(chain, inputs)
    extra = format_additional_args(additional_forward_args)
    n = items[0].shape[0]
    model, structure = sub.model, sub.structure
    p = F.softmax(model_logits(model, items, extra, batch_size), dim=1).double()
    q = F.softmax(chunked_logits(sub, items, extra, batch_size), dim=1).double()
    y = p.argmax(dim=1)
    py = p.gather(1, y[:, None]).squeeze(1)
    qy = q.gather(1, y[:, None]).squeeze(1)

    scores = sub.scores.detach()
    kept = torch.nonzero(scores > 0).flatten()
    if max_units is not None:
        if isinstance(max_units, bool) or not isinstance(max_units, int) or max_units < 1:
            raise ValueError(f"max_units must be a positive int or None, got {max_units!r}")
        if len(kept) > max_units:
            gen = torch.Generator().manual_seed(seed)
            pick = torch.randperm(len(kept), generator=gen)[:max_units].sort().values
            kept = kept[pick.to(kept.device)]
    base = sub.mask_state()
    offsets = structure.offsets()
    per_pass = max(1, batch_size // n)
    results: list[torch.Tensor] = []
    tiny = torch.finfo(torch.float64).tiny
    chunks = list(kept.split(per_pass)) if len(kept) else []  # split() of nothing is [empty]
    state = MaskState(gates=dict(base.gates))
    with torch.no_grad(), apply_masks(model, structure, state):
        for chunk in tqdm(chunks, desc="faithfulness", disable=not progress, leave=False):
            k = len(chunk)
            rows = scores.unsqueeze(0).repeat(k, 1)
            rows[torch.arange(k), chunk] = 0
            state.scores = {name: rows[:, a:b] for name, (a, b) in offsets.items()}
            logits = model(*_repeat(items, k, n), *_repeat(extra, k, n))
            r = F.softmax(logits.double(), dim=1).view(k, n, -1)
            ry = r.gather(2, y.view(1, n, 1).expand(k, n, 1)).squeeze(2)
            kl = (p.unsqueeze(0) * (p.clamp_min(tiny).log() - r.clamp_min(tiny).log())).sum(2)
            agree = (r.argmax(dim=2) == y.unsqueeze(0)).double()
            results.append(
                torch.stack(
                    [
                        (qy.unsqueeze(0) - ry).mean(1),
                        (py.unsqueeze(0) - ry).mean(1),
                        kl.clamp_min(0).mean(1),
                        agree.mean(1),
                    ],
                    dim=1,
                )
            )
    stats = torch.cat(results) if results else torch.zeros(0, 4, dtype=torch.float64)
    return _result(structure, offsets, kept, scores, stats, float((py - qy).mean()))


def _result(structure, offsets, kept, scores, stats, base_drop) -> FaithfulnessResult:
    import pandas as pd

    names, units = [], []
    for flat in kept.tolist():
        for name, (a, b) in offsets.items():
            if a <= flat < b:
                names.append(name)
                units.append(flat - a)
                break
    table = pd.DataFrame(
        {
            "layer": names,
            "unit": units,
            "label": [structure.unit(nm).label(u) for nm, u in zip(names, units, strict=True)],
            "score": scores[kept].double().tolist(),
            "degradation": stats[:, 0].tolist(),
            "drop": stats[:, 1].tolist(),
            "kl": stats[:, 2].tolist(),
            "agreement": stats[:, 3].tolist(),
        }
    )
    corr = correlations(table["score"], table["degradation"])
    return FaithfulnessResult(table=table, base_drop=base_drop, **corr)
