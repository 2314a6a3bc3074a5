"""Quantitative evaluation of NeuroChains chains (Wang, Zhou and Bilmes, TMLR 2022).

Every metric takes a :class:`~captum_chains.Chain` or a
:class:`~captum_chains.SubNetwork` (whose ``.model`` is the original network) plus
inputs (default: the region stored in the chain):

* :func:`fidelity` - drop of the original predicted class's probability, top-1
  agreement and KL when the sub-network replaces the model (Fig. 2 left).
* :func:`faithfulness` - remove each kept filter alone (batched) and correlate the
  damage with its score (Fig. 2 right).
* :func:`quotient` / :func:`prediction_quotient` - the margin quotient Q(p, q) of
  Eq. (9); negative for a flipped prediction (Fig. 8).
* :func:`stability` - test fidelity on the K nearest unseen neighbours in the
  penultimate-layer space (Figs. 3, 14).
* :func:`robustness` - target-class probability under FGSM / PGD, model vs
  sub-network (Fig. 5).
* :func:`firing_correlation` - correlation of kept filters' feature maps in the
  original network and the sub-network.

See ``docs/metrics.md`` for the definitions.
"""

from captum_chains.metrics.faithfulness import FaithfulnessResult, faithfulness
from captum_chains.metrics.fidelity import FidelityResult, fidelity, fidelity_from_probs
from captum_chains.metrics.firing import FiringResult, firing_correlation
from captum_chains.metrics.quotient import (
    complement_subnetwork,
    margin,
    prediction_quotient,
    quotient,
)
from captum_chains.metrics.robustness import ATTACKS, RobustnessResult, robustness
from captum_chains.metrics.stability import (
    DEFAULT_KS,
    StabilityResult,
    find_classifier,
    nearest_neighbours,
    penultimate_features,
    stability,
)

__all__ = [
    "ATTACKS",
    "DEFAULT_KS",
    "FaithfulnessResult",
    "FidelityResult",
    "FiringResult",
    "RobustnessResult",
    "StabilityResult",
    "complement_subnetwork",
    "faithfulness",
    "fidelity",
    "fidelity_from_probs",
    "find_classifier",
    "firing_correlation",
    "margin",
    "nearest_neighbours",
    "penultimate_features",
    "prediction_quotient",
    "quotient",
    "robustness",
    "stability",
]
