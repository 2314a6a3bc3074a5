"""Lazy public names of a package: module-level ``__getattr__`` (PEP 562, as in SPEC 1).

``import captum_chains`` then costs next to nothing: the modules that define the public
names (and the heavy libraries they need: torch, timm, matplotlib, ...) are imported on
first access of a name, and the value is cached on the package so the next access is a
plain attribute lookup.

Example
-------
In a package's ``__init__.py``::

    from typing import TYPE_CHECKING

    from captum_chains._utils.lazy import attach

    if TYPE_CHECKING:  # what type checkers and IDEs see; keep in sync with the mapping
        from captum_chains.result import Chain

    __getattr__, __dir__ = attach(__name__, {"result": ["Chain"]}, submodules=["result"])
    __all__ = ["Chain"]

A public name must not equal the name of a submodule that defines it (``metrics.fidelity``
the function vs ``metrics/fidelity.py``): once anything imports the submodule, Python binds
it on the package and the lazy lookup never runs. Import such names eagerly.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from captum_chains._utils.optional import explain


def attach(
    package: str,
    names: Mapping[str, Iterable[str]],
    submodules: Iterable[str] = (),
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of a package with lazily imported names.

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    names : mapping of str to iterable of str
        Submodule (relative to ``package``, e.g. ``"neurochains"`` or ``"units.base"``)
        -> the public names it defines.
    submodules : iterable of str
        Subpackages or modules reachable as attributes (``captum_chains.metrics``) without
        an explicit import.

    Returns
    -------
    getattr_, dir_ : callable
        Assign them to the package's ``__getattr__`` and ``__dir__``.

    Raises
    ------
    ValueError
        If a public name is listed under two submodules or equals a submodule's name.
    """
    where: dict[str, str] = {}
    for module, attrs in names.items():
        for attr in attrs:
            if attr in where:
                raise ValueError(
                    f"{package}: {attr!r} listed under both {where[attr]!r} and {module!r}"
                )
            where[attr] = module
    subs = frozenset(submodules)
    clash = sorted(subs & where.keys())
    if clash:
        raise ValueError(f"{package}: {clash} are both public names and submodules")

    def getattr_(name: str) -> Any:
        if name not in where and name not in subs:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            if name in where:
                value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
            else:
                value = importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as err:  # an optional dependency: name its extra
            friendly = explain(err, f"{package}.{name}")
            if friendly is err:
                raise
            raise friendly from err
        setattr(sys.modules[package], name, value)  # cache: the next lookup is direct
        return value

    def dir_() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | where.keys() | subs)

    return getattr_, dir_
