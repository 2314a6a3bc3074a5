"""Cost of one NeuroChains optimization step relative to the floor.

The floor is one forward pass plus an activation-only backward pass of the model on the
same inputs (gradient taken w.r.t. the input only): the least any method
that needs gradients at every layer must pay. It is timed in both memory layouts (as given
and channels-last) and the faster one counts, since a NeuroChains step may run in either
(``ChainConfig.channels_last``). A NeuroChains step is one masked forward,
the KL and penalties, one backward to the scores and gates, and one Adam update.

    python benchmarks/step_cost.py --model lite0 --batch 20 --size 224 --repeats 5
    python benchmarks/step_cost.py --model resnet50 --full      # also a whole chain's wall time

Prints the device, absolute times and the ratio step / floor.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import time

import torch
from torch import nn

from captum_chains import ChainExtractor
from captum_chains._utils.model_state import eval_mode


def build(name: str) -> nn.Module:
    """The benchmark models (random weights except Lite0)."""
    import timm
    import torchvision

    if name == "lite0":
        from captum_chains.pretrained import load_efficientnet_lite0

        return load_efficientnet_lite0()
    if name == "resnet50":
        return torchvision.models.resnet50().eval()
    if name == "vgg19":
        return torchvision.models.vgg19().eval()
    if name == "vit_b16":
        return timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    raise ValueError(f"unknown model {name!r}")


def floor_time(model: nn.Module, x: torch.Tensor, repeats: int) -> list[float]:
    """Seconds of forward + activation-only backward, per repeat."""
    times = []
    with eval_mode(model):
        for _ in range(repeats + 1):
            xi = x.clone().requires_grad_(True)
            sync(x)
            start = time.perf_counter()
            torch.autograd.grad(model(xi).logsumexp(1).sum(), xi)
            sync(x)
            times.append(time.perf_counter() - start)
    return times[1:]


def step_times(model: nn.Module, x: torch.Tensor, repeats: int) -> list[float]:
    """Seconds per NeuroChains optimization step (from the run's history), first step dropped."""
    chain = ChainExtractor(model, steps=repeats + 1, finetune_steps=0).attribute(x, progress=False)
    stamps = [row["time"] for row in chain.history if row["phase"] == "optimize"]
    return [b - a for a, b in itertools.pairwise(stamps)]


def sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="lite0", choices=["lite0", "resnet50", "vgg19", "vit_b16"]
    )
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3, help="samples per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating floor/step rounds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="also time a whole chain (300 steps)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build(args.model).to(args.device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    where = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    device = torch.cuda.get_device_name() if x.is_cuda else f"CPU ({where})"
    # floor and step are measured in alternating rounds, so that a change of the machine's
    # load during the run affects both alike
    x_nhwc = x.contiguous(memory_format=torch.channels_last)
    floor, floor_nhwc, step = [], [], []
    for _ in range(args.rounds):
        floor += floor_time(model, x, args.repeats)
        floor_nhwc += floor_time(model, x_nhwc, args.repeats)
        step += step_times(model, x, args.repeats)
    given, nhwc = statistics.median(floor), statistics.median(floor_nhwc)
    f, s = min(given, nhwc), statistics.median(step)
    print(f"device: {device}; torch {torch.__version__}")
    print(f"floor as given {given:.3f} s, channels-last {nhwc:.3f} s: the faster counts")
    print(f"{args.model} {args.batch}x{args.size}^2: floor {f:.3f} s, step {s:.3f} s, ", end="")
    samples = f"{len(floor)} + {len(floor_nhwc)} floor and {len(step)} step samples"
    print(f"ratio {s / f:.2f}x ({samples})")
    if args.full:
        start = time.perf_counter()
        chain = ChainExtractor(model).attribute(x, progress=True)
        wall = time.perf_counter() - start
        steps = len(chain.history)
        print(f"full chain: {wall:.1f} s, {steps} steps ({wall / steps:.2f} s/step), ", end="")
        print(f"kept {chain.num_filters}/{chain.total_filters}")


if __name__ == "__main__":
    main()
