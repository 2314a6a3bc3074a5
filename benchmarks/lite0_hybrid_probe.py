"""Probe for issue 15: stochastic steps while the scores fall, every input while they sort.

``ChainConfig(batch_size=4)`` takes 0.19x the wall time but keeps 3.6x more filters. This
probe asks whether the noise hurts the descent (the first ~170 steps, while every score
falls at about ``lr`` per step and no filter is removed yet) or the sorting after it: it runs
the first ``SWITCH`` optimization steps on ``BATCH`` inputs per region and every later step
(and the fine-tuning) on all of them. ``RESET`` (``reset``/``keep``) clears Adam's moments
at the switch, where the noisy gradients have inflated the second moment. A probe, not a
feature: it patches the run's input sampling.

    OMP_NUM_THREADS=1 python benchmarks/lite0_hybrid_probe.py BATCH SWITCH RESET [STEPS]

Rows go to ``benchmarks/results/lite0_hybrid_probe.jsonl``.
"""

import json
import sys
import time

import torch
from lite0_probe_row import probe_row  # same folder

from captum_chains import ChainConfig, ChainExtractor, neurochains, optim
from captum_chains.data import local_region, sample_photo
from captum_chains.pretrained import load_efficientnet_lite0

batch, switch, reset = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "reset"
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 360
torch.set_num_threads(1)
calls = {"sampled": 0, "optimizer": 0}
sampled_inputs = neurochains._Optimization._step_inputs


def step_inputs(self):
    calls["sampled"] += 1
    if calls["sampled"] <= switch:
        return sampled_inputs(self)
    return self._whole()


class Switching(optim.ProximalAdam):
    """ProximalAdam that forgets its moments once, at the switch (``reset``)."""

    @torch.no_grad()
    def step(self, closure=None):
        calls["optimizer"] += 1
        if reset and calls["optimizer"] == switch + 1:
            self.state.clear()
        super().step()


neurochains._Optimization._step_inputs = step_inputs
neurochains.ProximalAdam = Switching
model = load_efficientnet_lite0()
x = local_region([sample_photo("chelsea"), sample_photo("coffee")], n=20, seed=0)
start = time.perf_counter()
config = ChainConfig(steps=steps, batch_size=batch)
chain = ChainExtractor(model, config).attribute(x, progress=False)
seconds = time.perf_counter() - start
row = {"batch": batch, "switch": switch, "reset": reset, **probe_row(model, x, chain, seconds)}
print(json.dumps(row), flush=True)
with open("benchmarks/results/lite0_hybrid_probe.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
