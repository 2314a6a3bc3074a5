"""Probe for issue 15: which scores hold during the default schedule's first ~170 steps?

Adam moves a score by about ``lr`` per step in the direction of its whole gradient, so a
filter whose KL gradient stays below lambda (``g > -lambda``) falls at ``lr`` per step
while one with ``g < -lambda`` holds. If every filter fell together, the first ~170 steps
could be skipped by starting all scores at ``1 - lr * t``. This probe measures the KL
gradient w.r.t. the scores along such a descent on the demo's region:

* ``uniform``: every score at ``c`` and every gate parameter at ``-(1 - c)`` (where the
  descent puts them after ``(1 - c) / lr`` steps);
* ``held``: the same, except that the filters found holding at an earlier level (``g <
  -lambda``) stay at 1, a staircase version of the descent.

    OMP_NUM_THREADS=1 python benchmarks/lite0_descent_probe.py uniform 1 0.8 0.6 0.4 0.2
    OMP_NUM_THREADS=1 python benchmarks/lite0_descent_probe.py held 1 0.95 0.9 ... 0.2

Rows (KL, holding filters) go to ``benchmarks/results/lite0_descent_probe.jsonl``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from captum_chains import ChainConfig, ChainExtractor
from captum_chains._utils.validation import format_inputs
from captum_chains.data import local_region, sample_photo
from captum_chains.neurochains import _Optimization
from captum_chains.pretrained import load_efficientnet_lite0

OUT = Path(__file__).parent / "results" / "lite0_descent_probe.jsonl"


def main() -> None:
    mode, levels = sys.argv[1], [float(v) for v in sys.argv[2:]]
    if mode not in ("uniform", "held"):
        raise SystemExit("mode must be 'uniform' or 'held'")
    torch.set_num_threads(1)
    model = load_efficientnet_lite0()
    x = local_region([sample_photo("chelsea"), sample_photo("coffee")], n=20, seed=0)
    config = ChainConfig()
    items = format_inputs(x)
    structure = ChainExtractor(model, config)._structure(items, None, None, True)
    run = _Optimization(model, structure, config, items, (), 1, None)
    lam, units = run.l1_weight, structure.total_units
    held = torch.zeros(1, units, dtype=torch.bool)
    for c in levels:
        level = torch.full((1, units), c)
        scores = torch.where(held, torch.ones_like(level), level).requires_grad_(True)
        alphas = torch.full((1, len(structure.gates)), -(1 - c))
        gates = torch.sigmoid(alphas / config.temperature)
        with run.masked() as state:
            kl = run._forward_kl(state, scores, gates)
            (grad,) = torch.autograd.grad(kl.sum(), [scores])
        holding = grad < -lam
        if mode == "held":
            held |= holding
        row = {
            "mode": mode,
            "c": c,
            "kl": round(float(kl.detach()), 4),
            "holding": int(holding.sum()),
            "held_at_1": int(held.sum()),
        }
        print(json.dumps(row), flush=True)
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
