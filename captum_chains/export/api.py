"""``export_subnetwork``: a standalone, physically smaller module equal to a SubNetwork.

The export works on a private copy of the model in five steps:

1. record the copy's forward pass as a graph whose sizes stay symbolic
   (:func:`~captum_chains.export.recording.record`, the package's one model reader);
2. write the SubNetwork into the graph: scores as explicit per-channel products at
   their sites (Eq. 3 of Wang, Zhou and Bilmes, TMLR 2022), closed gates as identities
   (Eq. 7 with ``G = 0``); this graph equals the SubNetwork (checked);
3. find for every tensor which channels are exactly zero and which are read
   (:mod:`~captum_chains.export.analysis`);
4. emit each operation for the channels it must compute: sliced weights, scores folded
   into BN ``gamma``/``beta`` or conv/linear rows, zero-filling gathers where a kept
   filter writes into a residual stream (:mod:`~captum_chains.export.build`);
5. check the result against the SubNetwork on the example inputs.

On any failure an :class:`ExportError` is raised and nothing is returned; the user's
model is never modified.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from captum_chains._utils.digest import weights_digest
from captum_chains._utils.validation import format_inputs, model_device
from captum_chains.export import rules_layers as _rules_layers  # noqa: F401  (registers rules)
from captum_chains.export import vit as _vit  # noqa: F401  (registers the HeadCore rule)
from captum_chains.export.analysis import Analysis, describe
from captum_chains.export.build import Builder
from captum_chains.export.recording import record
from captum_chains.export.report import (
    ExportReport,
    count_macs,
    count_parameters,
    verify,
)
from captum_chains.export.rules_ops import SPECIAL
from captum_chains.export.tracing import ExportError, apply_subnetwork, working_copy
from captum_chains.units.base import ModelStructure
from captum_chains.units.discovery import architecture_fingerprint


class ExportedSubNetwork(fx.GraphModule):
    """The exported chain: an ``fx.GraphModule`` of sliced copies of the model's layers.

    ``print(exported.code)`` shows the computation; submodules keep the original names
    (``layer1.0.conv1``); ``exported.report`` holds the :class:`ExportReport`.
    """

    if TYPE_CHECKING:  # for type checkers only: torch.jit.script rejects class annotations
        #: Size before/after and the check against the SubNetwork.
        report: ExportReport
        #: Number of channel adapters (gathers/scatters) in the graph.
        adapter_count: int

    def verify(self, subnetwork: nn.Module, inputs: Any) -> float:
        """Max absolute difference to ``subnetwork`` on ``inputs`` (see :func:`verify`)."""
        return verify(self, subnetwork, inputs)


def export_subnetwork(
    subnetwork: Any,
    *,
    example_inputs: Any = None,
    check_inputs: Any = None,
    rtol: float = 1e-4,
    strict: bool = False,
    model: nn.Module | None = None,
    check_weights: bool = True,
) -> ExportedSubNetwork:
    """Export a SubNetwork as a standalone module holding only the kept filters.

    Parameters
    ----------
    subnetwork : SubNetwork
        The thresholded network of a chain (``chain.subnetwork``).
    example_inputs : Tensor or tuple of Tensor, optional
        Inputs used to trace shapes and to check the export; by default two random
        inputs of the shape the structure was discovered with.
    check_inputs : Tensor or tuple of Tensor, optional
        Further inputs the export must reproduce (e.g. the chain's region).
    rtol : float
        The export must match the SubNetwork within ``rtol * (max - min)`` of its
        outputs on the check inputs, else :class:`ExportError` is raised.
    strict : bool
        Raise instead of keeping operations the export does not understand at full width.
    model : nn.Module, optional
        Export onto this model instead of ``subnetwork.model`` (same architecture).
    check_weights : bool
        Refuse a model whose weights differ from those the chain was extracted from
        (its :func:`~captum_chains.subnetwork.weights_digest` differs from
        ``subnetwork.weights_digest``). ``False`` exports the scores onto the model's
        current weights anyway.

    Returns
    -------
    ExportedSubNetwork
        A ``torch.fx.GraphModule`` in eval mode, with ``.report``.

    Raises
    ------
    TypeError
        If ``subnetwork`` is not a SubNetwork.
    ExportError
        (a ``ValueError``) if the model's architecture differs from the one the chain was
        extracted on, if its weights differ and ``check_weights`` is true, if the model
        cannot be traced, if a unit site or gate is inside an
        operation the export cannot open, with ``strict=True`` if an operation is not
        understood, or if the export does not reproduce the SubNetwork.
    """
    if not _is_subnetwork(subnetwork):
        raise TypeError(
            f"export_subnetwork needs a SubNetwork (e.g. chain.subnetwork), got "
            f"{type(subnetwork).__name__}"
        )
    structure = subnetwork.structure
    model = subnetwork.model if model is None else model
    check_model(structure, model)
    if check_weights:
        check_weights_digest(subnetwork, model)
    device = model_device(model) or torch.device("cpu")
    example = _inputs(example_inputs, structure, device)
    checks = [example] + ([format_inputs(check_inputs)] if check_inputs is not None else [])

    load_extensions()
    work = working_copy(model)
    gm, tracer = record(work, example, generic=True)
    scores = {
        n: subnetwork.scores[a:b].detach().to(device) for n, (a, b) in structure.offsets().items()
    }
    closed = [g for g, o in zip(structure.gates, subnetwork.gates_open.tolist()) if not o]
    apply_subnetwork(gm, tracer, structure.units, scores, closed)
    _check_recording(gm, subnetwork, example)

    analysis = Analysis(gm, example, SPECIAL)
    full_width = analysis.opaque_nodes()
    if strict and full_width:
        raise ExportError(
            "strict export: these operations are not supported by the channel surgery and "
            f"would be kept at full width: {full_width}; register rules for them "
            "(captum_chains.export.register_module_rule) or pass strict=False"
        )
    exported = build_exported(analysis)
    exported.to(device)
    report = _report(model, subnetwork, exported, example, checks, full_width, rtol)
    exported.report = report
    return exported


def _check_recording(
    gm: fx.GraphModule, subnetwork: Any, example: tuple[torch.Tensor, ...]
) -> None:
    """Raise unless the recorded program equals the SubNetwork on the example inputs and
    on one more input (the batch size must stay a variable of the program)."""
    bigger = tuple(torch.cat([t, t[:1]]) for t in example)
    for inputs, what in ((example, "the example inputs"), (bigger, "a batch of another size")):
        got: torch.Tensor | None
        with torch.no_grad():
            try:
                got = gm(*inputs)
            except Exception as err:
                got, failure = None, f"{type(err).__name__}: {err}"
            want = subnetwork(*inputs)
        if got is not None and got.shape != want.shape:
            failure = f"output shape {tuple(got.shape)} instead of {tuple(want.shape)}"
            got = None
        if got is not None and torch.allclose(
            got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()) + 1e-12
        ):
            continue
        if got is not None:
            failure = f"max difference {float((got - want).abs().max()):.3g}"
        hint = (
            "the model's forward may depend on something the recording cannot see (e.g. "
            "hooks or global state)"
            if inputs is example
            else "the model turns a size into a plain number in Python (e.g. int(x.shape[0]) "
            "or math on it), which freezes the batch size of the recorded program; keep "
            "sizes as read from tensors (x.shape[0], x.size(1))"
        )
        raise ExportError(
            f"the recorded program does not reproduce the SubNetwork on {what} ({failure}); " + hint
        )


def _is_subnetwork(obj: object) -> bool:
    """Whether ``obj`` is a :class:`~captum_chains.subnetwork.SubNetwork` (or a subclass).

    Checked by name along the class hierarchy, so that the export never imports
    :mod:`captum_chains.subnetwork` (which imports the export for ``SubNetwork.export``).
    """
    return any(
        kind.__module__ == "captum_chains.subnetwork" and kind.__name__ == "SubNetwork"
        for kind in type(obj).__mro__
    )


def check_weights_digest(subnetwork: Any, model: nn.Module) -> None:
    """Raise :class:`ExportError` if ``model``'s weights are not the chain's."""
    recorded = getattr(subnetwork, "weights_digest", None)
    if recorded is None:
        return
    found = weights_digest(model)
    if found != recorded:
        raise ExportError(
            f"the weights of {type(model).__name__} changed since the chain was extracted "
            f"(weights digest {recorded[:12]}... at extraction, {found[:12]}... now: an "
            "in-place edit or a swapped layer?); export onto the model with the original "
            "weights, extract the chain again, or pass check_weights=False to export the "
            "scores onto the current weights anyway"
        )


#: Your modules that register export rules, canonicalizers or site resolvers (by import
#: name); imported before each export and chain graph. The package's own rules are
#: registered when :mod:`captum_chains.export` loads.
EXTENSIONS: list[str] = []


def load_extensions() -> None:
    """Import the :data:`EXTENSIONS` (their registrations run on import; a name that cannot
    be imported raises)."""
    for name in EXTENSIONS:
        importlib.import_module(name)


def _inputs(
    inputs: Any, structure: ModelStructure, device: torch.device
) -> tuple[torch.Tensor, ...]:
    if inputs is not None:
        return tuple(t.to(device) for t in format_inputs(inputs))
    if not structure.input_shape:
        raise ValueError(
            "the structure does not record an input shape; pass example_inputs=... to export"
        )
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(2, *structure.input_shape, generator=gen).to(device),)


def check_model(structure: ModelStructure, model: nn.Module) -> None:
    """Raise :class:`ExportError` naming the layer if ``model`` does not fit ``structure``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    for unit in structure.units:
        module = modules.get(unit.name)
        if module is None:
            raise ExportError(
                f"unit layer {unit.name!r} of the SubNetwork does not exist in "
                f"{type(model).__name__}; the SubNetwork was built for a different model"
            )
        if unit.module_type and type(module).__name__ != unit.module_type:
            raise ExportError(
                f"layer {unit.name!r} is a {type(module).__name__} now but was a "
                f"{unit.module_type} when the chain was extracted; the architecture changed"
            )
        size = getattr(module, "out_channels", getattr(module, "out_features", None))
        if unit.kind == "filter" and size is not None and size != unit.size:
            raise ExportError(
                f"layer {unit.name!r} has {size} filters now but had {unit.size} when the "
                "chain was extracted; the architecture changed"
            )
        if unit.site not in modules:
            raise ExportError(
                f"score site {unit.site!r} of layer {unit.name!r} is missing from the model"
            )
    for gate in structure.gates:
        for name in (gate.start, gate.end):
            if name not in modules:
                raise ExportError(
                    f"module {name!r} of gate {gate.name!r} is missing from the model; the "
                    "SubNetwork was built for a different model"
                )
    found = architecture_fingerprint(model)
    if found != structure.fingerprint:
        raise ExportError(
            f"{type(model).__name__} has architecture fingerprint {found} but the chain was "
            f"extracted on {structure.fingerprint}: a module, its type or a parameter shape "
            "changed since extraction; export onto the model the chain was extracted on"
        )


def build_exported(analysis: Analysis, builder: Builder | None = None) -> ExportedSubNetwork:
    """The exported graph module of an analysed recording (``builder``: a custom one, e.g.
    one that keeps score sites unfolded for compact steps)."""
    builder = Builder(analysis) if builder is None else builder
    for node in analysis.nodes:
        if not analysis.exists[node]:
            continue
        builder.current = node
        try:
            analysis.rule[node].build(analysis, builder, node)
        except ExportError:
            raise
        except Exception as err:
            raise ExportError(
                f"export failed at {describe(analysis, node)} (rule {analysis.rule[node].name!r}): "
                f"{type(err).__name__}: {err}"
            ) from err
    exported = ExportedSubNetwork(builder.root, builder.graph, class_name="ExportedSubNetwork")
    exported.graph.eliminate_dead_code()
    exported.graph.lint()
    exported.delete_all_unused_submodules()
    exported.recompile()
    exported.adapter_count = builder.adapter_count
    return exported.eval()


def _report(
    model: nn.Module,
    subnetwork: Any,
    exported: ExportedSubNetwork,
    example: tuple[torch.Tensor, ...],
    checks: list[tuple[torch.Tensor, ...]],
    full_width: list[str],
    rtol: float,
) -> ExportReport:
    diff, lo, hi = 0.0, float("inf"), float("-inf")
    for inputs in checks:
        with torch.no_grad():
            try:
                out = exported(*inputs)
            except Exception as err:
                raise ExportError(
                    f"the exported network fails on inputs of shape "
                    f"{[tuple(t.shape) for t in inputs]}: {type(err).__name__}: {err}"
                ) from err
            ref = subnetwork(*inputs)
        diff = max(diff, float((out - ref).abs().max()))
        lo, hi = min(lo, float(ref.min())), max(hi, float(ref.max()))
    logit_range = hi - lo
    if diff > rtol * max(logit_range, 1e-12):
        raise ExportError(
            f"the exported network differs from the SubNetwork by {diff:.3g} (tolerance "
            f"{rtol:g} x logit range {logit_range:.3g}); please report this as a bug"
        )
    one = tuple(t[:1] for t in example)
    return ExportReport(
        params_before=count_parameters(model),
        params_after=count_parameters(exported),
        nonzero_params_after=count_parameters(exported, nonzero=True),
        macs_before=count_macs(model, one),
        macs_after=count_macs(exported, one),
        input_shape=tuple(example[0].shape[1:]),
        units_kept=subnetwork.num_filters,
        units_total=subnetwork.total_filters,
        removed_gates=list(subnetwork.removed_gates),
        full_width=full_width,
        adapters=getattr(exported, "adapter_count", 0),
        max_abs_diff=diff,
        logit_range=logit_range,
    )
