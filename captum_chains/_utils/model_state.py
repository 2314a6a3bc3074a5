"""Snapshots of everything about a model that an explanation method must leave unchanged.

Used by the package to guarantee, and by the tests to check, that a user's model
leaves every call exactly as it came: parameters, buffers, hooks, training flags,
``requires_grad`` flags, devices and dtypes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def _hook_ids(module: nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((attr, tuple(getattr(module, attr, {}).keys())) for attr in _HOOK_DICTS)


@dataclass(frozen=True)
class ModelSnapshot:
    """A deep copy of a model's tensors plus its flags and hook registrations.

    Examples
    --------
    >>> snap = ModelSnapshot.take(model)          # doctest: +SKIP
    >>> run_something(model)                      # doctest: +SKIP
    >>> snap.assert_unchanged(model)              # doctest: +SKIP
    """

    tensors: dict[str, torch.Tensor]
    requires_grad: dict[str, bool]
    training: dict[str, bool]
    hooks: dict[str, tuple]
    tensor_hooks: dict[str, int]

    @classmethod
    def take(cls, model: nn.Module) -> ModelSnapshot:
        """Record the current state of ``model``."""
        tensors = {f"param:{k}": v.detach().clone() for k, v in model.named_parameters()}
        tensors.update({f"buffer:{k}": v.detach().clone() for k, v in model.named_buffers()})
        return cls(
            tensors=tensors,
            requires_grad={k: p.requires_grad for k, p in model.named_parameters()},
            training={k: m.training for k, m in model.named_modules()},
            hooks={k: _hook_ids(m) for k, m in model.named_modules()},
            tensor_hooks={k: len(p._backward_hooks or {}) for k, p in model.named_parameters()},
        )

    def differences(self, model: nn.Module) -> list[str]:
        """Describe every way in which ``model`` differs from the snapshot (empty if none)."""
        now = ModelSnapshot.take(model)
        problems: list[str] = []
        if now.tensors.keys() != self.tensors.keys():
            problems.append("the set of parameters/buffers changed")
        for key, before in self.tensors.items():
            after = now.tensors.get(key)
            if after is None:
                continue
            if after.dtype != before.dtype or after.device != before.device:
                problems.append(f"{key}: dtype/device changed")
            elif after.shape != before.shape or not torch.equal(after, before):
                problems.append(f"{key}: values changed")
        for name, attr in (
            ("requires_grad", "requires_grad"),
            ("training mode", "training"),
            ("hooks", "hooks"),
            ("tensor hooks", "tensor_hooks"),
        ):
            if getattr(now, attr) != getattr(self, attr):
                problems.append(f"{name} changed")
        return problems

    def assert_unchanged(self, model: nn.Module) -> None:
        """Raise ``AssertionError`` listing the differences, if any."""
        problems = self.differences(model)
        if problems:
            raise AssertionError("model changed: " + "; ".join(problems[:10]))


@contextmanager
def frozen_eval(model: nn.Module, *, freeze: bool = True) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with parameters frozen, and restore both on exit.

    Restoration happens in ``finally``, so it also runs when the body raises or is
    interrupted (``KeyboardInterrupt``).

    Parameters
    ----------
    model : nn.Module
        The user's model.
    freeze : bool
        Also set ``requires_grad=False`` on every parameter (no weight gradients are
        computed in the body).
    """
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        if freeze:
            for p, _ in grads:
                p.requires_grad_(False)
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in grads:
            p.requires_grad_(flag)
