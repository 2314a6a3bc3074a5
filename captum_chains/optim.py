"""Proximal Adam for NeuroChains' l1-penalized scores (Eq. 8), and its step schedule.

The score objective ``KL(S) + lambda * ||S||_1`` is a smooth term plus a non-smooth one,
the setting of proximal gradient methods (ISTA/FISTA; scikit-learn's coordinate descent
solves the same lasso-type problem). :class:`ProximalAdam` takes a gradient step on the
smooth part only, in Adam's diagonal metric ``D = sqrt(v_hat) + eps``, then applies the
closed-form proximal operator of the l1 term (and of the constraint ``s >= 0`` when
asked) in that metric:

    s <- prox(s - lr * m_hat / D),   prox(z) = soft_threshold(z, lr * lambda / D)

Scores whose smooth gradient cannot outweigh lambda land *exactly* on zero and stay there
(a plain subgradient method makes them oscillate around zero instead). ``v_hat`` is the
second moment of the gradient of the whole objective, ``g + lambda * sign(s)`` (on
``s >= 0`` the l1 norm is linear, so that is ``g + lambda``): every score then moves at
Adam's rate of about ``lr`` per step, including the marginal ones whose smooth gradient
nearly balances lambda, which a metric built from ``g`` alone would slow down. A fixed
point of the iteration is a stationary point of Eq. 8 (the proximal-gradient optimality
condition), whatever the metric.

**Free scores fall faster** (``free_rate``). At Adam's rate a score needs ~180 steps to fall
from 1 to tau, although most scores are held by nothing: their smoothed KL gradient ``m_hat``
does not push back against lambda. A group's ``free_rate`` multiplies the step size of
exactly those entries (``m_hat > -lambda / 2``), in the gradient and in the proximal step
alike, so each iteration is still a proximal-gradient step (with a per-entry step size) and
the fixed points are unchanged; the entries the KL holds keep the rate ``lr``, at which the
needed filters are sorted from the others.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

#: An entry is free (moves at ``free_rate * lr``) while ``m_hat > -FREE_MARGIN * l1``.
FREE_MARGIN = 0.5

#: The largest step size NeuroChains gives a free score (``max_free_lr``): from 1 to 0 in
#: no fewer than 20 steps, the fastest descent measured that still lets ``m_hat`` catch the
#: scores the KL holds (EfficientNet-Lite0: 10 x 0.005; 15 x 0.005 removed filters the
#: region needed, docs/defaults.md). It keeps ``free_rate`` safe at a larger ``lr``.
FREE_LR_CAP = 0.05


def soft_threshold(z: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """``sign(z) * max(|z| - threshold, 0)``: the proximal operator of ``threshold * |.|``.

    Parameters
    ----------
    z : Tensor
        The point after the gradient step.
    threshold : Tensor or float
        Non-negative threshold, broadcast against ``z``.
    """
    return torch.sign(z) * torch.clamp(z.abs() - threshold, min=0)


def nonnegative_soft_threshold(z: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """``max(z - threshold, 0)``: the proximal operator of ``threshold * s + [s >= 0]``.

    On ``s >= 0`` the l1 norm is linear, so its prox is a shift followed by the projection.
    """
    return torch.clamp(z - threshold, min=0)


class ProximalAdam(torch.optim.Optimizer):
    """Adam on the smooth loss, followed by an exact l1 proximal step (see module doc).

    Parameters
    ----------
    params : iterable
        Tensors or parameter groups. A group may set ``l1`` (lambda, default 0: plain Adam
        in the metric ``sqrt(v_hat) + eps``) and ``nonnegative`` (project on ``s >= 0``).
    lr : float
        Step size.
    betas, eps : as in :class:`torch.optim.Adam`.
    l1 : float
        Default lambda of the groups.
    nonnegative : bool
        Default constraint of the groups.
    free_rate : float
        Default step-size multiplier of the entries nothing holds (``m_hat > -l1 / 2``) in
        groups with ``l1 > 0``; 1: every entry at ``lr`` (see module doc).
    max_free_lr : float, optional
        Default cap on the step size of those entries: they step at
        ``max(lr, min(free_rate * lr, max_free_lr))``. ``None``: no cap.

    Notes
    -----
    The ``.grad`` of each parameter must hold the gradient of the *smooth* part of the
    objective only; the l1 term enters through the proximal step.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        l1: float = 0.0,
        nonnegative: bool = False,
        free_rate: float = 1.0,
        max_free_lr: float | None = None,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"ProximalAdam needs lr > 0, got {lr}")
        if not (math.isfinite(l1) and l1 >= 0):
            raise ValueError(f"ProximalAdam needs a finite l1 >= 0, got {l1}")
        if not (math.isfinite(free_rate) and free_rate >= 1):
            raise ValueError(f"ProximalAdam needs a finite free_rate >= 1, got {free_rate}")
        if max_free_lr is not None and not (math.isfinite(max_free_lr) and max_free_lr > 0):
            raise ValueError(f"ProximalAdam needs max_free_lr > 0 or None, got {max_free_lr}")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "l1": l1,
            "nonnegative": nonnegative,
            "free_rate": free_rate,
            "max_free_lr": max_free_lr,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]  # torch: overloads
        """One proximal Adam step on every parameter that has a gradient."""
        if closure is not None:
            raise ValueError("ProximalAdam does not take a closure")
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, l1, eps = group["lr"], group["l1"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["m"], state["v"]
                # gradient of the whole objective, for the metric only
                if group["nonnegative"]:
                    whole = p.grad + l1
                else:
                    whole = p.grad + l1 * torch.sign(p)
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(whole, whole, value=1 - beta2)
                m_hat = m / (1 - beta1**t)
                metric = (v / (1 - beta2**t)).sqrt().add_(eps)
                rate: torch.Tensor | float = lr
                if l1 > 0 and group.get("free_rate", 1.0) != 1.0:
                    free = m_hat > -l1 * FREE_MARGIN
                    fast_lr = lr * group["free_rate"]
                    cap = group.get("max_free_lr")
                    if cap is not None:
                        fast_lr = max(lr, min(fast_lr, cap))
                    fast = m_hat.new_tensor(fast_lr)  # in p's dtype
                    rate = torch.where(free, fast, m_hat.new_tensor(lr))
                z = p - rate * m_hat / metric
                if l1 > 0 or group["nonnegative"]:
                    threshold = rate * l1 / metric
                    prox = nonnegative_soft_threshold if group["nonnegative"] else soft_threshold
                    z = prox(z, threshold)
                p.copy_(z)


def two_phase_schedule(descent_steps: int, refine_fraction: float) -> Any:
    """A multiplier for ``LambdaLR``: 1 for ``descent_steps`` steps, then ``refine_fraction``."""

    def factor(step: int) -> float:
        return 1.0 if step < descent_steps else refine_fraction

    return factor
