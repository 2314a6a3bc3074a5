"""Per-thread scaled affine parameters for BatchNorm modules, without touching them.

``s * (gamma * x_hat + beta) == (gamma * s) * x_hat + beta * s``: scaling a BatchNorm's
output channels costs nothing extra when the scale is folded into its affine parameters.
The masking context does that for speed. Swapping ``module._parameters`` would be seen by
every thread that runs the model (and by the user's own hooks), so instead the module's
class is replaced, for as long as any thread folds into it, by a subclass that is
identical except that

* ``weight`` and ``bias`` are read through a property that returns the scaled tensors
  only inside a ``forward`` call made by a thread that registered a fold for this module
  (everywhere else: the module's own ``Parameter``);
* ``forward`` asks the calling thread's fold, if any, for the scaled tensors first.

Other threads, ``state_dict()``, ``named_parameters()`` and hooks (which run outside
``forward``) see the module unchanged; copies and pickles made meanwhile are of the
original class. The class is restored when the last fold leaves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

#: A fold: returns the scaled ``(weight, bias)`` for this forward call, or ``None``.
Fold = Callable[[], "tuple[torch.Tensor, torch.Tensor] | None"]

_LOCAL = threading.local()
_LOCK = threading.Lock()
_INSTALLED: dict[int, tuple[nn.Module, type, int]] = {}  # id -> (module, original class, users)
_SUBCLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _folds() -> dict[int, Fold]:
    table = getattr(_LOCAL, "folds", None)
    if table is None:
        table = _LOCAL.folds = {}
    return table


def _active() -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    table = getattr(_LOCAL, "active", None)
    if table is None:
        table = _LOCAL.active = {}
    return table


def _parameter(index: int, name: str) -> property:
    def get(self: nn.Module) -> Any:
        scaled = _active().get(id(self))
        return self._parameters[name] if scaled is None else scaled[index]

    return property(get)


def _folding_subclass(base: type[nn.Module]) -> type[nn.Module]:
    """The subclass of ``base`` that reads thread-local scaled ``weight``/``bias``."""
    cls = _SUBCLASSES.get(base)
    if cls is not None:
        return cls

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        fold = _folds().get(id(self))
        scaled = fold() if fold is not None else None
        if scaled is None:
            return base.forward(self, *args, **kwargs)
        active = _active()
        active[id(self)] = scaled
        try:
            return base.forward(self, *args, **kwargs)
        finally:
            del active[id(self)]

    def __reduce_ex__(self: nn.Module, protocol: Any) -> Any:
        # copies and pickles taken while a fold is installed are of the original class
        reduced = object.__reduce_ex__(self, protocol)
        return (_new_instance, (base,), *reduced[2:])

    cls = type(
        base.__name__,
        (base,),
        {
            "forward": forward,
            "__reduce_ex__": __reduce_ex__,
            "weight": _parameter(0, "weight"),
            "bias": _parameter(1, "bias"),
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
        },
    )
    _SUBCLASSES[base] = cls
    return cls


def _new_instance(cls: type[nn.Module]) -> Any:
    """An empty instance of ``cls`` (unpickling restores its state)."""
    return object.__new__(cls)


def _install(module: nn.Module) -> None:
    entry = _INSTALLED.get(id(module))
    if entry is None:
        original = type(module)
        module.__class__ = _folding_subclass(original)
        _INSTALLED[id(module)] = (module, original, 1)
    else:
        _INSTALLED[id(module)] = (entry[0], entry[1], entry[2] + 1)


def _uninstall(module: nn.Module) -> None:
    held, original, users = _INSTALLED[id(module)]
    if users > 1:
        _INSTALLED[id(module)] = (held, original, users - 1)
    else:
        module.__class__ = original
        del _INSTALLED[id(module)]


@contextmanager
def folded_norms(folds: Mapping[nn.Module, Fold]) -> Iterator[None]:
    """Let the calling thread run each BatchNorm in ``folds`` with scaled affine parameters.

    Parameters
    ----------
    folds : mapping of nn.Module to callable
        BatchNorm module -> a function called at each of its forward passes in this thread,
        returning the ``(weight, bias)`` to use in that pass, or ``None`` for the module's
        own. Nested uses in one thread override the outer fold for the same module.
    """
    table = _folds()
    previous = {id(m): table.get(id(m)) for m in folds}
    installed: list[nn.Module] = []
    try:
        with _LOCK:
            for module in folds:
                _install(module)
                installed.append(module)
        for module, fold in folds.items():
            table[id(module)] = fold
        yield
    finally:
        for key, earlier in previous.items():
            if earlier is None:
                table.pop(key, None)
            else:
                table[key] = earlier
        with _LOCK:
            for module in installed:
                _uninstall(module)
