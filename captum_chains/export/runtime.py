"""The small modules an exported network may contain besides copies of the model's layers.

* :class:`ChannelAdapter` - gathers channels of a tensor into another order, filling
  channels it does not have with zeros (the scatter of a kept filter back into a
  residual stream, or the zero input of a depthwise filter whose input was removed);
* :class:`ChannelScale` - multiplies channels by fixed scores where they cannot be
  folded into a preceding layer's weights;
* :func:`channel_scale` - the same as a function; used while tracing to mark score sites.

All are plain tensor code without Python control flow on values, so exported networks
run through TorchScript, ``torch.export`` and ONNX.
"""

import torch
from torch import nn


def channel_scale(x: torch.Tensor, scores: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` with its channels along ``dim`` multiplied by ``scores`` (Eq. 3, ``F * S``).

    Computes exactly what :func:`captum_chains.masking.scale_channels` computes for one
    region, so a traced graph with these nodes reproduces a SubNetwork bit for bit.
    """
    if scores.ndim == 0:
        return x * scores
    shape = [1] * x.ndim
    shape[dim] = scores.shape[0]
    return x * scores.view(shape)


class ChannelAdapter(nn.Module):
    """Reorder/select channels along ``dim``; channels marked missing become ``fill``.

    Parameters
    ----------
    dim : int
        Non-negative channel dimension of the input.
    index : Tensor
        Long ``[K]``: for each output entry, the input entry to copy; entries equal to
        the input's size along ``dim`` read the fill block.
    pad : int
        Number of fill entries appended before gathering (0 when nothing is missing).
    fill : float
        Value of missing entries (0 for removed channels).
    """

    index: torch.Tensor

    def __init__(self, dim: int, index: torch.Tensor, pad: int = 0, fill: float = 0.0) -> None:
        super().__init__()
        self.dim = int(dim)
        self.pad = int(pad)
        self.fill = float(fill)
        self.register_buffer("index", index.to(torch.long).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad > 0:
            shape = list(x.shape)
            shape[self.dim] = self.pad
            x = torch.cat(
                [x, torch.full(shape, self.fill, dtype=x.dtype, device=x.device)], self.dim
            )
        return x.index_select(self.dim, self.index)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, out={self.index.numel()}, pad={self.pad}"


class ChannelScale(nn.Module):
    """Multiply channels along a fixed dimension by fixed scores (stored as a buffer)."""

    scale: torch.Tensor

    def __init__(self, scale: torch.Tensor, dim: int, ndim: int) -> None:
        super().__init__()
        shape = [1] * ndim
        shape[dim] = -1
        self.register_buffer("scale", scale.detach().clone().reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}"
