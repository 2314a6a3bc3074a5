"""Fast subset-lattice transforms against brute-force sums (Chen et al., 2024, Eqs. 1-2)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from captum_chains.interactions import transforms as tr


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Elementwise |a - b| <= atol + rtol |b| (cheaper to import than torch.testing)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    err = ((a - b).abs() - (atol + rtol * b.abs())).detach()
    assert float(err.max()) <= 0.0, f"max excess {float(err.max()):.3g}"


def _bits(size: int) -> torch.Tensor:
    idx = torch.arange(size)
    return ((idx[:, None] >> torch.arange(max(size.bit_length() - 1, 1))) & 1).sum(-1)


def _subset_sign(size: int) -> torch.Tensor:
    """``[S, T]`` matrix ``(-1)^{|S|-|T|} [T ⊆ S]`` written from the definition."""
    s = torch.arange(size)[:, None]
    t = torch.arange(size)[None, :]
    pc = _bits(size)
    sign = 1.0 - 2.0 * ((pc[:, None] - pc[None, :]) % 2).double()
    return torch.where((t & ~s) == 0, sign, torch.zeros_like(sign))


def _brute_and(v: torch.Tensor) -> torch.Tensor:
    """I_and(S) = sum_{T ⊆ S} (-1)^{|S|-|T|} v(T)."""
    return (v[..., None, :] * _subset_sign(v.shape[-1])).sum(-1)


def _brute_or(v: torch.Tensor) -> torch.Tensor:
    """I_or(S) = -sum_{T ⊆ S} (-1)^{|S|-|T|} v(N \\ T) for S ≠ ∅, I_or(∅) = v(∅)."""
    size = v.shape[-1]
    complement = torch.arange(size) ^ (size - 1)
    out = -(v[..., complement][..., None, :] * _subset_sign(size)).sum(-1)
    out[..., 0] = v[..., 0]
    return out


def _brute_and_values(i_and: torch.Tensor) -> torch.Tensor:
    """v(T) = sum_{S ⊆ T} I_and(S)."""
    size = i_and.shape[-1]
    t = torch.arange(size)[:, None]
    s = torch.arange(size)[None, :]
    return (i_and[..., None, :] * ((s & ~t) == 0).double()).sum(-1)


def _brute_or_values(i_or: torch.Tensor) -> torch.Tensor:
    """v(T) = I_or(∅) + sum_{S ∩ T ≠ ∅} I_or(S)."""
    size = i_or.shape[-1]
    t = torch.arange(size)[:, None]
    s = torch.arange(size)[None, :]
    return i_or[..., :1] + (i_or[..., None, :] * ((s & t) != 0).double()).sum(-1)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 6), seed=st.integers(0, 10_000), rows=st.integers(1, 3))
def test_fast_transforms_equal_brute_force(n: int, seed: int, rows: int) -> None:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(rows, 1 << n, generator=g, dtype=torch.float64)
    assert_close(tr.and_interactions(v), _brute_and(v), rtol=0, atol=1e-10)
    assert_close(tr.or_interactions(v), _brute_or(v), rtol=0, atol=1e-10)
    assert_close(tr.and_values(v), _brute_and_values(v), rtol=0, atol=1e-10)
    assert_close(tr.or_values(v), _brute_or_values(v), rtol=0, atol=1e-10)


def test_n8_against_brute_force_and_dense_matrix() -> None:
    v = torch.randn(2, 256, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_close(tr.mobius(v), _brute_and(v), rtol=0, atol=1e-9)
    dense = tr.dense_mobius_matrix(8, torch.float64)
    assert_close(tr.mobius(v), (v[:, None, :] * dense).sum(-1), rtol=0, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 7), seed=st.integers(0, 10_000))
def test_inverse_pairs_and_adjoints(n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 1 << n, generator=g, dtype=torch.float64)
    y = torch.randn(3, 1 << n, generator=g, dtype=torch.float64)
    assert_close(tr.zeta(tr.mobius(x)), x, rtol=0, atol=1e-9)
    assert_close(tr.or_values(tr.or_interactions(x)), x, rtol=0, atol=1e-9)
    assert_close(tr.or_interactions(tr.or_values(x)), x, rtol=0, atol=1e-9)
    # superset transforms are the transposes of the subset transforms
    lhs = (tr.zeta(x) * y).sum()
    assert_close(lhs, (x * tr.superset_zeta(y)).sum(), rtol=1e-10, atol=1e-9)
    lhs = (tr.mobius(x) * y).sum()
    assert_close(lhs, (x * tr.superset_mobius(y)).sum(), rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize(
    "fn", [tr.mobius, tr.zeta, tr.or_interactions, tr.or_values, tr.superset_mobius]
)
def test_backward_is_the_exact_adjoint(fn) -> None:
    size = 16
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, size, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, size, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, size, generator=g, dtype=torch.float64)
    # Jacobian of the linear map from its action on the unit vectors: column j = fn(e_j)
    jac = fn(torch.eye(size, dtype=torch.float64)).T
    (grad,) = torch.autograd.grad((fn(x) * y).sum(), x, create_graph=True)
    assert_close(grad, (y[:, :, None] * jac).sum(1).detach(), atol=1e-10)
    # double backward: the VJP y -> J^T y is itself differentiable, with VJP z -> J z
    (gg,) = torch.autograd.grad((grad * z).sum(), y)
    assert_close(gg, fn(z), atol=1e-10)


def test_non_contiguous_and_batched_shapes() -> None:
    base = torch.randn(4, 3, 32, dtype=torch.float64)
    x = base[:, 1]  # non-contiguous view
    assert_close(tr.mobius(x), _brute_and(x.contiguous()), rtol=0, atol=1e-10)
    assert tr.mobius(base).shape == base.shape
    assert_close(tr.mobius(base)[:, 2], tr.mobius(base[:, 2]), rtol=0, atol=0)
    assert torch.equal(x, base[:, 1])  # the input is not modified in place


def test_bad_lengths_and_helpers() -> None:
    with pytest.raises(ValueError, match="2\\*\\*n"):
        tr.mobius(torch.zeros(3, 6))
    assert tr.popcount(3).tolist() == [0, 1, 1, 2, 1, 2, 2, 3]
    assert tr.subset_bits(2).tolist() == [
        [False, False],
        [True, False],
        [False, True],
        [True, True],
    ]
    with pytest.raises(ValueError, match="GiB"):
        tr.dense_mobius_matrix(16)
