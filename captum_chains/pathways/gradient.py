"""The pathway gradient (Khakzar et al., CVPR 2021, Sec. 3.3) as a Captum attribution.

The pathway gradient of an input :math:`x` is the plain input gradient of the
target logit through the network restricted to the input's critical pathway:

.. math:: \\mathrm{PG}(x) = \\frac{\\partial\\, \\tilde y_c(x)}{\\partial x}, \\qquad
          \\tilde{\\mathbf a}^{l} = \\mathbf m^{l} \\odot
          \\sigma\\big(f^{l}(\\tilde{\\mathbf a}^{l-1})\\big)

where :math:`\\mathbf m^l` is the binary critical-pathway mask of activation layer
:math:`l` (from :class:`~captum_chains.pathways.critical.CriticalPathways`) and every
later activation is recomputed from the masked ones. The masks are constants: the
gradient flows only through kept neurons. It is *not* multiplied by the input. With
``percentile=0`` every neuron is kept and the pathway gradient equals Captum's
``Saliency(abs=False)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from captum.attr import GradientAttribution
from torch import Tensor, nn

from captum_chains._utils.validation import (
    TargetType,
    format_additional_args,
    format_inputs,
    normalize_target,
    require_module,
    select_output,
)
from captum_chains.pathways.critical import (
    CriticalPathways,
    CriticalPathwaysResult,
    _check_batch,
    run_masked,
)
from captum_chains.pathways.neurons import DEFAULT_ACTIVATIONS, check_activations, traced

__all__ = ["PathwayGradient", "max_magnitude_channel"]


def max_magnitude_channel(attributions: Tensor, dim: int = 1) -> Tensor:
    """Per position, the signed channel value with the largest magnitude.

    The single-channel display of the reference code: for every pixel the value of
    the channel whose absolute value is largest, sign kept. Ties go to the first
    such channel.

    Parameters
    ----------
    attributions : Tensor
        E.g. ``[N, C, H, W]``.
    dim : int
        The channel dimension.

    Returns
    -------
    Tensor
        Same shape with ``dim`` reduced to size 1 (``[N, 1, H, W]``).
    """
    index = attributions.abs().argmax(dim=dim, keepdim=True)
    return attributions.gather(dim, index)


class PathwayGradient(GradientAttribution):
    """Input gradient through each input's critical pathway (Khakzar et al., CVPR 2021).

    A Captum ``GradientAttribution``: ``attribute(inputs, target, ...)`` returns a
    tensor (or tuple of tensors) shaped like ``inputs``, usable with
    ``captum.attr.visualization`` and beside Captum's own methods. The critical
    pathways are computed per input by :class:`CriticalPathways` unless given.

    Parameters
    ----------
    forward_func : nn.Module
        The model (must be an ``nn.Module``: its submodule names label the neurons).
    activations : sequence of str
        Activation kinds that are neurons.

    Examples
    --------
    >>> pg = PathwayGradient(model)                                  # doctest: +SKIP
    >>> attr = pg.attribute(x, target=y, percentile=85)              # doctest: +SKIP
    >>> attr.shape == x.shape                                        # doctest: +SKIP
    True
    """

    def __init__(
        self, forward_func: nn.Module, activations: Sequence[str] = DEFAULT_ACTIVATIONS
    ) -> None:
        require_module(forward_func, "PathwayGradient")
        super().__init__(forward_func)
        self.activations = check_activations(activations)
        self.last_pathways: CriticalPathwaysResult | None = None

    @property
    def multiplies_by_inputs(self) -> bool:
        return False

    def attribute(  # type: ignore[override]  # Captum: each method's own signature
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
        percentile: float = 85.0,
        method: Literal["taylor", "integrated"] = "taylor",
        steps: int = 10,
        pathways: CriticalPathwaysResult | None = None,
        internal_batch_size: int | None = None,
        channel_reduction: Literal["max_magnitude"] | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        """Pathway gradient of ``target`` with respect to ``inputs``.

        Parameters
        ----------
        inputs : Tensor or tuple of Tensor
            Floating-point inputs, examples along dimension 0.
        target : int, tuple, Tensor or list, optional
            Captum's target formats (class 0 is a valid target).
        additional_forward_args : Any
            Extra positional arguments of ``forward``.
        percentile : float
            Global percentile :math:`p \\in [0, 100)` of the critical pathways.
        method : {"taylor", "integrated"}
            Neuron contribution: NeuronMCT or NeuronIntGrad.
        steps : int
            Alpha steps of NeuronIntGrad.
        pathways : CriticalPathwaysResult, optional
            Precomputed pathways of these inputs (then ``percentile``, ``method``,
            ``steps`` are ignored).
        internal_batch_size : int, optional
            Largest batch per forward pass of NeuronIntGrad.
        channel_reduction : {"max_magnitude"}, optional
            Reduce dimension 1 of every input's attribution to its largest-magnitude
            signed channel (:func:`max_magnitude_channel`), for display.

        Returns
        -------
        Tensor or tuple of Tensor
            Shaped like ``inputs`` (dimension 1 of size 1 with ``channel_reduction``).
            The pathways used are kept in :attr:`last_pathways`.
        """
        formatted, is_tuple = format_inputs(inputs, strict=False), isinstance(inputs, tuple)
        for i, tensor in enumerate(formatted):
            if not tensor.is_floating_point():
                raise TypeError(
                    f"inputs[{i}] has dtype {tensor.dtype}; the pathway gradient is a gradient "
                    "with respect to the inputs, so they must be floating point"
                )
        if channel_reduction not in (None, "max_magnitude"):
            raise ValueError(
                f"unknown channel_reduction {channel_reduction!r}; use None or 'max_magnitude'"
            )
        batch = formatted[0].shape[0]
        args = format_additional_args(additional_forward_args)
        if pathways is None:
            pathways = CriticalPathways(self.forward_func, self.activations).attribute(
                inputs,
                target=target,
                additional_forward_args=additional_forward_args,
                percentile=percentile,
                method=method,
                steps=steps,
                internal_batch_size=internal_batch_size,
            )
        _check_batch(pathways, batch)
        target = normalize_target(target, batch)
        leaves = tuple(t.detach().clone().requires_grad_() for t in formatted)
        with traced(self.forward_func, self.activations) as tracer, torch.enable_grad():
            output = run_masked(tracer, leaves, args, pathways)
            y = select_output(output, target)
            grads = torch.autograd.grad(y.sum(), leaves, allow_unused=True)
        result = tuple(
            torch.zeros_like(leaf) if g is None else g.detach()
            for leaf, g in zip(leaves, grads, strict=True)
        )
        if channel_reduction == "max_magnitude":
            result = tuple(max_magnitude_channel(r) if r.ndim > 1 else r for r in result)
        self.last_pathways = pathways
        return result if is_tuple else result[0]

    def attribute_future(self) -> None:  # pragma: no cover - Captum API stub
        raise NotImplementedError("attribute_future is not implemented for PathwayGradient")
