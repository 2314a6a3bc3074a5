"""Received files are data, never code, and damage is always a clear error.

Hypothesis flips and cuts bytes of real saved files and rewrites their metadata
(``SubNetwork.load``, ``Chain.load``, a CLI chain folder, study parts): the only outcomes
allowed are a successful load of well-formed values or the documented ``ValueError``; the
CLI (run in-process through :func:`captum_chains.cli.main`) ends with exit code 1 and one
error line, never a traceback. A pickle named in a received ``model.json`` is never
unpickled without ``--trust-pickle``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import shutil
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_inputs, make_model
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from test_studies import KW, assert_same_tables, data, tiny_model, tiny_regions

from captum_chains import Chain, ChainExtractor
from captum_chains.cli import main
from captum_chains.result import CHAIN_JSON, CHAIN_TENSORS, SUBNETWORK_FILE
from captum_chains.studies import StudyStore, load_study, run_study
from captum_chains.subnetwork import SubNetwork
from captum_chains.units import discover
from captum_chains.zoo import build_digits_model, load_digits_data

FAST = dict(steps=8, finetune_steps=2, gate_penalty=0.05, l1=0.02, lr=0.05)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)


# --------------------------------------------------------------------------- helpers
@st.composite
def damage(draw: Any, data: bytes) -> bytes:
    """``data`` with 1-6 bytes changed and/or cut short."""
    out = bytearray(data)
    if draw(st.booleans()):
        for _ in range(draw(st.integers(1, 6))):
            pos = draw(st.integers(0, len(out) - 1))
            out[pos] ^= draw(st.integers(1, 255))
    if draw(st.booleans()) or out == bytearray(data):
        out = out[: draw(st.integers(0, len(out) - 1))]
    return bytes(out)


def _nodes(value: Any, path: tuple = ()) -> list[tuple]:
    """Paths of every node of a JSON value."""
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _nodes(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _nodes(item, (*path, i))
    return found


def _replace(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    out = copy.copy(value)
    out[path[0]] = _replace(value[path[0]], path[1:], new)
    return out


@st.composite
def crafted(draw: Any, document: Any) -> Any:
    """``document`` with one node (anywhere, the root included) replaced by any JSON value."""
    paths = _nodes(document)
    path = paths[draw(st.integers(0, len(paths) - 1))]
    return _replace(document, path, draw(JSON_VALUES))


def _safetensors_parts(path: Path) -> tuple[dict[str, Any], bytes]:
    """Header (a dict) and tensor bytes of a safetensors file."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def _safetensors_bytes(header: dict[str, Any], body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def _assert_well_formed(sub: SubNetwork) -> None:
    assert sub.scores.shape == (sub.structure.total_units,)
    assert bool(torch.isfinite(sub.scores).all()) and bool((sub.scores >= 0).all())
    assert sub.gates_open.dtype == torch.bool


def _cli(argv: list[str]) -> tuple[int, str]:
    """Run the CLI in-process; an exception escaping main() fails the test (a traceback)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def _assert_cli_outcome(code: int, err: str) -> None:
    assert code in (0, 1), err
    assert "Traceback" not in err
    if code == 1:
        errors = [line for line in err.splitlines() if line.startswith("captum-chains: error:")]
        assert len(errors) == 1, err


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A real chain of a residual CNN, saved with Chain.save."""
    torch.manual_seed(0)
    model = make_model("residual", 4, 0)
    chain = ChainExtractor(model, **FAST).attribute(make_inputs(6), progress=False)
    folder = tmp_path_factory.mktemp("saved") / "chain"
    chain.save(folder)
    return model, folder


@pytest.fixture(scope="module")
def cli_chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A chain folder written by ``captum-chains extract`` (digits VGG, 3 digit PNGs)."""
    root = tmp_path_factory.mktemp("cli_safety")
    torch.manual_seed(0)
    torch.save(build_digits_model("vgg").state_dict(), root / "vgg.pt")
    images = root / "images"
    images.mkdir()
    x = load_digits_data(size=32).x_test[:3]
    pixels = ((x * 0.4 + 0.3).clamp(0, 1) * 255).round().to(torch.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image[0].numpy(), mode="L").save(images / f"d{i}.png")
    argv = [
        *("extract", "--model", "digits_vgg", "--weights", str(root / "vgg.pt")),
        *("--images", str(images), "--out", str(root / "chain"), "--steps", "5"),
        *("--quiet", "--device", "cpu"),
    ]
    code, err = _cli(argv)
    assert code == 0, err
    return root / "chain"


CLI_FILES = ("model.json", CHAIN_JSON, CHAIN_TENSORS, SUBNETWORK_FILE, "summary.json")


def _copy_cli_folder(source: Path, target: Path) -> Path:
    target.mkdir()
    for name in CLI_FILES:
        shutil.copy(source / name, target / name)
    return target


# --------------------------------------------------------------------------- SubNetwork.load
@given(st.data())
def test_damaged_subnetwork_file_is_a_value_error(saved, data) -> None:
    model, folder = saved
    raw = (folder / SUBNETWORK_FILE).read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sub.safetensors"
        path.write_bytes(data.draw(damage(raw)))
        try:
            sub = SubNetwork.load(path, model)
        except ValueError:
            return
        _assert_well_formed(sub)


@given(st.data())
def test_crafted_subnetwork_metadata_is_a_value_error(saved, data) -> None:
    model, folder = saved
    header, body = _safetensors_parts(folder / SUBNETWORK_FILE)
    metadata = header["__metadata__"]
    target = data.draw(st.sampled_from(["structure", "metadata", "header"]))
    if target == "structure":
        structure = data.draw(crafted(json.loads(metadata["structure"])))
        header = {**header, "__metadata__": {**metadata, "structure": json.dumps(structure)}}
    elif target == "metadata":
        header = {**header, "__metadata__": data.draw(crafted(metadata))}
    else:
        header = data.draw(crafted(header))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sub.safetensors"
        path.write_bytes(_safetensors_bytes(header, body))
        try:
            sub = SubNetwork.load(path, model)
        except ValueError:
            return
        _assert_well_formed(sub)


def _rewrite_subnetwork(source: Path, target: Path, **changes: Any) -> None:
    """Copy a SubNetwork file with tensors or structure fields replaced."""
    from safetensors.torch import load_file, save_file

    header, _ = _safetensors_parts(source)
    metadata = dict(header["__metadata__"])
    tensors = load_file(str(source))
    for key in ("scores", "gates_open"):
        if key in changes:
            tensors[key] = changes.pop(key)
    if "structure" in changes:
        metadata["structure"] = json.dumps(changes.pop("structure"))
    save_file(tensors, str(target), metadata=metadata)


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ("nan", "finite and non-negative"),
        ("negative", "finite and non-negative"),
        ("gate2", "other than 0 and 1"),
        ("int_scores", "floating-point"),
        ("site", "unit site 'nowhere'"),
        ("gate_module", "of gate"),
        ("size", "malformed"),
    ],
)
def test_bad_scores_and_absent_sites_are_named(saved, tmp_path, change, phrase) -> None:
    model, folder = saved
    source = folder / SUBNETWORK_FILE
    reference = SubNetwork.load(source, model)
    structure = json.loads(_safetensors_parts(source)[0]["__metadata__"]["structure"])
    scores = reference.scores.clone()
    changes: dict[str, Any] = {}
    if change == "nan":
        scores[2] = math.nan
        changes["scores"] = scores
    elif change == "negative":
        scores[0] = -1.0
        changes["scores"] = scores
    elif change == "gate2":
        changes["gates_open"] = torch.full_like(reference.gates_open, 2, dtype=torch.uint8)
    elif change == "int_scores":
        changes["scores"] = scores.long()
    elif change == "site":
        structure["units"][0]["site"] = "nowhere"
        changes["structure"] = structure
    elif change == "gate_module":
        structure["gates"][0]["end"] = "nowhere"
        changes["structure"] = structure
    elif change == "size":
        structure["units"][0]["size"] = "4"
        changes["structure"] = structure
    target = tmp_path / "sub.safetensors"
    _rewrite_subnetwork(source, target, **changes)
    with pytest.raises(ValueError, match=phrase.replace("(", r"\(")):
        SubNetwork.load(target, model)


# --------------------------------------------------------------------------- Chain.load
@given(st.data())
def test_damaged_or_crafted_chain_folder_is_a_value_error(saved, data) -> None:
    model, folder = saved
    name = data.draw(st.sampled_from([CHAIN_JSON, CHAIN_TENSORS, SUBNETWORK_FILE]))
    with tempfile.TemporaryDirectory() as tmp:
        copy_ = Path(tmp) / "chain"
        shutil.copytree(folder, copy_)
        if name == CHAIN_JSON and data.draw(st.booleans()):
            document = data.draw(crafted(json.loads((folder / name).read_text())))
            (copy_ / name).write_text(json.dumps(document))
        else:
            (copy_ / name).write_bytes(data.draw(damage((folder / name).read_bytes())))
        try:
            chain = Chain.load(copy_, model)
        except ValueError:
            return
        _assert_well_formed(chain.subnetwork)
        assert list(chain.importance) == list(chain.structure.unit_names)


# --------------------------------------------------------------------------- saving
def test_saving_to_odd_places_is_a_clear_os_error(saved, tmp_path) -> None:
    model, folder = saved
    chain = Chain.load(folder, model)
    sub = chain.subnetwork
    written = sub.save(tmp_path / "missing" / "deeper" / "sub.safetensors")  # folders created
    assert torch.equal(SubNetwork.load(written, model).scores, sub.scores)
    with pytest.raises(IsADirectoryError, match="folder"):
        sub.save(tmp_path)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotADirectoryError, match="a_file"):
        sub.save(tmp_path / "a_file" / "sub.safetensors")
    with pytest.raises(NotADirectoryError, match="writes a folder"):
        chain.save(tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "x"
    if os.name == "posix" and os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(PermissionError):
                sub.save(locked / "sub.safetensors")
            with pytest.raises(PermissionError):
                chain.save(locked / "chain")
        finally:
            locked.chmod(0o700)
        assert list(locked.iterdir()) == []  # nothing half-written
    leftovers = [p for p in tmp_path.rglob(".tmp-*")]
    assert leftovers == []


# --------------------------------------------------------------------------- CLI
@given(st.data())
def test_cli_on_a_damaged_chain_folder_never_prints_a_traceback(cli_chain, data) -> None:
    name = data.draw(st.sampled_from(CLI_FILES))
    command = data.draw(st.sampled_from(["show", "evaluate"]))
    with tempfile.TemporaryDirectory() as tmp:
        folder = _copy_cli_folder(cli_chain, Path(tmp) / "chain")
        raw = (cli_chain / name).read_bytes()
        if name.endswith(".json") and data.draw(st.booleans()):
            document = data.draw(crafted(json.loads(raw)))
            (folder / name).write_text(json.dumps(document))
        else:
            (folder / name).write_bytes(data.draw(damage(raw)))
        argv = [command, str(folder), "--quiet", "--device", "cpu"]
        if command == "evaluate":
            argv += ["--out", str(Path(tmp) / "evaluation")]
        code, err = _cli(argv)
        _assert_cli_outcome(code, err)


class _Payload:
    """Unpickling this object creates a file: proof that code stored in a file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_received_folder_never_unpickles_without_trust_pickle(cli_chain, tmp_path) -> None:
    marker = tmp_path / "code_ran"
    payload = tmp_path / "payload.pt"
    torch.save(_Payload(marker), payload)
    folder = _copy_cli_folder(cli_chain, tmp_path / "chain")
    spec = json.loads((folder / "model.json").read_text())
    spec.update(name="payload.pt", source="module", weights=str(payload))
    (folder / "model.json").write_text(json.dumps(spec))
    for command in ("show", "evaluate", "export", "report"):
        code, err = _cli([command, str(folder), "--quiet", "--device", "cpu"])
        assert code == 1, err
        _assert_cli_outcome(code, err)
        assert "--trust-pickle" in err and "pickled" in err
        assert not marker.exists()
    # extract with the pickle as --model: refused too
    images = str(cli_chain.parent / "images")
    code, err = _cli(["extract", "--model", str(payload), "--images", images, "--quiet"])
    assert code == 1 and "--trust-pickle" in err
    assert not marker.exists()
    # with the opt-in the file is unpickled (and turns out not to be a model)
    code, err = _cli(["show", str(folder), "--quiet", "--trust-pickle", "--device", "cpu"])
    assert code == 1 and "not an nn.Module" in err
    assert marker.exists()


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["extract", "--model", "m", "--images", "i", "--l1", "nan"], "--l1"),
        (["extract", "--model", "m", "--images", "i", "--gate-penalty", "inf"], "--gate-penalty"),
        (["extract", "--model", "m", "--images", "i", "--lr", "0"], "--lr"),
        (["extract", "--model", "m", "--images", "i", "--l1", "-1"], "--l1"),
        (["extract", "--model", "m", "--images", "i", "--n-crops", "0"], "--n-crops"),
        (["extract", "--model", "m", "--images", "i", "--steps", "-3"], "--steps"),
        (["extract", "--model", "m", "--images", "i", "--mean", "0.5,nan"], "--mean"),
        (["evaluate", "d", "--n-crops", "-1"], "--n-crops"),
        (["evaluate", "d", "--batch-size", "0"], "--batch-size"),
        (["study", "--model", "m", "--data", "x", "--out", "o", "--l1", "nan"], "--l1"),
        (["study", "--model", "m", "--data", "x", "--out", "o", "--min-confidence", "2"], "conf"),
    ],
)
def test_bad_numbers_are_usage_errors(argv: list[str], option: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert option in err and "Traceback" not in err


def test_export_output_into_a_missing_folder_is_created(cli_chain, tmp_path) -> None:
    folder = _copy_cli_folder(cli_chain, tmp_path / "chain")
    out = tmp_path / "new" / "deeper" / "net.pt2"
    code, err = _cli(["export", str(folder), "--output", str(out), "--quiet", "--device", "cpu"])
    assert code == 0, err
    assert out.is_file()
    code, err = _cli(["export", str(folder), "--output", str(tmp_path), "--device", "cpu"])
    assert code == 1
    _assert_cli_outcome(code, err)
    assert "is a folder" in err


# --------------------------------------------------------------------------- discovery
def test_empty_layer_list_is_a_value_error() -> None:
    model = make_model("plain", 4, 0)
    x = make_inputs(4)
    with pytest.raises(ValueError, match=r"layers=\[\]"):
        discover(model, (x,), layers=[])
    with pytest.raises(ValueError, match=r"layers=\[\]"):
        ChainExtractor(model, **FAST).attribute(x, layers=[], progress=False)


# --------------------------------------------------------------------------- study parts
@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Reference studies of two regions, in Parquet and in CSV."""
    root = tmp_path_factory.mktemp("study_safety")
    model = tiny_model(3)
    pool = data(60, 10)
    out = {"model": model, "pool": pool}
    for fmt in ("parquet", "csv"):
        out[fmt] = (
            root / fmt,
            run_study(model, tiny_regions(2), root / fmt, pool=pool, fmt=fmt, **KW),
        )
    return out


@given(st.data())
def test_resuming_a_study_with_a_damaged_part_recomputes_it(study, data) -> None:
    fmt = data.draw(st.sampled_from(["parquet", "csv"]))
    source, reference = study[fmt]
    region = data.draw(st.sampled_from(["reg0", "reg1"]))
    part = source / "parts" / region
    name = data.draw(st.sampled_from(sorted(p.name for p in part.iterdir())))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "study"
        shutil.copytree(source, folder)
        damaged = folder / "parts" / region / name
        damaged.write_bytes(data.draw(damage(damaged.read_bytes())))
        detected = StudyStore(folder, fmt=fmt).check_part(region) is not None
        if not detected:  # only a change of checksums.json that JSON reads the same
            assert name == "checksums.json"
            assert_same_tables(reference, load_study(folder))
            return
        with pytest.raises(ValueError, match=region):
            load_study(folder)  # never a table with rows silently missing
        with pytest.raises(ValueError, match=region):  # the damaged region is not given
            others = [r for r in tiny_regions(2) if r.region_id != region]
            run_study(study["model"], others, folder, pool=study["pool"], fmt=fmt, **KW)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resumed = run_study(
                study["model"], tiny_regions(2), folder, pool=study["pool"], fmt=fmt, **KW
            )
        assert any("damaged" in str(w.message) and region in str(w.message) for w in caught)
        assert_same_tables(reference, resumed)
        assert_same_tables(reference, load_study(folder))


def test_a_damaged_study_manifest_is_a_clear_error(study, tmp_path) -> None:
    source, _ = study["csv"]
    folder = tmp_path / "study"
    shutil.copytree(source, folder)
    manifest = folder / "study.json"
    manifest.write_bytes(manifest.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"study\.json is damaged"):
        run_study(study["model"], tiny_regions(2), folder, pool=study["pool"], fmt="csv", **KW)
