"""The value ``v(x_T)`` that AND-OR interactions decompose (Chen et al., ICLR 2024, Sec. 2).

The paper's default is the log-odds of the target class,
``v(x_T) = log p(y | x_T) / (1 - p(y | x_T))``, computed here stably from the logits as
``z_y - logsumexp_{c != y} z_c``. A scalar-output model (``[K]`` or ``[K, 1]``) is read
as the logit of a binary classifier, whose log-odds is the output itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

ValueFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
TargetType = int | Sequence[int] | torch.Tensor | None

VALUE_NAMES = ("log_odds", "reference_log_odds", "logit", "probability", "log_probability")
REFERENCE_EPS = 1e-7


def _scalar(output: torch.Tensor) -> torch.Tensor | None:
    if output.dim() == 1:
        return output
    if output.dim() == 2 and output.shape[1] == 1:
        return output[:, 0]
    return None


def _pick(output: torch.Tensor, target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output[k, target[k]] per row, target)``, after checking the shapes and target."""
    if output.dim() != 2:
        raise ValueError(
            f"the model output must be [K, classes] (or [K] for one score); got "
            f"{tuple(output.shape)}. Wrap the model to return one row of scores per sample"
        )
    if target is None:
        raise ValueError(
            f"target is required for a model with {output.shape[1]} outputs; pass the class "
            "index (int) or one index per sample"
        )
    return output.gather(1, target.view(-1, 1)).squeeze(1), target


def log_odds(output: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """``log p_y / (1 - p_y)`` with ``p = softmax(output)``; the paper's ``v``.

    For a scalar output the output itself (the logit of a binary classifier) is
    returned; with ``target == 0`` its negative (the log-odds of class 0).
    """
    s = _scalar(output)
    if s is not None:
        return s if target is None else torch.where(target.view(-1) == 0, -s, s)
    chosen, picked = _pick(output, target)
    others = output.scatter(1, picked.view(-1, 1), float("-inf"))
    return chosen - torch.logsumexp(others, dim=1)


def reference_log_odds(output: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """The authors' log-odds: ``z_y - M - log(sum_{c≠y} exp(z_c - M) + 1e-7)``.

    ``M = max_{c≠y} z_c``. The ``1e-7`` inside the logarithm (their ``eps``) caps the
    log-odds of the other classes from below; it moves ``v`` by at most ``1e-7``. A
    scalar output is read as in :func:`log_odds` (their ``gt-logistic-odds``).
    """
    s = _scalar(output)
    if s is not None:
        return log_odds(output, target)
    chosen, picked = _pick(output, target)
    others = output.scatter(1, picked.view(-1, 1), float("-inf"))
    top = others.amax(dim=1)
    rest = torch.exp(others - top[:, None]).sum(dim=1)
    return chosen - top - torch.log(rest + REFERENCE_EPS)


def logit(output: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """The raw output (logit) of the target class."""
    s = _scalar(output)
    return s if s is not None else _pick(output, target)[0]


def probability(output: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Softmax probability of the target class (sigmoid for a scalar output)."""
    s = _scalar(output)
    if s is not None:
        p = torch.sigmoid(s)
        return p if target is None else torch.where(target.view(-1) == 0, 1 - p, p)
    return _pick(torch.softmax(output, dim=1), target)[0]


def log_probability(output: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Log-softmax of the target class (log-sigmoid for a scalar output)."""
    s = _scalar(output)
    if s is not None:
        ls = torch.nn.functional.logsigmoid(s)
        if target is None:
            return ls
        return torch.where(target.view(-1) == 0, torch.nn.functional.logsigmoid(-s), ls)
    return _pick(torch.log_softmax(output, dim=1), target)[0]


_VALUES: dict[str, ValueFn] = {
    "log_odds": log_odds,
    "reference_log_odds": reference_log_odds,
    "logit": logit,
    "probability": probability,
    "log_probability": log_probability,
}


def resolve_value(value: str | ValueFn) -> ValueFn:
    """A value function from its name (one of :data:`VALUE_NAMES`) or a callable.

    A callable receives the model output ``[K, ...]`` of ``K`` masked samples and the
    target ``[K]`` (or ``None``) and returns ``[K]`` values.
    """
    if callable(value):
        return value
    if isinstance(value, str) and value in _VALUES:
        return _VALUES[value]
    raise ValueError(f"unknown value {value!r}; use one of {VALUE_NAMES} or a callable")
