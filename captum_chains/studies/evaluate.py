"""One region of a study: extract its chain, run every metric, return table rows.

This is the unit of work that the serial and Ray backends of
:func:`captum_chains.studies.run_study` run: it needs only the model, the regions,
the chain config and the study settings, and returns plain rows (no references to
the model), so it can run in another process or on another machine.
"""

from __future__ import annotations

import math
import os
import socket
import time
import traceback
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from captum_chains.config import ChainConfig
from captum_chains.metrics import (
    ATTACKS,
    faithfulness,
    fidelity,
    firing_correlation,
    prediction_quotient,
    robustness,
    stability,
)
from captum_chains.metrics.robustness import AttackOn
from captum_chains.neurochains import ChainExtractor
from captum_chains.result import Chain
from captum_chains.studies.regions import Region
from captum_chains.subnetwork import SubNetwork
from captum_chains.units.base import ModelStructure

METRICS: tuple[str, ...] = (
    "fidelity",
    "faithfulness",
    "quotient",
    "stability",
    "robustness",
    "firing",
)


@dataclass(frozen=True)
class StudySettings:
    """What a study measures on every region (everything except the chain's config).

    Attributes
    ----------
    metrics : tuple of str
        Subset of :data:`METRICS` to run (fidelity always runs).
    ks : tuple of int
        Neighbourhood sizes of the stability metric.
    epsilon : float
        L-inf radius of the FGSM / PGD perturbations, in input units.
    attacks : tuple of str
        Attacks of the robustness metric.
    pgd_steps : int
        PGD steps.
    pgd_step_size : float, optional
        PGD step size (default ``2.5 * epsilon / pgd_steps``).
    lower_bound, upper_bound : float
        Valid input range for the attacks.
    attack_on : {"each", "model", "subnetwork"}
        Whose gradients build the perturbations.
    faithfulness_max_units : int, optional
        Evaluate at most this many kept units per region (a seeded random subset); all
        when ``None``. Useful on large models, where each removal is a forward pass
        over the region.
    batch_size : int
        Inputs per forward pass in the metrics.
    stability_layer : str, optional
        Module whose input is the stability feature space (default: final classifier).
    seed : int
        Base seed; region ``r`` uses ``seed + crc32(region_id)``.
    """

    metrics: tuple[str, ...] = METRICS
    ks: tuple[int, ...] = (1, 5, 10, 20)
    epsilon: float = 0.1
    attacks: tuple[str, ...] = ATTACKS
    pgd_steps: int = 10
    pgd_step_size: float | None = None
    lower_bound: float = -math.inf
    upper_bound: float = math.inf
    attack_on: AttackOn = "each"
    faithfulness_max_units: int | None = None
    batch_size: int = 256
    stability_layer: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {METRICS}")
        if not self.epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.ks):
            raise ValueError(f"ks must be positive ints, got {self.ks}")
        if self.faithfulness_max_units is not None and self.faithfulness_max_units < 1:
            raise ValueError(
                f"faithfulness_max_units must be >= 1 or None, got {self.faithfulness_max_units}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (infinite bounds as strings)."""
        out = asdict(self)
        for key in ("lower_bound", "upper_bound"):
            if math.isinf(out[key]):
                out[key] = str(out[key])
        out["metrics"] = list(out["metrics"])
        out["ks"] = list(out["ks"])
        out["attacks"] = list(out["attacks"])
        return out


@dataclass
class RegionTables:
    """Everything a study stores about one region.

    Attributes
    ----------
    region : dict
        The region's row (status, sizes, summary metrics, timings).
    filters : list of dict
        One row per evaluated kept unit (faithfulness and firing).
    inputs : list of dict
        One row per input (fidelity, quotients, adversarial probabilities).
    stability : list of dict
        One row per K.
    scores, gates_open : Tensor, optional
        The sub-network (to save it next to the rows); None for a failed region.
    structure : ModelStructure, optional
        The structure the scores refer to.
    """

    region: dict[str, Any]
    filters: list[dict[str, Any]] = field(default_factory=list)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    stability: list[dict[str, Any]] = field(default_factory=list)
    scores: torch.Tensor | None = None
    gates_open: torch.Tensor | None = None
    structure: ModelStructure | None = None

    @property
    def region_id(self) -> str:
        return str(self.region["region_id"])

    @property
    def ok(self) -> bool:
        return self.region.get("status") == "ok"


def region_seed(seed: int, region_id: str) -> int:
    """The seed of one region: independent of the order in which regions run."""
    return (seed + zlib.crc32(region_id.encode())) % (2**31)


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _base_row(region: Region) -> dict[str, Any]:
    return {
        "region_id": region.region_id,
        "status": "ok",
        "error": "",
        "traceback": "",
        "inputs_hash": region.fingerprint(),
        "classes": ",".join(str(c) for c in region.classes),
        "n_inputs": int(region.inputs.shape[0]),
        "worker": _worker(),
    }


def failed_region(region: Region, err: BaseException, seconds: float = 0.0) -> RegionTables:
    """The record of a region whose extraction or evaluation raised ``err``."""
    row = _base_row(region)
    lines = str(err).strip().splitlines()
    row.update(
        status="error",
        error=f"{type(err).__name__}: {lines[0][:300] if lines else ''}",
        traceback="".join(traceback.format_exception(type(err), err, err.__traceback__))[-4000:],
        extract_s=seconds,
    )
    return RegionTables(region=row)


def process_regions(
    model: nn.Module,
    regions: list[Region],
    config: ChainConfig,
    settings: StudySettings,
    pool: torch.Tensor | None = None,
    pool_labels: torch.Tensor | None = None,
) -> list[RegionTables]:
    """Extract the chains of ``regions`` (batched when they share a size) and evaluate them.

    A region whose extraction or evaluation raises an ``Exception`` is returned as a
    failed record; other regions are unaffected. ``KeyboardInterrupt`` propagates.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    start = time.perf_counter()
    chains: list[Chain | BaseException]
    try:
        torch.manual_seed(region_seed(settings.seed, regions[0].region_id))
        extractor = ChainExtractor(model, config)
        chains = list(
            extractor.attribute_many(
                [r.inputs.to(device) for r in regions], progress=False, keep_inputs=True
            )
        )
        per_region = (time.perf_counter() - start) / len(regions)
        seconds = [per_region] * len(regions)
    except Exception:
        chains, seconds = [], []
        # Isolate the failure: extract each region alone.
        for r in regions:
            t0 = time.perf_counter()
            try:
                torch.manual_seed(region_seed(settings.seed, r.region_id))
                chains.append(
                    ChainExtractor(model, config).attribute(r.inputs.to(device), progress=False)
                )
            except Exception as err:
                chains.append(err)
            seconds.append(time.perf_counter() - t0)
    out = []
    for region, chain, secs in zip(regions, chains, seconds, strict=True):
        if isinstance(chain, BaseException):
            out.append(failed_region(region, chain, secs))
            continue
        try:
            out.append(evaluate_chain(chain, region, settings, pool, pool_labels, secs))
        except Exception as err:
            out.append(failed_region(region, err, secs))
    return out


def evaluate_chain(
    chain: Chain,
    region: Region,
    settings: StudySettings,
    pool: torch.Tensor | None = None,
    pool_labels: torch.Tensor | None = None,
    extract_seconds: float = 0.0,
) -> RegionTables:
    """All metrics of ``settings.metrics`` on one extracted chain."""
    t0 = time.perf_counter()
    sub: SubNetwork = chain.subnetwork
    device = sub.scores.device
    x = region.inputs.to(device)
    bs = settings.batch_size
    row = _base_row(region)
    row.update(
        num_filters=sub.num_filters,
        total_filters=sub.total_filters,
        kept_fraction=sub.num_filters / max(sub.total_filters, 1),
        num_gates=len(sub.structure.gates),
        removed_gates=len(sub.removed_gates),
        kl=float(chain.kl),
        finetuned=bool(chain.finetuned),
        steps=len(chain.history),
        extract_s=float(extract_seconds),
    )
    fid = fidelity(sub, x, batch_size=bs)
    row.update(
        fidelity_mean_drop=fid.mean_drop,
        fidelity_median_drop=fid.median_drop,
        fidelity_agreement=fid.agreement_rate,
        fidelity_kl=fid.mean_kl,
    )
    labels = region.labels
    inputs_rows: dict[str, list[Any]] = {
        "region_id": [region.region_id] * len(x),
        "input": list(range(len(x))),
        "label": labels.reshape(-1).tolist() if labels is not None else [-1] * len(x),
        "predicted": fid.predicted.tolist(),
        "original_prob": fid.original_prob.tolist(),
        "subnetwork_prob": fid.subnetwork_prob.tolist(),
        "drop": fid.drop.tolist(),
        "agreement": fid.agreement.tolist(),
        "kl": fid.kl.tolist(),
    }
    metrics = set(settings.metrics)
    filters: dict[tuple[str, int], dict[str, Any]] = {}

    if "faithfulness" in metrics:
        fa = faithfulness(
            sub,
            x,
            batch_size=bs,
            max_units=settings.faithfulness_max_units,
            seed=region_seed(settings.seed, region.region_id),
        )
        row.update(
            faithfulness_pearson=fa.pearson,
            faithfulness_pearson_p=fa.pearson_p,
            faithfulness_spearman=fa.spearman,
            faithfulness_spearman_p=fa.spearman_p,
            faithfulness_units=len(fa.table),
        )
        for rec in fa.table.to_dict("records"):
            entry = {"region_id": region.region_id, **rec}
            entry["removal_kl"] = entry.pop("kl")
            entry["removal_agreement"] = entry.pop("agreement")
            filters[(rec["layer"], int(rec["unit"]))] = entry
    if "firing" in metrics:
        fr = firing_correlation(sub, x)
        row["firing_mean_correlation"] = fr.mean_correlation
        for rec in fr.table.to_dict("records"):
            key = (rec["layer"], int(rec["unit"]))
            entry = filters.setdefault(
                key,
                {
                    "region_id": region.region_id,
                    "layer": rec["layer"],
                    "unit": int(rec["unit"]),
                    "label": rec["label"],
                    "score": rec["score"],
                },
            )
            entry["firing_correlation"] = rec["correlation"]
            entry["firing_input_correlation"] = rec["mean_input_correlation"]
    if "quotient" in metrics:
        q_sub = prediction_quotient(sub, x, network="subnetwork", batch_size=bs)
        q_comp = prediction_quotient(sub, x, network="complement", batch_size=bs)
        inputs_rows["quotient"] = q_sub.tolist()
        inputs_rows["complement_quotient"] = q_comp.tolist()
        row.update(
            quotient_median=float(q_sub.nanmedian()),
            quotient_flipped=float((q_sub < 0).double().mean()),
            complement_quotient_median=float(q_comp.nanmedian()),
            complement_flipped=float((q_comp < 0).double().mean()),
        )
    stab_rows: list[dict[str, Any]] = []
    if "stability" in metrics:
        if pool is None:
            raise ValueError("the stability metric needs a pool of unseen inputs (pool=...)")
        st = stability(
            sub,
            pool.to(device),
            x,
            ks=settings.ks,
            pool_labels=pool_labels,
            layer=settings.stability_layer,
            batch_size=bs,
        )
        for rec in st.table.to_dict("records"):
            stab_rows.append({"region_id": region.region_id, **rec})
            row[f"stability_k{rec['k']}"] = rec["agreement"]
            row[f"stability_k{rec['k']}_neighbours"] = rec["neighbours"]
    if "robustness" in metrics:
        rb = robustness(
            sub,
            x,
            target=None if labels is None else labels.reshape(-1).to(device),
            epsilon=settings.epsilon,
            attacks=settings.attacks,
            pgd_steps=settings.pgd_steps,
            pgd_step_size=settings.pgd_step_size,
            lower_bound=settings.lower_bound,
            upper_bound=settings.upper_bound,
            attack_on=settings.attack_on,
            batch_size=bs,
        )
        for name, value in rb.summary().items():
            row[f"robustness_{name}"] = value
        for attack, rows in rb.table.groupby("attack", sort=False):
            inputs_rows[f"{attack}_model_prob"] = rows["model_prob"].tolist()
            inputs_rows[f"{attack}_subnetwork_prob"] = rows["subnetwork_prob"].tolist()
    row["metrics_s"] = time.perf_counter() - t0
    inputs_list = [dict(zip(inputs_rows, vals, strict=True)) for vals in zip(*inputs_rows.values())]
    return RegionTables(
        region=row,
        filters=list(filters.values()),
        inputs=inputs_list,
        stability=stab_rows,
        scores=sub.scores.detach().cpu(),
        gates_open=sub.gates_open.detach().cpu(),
        structure=sub.structure,
    )
