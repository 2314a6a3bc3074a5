"""Critical pathways and the pathway gradient (Khakzar et al., CVPR 2021) for Captum.

* :class:`CriticalPathways` - per-input sparse sets of activation neurons selected by
  their contribution to the target logit (NeuronMCT / NeuronIntGrad) under one
  global percentile.
* :class:`PathwayGradient` - a Captum ``GradientAttribution``: the input gradient
  through the network restricted to each input's critical pathway.
* :func:`discover_neurons` - the activation layers of any model (module or functional
  activations), found by tracing torch function calls.
* :func:`cascading_randomization`, :func:`perturbation_curves`, :func:`captum_scores`
  - the evaluation of the paper (sanity check, LeRF / MoRF) plus Captum's metrics.
* :func:`pathway_chain_overlap` - agreement with a NeuroChains chain.

See ``docs/pathways.md`` for the method and its equations.
"""

from typing import TYPE_CHECKING

from captum_chains._utils.lazy import attach

if TYPE_CHECKING:  # what type checkers see; the same names as in attach() below
    from captum_chains.pathways.contribution import integrated_contributions, taylor_contributions
    from captum_chains.pathways.critical import (
        CONTRIBUTION_METHODS,
        CriticalPathways,
        CriticalPathwaysResult,
    )
    from captum_chains.pathways.gradient import PathwayGradient, max_magnitude_channel
    from captum_chains.pathways.neurons import (
        ACTIVATION_KINDS,
        DEFAULT_ACTIVATIONS,
        ActivationTracer,
        NeuronSite,
        Producer,
        discover_neurons,
    )
    from captum_chains.pathways.overlap import (
        PathwayChainOverlap,
        filters_on_pathway,
        pathway_chain_overlap,
    )
    from captum_chains.pathways.perturbation import (
        DEFAULT_FRACTIONS,
        PerturbationCurves,
        captum_scores,
        perturbation_curves,
        pixel_relevance,
    )
    from captum_chains.pathways.sanity import (
        RandomizationResult,
        cascading_randomization,
        default_randomization_layers,
        map_similarity,
    )
    from captum_chains.pathways.selection import kept_count, select_top_neurons

__getattr__, __dir__ = attach(
    __name__,
    {
        "contribution": ["integrated_contributions", "taylor_contributions"],
        "critical": ["CONTRIBUTION_METHODS", "CriticalPathways", "CriticalPathwaysResult"],
        "gradient": ["PathwayGradient", "max_magnitude_channel"],
        "neurons": [
            "ACTIVATION_KINDS",
            "DEFAULT_ACTIVATIONS",
            "ActivationTracer",
            "NeuronSite",
            "Producer",
            "discover_neurons",
        ],
        "overlap": ["PathwayChainOverlap", "filters_on_pathway", "pathway_chain_overlap"],
        "perturbation": [
            "DEFAULT_FRACTIONS",
            "PerturbationCurves",
            "captum_scores",
            "perturbation_curves",
            "pixel_relevance",
        ],
        "sanity": [
            "RandomizationResult",
            "cascading_randomization",
            "default_randomization_layers",
            "map_similarity",
        ],
        "selection": ["kept_count", "select_top_neurons"],
    },
)

__all__ = [
    "ACTIVATION_KINDS",
    "CONTRIBUTION_METHODS",
    "DEFAULT_ACTIVATIONS",
    "DEFAULT_FRACTIONS",
    "ActivationTracer",
    "CriticalPathways",
    "CriticalPathwaysResult",
    "NeuronSite",
    "PathwayChainOverlap",
    "PathwayGradient",
    "PerturbationCurves",
    "Producer",
    "RandomizationResult",
    "captum_scores",
    "cascading_randomization",
    "default_randomization_layers",
    "discover_neurons",
    "filters_on_pathway",
    "integrated_contributions",
    "kept_count",
    "map_similarity",
    "max_magnitude_channel",
    "pathway_chain_overlap",
    "perturbation_curves",
    "pixel_relevance",
    "select_top_neurons",
    "taylor_contributions",
]
