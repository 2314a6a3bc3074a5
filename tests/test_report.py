"""The chain report: one self-contained HTML page, every figure rendered in Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pytest
import torch
from conftest import make_inputs, make_model

import captum_chains.report as report_module
from captum_chains import ChainExtractor
from captum_chains.report import SECTIONS

SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "_build" / "screenshots"
FAST = dict(steps=12, finetune_steps=3, l1=0.02, gate_penalty=0.05)
OPTIONS = dict(filter_steps=8, max_filters=2, max_inputs=2, strict=True)


@pytest.fixture(scope="module")
def chain():
    torch.manual_seed(0)
    model = make_model("plain", 4, 0)
    return ChainExtractor(model, **FAST).attribute(make_inputs(6, size=16), progress=False)


@pytest.fixture(scope="module")
def page(chain, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report") / "chain.html"
    with torch.no_grad():
        before = [p.clone() for p in chain.subnetwork.model.parameters()]
    assert chain.report(path, title="Tiny <CNN>", info={"images": "a & b"}, **OPTIONS) == path
    after = list(chain.subnetwork.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    return path


def test_report_is_one_self_contained_page(page):
    text = page.read_text()
    for name in SECTIONS:
        assert f'<section id="{name}">' in text, name
    assert "could not be drawn" not in text
    sources = re.findall(r'<img src="([^"]+)"', text)
    assert len(sources) >= len(SECTIONS) - 1  # every section but the summary has a figure
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # nothing is fetched: no script, no style sheet, no remote or relative resource
    assert "<script" not in text and "<link" not in text
    assert not re.search(r'(src|href)="(?!data:|#)', text)
    assert "Tiny &lt;CNN&gt;" in text and "a &amp; b" in text  # escaped
    assert "top-1 agreement" in text and "Strongest paths" in text


def test_sections_options_and_failures(chain, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown report sections"):
        chain.report(tmp_path / "a.html", sections=("summary", "nope"))
    with pytest.raises(ValueError, match="ReportOptions"):
        chain.report(tmp_path / "a.html", no_such_option=1)
    with pytest.raises(ValueError, match=r"\.html"):
        chain.report(tmp_path / "a.png")
    path = chain.report(tmp_path / "summary.html", sections=("summary", "architecture"))
    assert '<section id="graph">' not in path.read_text()

    def broken(*args):
        raise RuntimeError("no convolution here")

    monkeypatch.setitem(report_module._BUILDERS, "compare", ("Compare", broken))
    with pytest.warns(RuntimeWarning, match="no convolution here"):
        path = chain.report(tmp_path / "b.html", sections=("summary", "compare"))
    assert "could not be drawn: RuntimeError: no convolution here" in path.read_text()
    with pytest.raises(RuntimeError, match="no convolution"):
        chain.report(tmp_path / "c.html", sections=("compare",), strict=True)


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
        "--virtual-time-budget=10000",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


# Appended to a copy of the page (the report itself holds no script): once everything has
# loaded, list every image with its decoded size.
PROBE = """<pre id="probe">pending</pre><script>
window.addEventListener("load", () => {
  const images = Array.from(document.images).map(
    (i) => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);
  document.getElementById("probe").textContent = JSON.stringify({
    title: document.title, images: images,
    sections: document.querySelectorAll("section").length});
});
</script>"""


def test_report_renders_in_chromium(page, tmp_path):
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    result = _chromium_run(["--dump-dom", probe_page.as_uri()], tmp_path)
    match = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, flags=re.S)
    assert match, f"Chromium gave no DOM:\n{result.stderr[-3000:]}"
    assert match.group(1) != "pending", "the page did not finish loading"
    probe = json.loads(unescape(match.group(1)))
    assert probe["title"] == "Tiny <CNN>"
    assert probe["sections"] == len(SECTIONS)
    assert len(probe["images"]) >= len(SECTIONS) - 1
    broken = [i for i in probe["images"] if not (i[1] and i[2] > 0 and i[3] > 0)]
    assert not broken, f"figures that did not render: {broken}"

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / "chain_report.png"
    shot.unlink(missing_ok=True)
    result = _chromium_run(
        ["--window-size=1200,4000", f"--screenshot={shot}", page.as_uri()], tmp_path
    )
    assert shot.is_file(), f"no screenshot:\n{result.stderr[-3000:]}"
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1200, 4000)
        colours = image.convert("RGB").resize((120, 400)).getcolors(maxcolors=120 * 400)
    assert colours is not None and len(colours) > 50, "the screenshot looks blank"
