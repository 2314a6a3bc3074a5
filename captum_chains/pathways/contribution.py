"""Neuron contributions to a target logit: NeuronMCT and NeuronIntGrad.

Khakzar et al., "Neural Response Interpretation through the Lens of Critical
Pathways", CVPR 2021, Sec. 3.1. For a neuron with activation :math:`a` and the
pre-softmax target logit :math:`y_c`:

* **NeuronMCT** (first-order Taylor, Molchanov et al. 2017), Eq. (2)

  .. math:: s = \\left| a \\, \\frac{\\partial y_c}{\\partial a} \\right|

* **NeuronIntGrad** (integrated gradients on the neurons of one layer), Eq. (3): the
  layer's activation :math:`\\mathbf{a}^l` is scaled by :math:`\\alpha`, the rest of
  the network recomputed, and the gradients averaged over a linear grid

  .. math:: s = \\left| a \\, \\frac{1}{m+1} \\sum_{j=0}^{m}
            \\frac{\\partial y_c}{\\partial a}\\Big|_{\\mathbf{a}^l = \\frac{j}{m}\\mathbf{a}^l}
            \\right|

  with :math:`m` = ``steps`` (default 10). The grid is the reference code's
  ``j = 0..m`` with uniform weights, but with :math:`\\alpha_j = j/m`; the reference
  implementation accumulates the step (``mask += j*step``), so its :math:`\\alpha`
  grows quadratically past 1 - that bug is not reproduced.

The functions here return the *signed* products :math:`a\\,\\bar g`; critical
pathways use their absolute values. All examples of a batch are handled in one
pass: because the model is run in eval mode, the gradient of the summed targets
with respect to one example's activation is that example's gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from captum_chains._utils.progress import tqdm
from captum_chains._utils.validation import TargetType, index_batch, select_output, target_rows
from captum_chains.pathways.neurons import ActivationTracer

__all__ = ["integrated_contributions", "taylor_contributions"]


def _grads(y: Tensor, nodes: list[Tensor]) -> list[Tensor]:
    """``d sum(y) / d node`` for every node, zeros where ``y`` does not depend on it."""
    if not y.requires_grad:
        return [torch.zeros_like(n) for n in nodes]
    grads = torch.autograd.grad(y.sum(), nodes, allow_unused=True)
    return [torch.zeros_like(n) if g is None else g for n, g in zip(nodes, grads, strict=True)]


def taylor_contributions(
    tracer: ActivationTracer,
    inputs: tuple[Tensor, ...],
    target: TargetType,
    additional_forward_args: tuple[Any, ...] = (),
) -> tuple[dict[str, Tensor], Tensor]:
    """Signed first-order Taylor products :math:`a \\, \\partial y_c / \\partial a` (NeuronMCT).

    Parameters
    ----------
    tracer : ActivationTracer
        An active tracer on the model (inside its context manager).
    inputs : tuple of Tensor
        Batched inputs.
    target : TargetType
        Normalized target (see :func:`captum_chains._utils.validation.normalize_target`).
    additional_forward_args : tuple
        Extra positional arguments of the model.

    Returns
    -------
    dict of str to Tensor, Tensor
        Per site name, ``a * grad`` of shape ``[batch, *site.shape]``; and the model
        output (detached).
    """
    nodes: dict[int, Tensor] = {}

    def record(index: int, out: Tensor) -> Tensor:
        # An activation with no autograd history (inputs and weights need no grad)
        # becomes a leaf; later activations then depend on it, so every gradient is
        # the full derivative of y_c through the rest of the network.
        node = out if out.requires_grad else out.detach().requires_grad_()
        nodes[index] = node
        # the model continues with a copy, so in-place ops downstream cannot alter `node`
        return node.clone()

    with torch.enable_grad():
        output = tracer.run(inputs, additional_forward_args, record)
        y = select_output(output, target)
        order = [nodes[i] for i in range(len(tracer.sites))]
        grads = _grads(y, order)
    products = {
        site.name: (node.detach() * grad).detach()
        for site, node, grad in zip(tracer.sites, order, grads, strict=True)
    }
    return products, output.detach()


def integrated_contributions(
    tracer: ActivationTracer,
    inputs: tuple[Tensor, ...],
    target: TargetType,
    additional_forward_args: tuple[Any, ...] = (),
    steps: int = 10,
    internal_batch_size: int | None = None,
    progress: bool = False,
) -> tuple[dict[str, Tensor], Tensor]:
    """Signed layer-wise integrated-gradient products (NeuronIntGrad).

    For every activation site separately, the site's output is multiplied by
    :math:`\\alpha_j = j/m`, ``j = 0..m``, later activations recomputed, and the
    gradients of :math:`y_c` with respect to the scaled activation averaged; the
    result is the average gradient times the unscaled activation.

    Parameters
    ----------
    tracer, inputs, target, additional_forward_args
        As in :func:`taylor_contributions`.
    steps : int
        :math:`m`; ``m + 1`` gradient evaluations per layer.
    internal_batch_size : int, optional
        Largest number of (example, alpha) rows per forward pass; default all
        ``(m + 1) * batch`` rows at once.
    progress : bool
        Show a tqdm bar over the layers.

    Returns
    -------
    dict of str to Tensor, Tensor
        As in :func:`taylor_contributions`.
    """
    activations: dict[int, Tensor] = {}

    def record(index: int, out: Tensor) -> Tensor:
        activations[index] = out.detach().clone()
        return out

    with torch.no_grad():
        output = tracer.run(inputs, additional_forward_args, record)
    batch = inputs[0].shape[0]
    rows = (steps + 1) * batch
    chunk = internal_batch_size or rows
    products: dict[str, Tensor] = {}
    sites = tracer.sites
    for index, site in enumerate(tqdm(sites, desc="NeuronIntGrad", disable=not progress)):
        act = activations[index]
        grad_sum = torch.zeros_like(act)
        for start in range(0, rows, chunk):
            row = torch.arange(start, min(rows, start + chunk), device=act.device)
            example, step = row % batch, row // batch
            alpha = (step.to(act.dtype) / steps).view(-1, *([1] * len(site.shape)))
            x, args = index_batch(inputs, additional_forward_args, batch, example)
            holder: list[Tensor] = []

            def scale(
                i: int,
                out: Tensor,
                _index: int = index,
                _alpha: Tensor = alpha,
                _holder: list[Tensor] = holder,
            ) -> Tensor:
                if i != _index:
                    return out
                leaf = (out.detach() * _alpha).requires_grad_()
                _holder.append(leaf)
                return leaf.clone()

            with torch.enable_grad():
                out = tracer.run(x, args, scale)
                y = select_output(out, target_rows(target, example))
                (grad,) = _grads(y, holder)
            grad_sum.index_add_(0, example, grad.detach())
        products[site.name] = act * grad_sum / (steps + 1)
    return products, output.detach()
