"""Write an exported sub-network to a file: a ``torch.export`` program or ONNX.

Both files are standalone: loading them needs torch (``torch.export.load(path).module()``)
or an ONNX runtime, not captum-chains. Each file is read back (ONNX when ``onnxruntime``
is installed) and compared with the SubNetwork it came from.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captum_chains.cli.output import CLIError, one_line

if TYPE_CHECKING:
    import torch
    from torch import nn

SUFFIXES = {"pt": ".pt2", "onnx": ".onnx"}


def dynamic_batch() -> Any:
    """A dynamic batch dimension for ``torch.export``: ``Dim.DYNAMIC`` (torch 2.6+) or a
    named ``Dim`` (torch 2.4/2.5, which then needs an example batch of 2 or more)."""
    import torch

    return getattr(torch.export.Dim, "DYNAMIC", None) or torch.export.Dim("batch")


def save_program(exported: nn.Module, example: torch.Tensor, out: Path, sub: nn.Module) -> float:
    """Save with :func:`torch.export.save` (dynamic batch size).

    Returns the largest absolute difference between the reloaded file and ``sub`` on
    ``example``.
    """
    import torch

    try:
        program = torch.export.export(exported, (example,), dynamic_shapes=({0: dynamic_batch()},))
    except Exception as err:  # torch.export raises many error types for untraceable code
        raise CLIError(f"torch.export could not capture the network: {one_line(err, 240)}") from err
    torch.export.save(program, str(out))
    reloaded = torch.export.load(str(out)).module()
    with torch.no_grad():
        return float((reloaded(example) - sub(example)).abs().max())


def save_onnx(
    exported: nn.Module, example: torch.Tensor, out: Path, sub: nn.Module
) -> float | None:
    """Save as ONNX (dynamic batch size).

    Returns the largest absolute difference between the file run by ``onnxruntime`` and
    ``sub`` on ``example``, or ``None`` when ``onnxruntime`` is not installed.
    """
    import torch

    try:
        import onnx
    except ImportError as err:
        raise CLIError("ONNX export needs the onnx package: pip install onnx") from err
    try:  # the torch.export-based exporter needs onnxscript; else the TorchScript-based one
        import onnxscript  # noqa: F401

        options: dict[str, Any] = {
            "dynamo": True,
            "dynamic_shapes": ({0: dynamic_batch()},),
        }
    except ImportError:
        options = {"dynamo": False, "dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}}}
    device = example.device
    exported, example = exported.cpu(), example.cpu()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter's notice
            torch.onnx.export(
                exported,
                (example,),
                str(out),
                input_names=["input"],
                output_names=["logits"],
                verbose=False,
                **options,
            )
    except Exception as err:
        raise CLIError(f"ONNX export failed: {one_line(err, 240)}") from err
    finally:
        exported.to(device)
    onnx.checker.check_model(onnx.load(str(out)))
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {"input": example.numpy()})
    with torch.no_grad():
        reference = sub(example.to(device)).cpu()
    return float((torch.from_numpy(result) - reference).abs().max())
