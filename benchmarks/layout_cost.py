"""Cost of a NeuroChains step with channels-last inputs relative to the given layout.

Runs the same masked optimization steps (forward, KL and penalties, backward, proximal
update) on the same region, alternating the two layouts in one process so that machine
load affects both alike, and prints per-step seconds and the median ratio.

    OMP_NUM_THREADS=1 python benchmarks/layout_cost.py --model lite0 --rounds 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from step_cost import build  # same folder

from captum_chains import ChainConfig, ChainExtractor
from captum_chains._utils.validation import format_inputs
from captum_chains.neurochains import _Optimization


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default="lite0", choices=["lite0", "resnet50", "vgg19", "vit_b16"]
    )
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3, help="steps per sample")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build(args.model)
    x = torch.randn(args.batch, 3, args.size, args.size)
    if args.model == "lite0":
        from captum_chains.data import local_region, sample_photo

        photos = [sample_photo("chelsea"), sample_photo("coffee")]
        x = local_region(photos, n=args.batch, seed=0, size=args.size)
    items = format_inputs(x)
    structure = ChainExtractor(model)._structure(items, None, None, True)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for layout in (False, True):
            config = ChainConfig(steps=args.steps, early_stop_min_steps=10**6, channels_last=layout)
            run = _Optimization(model, structure, config, items, (), 1, None)
            scores, alphas, use_gates = run.initial()
            start = time.perf_counter()
            with run.masked() as state:
                run.optimize(state, scores, alphas, use_gates, progress=False)
            times[layout].append((time.perf_counter() - start) / args.steps)
    given, nhwc = statistics.median(times[False]), statistics.median(times[True])
    print(f"{args.model} {args.batch}x{args.size}^2, {torch.get_num_threads()} thread(s)")
    print(f"given layout  s/step: {[round(t, 3) for t in times[False]]}  median {given:.3f}")
    print(f"channels-last s/step: {[round(t, 3) for t in times[True]]}  median {nhwc:.3f}")
    print(f"ratio channels-last / given: {nhwc / given:.3f}")


if __name__ == "__main__":
    main()
