"""Figures of a chain (NeuroChains, Wang, Zhou and Bilmes, TMLR 2022, Figs. 1, 4, 6, 7, 17).

Every function returns a headless :class:`matplotlib.figure.Figure` (save it with
:func:`save_figure` as PNG, SVG or PDF) and takes a ``Chain`` or a ``SubNetwork``.

plot_architecture
    The model's layers in order, kept filters coloured by score, removed layers greyed.
plot_feature_maps, smoe_layer_maps, smoe_saliency, smoe_scale
    Per-layer SMOE scale saliency (Mundhenk et al. 2019), original beside sub-network.
plot_filters, activation_maximization, top_activating_crops
    Pictures of kept filters (Erhan et al. 2009 with Fourier/decorrelated regularisation)
    and the input patches that excite them most.
plot_chain, chain_graph_for
    The filter -> filter graph of the chain (:func:`captum_chains.chains.chain_graph`),
    strongest paths highlighted (``weight_graph`` and ``strongest_node_paths`` are
    deprecated aliases).
compare, compare_attributions
    Captum's IntegratedGradients / LayerGradCam / Saliency on the model and on the
    sub-network, beside NeuroChains' own map, with rank correlations.
plot_firing, firing_maps
    Kept filters' maps in the original network vs the sub-network.
"""

from typing import TYPE_CHECKING

from captum_chains._utils.lazy import attach

# ``compare`` is both a function and its submodule's name: a lazy lookup would return the
# module once anything imported ``visualization.compare`` directly, so import it now.
from captum_chains.visualization.compare import Comparison, compare, compare_attributions

if TYPE_CHECKING:  # what type checkers see; the same names as in attach() below
    from captum_chains.visualization._common import rank_correlation, save_figure
    from captum_chains.visualization.architecture import plot_architecture
    from captum_chains.visualization.chain_graph import (
        chain_graph_for,
        plot_chain,
        strongest_node_paths,
        weight_graph,
    )
    from captum_chains.visualization.feature_maps import (
        combine_maps,
        gauss_norm,
        plot_feature_maps,
        smoe_layer_maps,
        smoe_saliency,
        smoe_scale,
    )
    from captum_chains.visualization.filters import (
        FilterPictures,
        TopCrops,
        activation_maximization,
        plot_filters,
        top_activating_crops,
    )
    from captum_chains.visualization.firing import firing_maps, map_correlation, plot_firing

__getattr__, __dir__ = attach(
    __name__,
    {
        "_common": ["rank_correlation", "save_figure"],
        "architecture": ["plot_architecture"],
        "chain_graph": ["chain_graph_for", "plot_chain", "strongest_node_paths", "weight_graph"],
        "feature_maps": [
            "combine_maps",
            "gauss_norm",
            "plot_feature_maps",
            "smoe_layer_maps",
            "smoe_saliency",
            "smoe_scale",
        ],
        "filters": [
            "FilterPictures",
            "TopCrops",
            "activation_maximization",
            "plot_filters",
            "top_activating_crops",
        ],
        "firing": ["firing_maps", "map_correlation", "plot_firing"],
    },
)

__all__ = [
    "Comparison",
    "FilterPictures",
    "TopCrops",
    "activation_maximization",
    "chain_graph_for",
    "combine_maps",
    "compare",
    "compare_attributions",
    "firing_maps",
    "gauss_norm",
    "map_correlation",
    "plot_architecture",
    "plot_chain",
    "plot_feature_maps",
    "plot_filters",
    "plot_firing",
    "rank_correlation",
    "save_figure",
    "smoe_layer_maps",
    "smoe_saliency",
    "smoe_scale",
    "strongest_node_paths",
    "top_activating_crops",
    "weight_graph",
]
