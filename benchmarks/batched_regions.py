"""Throughput of batched regions (``attribute_many``) against one region at a time.

K regions of B inputs each are extracted twice with the same configuration and seed:
once as K separate :meth:`ChainExtractor.attribute` calls, once as one
:meth:`ChainExtractor.attribute_many` call that optimizes the K score/gate sets in one
forward/backward pass over a ``[K * B, ...]`` batch. Prints regions per second of both,
the ratio, the largest score difference between the two (they must agree), and the peak
memory of each way (CUDA: ``max_memory_allocated``; CPU: the process' peak resident set
growth, measured in a fresh subprocess per configuration so the numbers do not mix).

    python benchmarks/batched_regions.py --model digits_resnet --k 1 4 8 --steps 60
    python benchmarks/batched_regions.py --model resnet50 --batch 20 --size 224 --k 8   # GPU

Early stopping is off (``early_stop_delta=0``) so both ways run the same number of steps and
the ratio measures the cost per step, not the luck of the stopping rule.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch
from torch import nn

from captum_chains import ChainExtractor


def build(name: str, size: int) -> tuple[nn.Module, torch.Tensor]:
    """A model and a pool of inputs to draw regions from (digits: real test digits)."""
    if name.startswith("digits_"):
        from captum_chains.zoo import load_digits_data, train_digits_model

        return train_digits_model(name.removeprefix("digits_")), load_digits_data().x_test
    import torchvision

    model = {"resnet50": torchvision.models.resnet50, "vgg19": torchvision.models.vgg19}[name]()
    return model.eval(), torch.randn(256, 3, size, size)


def regions_of(pool: torch.Tensor, k: int, batch: int, seed: int) -> list[torch.Tensor]:
    """``k`` disjoint random regions of ``batch`` inputs each."""
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    return [pool[order[i * batch : (i + 1) * batch]] for i in range(k)]


def peak_memory_mb(device: torch.device, rss_before: int) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024


def measure(args: argparse.Namespace, k: int, mode: str) -> dict:
    """One configuration in this process: seconds, peak memory and the chains' scores."""
    device = torch.device(args.device)
    model, pool = build(args.model, args.size)
    model.to(device)
    regions = [r.to(device) for r in regions_of(pool, k, args.batch, args.seed)]
    extractor = ChainExtractor(
        model,
        steps=args.steps,
        finetune_steps=args.finetune_steps,
        early_stop_delta=0.0,
        gate_penalty=args.gate_penalty,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "batched":
        chains = extractor.attribute_many(regions, progress=False, seed=args.seed)
    else:
        chains = [extractor.attribute(r, progress=False, seed=args.seed) for r in regions]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    scores = torch.stack([c.subnetwork.scores.cpu() for c in chains])
    return {
        "mode": mode,
        "k": k,
        "seconds": seconds,
        "peak_mb": peak_memory_mb(device, rss_before),
        "scores": scores.tolist(),
        "kept": [c.num_filters for c in chains],
    }


def run_child(args: argparse.Namespace, k: int, mode: str) -> dict:
    """:func:`measure` in a fresh interpreter (clean peak-memory counters)."""
    cmd = [sys.executable, __file__, "--child", mode, "--k", str(k)]
    for key in ("model", "batch", "size", "steps", "finetune_steps", "seed", "device"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd += ["--gate-penalty", str(args.gate_penalty), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits_resnet")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--size", type=int, default=224, help="image size (torchvision models)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--finetune-steps", type=int, default=0)
    parser.add_argument("--gate-penalty", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=["batched", "serial"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args, args.k[0], args.child)))
        return

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    print(
        f"device: {args.device} ({name or platform.machine()}), threads {args.threads}, "
        f"torch {torch.__version__}; model {args.model}, B={args.batch}, steps={args.steps}"
    )
    print(
        "K | one-at-a-time s | batched s | regions/s serial | regions/s batched | speed-up | "
        "peak MB serial | peak MB batched | max |score diff|"
    )
    for k in args.k:
        serial = run_child(args, k, "serial")
        batched = run_child(args, k, "batched")
        diff = (torch.tensor(serial["scores"]) - torch.tensor(batched["scores"])).abs().max()
        print(
            f"{k} | {serial['seconds']:.1f} | {batched['seconds']:.1f} | "
            f"{k / serial['seconds']:.3f} | {k / batched['seconds']:.3f} | "
            f"{serial['seconds'] / batched['seconds']:.2f}x | {serial['peak_mb']:.0f} | "
            f"{batched['peak_mb']:.0f} | {float(diff):.2e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
