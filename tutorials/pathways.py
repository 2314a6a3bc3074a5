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
# # Critical pathways and the pathway gradient
#
# Khakzar et al., *Neural Response Interpretation through the Lens of Critical
# Pathways* (CVPR 2021), explain a prediction by the sparse set of neurons that
# contribute most to the target logit - the **critical pathway** of the input - and turn
# it into a saliency map, the **pathway gradient**: the input gradient of the logit
# through the network restricted to that pathway.
#
# This tutorial (about one minute on a CPU) shows
#
# 1. the critical pathways of a small digits CNN: which neurons are kept, and that the
#    pathway alone reproduces the prediction;
# 2. the pathway gradient beside Captum's Saliency, IntegratedGradients,
#    Gradient x Input, GuidedBackprop and GradCAM, on the digits CNN and on
#    EfficientNet-Lite0 (real ImageNet weights) with real photos;
# 3. LeRF / MoRF pixel-perturbation curves;
# 4. how a NeuroChains chain of a region overlaps the region's critical pathways.
#
# The numbers of the full evaluation (sanity check, perturbation AUCs, Captum's
# infidelity and sensitivity) come from `benchmarks/pathways_eval.py`; see
# `docs/pathways.md`.

# %%
import warnings

import matplotlib.pyplot as plt
import torch
from captum.attr import (
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    Saliency,
)
from captum.attr import visualization as viz

from captum_chains.data import denormalize, preprocess, sample_photo
from captum_chains.neurochains import ChainExtractor
from captum_chains.pathways import (
    CriticalPathways,
    PathwayGradient,
    discover_neurons,
    max_magnitude_channel,
    pathway_chain_overlap,
    perturbation_curves,
)
from captum_chains.pretrained import imagenet_categories, load_efficientnet_lite0
from captum_chains.zoo import load_digits_data, train_digits_model

torch.set_num_threads(1)
torch.manual_seed(0)

# %% [markdown]
# ## 1. Critical pathways of a digits CNN
#
# Every element of every ReLU-type activation output is a neuron. They are found by
# tracing the forward pass (module and functional activations alike), so no layer names
# are needed:

# %%
model = train_digits_model("vgg")  # trained once, then cached
data = load_digits_data()
x, y = data.x_test[:8], data.y_test[:8]
for site in discover_neurons(model, x[:1]):
    print(f"{site.name:14s} {site.kind:5s} {site.shape!s:14s} after {site.producers[0].module}")

# %% [markdown]
# The contribution of a neuron is $|a \, \partial y_c / \partial a|$ (NeuronMCT); the
# critical pathway keeps the top 15% of all neurons of an input (`percentile=85`, one
# global threshold over all layers; exact count, ties broken by forward order).

# %%
cp = CriticalPathways(model)
pathways = cp.attribute(x, target=y, percentile=85)
print(f"{pathways.total_neurons} neurons per input, {pathways.kept_per_example} kept")
for name, fraction in pathways.layer_kept_fraction().items():
    print(f"  {name:14s} {fraction.mean():.1%} of its neurons on the pathway")

with torch.no_grad():
    full = model(x).softmax(1)
    masked = cp.masked_forward(x, pathways).softmax(1)
same = bool((masked.argmax(1) == full.argmax(1)).all())
print("prediction of the pathway alone == full prediction:", same)
print("target probability, full vs pathway only:")
print(torch.stack([full.gather(1, y[:, None])[:, 0], masked.gather(1, y[:, None])[:, 0]]).T)

# %% [markdown]
# ## 2. The pathway gradient beside Captum's methods
#
# `PathwayGradient` is a Captum `GradientAttribution`: same call, same target formats,
# same output shape as the inputs.


# %%
def gradcam(model, layer, x, target):
    cam = LayerGradCam(model, model.get_submodule(layer)).attribute(
        x, target=target, relu_attributions=True
    )
    return LayerAttribution.interpolate(cam.detach(), tuple(x.shape[-2:]), "bilinear")


def guided_backprop(model, inputs, target):
    # Captum warns that it sets backward hooks on ReLU modules; they are its own and
    # removed after the call.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        return GuidedBackprop(model).attribute(inputs, target=target)


def all_methods(model, x, target, gradcam_layer, ig_steps):
    inputs = x.clone().requires_grad_()
    return {
        "PathwayGrad\n(NeuronMCT)": PathwayGradient(model).attribute(x, target=target),
        "Saliency": Saliency(model).attribute(inputs, target=target, abs=False),
        "Integrated\nGradients": IntegratedGradients(model).attribute(
            x, target=target, n_steps=ig_steps
        ),
        "Gradient\nx Input": InputXGradient(model).attribute(inputs, target=target),
        "Guided\nBackprop": guided_backprop(model, inputs, target),
        "GradCAM": gradcam(model, gradcam_layer, x, target),
    }


def show(images, maps, titles_left):
    rows, cols = len(images), len(maps) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 1.9 * rows), squeeze=False)
    for i, image in enumerate(images):
        axes[i, 0].imshow(image, cmap="gray" if image.ndim == 2 else None)
        axes[i, 0].set_title(titles_left[i], fontsize=8)
        for j, (name, attr) in enumerate(maps.items(), start=1):
            single = max_magnitude_channel(attr[i : i + 1].detach())[0, 0].numpy()
            viz.visualize_image_attr(
                single[..., None],
                method="heat_map",
                sign="absolute_value",
                plt_fig_axis=(fig, axes[i, j]),
                use_pyplot=False,
            )
            if i == 0:
                axes[i, j].set_title(name, fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    return fig


digit_maps = all_methods(model, x[:4], y[:4], gradcam_layer="features.19", ig_steps=50)
show([img[0].numpy() for img in x[:4]], digit_maps, [f"digit {int(t)}" for t in y[:4]])
plt.show()

# %% [markdown]
# ### EfficientNet-Lite0 on real photos
#
# Its activations are ReLU6 modules inside timm's `BatchNormAct2d`; the tracer finds all
# 33 activation layers (about 6.2 million neurons per image) without any model-specific
# code.

# %%
effnet = load_efficientnet_lite0()
categories = imagenet_categories()
photos = torch.stack([preprocess(sample_photo(n)) for n in ("chelsea", "coffee")])
with torch.no_grad():
    photo_target = effnet(photos).argmax(1)
labels = [categories[int(t)] for t in photo_target]
photo_maps = all_methods(effnet, photos, photo_target, gradcam_layer="bn2", ig_steps=16)
show(
    [denormalize(p).permute(1, 2, 0).numpy() for p in photos],
    photo_maps,
    labels,
)
plt.show()

# %% [markdown]
# Note: Captum's GuidedBackprop only modifies `nn.ReLU` modules; EfficientNet-Lite0 uses
# `nn.ReLU6`, so there GuidedBackprop equals the plain gradient.

# %% [markdown]
# ## 3. LeRF / MoRF pixel perturbation
#
# Remove the least (LeRF) or most (MoRF) relevant pixels, fill them with the image's
# channel mean, and follow the target probability (relative to the intact input). A
# faithful map keeps LeRF high and drives MoRF down.

# %%
x32, y32 = data.x_test[:32], data.y_test[:32]
maps32 = {
    "PathwayGrad (NeuronMCT)": PathwayGradient(model).attribute(x32, target=y32),
    "Saliency": Saliency(model).attribute(x32.clone().requires_grad_(), target=y32, abs=False),
    "IntegratedGradients": IntegratedGradients(model).attribute(x32, target=y32, n_steps=50),
    "GradCAM": gradcam(model, "features.19", x32, y32),
}
fig, (ax_l, ax_m) = plt.subplots(1, 2, figsize=(9, 3.2))
for name, attr in maps32.items():
    curves = perturbation_curves(model, x32, attr, target=y32)
    ax_l.plot(curves.fractions, curves.prob_ratio("lerf").mean(1), label=name)
    ax_m.plot(curves.fractions, curves.prob_ratio("morf").mean(1), label=name)
    s = curves.summary()
    print(f"{name:26s} LeRF AUC {s['lerf_auc']:.3f}  MoRF AUC {s['morf_auc']:.3f}")
ax_l.set(title="LeRF (higher is better)", xlabel="fraction of pixels removed", ylabel="p / p0")
ax_m.set(title="MoRF (lower is better)", xlabel="fraction of pixels removed")
ax_m.legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Critical pathways and a NeuroChains chain
#
# A NeuroChains chain keeps conv filters for a whole region of inputs; a critical pathway
# keeps neurons per input. A filter is *on the pathway* of an input when any neuron of
# its channel in the activation that follows it (traced through BN) is kept.
# `pathway_chain_overlap` reports, per input, the fraction of the chain's kept filters
# on the pathway and vice versa, with the level a random set of the same size would
# reach.

# %%
region = data.x_test[data.y_test == 3][:10]
chain = ChainExtractor(model).attribute(region, progress=False, seed=0)
region_pathways = cp.attribute(region, target=3, percentile=85)
overlap = pathway_chain_overlap(chain, region_pathways)
print({k: round(v, 3) for k, v in overlap.summary().items()})
overlap.per_layer()

# %% [markdown]
# ## Numbers of the full evaluation
#
# `python benchmarks/pathways_eval.py` (CPU, one thread) reproduces the tables in
# `docs/pathways.md`: the cascading-randomization sanity check, LeRF/MoRF AUCs and
# Captum's infidelity and sensitivity for all methods, on the digits CNN and on
# EfficientNet-Lite0 with real photos.
