"""Loss terms of NeuroChains (Eq. 5 and 8 of the paper), each with a name.

All terms take tensors for K independent regions at once and return one value per
region, so that K chains can be optimized in one forward/backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_divergence(
    log_p: torch.Tensor, logits_q: torch.Tensor, regions: int, target: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean KL(p || q) per region, p the original and q the scored network's softmax.

    Parameters
    ----------
    log_p : Tensor
        Original log-probabilities ``[K * B, C]`` (constants).
    logits_q : Tensor
        Logits of the scored network ``[K * B, C]``.
    regions : int
        K; consecutive groups of ``B`` rows form one region.
    target : Tensor, optional
        ``[K * B]`` class indices. When given, the divergence is the *binary* KL between
        ``(p_t, 1 - p_t)`` and ``(q_t, 1 - q_t)`` of the target class ``t`` of each input:
        only the target classes' probabilities are preserved, the split of the remaining
        mass among the other classes is free.

    Returns
    -------
    Tensor
        ``[K]`` mean divergence over each region's inputs.
    """
    log_q = F.log_softmax(logits_q.float(), dim=1)
    if target is None:
        per_input = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    else:
        idx = target.view(-1, 1)
        lp, lq = log_p.gather(1, idx).squeeze(1), log_q.gather(1, idx).squeeze(1)
        per_input = binary_kl(lp, lq)
    return per_input.view(regions, -1).mean(dim=1)


def _log1mexp(log_x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(log_x)) for log_x <= 0, numerically stable."""
    log_x = log_x.clamp(max=-1e-12)
    return torch.where(
        log_x > -0.6931, torch.log(-torch.expm1(log_x)), torch.log1p(-torch.exp(log_x))
    )


def binary_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL between Bernoulli(p) and Bernoulli(q) given log p and log q (elementwise)."""
    p = log_p.exp()
    return p * (log_p - log_q) + (1 - p) * (_log1mexp(log_p) - _log1mexp(log_q))


def l1_penalty(scores: torch.Tensor) -> torch.Tensor:
    """Sum of ``|scores|`` per region (``scores``: ``[K, U]``)."""
    return scores.abs().sum(dim=1)


def gate_penalty(alphas: torch.Tensor, temperature: float, on: str) -> torch.Tensor:
    """Gate penalty per region: sum of alpha (``on="alpha"``) or of the gates sigmoid(alpha/T)."""
    if alphas.shape[1] == 0:
        return alphas.new_zeros(alphas.shape[0])
    if on == "alpha":
        return alphas.sum(dim=1)
    return torch.sigmoid(alphas / temperature).sum(dim=1)
