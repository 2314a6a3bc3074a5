"""Packaging: lazy imports, optional dependencies and their extras, pyproject consistency."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

import captum_chains
from captum_chains._utils.optional import OPTIONAL, MissingDependencyError, check, require

ROOT = Path(__file__).resolve().parents[1]
HEAVY = (
    "torch",
    "captum",
    "timm",
    "torchvision",
    "networkx",
    "pandas",
    "matplotlib",
    "scipy",
    "sklearn",
    "skimage",
    "captum_chains.export",
    "captum_chains.export.rules_ops",
    "captum_chains.units.vit",
)
LAZY_PACKAGES = (
    "captum_chains",
    "captum_chains.export",
    "captum_chains.pathways",
    "captum_chains.studies",
    "captum_chains.visualization",
    "captum_chains.zoo",
)


def loaded_after(code: str) -> set[str]:
    """The modules in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_import_captum_chains_imports_nothing_heavy():
    loaded = loaded_after("import captum_chains")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_core_api_imports_no_optional_dependency():
    loaded = loaded_after(
        "from captum_chains import ChainExtractor, Chain, ChainConfig, SubNetwork, discover"
    )
    optional = {"timm", "torchvision", "networkx", "pandas", "sklearn", "skimage", "pyarrow"}
    ours = {"captum_chains.export", "captum_chains.chains", "captum_chains.visualization"}
    assert not loaded & (optional | ours), sorted(loaded & (optional | ours))
    assert "captum_chains.units.vit" in loaded  # discover() knows ViTs: its adapter registered


def test_cli_help_imports_no_torch():
    code = (
        "import contextlib, io\nfrom captum_chains.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
        "    for command in ('extract', 'report', 'show'):\n"
        "        try:\n            main([command, '--help'])\n        except SystemExit:\n"
        "            pass"
    )
    loaded = loaded_after(code)
    assert "torch" not in loaded
    assert "numpy" not in loaded


def test_metrics_and_units_import_no_table_or_figure_library():
    loaded = loaded_after("import captum_chains.metrics, captum_chains.units")
    assert not loaded & {"pandas", "networkx", "timm", "torchvision", "sklearn", "skimage"}


def test_export_imports_neither_timm_nor_the_subnetwork_module():
    # timm's layers are recognised without importing timm (nothing of timm can be in a
    # model before timm is imported), and the export never imports captum_chains.subnetwork
    # (which imports the export for SubNetwork.export: one direction only, no cycle)
    loaded = loaded_after("import captum_chains.export.api, captum_chains.export.vit")
    unwanted = {"timm", "torchvision", "captum_chains.subnetwork"}
    assert not loaded & unwanted, sorted(loaded & unwanted)


def test_loaded_class_imports_nothing_new():
    pytest.importorskip("timm")
    code = (
        "from captum_chains._utils.optional import loaded_class\n"
        "assert loaded_class('timm.layers.conv2d_same', 'Conv2dSame') is None\n"
        "from timm.layers.conv2d_same import Conv2dSame\n"
        "assert loaded_class('timm.layers.conv2d_same', 'Conv2dSame') is Conv2dSame\n"
        "assert loaded_class('timm.layers.conv2d_same', 'nothing') is None"
    )
    assert "timm" in loaded_after(code)  # a failing assert fails the subprocess


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_lazy_names_resolve_and_match_the_type_checking_imports(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
        assert name in dir(module)
    # the TYPE_CHECKING block (what mypy and IDEs see) imports exactly the lazy names
    tree = ast.parse(Path(module.__file__).read_text())
    typed: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom)
                typed |= {alias.asname or alias.name for alias in imp.names}
    eager = {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom)
        and (node.module or "").startswith(f"{package}.")
        and "._utils" not in (node.module or "")
        for alias in node.names
    }
    public = set(module.__all__) - {"__version__"}
    assert typed | eager == public


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        captum_chains.no_such_name  # noqa: B018
    assert "ChainExtractor" in dir(captum_chains)


def test_optional_table_matches_pyproject_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(requirements: list[str]) -> set[str]:
        out = set()
        for req in requirements:
            name = req.split(";")[0].split("[")[0]
            for sep in "<>=!~ ":
                name = name.split(sep)[0]
            out.add(name.lower())
        return out

    core = names(project["dependencies"])
    for module, (dist, extra) in OPTIONAL.items():
        assert extra in extras, f"{module}: no extra [{extra}] in pyproject.toml"
        assert dist.lower() in names(extras[extra]), f"{dist} is not in [{extra}]"
        assert dist.lower() not in core, f"{dist} is optional but a core dependency"
    all_extra = " ".join(extras["all"])
    for extra in ("studies", "viz", "pretrained", "ray", "onnx"):
        assert extra in all_extra
    assert "jupytext" in " ".join(extras["dev"])  # the README's test command runs docs tests


def test_require_names_the_extra():
    assert require("json") is json
    with pytest.raises(MissingDependencyError, match=r"captum-chains\[all\]") as info:
        require("pandas_that_does_not_exist", "a table")
    assert isinstance(info.value, ImportError)
    saved = dict(OPTIONAL)
    try:
        OPTIONAL["no_such_module_xyz"] = ("no-such-dist", "viz")
        with pytest.raises(MissingDependencyError, match=r"pip install 'captum-chains\[viz\]'"):
            require("no_such_module_xyz.sub", "the figure")
        with pytest.raises(MissingDependencyError, match="the study"):
            check("json", "no_such_module_xyz", purpose="the study")
    finally:
        OPTIONAL.clear()
        OPTIONAL.update(saved)
    check("json")  # installed: no error


def test_missing_optional_dependency_in_a_lazy_name_names_the_extra():
    code = (
        "import sys\nsys.modules['skimage'] = None\n"  # None in sys.modules: not installed
        "import captum_chains.pathways\n"
        "try:\n    captum_chains.pathways.cascading_randomization\n"
        "except ImportError as err:\n    print(type(err).__name__, err)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert "MissingDependencyError" in out
    assert "captum-chains[viz]" in out


def test_run_study_checks_its_parquet_engine_before_computing(tmp_path, monkeypatch):
    import importlib.util

    import torch
    from torch import nn

    import captum_chains.studies.runner as runner
    from captum_chains.studies import Region, run_study

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pyarrow" else real_find_spec(name, *a),
    )

    def must_not_run(*args, **kwargs):
        raise AssertionError("computed a region before checking the Parquet engine")

    monkeypatch.setattr(runner, "process_regions", must_not_run)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(1, 1, 6, 6))
    region = Region("r", torch.randn(4, 1, 6, 6), torch.zeros(4, dtype=torch.long))
    with pytest.raises(MissingDependencyError, match=r"pyarrow.*captum-chains\[studies\]"):
        run_study(model, [region], tmp_path / "s", metrics=("fidelity",), progress=False)
    assert not (tmp_path / "s").exists()
