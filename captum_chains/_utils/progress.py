"""The package's progress bars: tqdm's notebook widget where it can be drawn, text elsewhere.

``tqdm.auto`` picks the notebook widget inside Jupyter and, when ``ipywidgets`` is not
installed, warns (``TqdmWarning: IProgress not found``) on import. The package's modules
therefore choose the widget only when ``ipywidgets`` is importable and use the plain text
bar otherwise, without a warning. (Captum's own ``tqdm.auto`` import still warns in such a
kernel; the ``docs`` extra installs ``ipywidgets`` for the executed tutorials.)
"""

from __future__ import annotations

from importlib.util import find_spec

if find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:
    from tqdm.std import tqdm

__all__ = ["tqdm"]
