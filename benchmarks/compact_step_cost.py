"""Cost of a compact step at each support of a real run, against a step on the whole model.

Runs one chain with the defaults on the real EfficientNet-Lite0 (20 crops of two photos)
and keeps the support of every compact program the run built. Then, in the same process,
times for each support one optimization step (forward, KL-like loss, backward to the
scores) on that program, with and without the score-free prefix cache, and one step on the
whole masked model.

    OMP_NUM_THREADS=1 python benchmarks/compact_step_cost.py

Prints one row per support: live filters, seconds per step and the ratio to the full step.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import captum_chains.neurochains as neurochains
from captum_chains import ChainExtractor
from captum_chains.data import local_region, sample_photo
from captum_chains.export.compact import CompactProgram, compact_program
from captum_chains.masking import MaskState, apply_masks
from captum_chains.pretrained import load_efficientnet_lite0


def seconds(step: Callable[[], None], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def record_supports(extractor: ChainExtractor, x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Run a chain; return (support, open gates, scores) of every compact program it built."""
    saved: list[tuple[torch.Tensor, ...]] = []
    original = neurochains._Optimization._compaction

    def recording(self, state, scores, gates_open, current):  # type: ignore[no-untyped-def]
        program = original(self, state, scores, gates_open, current)
        if program is not None and program is not current:
            saved.append((program.support.clone(), gates_open[0].clone(), scores[0].detach()))
        return program

    neurochains._Optimization._compaction = recording  # type: ignore[method-assign]
    try:
        chain = extractor.attribute(x, progress=False)
    finally:
        neurochains._Optimization._compaction = original  # type: ignore[method-assign]
    print(f"chain: {chain.num_filters} of {chain.total_filters} filters kept")
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", nargs=2, default=["chelsea", "coffee"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_efficientnet_lite0()
    x = local_region([sample_photo(p) for p in args.photos], n=20, seed=0)
    extractor = ChainExtractor(model)
    supports = record_supports(extractor, x)
    xc = x.contiguous(memory_format=torch.channels_last)
    structure = extractor._structure((xc,), None, None, True)
    offsets = structure.offsets()

    scores = torch.ones(structure.total_units, requires_grad=True)
    state = MaskState()

    def full_step() -> None:
        state.scores = {name: scores[a:b] for name, (a, b) in offsets.items()}
        out = model(xc)
        torch.autograd.grad(out.logsumexp(1).sum(), scores)

    with apply_masks(model, structure, state, fold_norms=True):  # as the optimization
        full = seconds(full_step, args.repeats)
    print(f"whole model (masked, channels-last): {full:.3f} s per step")
    print(f"{'live filters':>12} {'no cache':>9} {'cache':>9} {'ratio to whole':>15}")
    for support, gates_open, values in supports:
        row = []
        for cache in (False, True):
            program: CompactProgram = compact_program(
                model, structure, support, gates_open, (xc[:2],), cache=cache
            )
            s = values.clone().requires_grad_(True)

            def step(program: CompactProgram = program, s: torch.Tensor = s) -> None:
                out = program(s, xc)
                torch.autograd.grad(out.logsumexp(1).sum(), s)

            row.append(seconds(step, args.repeats))
        print(f"{int(support.sum()):>12} {row[0]:>8.3f}s {row[1]:>8.3f}s {row[1] / full:>14.2f}x")


if __name__ == "__main__":
    main()
