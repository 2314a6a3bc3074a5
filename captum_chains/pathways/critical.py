"""Critical pathways (Khakzar et al., CVPR 2021): sparse neuron sets per input.

:class:`CriticalPathways` scores every activation neuron of a model by its
contribution to the target logit (:mod:`~captum_chains.pathways.contribution`),
keeps the top neurons per input under one global percentile
(:mod:`~captum_chains.pathways.selection`) and returns both in a
:class:`CriticalPathwaysResult`. :meth:`CriticalPathways.masked_forward` runs the
network with the binary masks multiplied into the activations, later activations
being recomputed from the masked ones (the paper's pathway network).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from captum_chains._utils.validation import (
    TargetType,
    check_batch_size,
    check_steps,
    format_additional_args,
    format_inputs,
    normalize_target,
    require_module,
)
from captum_chains.pathways.contribution import integrated_contributions, taylor_contributions
from captum_chains.pathways.neurons import (
    DEFAULT_ACTIVATIONS,
    ActivationTracer,
    NeuronSite,
    check_activations,
    traced,
)
from captum_chains.pathways.selection import check_percentile, kept_count, select_top_neurons

__all__ = ["CONTRIBUTION_METHODS", "CriticalPathways", "CriticalPathwaysResult", "run_masked"]

CONTRIBUTION_METHODS = ("taylor", "integrated")
"""``"taylor"``: NeuronMCT; ``"integrated"``: NeuronIntGrad."""


@dataclass(frozen=True)
class CriticalPathwaysResult:
    """Neuron contributions and critical-pathway masks of a batch of inputs.

    Attributes
    ----------
    sites : tuple of NeuronSite
        The activation layers in forward order.
    contributions : dict of str to Tensor
        Per site name, the non-negative contributions ``[batch, *site.shape]``.
    masks : dict of str to Tensor
        Per site name, boolean masks (``True`` = on the critical pathway).
    percentile : float
        The global percentile :math:`p` used.
    method : str
        ``"taylor"`` (NeuronMCT) or ``"integrated"`` (NeuronIntGrad).
    target : TargetType
        The target, normalized (a ``LongTensor`` for per-example classes).
    output : Tensor
        The unmasked model output on the inputs.
    """

    sites: tuple[NeuronSite, ...]
    contributions: dict[str, Tensor] = field(repr=False)
    masks: dict[str, Tensor] = field(repr=False)
    percentile: float
    method: str
    target: TargetType = field(repr=False)
    output: Tensor = field(repr=False)

    @property
    def names(self) -> list[str]:
        """Site names in forward order."""
        return [s.name for s in self.sites]

    @property
    def batch_size(self) -> int:
        return int(self.output.shape[0])

    @property
    def total_neurons(self) -> int:
        """Neurons per example, over all sites."""
        return sum(s.numel for s in self.sites)

    @property
    def kept_per_example(self) -> int:
        """Neurons kept per example: ``ceil((100 - p) / 100 * total_neurons)``."""
        return kept_count(self.total_neurons, self.percentile)

    def site(self, name: str) -> NeuronSite:
        """The site called ``name``."""
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no activation site {name!r}; sites are {self.names}")

    def kept_fraction(self) -> Tensor:
        """Fraction of all neurons kept, per example ``[batch]``."""
        # masks holds one entry per site and the tracer finds at least one site
        kept = cast(Tensor, sum(m.flatten(1).sum(1) for m in self.masks.values()))
        return kept.double() / self.total_neurons

    def layer_kept_fraction(self) -> dict[str, Tensor]:
        """Per site, the fraction of its neurons kept for each example ``[batch]``."""
        return {n: m.flatten(1).double().mean(1) for n, m in self.masks.items()}

    def threshold(self) -> Tensor:
        """Smallest kept contribution per example ``[batch]`` (the effective threshold)."""
        inf = torch.tensor(float("inf"))
        lows = [
            torch.where(m, c, inf.to(c.device, c.dtype)).flatten(1).amin(1)
            for c, m in zip(self.contributions.values(), self.masks.values(), strict=True)
        ]
        return torch.stack(lows).amin(0)

    def channels_on_pathway(self, name: str, dim: int = 1) -> Tensor:
        """Channels of site ``name`` with at least one kept neuron ``[batch, channels]``.

        ``dim`` is the channel dimension of the batched activation (1 for conv
        layers, the last one for linear layers).
        """
        mask = self.masks[name]
        if not 0 < dim < mask.ndim:
            raise ValueError(
                f"dim {dim} is not a channel dimension of {name!r} {tuple(mask.shape)}"
            )
        moved = mask.movedim(dim, 1)
        return moved.flatten(2).any(2) if moved.ndim > 2 else moved

    def subset(self, index: Sequence[int] | Tensor) -> CriticalPathwaysResult:
        """The result for a subset of the examples."""
        idx = torch.as_tensor(index, dtype=torch.long)
        target = self.target
        if isinstance(target, Tensor):
            target = target[idx.to(target.device)]
        elif isinstance(target, list):
            # picking rows keeps the list's element type (ints or tuples)
            target = cast(TargetType, [target[int(i)] for i in idx])
        return CriticalPathwaysResult(
            sites=self.sites,
            contributions={k: v[idx.to(v.device)] for k, v in self.contributions.items()},
            masks={k: v[idx.to(v.device)] for k, v in self.masks.items()},
            percentile=self.percentile,
            method=self.method,
            target=target,
            output=self.output[idx.to(self.output.device)],
        )


def run_masked(
    tracer: ActivationTracer,
    inputs: tuple[Tensor, ...],
    additional_forward_args: tuple[Any, ...],
    pathways: CriticalPathwaysResult,
) -> Any:
    """Run the model with ``pathways``' binary masks multiplied into the activations.

    Masks are matched to activation calls by site (module stack + calling line), not
    by call order; each mask is applied as soon as its activation is computed, so
    every later layer sees the masked activations (Khakzar et al., Sec. 3.3).
    """
    by_key = {site.key: pathways.masks[site.name] for site in pathways.sites}
    used: set[tuple] = set()

    def apply(index: int, out: Tensor) -> Tensor:
        key = tracer.key(index)
        mask = by_key.get(key)
        if mask is None:
            raise RuntimeError(
                "the pathways were computed for different activation sites than this "
                "model's forward pass meets; compute them with the same model and inputs"
            )
        if mask.shape != out.shape:
            raise ValueError(
                f"pathway mask of shape {tuple(mask.shape)} does not fit the activation "
                f"{tuple(out.shape)}; pass the inputs the pathways were computed for"
            )
        used.add(key)
        return out * mask.to(device=out.device, dtype=out.dtype)

    output = tracer.run(inputs, additional_forward_args, apply)
    if len(used) != len(by_key):
        raise RuntimeError(
            "some pathway layers were not met in the masked forward pass; compute the "
            "pathways with the same model"
        )
    return output


class CriticalPathways:
    """Critical pathways of a model: per-input sparse sets of contributing neurons.

    Khakzar et al., "Neural Response Interpretation through the Lens of Critical
    Pathways", CVPR 2021. Every element of every rectifier-type activation output is
    a neuron (see :mod:`captum_chains.pathways.neurons` for the discovery and the
    list of activations). Its contribution to the target logit :math:`y_c` is

    .. math:: s_i = |a_i \\, \\partial y_c / \\partial a_i|  \\quad\\text{(NeuronMCT)}

    or its layer-wise integrated-gradient version (NeuronIntGrad, see
    :mod:`~captum_chains.pathways.contribution`). The critical pathway of an input
    keeps the top :math:`\\lceil (100-p)\\% \\cdot N \\rceil` neurons over all layers
    (one global threshold; ties by forward order, see
    :mod:`~captum_chains.pathways.selection`).

    The model is run in eval mode (see :func:`~captum_chains._utils.model_state.eval_mode`);
    its parameters, ``requires_grad`` flags and ``.grad`` are never written, and hooks
    are removed after every call, also on errors.

    Parameters
    ----------
    model : nn.Module
        Called as ``model(*inputs, *additional_forward_args)``; returns logits.
    activations : sequence of str
        Activation kinds that are neurons
        (:data:`~captum_chains.pathways.neurons.ACTIVATION_KINDS`).

    Examples
    --------
    >>> cp = CriticalPathways(model)                                  # doctest: +SKIP
    >>> res = cp.attribute(x, target=3, percentile=85)                # doctest: +SKIP
    >>> res.kept_fraction()                                           # doctest: +SKIP
    tensor([0.1500, 0.1500], dtype=torch.float64)
    """

    def __init__(self, model: nn.Module, activations: Sequence[str] = DEFAULT_ACTIVATIONS) -> None:
        self.model = require_module(model, "CriticalPathways")
        self.activations = check_activations(activations)

    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
        percentile: float = 85.0,
        method: Literal["taylor", "integrated"] = "taylor",
        steps: int = 10,
        internal_batch_size: int | None = None,
        progress: bool = False,
    ) -> CriticalPathwaysResult:
        """Contributions and critical-pathway masks for every input.

        Parameters
        ----------
        inputs : Tensor or tuple of Tensor
            Examples along dimension 0.
        target : int, tuple, Tensor or list, optional
            Output to explain, in Captum's formats (e.g. a class index, or one per
            example). ``None`` only for models with one output per example.
        additional_forward_args : Any
            Extra positional arguments of ``forward`` (tensors with the batch size as
            dim 0 are split with the inputs).
        percentile : float
            :math:`p \\in [0, 100)`: the share (in %) of neurons *dropped*; default 85
            (the paper's scripts use 70-99).
        method : {"taylor", "integrated"}
            NeuronMCT or NeuronIntGrad.
        steps : int
            :math:`m` of NeuronIntGrad (``m + 1`` gradient evaluations per layer).
        internal_batch_size : int, optional
            Largest batch per forward pass of NeuronIntGrad.
        progress : bool
            Show a progress bar (NeuronIntGrad).

        Returns
        -------
        CriticalPathwaysResult
        """
        percentile = check_percentile(percentile)
        if method not in CONTRIBUTION_METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {CONTRIBUTION_METHODS}")
        steps = check_steps(steps)
        internal_batch_size = check_batch_size(internal_batch_size)
        formatted = format_inputs(inputs, strict=False)
        args = format_additional_args(additional_forward_args)
        target = normalize_target(target, formatted[0].shape[0])
        detached = tuple(t.detach() for t in formatted)
        with traced(self.model, self.activations) as tracer:
            if method == "taylor":
                signed, output = taylor_contributions(tracer, detached, target, args)
            else:
                signed, output = integrated_contributions(
                    tracer, detached, target, args, steps, internal_batch_size, progress
                )
            sites = tracer.sites
        contributions = {name: value.abs() for name, value in signed.items()}
        masks = select_top_neurons(contributions, percentile, order=[s.name for s in sites])
        return CriticalPathwaysResult(
            sites=sites,
            contributions=contributions,
            masks=masks,
            percentile=percentile,
            method=method,
            target=target,
            output=output,
        )

    def masked_forward(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        pathways: CriticalPathwaysResult,
        additional_forward_args: Any = None,
    ) -> Tensor:
        """The model output with only the critical pathways' neurons active.

        Each activation is multiplied by its binary mask as it is computed; later
        activations are computed from the masked ones. Runs without gradients.
        """
        formatted = format_inputs(inputs, strict=False)
        _check_batch(pathways, formatted[0].shape[0])
        args = format_additional_args(additional_forward_args)
        with traced(self.model, self.activations) as tracer, torch.no_grad():
            return run_masked(tracer, formatted, args, pathways)


def _check_batch(pathways: CriticalPathwaysResult, batch: int) -> None:
    if not isinstance(pathways, CriticalPathwaysResult):
        raise TypeError(f"pathways must be a CriticalPathwaysResult, got {type(pathways).__name__}")
    if pathways.batch_size != batch:
        raise ValueError(
            f"the pathways were computed for {pathways.batch_size} examples but {batch} "
            "inputs were given; pass the same inputs"
        )
