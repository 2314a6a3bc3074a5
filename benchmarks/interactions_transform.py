"""Butterfly vs dense-matrix Möbius transform for AND-OR interactions, n = 10 .. 16.

The reference implementation of Chen et al. (ICLR 2024) multiplies by ``2**n x 2**n``
transform matrices. Here the same AND (Harsanyi) transform is computed by the in-place
radix-2 butterfly of :mod:`captum_chains.interactions.transforms` (``n 2**n`` additions,
one copy of the input) and by the dense matrix (built as a Kronecker power, the fastest
way to build it; ``4**n`` entries). Reported per ``n``: time of one transform of
``rows`` set functions (forward, and forward + backward as used by gradient-based
optimisers) and the bytes of the tensors each method allocates. The dense matrix for
``n = 16`` needs 16 GiB (float32): it is not built; its time is extrapolated from
``n = 14`` by the ``4**n`` flop count and marked as an estimate.

Usage::

    python benchmarks/interactions_transform.py --rows 64 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from captum_chains.interactions.transforms import dense_mobius_matrix, mobius


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,12,14,16")
    parser.add_argument("--rows", type=int, default=64, help="set functions per transform")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-dense-gib", type=float, default=2.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"rows = {args.rows}, float32, torch threads = {torch.get_num_threads()}")
    print(
        "| n | butterfly fwd | butterfly fwd+bwd | butterfly memory | dense build | dense fwd "
        "| dense fwd+bwd | dense memory | speed-up (fwd) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    last_dense: tuple[int, float, float] | None = None
    for n in (int(s) for s in args.sizes.split(",")):
        row, last_dense = _measure(n, args.rows, args.repeats, args.max_dense_gib, last_dense)
        print(row, flush=True)


def _measure(
    n: int, rows: int, repeats: int, max_gib: float, last: tuple[int, float, float] | None
) -> tuple[str, tuple[int, float, float] | None]:
    """One table row for ``n`` players; extrapolates the dense time when too large."""
    size = 1 << n
    x = torch.randn(rows, size)
    xg = x.clone().requires_grad_()
    t_bf = _best(lambda: mobius(x), repeats)
    t_bf_bwd = _best(lambda: mobius(xg).sum().backward(), repeats)
    mem_bf = 2 * rows * size * 4  # input + one working copy
    dense_bytes = 4**n * 4
    if dense_bytes <= max_gib * 2**30:
        t0 = time.perf_counter()
        mat = dense_mobius_matrix(n)
        t_build = time.perf_counter() - t0
        dense_repeats = repeats if dense_bytes < 2**28 else 1  # >= 256 MiB: one timed run
        t_dense = _best(lambda: x @ mat.T, dense_repeats)
        t_dense_bwd = _best(lambda: (xg @ mat.T).sum().backward(), dense_repeats)
        err = float((x @ mat.T - mobius(x)).abs().max())
        assert err < 1e-3 * 2 ** (n / 2), err
        del mat
        last = (n, t_dense, t_dense_bwd)
        build = f"{t_build:.3f} s"
        fwd, bwd = f"{t_dense * 1e3:.2f} ms", f"{t_dense_bwd * 1e3:.1f} ms"
    else:
        if last is None:
            raise ValueError("run a smaller n first: the dense time is extrapolated from it")
        n0, d0, b0 = last
        t_dense, t_dense_bwd = d0 * 4 ** (n - n0), b0 * 4 ** (n - n0)
        build = "not built"
        fwd = f"~{t_dense * 1e3:.0f} ms (est.)"
        bwd = f"~{t_dense_bwd * 1e3:.0f} ms (est.)"
    row = (
        f"| {n} | {t_bf * 1e3:.2f} ms | {t_bf_bwd * 1e3:.2f} ms | {_fmt_bytes(mem_bf)} | "
        f"{build} | {fwd} | {bwd} | {_fmt_bytes(dense_bytes)} | {t_dense / t_bf:.0f}x |"
    )
    return row, last


if __name__ == "__main__":
    main()
