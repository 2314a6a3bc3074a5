"""Probe for issue 15: let the scores that are not holding fall faster.

Adam moves every score by about ``lr`` per step, so the filters nothing holds take ~180
steps to fall from 1 to tau. This probe gives each score its own rate: ``SPEED x lr`` while
its smoothed KL gradient is above ``-FRAC x lambda`` (nothing holds it), ``lr`` otherwise
(it is being sorted), in the metric and proximal step of :class:`ProximalAdam`. It patches
the optimizer of the default run on the demo's region: a probe, not a feature.

    OMP_NUM_THREADS=1 python benchmarks/lite0_accel_probe.py SPEED FRAC STEPS

Rows (kept, fidelity, kept count every 10 steps) go to
``benchmarks/results/lite0_accel_probe.jsonl``.
"""

import json
import sys
import time

import torch
from lite0_probe_row import probe_row  # same folder

from captum_chains import ChainConfig, ChainExtractor, neurochains, optim
from captum_chains.data import local_region, sample_photo
from captum_chains.optim import nonnegative_soft_threshold
from captum_chains.pretrained import load_efficientnet_lite0

speed, frac, steps = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)


class Accelerated(optim.ProximalAdam):
    """ProximalAdam whose non-negative l1 groups (the scores) move at a per-score rate."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if not group["nonnegative"] or group["l1"] == 0:
                continue
            beta1, beta2 = group["betas"]
            lr, l1, eps = group["lr"], group["l1"], group["eps"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["step"] += 1
                t, m, v = state["step"], state["m"], state["v"]
                whole = p.grad + l1
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(whole, whole, value=1 - beta2)
                m_hat = m / (1 - beta1**t)
                metric = (v / (1 - beta2**t)).sqrt().add_(eps)
                rate = torch.where(m_hat > -frac * l1, lr * speed, lr)
                z = p - rate * m_hat / metric
                p.copy_(nonnegative_soft_threshold(z, rate * l1 / metric))
                p.grad = None  # done: the plain step below handles the gates
        super().step()


neurochains.ProximalAdam = Accelerated
model = load_efficientnet_lite0()
x = local_region([sample_photo("chelsea"), sample_photo("coffee")], n=20, seed=0)
start = time.perf_counter()
chain = ChainExtractor(model, ChainConfig(steps=steps)).attribute(x, progress=False)
seconds = time.perf_counter() - start
row = {"speed": speed, "frac": frac, **probe_row(model, x, chain, seconds)}
print(json.dumps(row), flush=True)
with open("benchmarks/results/lite0_accel_probe.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
