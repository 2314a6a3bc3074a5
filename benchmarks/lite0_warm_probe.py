"""Probe for issue 15: warm-start the scores from a one-backward ranking, then a short run.

The first ~170 steps of the default schedule lower every score together before any filter
crosses tau. This probe skips them: one backward pass ranks the filters by the first-order
Taylor importance ``|d log p_y / d s|`` at ``s = 1`` on the region; the top ``FRAC`` start at 1,
the others at ``LOW`` (just above tau), and the default optimizer runs ``STEPS`` steps (plus the
usual fine-tuning). It patches ``_Optimization.initial``: a probe, not a feature.

    OMP_NUM_THREADS=1 python benchmarks/lite0_warm_probe.py FRAC LOW STEPS

Result (one run, beside another job): FRAC 0.05, LOW 0.15, 60 steps kept 877 filters but the
sub-network lost every prediction (agreement 0.00, KL 3.46 after fine-tuning): the ranking
does not find the filters the region needs, and 60 steps cannot bring them back.
"""

import json
import sys
import time

import torch
import torch.nn.functional as F
from lite0_probe_row import probe_row  # same folder

from captum_chains import ChainConfig, ChainExtractor, neurochains
from captum_chains.data import local_region, sample_photo
from captum_chains.pretrained import load_efficientnet_lite0

frac, low, steps = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
label = f"warm frac={frac} low={low} steps={steps}"
torch.set_num_threads(1)
orig = neurochains._Optimization.initial


def initial(self):
    scores, alphas, use_gates = orig(self)
    s = torch.ones_like(scores, requires_grad=True)
    with self.masked() as state:
        self._state(s, None, state)
        logits = self._run_model()
        y = self.log_p.argmax(1, keepdim=True)
        lp = F.log_softmax(logits.float(), 1).gather(1, y).sum()
        (g,) = torch.autograd.grad(lp, s)
    imp = g.abs()
    k = max(1, int(frac * imp.shape[1]))
    top = imp.topk(k, dim=1).indices
    init = torch.full_like(scores, low)
    init.scatter_(1, top, 1.0)
    with torch.no_grad():
        scores.copy_(init)
    return scores, alphas, use_gates


neurochains._Optimization.initial = initial
model = load_efficientnet_lite0()
x = local_region([sample_photo("chelsea"), sample_photo("coffee")], n=20, seed=0)
t = time.perf_counter()
chain = ChainExtractor(model, ChainConfig(steps=steps)).attribute(x, progress=False)
sec = time.perf_counter() - t
row = {"label": label, **probe_row(model, x, chain, sec)}
print(json.dumps(row), flush=True)
open("benchmarks/results/lite0_warm_probe.jsonl", "a").write(json.dumps(row) + "\n")
