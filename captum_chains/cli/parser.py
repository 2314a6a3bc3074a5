"""The argument parser of ``captum-chains``."""

from __future__ import annotations

import argparse
import math

from captum_chains.cli.commands import (
    cmd_demo,
    cmd_evaluate,
    cmd_export,
    cmd_extract,
    cmd_report,
    cmd_show,
    cmd_study,
)


def _floats(text: str) -> list[float]:
    """Comma-separated finite numbers."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def _finite(text: str) -> float:
    """A finite number (``nan`` and ``inf`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _nonnegative(text: str) -> float:
    """A finite number >= 0."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _positive(text: str) -> float:
    """A finite number > 0."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _at_least_one(text: str) -> float:
    """A finite number >= 1."""
    value = _finite(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return value


def _fraction(text: str) -> float:
    """A number in [0, 1]."""
    value = _finite(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def _whole(text: str, minimum: int) -> int:
    """A whole number >= ``minimum``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
    return value


def _count(text: str) -> int:
    """A whole number >= 1."""
    return _whole(text, 1)


def _nonnegative_int(text: str) -> int:
    """A whole number >= 0."""
    return _whole(text, 0)


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("run options")
    group.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N or mps (default: CUDA if available)"
    )
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    group.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bars or info messages"
    )
    return common


def _model_parser(required: bool) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("model")
    group.add_argument(
        "--model",
        required=required,
        help="efficientnet_lite0 (offline ImageNet weights), digits_vgg|digits_resnet|digits_vit, "
        "a timm or torchvision name with --weights (write timm:NAME or torchvision:NAME where "
        "both libraries know NAME, e.g. torchvision:resnet18; timm's ResNet is another module "
        "layout), "
        "or a path to a torch.save'd nn.Module or state dict (with --arch)"
        + ("" if required else "; default: the model recorded in the chain folder"),
    )
    group.add_argument("--weights", help="state dict (.pt/.pth/.safetensors) for --model NAME")
    group.add_argument("--arch", help="architecture name of a state-dict file given as --model")
    group.add_argument("--num-classes", type=_count, help="classifier width of --model NAME")
    group.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow loading a torch.save'd nn.Module (a pickle: loading it runs code stored in "
        "the file), given as --model or named in a chain folder's model.json; only for files "
        "you trust. Without it such files are refused; a state dict with --arch needs no trust",
    )
    return parent


def _config_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "NeuroChains settings (default: ChainConfig(), proximal Adam; see docs/defaults.md)"
    )
    group.add_argument(
        "--paper",
        action="store_true",
        help="start from ChainConfig.paper(): the paper's exact schedule (Adam lr 0.005, "
        "300 + 50 steps, its stopping rule); the options below still override it",
    )
    group.add_argument("--steps", type=_count, help="maximum optimization steps (default 360)")
    group.add_argument(
        "--finetune-steps",
        type=_nonnegative_int,
        help="fine-tuning steps when the thresholded KL exceeds 0.1 (default 50; 0: none)",
    )
    group.add_argument("--lr", type=_positive, help="learning rate of the scores (default 0.005)")
    group.add_argument(
        "--free-rate",
        type=_at_least_one,
        help="step-size multiplier of the scores nothing holds (ChainConfig.free_rate; default "
        "10, a step of at most 0.05; 1 with --paper)",
    )
    group.add_argument(
        "--no-compact",
        action="store_true",
        help="every step on the whole model (ChainConfig(compact_below=None)); by default the "
        "steps run on a copy holding only the live filters once at most 80%% remain",
    )
    group.add_argument(
        "--inputs-per-step",
        type=_count,
        help="a random subset of this many inputs per optimization step (ChainConfig.batch_size; "
        "default: every input)",
    )
    group.add_argument(
        "--l1", type=_nonnegative, help="lambda, l1 weight (default: per model family)"
    )
    group.add_argument(
        "--gate-penalty", type=_nonnegative, help="lambda_g (default: per model family)"
    )
    group.add_argument("--no-gates", action="store_true", help="score filters only, no gates")
    group.add_argument(
        "--compile", action="store_true", help="run the masked forward through torch.compile"
    )


def _fidelity_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fidelity target (extract)")
    group.add_argument(
        "--fidelity",
        type=_fraction,
        help="minimum top-1 agreement of the sub-network with the model on the region: "
        "computes the sparsity-fidelity path (8 lambdas, about twice one chain) and keeps "
        "the sparsest chain that meets it",
    )
    group.add_argument(
        "--max-kl", type=_nonnegative, help="with --fidelity: also a maximum KL on the region"
    )
    group.add_argument(
        "--max-drop",
        type=_nonnegative,
        help="with --fidelity: also a maximum mean drop of the model's class probability",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``captum-chains``."""
    common = _common_parser()
    parser = argparse.ArgumentParser(
        prog="captum-chains",
        description="NeuroChains sub-network explanations (Wang, Zhou & Bilmes, TMLR 2022) from "
        "the command line. Nothing is downloaded.",
        epilog="example: captum-chains extract --model efficientnet_lite0 --images photos/ "
        "--n-crops 20 --out chain_out && captum-chains show chain_out",
    )
    from captum_chains import __version__

    parser.add_argument("--version", action="version", version=f"captum-chains {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "extract",
        parents=[_model_parser(True), common],
        help="extract the chain of a model on images and write a chain folder",
        description="Extract the NeuroChains chain of a model on a local region of images and "
        "write it to a chain folder (sub-network, importance, summary, figure).",
    )
    group = p.add_argument_group("inputs and output")
    group.add_argument("--images", required=True, help="folder of images, an image, or a glob")
    group.add_argument(
        "--n-crops",
        type=_count,
        help="build the region from this many random crops of the images (default: one input "
        "per image)",
    )
    group.add_argument(
        "--target",
        help="class(es) whose probability to preserve: an index, one index per input "
        "(comma-separated), 'predicted', or an ImageNet class name; default: the whole output "
        "distribution (the paper's objective)",
    )
    group.add_argument("--layers", nargs="+", help="score only these unit layers / modules")
    group.add_argument("--out", default="chain_out", help="chain folder (default chain_out)")
    group.add_argument("--force", action="store_true", help="replace a chain already in --out")
    group.add_argument("--size", type=_count, help="input side (default: the model's)")
    group.add_argument("--mean", type=_floats, help="normalization mean, comma-separated")
    group.add_argument("--std", type=_floats, help="normalization std, comma-separated")
    group.add_argument("--batch-size", type=_count, default=64, help="inputs per evaluation pass")
    _config_args(p)
    _fidelity_args(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser(
        "show",
        parents=[_model_parser(False), common],
        help="print the summary of a chain folder",
        description="Reload a chain folder (model and sub-network) and print its summary.",
    )
    p.add_argument("dir", help="chain folder written by extract")
    p.add_argument("--json", action="store_true", help="print summary.json instead")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser(
        "report",
        parents=[_model_parser(False), common],
        help="write one self-contained HTML page about a chain folder",
        description="Write one self-contained HTML page (figures embedded, opens offline) about "
        "a chain: summary and fidelity, architecture with scores, the chain graph, SMOE maps, "
        "pictures of the top kept filters, original vs sub-network firing, and Integrated "
        "Gradients / Grad-CAM side by side.",
    )
    p.add_argument("dir", help="chain folder written by extract")
    p.add_argument("--output", help="the .html file (default DIR/report.html)")
    p.add_argument("--title", help="page title (default: the model's name)")
    p.add_argument("--max-inputs", type=_count, default=3, help="inputs per figure (default 3)")
    p.add_argument("--max-filters", type=_count, default=4, help="filters pictured (default 4)")
    p.add_argument(
        "--filter-steps",
        type=_count,
        default=128,
        help="activation-maximization steps per filter picture (default 128)",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "export",
        parents=[_model_parser(False), common],
        help="save the chain as a standalone smaller network (torch.export or ONNX)",
        description="Export the chain's sub-network as a standalone, physically smaller network "
        "of exactly copied filters, checked against the SubNetwork on the region.",
    )
    p.add_argument("dir", help="chain folder written by extract")
    p.add_argument(
        "--format",
        choices=("pt", "onnx"),
        default="pt",
        help="pt: a torch.export program (.pt2; load with torch.export.load(path).module()); "
        "onnx: ONNX (default pt)",
    )
    p.add_argument(
        "--output",
        help="output file (default DIR/exported.pt2 or DIR/exported.onnx; a missing folder is "
        "created)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "evaluate",
        parents=[_model_parser(False), common],
        help="fidelity of a chain on its region or on other images",
        description="Fidelity of the sub-network to the model: top-1 agreement, drop of the "
        "original class probability and KL, on the chain's region or on --images.",
    )
    p.add_argument("dir", help="chain folder written by extract")
    p.add_argument("--images", help="folder, image or glob (default: the chain's region)")
    p.add_argument("--n-crops", type=_count, help="random crops of the images instead of one each")
    p.add_argument("--out", help="output folder (default DIR/evaluation)")
    p.add_argument("--batch-size", type=_count, default=64, help="inputs per forward pass")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "study",
        parents=[_model_parser(True), common],
        help="NeuroChains and every metric on many regions",
        description="Sample regions with the paper's protocol (classes x images the model "
        "classifies with high confidence), extract their chains and evaluate every metric; "
        "resumable (captum_chains.studies.run_study).",
    )
    p.add_argument(
        "--data",
        required=True,
        help="'digits' (scikit-learn digits, with a held-out pool for stability) or a folder or "
        "glob of images",
    )
    p.add_argument("--out", required=True, help="study folder")
    p.add_argument("--regions", type=_count, default=10, help="number of regions (default 10)")
    p.add_argument("--classes-per-region", type=_count, default=2)
    p.add_argument("--per-class", type=_count, default=10)
    p.add_argument("--min-confidence", type=_fraction, default=0.95)
    p.add_argument("--metrics", help="comma-separated subset of the study metrics")
    p.add_argument("--backend", choices=("serial", "ray"), default="serial")
    p.add_argument("--workers", type=_count, help="Ray workers")
    _config_args(p)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser(
        "demo",
        parents=[common],
        help="the README's demo: EfficientNet-Lite0 on real photos",
        description="Extract the chain of the real ImageNet EfficientNet-Lite0 on random crops "
        "of scikit-image's chelsea and coffee photos (about 3 minutes on a CPU core).",
    )
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--n-crops", type=_count, default=20, help="crops in the region (default 20)")
    p.add_argument("--steps", type=_count, help="optimization steps (default: ChainConfig's, 360)")
    p.set_defaults(func=cmd_demo)
    return parser


def help_text(command: str | None = None) -> str:
    """The ``--help`` text of ``captum-chains`` or of one of its commands."""
    parser = build_parser()
    if command is None:
        return parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command].format_help()
    raise ValueError(
        f"no command {command!r}; commands: extract, show, report, export, evaluate, study, demo"
    )
