"""The documentation site: structure checks (fast) and a full build checked in Chromium (slow).

The slow test runs ``sphinx-build -W --keep-going -E`` into ``docs/_build/html`` (the
same folder as ``make -C docs html``), which executes every tutorial (myst-nb, cached in
``docs/_build/.jupyter_cache``: a second run re-executes only changed tutorials) and fails
on any warning or error cell. It then serves the site over HTTP and opens the quick-start
page in headless Chromium (Debian package ``chromium``): a screenshot
(``docs/_build/screenshots/quickstart.png``) must show the rendered figures, and the page's
images must all load, with no error or stderr output cells; the equations of the method
page must be typeset by MathJax (served with the site, no network needed).

``docs/check_site.sh`` (the CI step) builds the site cold with ``make -C docs html`` and then
runs these tests with ``CAPTUM_CHAINS_DOCS_BUILT=1``, which checks that site instead of
building it again, and ``CAPTUM_CHAINS_REQUIRE_CHROMIUM=1``, which fails instead of
skipping when Chromium is missing.
"""

from __future__ import annotations

import fnmatch
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from html import unescape
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIALS = ROOT / "tutorials"
SITE = DOCS / "_build" / "html"
SCREENSHOTS = DOCS / "_build" / "screenshots"
# myst-nb classes of output cells that must not appear in an executed tutorial
ERROR_OUTPUT = re.compile(r'class="[^"]*\boutput (?:traceback|stderr|error)\b')


def _toctree_patterns() -> list[str]:
    text = (DOCS / "index.md").read_text()
    blocks = re.findall(r"```\{toctree\}\n(.*?)```", text, flags=re.S)
    entries = []
    for block in blocks:
        for line in block.splitlines():
            line = line.strip()
            if line and not line.startswith(":"):
                entries.append(line)
    return entries


def _docnames() -> list[str]:
    names = [
        p.relative_to(DOCS).with_suffix("").as_posix()
        for p in DOCS.glob("*")
        if p.suffix in {".md", ".rst"} and p.stem != "index"
    ]
    names += [f"tutorials/{p.stem}" for p in TUTORIALS.glob("*.py") if not p.name.startswith("_")]
    return sorted(names)


def test_every_page_and_tutorial_is_in_the_toctree() -> None:
    """Sphinx fails (-W) on a page outside every toctree; name the missing ones here."""
    patterns = _toctree_patterns()
    assert "tutorials/quickstart" in patterns
    missing = [d for d in _docnames() if not any(fnmatch.fnmatch(d, p) for p in patterns)]
    assert not missing, f"add these to a toctree in docs/index.md: {missing}"


def test_tutorials_link_into_the_docs() -> None:
    assert (DOCS / "tutorials").resolve() == TUTORIALS.resolve()
    for name in ("quickstart", "your_model"):
        assert (TUTORIALS / f"{name}.py").is_file()


@pytest.mark.parametrize(
    "path",
    sorted(p for p in TUTORIALS.glob("*.py") if not p.name.startswith("_")),
    ids=lambda p: p.stem,
)
def test_tutorials_are_percent_notebooks_with_a_title(path: Path) -> None:
    jupytext = pytest.importorskip("jupytext")
    notebook = jupytext.reads(path.read_text(), fmt="py:percent")
    cells = notebook.cells
    assert cells[0].cell_type == "markdown"
    assert cells[0].source.lstrip().startswith("# "), "the first cell must hold the page title"
    code = [c for c in cells if c.cell_type == "code"]
    assert code, "a tutorial executes code"
    compile(
        "\n".join(c.source for c in code if not c.source.lstrip().startswith(("%", "!"))),
        str(path),
        "exec",
    )


# ----------------------------------------------------------------------------- full build
@pytest.fixture(scope="module")
def site() -> Path:
    pytest.importorskip("sphinx", reason="sphinx is not installed (pip install '.[docs]')")
    pytest.importorskip("myst_nb", reason="myst-nb is not installed (pip install '.[docs]')")
    pytest.importorskip("furo", reason="furo is not installed (pip install '.[docs]')")
    if os.environ.get("CAPTUM_CHAINS_DOCS_BUILT"):  # built just before (docs/check_site.sh)
        assert (SITE / "index.html").is_file(), f"no site in {SITE}: run make -C docs html"
        return SITE
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": ""}
    command = [
        sys.executable,
        "-m",
        "sphinx",
        "-W",
        "--keep-going",
        "-E",
        "-b",
        "html",
        "-d",
        str(DOCS / "_build" / "doctrees"),
        str(DOCS),
        str(SITE),
    ]
    result = subprocess.run(command, cwd=DOCS, env=env, capture_output=True, text=True)
    log = result.stdout[-6000:] + result.stderr[-6000:]
    assert result.returncode == 0, f"the docs build failed:\n{log}"
    return SITE


@pytest.mark.slow
def test_site_has_every_page(site: Path) -> None:
    for page in (
        "index.html",
        "tutorials/quickstart.html",
        "tutorials/your_model.html",
        "neurochains.html",
        "howto_custom_model.html",
        "cli.html",
        "api.html",
        "changelog.html",
        "generated/captum_chains.html",
        "generated/captum_chains.neurochains.html",
    ):
        assert (site / page).is_file(), page
    api = (site / "generated" / "captum_chains.neurochains.html").read_text()
    assert "ChainExtractor" in api and "attribute_many" in api


@pytest.mark.slow
def test_api_reference_covers_every_public_module(site: Path) -> None:
    import importlib
    import pkgutil

    import captum_chains

    generated = site / "generated"
    for module in pkgutil.walk_packages(captum_chains.__path__, "captum_chains."):
        if any(part.startswith("_") for part in module.name.split(".")):
            continue
        page = generated / f"{module.name}.html"
        assert page.is_file(), f"no API page for {module.name}"
        importlib.import_module(module.name)
    extractor = (generated / "captum_chains.neurochains.html").read_text()
    # autodoc rendered the numpy-style docstrings: parameters as fields, signatures
    assert 'class="field-list' in extractor and 'class="sig ' in extractor


@pytest.mark.slow
def test_changelog_is_rendered(site: Path) -> None:
    html = (site / "changelog.html").read_text()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## \[?([0-9][^\]\s]*)", changelog, flags=re.M)
    assert versions, "CHANGELOG.md names no version"
    for version in versions:
        assert version in html


@pytest.mark.slow
def test_executed_tutorials_have_outputs_and_no_error_cells(site: Path) -> None:
    pages = sorted((site / "tutorials").glob("*.html"))
    assert {p.stem for p in pages} >= {"quickstart", "your_model"}
    for page in pages:
        html = page.read_text()
        assert not ERROR_OUTPUT.search(html), f"{page.name} has an error or stderr cell"
        assert 'class="cell_output' in html, f"{page.name} was not executed"
    quickstart = (site / "tutorials" / "quickstart.html").read_text()
    assert "SubNetwork of EfficientNet" in quickstart  # the printed summary


class _Handler(http.server.SimpleHTTPRequestHandler):
    probe = ""

    def do_GET(self) -> None:
        if self.path.startswith("/__probe__.html"):
            body = self.probe.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


# Opens ?page=... in an iframe and reports what the browser made of it, once MathJax (if
# the page loads it) has typeset every equation.
PROBE = """<!doctype html><html><body>
<iframe id="page" width="1280" height="900"></iframe>
<pre id="result">pending</pre>
<script>
const frame = document.getElementById("page");
frame.addEventListener("load", () => {
  const win = frame.contentWindow, doc = frame.contentDocument;
  const report = () => {
    const images = Array.from(doc.querySelectorAll("img")).map(
      (i) => [i.getAttribute("src"), i.complete, i.naturalWidth, i.naturalHeight]);
    document.getElementById("result").textContent = JSON.stringify({
      title: doc.title,
      images: images,
      errors: doc.querySelectorAll(".output.traceback, .output.stderr, .output.error").length,
      outputs: doc.querySelectorAll(".cell_output").length,
      math: doc.querySelectorAll(".math.notranslate").length,  // Sphinx's equations
      typeset: doc.querySelectorAll("script[type^='math/tex']").length,
      math_errors: doc.querySelectorAll(".MathJax_Error, merror").length,
    });
  };
  if (win.MathJax && win.MathJax.Hub) { win.MathJax.Hub.Queue(report); } else { report(); }
});
frame.src = new URLSearchParams(location.search).get("page");
</script></body></html>"""


@pytest.fixture(scope="module")
def server(site: Path) -> Iterator[str]:
    handler = functools.partial(_Handler, directory=str(site))
    _Handler.probe = PROBE
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    message = "headless Chromium is not installed (Debian: apt-get install chromium)"
    if os.environ.get("CAPTUM_CHAINS_REQUIRE_CHROMIUM"):
        pytest.fail(message)
    pytest.skip(message)


def _chromium_run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    command = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=20000",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=240)


def _probe(server: str, page: str, tmp_path: Path) -> dict:
    result = _chromium_run(["--dump-dom", f"{server}/__probe__.html?page=/{page}"], tmp_path)
    match = re.search(r'<pre id="result">(.*?)</pre>', result.stdout, flags=re.S)
    assert match, f"Chromium gave no DOM:\n{result.stderr[-3000:]}"
    assert match.group(1) != "pending", f"{page} did not finish loading"
    return json.loads(unescape(match.group(1)))


@pytest.mark.slow
def test_equations_are_typeset_by_mathjax(server: str, tmp_path: Path) -> None:
    probe = _probe(server, "neurochains.html", tmp_path)
    assert probe["math"] >= 5, probe  # the method page states the paper's equations
    assert probe["typeset"] >= probe["math"], f"MathJax did not typeset the equations: {probe}"
    assert probe["math_errors"] == 0


@pytest.mark.slow
def test_quickstart_renders_in_chromium(server: str, tmp_path: Path) -> None:
    probe = _probe(server, "tutorials/quickstart.html", tmp_path)
    assert "Quick start" in probe["title"]
    assert probe["errors"] == 0
    assert probe["outputs"] >= 5
    figures = [i for i in probe["images"] if "_images/" in (i[0] or "")]
    assert len(figures) >= 3, probe["images"]  # the region, the architecture, the SMOE maps
    broken = [i for i in probe["images"] if not (i[1] and i[2] > 0 and i[3] > 0)]
    assert not broken, f"images that did not load: {broken}"


@pytest.mark.slow
def test_quickstart_screenshot_shows_the_figures(server: str, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / "quickstart.png"
    shot.unlink(missing_ok=True)
    result = _chromium_run(
        ["--window-size=1280,7000", f"--screenshot={shot}", f"{server}/tutorials/quickstart.html"],
        tmp_path,
    )
    assert shot.is_file(), f"no screenshot:\n{result.stderr[-3000:]}"
    with Image.open(shot) as image:
        assert image.size == (1280, 7000)
        hsv = np.asarray(image.convert("RGB").convert("HSV")).astype(int)
    saturation, value = hsv[..., 1], hsv[..., 2]
    ink = float((value < 200).mean())
    colour = float(((saturation > 90) & (value > 60)).mean())
    assert ink > 0.02, "the page looks blank"
    # text and code are mostly grey; the figures (photos, viridis and jet maps) are colourful
    assert colour > 0.03, f"only {colour:.1%} colourful pixels: are the figures missing?"
