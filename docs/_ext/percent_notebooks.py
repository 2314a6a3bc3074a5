"""Read the jupytext percent-format tutorials for myst-nb (``nb_custom_formats`` in conf.py).

A tutorial without a ``kernelspec`` header gets the Python 3 kernel's, so that its code
cells are highlighted as Python even when the build does not execute it
(``make html-noexec``); an executed notebook learns its language from the kernel anyway.
"""

from __future__ import annotations

from typing import Any

import jupytext

PYTHON3 = {"name": "python3", "display_name": "Python 3", "language": "python"}


def reads(text: str, fmt: str = "py:percent") -> Any:
    """The notebook of ``text``, with the Python 3 kernelspec if it names none."""
    notebook = jupytext.reads(text, fmt=fmt)
    notebook.metadata.setdefault("kernelspec", dict(PYTHON3))
    return notebook
