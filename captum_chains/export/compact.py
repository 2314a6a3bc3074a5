"""The model restricted to a support of filters, with differentiable scores.

Once most scores of a NeuroChains run are exactly zero, a masked step still computes every
filter of the model. :func:`compact_program` builds, with the export's channel surgery
(:mod:`captum_chains.export`), a copy that computes only the filters of a *support*
(the filters whose score may still be non-zero) and multiplies each score site by the
scores it is given at every call. For scores that are zero outside the support it computes
exactly what the masked model computes (up to the order of float summation over fewer
channels), and autograd gives the same gradients to the support's scores. The cost falls
with the filters left, though not in proportion: a random tenth of Lite0's filters costs a
tenth of a step, but in a real run the high-resolution first layers stay nearly whole until
late and dominate (docs/defaults.md, "A chain in about a fifth of the time").

Gates are fixed in the program: closed gates are identities, open gates pass their block
unchanged (``G = 1``), as in the thresholded network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from captum_chains.export.analysis import Analysis
from captum_chains.export.api import build_exported, load_extensions
from captum_chains.export.build import Builder
from captum_chains.export.recording import record
from captum_chains.export.rules_ops import SPECIAL
from captum_chains.export.runtime import ChannelScale
from captum_chains.export.step_modules import ScaledBatchNorm, speed_up, split_prefix
from captum_chains.export.tracing import ExportError, apply_subnetwork, working_copy
from captum_chains.units.base import ModelStructure


@dataclass(frozen=True)
class _Site:
    """One score site of the program: its module and where its channels' scores live."""

    module: ChannelScale | ScaledBatchNorm
    index: torch.Tensor  # position in the flat score vector of each channel of the site
    valid: torch.Tensor  # False for channels the site fills with zeros


class CompactProgram(nn.Module):
    """The model on a support of filters; ``program(scores, *inputs)`` returns its outputs.

    Parameters
    ----------
    module : fx.GraphModule
        The compact graph (its ``ChannelScale`` modules are the score sites).
    sites : list of _Site
        The score sites and the flat score index of each of their channels.
    support : Tensor
        Bool ``[U]``: the filters the program computes (on the program's device).
    cache : bool
        Compute the part of the program that does not depend on the scores once and
        reuse it while the same, unmodified input tensors come back (every step of a
        run); inputs that require gradients are never cached.
    """

    def __init__(
        self,
        module: fx.GraphModule,
        sites: list[_Site],
        support: torch.Tensor,
        cache: bool = True,
    ) -> None:
        super().__init__()
        self.module = module
        self._sites = sites
        self.support = support
        split = split_prefix(module) if cache else None
        self.prefix: fx.GraphModule | None = None if split is None else split[0]
        self.rest: fx.GraphModule | None = None if split is None else split[1]
        self._cached: tuple[tuple[torch.Tensor, ...], tuple[int, ...], Any] | None = None

    @property
    def filters(self) -> int:
        """Number of filters in the support."""
        return int(self.support.sum())

    def check(
        self, scores: torch.Tensor, inputs: tuple[torch.Tensor, ...], expected: torch.Tensor
    ) -> None:
        """Raise :class:`ExportError` unless ``self(scores, *inputs)`` equals ``expected``
        (the masked model's output) within ``1e-4`` of its range."""
        with torch.no_grad():
            got = self(scores, *inputs)
        scale = float(expected.max() - expected.min()) + 1e-12
        if got.shape != expected.shape or not torch.allclose(
            got.float(), expected.float(), rtol=1e-4, atol=1e-4 * scale
        ):
            raise ExportError("the compact program does not reproduce the masked model")

    def forward(self, scores: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        """The masked model's output for ``scores`` (flat ``[U]``; zero outside the support)."""
        for site in self._sites:
            values = scores[site.index] * site.valid
            site.module.scale = values.view(site.module.scale.shape)
        if self.prefix is None or self.rest is None or any(t.requires_grad for t in inputs):
            return self.module(*inputs)
        return self.rest(*inputs, *self._score_free(inputs))

    def _score_free(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        """The values that do not depend on the scores, for ``inputs``: computed once and
        reused while the same input tensors, unmodified, come back (every step of a run)."""
        versions = tuple(t._version for t in inputs)
        cached = self._cached
        if (
            cached is not None
            and len(cached[0]) == len(inputs)
            and all(a is b for a, b in zip(cached[0], inputs))
            and cached[1] == versions
        ):
            return cached[2]
        assert self.prefix is not None
        with torch.no_grad():
            values = self.prefix(*inputs)
        self._cached = (inputs, versions, values)
        return values


def compact_program(
    model: nn.Module,
    structure: ModelStructure,
    support: torch.Tensor,
    gates_open: torch.Tensor,
    example: tuple[torch.Tensor, ...],
    cache: bool = True,
) -> CompactProgram:
    """Build the :class:`CompactProgram` of ``model`` on ``support``.

    Parameters
    ----------
    model : nn.Module
        The model (copied, never modified).
    structure : ModelStructure
        Its discovered units and gates.
    support : Tensor
        Bool ``[U]`` over the flat scores: the filters that may be non-zero.
    gates_open : Tensor
        Bool ``[G]``: which gates are open (closed ones become identities).
    example : tuple of Tensor
        Inputs to record the forward pass with (a few suffice; the program holds for any
        batch size).
    cache : bool
        Keep the values that do not depend on the scores (e.g. the first convolution of
        the inputs) from one call to the next while the same input tensors come back.

    Raises
    ------
    ExportError
        If the export's surgery cannot handle the model. The caller checks the program
        against its masked model (:meth:`CompactProgram.check`).
    """
    load_extensions()
    support = support.detach().cpu().bool()
    offsets = structure.offsets()
    scores = {name: support[a:b].float() for name, (a, b) in offsets.items()}
    closed = [g for g, o in zip(structure.gates, gates_open.tolist()) if not o]
    work = working_copy(model)
    with torch.no_grad():
        gm, tracer = record(work, example, generic=True)
        score_nodes = apply_subnetwork(gm, tracer, structure.units, scores, closed, always=True)
        analysis = Analysis(gm, example, SPECIAL)
        builder = Builder(analysis, fold_scores=False)
        program = build_exported(analysis, builder)
    device = example[0].device
    found = []
    for unit in structure.units:
        node = score_nodes.get(unit.name)
        if node is None or not analysis.exists.get(node, False):
            continue  # inside a closed gate, or no channel of it is read
        if node not in builder.score_sites:
            raise ExportError(f"the score site of unit layer {unit.name!r} cannot be compacted")
        name, channels = builder.score_sites[node]
        channels = channels.cpu()
        valid = channels >= 0
        a = offsets[unit.name][0]
        index = a + channels.clamp(min=0) // unit.unit_width
        found.append((name, index.to(device), valid.to(device)))
    folded = speed_up(program, [name for name, _, _ in found])
    sites = []
    for name, index, valid in found:
        module = folded.get(name) or program.get_submodule(name)
        assert isinstance(module, (ChannelScale, ScaledBatchNorm))
        sites.append(_Site(module, index, valid))
    program.requires_grad_(False)  # a private copy: gradients go to the scores only
    return CompactProgram(program.to(device), sites, support.to(device), cache)
