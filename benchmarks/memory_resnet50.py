"""Peak resident memory of a 20-image ResNet-50 chain on the CPU (a proxy for GPU memory).

    python benchmarks/memory_resnet50.py

Runs in a fresh process so that ``ru_maxrss`` measures this chain only.
"""

from __future__ import annotations

import resource

import torch
import torchvision

from captum_chains import ChainExtractor


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    torch.set_num_threads(1)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(20, 3, 224, 224)
    base = peak_mb()
    with torch.no_grad():
        model(x)
    forward = peak_mb()
    ChainExtractor(model, steps=2, finetune_steps=0).attribute(x, progress=False)
    peak = peak_mb()
    print(
        f"resnet50 20x224^2: RSS before {base:.0f} MB, after a no-grad forward {forward:.0f} MB, "
        f"peak during a 2-step chain {peak:.0f} MB (growth {peak - base:.0f} MB)"
    )


if __name__ == "__main__":
    main()
