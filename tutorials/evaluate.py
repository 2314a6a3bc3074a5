# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Evaluating a chain: fidelity, faithfulness, stability, robustness
#
# A NeuroChains chain (Wang, Zhou and Bilmes, TMLR 2022) is a tiny sub-network that
# should behave like the model on a *local region* of inputs. This tutorial measures how
# well it does, with the paper's quantitative analyses, on a small VGG-style CNN trained
# on scikit-learn's digits (trained in about a minute the first time, then cached):
#
# 1. **fidelity** - how much probability of the original prediction is lost (Fig. 2 left);
# 2. **faithfulness** - do high-score filters hurt most when removed? (Fig. 2 right);
# 3. **quotient** - margins kept, or predictions flipped? (Eq. 9, Fig. 8);
# 4. **stability** - does the chain still work on unseen neighbours? (Figs. 3, 14);
# 5. **robustness** - model vs sub-network under FGSM / PGD (Fig. 5);
# 6. **firing** - do kept filters fire as in the original network?
#
# and finally runs a small many-region **study** with its figures. It runs in about a
# minute on a CPU.

# %%
import matplotlib

matplotlib.use("Agg")
import tempfile

import torch

from captum_chains import ChainExtractor
from captum_chains.metrics import (
    faithfulness,
    fidelity,
    firing_correlation,
    prediction_quotient,
    robustness,
    stability,
)
from captum_chains.studies import plot_study, run_study, sample_regions
from captum_chains.zoo import load_digits_data, train_digits_model

torch.set_num_threads(1)
data = load_digits_data()
model = train_digits_model("vgg")

# %% [markdown]
# ## A region and its chain
# The paper's protocol: two classes, images the model classifies correctly with
# confidence >= 0.95. We draw one region of 2 x 10 training images and keep the test
# split as *unseen* data. On these tiny models the paper's penalties remove everything,
# so we use a gate penalty of 0.05 and l1 = 0.05 (see docs/metrics.md, "Digits studies"),
# and 80 steps with lr = 0.02 for every score (`free_rate=1`: at 10x that rate these scores
# would all reach zero within ten steps).

# %%
(region,) = sample_regions(model, data.x_train, data.y_train, n_regions=1, seed=0)
print("classes", region.classes, "inputs", tuple(region.inputs.shape))
config = {
    "l1": 0.05,
    "gate_penalty": 0.05,
    "lr": 0.02,
    "free_rate": 1.0,
    "steps": 80,
    "finetune_steps": 20,
}
chain = ChainExtractor(model, **config).attribute(region.inputs, progress=False, seed=0)
print(f"kept {chain.num_filters}/{chain.total_filters} filters, KL {chain.kl:.3f}")

# %% [markdown]
# ## Fidelity
# `drop = p[y] - q[y]`: the decrease of the original predicted class's probability when
# the sub-network replaces the model.

# %%
fid = fidelity(chain)  # the chain remembers its region
print(fid.summary())

# %% [markdown]
# ## Faithfulness
# Every kept filter is removed alone from the sub-network (many removals per forward
# pass), and the damage is correlated with its score.

# %%
faith = faithfulness(chain)
print(f"Pearson r = {faith.pearson:.2f}, Spearman = {faith.spearman:.2f}")
print(faith.table.sort_values("degradation", ascending=False).head())

# %% [markdown]
# ## Quotient
# Q = 1 keeps the original margin, Q < 0 is a flipped prediction. The *complement*
# (the model without the chain's filters) should flip the predictions if the chain is
# necessary.

# %%
q_sub = prediction_quotient(chain)
q_comp = prediction_quotient(chain, network="complement")
print("sub-network Q median", float(q_sub.median()), "flipped", float((q_sub < 0).float().mean()))
print("complement  Q median", float(q_comp.median()), "flipped", float((q_comp < 0).float().mean()))

# %% [markdown]
# ## Stability on unseen neighbours
# Neighbours are found in the model's penultimate-layer space (the input of the final
# classifier, found automatically).

# %%
stab = stability(chain, data.x_test, ks=(1, 5, 10, 20), pool_labels=data.y_test)
print(stab.table)

# %% [markdown]
# ## Robustness
# FGSM and PGD with a budget of 0.1 in pixel units (the digits are normalized as
# (x - 0.3) / 0.4, so epsilon = 0.25 in input units), attacking each network with its
# own gradients.

# %%
rob = robustness(
    chain,
    target=region.labels,
    epsilon=0.25,
    lower_bound=-0.75,
    upper_bound=1.75,
    pgd_steps=10,
)
print({k: round(v, 3) for k, v in rob.summary().items() if k.endswith(("_prob", "_gap"))})

# %% [markdown]
# ## Firing of the kept filters

# %%
firing = firing_correlation(chain)
print(f"mean correlation of kept filters' maps: {firing.mean_correlation:.3f}")

# %% [markdown]
# ## A small study
# `run_study` does all of the above on many regions and writes one row per region (and
# per filter, input and K) to disk as it goes; an interrupted study resumes where it
# stopped, and `backend="ray"` runs regions in parallel. Here: 3 regions, serially.

# %%
regions = sample_regions(model, data.x_train, data.y_train, n_regions=3, seed=1)
folder = tempfile.mkdtemp(prefix="study-")
result = run_study(
    model,
    regions,
    folder,
    config=config,
    pool=data.x_test,
    pool_labels=data.y_test,
    epsilon=0.25,
    lower_bound=-0.75,
    upper_bound=1.75,
    progress=False,
)
summary = result.summary()
print({k: round(v, 3) for k, v in summary.items() if not k.startswith("robustness_clean")})

# %%
figures = plot_study({"digits VGG": result}, save_dir=f"{folder}/figures")
print("figures:", sorted(figures), "saved under", f"{folder}/figures")
