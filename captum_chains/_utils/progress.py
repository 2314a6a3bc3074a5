"""The package's progress bars: tqdm's notebook widget where it can be drawn, text elsewhere.

``tqdm.auto`` picks the notebook widget inside Jupyter and, when ``ipywidgets`` is not
installed, warns (``TqdmWarning: IProgress not found``) on import. That warning would reach
every notebook that imports captum-chains, so the widget is chosen only when ``ipywidgets``
is importable; otherwise the plain text bar is used without a warning.
"""

from __future__ import annotations

from importlib.util import find_spec

if find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:
    from tqdm.std import tqdm

__all__ = ["tqdm"]
