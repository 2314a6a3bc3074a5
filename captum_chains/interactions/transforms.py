"""Fast subset-lattice transforms for AND-OR interactions (Chen et al., ICLR 2024).

A set function over ``n`` players is stored as a tensor whose last dimension has
length ``2**n``; entry ``T`` (an integer read as a bitmask, bit ``i`` set when player
``i`` is in the subset) holds the value on that subset. The transforms below are the
subset-sum ("zeta") transform and its inverse, the Möbius transform, computed by the
butterfly over bits in ``O(n 2**n)`` additions and built from differentiable torch
ops, so gradients flow through them without ever forming a ``2**n x 2**n`` matrix.

Equations (numbering as in Chen et al., 2024, Sec. 2):

* AND (Harsanyi) interaction, Eq. (1):
  ``I_and(S) = sum_{T ⊆ S} (-1)^{|S|-|T|} v_and(x_T)`` — the Möbius transform.
* OR interaction, Eq. (2):
  ``I_or(S) = -sum_{T ⊆ S} (-1)^{|S|-|T|} v_or(x_{N \\ T})`` for ``S ≠ ∅`` and
  ``I_or(∅) = v_or(x_∅)``.
* Universal matching: ``v_and(x_T) = sum_{S ⊆ T} I_and(S)`` and
  ``v_or(x_T) = I_or(∅) + sum_{S ∩ T ≠ ∅} I_or(S)``.

The complement ``N \\ T`` of a bitmask ``T`` is ``(2**n - 1) ^ T``; since
``(2**n - 1) - T == (2**n - 1) ^ T``, indexing by complements is a flip of the last
dimension.
"""

from __future__ import annotations

import torch


def num_players(length: int) -> int:
    """Return ``n`` for a set-function tensor whose last dimension is ``length == 2**n``.

    Raises
    ------
    ValueError
        If ``length`` is not a power of two.
    """
    n = int(length).bit_length() - 1
    if length < 1 or (1 << n) != length:
        raise ValueError(
            f"a set function over n players needs a last dimension of length 2**n; got {length}"
        )
    return n


def _butterfly_(out: torch.Tensor, n: int, inverse: bool, upward: bool) -> torch.Tensor:
    """In-place radix-2 butterfly on a contiguous ``[rows, 2**n]`` tensor."""
    rows = out.shape[0]
    for bit in range(n):
        view = out.view(rows, -1, 2, 1 << bit)  # [rows, high bits, bit, low bits]
        without, with_ = view[:, :, 0, :], view[:, :, 1, :]
        if upward:  # f(T ∪ {i}) += f(T): sums over subsets
            (with_.sub_ if inverse else with_.add_)(without)
        else:  # f(T) += f(T ∪ {i}): sums over supersets
            (without.sub_ if inverse else without.add_)(with_)
    return out


class _Lattice(torch.autograd.Function):
    """Linear subset/superset transform; its adjoint is the transform on the other lattice."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, inverse: bool, upward: bool) -> torch.Tensor:  # type: ignore[override]  # torch: (*args)
        ctx.inverse, ctx.upward = inverse, upward
        n = num_players(values.shape[-1])
        flat = values.reshape(-1, values.shape[-1]).clone(memory_format=torch.contiguous_format)
        return _butterfly_(flat, n, inverse, upward).view(values.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]  # torch: (*grads)
        return _Lattice.apply(grad, ctx.inverse, not ctx.upward), None, None


def _butterfly(values: torch.Tensor, inverse: bool, upward: bool) -> torch.Tensor:
    """Subset (``upward``) or superset lattice transform in ``O(n 2**n)``, differentiable.

    Each of the ``n`` stages adds (or subtracts) the half of the entries without bit
    ``i`` to the half with it, in place on a copy; the backward pass applies the
    transposed transform the same way, so no ``2**n x 2**n`` matrix and no autograd
    graph of ``n`` stages is ever stored.
    """
    return _Lattice.apply(values, inverse, upward)


def zeta(values: torch.Tensor) -> torch.Tensor:
    """Subset-sum transform ``f(T) = sum_{S ⊆ T} g(S)`` along the last dimension.

    Parameters
    ----------
    values : torch.Tensor
        ``[..., 2**n]`` set function ``g``.

    Returns
    -------
    torch.Tensor
        ``[..., 2**n]`` set function ``f``; differentiable.
    """
    return _butterfly(values, inverse=False, upward=True)


def mobius(values: torch.Tensor) -> torch.Tensor:
    """Möbius transform ``g(S) = sum_{T ⊆ S} (-1)^{|S|-|T|} f(T)``, the inverse of :func:`zeta`.

    This is the Harsanyi dividend (AND interaction) of Chen et al. (2024), Eq. (1).
    """
    return _butterfly(values, inverse=True, upward=True)


def superset_zeta(values: torch.Tensor) -> torch.Tensor:
    """Superset-sum transform ``f(T) = sum_{S ⊇ T} g(S)`` (the transpose of :func:`zeta`)."""
    return _butterfly(values, inverse=False, upward=False)


def superset_mobius(values: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`superset_zeta` (the transpose of :func:`mobius`)."""
    return _butterfly(values, inverse=True, upward=False)


def complement(values: torch.Tensor) -> torch.Tensor:
    """Re-index a set function by complements: ``out[T] = values[N \\ T]``."""
    return values.flip(-1)


def and_interactions(v_and: torch.Tensor) -> torch.Tensor:
    """AND interactions ``I_and = Möbius(v_and)``, Chen et al. (2024), Eq. (1).

    ``I_and(∅) = v_and(x_∅)``.
    """
    return mobius(v_and)


def or_interactions(v_or: torch.Tensor) -> torch.Tensor:
    """OR interactions of Chen et al. (2024), Eq. (2).

    ``I_or(S) = -sum_{T ⊆ S} (-1)^{|S|-|T|} v_or(x_{N \\ T})`` for ``S ≠ ∅`` and
    ``I_or(∅) = v_or(x_∅)``.
    """
    out = -mobius(complement(v_or))
    return torch.cat((v_or[..., :1], out[..., 1:]), dim=-1)


def or_interactions_adjoint(u: torch.Tensor) -> torch.Tensor:
    """Transpose of the linear map :func:`or_interactions` (used by the PDHG solver).

    ``or_interactions = E_∅ + (I - E_∅)(-Möbius ∘ complement)`` row-wise, so its
    transpose is ``u_∅ e_∅ - complement(superset_mobius(u with u_∅ = 0))``.
    """
    head = u[..., :1]
    tail = torch.cat((torch.zeros_like(head), u[..., 1:]), dim=-1)
    out = -complement(superset_mobius(tail))
    return torch.cat((out[..., :1] + head, out[..., 1:]), dim=-1)


def and_values(i_and: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`and_interactions`: ``v_and(x_T) = sum_{S ⊆ T} I_and(S)``."""
    return zeta(i_and)


def or_values(i_or: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`or_interactions`.

    ``v_or(x_T) = I_or(∅) + sum_{S ∩ T ≠ ∅} I_or(S)``, computed as
    ``I_or(∅) + Z(N) - Z(N \\ T)`` with ``Z`` the subset sums of ``I_or`` restricted to
    non-empty sets.
    """
    empty = i_or[..., :1]
    nonempty = torch.cat((torch.zeros_like(empty), i_or[..., 1:]), dim=-1)
    sums = zeta(nonempty)
    return empty + sums[..., -1:] - complement(sums)


def popcount(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Order ``|S|`` of every subset bitmask ``S`` in ``range(2**n)`` (int64)."""
    idx = torch.arange(1 << n, device=device)
    bits = (idx.unsqueeze(-1) >> torch.arange(n, device=device)) & 1
    return bits.sum(-1)


def subset_bits(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean ``[2**n, n]`` table: row ``T`` has ``True`` in column ``i`` iff ``i ∈ T``."""
    idx = torch.arange(1 << n, device=device)
    return ((idx.unsqueeze(-1) >> torch.arange(n, device=device)) & 1).bool()


def dense_mobius_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``2**n x 2**n`` Möbius matrix, for comparisons and benchmarks only.

    It needs ``4**n`` entries (``n = 14``: 1 GiB in float32; ``n = 16``: 16 GiB) — the
    reason the package never uses it. Built as a Kronecker power of ``[[1, 0], [-1, 1]]``.
    """
    if n > 14:
        need = (4**n) * torch.finfo(dtype).bits // 8
        raise ValueError(
            f"dense 2**n x 2**n matrix for n={n} needs {need / 2**30:.0f} GiB; "
            "use the butterfly transforms (mobius/zeta) instead"
        )
    base = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=dtype)
    out = torch.ones(1, 1, dtype=dtype)
    for _ in range(n):
        out = torch.kron(base, out)
    return out


def estimate_dense_bytes(n: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one dense ``2**n x 2**n`` transform matrix."""
    return (4**n) * (torch.finfo(dtype).bits // 8)
