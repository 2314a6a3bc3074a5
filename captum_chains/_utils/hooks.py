"""Hooks on a user's model that act only in the thread that registered them.

A hook registered on a module fires for every call of that module, from any thread. The
package's hooks (masks, tracers, activation recorders) must change or record only the
calls made by the computation that registered them, so that another thread running the
same model (plain ``model(x)``, another extraction) sees the model as it is.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

HookFn = TypeVar("HookFn", bound=Callable[..., Any])


def this_thread_only(hook: HookFn, module: object | None = None) -> HookFn:
    """Wrap ``hook`` so that it runs only in the calling thread (elsewhere it returns None).

    A forward (pre-)hook returning ``None`` leaves the call unchanged, so the wrapped hook
    is invisible to other threads. With ``module`` given, it also does nothing when called
    for another module (a ``copy.deepcopy`` of the model taken while the hook is
    registered carries the hook along; the copy stays unaffected).
    """
    owner = threading.get_ident()

    @functools.wraps(hook)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        # inside torch.compile the owner traces its own compiled forward: no thread check
        # (it would break the graph at every hook)
        if not torch.compiler.is_compiling() and threading.get_ident() != owner:
            return None
        if module is not None and args[0] is not module:
            return None
        return hook(*args, **kwargs)

    return cast(HookFn, guarded)
