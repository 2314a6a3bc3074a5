"""Time of ``Chain.graph()`` on torchvision ResNeXt-50 (random weights, ~8,000 kept units).

The chain is built from given scores, without an optimization: every unit layer keeps a
random ``--keep`` fraction of its filters (scores in [0.2, 1.5]), all gates open. The
region is ``--n`` random images of ``--size`` pixels.

    OMP_NUM_THREADS=1 python benchmarks/graph_time.py --repeats 2

Prints the number of kept units, the graph's size, the wall-clock and CPU seconds of
``chain.graph()`` (the first call and the median of the repeats) and of the strongest
paths on that graph (``strongest_paths(graph, 5)``, what ``chain.paths(5)`` adds).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.models import resnext50_32x4d

from captum_chains.chains import strongest_paths
from captum_chains.config import ChainConfig
from captum_chains.result import Chain
from captum_chains.subnetwork import subnetwork_from_mappings
from captum_chains.units import discover


def build_chain(keep: float, n: int, size: int, seed: int) -> Chain:
    """A ResNeXt-50 chain keeping a random ``keep`` fraction of every unit layer."""
    torch.manual_seed(seed)
    model = resnext50_32x4d(weights=None).eval()
    x = torch.randn(n, 3, size, size)
    structure = discover(model, (x,))
    gen = torch.Generator().manual_seed(seed)
    importance = {}
    for unit in structure.units:
        scores = 0.2 + 1.3 * torch.rand(unit.size, generator=gen)
        importance[unit.name] = scores * (torch.rand(unit.size, generator=gen) < keep)
    sub = subnetwork_from_mappings(model, structure, importance)
    return Chain(
        importance=sub.importance,
        gates={},
        subnetwork=sub,
        history=[],
        structure=structure,
        config=ChainConfig(),
        kl=0.0,
        finetuned=False,
        inputs=x,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.25, help="kept fraction per layer")
    parser.add_argument("--n", type=int, default=4, help="region size (images)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls after the first")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    chain = build_chain(args.keep, args.n, args.size, args.seed)
    print(f"ResNeXt-50, {chain.num_filters} kept units of {chain.total_filters}")
    walls, cpus = [], []
    graph = None
    for _ in range(1 + args.repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        graph = chain.graph()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    assert graph is not None
    print(f"graph: {graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges")
    rest = slice(1, None) if args.repeats else slice(None)
    print(
        f"chain.graph(): first {walls[0]:.2f} s (CPU {cpus[0]:.2f} s), median "
        f"{statistics.median(walls[rest]):.2f} s (CPU {statistics.median(cpus[rest]):.2f} s)"
    )
    wall, cpu = time.perf_counter(), time.process_time()
    paths = strongest_paths(graph, 5)
    print(
        f"strongest_paths(graph, 5): {time.perf_counter() - wall:.2f} s "
        f"(CPU {time.process_time() - cpu:.2f} s); strongest: {paths[0]}"
    )


if __name__ == "__main__":
    main()
