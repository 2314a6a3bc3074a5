"""Sphinx configuration of the captum-chains documentation.

Build with ``make -C docs html`` (``sphinx-build -W --keep-going -b html docs
docs/_build/html``). The tutorials in ``tutorials/`` (reached through the ``docs/tutorials``
link) are jupytext percent-format ``.py`` notebooks that myst-nb executes at build time;
an error cell, or anything a cell writes to stderr (warnings included), fails the build.
Executed notebooks are cached in ``docs/_build/.jupyter_cache`` keyed on their code, so a
rebuild only re-runs the tutorials that changed; ``CAPTUM_CHAINS_DOCS_EXECUTE=force``
re-runs all of them, ``=off`` none.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))  # percent_notebooks: the tutorials' reader
# Notebook kernels inherit the environment: single-threaded torch, because multi-threaded
# small ops spin on shared CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import captum_chains  # noqa: E402

# -- project ------------------------------------------------------------------------
project = "captum-chains"
author = "captum-chains contributors"
copyright = "2025, captum-chains contributors"
release = captum_chains.__version__
version = release

# -- general ------------------------------------------------------------------------
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "_templates",
    "_ext",
    "conf.py",
    "Thumbs.db",
    ".DS_Store",
    "**/.ipynb_checkpoints",
    "**/__pycache__",
    "tutorials/_*",
    "make_example_report.py",  # a script, not a page (.py files are read as notebooks)
]

# -- API reference (autosummary + autodoc + napoleon for numpy-style docstrings) ------
autosummary_generate = True
autosummary_ignore_module_all = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
python_maximum_signature_line_length = 90
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_ivar = True  # "Attributes" sections as fields: no duplicate object entries
napoleon_use_rtype = False

# -- MyST and notebooks -------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_custom_formats = {".py": ["percent_notebooks.reads", {"fmt": "py:percent"}]}
nb_execution_mode = os.environ.get("CAPTUM_CHAINS_DOCS_EXECUTE", "cache")
nb_execution_timeout = int(os.environ.get("CAPTUM_CHAINS_DOCS_TIMEOUT", "900"))  # per cell
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_output_stderr = "warn"
nb_merge_streams = True

# -- equations: MathJax served with the site ------------------------------------------
# The site must render its equations offline (CI machines, air-gapped readers): the
# MathJax 2 of the `jupyter-server-mathjax` package (docs extra) is copied into
# _static/mathjax after the build. Without that package, Sphinx's default (MathJax 3 from
# a CDN) is used.
try:
    _MATHJAX = Path(find_spec("jupyter_server_mathjax").submodule_search_locations[0]) / "static"
except (AttributeError, ImportError, TypeError):
    _MATHJAX = None
if _MATHJAX is not None and (_MATHJAX / "MathJax.js").is_file():
    mathjax_path = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"
    # the package ships the STIX web fonts only
    mathjax2_config = {
        "HTML-CSS": {
            "availableFonts": [],
            "imageFont": None,
            "preferredFont": None,
            "webFont": "STIX-Web",
        }
    }
    # myst's MathJax 3 settings (`window.MathJax = {...}`) would replace this configuration
    myst_update_mathjax = False
else:
    _MATHJAX = None


def _copy_mathjax(app: Any, exception: Exception | None) -> None:
    if exception is None and _MATHJAX is not None and app.builder.format == "html":
        shutil.copytree(
            _MATHJAX,
            Path(app.outdir) / "_static" / "mathjax",
            ignore=shutil.ignore_patterns("SVG"),  # the HTML-CSS output is used
            dirs_exist_ok=True,
        )


# -- HTML -----------------------------------------------------------------------------
html_theme = "furo"
html_title = f"captum-chains {release}"
html_static_path = ["_static"] if (DOCS / "_static").is_dir() else []
html_theme_options = {"navigation_with_keys": True}


# -- toctree entries of pages still being written -------------------------------------
# docs/index.md lists every planned page and tutorial. An entry whose file does not exist
# (yet) is dropped when index.md is read, so that the build does not fail on it; the build
# log names the dropped entries. tests/test_docs.py checks the converse: every existing
# page is listed.
_TOCTREE = re.compile(r"(```\{toctree\}\n)(.*?)(```)", flags=re.S)


def _existing_entries(app: Any, docname: str, source: list[str]) -> None:
    if docname != "index":
        return
    found = app.env.found_docs
    dropped = []

    def keep(match: re.Match[str]) -> str:
        lines = []
        for line in match.group(2).splitlines(keepends=True):
            entry = line.strip()
            if entry and not entry.startswith(":") and entry not in found:
                dropped.append(entry)
                continue
            lines.append(line)
        return match.group(1) + "".join(lines) + match.group(3)

    source[0] = _TOCTREE.sub(keep, source[0])
    if dropped:
        from sphinx.util import logging

        logging.getLogger(__name__).info("index: not (yet) written, left out: %s", dropped)


def _reread_index(app: Any, env: Any, added: set, changed: set, removed: set) -> list[str]:
    # which entries exist can change without index.md changing: always re-read it (cheap)
    return ["index"]


def setup(app: Any) -> None:
    app.connect("source-read", _existing_entries)
    app.connect("env-get-outdated", _reread_index)
    app.connect("build-finished", _copy_mathjax)
