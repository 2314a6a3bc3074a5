"""The tables of a finished (or partly finished) study and the paper's statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captum_chains.studies.storage import StudyStore


@dataclass
class StudyResult:
    """The four tables of a study.

    Attributes
    ----------
    out_dir : Path
        The study folder.
    regions : pandas.DataFrame
        One row per region: ``status`` ("ok" or "error" with ``error``), sizes,
        ``kept_fraction``, fidelity, faithfulness correlations, quotients,
        ``stability_k{K}``, ``robustness_*`` and timings.
    filters : pandas.DataFrame
        One row per evaluated kept unit: score, removal degradation, firing correlation.
    inputs : pandas.DataFrame
        One row per input: fidelity, quotients, adversarial probabilities.
    stability : pandas.DataFrame
        One row per (region, K).
    manifest : dict
        Model fingerprint, chain config and settings of the study.
    """

    out_dir: Path
    regions: Any
    filters: Any
    inputs: Any
    stability: Any
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> Any:
        """Rows of the regions that finished without error."""
        if self.regions.empty:
            return self.regions
        return self.regions[self.regions["status"] == "ok"]

    @property
    def failed(self) -> Any:
        """Rows of the regions that raised (with ``error`` and ``traceback``)."""
        if self.regions.empty:
            return self.regions
        return self.regions[self.regions["status"] != "ok"]

    def summary(self, ks: tuple[int, ...] = (1, 5, 20)) -> dict[str, float]:
        """The statistics the paper reports, over the successful regions.

        Returns
        -------
        dict
            ``regions`` / ``failed`` counts; ``median_kept_percent`` (kept units as % of
            all units); ``median_fidelity_drop`` (median over regions of the mean
            ``p[y] - q[y]``); ``fraction_full_agreement`` (regions whose sub-network
            keeps every top-1 prediction); ``faithfulness_pearson_median`` (median of
            the per-region Pearson r of score vs degradation) and
            ``faithfulness_pearson_pooled`` (over all units of all regions, after
            standardizing scores and degradations within each region);
            ``stability_k{K}`` (mean agreement on the K-NN neighbours);
            ``robustness_{attack}_gap`` (mean over regions of sub-network minus model
            target probability) and the mean probabilities.
        """
        import numpy as np

        ok = self.ok
        out: dict[str, float] = {
            "regions": float(len(self.regions)),
            "failed": float(len(self.failed)),
        }
        if ok.empty:
            return out
        out["median_kept_percent"] = float(100 * ok["kept_fraction"].median())
        out["median_kept_filters"] = float(ok["num_filters"].median())
        out["total_filters"] = float(ok["total_filters"].iloc[0])
        out["median_fidelity_drop"] = float(ok["fidelity_mean_drop"].median())
        out["mean_fidelity_drop"] = float(ok["fidelity_mean_drop"].mean())
        out["fraction_full_agreement"] = float((ok["fidelity_agreement"] >= 1.0).mean())
        out["mean_agreement"] = float(ok["fidelity_agreement"].mean())
        if "faithfulness_pearson" in ok:
            out["faithfulness_pearson_median"] = float(ok["faithfulness_pearson"].median())
            out["faithfulness_spearman_median"] = float(ok["faithfulness_spearman"].median())
            out["faithfulness_pearson_pooled"] = _pooled_pearson(self.filters, ok)
        for k in ks:
            col = f"stability_k{k}"
            if col in ok:
                out[col] = float(ok[col].mean())
        for col in ok.columns:
            if col.startswith("robustness_") and (col.endswith("_gap") or col.endswith("_prob")):
                out[col] = float(ok[col].mean())
        if "quotient_median" in ok:
            out["quotient_median"] = float(ok["quotient_median"].median())
            out["quotient_flipped"] = float(ok["quotient_flipped"].mean())
            out["complement_flipped"] = float(ok["complement_flipped"].mean())
        if "firing_mean_correlation" in ok:
            out["firing_mean_correlation"] = float(np.nanmean(ok["firing_mean_correlation"]))
        out["median_extract_s"] = float(ok["extract_s"].median())
        out["median_metrics_s"] = float(ok["metrics_s"].median())
        return out

    def figures(self, save_dir: str | Path | None = None, name: str | None = None) -> dict:
        """The paper's figures for this study (see :func:`plot_study`)."""
        from captum_chains.studies.figures import plot_study

        return plot_study({name or self.out_dir.name: self}, save_dir=save_dir)

    def subnetwork(self, region_id: str, model: Any) -> Any:
        """Load the saved sub-network of one region onto ``model``."""
        from captum_chains.subnetwork import SubNetwork

        path = StudyStore(self.out_dir).subnetwork_path(region_id)
        if not path.exists():
            raise FileNotFoundError(
                f"no saved sub-network for region {region_id!r} in {self.out_dir} (was the "
                "study run with save_subnetworks=False, or did the region fail?)"
            )
        return SubNetwork.load(path, model)


def _pooled_pearson(filters: Any, ok: Any) -> float:
    import numpy as np

    if filters.empty or "degradation" not in filters:
        return float("nan")
    frame = filters[filters["region_id"].isin(set(ok["region_id"]))]
    zs, zd = [], []
    for _, group in frame.groupby("region_id"):
        s, d = group["score"].to_numpy(float), group["degradation"].to_numpy(float)
        if len(s) < 3 or s.std() == 0 or d.std() == 0:
            continue
        zs.append((s - s.mean()) / s.std())
        zd.append((d - d.mean()) / d.std())
    if not zs:
        return float("nan")
    return float(np.corrcoef(np.concatenate(zs), np.concatenate(zd))[0, 1])


def load_study(out_dir: str | Path) -> StudyResult:
    """Read a study folder (finished or interrupted) into a :class:`StudyResult`."""
    root = Path(out_dir)
    fmt = "csv" if any(root.glob("parts/*/regions.csv")) else "parquet"
    store = StudyStore(root, fmt=fmt)
    manifest = store.read_manifest()
    if manifest is None:
        raise FileNotFoundError(f"{root} is not a study folder (no study.json)")
    store = StudyStore(root, fmt=manifest.get("fmt", fmt))
    tables = store.collect(order=manifest.get("region_ids"))
    return StudyResult(out_dir=root, manifest=manifest, **tables)
