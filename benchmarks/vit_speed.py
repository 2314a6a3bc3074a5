"""Structure and speed of NeuroChains on a random-weight ViT-B/16 (timm, no download).

Prints what discovery finds (heads, MLP neurons, embedding channels, branch gates, token
layout), then the time of one NeuroChains optimization step against the floor: one
forward plus an activation-only backward (gradient only w.r.t. the
input), at ``--batch`` images of 224x224. Optionally checks the export of a random
sub-network against the SubNetwork.

    OMP_NUM_THREADS=1 python benchmarks/vit_speed.py --batch 20 --repeats 2
    OMP_NUM_THREADS=1 python benchmarks/vit_speed.py --batch 2 --repeats 3 --export
    python benchmarks/vit_speed.py --model torchvision   # torchvision vit_b_16 (the "mha" hook)
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import time
from collections import Counter

import torch
from torch import nn

from captum_chains import ChainExtractor
from captum_chains._utils.model_state import eval_mode
from captum_chains.units import discover, token_layout


def build(name: str) -> nn.Module:
    if name == "timm":
        import timm

        return timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    import torchvision

    return torchvision.models.vit_b_16().eval()


def floor_times(model: nn.Module, x: torch.Tensor, repeats: int) -> list[float]:
    times = []
    with eval_mode(model):
        for _ in range(repeats + 1):
            xi = x.clone().requires_grad_(True)
            start = time.perf_counter()
            torch.autograd.grad(model(xi).logsumexp(1).sum(), xi)
            times.append(time.perf_counter() - start)
    return times[1:]


def step_times(model: nn.Module, x: torch.Tensor, repeats: int) -> list[float]:
    chain = ChainExtractor(model, steps=repeats + 1, finetune_steps=0).attribute(x, progress=False)
    stamps = [row["time"] for row in chain.history if row["phase"] == "optimize"]
    return [b - a for a, b in itertools.pairwise(stamps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["timm", "torchvision"], default="timm")
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--export", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build(args.model)
    x = torch.randn(args.batch, 3, 224, 224)
    start = time.perf_counter()
    structure = discover(model, (x[:1],))
    found = time.perf_counter() - start
    kinds = Counter()
    sizes = Counter()
    for u in structure.units:
        kinds[u.kind] += 1
        sizes[u.kind] += u.size
    threads = torch.get_num_threads()
    print(f"device: CPU ({platform.machine()}), {threads} thread(s); torch {torch.__version__}")
    print(f"discovery {found:.2f} s, family {structure.family}")
    for kind in kinds:
        print(f"  {kind}: {kinds[kind]} layers, {sizes[kind]} units")
    print(f"  gates: {len(structure.gates)} ({Counter(g.kind for g in structure.gates)})")
    head = next(u for u in structure.units if u.kind == "head")
    print(f"  first head layer: {head}")
    print(f"  token layout: {token_layout(model, x[:1])}")

    floors = floor_times(model, x, args.repeats)
    steps = step_times(model, x, args.repeats)
    floor, step = statistics.median(floors), statistics.median(steps)
    print(f"floor per repeat (s): {[round(t, 2) for t in floors]}")
    print(f"step per repeat (s): {[round(t, 2) for t in steps]}")
    print(
        f"batch {args.batch}x224^2: floor {floor:.2f} s, NeuroChains step {step:.2f} s, "
        f"ratio {step / floor:.2f}x (medians; first floor pass and first step not counted)"
    )
    if args.export:
        from captum_chains.export import export_subnetwork
        from captum_chains.subnetwork import subnetwork_from_mappings

        gen = torch.Generator().manual_seed(0)
        importance = {
            u.name: torch.rand(u.size, generator=gen) * (torch.rand(u.size, generator=gen) > 0.5)
            for u in structure.units
        }
        gates = {g.name: i % 5 != 3 for i, g in enumerate(structure.gates)}
        sub = subnetwork_from_mappings(model, structure, importance, gates)
        start = time.perf_counter()
        small = export_subnetwork(sub, example_inputs=x[:2])
        took = time.perf_counter() - start
        with torch.no_grad():
            diff = float((small(x) - sub(x)).abs().max())
        before = sum(p.numel() for p in model.parameters())
        after = sum(p.numel() for p in small.parameters())
        print(
            f"export of a random half-kept sub-network ({len(sub.removed_gates)} branches "
            f"removed): {took:.2f} s, params {before} -> {after}, max |export - SubNetwork| "
            f"= {diff:.2e}"
        )


if __name__ == "__main__":
    main()
