"""The figures of the NeuroChains paper's quantitative analyses, from study tables.

* ``size_vs_fidelity`` - kept units (% of all) against the region's mean fidelity
  drop, one point per region (Fig. 2 left).
* ``faithfulness`` - a unit's score against the degradation caused by removing it
  alone, pooled over regions, with a least-squares regression line (Fig. 2 right).
* ``stability`` - agreement on the K nearest unseen neighbours against K, median and
  interquartile band over regions (Figs. 3, 14).
* ``robustness`` - histograms of the target-class probability under each attack,
  original model vs sub-network (Fig. 5).
* ``quotient`` - histogram of Q(p, q) of the sub-network (and of the complement),
  negative values = flipped predictions (Fig. 8).

Several studies (e.g. one per model) are overlaid when a mapping name -> study is
given.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

FIGURES: tuple[str, ...] = (
    "size_vs_fidelity",
    "faithfulness",
    "stability",
    "robustness",
    "quotient",
)


def _as_mapping(results: Any) -> dict[str, Any]:
    # a StudyResult is recognised by its attributes: this module does not import
    # studies.result, which imports it (StudyResult.figures)
    if isinstance(results, Mapping):
        return dict(results)
    if hasattr(results, "out_dir") and hasattr(results, "regions") and hasattr(results, "ok"):
        return {results.out_dir.name: results}
    raise TypeError(f"expected a StudyResult or a dict of name -> StudyResult, got {results!r}")


def _legend_or_note(ax: Any, note: str, fontsize: float) -> None:
    """A legend of the labelled artists, or ``note`` across an empty panel."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize)
    else:
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, fontsize=9)


def _ok_ids(result: Any) -> set[str]:
    return set(result.ok["region_id"]) if not result.regions.empty else set()


def plot_size_vs_fidelity(results: Any, ax: Any = None) -> Any:
    """Kept units (%) vs mean fidelity drop, one point per region (Fig. 2 left)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(5, 4))[1]
    for name, res in _as_mapping(results).items():
        ok = res.ok
        if ok.empty:
            continue
        ax.scatter(100 * ok["kept_fraction"], ok["fidelity_mean_drop"], s=12, alpha=0.6, label=name)
    ax.set_xlabel("kept units (% of the model)")
    ax.set_ylabel("fidelity drop  p[y] - q[y]")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_title("sub-network size vs fidelity")
    _legend_or_note(ax, "no extracted region", fontsize=8)
    return ax.figure


def plot_faithfulness(results: Any, ax: Any = None) -> Any:
    """Score vs degradation of single-unit removal with a regression line (Fig. 2 right)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(5, 4))[1]
    for name, res in _as_mapping(results).items():
        f = res.filters
        if f.empty or "degradation" not in f:
            continue
        f = f[f["region_id"].isin(_ok_ids(res)) & f["degradation"].notna()]
        x, y = f["score"].to_numpy(float), f["degradation"].to_numpy(float)
        if len(x) == 0:
            continue
        points = ax.scatter(x, y, s=4, alpha=0.3)
        label = name
        if len(x) >= 2 and np.ptp(x) > 0:
            slope, intercept = np.polyfit(x, y, 1)
            grid = np.linspace(x.min(), x.max(), 50)
            r = np.corrcoef(x, y)[0, 1] if np.ptp(y) > 0 else float("nan")
            label = f"{name} (r = {r:.2f})"
            ax.plot(grid, slope * grid + intercept, color=points.get_facecolor()[0][:3], lw=2)
        points.set_label(label)
    ax.set_xlabel("unit score")
    ax.set_ylabel("degradation when removed alone  q[y] - q^(-i)[y]")
    ax.set_title("faithfulness: score vs degradation")
    _legend_or_note(ax, "no faithfulness in this study (metrics: faithfulness)", fontsize=8)
    return ax.figure


def plot_stability(results: Any, ax: Any = None) -> Any:
    """Agreement on the K nearest unseen neighbours vs K (Figs. 3, 14)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(5, 4))[1]
    for name, res in _as_mapping(results).items():
        st = res.stability
        if st.empty:
            continue
        st = st[st["region_id"].isin(_ok_ids(res))]
        grouped = st.groupby("k")["agreement"]
        ks = np.array(sorted(grouped.groups))
        med = grouped.median().reindex(ks).to_numpy()
        lo = grouped.quantile(0.25).reindex(ks).to_numpy()
        hi = grouped.quantile(0.75).reindex(ks).to_numpy()
        mean = grouped.mean().reindex(ks).to_numpy()
        (line,) = ax.plot(ks, mean, marker="o", label=f"{name} (mean)")
        ax.plot(ks, med, ls="--", color=line.get_color(), lw=1, label=f"{name} (median, IQR)")
        ax.fill_between(ks, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("K nearest unseen neighbours per input")
    ax.set_ylabel("agreement with the model's prediction")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("stability on unseen data")
    _legend_or_note(ax, "no stability in this study (metrics: stability)", fontsize=8)
    return ax.figure


def plot_robustness(results: Any, bins: int = 20) -> Any:
    """Target-class probability under each attack, model vs sub-network (Fig. 5)."""
    import matplotlib.pyplot as plt

    results = _as_mapping(results)
    attacks: list[str] = []
    for res in results.values():
        for col in res.inputs.columns if not res.inputs.empty else []:
            if col.endswith("_model_prob"):
                attack = col[: -len("_model_prob")]
                if attack not in attacks:
                    attacks.append(attack)
    rows = max(1, len(results))
    cols = max(1, len(attacks))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    edges = np.linspace(0, 1, bins + 1)
    for i, (name, res) in enumerate(results.items()):
        inputs = res.inputs
        if inputs.empty:
            continue
        inputs = inputs[inputs["region_id"].isin(_ok_ids(res))]
        for j, attack in enumerate(attacks):
            ax = axes[i][j]
            m = inputs.get(f"{attack}_model_prob")
            s = inputs.get(f"{attack}_subnetwork_prob")
            if m is None or s is None:
                continue
            ax.hist(m.dropna(), bins=edges, alpha=0.5, label="original model")
            ax.hist(s.dropna(), bins=edges, alpha=0.5, label="sub-network")
            ax.set_title(f"{name}: {attack}", fontsize=9)
            ax.set_xlabel("probability of the target class")
            if j == 0:
                ax.set_ylabel("inputs")
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_quotient(results: Any, ax: Any = None, clip: float = 2.0) -> Any:
    """Histogram of Q(p, q) (values clipped to [-clip, clip]); Q < 0 = flipped (Fig. 8)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(5, 4))[1]
    edges = np.linspace(-clip, clip, 41)
    for name, res in _as_mapping(results).items():
        inputs = res.inputs
        if inputs.empty or "quotient" not in inputs:
            continue
        inputs = inputs[inputs["region_id"].isin(_ok_ids(res))]
        ax.hist(
            inputs["quotient"].dropna().clip(-clip, clip),
            bins=edges,
            alpha=0.5,
            label=f"{name}: sub-network",
        )
        ax.hist(
            inputs["complement_quotient"].dropna().clip(-clip, clip),
            bins=edges,
            alpha=0.5,
            histtype="step",
            lw=1.5,
            label=f"{name}: model without the chain",
        )
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("Q(p, q)  (< 0: prediction flipped)")
    ax.set_ylabel("inputs")
    ax.set_title("prediction quotient, Eq. (9)")
    _legend_or_note(ax, "no quotient in this study (metrics: quotient)", fontsize=7)
    return ax.figure


def plot_study(results: Any, save_dir: str | Path | None = None, fmt: str = "png") -> dict:
    """All figures of one study or of several overlaid (name -> StudyResult).

    Parameters
    ----------
    results : StudyResult or dict of str to StudyResult
        The studies.
    save_dir : str or Path, optional
        If given, each figure is saved there as ``<name>.<fmt>``.
    fmt : str
        Image format for saving.

    Returns
    -------
    dict of str to matplotlib Figure
        Keyed by :data:`FIGURES`.
    """
    figs = {
        "size_vs_fidelity": plot_size_vs_fidelity(results),
        "faithfulness": plot_faithfulness(results),
        "stability": plot_stability(results),
        "robustness": plot_robustness(results),
        "quotient": plot_quotient(results),
    }
    if save_dir is not None:
        out = Path(save_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, fig in figs.items():
            fig.savefig(out / f"{name}.{fmt}", dpi=120, bbox_inches="tight")
    return figs
