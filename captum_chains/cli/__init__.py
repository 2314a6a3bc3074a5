"""The ``captum-chains`` command line: a thin layer over the library's API.

Commands
--------
``extract``
    The NeuroChains chain (Wang, Zhou and Bilmes, TMLR 2022) of a model on a folder or
    glob of images, written to a *chain folder*.
``show``
    Reload a chain folder (model and sub-network) and print its summary.
``report``
    One self-contained HTML page about a chain folder (:meth:`Chain.report`).
``export``
    The chain as a standalone, physically smaller network: a ``torch.export`` program
    (``.pt2``) or ONNX.
``evaluate``
    Fidelity of the chain on its own region or on other images.
``study``
    NeuroChains and every metric on many regions (:func:`captum_chains.studies.run_study`).
``demo``
    The README's demo: EfficientNet-Lite0 on real photos (:func:`captum_chains.demo.run_demo`).

A chain folder holds ``model.json`` (how to rebuild the model: its name, weights file,
a hash of its weights and the input preprocessing), the files of :meth:`Chain.save`
(``chain.json``, ``chain.safetensors`` with the importance and the preprocessed region's
inputs, ``subnetwork.safetensors``), ``importance.json`` (scores per layer, soft gate values),
``summary.json`` and ``summary.txt``, ``layer_scores.png`` and ``architecture.png``,
``history.csv`` (one row per optimization step) and ``fidelity.csv`` (per input).

Models are never downloaded. ``efficientnet_lite0`` loads the offline ImageNet weights
(:func:`captum_chains.pretrained.load_efficientnet_lite0`); ``digits_vgg``,
``digits_resnet`` and ``digits_vit`` are the small digits models of
:mod:`captum_chains.zoo` (trained locally and cached unless ``--weights`` is given);
any other timm or torchvision name needs ``--weights`` (a state dict); a path to a state
dict needs ``--arch``. State dicts are read with ``torch.load(weights_only=True)`` or
safetensors and chain folders hold only JSON and safetensors, so no command runs code
stored in a file: a ``torch.save``'d ``nn.Module`` (a pickle), whether given as ``--model``
or named in a received chain folder's ``model.json``, is refused unless ``--trust-pickle``
is passed.

Damaged, truncated or crafted chain folders end with one error line, like every other
mistake; a chain folder is also refused when the model's weights differ from those the
chain was extracted from.

User mistakes end with one line ``captum-chains: error: ...`` on stderr and exit code 1
(2 for command-line usage errors); set ``CAPTUM_CHAINS_DEBUG=1`` to get the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from captum_chains._utils.optional import MissingDependencyError
from captum_chains.cli.images import Preprocessing, find_images, read_image
from captum_chains.cli.models import ModelSpec, build_model, resolve_model
from captum_chains.cli.output import CLIError, Console, one_line
from captum_chains.cli.parser import build_parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``captum-chains``; returns the exit code (0 ok, 1 error, 2 usage, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console(args.quiet)
    command: Callable[[argparse.Namespace, Console], int] = args.func
    if os.environ.get("CAPTUM_CHAINS_DEBUG"):
        return command(args, console)
    try:
        return command(args, console)
    except CLIError as err:
        message = str(err)
    except ValueError as err:  # the library's errors for bad input name the value and the fix
        message = str(err)
    except MissingDependencyError as err:  # names the extra to install
        message = str(err)
    except OSError as err:  # unwritable output folder, full disk, ...
        message = f"{err.strerror or err}: {err.filename}" if err.filename else str(err)
    except KeyboardInterrupt:
        print("captum-chains: interrupted", file=sys.stderr)
        return 130
    print(f"captum-chains: error: {one_line(message, 600)}", file=sys.stderr)
    return 1


__all__ = [
    "CLIError",
    "ModelSpec",
    "Preprocessing",
    "build_model",
    "build_parser",
    "find_images",
    "main",
    "read_image",
    "resolve_model",
]
