"""Stability of a chain on unseen inputs near its region.

NeuroChains (Wang, Zhou and Bilmes, TMLR 2022), Figs. 3 and 14: a chain extracted on a
few inputs should still explain the model on *nearby unseen* inputs. For each input of
the region, its K nearest neighbours are taken from a pool of unseen inputs, in the
model's penultimate-layer space (the input of the final classifier); the union of all
neighbours (duplicates removed) is the test set at K, and the sub-network's test
fidelity there - agreement of its top-1 prediction with the original model's - is
reported as a function of K.

The penultimate layer is found generically (:func:`find_classifier`): the last module
with its own parameters that runs in the forward pass and whose output has the shape of
the logits (e.g. the last ``nn.Linear`` of a VGG/ResNet head, timm's ``head`` or
``classifier``); its flattened input is the feature vector. Pass ``layer=`` to choose
another module (its flattened *input* is used).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from captum_chains._utils.hooks import this_thread_only
from captum_chains._utils.model_state import eval_mode
from captum_chains._utils.validation import check_batch_size, check_device, format_inputs
from captum_chains.metrics._common import (
    ChainLike,
    as_subnetwork,
    chunked_logits,
    model_logits,
    region_inputs,
)

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 20)


def find_classifier(model: nn.Module, example: torch.Tensor) -> str:
    """Name of the module that produces the logits (the final classifier).

    Runs one forward pass on ``example`` with temporary hooks on every module that owns
    parameters, and returns the last one called whose output has the logits' shape;
    if none matches (e.g. a parameter-free op follows the classifier), the last
    module with parameters that ran.

    Raises
    ------
    ValueError
        If the model has no module with parameters.
    """
    calls: list[tuple[str, tuple[int, ...]]] = []
    handles = []

    def record(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else ()
            calls.append((name, shape))

        return hook

    try:
        for name, module in model.named_modules():
            if name and any(True for _ in module.parameters(recurse=False)):
                handles.append(module.register_forward_hook(this_thread_only(record(name))))
        with eval_mode(model), torch.no_grad():
            logits = model(example)
    finally:
        for h in handles:
            h.remove()
    if not calls:
        raise ValueError(
            f"{type(model).__name__} has no module with parameters to take penultimate "
            "features from; pass layer=<module name> explicitly"
        )
    shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else None
    for name, out_shape in reversed(calls):
        if out_shape == shape:
            return name
    return calls[-1][0]


def penultimate_features(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    layer: str | None = None,
    batch_size: int | None = 256,
) -> torch.Tensor:
    """Flattened input of the final classifier (or of ``layer``) for each input.

    Parameters
    ----------
    model : nn.Module
        The original model.
    inputs : Tensor
        ``[N, ...]`` inputs.
    layer : str, optional
        Module whose (first) input is the feature space; default
        :func:`find_classifier`.
    batch_size : int, optional
        Inputs per forward pass.

    Returns
    -------
    Tensor
        ``[N, D]`` float32 features.
    """
    check_batch_size(batch_size, "batch_size")
    (x,) = format_inputs(inputs)
    name = layer if layer is not None else find_classifier(model, x[:2])
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"the model has no module {name!r} to take features from") from err
    captured: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0].detach().flatten(1).float())

    handle = module.register_forward_pre_hook(this_thread_only(hook))
    try:
        model_logits(model, (x,), (), batch_size)
    finally:
        handle.remove()
    feats = torch.cat(captured)
    if feats.shape[0] != x.shape[0]:
        raise ValueError(
            f"module {name!r} ran {len(captured)} times per batch; choose a module that runs "
            "once per forward pass as layer="
        )
    return feats


def nearest_neighbours(queries: torch.Tensor, pool: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[N, k]`` of the ``k`` nearest pool rows (Euclidean) of each query.

    Ties are broken by the lower pool index; rows are sorted by distance.
    """
    if k > pool.shape[0]:
        raise ValueError(f"k={k} is larger than the pool ({pool.shape[0]} inputs)")
    dist = torch.cdist(queries.double(), pool.double())
    order = torch.sort(dist, dim=1, stable=True).indices
    return order[:, :k]


@dataclass(frozen=True)
class StabilityResult:
    """Test fidelity of a sub-network on the K nearest unseen neighbours of its region.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per K: ``k``, ``neighbours`` (distinct pool inputs in the union of the
        region's K-NN sets), ``agreement`` (fraction of them on which the sub-network's
        top-1 equals the model's), ``mean_drop`` (mean ``p[y] - q[y]``), and, when pool
        labels are given, ``model_accuracy`` and ``subnetwork_accuracy``.
    indices : Tensor
        ``[N, max(ks)]`` pool indices of each region input's neighbours, nearest first.
    """

    table: Any
    indices: torch.Tensor

    def agreement(self, k: int) -> float:
        """Agreement at ``k`` (one of the evaluated Ks)."""
        rows = self.table[self.table["k"] == k]
        if rows.empty:
            raise KeyError(f"k={k} was not evaluated; evaluated: {self.table['k'].tolist()}")
        return float(rows["agreement"].iloc[0])

    def neighbours(self, k: int) -> torch.Tensor:
        """Distinct pool indices in the union of the K-NN sets (sorted)."""
        return torch.unique(self.indices[:, :k])


def _check_ks(ks: Sequence[int], pool_size: int) -> list[int]:
    if isinstance(ks, int):
        ks = [ks]
    ks = list(ks)
    if not ks:
        raise ValueError("ks is empty; pass the neighbourhood sizes to evaluate, e.g. (1, 5, 20)")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"every K must be a positive int, got {k!r}")
        if k > pool_size:
            raise ValueError(
                f"K={k} is larger than the pool of {pool_size} unseen inputs; use K <= "
                f"{pool_size} or a larger pool"
            )
    return sorted(set(ks))


def stability(
    chain: ChainLike,
    pool: torch.Tensor,
    inputs: torch.Tensor | None = None,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    pool_labels: torch.Tensor | None = None,
    layer: str | None = None,
    batch_size: int | None = 256,
) -> StabilityResult:
    """Test fidelity of the sub-network on the K nearest unseen neighbours (Figs. 3, 14).

    Parameters
    ----------
    chain : Chain or SubNetwork
        The chain.
    pool : Tensor
        ``[M, ...]`` unseen inputs, same per-input shape as the region.
    inputs : Tensor, optional
        The region's inputs (those the chain was extracted on); default those stored in
        ``chain``.
    ks : sequence of int
        Neighbourhood sizes K (each <= M).
    pool_labels : Tensor, optional
        ``[M]`` ground-truth labels of the pool, to also report accuracies.
    layer : str, optional
        Module whose flattened input is the feature space (default: the final
        classifier, :func:`find_classifier`).
    batch_size : int, optional
        Inputs per forward pass.

    Returns
    -------
    StabilityResult
        Agreement and fidelity drop per K, and the neighbour indices.

    Raises
    ------
    ValueError
        If the pool's per-input shape differs from the region's, a K exceeds the pool
        size, or ``pool_labels`` does not match the pool.
    """
    check_batch_size(batch_size, "batch_size")
    sub = as_subnetwork(chain)
    items = region_inputs(chain, inputs)
    if len(items) != 1:
        raise TypeError("stability supports models with a single input tensor")
    x = items[0]
    if not isinstance(pool, torch.Tensor):
        raise TypeError(f"pool must be a tensor of unseen inputs, got {type(pool).__name__}")
    (pool,) = format_inputs(pool)
    check_device(sub.model, (pool,))
    if pool.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"the pool holds inputs of shape {tuple(pool.shape[1:])} but the region's inputs "
            f"have shape {tuple(x.shape[1:])}; build the pool with the same preprocessing"
        )
    ks = _check_ks(ks, pool.shape[0])
    if pool_labels is not None and pool_labels.reshape(-1).shape[0] != pool.shape[0]:
        raise ValueError(
            f"pool_labels has {pool_labels.numel()} entries but the pool has {pool.shape[0]}"
        )
    model = sub.model
    name = layer if layer is not None else find_classifier(model, x[:2])
    fx = penultimate_features(model, x, layer=name, batch_size=batch_size)
    fpool = penultimate_features(model, pool, layer=name, batch_size=batch_size)
    indices = nearest_neighbours(fx, fpool, max(ks))
    union = torch.unique(indices)
    test = pool[union]
    p = torch.softmax(model_logits(model, (test,), (), batch_size), dim=1)
    q = torch.softmax(chunked_logits(sub, (test,), (), batch_size), dim=1)
    y = p.argmax(dim=1)
    drop = p.gather(1, y[:, None]).squeeze(1) - q.gather(1, y[:, None]).squeeze(1)
    agree = (q.argmax(dim=1) == y).double()
    position = {int(j): i for i, j in enumerate(union.tolist())}
    labels = None if pool_labels is None else pool_labels.reshape(-1).to(y.device)[union]
    rows = []
    for k in ks:
        rows_k = torch.tensor([position[int(j)] for j in torch.unique(indices[:, :k]).tolist()])
        row = {
            "k": k,
            "neighbours": len(rows_k),
            "agreement": float(agree[rows_k].mean()),
            "mean_drop": float(drop[rows_k].double().mean()),
        }
        if labels is not None:
            row["model_accuracy"] = float((y[rows_k] == labels[rows_k]).double().mean())
            row["subnetwork_accuracy"] = float(
                (q.argmax(dim=1)[rows_k] == labels[rows_k]).double().mean()
            )
        rows.append(row)
    import pandas as pd

    return StabilityResult(table=pd.DataFrame(rows), indices=indices)
