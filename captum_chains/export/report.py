"""Size of a network before and after export, and the exactness check."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from captum_chains._utils.hooks import this_thread_only
from captum_chains._utils.model_state import eval_mode


def count_parameters(model: nn.Module, *, nonzero: bool = False) -> int:
    """Number of parameter entries (``nonzero=True``: only entries that are not zero)."""
    if nonzero:
        return sum(int((p != 0).sum()) for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """Multiply-accumulates of the convolutions and linear layers for one input.

    Counted with forward hooks during one pass on ``inputs`` (divided by the batch
    size): a convolution costs ``out.numel() * in_channels / groups * prod(kernel)``,
    a linear layer ``out.numel() * in_features``. Element-wise operations, norms and
    pooling are not counted. The model is left unchanged (hooks removed, modes restored).
    """
    total = [0]

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        if not isinstance(out, torch.Tensor) or out.ndim == 0:
            return
        per_input = out.numel() // max(out.shape[0], 1)
        if isinstance(module, nn.modules.conv._ConvNd):
            total[0] += (
                per_input * (module.in_channels // module.groups) * math.prod(module.kernel_size)
            )
        elif isinstance(module, nn.Linear):
            total[0] += per_input * module.in_features

    handles = []
    with eval_mode(model):
        try:
            for m in model.modules():
                if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                    handles.append(m.register_forward_hook(this_thread_only(hook)))
            with torch.no_grad():
                model(*inputs)
        finally:
            for h in handles:
                h.remove()
    return total[0]


def verify(exported: nn.Module, subnetwork: nn.Module, inputs: Any) -> float:
    """Max absolute difference between the outputs of ``exported`` and ``subnetwork``.

    Parameters
    ----------
    exported : nn.Module
        The module returned by :func:`captum_chains.export.export_subnetwork`.
    subnetwork : SubNetwork
        The SubNetwork it was exported from (or any module with the same outputs).
    inputs : Tensor or tuple of Tensor
        Inputs to compare on.
    """
    items = inputs if isinstance(inputs, tuple) else (inputs,)
    with torch.no_grad(), eval_mode(exported):
        a = exported(*items)
        b = subnetwork(*items)
    return float((a - b).abs().max())


@dataclass
class ExportReport:
    """What the export kept and how it compares with the original model.

    Attributes
    ----------
    params_before, params_after : int
        Parameter entries of the original model and of the export.
    nonzero_params_after : int
        Parameter entries of the export that are not zero (placeholder channels of empty
        layers and group padding hold zeros).
    macs_before, macs_after : int
        Multiply-accumulates of convolutions and linear layers for one input of
        ``input_shape`` (see :func:`count_macs`).
    input_shape : tuple of int
        Shape of one input used for counting and checking.
    units_kept, units_total : int
        Kept units of the SubNetwork and units of the model.
    removed_gates : list of str
        Layers and blocks replaced by the identity.
    full_width : list of str
        Operations the export does not understand, kept unchanged with full-width inputs.
    adapters : int
        Channel gathers/scatters inserted (e.g. kept filters scattered into residual streams).
    max_abs_diff : float
        Largest absolute difference between export and SubNetwork on the check inputs.
    logit_range : float
        ``max - min`` of the SubNetwork's outputs on the check inputs.
    """

    params_before: int
    params_after: int
    nonzero_params_after: int
    macs_before: int
    macs_after: int
    input_shape: tuple[int, ...]
    units_kept: int
    units_total: int
    removed_gates: list[str] = field(default_factory=list)
    full_width: list[str] = field(default_factory=list)
    adapters: int = 0
    max_abs_diff: float = 0.0
    logit_range: float = 0.0

    @property
    def param_ratio(self) -> float:
        """``params_after / params_before``."""
        return self.params_after / max(self.params_before, 1)

    @property
    def mac_ratio(self) -> float:
        """``macs_after / macs_before``."""
        return self.macs_after / max(self.macs_before, 1)

    @property
    def relative_error(self) -> float:
        """``max_abs_diff / logit_range``."""
        return self.max_abs_diff / self.logit_range if self.logit_range > 0 else self.max_abs_diff

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (with the ratios)."""
        out = asdict(self)
        out.update(
            param_ratio=self.param_ratio,
            mac_ratio=self.mac_ratio,
            relative_error=self.relative_error,
        )
        return out

    def __str__(self) -> str:
        lines = [
            f"units kept        {self.units_kept}/{self.units_total}",
            f"parameters        {self.params_before:,} -> {self.params_after:,} "
            f"({100 * self.param_ratio:.2f}%; {self.nonzero_params_after:,} non-zero)",
            f"MACs per input    {self.macs_before:,} -> {self.macs_after:,} "
            f"({100 * self.mac_ratio:.2f}%) at input {tuple(self.input_shape)}",
            f"max |export - SubNetwork| = {self.max_abs_diff:.3g} "
            f"({self.relative_error:.2g} of the logit range)",
        ]
        if self.removed_gates:
            lines.append(
                f"identity (removed) {len(self.removed_gates)}: {', '.join(self.removed_gates)}"
            )
        if self.full_width:
            lines.append(f"kept at full width {len(self.full_width)}: {', '.join(self.full_width)}")
        return "\n".join(lines)
