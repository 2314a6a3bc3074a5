"""Shared plumbing of the metrics: resolve a chain, format inputs, run networks in chunks."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from captum_chains._utils.model_state import eval_mode
from captum_chains._utils.validation import check_device, format_inputs, slice_additional_args
from captum_chains.subnetwork import SubNetwork

if TYPE_CHECKING:  # a Chain is recognised by its sub-network: no runtime import of result
    from captum_chains.result import Chain

ChainLike = Union["Chain", SubNetwork]


def _is_chain(chain: Any) -> bool:
    """Whether ``chain`` is a :class:`~captum_chains.Chain` (it carries a SubNetwork)."""
    return not isinstance(chain, SubNetwork) and isinstance(
        getattr(chain, "subnetwork", None), SubNetwork
    )


def as_subnetwork(chain: Any) -> SubNetwork:
    """The SubNetwork of a :class:`Chain`, or ``chain`` itself if it is a SubNetwork."""
    if _is_chain(chain):
        return chain.subnetwork
    if isinstance(chain, SubNetwork):
        return chain
    raise TypeError(
        f"expected a Chain (from ChainExtractor.attribute) or a SubNetwork, got "
        f"{type(chain).__name__}"
    )


def region_inputs(chain: Any, inputs: Any, name: str = "inputs") -> tuple[torch.Tensor, ...]:
    """Validated inputs; default to the region stored in a Chain."""
    if inputs is None:
        stored = chain.inputs if _is_chain(chain) else None
        if stored is None:
            raise ValueError(
                f"{name} is None and the chain holds no inputs; pass the region's inputs "
                "explicitly (a SubNetwork does not store them)"
            )
        inputs = stored
    items = format_inputs(inputs)
    check_device(as_subnetwork(chain).model, items)
    return items


def chunked_logits(
    forward: Callable[..., torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    extra: tuple[Any, ...] = (),
    batch_size: int | None = None,
) -> torch.Tensor:
    """``forward(*inputs, *extra)`` in chunks of ``batch_size`` inputs, without gradients.

    Tensor arguments in ``extra`` whose first dimension equals the batch size are sliced
    along with the inputs; others are passed unchanged.
    """
    n = inputs[0].shape[0]
    step = n if batch_size is None else max(1, int(batch_size))
    outs = []
    with torch.no_grad():
        for start in range(0, n, step):
            stop = min(n, start + step)
            chunk = tuple(x[start:stop] for x in inputs)
            out = forward(*chunk, *slice_additional_args(extra, n, start, stop))
            if not isinstance(out, torch.Tensor) or out.ndim != 2:
                raise ValueError("the model must return logits of shape [N, num_classes]")
            outs.append(out.float())
    return torch.cat(outs)


def model_logits(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    extra: tuple[Any, ...] = (),
    batch_size: int | None = None,
) -> torch.Tensor:
    """Logits of the original model in eval mode (its modes are restored afterwards)."""
    with eval_mode(model):
        return chunked_logits(model, inputs, extra, batch_size)


def both_probabilities(
    subnetwork: SubNetwork,
    inputs: tuple[torch.Tensor, ...],
    extra: tuple[Any, ...] = (),
    batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax outputs ``(p, q)`` of the original model and of the sub-network."""
    p = F.softmax(model_logits(subnetwork.model, inputs, extra, batch_size), dim=1)
    q = F.softmax(chunked_logits(subnetwork, inputs, extra, batch_size), dim=1)
    return p, q


def correlations(x: Any, y: Any) -> dict[str, float]:
    """Pearson and Spearman correlations with p-values; NaN when undefined.

    Undefined means fewer than 3 pairs, or a constant ``x`` or ``y``.
    """
    import numpy as np
    from scipy import stats

    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    nan = float("nan")
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"pearson": nan, "pearson_p": nan, "spearman": nan, "spearman_p": nan}
    pr = stats.pearsonr(a, b)
    sr = stats.spearmanr(a, b)
    return {
        "pearson": float(pr.statistic),
        "pearson_p": float(pr.pvalue),
        "spearman": float(sr.statistic),
        "spearman_p": float(sr.pvalue),
    }
