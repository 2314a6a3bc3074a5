"""The result row the Lite0 optimizer probes print and append (kept, fidelity, trajectory)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def probe_row(model: nn.Module, x: torch.Tensor, chain: Any, seconds: float) -> dict[str, Any]:
    """Kept filters (count and %), top-1 agreement, mean drop of the predicted class's
    probability, KL, whether it was fine-tuned, steps, wall time, the kept count every 10
    optimization steps, and the seconds since the start and the filters computed every 20
    steps of each phase."""
    with torch.no_grad():
        p = model(x).softmax(1)
        q = chain.subnetwork(x).softmax(1)
    y = p.argmax(1, keepdim=True)
    return {
        "kept": chain.num_filters,
        "total": chain.total_filters,
        "kept_pct": round(100 * chain.num_filters / chain.total_filters, 2),
        "agreement": float((q.argmax(1, keepdim=True) == y).float().mean()),
        "drop": round(float((p.gather(1, y) - q.gather(1, y)).mean()), 5),
        "kl": round(chain.kl, 5),
        "finetuned": chain.finetuned,
        "steps": len(chain.history),
        "seconds": round(seconds, 1),
        "kept_by_step": {
            r["step"]: r["kept"]
            for r in chain.history
            if r["step"] % 10 == 9 and r.get("phase", "optimize") == "optimize"
        },
        "seconds_by_step": {
            f"{r['phase']}:{r['step']}": round(r["time"], 1)
            for r in chain.history
            if r["step"] % 20 == 19 or r["step"] == 0
        },
        "computed_by_step": {
            f"{r['phase']}:{r['step']}": r.get("computed")
            for r in chain.history
            if r["step"] % 20 == 19 or r["step"] == 0
        },
    }
