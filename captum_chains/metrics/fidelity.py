"""Fidelity of a sub-network to the original model on given inputs.

NeuroChains (Wang, Zhou and Bilmes, TMLR 2022), Fig. 2 (left): with
``p = softmax(F(x; W))`` the original model's output, ``q = softmax(F(x; W * S))`` the
sub-network's and ``y = argmax p`` the original prediction, the *fidelity drop* of an
input is ``p[y] - q[y]``: how much probability of the original predicted class is lost
when the sub-network replaces the model. A chain is faithful to its region when the
drop is small, the top-1 predictions agree and ``KL(p || q)`` (the quantity NeuroChains
minimizes, Eq. 8) is small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from captum_chains._utils.validation import check_batch_size, format_additional_args
from captum_chains.metrics._common import (
    ChainLike,
    as_subnetwork,
    both_probabilities,
    region_inputs,
)


@dataclass(frozen=True)
class FidelityResult:
    """Per-input fidelity of a sub-network.

    Attributes
    ----------
    predicted : Tensor
        ``[N]`` original predicted class ``y = argmax p``.
    original_prob : Tensor
        ``[N]`` ``p[y]``, the original model's probability of ``y``.
    subnetwork_prob : Tensor
        ``[N]`` ``q[y]``, the sub-network's probability of ``y``.
    drop : Tensor
        ``[N]`` fidelity drop ``p[y] - q[y]`` (negative when the sub-network is *more*
        confident).
    agreement : Tensor
        ``[N]`` bool, ``argmax q == y``.
    kl : Tensor
        ``[N]`` ``KL(p || q)`` in nats.
    """

    predicted: torch.Tensor
    original_prob: torch.Tensor
    subnetwork_prob: torch.Tensor
    drop: torch.Tensor
    agreement: torch.Tensor
    kl: torch.Tensor

    @property
    def mean_drop(self) -> float:
        """Average fidelity drop over the inputs."""
        return float(self.drop.mean())

    @property
    def median_drop(self) -> float:
        """Median fidelity drop over the inputs."""
        return float(self.drop.median())

    @property
    def agreement_rate(self) -> float:
        """Fraction of inputs whose top-1 prediction the sub-network keeps."""
        return float(self.agreement.float().mean())

    @property
    def mean_kl(self) -> float:
        """Average ``KL(p || q)``."""
        return float(self.kl.mean())

    def to_frame(self) -> Any:
        """One row per input, as a ``pandas.DataFrame``."""
        import pandas as pd

        return pd.DataFrame(
            {
                "predicted": self.predicted.tolist(),
                "original_prob": self.original_prob.tolist(),
                "subnetwork_prob": self.subnetwork_prob.tolist(),
                "drop": self.drop.tolist(),
                "agreement": self.agreement.tolist(),
                "kl": self.kl.tolist(),
            }
        )

    def summary(self) -> dict[str, float]:
        """Averages: ``mean_drop``, ``median_drop``, ``agreement``, ``kl``."""
        return {
            "mean_drop": self.mean_drop,
            "median_drop": self.median_drop,
            "agreement": self.agreement_rate,
            "kl": self.mean_kl,
        }


def fidelity_from_probs(p: torch.Tensor, q: torch.Tensor) -> FidelityResult:
    """Fidelity of output distribution ``q`` to ``p`` (both ``[N, C]`` probabilities).

    Parameters
    ----------
    p : Tensor
        Softmax outputs of the original model.
    q : Tensor
        Softmax outputs of the sub-network (same shape).
    """
    if p.ndim != 2 or p.shape != q.shape:
        raise ValueError(
            f"p and q must be [N, C] probabilities of the same shape, got {tuple(p.shape)} "
            f"and {tuple(q.shape)}"
        )
    p, q = p.double(), q.double()
    y = p.argmax(dim=1)
    py = p.gather(1, y[:, None]).squeeze(1)
    qy = q.gather(1, y[:, None]).squeeze(1)
    tiny = torch.finfo(torch.float64).tiny
    kl = (p * (p.clamp_min(tiny).log() - q.clamp_min(tiny).log())).sum(1).clamp_min(0)
    return FidelityResult(
        predicted=y,
        original_prob=py.float(),
        subnetwork_prob=qy.float(),
        drop=(py - qy).float(),
        agreement=q.argmax(dim=1) == y,
        kl=kl.float(),
    )


def fidelity(
    chain: ChainLike,
    inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    additional_forward_args: Any = None,
    *,
    batch_size: int | None = None,
) -> FidelityResult:
    """Fidelity of a chain's sub-network to the original model (Fig. 2, left).

    Parameters
    ----------
    chain : Chain or SubNetwork
        The chain (its ``subnetwork.model`` is the original model).
    inputs : Tensor or tuple of Tensor, optional
        Inputs ``[N, ...]``; default the region stored in ``chain``.
    additional_forward_args : Any, optional
        Extra forward arguments (Captum convention).
    batch_size : int, optional
        Inputs per forward pass (default: all at once).

    Returns
    -------
    FidelityResult
        Per-input drop ``p[y] - q[y]``, top-1 agreement and ``KL(p || q)``.

    Examples
    --------
    >>> fid = fidelity(chain)                                    # doctest: +SKIP
    >>> fid.mean_drop, fid.agreement_rate                        # doctest: +SKIP
    """
    check_batch_size(batch_size, "batch_size")
    sub = as_subnetwork(chain)
    items = region_inputs(chain, inputs)
    p, q = both_probabilities(
        sub, items, format_additional_args(additional_forward_args), batch_size
    )
    return fidelity_from_probs(p, q)
