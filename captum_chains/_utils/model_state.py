"""What an explanation method must leave unchanged on a user's model, and how it runs it.

:class:`ModelSnapshot` records parameters, buffers, their ``.grad``, hooks, training
flags, ``requires_grad`` flags, devices and dtypes (the tests check every algorithm
with it); :func:`eval_mode` runs a model in eval mode without changing anything that
another thread can see.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

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
    grads: dict[str, torch.Tensor | None]

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
            grads={
                k: None if p.grad is None else p.grad.detach().clone()
                for k, p in model.named_parameters()
            },
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
        for key, before_grad in self.grads.items():
            after_grad = now.grads.get(key)
            if (before_grad is None) != (after_grad is None) or (
                before_grad is not None
                and after_grad is not None
                and not torch.equal(before_grad, after_grad)
            ):
                problems.append(f"param:{key}: .grad changed")
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


class ConcurrentUseError(RuntimeError):
    """A model that another thread is using cannot be switched to eval mode safely."""


@dataclass
class _Users:
    """Who is running one model inside :func:`eval_mode` right now."""

    model: nn.Module  # held so that ``id(model)`` cannot be reused while registered
    threads: Counter[int] = field(default_factory=Counter)  # thread -> open uses
    owner: int | None = None  # the thread whose use changes what others see, if any

    def others(self, me: int) -> int:
        return sum(n for thread, n in self.threads.items() if thread != me)


_USERS: dict[int, _Users] = {}
_USERS_LOCK = threading.Lock()


@contextmanager
def eval_mode(model: nn.Module, *, exclusive: bool = False) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode without changing anything another thread can see.

    A model whose modules are all in eval mode already (the usual case for a pretrained
    model) is left exactly as it is: any number of threads may use it at once. A model
    with a module in training mode is switched to eval mode for the duration and switched
    back in ``finally`` (also after an exception or ``KeyboardInterrupt``); since that
    switch is visible to every thread, it is refused with :class:`ConcurrentUseError` while
    another thread runs the same model through this function, and vice versa.

    Parameters are never touched: ``requires_grad`` flags stay as they are, and the
    package takes gradients with ``torch.autograd.grad`` so that no ``.grad`` of the
    model's parameters is written.

    Parameters
    ----------
    model : nn.Module
        The user's model.
    exclusive : bool
        The body changes what other threads would see of the model (e.g.
        ``torch.func.functional_call`` swaps its tensors during a call): refuse, and be
        refused, like a mode switch.

    Raises
    ------
    ConcurrentUseError
        If the use would change the model under another thread's feet.
    """
    me = threading.get_ident()
    modes = [(m, m.training) for m in model.modules()]
    switch = any(training for _, training in modes)
    with _USERS_LOCK:
        users = _USERS.setdefault(id(model), _Users(model))
        owned_elsewhere = users.owner not in (None, me)
        if owned_elsewhere or ((switch or exclusive) and users.others(me) > 0):
            if not users.threads:
                del _USERS[id(model)]
            what = "is in training mode" if switch and not owned_elsewhere else "is being changed"
            raise ConcurrentUseError(
                f"{type(model).__name__} {what} while another thread runs it through "
                "captum_chains; going on would change that thread's results. Call "
                "model.eval() before sharing the model between threads (and keep sub-networks "
                "at the model's dtype and device), or give each thread its own "
                "copy.deepcopy(model)."
            )
        users.threads[me] += 1
        claimed = (switch or exclusive) and users.owner is None
        if claimed:
            users.owner = me
        if switch:
            model.eval()
    try:
        yield model
    finally:
        with _USERS_LOCK:
            if switch:
                for m, training in modes:
                    m.training = training
            if claimed:
                users.owner = None
            users.threads[me] -= 1
            if users.threads[me] == 0:
                del users.threads[me]
            if not users.threads:
                del _USERS[id(model)]
