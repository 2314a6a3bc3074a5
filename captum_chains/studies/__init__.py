"""Many-region studies of NeuroChains chains, as in the paper's quantitative analyses.

Wang, Zhou and Bilmes (TMLR 2022) support their claims with statistics over ~1500
local regions (Figs. 2, 3, 5, 8, 14). This package reproduces that protocol on any
classifier and data set:

* :func:`sample_regions` - regions of 2 random classes x 10 images each that the model
  classifies correctly with confidence >= 0.95 (the paper's protocol).
* :func:`run_study` - NeuroChains plus every metric of :mod:`captum_chains.metrics` on
  each region, one atomically written result folder per region (resumable, failures
  recorded), serially or in parallel on Ray (``backend="ray"``).
* :func:`load_study`, :class:`StudyResult` - the tables and the paper's statistics
  (:meth:`StudyResult.summary`).
* :func:`plot_study` - the paper's figures from the tables.
"""

from typing import TYPE_CHECKING

from captum_chains._utils.lazy import attach

if TYPE_CHECKING:  # what type checkers see; the same names as in attach() below
    from captum_chains.studies.evaluate import (
        METRICS,
        RegionTables,
        StudySettings,
        evaluate_chain,
        process_regions,
    )
    from captum_chains.studies.figures import (
        FIGURES,
        plot_faithfulness,
        plot_quotient,
        plot_robustness,
        plot_size_vs_fidelity,
        plot_stability,
        plot_study,
    )
    from captum_chains.studies.regions import Region, as_regions, sample_regions
    from captum_chains.studies.result import StudyResult, load_study
    from captum_chains.studies.runner import run_study
    from captum_chains.studies.storage import StudyStore

__getattr__, __dir__ = attach(
    __name__,
    {
        "evaluate": [
            "METRICS",
            "RegionTables",
            "StudySettings",
            "evaluate_chain",
            "process_regions",
        ],
        "figures": [
            "FIGURES",
            "plot_faithfulness",
            "plot_quotient",
            "plot_robustness",
            "plot_size_vs_fidelity",
            "plot_stability",
            "plot_study",
        ],
        "regions": ["Region", "as_regions", "sample_regions"],
        "result": ["StudyResult", "load_study"],
        "runner": ["run_study"],
        "storage": ["StudyStore"],
    },
)

__all__ = [
    "FIGURES",
    "METRICS",
    "Region",
    "RegionTables",
    "StudyResult",
    "StudySettings",
    "StudyStore",
    "as_regions",
    "evaluate_chain",
    "load_study",
    "plot_faithfulness",
    "plot_quotient",
    "plot_robustness",
    "plot_size_vs_fidelity",
    "plot_stability",
    "plot_study",
    "process_regions",
    "run_study",
    "sample_regions",
]
